//! The listener and the basic request/reply cycle: listener and connection
//! checks, the handler's context, connection limits, IPv6 and graceful shutdown.

use std::collections::HashSet;
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use mllp_reactor::ack::AckCode;
use mllp_reactor::{CloseReason, ConnectionId, Reply, Server, handler_fn};

use crate::support::{
    self, Event, Expected, GRACE, Peer, Stopped, WAIT, accept_first_gated, accepting, assert_ack,
    echo, gate, kinds, message, start, start_at,
};

#[test]
fn echo_reply_is_byte_exact() {
    let server = start(Server::builder(echo()));
    let mut peer = server.connect();
    // A message of several segments, then every byte value: 0B inside a frame is payload, and
    // so is 1C when no 0D follows it.
    let mut payload = message("ECHO1");
    payload.extend(0u8..=255);
    assert_eq!(peer.roundtrip(&payload), payload);
    server.stop();
}

#[test]
fn three_sequential_messages_on_one_connection() {
    let server = start(Server::builder(accepting()));
    let mut peer = server.connect();
    for id in ["SEQ1", "SEQ2", "SEQ3"] {
        assert_ack(&peer.roundtrip(&message(id)), AckCode::AA, id);
    }
    server.stop();
}

#[test]
fn handler_gets_the_unframed_payload() {
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    let tx = Mutex::new(tx);
    let server = start(Server::builder(handler_fn(move |msg, _cx| {
        tx.lock().unwrap().send(msg.to_vec()).unwrap();
        Ok(Reply::NoReply)
    })));
    let mut peer = server.connect();
    let payload = message("UNFRAMED");
    peer.send_frame(&payload);
    assert_eq!(rx.recv_timeout(WAIT).expect("the handler ran"), payload);
    server.stop();
}

#[test]
fn raw_reply_is_exactly_one_frame() {
    let server = start(Server::builder(handler_fn(|_, _| {
        Ok(Reply::Send("MSH|^~\\&|R\rMSA|AA|1\r".into()))
    })));
    let mut peer = server.connect();
    peer.send_frame(&message("RAW"));
    let expected = b"\x0bMSH|^~\\&|R\rMSA|AA|1\r\x1c\x0d";
    let mut got = vec![0; expected.len()];
    std::io::Read::read_exact(&mut peer.stream, &mut got).expect("the reply");
    assert_eq!(got, expected);
    // Nothing follows the reply: the server closes on our EOF without another byte.
    peer.shutdown_write();
    peer.expect_closed();
    server.stop();
}

#[test]
fn one_message_round_trip_gives_four_events_and_moves_each_metric_once() {
    let server = start(Server::builder(accepting()));
    let addr = server.addr;
    let payload = message("M1");
    let mut client = server.connect();
    let client_addr = client.local_addr();
    let reply = client.roundtrip(&payload);
    assert_ack(&reply, AckCode::AA, "M1");
    client.finish();
    let Stopped {
        report,
        metrics,
        mut events,
    } = server.stop();
    assert_eq!(
        report.closed, 0,
        "the connection closed before the shutdown"
    );

    let id = events.started(client_addr, addr).connection;
    let msg = events.message_start();
    assert_eq!(msg.connection, id);
    assert_eq!((msg.peer, msg.local), (client_addr, addr));
    assert_eq!(msg.sequence, 0);
    assert_eq!(msg.message_size, payload.len(), "message size is unframed");
    support::assert_recent(msg.system_time);
    let done = events.message_stop();
    assert_eq!(done.connection, id);
    assert_eq!((done.peer, done.local), (client_addr, addr));
    assert_eq!(done.sequence, 0);
    assert_eq!(
        done.response_size,
        Some(reply.len()),
        "response size is unframed"
    );
    let stop = events.connection_stop();
    assert_eq!(stop.connection, id);
    assert_eq!((stop.peer, stop.local), (client_addr, addr));
    assert_eq!(stop.reason, CloseReason::PeerClosed);
    assert!(stop.duration >= done.duration);
    events.assert_drained();

    metrics.assert_exactly(
        &Expected::new()
            .accepted(1)
            .replied(&payload, &reply)
            .closed(CloseReason::PeerClosed, 1),
    );
}

