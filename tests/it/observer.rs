//! Observer events over loopback: the exact sequence of each scenario, with matching
//! connection ids, addresses, sizes (unframed) and sequence numbers, each event exactly once.
//!
//! Events are read after `ServerHandle::shutdown` returned where the test allows it: the
//! reactor thread (the only caller of the observer) is then gone, so the channel holds every
//! event it will ever send and `assert_drained` proves there is nothing extra.

use std::sync::Mutex;
use std::sync::mpsc;
use std::time::Duration;

use mllp_reactor::ack::{self, AckCode};
use mllp_reactor::{
    CloseReason, ConnectionStart, ExceptionReason, Handler, Reply, Server, handler_fn,
};

use crate::obs_util::{
    Client, Events, GRACE, TestServer, WAIT, ack_of, assert_recent, frame, message,
};

fn ack_handler() -> impl Handler {
    handler_fn(|msg, _| Ok(Reply::Send(ack::accept(msg))))
}

/// Checks the connection start of `client` on `server` and returns it.
#[track_caller]
fn started(
    events: &Events,
    client_addr: std::net::SocketAddr,
    server: std::net::SocketAddr,
) -> ConnectionStart {
    let start = events.connection_start();
    assert_eq!(
        start.peer, client_addr,
        "peer is the client's local address"
    );
    assert_eq!(start.local, server, "local is the server's address");
    assert_recent(start.system_time);
    start
}

#[test]
fn message_round_trip_gives_four_events_in_order() {
    let server = TestServer::start(Server::builder(ack_handler()));
    let addr = server.addr;
    let payload = message("M1");
    let mut client = server.connect();
    let client_addr = client.local_addr();
    client.send(&frame(&payload));
    let reply = client.read_frame();
    assert_eq!(ack_of(&reply), (AckCode::AA, "M1".to_owned()));
    client.finish();
    let events = server.stop(GRACE).events;

    let start = started(&events, client_addr, addr);
    let id = start.connection;

    let msg = events.message_start();
    assert_eq!(msg.connection, id);
    assert_eq!((msg.peer, msg.local), (client_addr, addr));
    assert_eq!(msg.sequence, 0);
    assert_eq!(msg.message_size, payload.len(), "message size is unframed");
    assert_recent(msg.system_time);

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
}

#[test]
fn handler_error_gives_exception_with_its_text_and_no_message_stop() {
    let handler = handler_fn(|msg, _| {
        if msg.windows(4).any(|w| w == b"FAIL") {
            Err("database unavailable".into())
        } else {
            Ok(Reply::Send(ack::accept(msg)))
        }
    });
    let server = TestServer::start(Server::builder(handler));
    let addr = server.addr;
    let (bad, good) = (message("FAIL"), message("GOOD"));
    let mut client = server.connect();
    let client_addr = client.local_addr();
    client.send(&frame(&bad));
    assert_eq!(
        ack_of(&client.read_frame()),
        (AckCode::AE, "FAIL".to_owned())
    );
    // The connection stays open and serves the next message.
    client.send(&frame(&good));
    let reply = client.read_frame();
    assert_eq!(ack_of(&reply), (AckCode::AA, "GOOD".to_owned()));
    client.finish();
    let events = server.stop(GRACE).events;

    let id = started(&events, client_addr, addr).connection;
    let msg = events.message_start();
    assert_eq!(
        (msg.connection, msg.sequence, msg.message_size),
        (id, 0, bad.len())
    );
    let failed = events.message_exception();
    assert_eq!(failed.connection, id);
    assert_eq!((failed.peer, failed.local), (client_addr, addr));
    assert_eq!(failed.reason, ExceptionReason::HandlerError);
    assert_eq!(failed.sequence, Some(0));
    assert_eq!(failed.message_size, bad.len());
    assert_eq!(failed.detail.as_deref(), Some("database unavailable"));
    let msg = events.message_start();
    assert_eq!(
        (msg.connection, msg.sequence, msg.message_size),
        (id, 1, good.len())
    );
    let done = events.message_stop();
    assert_eq!(
        (done.connection, done.sequence, done.response_size),
        (id, 1, Some(reply.len()))
    );
    let stop = events.connection_stop();
    assert_eq!(
        (stop.connection, stop.reason),
        (id, CloseReason::PeerClosed)
    );
    events.assert_drained();
}

