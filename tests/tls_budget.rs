//! TLS handshakes under the memory bound (issue 18, defect 4), measured as this process's peak
//! RSS. A test binary of its own, like `tests/budget.rs`: peak RSS is per process.
//!
//! 3 000 connections each send 64 KiB of a fragmented ClientHello that never completes.
//! Before the bounds each held about 66 KiB until the handshake deadline (about 200 MiB here).
//! Now at most `max_handshakes` (256) are read at once, the others wait unread (their bytes in
//! the kernel), and each is refused once it passes `MAX_HANDSHAKE_BYTES` (32 KiB). The peak
//! may grow by at most [`BOUND`]; an honest TLS client is then served.
#![cfg(feature = "tls")]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use mllp_reactor::tls::__plumbing::INCOMING_CHUNK;
use mllp_reactor::tls::{ClientTls, MAX_HANDSHAKE_BYTES, TlsAcceptor, TlsConfig};
use mllp_reactor::{Client, ClientConfig, Dispatch, Reply, Server, ack, handler_fn};

use mllp_test_support::memory::kib;

const CONNECTIONS: usize = 3000;
const SENT: usize = 64 * 1024;
const MAX_HANDSHAKES: usize = 256;
/// The documented bound on handshake memory: per handshake in progress, our read buffer, what
/// rustls may hold of the handshake (its buffer doubles, so up to twice the cap) and 16 KiB of
/// rustls' own state; plus 24 MiB for the test's threads, allocator slack and the honest
/// client. About 60 MiB; before the bounds the same load grew the peak by about 200 MiB.
const BOUND: usize =
    MAX_HANDSHAKES * (INCOMING_CHUNK + 2 * MAX_HANDSHAKE_BYTES + (16 << 10)) + (24 << 20);

/// A ClientHello that claims 65 535 bytes, in 1 KiB records, `SENT` bytes in all.
fn fragmented_client_hello() -> Vec<u8> {
    let mut hello = vec![0x16, 0x03, 0x01, 0x00, 0x04, 0x01, 0x00, 0xFF, 0xFF];
    while hello.len() + 1029 <= SENT {
        hello.extend_from_slice(&[0x16, 0x03, 0x01, 0x04, 0x00]);
        hello.extend_from_slice(&[0x42; 1024]);
    }
    hello
}

#[test]
fn issue_4_three_thousand_stalled_handshakes_stay_within_the_bound() {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("rcgen");
    let (cert_pem, key_pem) = (cert.cert.pem(), cert.signing_key.serialize_pem());
    let acceptor =
        TlsAcceptor::new(TlsConfig::from_pem(cert_pem.as_str(), key_pem.as_str())).expect("tls");
    let server = Server::builder(handler_fn(|msg, _| Ok(Reply::Send(ack::accept(msg)))))
        .dispatch(Dispatch::Inline)
        .tls(acceptor)
        .max_handshakes(MAX_HANDSHAKES)
        .handshake_timeout(Duration::from_secs(10))
        .bind("127.0.0.1:0")
        .expect("bind")
        .spawn()
        .expect("spawn");
    let addr = server.local_addr();
    let hello = fragmented_client_hello();
    let before = kib("VmRSS:");
    let started = std::time::Instant::now();

    let mut streams = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
        // 64 KiB fits in the kernel's buffers even while the server does not read.
        s.write_all(&hello).expect("send the fragments");
        streams.push(s);
    }
    // Each is refused once past the cap: the server closes it (an alert, then EOF or reset).
    for mut s in streams {
        let mut sink = [0u8; 256];
        loop {
            match s.read(&mut sink) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }
    let peak = kib("VmHWM:");
    println!("refused all in {:?}", started.elapsed());

    let tls = ClientTls::from_ca_pem(cert_pem.as_str())
        .and_then(|t| t.server_name("localhost"))
        .expect("client tls");
    let config = ClientConfig::default()
        .connect_timeout(Duration::from_secs(20))
        .response_timeout(Duration::from_secs(20))
        .tls(tls);
    let mut client = Client::connect(addr, config).expect("an honest client connects");
    let reply = client
        .send(b"MSH|^~\\&|A|B|C|D|20260101||ADT^A01|HONEST|P|2.5.1\r")
        .expect("and is answered");
    assert_eq!(reply.code, ack::AckCode::AA);
    drop(client);
    server.shutdown(Duration::from_secs(5)).expect("shutdown");

    let grown = peak.saturating_sub(before);
    assert!(
        grown <= BOUND,
        "peak RSS grew {} MiB, more than the bound ({} MiB)",
        grown >> 20,
        BOUND >> 20
    );
    println!(
        "peak RSS grew {} MiB (bound {} MiB)",
        grown >> 20,
        BOUND >> 20
    );
}