#[test]
fn shutdown_closes_an_idle_connection_and_refuses_new_ones() {
    let server = start(Server::builder(accepting()));
    let addr = server.addr;
    let mut client = server.connect();
    let payload = message("BEFORE");
    let reply = client.roundtrip(&payload);
    assert_ack(&reply, AckCode::AA, "BEFORE");
    let Stopped {
        report,
        metrics,
        mut events,
    } = server.stop();
    assert_eq!((report.closed, report.forced, report.in_flight), (1, 0, 0));
    // The idle connection was closed by the shutdown, cleanly.
    assert!(client.read_to_eof().is_empty());
    let err = TcpStream::connect(addr).expect_err("the listener is closed");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);

    let id = events.started(client.local_addr(), addr).connection;
    events.answered(id, 0, payload.len(), Some(reply.len()));
    events.stopped(id, CloseReason::Shutdown);
    events.assert_drained();
    metrics.assert_exactly(
        &Expected::new()
            .accepted(1)
            .replied(&payload, &reply)
            .closed(CloseReason::Shutdown, 1),
    );
}

#[test]
fn five_concurrent_clients() {
    const CLIENTS: usize = 5;
    // Every handler call waits (at most WAIT) until all five messages are in: served in
    // parallel, the five get AAs; served one after the other, the first would give up and
    // return an error (an AE NAK).
    let arrived = Arc::new((Mutex::new(0usize), Condvar::new()));
    let server = start(
        Server::builder(handler_fn(move |msg, _| {
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
        }))
        .workers(CLIENTS),
    );
    let addr = server.addr;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            support::spawn(move || {
                let mut peer = Peer::connect(addr);
                let id = format!("C{i}");
                assert_ack(&peer.roundtrip(&message(&id)), AckCode::AA, &id);
            })
        })
        .collect();
    for client in clients {
        client.join().expect("client passed");
    }
    server.stop();
}

#[test]
fn context_reaches_the_handler() {
    type Seen = (SocketAddr, SocketAddr, ConnectionId, u64);
    let (tx, rx) = mpsc::channel::<Seen>();
    let tx = Mutex::new(tx);
    let server = start(Server::builder(handler_fn(move |msg, cx| {
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
    })));
    let mut first = server.connect();
    let mut ids = Vec::new();
    for (seq, id) in ["CX0", "CX1", "CX2"].into_iter().enumerate() {
        assert_ack(&first.roundtrip(&message(id)), AckCode::AA, id);
        let (peer, local, conn, sequence) = rx.recv_timeout(WAIT).expect("context");
        assert_eq!(peer, first.local_addr());
        assert_eq!(local, server.addr);
        assert_eq!(sequence, seq as u64);
        ids.push(conn);
    }
    assert!(
        ids.iter().all(|&id| id == ids[0]),
        "one id per connection: {ids:?}"
    );
    // Another connection: another id, and its own sequence from 0.
    let mut second = server.connect();
    assert_ack(&second.roundtrip(&message("CY0")), AckCode::AA, "CY0");
    let (peer, _, conn, sequence) = rx.recv_timeout(WAIT).expect("context");
    assert_eq!(peer, second.local_addr());
    assert_ne!(conn, ids[0]);
    assert_ne!(conn.as_u64(), ids[0].as_u64());
    assert_eq!(sequence, 0);
    server.stop();
}

#[test]
fn connection_ids_are_unique_when_slots_are_reused() {
    let mut server = start(Server::builder(accepting()));
    let mut ids = HashSet::new();
    let mut numbers = HashSet::new();
    for i in 0..20 {
        let mut client = server.connect();
        let id = format!("R{i}");
        let payload = message(&id);
        let reply = client.roundtrip(&payload);
        assert_ack(&reply, AckCode::AA, &id);
        let me = client.local_addr();
        client.finish();
        let start = server.events.started(me, server.addr);
        let events = &mut server.events;
        events.answered(start.connection, 0, payload.len(), Some(reply.len()));
        events.stopped(start.connection, CloseReason::PeerClosed);
        assert!(
            ids.insert(start.connection),
            "connection id {start:?} reused"
        );
        assert!(
            numbers.insert(start.connection.as_u64()),
            "as_u64 of {start:?} reused"
        );
    }
    server.stop().events.assert_drained();
}

