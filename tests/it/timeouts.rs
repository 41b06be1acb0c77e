//! Deadlines over real sockets: idle timeout, frame deadline, write stall. Timeouts are
//! [`SHORT`] so the tests are quick; only lower bounds are asserted (deadlines never fire
//! early), never tight upper bounds (a loaded machine may be late).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mllp_reactor::ack::{self, AckCode};
use mllp_reactor::telemetry::names::*;
use mllp_reactor::{CloseReason, Reply, Server, handler_fn};

use crate::support::{
    self, Event, Events, Expected, Peer, SHORT, Stopped, TestServer, accepting, assert_ack,
    control_id, frame, message, secs, start,
};

#[test]
fn idle_timeout_closes_the_connection() {
    let mut server = start(Server::builder(accepting()).idle_timeout(SHORT));
    let mut peer = server.connect();
    let started = Instant::now();
    assert_ack(&peer.roundtrip(&message("IDLE")), AckCode::AA, "IDLE");
    // Reading until EOF is the wait.
    peer.expect_closed();
    assert!(
        started.elapsed() >= SHORT,
        "closed after {:?}",
        started.elapsed()
    );
    server
        .events
        .expect_close(peer.local_addr(), CloseReason::IdleTimeout);
    server.stop();
}

#[test]
fn idle_timeout_closes_a_connection_that_never_sent() {
    let server = start(Server::builder(accepting()).idle_timeout(SHORT));
    let started = Instant::now();
    let mut peer = server.connect();
    // Reading until EOF is the wait.
    assert!(peer.read_to_eof().is_empty());
    assert!(
        started.elapsed() >= SHORT,
        "closed after {:?}",
        started.elapsed()
    );
    let expected = Expected::new()
        .accepted(1)
        .closed(CloseReason::IdleTimeout, 1);
    assert_only_connection_closed(server, &peer, CloseReason::IdleTimeout, &expected);
}

#[test]
fn idle_timer_does_not_run_while_the_handler_works() {
    let idle = Duration::from_millis(200);
    let mut server = start(
        Server::builder(handler_fn(move |msg, _| {
            // The work itself takes three idle timeouts.
            std::thread::sleep(idle * 3);
            Ok(Reply::Send(ack::accept(msg)))
        }))
        .idle_timeout(idle),
    );
    let mut peer = server.connect();
    assert_ack(&peer.roundtrip(&message("WORK1")), AckCode::AA, "WORK1");
    assert_ack(&peer.roundtrip(&message("WORK2")), AckCode::AA, "WORK2");
    let me = peer.local_addr();
    assert!(!closed(&mut server.events, me));
    // Once idle, the timer runs again.
    peer.expect_closed();
    server.events.expect_close(me, CloseReason::IdleTimeout);
    server.stop();
}

/// Stops `server`, whose only connection, `client`'s, was closed for `reason` (a deadline of
/// [`SHORT`]), and checks its events (a start and a stop, nothing else), that it lived at
/// least [`SHORT`] by the observer and by the metrics, and that the metrics are `expected`.
#[track_caller]
fn assert_only_connection_closed(
    server: TestServer,
    client: &Peer,
    reason: CloseReason,
    expected: &Expected,
) {
    let addr = server.addr;
    let Stopped {
        metrics,
        mut events,
        ..
    } = server.stop();
    let id = events.started(client.local_addr(), addr).connection;
    let lifetime = events.stopped(id, reason);
    assert!(lifetime >= SHORT, "closed after {lifetime:?}");
    events.assert_drained();
    metrics.assert_exactly(expected);
    let lifetime = metrics.histogram(CONNECTION_DURATION)[0];
    assert!(
        lifetime >= secs(SHORT),
        "closed after {lifetime} s, before the deadline"
    );
}

/// Whether the server has reported the connection from `peer` closed.
fn closed(events: &mut Events, peer: SocketAddr) -> bool {
    events.count(|e| matches!(e, Event::ConnectionStop(_)) && e.peer() == peer) > 0
}

#[test]
fn frame_deadline_closes_a_stalled_frame() {
    let server = start(Server::builder(accepting()).frame_timeout(SHORT));
    let partial = &frame(&message("SLOW"))[..20];
    let mut peer = server.connect();
    peer.send(partial);
    assert!(peer.read_to_eof().is_empty());
    // No message events: the frame never reached the handler.
    let expected = Expected::new()
        .accepted(1)
        .counter(BYTES_RECEIVED, &[], partial.len() as u64)
        .counter(FRAMES_REJECTED, &[("reason", "frame_timeout")], 1)
        .closed(CloseReason::FrameTimeout, 1);
    assert_only_connection_closed(server, &peer, CloseReason::FrameTimeout, &expected);
}

