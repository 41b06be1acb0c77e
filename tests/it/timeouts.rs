//! Deadlines over real sockets: idle timeout, frame deadline, write stall. Timeouts are a few
//! hundred milliseconds so the tests are quick; only lower bounds are asserted (deadlines never
//! fire early), never tight upper bounds (a loaded machine may be late).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mllp_reactor::ack::{self, AckCode};
use mllp_reactor::{CloseReason, Reply, handler_fn};

use crate::util::{self, Event, Peer, accept, ack_msg, assert_ack, start_observed, stop};

const SHORT: Duration = Duration::from_millis(300);

#[test]
fn idle_timeout_closes_the_connection() {
    let (server, mut events) = start_observed(accept(), |b| b.idle_timeout(SHORT));
    let mut peer = Peer::connect(server.local_addr());
    let started = Instant::now();
    assert_ack(&peer.roundtrip(&ack_msg("IDLE")), AckCode::AA, "IDLE");
    // Reading until EOF is the wait.
    peer.expect_closed();
    assert!(
        started.elapsed() >= SHORT,
        "closed after {:?}",
        started.elapsed()
    );
    events.expect_close(peer.local_addr(), CloseReason::IdleTimeout);
    stop(server);
}

#[test]
fn idle_timeout_closes_a_connection_that_never_sent() {
    let (server, mut events) = start_observed(accept(), |b| b.idle_timeout(SHORT));
    let started = Instant::now();
    let mut peer = Peer::connect(server.local_addr());
    peer.expect_closed();
    assert!(
        started.elapsed() >= SHORT,
        "closed after {:?}",
        started.elapsed()
    );
    events.expect_close(peer.local_addr(), CloseReason::IdleTimeout);
    stop(server);
}

#[test]
fn idle_timer_does_not_run_while_the_handler_works() {
    let idle = Duration::from_millis(200);
    let (server, mut events) = start_observed(
        handler_fn(move |msg, _| {
            // The work itself takes three idle timeouts.
            std::thread::sleep(idle * 3);
            Ok(Reply::Send(ack::accept(msg)))
        }),
        |b| b.idle_timeout(idle),
    );
    let mut peer = Peer::connect(server.local_addr());
    assert_ack(&peer.roundtrip(&ack_msg("WORK1")), AckCode::AA, "WORK1");
    assert_ack(&peer.roundtrip(&ack_msg("WORK2")), AckCode::AA, "WORK2");
    let me = peer.local_addr();
    assert_eq!(
        events.count(|e| matches!(e, Event::ConnStop { .. }) && e.peer() == me),
        0
    );
    // Once idle, the timer runs again.
    peer.expect_closed();
    events.expect_close(me, CloseReason::IdleTimeout);
    stop(server);
}

/// Whether the server has reported the connection from `peer` closed.
fn closed(events: &mut util::Events, peer: SocketAddr) -> bool {
    events.count(|e| matches!(e, Event::ConnStop { .. }) && e.peer() == peer) > 0
}

#[test]
fn frame_deadline_closes_a_slow_drip() {
    let (server, mut events) = start_observed(accept(), |b| {
        b.frame_timeout(SHORT).idle_timeout(Duration::from_secs(30))
    });
    let mut peer = Peer::connect(server.local_addr());
    let me = peer.local_addr();
    let started = Instant::now();
    peer.send(b"\x0bMSH|^~\\&|");
    // One byte every 20 ms keeps the idle timer from ever expiring; only the frame deadline
    // can end this. The drip stops as soon as the server reports the close (bounded: 10 s).
    let mut dripped = 0;
    while !closed(&mut events, me) {
        assert!(
            started.elapsed() < util::WAIT,
            "still open after {dripped} bytes"
        );
        if std::io::Write::write_all(&mut peer.stream, b"x").is_err() {
            break;
        }
        dripped += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    events.expect_close(me, CloseReason::FrameTimeout);
    assert!(
        started.elapsed() >= SHORT,
        "closed after {:?}",
        started.elapsed()
    );
    // The frame never reached the handler.
    assert_eq!(
        events.count(|e| matches!(e, Event::MsgStart { .. }) && e.peer() == me),
        0
    );
    stop(server);
}

#[test]
fn frame_deadline_does_not_touch_completed_frames() {
    // Each frame takes less than the deadline, the whole exchange much more.
    let (server, mut events) = start_observed(accept(), |b| {
        b.frame_timeout(SHORT).idle_timeout(Duration::from_secs(30))
    });
    let mut peer = Peer::connect(server.local_addr());
    let started = Instant::now();
    let mut i = 0;
    while started.elapsed() < SHORT * 2 {
        let id = format!("F{i}");
        let framed = util::frame(&ack_msg(&id));
        let (head, tail) = framed.split_at(10);
        peer.send(head);
        util::pause();
        peer.send(tail);
        assert_ack(&peer.read_frame(), AckCode::AA, &id);
        i += 1;
    }
    assert!(!closed(&mut events, peer.local_addr()));
    stop(server);
}

#[test]
fn peer_that_does_not_read_is_closed_after_the_write_stall_deadline() {
    // Larger than every buffer between the server and a client that never reads: the client's
    // receive buffer is pinned small, and the server's send buffer grows to 4 MiB at most.
    let big = Bytes::from(vec![b'x'; 16 << 20]);
    let (server, mut events) = start_observed(
        handler_fn(move |msg, _| {
            if util::control_id(msg) == "BIG" {
                Ok(Reply::Send(big.clone()))
            } else {
                Ok(Reply::Send(ack::accept(msg)))
            }
        }),
        |b| b.write_timeout(SHORT),
    );
    let addr = server.local_addr();
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket
        .connect_timeout(&addr.into(), util::IO_TIMEOUT)
        .unwrap();
    let mut sluggard = Peer::from_stream(socket.into());
    sluggard.send_frame(&ack_msg("BIG"));
    let me = sluggard.local_addr();
    events.expect_close(me, CloseReason::WriteStalled);
    // Others are served meanwhile and after.
    let mut other = Peer::connect(addr);
    assert_ack(&other.roundtrip(&ack_msg("SMALL")), AckCode::AA, "SMALL");
    // The reply was never complete: no message stop for it.
    assert_eq!(
        events.count(|e| matches!(e, Event::MsgStop { .. }) && e.peer() == me),
        0
    );
    drop(sluggard);
    stop(server);
}
