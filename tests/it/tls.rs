//! TLS, mTLS and the IP allow-list through the server (issue 12), over loopback.
//!
//! Written ahead of the TLS layer in the reactor's transport, against this proposed API (to be
//! declared in `tests/it.rs` as `#[cfg(feature = "tls")] #[path = "it/tls.rs"] mod tls;`):
//!
//! - `Builder::tls(TlsAcceptor)`: serve TLS with this acceptor (reload through a clone of it);
//! - `Context::peer_identity() -> Option<&PeerIdentity>`;
//! - `ConnectionStop::peer_identity: Option<Arc<PeerIdentity>>` (the observer's view);
//! - `mllp_connections_rejected_total{reason}` gains `TlsFailureKind::as_str()` for handshake
//!   failures (`tls_plaintext`, `tls_no_client_cert`, `tls_bad_client_cert`, `tls_handshake`).
//!
//! and the existing `Builder::handshake_timeout`, `Builder::allow(AllowList)` and the
//! `handshake_timeout` and `not_allowed` reasons.
//!
//! Certificates and `openssl s_client` come from `src/tls/tests/support.rs`, shared with the
//! unit tests.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mllp_reactor::ack::{self, AckCode};
use mllp_reactor::cidr::AllowList;
use mllp_reactor::telemetry::names::CONNECTIONS_REJECTED;
use mllp_reactor::tls::{ClientTls, PeerIdentity, SubjectAltName, TlsAcceptor, TlsConfig};
use mllp_reactor::{Client, ClientConfig, ClientError, Reply, Server, handler_fn};
use rustls::pki_types::ServerName;

use crate::support::{Event, Recorded, WAIT, frame, message, start, start_at};

#[path = "../../src/tls/tests/support.rs"]
mod certs;

use certs::{Leaf, pki, rustls_client, s_client};

fn server_tls(leaf: &Leaf) -> TlsAcceptor {
    TlsAcceptor::new(TlsConfig::from_pem(leaf.cert.as_str(), leaf.key.as_str())).unwrap()
}

fn mtls() -> TlsAcceptor {
    let pki = pki();
    let config = TlsConfig::from_pem(pki.server.cert.as_str(), pki.server.key.as_str())
        .client_ca_pem(pki.ca.as_str());
    TlsAcceptor::new(config).unwrap()
}

fn client_tls(identity: Option<&Leaf>) -> ClientTls {
    let tls = ClientTls::from_ca_pem(pki().ca.as_str()).unwrap();
    match identity {
        Some(leaf) => tls
            .client_cert_pem(leaf.cert.as_str(), leaf.key.as_str())
            .unwrap(),
        None => tls,
    }
}

#[track_caller]
fn tls_client(addr: SocketAddr, identity: Option<&Leaf>) -> Client {
    let config = ClientConfig::default()
        .connect_timeout(WAIT)
        .response_timeout(WAIT)
        .tls(client_tls(identity));
    Client::connect(addr, config).expect("tls connect")
}

fn allow(cidrs: &[&str]) -> AllowList {
    cidrs.iter().map(|c| c.parse().unwrap()).collect()
}

fn ack_handler() -> impl mllp_reactor::Handler {
    handler_fn(|msg, _| Ok(Reply::Send(ack::accept(msg))))
}

/// The value of `mllp_connections_rejected_total{reason}`.
fn rejected(metrics: &Recorded, reason: &str) -> u64 {
    metrics.counter(CONNECTIONS_REJECTED, &[("reason", reason)])
}

/// A rustls client offering only `version`, with an optional client certificate.
fn rustls_stream(
    addr: SocketAddr,
    version: &'static rustls::SupportedProtocolVersion,
    identity: Option<&Leaf>,
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    let config = rustls_client(&[version], identity);
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    tcp.set_write_timeout(Some(WAIT)).unwrap();
    let conn =
        rustls::ClientConnection::new(config, ServerName::try_from("localhost").unwrap()).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

/// Reads until EOF or an error; true if the peer closed (EOF, reset or TLS alert) with no
/// application data.
fn closed_without_data(stream: &mut impl Read) -> bool {
    let mut rest = Vec::new();
    match stream.read_to_end(&mut rest) {
        Ok(_) => rest.is_empty(),
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock && rest.is_empty(),
    }
}

// -- Handshake and round trips -----------------------------------------------------------------

#[test]
fn tls_handshake_and_ack_round_trip_on_both_versions() {
    let server = start(Server::builder(ack_handler()).tls(server_tls(&pki().server)));
    let mut client = tls_client(server.addr, None);
    let ack = client.send(&message("V13")).unwrap();
    assert_eq!(ack.code, AckCode::AA);
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let mut stream = rustls_stream(server.addr, version, None);
        stream.write_all(&frame(&message("V"))).unwrap();
        let mut buf = [0u8; 4096];
        let n = stream.read(&mut buf).unwrap();
        assert!(buf[..n].windows(8).any(|w| w == b"MSA|AA|V"));
        assert_eq!(stream.conn.protocol_version(), Some(version.version));
    }
    drop(client);
    server.stop();
}