#[test]
fn handler_panic_gives_exception_with_the_panic_message() {
    let handler = handler_fn(|_, _| -> Result<Reply, mllp_reactor::HandlerError> {
        panic!("handler bug (expected by this test)")
    });
    let server = TestServer::start(Server::builder(handler));
    let payload = message("P1");
    let mut client = server.connect();
    client.send(&frame(&payload));
    assert_eq!(ack_of(&client.read_frame()), (AckCode::AE, "P1".to_owned()));
    client.finish();
    let events = server.stop(GRACE).events;

    let id = events.connection_start().connection;
    let msg = events.message_start();
    assert_eq!((msg.connection, msg.sequence), (id, 0));
    let failed = events.message_exception();
    assert_eq!((failed.connection, failed.sequence), (id, Some(0)));
    assert_eq!(failed.reason, ExceptionReason::Panic);
    assert_eq!(failed.message_size, payload.len());
    assert_eq!(
        failed.detail.as_deref(),
        Some("handler bug (expected by this test)")
    );
    let stop = events.connection_stop();
    assert_eq!(
        (stop.connection, stop.reason),
        (id, CloseReason::PeerClosed)
    );
    events.assert_drained();
}

#[test]
fn handler_timeout_gives_exception_and_the_late_result_gives_nothing() {
    let timeout = Duration::from_millis(300);
    let (release, released) = mpsc::channel::<()>();
    let released = Mutex::new(released);
    let handler = handler_fn(move |msg, _| {
        if msg.windows(5).any(|w| w == b"STUCK") {
            let _ = released.lock().unwrap().recv_timeout(4 * WAIT);
        }
        Ok(Reply::Send(ack::accept(msg)))
    });
    // One worker, no replacement: NEXT waits for the stuck worker, whose late result reaches
    // the reactor first (completions are FIFO), so it is processed before NEXT's reply.
    let builder = Server::builder(handler)
        .handler_timeout(timeout)
        .workers(1)
        .max_extra_workers(0);
    let server = TestServer::start(builder);
    let (stuck, next) = (message("STUCK"), message("NEXT"));
    let mut client = server.connect();
    client.send(&frame(&stuck));
    assert_eq!(
        ack_of(&client.read_frame()),
        (AckCode::AE, "STUCK".to_owned())
    );
    client.send(&frame(&next));
    release.send(()).unwrap();
    let reply = client.read_frame();
    assert_eq!(ack_of(&reply), (AckCode::AA, "NEXT".to_owned()));
    client.finish();
    let events = server.stop(GRACE).events;

    let id = events.connection_start().connection;
    let msg = events.message_start();
    assert_eq!(
        (msg.connection, msg.sequence, msg.message_size),
        (id, 0, stuck.len())
    );
    let failed = events.message_exception();
    assert_eq!((failed.connection, failed.sequence), (id, Some(0)));
    assert_eq!(failed.reason, ExceptionReason::HandlerTimeout);
    assert_eq!(failed.message_size, stuck.len());
    assert_eq!(failed.detail, None);
    assert!(
        failed.duration >= timeout,
        "timed out after {:?}",
        failed.duration
    );
    let msg = events.message_start();
    assert_eq!(
        (msg.connection, msg.sequence, msg.message_size),
        (id, 1, next.len())
    );
    let done = events.message_stop();
    assert_eq!(
        (done.connection, done.sequence, done.response_size),
        (id, 1, Some(reply.len()))
    );
    let stop = events.connection_stop();
    assert_eq!(
        (stop.connection, stop.reason),
        (id, CloseReason::PeerClosed)
    );
    events.assert_drained();
}

