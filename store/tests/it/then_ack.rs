//! `StoreThenAck` in a real server: the code it reports is the code sent, a message is
//! acknowledged only once stored, and a store that refuses fails the message through the
//! server's NAK policy.

use std::io::{Read, Write};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use mllp_reactor::ack::{self, AckCode};
use mllp_reactor::{Client, ClientConfig, Dispatch, NakPolicy, Server};
use mllp_store::{SqliteOptions, Store, StoreConfig, StoreThenAck};

use crate::util::{TempDir, WAIT, message, read_all};

#[test]
fn the_reported_code_is_the_code_sent_and_every_acked_message_is_stored() {
    let dir = TempDir::new("then-ack");
    let path = dir.join("s.db");
    let store = Arc::new(
        Store::open_sqlite(&path, &SqliteOptions::default(), StoreConfig::default()).unwrap(),
    );
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let handler = StoreThenAck::new(Arc::clone(&store)).on_ack(move |acked| {
        let _ = tx
            .lock()
            .unwrap()
            .send((acked.code, acked.outcome.id, acked.sequence));
    });
    let server = Server::builder(handler)
        .dispatch(Dispatch::Inline)
        .bind("127.0.0.1:0")
        .unwrap()
        .spawn()
        .unwrap();
    let mut client = Client::connect(server.local_addr(), ClientConfig::default()).unwrap();
    let first = client.send(&message("42")).unwrap();
    assert_eq!(first.code, AckCode::AA);
    assert_eq!(rx.recv_timeout(WAIT).unwrap(), (AckCode::AA, 1, 0));
    // No MSH-10: stored all the same, answered AR (the sender cannot be told which message),
    // and the hook says so without anyone reading the reply's bytes.
    let mut raw = std::net::TcpStream::connect(server.local_addr()).unwrap();
    raw.set_read_timeout(Some(WAIT)).unwrap();
    raw.write_all(&[b"\x0b", &message("")[..], b"\x1c\r"].concat())
        .unwrap();
    let mut reply = Vec::new();
    while !reply.ends_with(b"\x1c\r") {
        let mut buf = [0u8; 1024];
        let n = raw.read(&mut buf).unwrap();
        assert!(n > 0, "closed before the reply");
        reply.extend_from_slice(&buf[..n]);
    }
    let parsed = ack::parse(&reply[1..reply.len() - 2]).unwrap();
    assert_eq!(parsed.code, AckCode::AR);
    assert_eq!(rx.recv_timeout(WAIT).unwrap(), (AckCode::AR, 2, 0));

    // A closed store takes nothing: the message fails, and the server answers AE with its
    // generic text.
    store.close(WAIT).unwrap();
    let refused = client.send(&message("43")).unwrap();
    assert_eq!(refused.code, AckCode::AE);
    assert_eq!(refused.text.as_deref(), Some("application error"));
    server.shutdown(WAIT).unwrap();
    assert_eq!(read_all(&path).len(), 2);
}

/// Under `NakPolicy::Silent` a failed store sends nothing: the server's policy decides, not
/// the store handler.
#[test]
fn a_failed_store_follows_the_servers_nak_policy() {
    let dir = TempDir::new("then-ack-silent");
    let store = Arc::new(
        Store::open_sqlite(
            dir.join("s.db"),
            &SqliteOptions::default(),
            StoreConfig::default(),
        )
        .unwrap(),
    );
    store.close(WAIT).unwrap();
    let server = Server::builder(StoreThenAck::new(Arc::clone(&store)))
        .dispatch(Dispatch::Inline)
        .nak_policy(NakPolicy::Silent)
        .bind("127.0.0.1:0")
        .unwrap()
        .spawn()
        .unwrap();
    let config = ClientConfig::default().response_timeout(std::time::Duration::from_millis(300));
    let mut client = Client::connect(server.local_addr(), config).unwrap();
    assert!(client.send(&message("1")).is_err(), "no NAK under Silent");
    server.shutdown(WAIT).unwrap();
}
