//! An honest mTLS sender's latency while attackers send long certificate chains (issue 18,
//! defect 5).
//!
//! ```text
//! cargo run --release --features tls --example mtls_chain_attack -- [CHAIN] [ROUNDS]
//! ```
//!
//! One in-process server (mTLS, inline dispatch, one reactor). The honest sender sends one
//! message per millisecond over one mTLS connection and records each round trip. Two
//! attackers each make 25 handshakes per second with a client certificate from an impostor CA
//! named like the real one, followed by `CHAIN` (default 150) self-signed certificates named
//! like the CA: without a bound, each is a signature check on the reactor thread before the
//! client is refused. `ROUNDS` (default 5) rounds of 2 s quiet then 2 s under attack
//! (alternating, so that the load of a shared machine falls on both). Prints p50/p99/max of
//! the honest round trips in each condition, their p99 ratio, and the reactor thread's CPU
//! per refused handshake (from `/proc/self/task/*/stat`, 10 ms ticks).

use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use mllp_reactor::tls::{ClientTls, TlsAcceptor, TlsConfig};
use mllp_reactor::{Client, ClientConfig, Dispatch, Reply, Server, ack, handler_fn};
use rcgen::{CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

const CA_NAME: &str = "Bench CA";
const ATTACKERS: usize = 2;
const ATTACK_RATE: u32 = 25;

fn ca() -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, CA_NAME);
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

fn leaf(name: &str, issuer: &CertifiedIssuer<'static, KeyPair>) -> (rcgen::Certificate, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec![name.to_owned()])
        .unwrap()
        .signed_by(&key, issuer)
        .unwrap();
    (cert, key)
}

/// A rustls client presenting an impostor's leaf and `chain` certificates named like the CA.
fn attack_config(chain: usize) -> Arc<rustls::ClientConfig> {
    let impostor = ca();
    let (cert, key) = leaf("intruder.example", &impostor);
    let mut certs = vec![CertificateDer::from(cert.der().to_vec())];
    for _ in 0..chain {
        certs.push(ca().der().clone());
    }
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let verifier = Arc::new(AnyServer(
        rustls::crypto::ring::default_provider().signature_verification_algorithms,
    ));
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(certs, key)
        .unwrap(),
    )
}

/// The attacker does not care who the server is.
#[derive(Debug)]
struct AnyServer(rustls::crypto::WebPkiSupportedAlgorithms);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// One refused handshake: connect, send the chain, read until the server closes.
fn attack_once(addr: SocketAddr, config: &Arc<rustls::ClientConfig>) {
    let Ok(mut tcp) = TcpStream::connect(addr) else {
        return;
    };
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(5)));
    let name = ServerName::try_from("localhost").unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::clone(config), name).unwrap();
    while conn.is_handshaking() {
        if conn.complete_io(&mut tcp).is_err() {
            break;
        }
    }
    // TLS 1.3: the client finishes first; the server's refusal comes after.
    let mut buf = [0u8; 64];
    let _ = std::io::Read::read(&mut rustls::Stream::new(&mut conn, &mut tcp), &mut buf);
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// Sends one message per millisecond for `seconds`; returns the sorted round trips.
fn honest_phase(client: &mut Client, seconds: u64) -> Vec<Duration> {
    let message = b"MSH|^~\\&|LAB|H|EHR|H|20260101||ADT^A01|HONEST|P|2.5.1\rPID|1\r";
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut rtts = Vec::new();
    while Instant::now() < end {
        let started = Instant::now();
        let reply = client.send(message).expect("the honest sender is answered");
        rtts.push(started.elapsed());
        assert_eq!(reply.code, ack::AckCode::AA);
        std::thread::sleep(Duration::from_millis(1));
    }
    rtts.sort();
    rtts
}

fn report(name: &str, rtts: &[Duration]) -> Duration {
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let p99 = percentile(rtts, 0.99);
    println!(
        "{name:<14} n={:<6} p50={:>7.0} µs  p99={:>7.0} µs  max={:>8.0} µs",
        rtts.len(),
        us(percentile(rtts, 0.5)),
        us(p99),
        us(*rtts.last().unwrap())
    );
    p99
}

