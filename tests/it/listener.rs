//! The listener and the basic request/reply cycle: listener and connection
//! checks, the handler's context, connection limits, IPv6 and graceful shutdown.

use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use mllp_reactor::ack::AckCode;
use mllp_reactor::{CloseReason, ConnectionId, Reply, handler_fn};

use crate::util::{
    self, Event, GRACE, Peer, WAIT, accept, accept_first_gated, ack_msg, assert_ack, echo, gate,
    start, start_observed, start_with, stop,
};

#[test]
fn echo_reply_is_byte_exact() {
    let server = start(echo());
    let mut peer = Peer::connect(server.local_addr());
    // A message of several segments, then every byte value: 0B inside a frame is payload, and
    // so is 1C when no 0D follows it.
    let mut payload = ack_msg("ECHO1");
    payload.extend(0u8..=255);
    assert_eq!(peer.roundtrip(&payload), payload);
    stop(server);
}

#[test]
fn three_sequential_messages_on_one_connection() {
    let server = start(accept());
    let mut peer = Peer::connect(server.local_addr());
    for id in ["SEQ1", "SEQ2", "SEQ3"] {
        assert_ack(&peer.roundtrip(&ack_msg(id)), AckCode::AA, id);
    }
    stop(server);
}

#[test]
fn handler_gets_the_unframed_payload() {
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    let tx = Mutex::new(tx);
    let server = start(handler_fn(move |msg, _cx| {
        tx.lock().unwrap().send(msg.to_vec()).unwrap();
        Ok(Reply::NoReply)
    }));
    let mut peer = Peer::connect(server.local_addr());
    let payload = ack_msg("UNFRAMED");
    peer.send_frame(&payload);
    assert_eq!(rx.recv_timeout(WAIT).expect("the handler ran"), payload);
    stop(server);
}

#[test]
fn raw_reply_is_exactly_one_frame() {
    let server = start(handler_fn(|_, _| {
        Ok(Reply::Send("MSH|^~\\&|R\rMSA|AA|1\r".into()))
    }));
    let mut peer = Peer::connect(server.local_addr());
    peer.send_frame(&ack_msg("RAW"));
    let expected = b"\x0bMSH|^~\\&|R\rMSA|AA|1\r\x1c\x0d";
    let mut got = vec![0; expected.len()];
    std::io::Read::read_exact(&mut peer.stream, &mut got).expect("the reply");
    assert_eq!(got, expected);
    // Nothing follows the reply: the server closes on our EOF without another byte.
    peer.shutdown_write();
    peer.expect_closed();
    stop(server);
}

#[test]
fn after_shutdown_new_connections_are_refused() {
    let server = start(accept());
    let addr = server.local_addr();
    let mut peer = Peer::connect(addr);
    assert_ack(&peer.roundtrip(&ack_msg("BEFORE")), AckCode::AA, "BEFORE");
    let report = stop(server);
    assert_eq!(report.closed, 1);
    assert_eq!(report.forced, 0);
    // The idle connection was closed by the shutdown.
    peer.expect_closed();
    let err = TcpStream::connect(addr).expect_err("the listener is closed");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
}

#[test]
fn five_concurrent_clients() {
    const CLIENTS: usize = 5;
    // Every handler call waits (at most WAIT) until all five messages are in: served in
    // parallel, the five get AAs; served one after the other, the first would give up and
    // return an error (an AE NAK).
    let arrived = Arc::new((Mutex::new(0usize), Condvar::new()));
    let server = start_with(
        handler_fn(move |msg, _| {
            let (count, all_in) = &*arrived;
            let mut count = count.lock().unwrap();
            *count += 1;
            all_in.notify_all();
            let (count, _) = all_in
                .wait_timeout_while(count, WAIT, |n| *n < CLIENTS)
                .unwrap();
            if *count < CLIENTS {
                return Err(
                    format!("only {} of {CLIENTS} messages arrived together", *count).into(),
                );
            }
            Ok(Reply::Send(mllp_reactor::ack::accept(msg)))
        }),
        |b| b.workers(CLIENTS),
    );
    let addr = server.local_addr();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            util::spawn(move || {
                let mut peer = Peer::connect(addr);
                let id = format!("C{i}");
                assert_ack(&peer.roundtrip(&ack_msg(&id)), AckCode::AA, &id);
            })
        })
        .collect();
    for client in clients {
        client.join().expect("client passed");
    }
    stop(server);
}

#[test]
fn context_reaches_the_handler() {
    type Seen = (SocketAddr, SocketAddr, ConnectionId, u64);
    let (tx, rx) = mpsc::channel::<Seen>();
    let tx = Mutex::new(tx);
    let server = start(handler_fn(move |msg, cx| {
        tx.lock()
            .unwrap()
            .send((
                cx.peer_addr(),
                cx.local_addr(),
                cx.connection_id(),
                cx.sequence(),
            ))
            .unwrap();
        Ok(Reply::Send(mllp_reactor::ack::accept(msg)))
    }));
    let mut first = Peer::connect(server.local_addr());
    let mut ids = Vec::new();
    for (seq, id) in ["CX0", "CX1", "CX2"].into_iter().enumerate() {
        assert_ack(&first.roundtrip(&ack_msg(id)), AckCode::AA, id);
        let (peer, local, conn, sequence) = rx.recv_timeout(WAIT).expect("context");
        assert_eq!(peer, first.local_addr());
        assert_eq!(local, server.local_addr());
        assert_eq!(sequence, seq as u64);
        ids.push(conn);
    }
    assert!(
        ids.iter().all(|&id| id == ids[0]),
        "one id per connection: {ids:?}"
    );
    // Another connection: another id, and its own sequence from 0.
    let mut second = Peer::connect(server.local_addr());
    assert_ack(&second.roundtrip(&ack_msg("CY0")), AckCode::AA, "CY0");
    let (peer, _, conn, sequence) = rx.recv_timeout(WAIT).expect("context");
    assert_eq!(peer, second.local_addr());
    assert_ne!(conn, ids[0]);
    assert_ne!(conn.as_u64(), ids[0].as_u64());
    assert_eq!(sequence, 0);
    stop(server);
}

