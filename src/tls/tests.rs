//! TlsStream over real loopback sockets, driven by a small mio server that works the way the
//! reactor does (edge-triggered, read until WouldBlock, flush when `wants_write`), plus
//! configuration errors, the client side, `openssl s_client` and the fuzz corpus.
//!
//! Certificates and `openssl s_client` come from `tests/support.rs` (rcgen, generated once per test binary); the server
//! from `tests/server.rs`.

use std::io::{self, IoSlice, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConnection, StreamOwned};

use self::server::TestServer;
use self::support::{Leaf, TempDir, pki, rustls_client, s_client};
use super::*;
use crate::codec::{FrameDecoder, encode_frame};
use crate::{Client, ClientConfig, ack};

#[path = "tests/server.rs"]
mod server;
#[path = "tests/support.rs"]
mod support;

/// Every blocking socket call in these tests gives up after this long.
const IO_TIMEOUT: Duration = Duration::from_secs(20);

fn server_config(leaf: &Leaf) -> TlsConfig {
    TlsConfig::from_pem(leaf.cert.as_str(), leaf.key.as_str())
}

fn mtls_acceptor() -> TlsAcceptor {
    let pki = pki();
    TlsAcceptor::new(server_config(&pki.server).client_ca_pem(pki.ca.as_str())).unwrap()
}

const BOTH: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

// ---------------------------------------------------------------------------------------------
// Client helpers

type RustlsClient = StreamOwned<ClientConnection, TcpStream>;

