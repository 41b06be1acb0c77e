//! Peers that leave badly: abrupt disconnects, resets (SO_LINGER 0) at every stage, and
//! half-closes. Each ends only its own connection.

use std::io::ErrorKind;

use mllp_reactor::ack::AckCode;
use mllp_reactor::telemetry::names::LATE_RESULTS;
use mllp_reactor::{CloseReason, Server};

use crate::support::{
    self, Event, Expected, Peer, Stopped, TestServer, accept_first_gated, accept_gating, accepting,
    assert_ack, frame, gate, kinds, message, start,
};

/// Checks that the server still answers a new connection, which then closes cleanly; the
/// message sent and the reply.
#[track_caller]
fn still_serving(server: &mut TestServer, id: &str) -> (Vec<u8>, Vec<u8>) {
    let mut peer = server.connect();
    let payload = message(id);
    let reply = peer.roundtrip(&payload);
    assert_ack(&reply, AckCode::AA, id);
    let me = peer.local_addr();
    peer.finish();
    server.events.expect_close(me, CloseReason::PeerClosed);
    (payload, reply)
}

const RESET: CloseReason = CloseReason::Io(ErrorKind::ConnectionReset);

#[test]
fn abrupt_disconnect_mid_frame() {
    let mut server = start(Server::builder(accepting()));
    let mut peer = server.connect();
    let framed = frame(&message("HALF"));
    peer.send(&framed[..framed.len() / 2]);
    let me = peer.local_addr();
    drop(peer);
    server.events.expect_close(me, CloseReason::PeerClosed);
    assert_eq!(
        server
            .events
            .count(|e| matches!(e, Event::MessageStart(_)) && e.peer() == me),
        0
    );
    still_serving(&mut server, "AFTER");
    server.stop();
}

#[test]
fn abrupt_disconnect_before_the_reply() {
    let (gate, control) = gate();
    let mut server = start(Server::builder(accept_first_gated(gate)).workers(2));
    let mut peer = server.connect();
    peer.send_frame(&message("GONE"));
    control.wait_entered();
    let me = peer.local_addr();
    drop(peer);
    control.release();
    // The reply goes nowhere (or fails); either way the connection ends and is reported.
    server.events.wait("close", |e| {
        matches!(e, Event::ConnectionStop(_)) && e.peer() == me
    });
    still_serving(&mut server, "AFTER");
    server.stop();
}

#[test]
fn reset_mid_frame() {
    let mut server = start(Server::builder(accepting()));
    let mut peer = Peer::connect_resetting(server.addr);
    let framed = frame(&message("RST1"));
    peer.send(&framed[..framed.len() / 2]);
    let me = peer.local_addr();
    drop(peer);
    assert_eq!(server.events.close_reason(me), RESET);
    assert_eq!(
        server
            .events
            .count(|e| matches!(e, Event::MessageStart(_)) && e.peer() == me),
        0
    );
    still_serving(&mut server, "AFTER");
    server.stop();
}