#[test]
fn oversize_frame_gives_exception_without_message_start_then_stop() {
    let max = 100;
    let server = TestServer::start(Server::builder(ack_handler()).max_message_size(max));
    let addr = server.addr;
    let mut payload = message("BIG");
    payload.resize(payload.len() + 2 * max, b'x');
    let mut client = server.connect();
    let client_addr = client.local_addr();
    client.send(&frame(&payload));
    assert_eq!(
        ack_of(&client.read_frame()),
        (AckCode::AR, "BIG".to_owned())
    );
    assert!(client.read_to_eof().is_empty());
    let events = server.stop(GRACE).events;

    let id = started(&events, client_addr, addr).connection;
    let failed = events.message_exception();
    assert_eq!(failed.connection, id);
    assert_eq!((failed.peer, failed.local), (client_addr, addr));
    assert_eq!(failed.reason, ExceptionReason::MessageTooLarge);
    assert_eq!(
        failed.sequence, None,
        "an oversize frame is never dispatched"
    );
    assert_eq!(failed.duration, Duration::ZERO);
    assert!(
        failed.message_size > max && failed.message_size <= payload.len(),
        "message_size {} is the payload received when rejected",
        failed.message_size
    );
    assert_eq!(failed.detail, None);
    let stop = events.connection_stop();
    assert_eq!(
        (stop.connection, stop.reason),
        (id, CloseReason::MessageTooLarge)
    );
    events.assert_drained();
}

#[test]
fn rejected_connection_gets_start_and_rejected_stop() {
    let server = TestServer::start(Server::builder(ack_handler()).max_connections(1));
    let addr = server.addr;
    let first = server.connect();
    let first_addr = first.local_addr();
    let first_id = started(&server.events, first_addr, addr).connection;
    let mut second = server.connect();
    let second_addr = second.local_addr();
    assert!(second.read_to_eof().is_empty());
    first.finish();
    let events = server.stop(GRACE).events;

    let rejected = started(&events, second_addr, addr);
    assert_ne!(rejected.connection, first_id);
    let stop = events.connection_stop();
    assert_eq!(stop.connection, rejected.connection);
    assert_eq!((stop.peer, stop.local), (second_addr, addr));
    assert_eq!(stop.reason, CloseReason::Rejected);
    assert_eq!(stop.duration, Duration::ZERO);
    let stop = events.connection_stop();
    assert_eq!((stop.connection, stop.peer), (first_id, first_addr));
    assert_eq!(stop.reason, CloseReason::PeerClosed);
    events.assert_drained();
}

#[test]
fn pipelined_messages_alternate_start_and_stop_in_sequence_order() {
    let server = TestServer::start(Server::builder(ack_handler()));
    let payloads: Vec<Vec<u8>> = (0..10).map(|i| message(&format!("PIPE{i}"))).collect();
    let burst: Vec<u8> = payloads.iter().flat_map(|p| frame(p)).collect();
    let mut client = server.connect();
    client.send(&burst);
    let mut replies = Vec::new();
    for i in 0..10 {
        let reply = client.read_frame();
        assert_eq!(
            ack_of(&reply),
            (AckCode::AA, format!("PIPE{i}")),
            "replies in order"
        );
        replies.push(reply);
    }
    client.finish();
    let events = server.stop(GRACE).events;

    let id = events.connection_start().connection;
    for (i, (payload, reply)) in payloads.iter().zip(&replies).enumerate() {
        let msg = events.message_start();
        assert_eq!(
            (msg.connection, msg.sequence, msg.message_size),
            (id, i as u64, payload.len())
        );
        let done = events.message_stop();
        assert_eq!(
            (done.connection, done.sequence, done.response_size),
            (id, i as u64, Some(reply.len()))
        );
    }
    let stop = events.connection_stop();
    assert_eq!(
        (stop.connection, stop.reason),
        (id, CloseReason::PeerClosed)
    );
    events.assert_drained();
}

#[test]
fn no_reply_gives_message_stop_without_response_size() {
    let server = TestServer::start(Server::builder(handler_fn(|_, _| Ok(Reply::NoReply))));
    let mut client = server.connect();
    client.send(&frame(&message("Q1")));
    client.finish();
    let events = server.stop(GRACE).events;

    let id = events.connection_start().connection;
    assert_eq!(events.message_start().connection, id);
    let done = events.message_stop();
    assert_eq!(
        (done.connection, done.sequence, done.response_size),
        (id, 0, None)
    );
    assert_eq!(events.connection_stop().reason, CloseReason::PeerClosed);
    events.assert_drained();
}

