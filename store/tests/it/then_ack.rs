//! `StoreThenAck` in a real server: the code it reports is the code sent, a message is
//! acknowledged only once stored, and a store that refuses fails the message through the
//! server's NAK policy.

use std::io::{Read, Write};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use mllp_reactor::ack::{self, AckCode};
use mllp_reactor::{Client, ClientConfig, Dispatch, NakPolicy, Server};
use mllp_store::{AckPolicy as _, SqliteOptions, Store, StoreConfig, StoreThenAck};

use crate::util::{TempDir, WAIT, message, read_all};

/// A store in `dir/s.db` with the default options.
fn sqlite_store(dir: &TempDir) -> Arc<Store> {
    Arc::new(
        Store::open_sqlite(
            dir.join("s.db"),
            &SqliteOptions::default(),
            StoreConfig::default(),
        )
        .unwrap(),
    )
}

/// `handler` served inline on a loopback port, and a client connected to it.
fn serve_inline(handler: impl mllp_reactor::Handler) -> (mllp_reactor::ServerHandle, Client) {
    let server = Server::builder(handler)
        .dispatch(Dispatch::Inline)
        .bind("127.0.0.1:0")
        .unwrap()
        .spawn()
        .unwrap();
    let client = Client::connect(server.local_addr(), ClientConfig::default()).unwrap();
    (server, client)
}

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
    let (server, mut client) = serve_inline(handler);
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
    let store = sqlite_store(&dir);
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

/// A policy that looks at the outcome (the default `ack_before_commit`, `None`) gets it
/// after the commit: here a resend is answered AE, which only the commit can tell. The
/// default policy builds its AA before the commit (`AcceptStored::ack_before_commit`).
#[test]
fn a_policy_that_reads_the_outcome_answers_after_the_commit() {
    struct NoResends;
    impl mllp_store::AckPolicy for NoResends {
        fn ack(
            &self,
            message: &[u8],
            outcome: &mllp_store::StoreOutcome,
        ) -> (AckCode, mllp_reactor::Bytes) {
            let code = if outcome.duplicate_of.is_some() {
                AckCode::AE
            } else {
                AckCode::AA
            };
            mllp_reactor::ack::Ack::new(code).build_coded(message)
        }
    }
    assert!(
        mllp_store::AcceptStored
            .ack_before_commit(&message("1"))
            .is_some()
    );
    assert!(NoResends.ack_before_commit(&message("1")).is_none());

    let dir = TempDir::new("then-ack-outcome");
    let store = sqlite_store(&dir);
    let (server, mut client) =
        serve_inline(StoreThenAck::with_policy(Arc::clone(&store), NoResends));
    assert_eq!(client.send(&message("7")).unwrap().code, AckCode::AA);
    assert_eq!(client.send(&message("7")).unwrap().code, AckCode::AE);
    server.shutdown(WAIT).unwrap();
}