#[test]
fn five_megabyte_message_and_a_thousand_pipelined_messages_over_tls() {
    let builder = Server::builder(ack_handler())
        .max_message_size(6_000_000)
        .tls(server_tls(&pki().server));
    let server = start(builder);
    let mut client = tls_client(server.addr, None);
    let mut big = message("BIG");
    big.extend_from_slice(b"OBX|1|ED|PDF||");
    big.extend((0..5_000_000).map(|i| b'A' + (i % 26) as u8));
    big.push(b'\r');
    assert_eq!(client.send(&big).unwrap().code, AckCode::AA);
    let messages: Vec<Vec<u8>> = (0..1000).map(|i| message(&format!("P{i}"))).collect();
    let acks = client.send_pipelined(&messages, 64).unwrap();
    assert_eq!(acks.len(), 1000);
    assert!(
        acks.iter()
            .enumerate()
            .all(|(i, a)| a.control_id == format!("P{i}"))
    );
    drop(client);
    server.stop();
}

// -- mTLS -------------------------------------------------------------------------------------

#[test]
fn mtls_identity_reaches_the_handler_and_the_observer() {
    let (tx, rx) = mpsc::channel::<Option<PeerIdentity>>();
    let tx = Mutex::new(tx);
    let handler = handler_fn(move |msg, cx| {
        let _ = tx.lock().unwrap().send(cx.peer_identity().cloned());
        Ok(Reply::Send(ack::accept(msg)))
    });
    let server = start(Server::builder(handler).tls(mtls()));
    let mut client = tls_client(server.addr, Some(&pki().client));
    assert_eq!(client.send(&message("ID")).unwrap().code, AckCode::AA);
    let identity = rx.recv_timeout(WAIT).unwrap().expect("identity under mTLS");
    assert_eq!(identity.common_name.as_deref(), Some("lab-gw"));
    assert!(
        identity
            .sans
            .contains(&SubjectAltName::Dns("lab.example".into()))
    );
    let expected = ring::digest::digest(&ring::digest::SHA256, &pki().client.der);
    assert_eq!(identity.fingerprint_sha256[..], *expected.as_ref());
    drop(client);
    let mut stopped = server.stop();
    let Event::ConnectionStop(stop) = stopped
        .events
        .wait("connection stop", |e| matches!(e, Event::ConnectionStop(_)))
    else {
        unreachable!("matched above")
    };
    assert_eq!(stop.peer_identity.as_deref(), Some(&identity));
}

#[test]
fn mtls_refuses_no_certificate_and_another_cas_certificate() {
    let server = start(Server::builder(ack_handler()).tls(mtls()));
    // No certificate.
    let mut plain = tls_client(server.addr, None);
    assert!(plain.send(&message("NOCERT")).is_err());
    // A certificate from a CA the server does not trust (TLS 1.2: refused in the handshake).
    let mut other = rustls_stream(
        server.addr,
        &rustls::version::TLS12,
        Some(&pki().other_client),
    );
    assert!(other.write_all(&frame(&message("OTHER"))).is_err() || closed_without_data(&mut other));
    let stopped = server.stop();
    assert_eq!(rejected(&stopped.metrics, "tls_no_client_cert"), 1);
    assert_eq!(rejected(&stopped.metrics, "tls_bad_client_cert"), 1);
}

#[test]
fn mtls_client_without_a_certificate_is_told_the_server_requires_one() {
    let server = start(Server::builder(ack_handler()).tls(mtls()));
    for _ in 0..5 {
        let config = ClientConfig::default()
            .connect_timeout(WAIT)
            .response_timeout(WAIT)
            .tls(client_tls(None));
        let error = match Client::connect(server.addr, config) {
            Ok(mut client) => client.send(&message("NOCERT")).unwrap_err(),
            Err(e) => e,
        };
        assert!(
            matches!(error, ClientError::ClientCertRequired),
            "{error:?}"
        );
        assert_eq!(
            error.to_string(),
            "the server requires a client certificate (mutual TLS) and none was presented"
        );
    }
    let stopped = server.stop();
    assert_eq!(rejected(&stopped.metrics, "tls_no_client_cert"), 5);
}