#[test]
fn max_connections_rejects_the_excess() {
    let mut server = start(Server::builder(accepting()).max_connections(2));
    let addr = server.addr;
    let mut expected = Expected::new();
    let mut exchange = |peer: &mut Peer, id: &str| {
        let payload = message(id);
        let reply = peer.roundtrip(&payload);
        assert_ack(&reply, AckCode::AA, id);
        expected = std::mem::take(&mut expected).replied(&payload, &reply);
    };
    let mut a = server.connect();
    let mut b = server.connect();
    // Both are admitted once they are answered.
    exchange(&mut a, "A");
    exchange(&mut b, "B");
    let mut c = server.connect();
    let c_addr = c.local_addr();
    assert!(
        c.read_to_eof().is_empty(),
        "a rejected connection is closed at once"
    );
    server.events.expect_close(c_addr, CloseReason::Rejected);
    // The admitted ones are unaffected.
    exchange(&mut a, "A2");
    // A slot that frees up is available again.
    let a_addr = a.local_addr();
    a.finish();
    server.events.expect_close(a_addr, CloseReason::PeerClosed);
    let mut d = server.connect();
    exchange(&mut d, "D");
    exchange(&mut b, "B2");
    let (b_addr, d_addr) = (b.local_addr(), d.local_addr());
    b.finish();
    d.finish();
    let Stopped {
        report,
        metrics,
        mut events,
    } = server.stop();
    assert_eq!(report.closed, 0);

    // The rejected connection: a start and a `Rejected` stop, nothing else, no lifetime.
    let rejected = events.of(c_addr);
    let [Event::ConnectionStart(start), Event::ConnectionStop(stop)] = rejected.as_slice() else {
        panic!("events of the rejected connection: {rejected:#?}")
    };
    assert_eq!((start.peer, start.local), (c_addr, addr));
    assert_eq!(stop.connection, start.connection);
    assert_eq!((stop.peer, stop.local), (c_addr, addr));
    assert_eq!(stop.reason, CloseReason::Rejected);
    assert_eq!(stop.duration, Duration::ZERO);
    let mut ids = HashSet::from([start.connection]);
    let exchange_events = |n| {
        let mut want = vec!["connection_start"];
        for _ in 0..n {
            want.extend(["message_start", "message_stop"]);
        }
        want.push("connection_stop");
        want
    };
    for (peer, messages) in [(a_addr, 2), (b_addr, 2), (d_addr, 1)] {
        let events = events.of(peer);
        assert_eq!(kinds(&events), exchange_events(messages), "{events:#?}");
        let Some(Event::ConnectionStop(stop)) = events.last() else {
            unreachable!("checked above")
        };
        assert_eq!(stop.reason, CloseReason::PeerClosed);
        assert!(ids.insert(stop.connection), "{:?} reused", stop.connection);
    }
    assert_eq!(events.count(|_| true), 2 + 4 + 6 + 6);

    // A rejected connection is counted only in `connections_rejected_total`: never accepted,
    // never active, so `closed_total{reason="rejected"}` stays 0 and
    // accepted = Σ closed + active holds.
    metrics.assert_exactly(
        &expected
            .accepted(3)
            .counter(
                mllp_reactor::telemetry::names::CONNECTIONS_REJECTED,
                &[("reason", "max_connections")],
                1,
            )
            .closed(CloseReason::PeerClosed, 3),
    );
}

#[test]
fn graceful_shutdown_delivers_the_in_flight_reply() {
    let (gate, control) = gate();
    let server = start(Server::builder(accept_first_gated(gate)));
    let (addr, handle, mut events) = (server.addr, server.handle, server.events);
    let mut busy = Peer::connect(addr);
    let mut idle = Peer::connect(addr);
    busy.send_frame(&message("INFLIGHT"));
    control.wait_entered();
    let idle_addr = idle.local_addr();
    events.wait("idle connection start", |e| {
        matches!(e, Event::ConnectionStart(_)) && e.peer() == idle_addr
    });

    let stopper = support::spawn(move || handle.shutdown(GRACE));
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
    let server = start(Server::builder(accept_first_gated(gate)));
    let mut peer = server.connect();
    peer.send_frame(&message("STUCK"));
    control.wait_entered();
    let report = server.stop_within(Duration::from_millis(300)).report;
    assert_eq!(report.in_flight, 1);
    assert_eq!(report.forced, 1);
    assert_eq!(report.workers_stuck, 1);
    // Closed without an answer: nothing was ACKed that the handler did not accept.
    peer.expect_closed();
    control.release();
}

#[test]
fn ipv6_loopback() {
    let server = match start_at("[::1]:0", Server::builder(accepting())) {
        Ok(server) => server,
        Err(e) => {
            eprintln!("skipped: cannot bind [::1]: {e}");
            return;
        }
    };
    let addr = server.addr;
    assert!(addr.is_ipv6());
    let mut peer = server.connect();
    assert_ack(&peer.roundtrip(&message("V6")), AckCode::AA, "V6");
    server.stop();
}