#[test]
fn frame_deadline_closes_a_slow_drip() {
    let mut server = start(
        Server::builder(accepting())
            .frame_timeout(SHORT)
            .idle_timeout(Duration::from_secs(30)),
    );
    let mut peer = server.connect();
    let me = peer.local_addr();
    let started = Instant::now();
    peer.send(b"\x0bMSH|^~\\&|");
    // One byte every 20 ms keeps the idle timer from ever expiring; only the frame deadline
    // can end this. The drip stops as soon as the server reports the close (bounded: WAIT).
    let mut dripped = 0;
    while !closed(&mut server.events, me) {
        assert!(
            started.elapsed() < support::WAIT,
            "still open after {dripped} bytes"
        );
        if std::io::Write::write_all(&mut peer.stream, b"x").is_err() {
            break;
        }
        dripped += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    server.events.expect_close(me, CloseReason::FrameTimeout);
    assert!(
        started.elapsed() >= SHORT,
        "closed after {:?}",
        started.elapsed()
    );
    // The frame never reached the handler.
    assert_eq!(
        server
            .events
            .count(|e| matches!(e, Event::MessageStart(_)) && e.peer() == me),
        0
    );
    server.stop();
}

#[test]
fn frame_deadline_does_not_touch_completed_frames() {
    // Each frame takes less than the deadline, the whole exchange much more.
    let mut server = start(
        Server::builder(accepting())
            .frame_timeout(SHORT)
            .idle_timeout(Duration::from_secs(30)),
    );
    let mut peer = server.connect();
    let started = Instant::now();
    let mut i = 0;
    while started.elapsed() < SHORT * 2 {
        let id = format!("F{i}");
        let framed = frame(&message(&id));
        let (head, tail) = framed.split_at(10);
        peer.send(head);
        support::pause();
        peer.send(tail);
        assert_ack(&peer.read_frame(), AckCode::AA, &id);
        i += 1;
    }
    assert!(!closed(&mut server.events, peer.local_addr()));
    server.stop();
}

#[test]
fn peer_that_does_not_read_is_closed_after_the_write_stall_deadline() {
    // Larger than every buffer between the server and a client that never reads: the client's
    // receive buffer is pinned small, and the server's send buffer grows to 4 MiB at most.
    let big = Bytes::from(vec![b'x'; 16 << 20]);
    let reply = big.clone();
    let mut server = start(
        Server::builder(handler_fn(move |msg, _| {
            if control_id(msg) == "BIG" {
                Ok(Reply::Send(reply.clone()))
            } else {
                Ok(Reply::Send(ack::accept(msg)))
            }
        }))
        .write_timeout(SHORT),
    );
    let addr = server.addr;
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket
        .connect_timeout(&addr.into(), support::IO_TIMEOUT)
        .unwrap();
    let mut sluggard = Peer::from_stream(socket.into());
    let payload = message("BIG");
    sluggard.send_frame(&payload);
    let me = sluggard.local_addr();
    server.events.expect_close(me, CloseReason::WriteStalled);
    // Others are served meanwhile and after.
    let mut other = server.connect();
    let small = message("SMALL");
    let small_reply = other.roundtrip(&small);
    assert_ack(&small_reply, AckCode::AA, "SMALL");
    other.finish();
    // The reply was never complete: no message stop for it.
    assert_eq!(
        server
            .events
            .count(|e| matches!(e, Event::MessageStop(_)) && e.peer() == me),
        0
    );
    // The server closed gracefully (it had read everything we sent): every byte it wrote
    // reaches us before EOF, so what we read is exactly what it counted as sent.
    let delivered = sluggard.read_to_eof();
    assert!(!delivered.is_empty() && delivered.len() < big.len() + 3);
    let stopped = server.stop();

    // No message stop, so no response size or latency for the stalled reply.
    let expected = Expected::new()
        .accepted(2)
        .received(&payload)
        .counter(MESSAGES_HANDLED, &[("outcome", "reply")], 1)
        .handled_timings(1)
        .counter(BYTES_SENT, &[], delivered.len() as u64)
        .closed(CloseReason::WriteStalled, 1)
        .replied(&small, &small_reply)
        .closed(CloseReason::PeerClosed, 1);
    stopped.metrics.assert_exactly(&expected);
}