#[test]
fn reset_while_the_handler_works_discards_the_late_result() {
    // The peer resets while its second message is with the handler. The message's start has
    // no stop or exception: the connection stop ends it. The result arrives for a connection
    // that is gone: it is discarded and counted as late, not as handled, with no event.
    let (gate, control) = gate();
    // One worker: the probe below is handled after the held message, and completions are
    // FIFO, so the probe's reply proves the late result was counted.
    let mut server = start(Server::builder(accept_gating("HOLD", gate)).workers(1));
    let addr = server.addr;
    let mut client = Peer::connect_resetting(addr);
    let me = client.local_addr();
    let (m1, m2) = (message("FIRST"), message("HOLD"));
    let mut sent = frame(&m1);
    sent.extend_from_slice(&frame(&m2));
    client.send(&sent);
    control.wait_entered();
    // The first ACK is whole in our receive buffer, unread, when we reset.
    let first_ack = client.peek_frame();
    assert_ack(&first_ack, AckCode::AA, "FIRST");
    drop(client);
    // The server notices the reset while the message is with the handler.
    assert_eq!(server.events.close_reason(me), RESET);
    control.release();
    let (probe, probe_ack) = still_serving(&mut server, "PROBE");
    let Stopped {
        metrics,
        mut events,
        ..
    } = server.stop();

    let ours = events.of(me);
    assert_eq!(
        kinds(&ours),
        [
            "connection_start",
            "message_start",
            "message_stop",
            "message_start",
            "connection_stop"
        ],
        "{ours:#?}"
    );
    let (
        Event::ConnectionStart(start),
        Event::MessageStop(done),
        Event::MessageStart(held),
        Event::ConnectionStop(stop),
    ) = (&ours[0], &ours[2], &ours[3], &ours[4])
    else {
        unreachable!("kinds checked above")
    };
    assert_eq!(start.local, addr);
    assert_eq!((done.connection, done.sequence), (start.connection, 0));
    assert_eq!(done.response_size, Some(first_ack.len()));
    assert_eq!((held.connection, held.sequence), (start.connection, 1));
    assert_eq!((stop.connection, stop.reason), (start.connection, RESET));
    // The probe's connection: start, message, stop; nothing else.
    assert_eq!(events.count(|_| true), ours.len() + 4);

    let expected = Expected::new()
        .accepted(2)
        .replied(&m1, &first_ack)
        .received(&m2)
        .handled_timings(1)
        .counter(LATE_RESULTS, &[], 1)
        .closed(RESET, 1)
        .replied(&probe, &probe_ack)
        .closed(CloseReason::PeerClosed, 1);
    metrics.assert_exactly(&expected);
}

#[test]
fn reset_before_reading_the_ack() {
    let mut server = start(Server::builder(accepting()));
    let addr = server.addr;
    let mut peer = Peer::connect_resetting(addr);
    let payload = message("RST3");
    peer.send_frame(&payload);
    // Wait for the whole ACK to be in our receive buffer, unread. Its length is what the
    // server sent: an ACK's own control id varies in length, so it cannot be recomputed.
    let ack = peer.peek_frame();
    assert_ack(&ack, AckCode::AA, "RST3");
    let me = peer.local_addr();
    drop(peer);
    assert_eq!(server.events.close_reason(me), RESET);
    let (after, after_ack) = still_serving(&mut server, "AFTER");
    let Stopped {
        metrics,
        mut events,
        ..
    } = server.stop();

    // The message itself was fully answered before the reset.
    let id = events.started(me, addr).connection;
    events.answered(id, 0, payload.len(), Some(ack.len()));
    events.stopped(id, RESET);
    // Then the other connection's start, message and stop; nothing else.
    assert_eq!(events.count(|_| true), 4 + 4);
    let expected = Expected::new()
        .accepted(2)
        .replied(&payload, &ack)
        .closed(RESET, 1)
        .replied(&after, &after_ack)
        .closed(CloseReason::PeerClosed, 1);
    metrics.assert_exactly(&expected);
}

#[test]
fn half_close_after_sending_still_gets_the_acks() {
    let mut server = start(Server::builder(accepting()));
    let mut peer = server.connect();
    let wire: Vec<u8> = ["HC1", "HC2", "HC3"]
        .iter()
        .flat_map(|id| frame(&message(id)))
        .collect();
    peer.send(&wire);
    peer.shutdown_write();
    for id in ["HC1", "HC2", "HC3"] {
        assert_ack(&peer.read_frame(), AckCode::AA, id);
    }
    peer.expect_closed();
    server
        .events
        .expect_close(peer.local_addr(), CloseReason::PeerClosed);
    server.stop();
}

#[test]
fn half_close_while_the_handler_works() {
    let (gate, control) = gate();
    let mut server = start(Server::builder(accept_first_gated(gate)));
    let mut peer = server.connect();
    peer.send_frame(&message("HC4"));
    control.wait_entered();
    peer.shutdown_write();
    let me = peer.local_addr();
    // Give the EOF a chance to be read before the handler returns: it must not end the
    // connection before the reply is out.
    support::pause();
    assert_eq!(
        server
            .events
            .count(|e| matches!(e, Event::ConnectionStop(_)) && e.peer() == me),
        0
    );
    control.release();
    assert_ack(&peer.read_frame(), AckCode::AA, "HC4");
    peer.expect_closed();
    server.events.expect_close(me, CloseReason::PeerClosed);
    server.stop();
}