// -- Misbehaving peers ------------------------------------------------------------------------

#[test]
fn plaintext_to_a_tls_port_is_closed_and_counted() {
    let server = start(Server::builder(ack_handler()).tls(server_tls(&pki().server)));
    let mut tcp = TcpStream::connect(server.addr).unwrap();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    tcp.write_all(&frame(&message("PLAIN"))).unwrap();
    assert!(
        closed_without_data(&mut tcp),
        "a clean close, never a hang or an answer"
    );
    let stopped = server.stop();
    assert_eq!(rejected(&stopped.metrics, "tls_plaintext"), 1);
}

#[test]
fn a_silent_client_is_closed_at_the_handshake_deadline() {
    let builder = Server::builder(ack_handler())
        .handshake_timeout(Duration::from_millis(300))
        .tls(server_tls(&pki().server));
    let server = start(builder);
    let mut tcp = TcpStream::connect(server.addr).unwrap();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    assert!(closed_without_data(&mut tcp));
    let stopped = server.stop();
    assert_eq!(rejected(&stopped.metrics, "handshake_timeout"), 1);
}

// -- Reload -------------------------------------------------------------------------------------

#[test]
fn reload_swaps_the_certificate_for_new_connections_while_old_ones_go_on() {
    let pki = pki();
    let acceptor = server_tls(&pki.server);
    let server = start(Server::builder(ack_handler()).tls(acceptor.clone()));
    let mut old = rustls_stream(server.addr, &rustls::version::TLS13, None);
    old.write_all(&frame(&message("OLD1"))).unwrap();
    let mut buf = [0u8; 4096];
    assert!(old.read(&mut buf).unwrap() > 0);

    let bad = TlsConfig::from_pem(pki.server_b.cert.as_str(), pki.server.key.as_str());
    assert!(
        acceptor.replace(bad).is_err(),
        "a mismatched key is refused"
    );
    let good = TlsConfig::from_pem(pki.server_b.cert.as_str(), pki.server_b.key.as_str());
    acceptor.replace(good).unwrap();

    let mut new = rustls_stream(server.addr, &rustls::version::TLS13, None);
    new.write_all(&frame(&message("NEW"))).unwrap();
    assert!(new.read(&mut buf).unwrap() > 0);
    assert_eq!(
        new.conn.peer_certificates().unwrap()[0].as_ref(),
        &pki.server_b.der[..]
    );
    assert_eq!(
        old.conn.peer_certificates().unwrap()[0].as_ref(),
        &pki.server.der[..]
    );
    old.write_all(&frame(&message("OLD2"))).unwrap();
    let n = old.read(&mut buf).unwrap();
    assert!(buf[..n].windows(11).any(|w| w == b"MSA|AA|OLD2"));
    server.stop();
}

// -- Allow-list -------------------------------------------------------------------------------

#[test]
fn allow_list_accepts_and_rejects_ipv4_with_and_without_tls() {
    for tls in [false, true] {
        let with_tls = |b: mllp_reactor::Builder| {
            if tls {
                b.tls(server_tls(&pki().server))
            } else {
                b
            }
        };
        let allowed = start(with_tls(
            Server::builder(ack_handler()).allow(allow(&["127.0.0.0/8", "::1/128"])),
        ));
        let config = ClientConfig::default().response_timeout(WAIT);
        let config = if tls {
            config.tls(client_tls(None))
        } else {
            config
        };
        let mut client = Client::connect(allowed.addr, config.clone()).unwrap();
        assert_eq!(client.send(&message("OK")).unwrap().code, AckCode::AA);
        drop(client);
        assert_eq!(rejected(&allowed.stop().metrics, "not_allowed"), 0);

        let denied = start(with_tls(
            Server::builder(ack_handler()).allow(allow(&["10.0.0.0/8"])),
        ));
        let mut tcp = TcpStream::connect(denied.addr).unwrap();
        tcp.set_read_timeout(Some(WAIT)).unwrap();
        let _ = tcp.write_all(b"\x0bMSH|^~\\&|A\r\x1c\x0d");
        assert!(closed_without_data(&mut tcp));
        assert_eq!(rejected(&denied.stop().metrics, "not_allowed"), 1);
    }
}