#[test]
fn connection_ids_are_unique_when_slots_are_reused() {
    let (server, mut events) = start_observed(accept(), |b| b);
    let mut ids = std::collections::HashSet::new();
    for i in 0..20 {
        let mut peer = Peer::connect(server.local_addr());
        let id = format!("R{i}");
        assert_ack(&peer.roundtrip(&ack_msg(&id)), AckCode::AA, &id);
        let me = peer.local_addr();
        drop(peer);
        events.expect_close(me, CloseReason::PeerClosed);
        let Event::ConnStart { id, .. } = events.wait("start", |e| {
            matches!(e, Event::ConnStart { .. }) && e.peer() == me
        }) else {
            unreachable!()
        };
        assert!(ids.insert(id), "connection id {id} reused");
    }
    stop(server);
}

#[test]
fn max_connections_rejects_the_excess() {
    let (server, mut events) = start_observed(accept(), |b| b.max_connections(2));
    let addr = server.local_addr();
    let mut a = Peer::connect(addr);
    let mut b = Peer::connect(addr);
    // Both are admitted once they are answered.
    assert_ack(&a.roundtrip(&ack_msg("A")), AckCode::AA, "A");
    assert_ack(&b.roundtrip(&ack_msg("B")), AckCode::AA, "B");
    let mut c = Peer::connect(addr);
    events.expect_close(c.local_addr(), CloseReason::Rejected);
    c.expect_closed();
    // The admitted ones are unaffected.
    assert_ack(&a.roundtrip(&ack_msg("A2")), AckCode::AA, "A2");
    // A slot that frees up is available again.
    let a_addr = a.local_addr();
    drop(a);
    events.expect_close(a_addr, CloseReason::PeerClosed);
    let mut d = Peer::connect(addr);
    assert_ack(&d.roundtrip(&ack_msg("D")), AckCode::AA, "D");
    assert_ack(&b.roundtrip(&ack_msg("B2")), AckCode::AA, "B2");
    stop(server);
}

#[test]
fn graceful_shutdown_delivers_the_in_flight_reply() {
    let (gate, control) = gate();
    let (server, mut events) = start_observed(accept_first_gated(gate), |b| b);
    let addr = server.local_addr();
    let mut busy = Peer::connect(addr);
    let mut idle = Peer::connect(addr);
    busy.send_frame(&ack_msg("INFLIGHT"));
    control.wait_entered();
    let idle_addr = idle.local_addr();
    events.wait("idle connection start", |e| {
        matches!(e, Event::ConnStart { .. }) && e.peer() == idle_addr
    });

    let stopper = util::spawn(move || server.shutdown(GRACE));
    // The drain has begun once the idle connection is closed by it.
    events.expect_close(idle_addr, CloseReason::Shutdown);
    idle.expect_closed();
    assert!(
        TcpStream::connect(addr).is_err(),
        "no new connections while draining"
    );

    control.release();
    assert_ack(&busy.read_frame(), AckCode::AA, "INFLIGHT");
    busy.expect_closed();
    let report = stopper.join().unwrap().expect("server shut down cleanly");
    assert_eq!(report.in_flight, 1);
    assert_eq!(report.closed, 2);
    assert_eq!(report.forced, 0);
    assert_eq!(report.workers_stuck, 0);
    events.expect_close(busy.local_addr(), CloseReason::Shutdown);
}

#[test]
fn shutdown_forces_a_stuck_handler_after_the_grace_period() {
    let (gate, control) = gate();
    let server = start(accept_first_gated(gate));
    let mut peer = Peer::connect(server.local_addr());
    peer.send_frame(&ack_msg("STUCK"));
    control.wait_entered();
    let report = server
        .shutdown(Duration::from_millis(300))
        .expect("server stopped");
    assert_eq!(report.in_flight, 1);
    assert_eq!(report.forced, 1);
    assert_eq!(report.workers_stuck, 1);
    // Closed without an answer: nothing was ACKed that the handler did not accept.
    peer.expect_closed();
    control.release();
}

#[test]
fn ipv6_loopback() {
    let server = match mllp_reactor::Server::builder(accept()).bind("[::1]:0") {
        Ok(server) => server.spawn().expect("spawn"),
        Err(e) => {
            eprintln!("skipped: cannot bind [::1]: {e}");
            return;
        }
    };
    let addr = server.local_addr();
    assert!(addr.is_ipv6());
    let mut peer = Peer::connect(addr);
    assert_ack(&peer.roundtrip(&ack_msg("V6")), AckCode::AA, "V6");
    stop(server);
}