#[test]
fn connection_ids_stay_unique_when_slots_are_reused() {
    let server = TestServer::start(Server::builder(ack_handler()));
    let mut ids = Vec::new();
    for _ in 0..3 {
        let client = server.connect();
        let start = server.events.connection_start();
        client.finish();
        let stop = server.events.connection_stop();
        assert_eq!(stop.connection, start.connection);
        ids.push(start.connection);
    }
    let events = server.stop(GRACE).events;
    events.assert_drained();
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), ids.len(), "ids {ids:?}");
    let numbers: Vec<u64> = ids.iter().map(|id| id.as_u64()).collect();
    assert!(
        numbers.windows(2).all(|w| w[0] != w[1]),
        "as_u64 {numbers:?}"
    );
}

/// A connection whose only events are its start and a stop for `reason`.
#[track_caller]
fn start_then_stop(
    events: &Events,
    client: &Client,
    addr: std::net::SocketAddr,
    reason: CloseReason,
) -> Duration {
    let id = started(events, client.local_addr(), addr).connection;
    let stop = events.connection_stop();
    assert_eq!((stop.connection, stop.reason), (id, reason));
    stop.duration
}

#[test]
fn idle_timeout_gives_stop_with_its_reason() {
    let idle = Duration::from_millis(300);
    let server = TestServer::start(Server::builder(ack_handler()).idle_timeout(idle));
    let addr = server.addr;
    let mut client = server.connect();
    assert!(client.read_to_eof().is_empty());
    let events = server.stop(GRACE).events;
    let lifetime = start_then_stop(&events, &client, addr, CloseReason::IdleTimeout);
    assert!(lifetime >= idle, "closed after {lifetime:?}");
    events.assert_drained();
}

#[test]
fn frame_timeout_gives_stop_with_its_reason_and_no_message_events() {
    let limit = Duration::from_millis(300);
    let server = TestServer::start(Server::builder(ack_handler()).frame_timeout(limit));
    let addr = server.addr;
    let mut client = server.connect();
    client.send(&frame(&message("SLOW"))[..20]);
    assert!(client.read_to_eof().is_empty());
    let events = server.stop(GRACE).events;
    let lifetime = start_then_stop(&events, &client, addr, CloseReason::FrameTimeout);
    assert!(lifetime >= limit, "closed after {lifetime:?}");
    events.assert_drained();
}

#[test]
fn shutdown_gives_stop_with_its_reason() {
    let server = TestServer::start(Server::builder(ack_handler()));
    let addr = server.addr;
    let mut client = server.connect();
    let start = started(&server.events, client.local_addr(), addr);
    let events = server.stop(GRACE).events;
    assert!(client.read_to_eof().is_empty());
    let stop = events.connection_stop();
    assert_eq!(
        (stop.connection, stop.reason),
        (start.connection, CloseReason::Shutdown)
    );
    events.assert_drained();
}

#[test]
fn connection_reset_mid_message_ends_with_connection_stop_only() {
    // The message's start has no stop or exception: the connection stop ends it. (A result
    // that arrives later is discarded as late, with no event.)
    let (entered_tx, entered) = mpsc::channel::<()>();
    let (release, released) = mpsc::channel::<()>();
    let gate = Mutex::new((entered_tx, released));
    let handler = handler_fn(move |msg, _| {
        if msg.windows(4).any(|w| w == b"HOLD") {
            let gate = gate.lock().unwrap();
            gate.0.send(()).unwrap();
            let _ = gate.1.recv_timeout(4 * WAIT);
        }
        Ok(Reply::Send(ack::accept(msg)))
    });
    let server = TestServer::start(Server::builder(handler).workers(1));
    let mut client = server.connect();
    let mut sent = frame(&message("FIRST"));
    sent.extend_from_slice(&frame(&message("HOLD")));
    client.send(&sent);
    entered
        .recv_timeout(WAIT)
        .expect("the second message reached the handler");
    // The first ACK is unread in our receive buffer: closing now sends a RST.
    client.wait_readable();
    drop(client.into_stream());
    let events = &server.events;
    let id = events.connection_start().connection;
    assert_eq!(events.message_start().sequence, 0);
    assert_eq!(events.message_stop().sequence, 0);
    let held = events.message_start();
    assert_eq!((held.connection, held.sequence), (id, 1));
    let stop = events.connection_stop();
    assert_eq!(stop.connection, id);
    assert_eq!(
        stop.reason,
        CloseReason::Io(std::io::ErrorKind::ConnectionReset)
    );
    release.send(()).unwrap();
    let events = server.stop(GRACE).events;
    events.assert_drained();
}