#[track_caller]
fn connect(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> RustlsClient {
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    tcp.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    StreamOwned::new(ClientConnection::new(config, name).unwrap(), tcp)
}

/// Writes `payloads` as frames in one go, then reads one reply frame per payload.
fn exchange(stream: &mut impl ReadWrite, payloads: &[&[u8]]) -> io::Result<Vec<String>> {
    let mut out = BytesMut::new();
    for payload in payloads {
        encode_frame(payload, &mut out);
    }
    stream.write_all(&out)?;
    stream.flush()?;
    let mut decoder = FrameDecoder::new(1 << 20);
    let mut buf = BytesMut::new();
    let mut replies = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    while replies.len() < payloads.len() {
        match decoder.decode(&mut buf).unwrap() {
            Some(frame) => replies.push(String::from_utf8_lossy(&frame).into_owned()),
            None => match stream.read(&mut chunk)? {
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                n => buf.extend_from_slice(&chunk[..n]),
            },
        }
    }
    Ok(replies)
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

const ADT: &[u8] = b"MSH|^~\\&|LAB|H|EHR|H|20260101||ADT^A01|MSG1|P|2.5.1\rPID|1\r";

fn assert_ack(reply: &str, control_id: &str) {
    assert!(
        reply.contains(&format!("MSA|AA|{control_id}")),
        "not an AA for {control_id}: {reply:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Handshake, versions, round trips

#[test]
fn tls13_handshake_and_ack_round_trip() {
    let acceptor = TlsAcceptor::new(server_config(&pki().server)).unwrap();
    let server = TestServer::start(acceptor, None);
    let mut client = connect(server.addr, rustls_client(BOTH, None));
    let replies = exchange(&mut client, &[ADT]).unwrap();
    assert_ack(&replies[0], "MSG1");
    assert_eq!(
        client.conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    client.conn.send_close_notify();
    client.flush().unwrap();
    drop(client);
    let report = server.report();
    assert!(report.handshake_done);
    assert_eq!(report.protocol, Some("TLSv1.3"));
    assert_eq!(report.failure, None);
    assert_eq!(report.identity, None, "no client certificate without mTLS");
    assert_eq!(report.frames, 1);
}

#[test]
fn tls12_handshake_and_ack_round_trip() {
    let acceptor = TlsAcceptor::new(server_config(&pki().server)).unwrap();
    let server = TestServer::start(acceptor, None);
    let config = rustls_client(&[&rustls::version::TLS12], None);
    let mut client = connect(server.addr, config);
    assert_ack(&exchange(&mut client, &[ADT]).unwrap()[0], "MSG1");
    assert_eq!(
        client.conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    drop(client);
    assert_eq!(server.report().protocol, Some("TLSv1.2"));
}

#[test]
fn tls12_refused_when_turned_off() {
    let acceptor = TlsAcceptor::new(server_config(&pki().server).tls12(false)).unwrap();
    let server = TestServer::start(acceptor, None);
    let config = rustls_client(&[&rustls::version::TLS12], None);
    let mut client = connect(server.addr, config);
    assert!(exchange(&mut client, &[ADT]).is_err());
    let report = server.report();
    assert_eq!(report.failure, Some(TlsFailureKind::Handshake));
    assert!(!report.handshake_done);
}

#[test]
fn five_megabyte_message_and_a_thousand_pipelined_frames() {
    let acceptor = TlsAcceptor::new(server_config(&pki().server)).unwrap();
    let server = TestServer::start(acceptor, None);
    let mut client = connect(server.addr, rustls_client(BOTH, None));

    let big: Vec<u8> = (0..5_000_000u32).map(|i| b'A' + (i % 26) as u8).collect();
    let sum = big.iter().fold(0u32, |s, &b| s.wrapping_add(b.into()));
    let replies = exchange(&mut client, &[&big]).unwrap();
    assert_eq!(replies[0], format!("LEN|5000000|{sum}"));

    let messages: Vec<String> = (0..1000)
        .map(|i| format!("MSH|^~\\&|A|B|C|D|20260101||ADT^A01|ID{i}|P|2.5.1\r"))
        .collect();
    let payloads: Vec<&[u8]> = messages.iter().map(|m| m.as_bytes()).collect();
    let replies = exchange(&mut client, &payloads).unwrap();
    for (i, reply) in replies.iter().enumerate() {
        assert_ack(reply, &format!("ID{i}"));
    }
    drop(client);
    let report = server.report();
    assert_eq!(report.frames, 1001);
    assert!(report.socket_bytes > 1000 * 40, "socket bytes counted");
}

// ---------------------------------------------------------------------------------------------
// mTLS

#[test]
fn mtls_accepts_the_right_ca_and_extracts_the_identity() {
    let server = TestServer::start(mtls_acceptor(), None);
    let client_leaf = &pki().client;
    let mut client = connect(server.addr, rustls_client(BOTH, Some(client_leaf)));
    assert_ack(&exchange(&mut client, &[ADT]).unwrap()[0], "MSG1");
    drop(client);
    let report = server.report();
    let identity = report.identity.expect("identity under mTLS");
    assert_eq!(identity.common_name.as_deref(), Some("lab-gw"));
    assert_eq!(
        identity.sans,
        vec![
            SubjectAltName::Dns("lab.example".into()),
            SubjectAltName::Ip("10.1.2.3".parse().unwrap()),
            SubjectAltName::Email("it@lab.example".into()),
        ]
    );
    let expected = ring::digest::digest(&ring::digest::SHA256, &client_leaf.der);
    assert_eq!(identity.fingerprint_sha256[..], *expected.as_ref());
    assert_eq!(identity.fingerprint_hex().len(), 64);
    let line = identity.to_string();
    assert!(line.starts_with("CN=lab-gw DNS:lab.example IP:10.1.2.3 email:it@lab.example sha256:"));
}

#[test]
fn mtls_accepts_over_tls12_too() {
    let server = TestServer::start(mtls_acceptor(), None);
    let config = rustls_client(&[&rustls::version::TLS12], Some(&pki().client));
    let mut client = connect(server.addr, config);
    assert_ack(&exchange(&mut client, &[ADT]).unwrap()[0], "MSG1");
    drop(client);
    let report = server.report();
    assert_eq!(report.protocol, Some("TLSv1.2"));
    assert!(report.identity.is_some());
}

#[test]
fn mtls_refuses_a_client_without_a_certificate() {
    let server = TestServer::start(mtls_acceptor(), None);
    let mut client = connect(server.addr, rustls_client(BOTH, None));
    assert!(exchange(&mut client, &[ADT]).is_err());
    let report = server.report();
    assert_eq!(report.failure, Some(TlsFailureKind::NoClientCert));
    assert_eq!(report.frames, 0);
    assert!(TlsFailureKind::NoClientCert.is_rejection());
}

#[test]
fn mtls_refuses_a_certificate_from_another_ca() {
    let server = TestServer::start(mtls_acceptor(), None);
    let config = rustls_client(BOTH, Some(&pki().other_client));
    let mut client = connect(server.addr, config);
    assert!(exchange(&mut client, &[ADT]).is_err());
    let report = server.report();
    assert_eq!(report.failure, Some(TlsFailureKind::BadClientCert));
    assert_eq!(report.identity, None);
    assert_eq!(
        TlsFailureKind::BadClientCert.as_str(),
        "tls_bad_client_cert"
    );
}

// ---------------------------------------------------------------------------------------------
// Misbehaving peers

#[test]
fn plaintext_mllp_to_a_tls_port_is_a_typed_failure_and_a_silent_close() {
    let acceptor = TlsAcceptor::new(server_config(&pki().server)).unwrap();
    let server = TestServer::start(acceptor, None);
    let mut tcp = TcpStream::connect(server.addr).unwrap();
    tcp.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut frame = BytesMut::new();
    encode_frame(ADT, &mut frame);
    tcp.write_all(&frame).unwrap();
    let report = server.report();
    assert_eq!(report.failure, Some(TlsFailureKind::Plaintext));
    assert_eq!(
        report.socket_bytes, 0,
        "no alert for a peer that does not speak TLS"
    );
    // The server dropped the socket: the peer sees EOF (or a reset), never a hang.
    let mut rest = Vec::new();
    match tcp.read_to_end(&mut rest) {
        Ok(_) => assert!(rest.is_empty()),
        Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset),
    }
}

#[test]
fn non_tls_garbage_is_a_handshake_failure() {
    let acceptor = TlsAcceptor::new(server_config(&pki().server)).unwrap();
    let server = TestServer::start(acceptor, None);
    let mut tcp = TcpStream::connect(server.addr).unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert_eq!(server.report().failure, Some(TlsFailureKind::Handshake));
}

#[test]
fn a_silent_client_makes_no_progress() {
    // The handshake deadline is the reactor's; the stream only must not move or spin.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let _client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (socket, _) = listener.accept().unwrap();
    socket.set_nonblocking(true).unwrap();
    let acceptor = TlsAcceptor::new(server_config(&pki().server)).unwrap();
    let mut tls = acceptor.accept(socket).unwrap();
    let mut buf = [0u8; 1024];
    for _ in 0..3 {
        let err = tls.read(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
    }
    assert!(!tls.handshake_done());
    assert!(!tls.wants_write());
    assert_eq!(tls.flush().unwrap(), 0);
    assert_eq!(tls.peer_identity(), None);
    tls.release_idle_buffers();
    assert_eq!(tls.buffered_ciphertext_capacity(), 0);
}

#[test]
fn a_client_that_closes_mid_handshake_is_an_eof() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (socket, _) = listener.accept().unwrap();
    let acceptor = TlsAcceptor::new(server_config(&pki().server)).unwrap();
    let mut tls = acceptor.accept(socket).unwrap();
    client.write_all(&[0x16, 0x03, 0x01]).unwrap(); // the start of a record header
    drop(client);
    let mut buf = [0u8; 64];
    // Blocking socket: each read returns once the bytes, then the FIN, have arrived.
    let n = loop {
        match tls.read(&mut buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => break other.unwrap(),
        }
    };
    assert_eq!(n, 0);
    assert!(!tls.handshake_done());
}

#[test]
fn preloaded_bytes_after_a_proxy_header_are_processed_first() {
    // As after a PROXY protocol header: the reactor read the header and the start of the
    // ClientHello in one go, and hands the session the rest.
    let hello = client_hello(BOTH, false);
    let acceptor = TlsAcceptor::new(server_config(&pki().server)).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (socket, _) = listener.accept().unwrap();
    socket.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut session = acceptor.session().unwrap();
    let mut socket = socket;
    session.preload(&hello[..10]);
    client.write_all(&hello[10..]).unwrap();
    client.flush().unwrap();
    let mut buf = [0u8; 64];
    // The preloaded bytes go first, then the socket's (a blocking read waits for them).
    while !session.wants_write() {
        match session.read(&mut socket, &mut buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => panic!("{other:?}"),
        }
    }
    assert!(session.flush(&mut socket).unwrap() > 0, "ServerHello sent");

    // A plaintext frame arriving in the preload is caught there too.
    let mut session = acceptor.session().unwrap();
    session.preload(b"\x0bMSH|^~\\&|A\r\x1c\x0d");
    let err = session.read(&mut socket, &mut buf).unwrap_err();
    let failure = TlsFailure::from_io(&err).unwrap();
    assert_eq!(failure.kind(), TlsFailureKind::Plaintext);
}

// ---------------------------------------------------------------------------------------------
// Reload

#[test]
fn reload_swaps_the_certificate_for_new_connections_only() {
    let pki = pki();
    let acceptor = TlsAcceptor::new(server_config(&pki.server)).unwrap();
    let server = TestServer::start(acceptor.clone(), None);
    let config = rustls_client(BOTH, None);

    let mut old = connect(server.addr, Arc::clone(&config));
    assert_ack(&exchange(&mut old, &[ADT]).unwrap()[0], "MSG1");

    acceptor.replace(server_config(&pki.server_b)).unwrap();
    let mut new = connect(server.addr, config);
    assert_ack(&exchange(&mut new, &[ADT]).unwrap()[0], "MSG1");

    let leaf = |c: &RustlsClient| c.conn.peer_certificates().unwrap()[0].to_vec();
    assert_eq!(
        leaf(&old),
        pki.server.der,
        "old session keeps its certificate"
    );
    assert_eq!(leaf(&new), pki.server_b.der, "new session gets the new one");
    // The old session goes on working after the reload.
    assert_ack(&exchange(&mut old, &[ADT]).unwrap()[0], "MSG1");
}

#[test]
fn a_bad_reload_keeps_the_old_configuration() {
    let pki = pki();
    let acceptor = TlsAcceptor::new(server_config(&pki.server)).unwrap();
    let mismatched = TlsConfig::from_pem(pki.server_b.cert.as_str(), pki.server.key.as_str());
    let err = acceptor.replace(mismatched).unwrap_err();
    assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err}");
    assert!(
        acceptor.reload().is_ok(),
        "the old sources are still in force"
    );
    let server = TestServer::start(acceptor, None);
    let mut client = connect(server.addr, rustls_client(BOTH, None));
    assert_ack(&exchange(&mut client, &[ADT]).unwrap()[0], "MSG1");
    assert_eq!(
        client.conn.peer_certificates().unwrap()[0].to_vec(),
        pki.server.der
    );
}

#[test]
fn reload_rereads_the_files() {
    let pki = pki();
    let dir = TempDir::new("reload");
    let (cert, key) = (dir.path("cert.pem"), dir.path("key.pem"));
    std::fs::write(&cert, &pki.server.cert).unwrap();
    std::fs::write(&key, &pki.server.key).unwrap();
    let acceptor = TlsAcceptor::new(TlsConfig::from_files(&cert, &key)).unwrap();
    let before = acceptor.current();

    // Half-replaced files (new certificate, old key): refused, old config kept.
    std::fs::write(&cert, &pki.server_b.cert).unwrap();
    let err = acceptor.reload().unwrap_err();
    assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err}");
    assert!(Arc::ptr_eq(&before, &acceptor.current()));

    std::fs::write(&key, &pki.server_b.key).unwrap();
    acceptor.reload().unwrap();
    assert!(!Arc::ptr_eq(&before, &acceptor.current()));
}

// ---------------------------------------------------------------------------------------------
// Configuration errors: one line each, never a panic

#[test]
fn configuration_errors_are_typed_and_one_line() {
    let pki = pki();
    let load = |config: TlsConfig| TlsAcceptor::new(config).unwrap_err();
    let cases: Vec<(TlsError, &str)> = vec![
        (
            load(TlsConfig::from_pem(
                pki.server.cert.as_str(),
                pki.client.key.as_str(),
            )),
            "does not match",
        ),
        (
            load(server_config(&pki.expired)),
            "expired at 2001-01-01T00:00:00Z",
        ),
        (
            load(server_config(&pki.not_yet_valid)),
            "not valid before 2200-01-01",
        ),
        (
            load(TlsConfig::from_pem(
                pki.server.key.as_str(),
                pki.server.key.as_str(),
            )),
            "holds no CERTIFICATE",
        ),
        (
            load(TlsConfig::from_pem(
                pki.server.cert.as_str(),
                pki.server.cert.as_str(),
            )),
            "no unencrypted private key",
        ),
        (
            load(TlsConfig::from_pem(
                "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
                pki.server.key.as_str(),
            )),
            "not valid PEM",
        ),
        (
            load(server_config(&pki.server).client_ca_pem("no pem here")),
            "holds no CERTIFICATE",
        ),
        (
            load(TlsConfig::from_files(
                "/nonexistent/cert.pem",
                "/nonexistent/key.pem",
            )),
            "cannot read /nonexistent/cert.pem",
        ),
    ];
    for (err, expected) in cases {
        let line = err.to_string();
        assert!(line.contains(expected), "{line:?} lacks {expected:?}");
        assert!(!line.contains('\n'), "{line:?}");
    }
    let err = load(TlsConfig::from_pem(
        pki.server.cert.as_str(),
        pki.client.key.as_str(),
    ));
    assert!(matches!(err, TlsError::KeyMismatch { .. }));
    assert!(matches!(
        load(server_config(&pki.expired)),
        TlsError::Expired { .. }
    ));
}

#[test]
fn client_tls_errors_are_typed() {
    let pki = pki();
    assert!(matches!(
        ClientTls::from_ca_pem("nothing"),
        Err(TlsError::NoCertificate { .. })
    ));
    let tls = ClientTls::from_ca_pem(pki.ca.as_str()).unwrap();
    assert!(matches!(
        tls.clone()
            .client_cert_pem(pki.client.cert.as_str(), pki.server.key.as_str()),
        Err(TlsError::KeyMismatch { .. })
    ));
    assert!(matches!(
        tls.clone()
            .client_cert_pem(pki.expired.cert.as_str(), pki.expired.key.as_str()),
        Err(TlsError::Expired { .. })
    ));
    assert!(matches!(
        tls.server_name("not a name!"),
        Err(TlsError::BadServerName { .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// The library client over TLS

#[test]
fn library_client_over_tls_and_mtls() {
    let pki = pki();
    for (acceptor, identity) in [
        (TlsAcceptor::new(server_config(&pki.server)).unwrap(), false),
        (mtls_acceptor(), true),
    ] {
        let server = TestServer::start(acceptor, None);
        let mut tls = ClientTls::from_ca_pem(pki.ca.as_str()).unwrap();
        if identity {
            tls = tls
                .client_cert_pem(pki.client.cert.as_str(), pki.client.key.as_str())
                .unwrap();
        }
        let config = ClientConfig::default()
            .response_timeout(IO_TIMEOUT)
            .tls(tls);
        let mut client = Client::connect(server.addr, config).unwrap();
        // Several sends on one connection: TLS 1.3 session tickets arrive after the
        // handshake and must not be taken for an unsolicited reply.
        for i in 0..3 {
            let message = format!("MSH|^~\\&|A|B|C|D|20260101||ADT^A01|C{i}|P|2.5.1\r");
            let ack = client.send(message.as_bytes()).unwrap();
            assert_eq!(ack.control_id, format!("C{i}"));
        }
        let messages: Vec<String> = (0..50)
            .map(|i| format!("MSH|^~\\&|A|B|C|D|20260101||ADT^A01|P{i}|P|2.5.1\r"))
            .collect();
        assert_eq!(client.send_pipelined(&messages, 8).unwrap().len(), 50);
        drop(client);
        assert_eq!(server.report().identity.is_some(), identity);
    }
}

#[test]
fn library_client_names_a_bad_server_certificate_at_connect() {
    let pki = pki();
    let server = TestServer::start(TlsAcceptor::new(server_config(&pki.server)).unwrap(), None);
    let tls = ClientTls::from_ca_pem(pki.other_ca.as_str()).unwrap();
    let config = ClientConfig::default().connect_timeout(IO_TIMEOUT).tls(tls);
    let err = Client::connect(server.addr, config).unwrap_err();
    assert!(err.to_string().contains("certificate"), "{err}");
    // And the wrong name:
    let tls = ClientTls::from_ca_pem(pki.ca.as_str())
        .unwrap()
        .server_name("mllp.elsewhere.example")
        .unwrap();
    let config = ClientConfig::default().connect_timeout(IO_TIMEOUT).tls(tls);
    assert!(Client::connect(server.addr, config).is_err());
}

// ---------------------------------------------------------------------------------------------
// openssl s_client

#[test]
fn openssl_s_client_talks_to_the_stream() {
    let pki = pki();
    for (mtls, version) in [(false, "-tls1_3"), (false, "-tls1_2"), (true, "-tls1_3")] {
        let acceptor = if mtls {
            mtls_acceptor()
        } else {
            TlsAcceptor::new(server_config(&pki.server)).unwrap()
        };
        let server = TestServer::start(acceptor, Some(1));
        let mut frame = BytesMut::new();
        encode_frame(ADT, &mut frame);
        let identity = mtls.then_some(&pki.client);
        let Some(output) = s_client(server.addr, identity, &[version], &frame, IO_TIMEOUT) else {
            return;
        };
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            stdout.contains("MSA|AA|MSG1"),
            "{version} mtls={mtls}: stdout {stdout:?}, stderr {:?}",
            String::from_utf8_lossy(&output.stderr)
        );
        let report = server.report();
        assert_eq!(report.frames, 1);
        assert_eq!(report.identity.is_some(), mtls);
        let expected = if version == "-tls1_3" {
            "TLSv1.3"
        } else {
            "TLSv1.2"
        };
        assert_eq!(report.protocol, Some(expected));
    }
}

// ---------------------------------------------------------------------------------------------
// Buffers

#[test]
fn issue_4_buffers_are_counted_while_handshaking_and_released_when_idle() {
    let acceptor = TlsAcceptor::new(server_config(&pki().server)).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let client = std::thread::spawn(move || {
        let mut client = connect(addr, rustls_client(BOTH, None));
        exchange(&mut client, &[ADT]).unwrap();
        client
    });
    let (socket, _) = listener.accept().unwrap();
    socket.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut tls = acceptor.accept(socket).unwrap();
    let mut buf = [0u8; 4096];
    let mut received = BytesMut::new();
    let mut decoder = FrameDecoder::new(1 << 20);
    let mut most_while_handshaking = 0;
    // Blocking socket: read until the frame is in, flushing the handshake as it goes.
    let frame = loop {
        match tls.read(&mut buf) {
            Ok(n) => received.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!("{e}"),
        }
        if !tls.handshake_done() {
            most_while_handshaking = most_while_handshaking.max(tls.buffered());
        }
        if tls.wants_write() {
            tls.flush().unwrap();
        }
        if let Some(frame) = decoder.decode(&mut received).unwrap() {
            break frame;
        }
    };
    assert!(
        most_while_handshaking > INCOMING_CHUNK,
        "the ClientHello handed to rustls counts too ({most_while_handshaking})"
    );
    let mut out = BytesMut::new();
    encode_frame(&ack::accept(&frame), &mut out);
    let n = tls.write_vectored(&[IoSlice::new(&out)]).unwrap();
    assert_eq!(n, out.len());
    assert!(
        tls.buffered() >= INCOMING_CHUNK + out.len(),
        "the queued reply counts"
    );
    assert!(
        tls.flush().unwrap() > n,
        "ciphertext is larger than plaintext"
    );
    assert_eq!(tls.buffered_ciphertext_capacity(), INCOMING_CHUNK);
    tls.release_idle_buffers();
    assert_eq!(tls.buffered_ciphertext_capacity(), 0);
    assert_eq!(tls.buffered(), 0, "nothing is counted once idle");
    let _client = client.join().unwrap();
}

// ---------------------------------------------------------------------------------------------
// Fuzz entry point and corpus

/// The first flight of a rustls client (a ClientHello), as the fuzz corpus records it.
fn client_hello(versions: &[&'static rustls::SupportedProtocolVersion], mtls: bool) -> Vec<u8> {
    let identity = mtls.then(|| &pki().client);
    let config = rustls_client(versions, identity);
    let mut conn =
        ClientConnection::new(config, ServerName::try_from("fuzz.invalid").unwrap()).unwrap();
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    out
}

#[test]
fn fuzz_entry_point_on_hand_picked_inputs() {
    let mut frame = BytesMut::new();
    encode_frame(ADT, &mut frame);
    let mut inputs: Vec<Vec<u8>> = vec![
        vec![],
        vec![0x00],
        [&[0x05][..], &frame].concat(),
        [&[0x3F][..], b"GET / HTTP/1.1\r\n\r\n"].concat(),
        [&[0x00][..], &[0x16, 0x03, 0x01, 0xFF, 0xFF]].concat(),
        fuzz_identity_der(),
    ];
    for control in [0x00, 0x3F, 0x80, 0x81] {
        inputs.push([&[control][..], &client_hello(BOTH, false)].concat());
        inputs.push(
            [
                &[control][..],
                &client_hello(&[&rustls::version::TLS12], false),
            ]
            .concat(),
        );
    }
    for input in &inputs {
        __fuzz_server_bytes(input);
    }
}

fn fuzz_identity_der() -> Vec<u8> {
    let (cert, _) = fuzz::test_identity();
    CertificateDer::from_pem_slice(cert.as_bytes())
        .unwrap()
        .to_vec()
}

#[test]
fn fuzz_identity_certificate_parses() {
    let info = x509::parse(&fuzz_identity_der()).unwrap();
    assert_eq!(info.common_name.as_deref(), Some("fuzz.invalid"));
    assert_eq!(info.sans, vec![SubjectAltName::Dns("fuzz.invalid".into())]);
    assert_eq!(x509::format_time(info.not_after), "2126-11-07T11:28:08Z");
}

#[test]
fn fuzz_corpus_replays() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/corpus/tls");
    let mut count = 0;
    for entry in std::fs::read_dir(dir).expect("fuzz/corpus/tls exists") {
        let path = entry.unwrap().path();
        __fuzz_server_bytes(&std::fs::read(&path).unwrap());
        count += 1;
    }
    let artifacts = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/artifacts/tls");
    if let Ok(entries) = std::fs::read_dir(artifacts) {
        for entry in entries {
            __fuzz_server_bytes(&std::fs::read(entry.unwrap().path()).unwrap());
        }
    }
    assert!(count >= 4, "fuzz/corpus/tls holds only {count} inputs");
}

/// Writes the seed corpus: `cargo test --features tls -- --ignored write_fuzz_seed_corpus`.
#[test]
#[ignore = "writes missing seeds to fuzz/corpus/tls; run by hand when adding one"]
fn write_fuzz_seed_corpus() {
    let dir = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/corpus/tls"));
    std::fs::create_dir_all(dir).unwrap();
    let mut frame = BytesMut::new();
    encode_frame(ADT, &mut frame);
    let seeds: Vec<(&str, Vec<u8>)> = vec![
        (
            "client_hello_tls13",
            [&[0x3F][..], &client_hello(BOTH, false)].concat(),
        ),
        (
            "client_hello_tls12_mtls",
            [&[0xBF][..], &client_hello(&[&rustls::version::TLS12], true)].concat(),
        ),
        (
            "client_hello_chunked",
            [&[0x00][..], &client_hello(BOTH, false)].concat(),
        ),
        (
            "client_hello_preloaded",
            [&[0x41][..], &client_hello(BOTH, false)].concat(),
        ),
        ("plaintext_mllp", [&[0x3F][..], &frame[..]].concat()),
        (
            "truncated_record",
            vec![0x3F, 0x16, 0x03, 0x01, 0x40, 0x00, 0x01],
        ),
        ("certificate_der", fuzz_identity_der()),
    ];
    // Existing seeds are kept (their ClientHellos differ at every run by their random).
    for (name, bytes) in seeds {
        if !dir.join(name).exists() {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Bounds on what a client may make the server hold or compute before it is authenticated
// (issue 18, defects 4 and 5)

/// Accepts one connection on `listener` as a blocking TLS stream and reads until the session
/// fails, checking after every step that its buffers stay within `bound`. Returns the failure.
fn read_until_failure(
    listener: &std::net::TcpListener,
    acceptor: &TlsAcceptor,
    bound: usize,
) -> io::Error {
    let (socket, _) = listener.accept().unwrap();
    socket.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let (mut session, mut socket) = acceptor.accept(socket).unwrap().into_parts();
    let mut buf = [0u8; 4096];
    loop {
        let result = session.read(&mut socket, &mut buf);
        assert!(
            session.buffered() <= bound,
            "holds {} > {bound}",
            session.buffered()
        );
        if session.wants_write() {
            let _ = session.flush(&mut socket);
        }
        match result {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return e,
            Ok(n) => {
                panic!("{n} bytes of plaintext from a client that never finished its handshake")
            }
        }
    }
}

#[test]
fn issue_4_a_handshake_over_the_cap_is_refused_before_rustls_buffers_it() {
    let acceptor = TlsAcceptor::new(server_config(&pki().server)).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    // A ClientHello that claims 65 535 bytes, sent as 48 KiB of 1 KiB records: rustls would
    // reassemble up to 64 KiB of it and wait for the rest.
    let mut hello = vec![0x16, 0x03, 0x01, 0x00, 0x04, 0x01, 0x00, 0xFF, 0xFF];
    for _ in 0..48 {
        hello.extend_from_slice(&[0x16, 0x03, 0x01, 0x04, 0x00]);
        hello.extend_from_slice(&[0x42; 1024]);
    }
    client.write_all(&hello).unwrap();
    let error = read_until_failure(&listener, &acceptor, INCOMING_CHUNK + MAX_HANDSHAKE_BYTES);
    let failure = TlsFailure::from_io(&error).expect("a TLS failure");
    assert_eq!(failure.kind(), TlsFailureKind::Handshake);
    assert!(
        failure.to_string().contains("more than 32768 bytes"),
        "{failure}"
    );
}

/// A client chain: `leaf`, then `extra` self-signed certificates named like the test CA (with
/// keys of their own), and the leaf's key.
fn chain_named_like_the_ca(leaf: &Leaf, extra: usize) -> (Vec<CertificateDer<'static>>, String) {
    let mut chain = vec![CertificateDer::from(leaf.der.clone())];
    for _ in 0..extra {
        let fake = support::ca("Test CA");
        chain.push(fake.der().clone());
    }
    (chain, leaf.key.clone())
}

fn client_with_chain(chain: Vec<CertificateDer<'static>>, key: &str) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pki().ca.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(BOTH)
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .unwrap(),
    )
}

#[test]
fn issue_5_a_client_chain_over_the_cap_is_refused_before_verification() {
    // A leaf from a CA that is named like ours but is not ours, and five more like it: the
    // verifier would try each as the leaf's issuer.
    let impostor = support::ca("Test CA");
    let leaf = support::sign(support::params("intruder", vec![], true), &impostor);
    let (chain, key) = chain_named_like_the_ca(&leaf, MAX_CLIENT_CHAIN_CERTS);
    let acceptor = mtls_acceptor();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let client = std::thread::spawn(move || {
        let mut client = connect(addr, client_with_chain(chain, &key));
        exchange(&mut client, &[ADT]).is_err()
    });
    let error = read_until_failure(&listener, &acceptor, usize::MAX);
    let failure = TlsFailure::from_io(&error).expect("a TLS failure");
    assert_eq!(failure.kind(), TlsFailureKind::BadClientCert);
    let text = format!("{failure} {failure:?}");
    assert!(text.contains("ChainTooLarge"), "{text}");
    assert!(client.join().unwrap(), "the client is refused");
}

#[test]
fn issue_5_a_valid_chain_at_the_cap_still_verifies() {
    let (chain, key) = chain_named_like_the_ca(&pki().client, MAX_CLIENT_CHAIN_CERTS - 1);
    let server = TestServer::start(mtls_acceptor(), None);
    let mut client = connect(server.addr, client_with_chain(chain, &key));
    let replies = exchange(&mut client, &[ADT]).unwrap();
    assert_ack(&replies[0], "MSG1");
    drop(client);
    let report = server.report();
    assert!(report.handshake_done);
    assert_eq!(
        report.identity.and_then(|i| i.common_name).as_deref(),
        Some("lab-gw")
    );
}