/// CPU time (user + system) of this process's thread named `name`, from `/proc`.
fn thread_cpu(name: &str) -> Duration {
    let mut ticks = 0u64;
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // Fields after the command's closing parenthesis: state is field 3, utime 14, stime 15.
        let rest = &stat[stat.rfind(')').map_or(0, |i| i + 2)..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        ticks += fields[11].parse::<u64>().unwrap_or(0) + fields[12].parse::<u64>().unwrap_or(0);
    }
    // USER_HZ is 100 on Linux.
    Duration::from_millis(ticks * 10)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let chain: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(150);
    let rounds: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let phase = 2;

    let real = ca();
    let (server_cert, server_key) = leaf("localhost", &real);
    let (client_cert, client_key) = leaf("honest.example", &real);
    let config = TlsConfig::from_pem(server_cert.pem(), server_key.serialize_pem())
        .client_ca_pem(real.pem());
    let server = Server::builder(handler_fn(|msg, _| Ok(Reply::Send(ack::accept(msg)))))
        .dispatch(Dispatch::Inline)
        .tls(TlsAcceptor::new(config).unwrap())
        .bind("127.0.0.1:0")
        .unwrap()
        .spawn()
        .unwrap();
    let addr = server.local_addr();

    let tls = ClientTls::from_ca_pem(real.pem())
        .unwrap()
        .client_cert_pem(client_cert.pem(), client_key.serialize_pem())
        .unwrap()
        .server_name("localhost")
        .unwrap();
    let mut client = Client::connect(addr, ClientConfig::default().tls(tls)).unwrap();
    honest_phase(&mut client, 1); // warm up

    let attacking = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let handshakes = Arc::new(AtomicUsize::new(0));
    let attack = attack_config(chain);
    let attackers: Vec<_> = (0..ATTACKERS)
        .map(|_| {
            let (attacking, stop, handshakes, attack) = (
                Arc::clone(&attacking),
                Arc::clone(&stop),
                Arc::clone(&handshakes),
                Arc::clone(&attack),
            );
            std::thread::spawn(move || {
                let period = Duration::from_secs(1) / ATTACK_RATE;
                let mut next = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    if attacking.load(Ordering::Relaxed) {
                        attack_once(addr, &attack);
                        handshakes.fetch_add(1, Ordering::Relaxed);
                    }
                    next += period;
                    std::thread::sleep(next.saturating_duration_since(Instant::now()));
                    next = next.max(Instant::now() - period);
                }
            })
        })
        .collect();

    // Alternate quiet and attacked phases, so that the load of a shared machine falls on both.
    let (mut quiet, mut attacked) = (Vec::new(), Vec::new());
    let (mut quiet_cpu, mut attack_cpu) = (Duration::ZERO, Duration::ZERO);
    let mut attack_time = Duration::ZERO;
    for _ in 0..rounds {
        let cpu = thread_cpu("mllp-reactor");
        quiet.extend(honest_phase(&mut client, phase));
        quiet_cpu += thread_cpu("mllp-reactor") - cpu;
        let (cpu, started) = (thread_cpu("mllp-reactor"), Instant::now());
        attacking.store(true, Ordering::Relaxed);
        attacked.extend(honest_phase(&mut client, phase));
        attacking.store(false, Ordering::Relaxed);
        attack_time += started.elapsed();
        attack_cpu += thread_cpu("mllp-reactor") - cpu;
    }
    stop.store(true, Ordering::Relaxed);
    for a in attackers {
        a.join().unwrap();
    }
    quiet.sort();
    attacked.sort();

    let refused = handshakes.load(Ordering::Relaxed);
    println!(
        "chain of {} certificates, {ATTACKERS} attackers, {:.1} refused handshakes/s in all, {rounds} rounds of {phase} s quiet + {phase} s attacked",
        chain + 1,
        refused as f64 / attack_time.as_secs_f64(),
    );
    println!(
        "reactor CPU: quiet {:.0} ms, attacked {:.0} ms: {:.2} ms per refused handshake",
        quiet_cpu.as_secs_f64() * 1e3,
        attack_cpu.as_secs_f64() * 1e3,
        (attack_cpu.saturating_sub(quiet_cpu)).as_secs_f64() * 1e3 / refused.max(1) as f64
    );
    let q = report("quiet", &quiet);
    let a = report("under attack", &attacked);
    println!(
        "p99 under attack / quiet p99: {:.2}",
        a.as_secs_f64() / q.as_secs_f64()
    );
    drop(client);
    server.shutdown(Duration::from_secs(5)).unwrap();
}