#[test]
fn allow_list_on_ipv6_loopback() {
    for (cidrs, allowed) in [(&["::1/128"][..], true), (&["127.0.0.0/8"][..], false)] {
        let builder = Server::builder(ack_handler())
            .allow(allow(cidrs))
            .tls(server_tls(&pki().server));
        let Ok(server) = start_at("[::1]:0", builder) else {
            eprintln!("skipped: no IPv6 loopback on this machine");
            return;
        };
        let config = ClientConfig::default()
            .connect_timeout(WAIT)
            .response_timeout(WAIT)
            .tls(client_tls(None));
        let result = Client::connect(server.addr, config).and_then(|mut c| c.send(&message("V6")));
        match (allowed, result) {
            (true, Ok(ack)) => assert_eq!(ack.code, AckCode::AA),
            (false, Err(ClientError::Connect(_) | ClientError::Io(_))) => {}
            (allowed, other) => panic!("allowed={allowed}: {other:?}"),
        }
        let stopped = server.stop();
        assert_eq!(
            rejected(&stopped.metrics, "not_allowed"),
            u64::from(!allowed)
        );
    }
}

// -- openssl s_client against the server ------------------------------------------------------

#[test]
fn openssl_s_client_talks_to_the_server() {
    let handler = handler_fn(|msg, _| Ok(Reply::SendAndClose(ack::accept(msg))));
    let server = start(Server::builder(handler).tls(server_tls(&pki().server)));
    let Some(output) = s_client(server.addr, None, &[], &frame(&message("SSL")), WAIT) else {
        return;
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("MSA|AA|SSL"),
        "{stdout:?} {:?}",
        output.stderr
    );
    server.stop();
}

// -- Behind a balancer -----------------------------------------------------------------------

/// Issue 18 defect 2: with TLS behind a PROXY header, a ClientHello that arrived in the same
/// read as the header was processed, but the ServerHello it produced was never sent
/// (edge-triggered: no new event came), and the handshake hung until its deadline. Every
/// split of header + ClientHello into two writes, including none, completes a round trip.
#[test]
fn issue_2_tls_after_a_proxy_header_at_every_split() {
    use mllp_reactor::proxy::{ProxyHeader, ProxyMode, encode_v2};
    let server = start(
        Server::builder(ack_handler())
            .tls(server_tls(&pki().server))
            .proxy_protocol(ProxyMode::V2)
            .proxy_sources(allow(&["127.0.0.0/8"])),
    );
    let header = encode_v2(&ProxyHeader::Proxied {
        source: "203.0.113.7:4000".parse().unwrap(),
        destination: "10.0.0.1:2575".parse().unwrap(),
    });
    let config = rustls_client(&[&rustls::version::TLS13], None);
    let hello = |conn: &mut rustls::ClientConnection| {
        let mut hello = Vec::new();
        conn.write_tls(&mut hello).unwrap();
        hello
    };
    let new_conn = || {
        rustls::ClientConnection::new(
            Arc::clone(&config),
            ServerName::try_from("localhost").unwrap(),
        )
        .unwrap()
    };
    let len = header.len() + hello(&mut new_conn()).len() + 16;
    for split in 0..=len {
        let mut conn = new_conn();
        let mut wire = header.clone();
        wire.extend(hello(&mut conn));
        let mut tcp = TcpStream::connect(server.addr).unwrap();
        tcp.set_nodelay(true).unwrap();
        tcp.set_read_timeout(Some(WAIT)).unwrap();
        tcp.set_write_timeout(Some(WAIT)).unwrap();
        // ClientHellos differ in length by a few bytes (extension order, GREASE).
        let (first, second) = wire.split_at(split.min(wire.len()));
        for part in [first, second] {
            if !part.is_empty() {
                tcp.write_all(part).unwrap();
            }
        }
        let mut stream = rustls::StreamOwned::new(conn, tcp);
        stream
            .write_all(&frame(&message("SPLIT")))
            .unwrap_or_else(|e| panic!("split at {split}: {e}"));
        let mut reply = Vec::new();
        let mut buf = [0u8; 4096];
        while !reply.ends_with(b"\x1c\r") {
            let n = stream
                .read(&mut buf)
                .unwrap_or_else(|e| panic!("split at {split}: {e}"));
            assert_ne!(n, 0, "split at {split}: closed");
            reply.extend_from_slice(&buf[..n]);
        }
        assert!(
            reply.windows(12).any(|w| w == b"MSA|AA|SPLIT"),
            "split at {split}"
        );
    }
    server.stop();
}
