//! Peers that leave badly: abrupt disconnects, resets (SO_LINGER 0) at every stage, and
//! half-closes. Each ends only its own connection.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use mllp_reactor::CloseReason;
use mllp_reactor::ack::AckCode;

use crate::util::{
    self, Event, Peer, accept, accept_first_gated, ack_msg, assert_ack, gate, start_observed, stop,
};

/// Connects with a socket that resets the connection (RST, not FIN) when dropped.
#[track_caller]
fn connect_resetting(addr: SocketAddr) -> Peer {
    let stream = TcpStream::connect_timeout(&addr, util::IO_TIMEOUT).expect("connect");
    let socket = socket2::Socket::from(stream);
    socket
        .set_linger(Some(Duration::ZERO))
        .expect("SO_LINGER 0");
    Peer::from_stream(socket.into())
}

/// Checks that the server still answers a new connection.
#[track_caller]
fn still_serving(addr: SocketAddr, id: &str) {
    let mut peer = Peer::connect(addr);
    assert_ack(&peer.roundtrip(&ack_msg(id)), AckCode::AA, id);
}

#[test]
fn abrupt_disconnect_mid_frame() {
    let (server, mut events) = start_observed(accept(), |b| b);
    let addr = server.local_addr();
    let mut peer = Peer::connect(addr);
    let framed = util::frame(&ack_msg("HALF"));
    peer.send(&framed[..framed.len() / 2]);
    let me = peer.local_addr();
    drop(peer);
    events.expect_close(me, CloseReason::PeerClosed);
    assert_eq!(
        events.count(|e| matches!(e, Event::MsgStart { .. }) && e.peer() == me),
        0
    );
    still_serving(addr, "AFTER");
    stop(server);
}

#[test]
fn abrupt_disconnect_before_the_reply() {
    let (gate, control) = gate();
    let (server, mut events) = start_observed(accept_first_gated(gate), |b| b.workers(2));
    let addr = server.local_addr();
    let mut peer = Peer::connect(addr);
    peer.send_frame(&ack_msg("GONE"));
    control.wait_entered();
    let me = peer.local_addr();
    drop(peer);
    control.release();
    // The reply goes nowhere (or fails); either way the connection ends and is reported.
    events.wait("close", |e| {
        matches!(e, Event::ConnStop { .. }) && e.peer() == me
    });
    still_serving(addr, "AFTER");
    stop(server);
}

#[test]
fn reset_mid_frame() {
    let (server, mut events) = start_observed(accept(), |b| b);
    let addr = server.local_addr();
    let mut peer = connect_resetting(addr);
    let framed = util::frame(&ack_msg("RST1"));
    peer.send(&framed[..framed.len() / 2]);
    let me = peer.local_addr();
    drop(peer);
    assert_eq!(
        events.close_reason(me),
        CloseReason::Io(std::io::ErrorKind::ConnectionReset)
    );
    assert_eq!(
        events.count(|e| matches!(e, Event::MsgStart { .. }) && e.peer() == me),
        0
    );
    still_serving(addr, "AFTER");
    stop(server);
}

#[test]
fn reset_while_the_handler_works() {
    let (gate, control) = gate();
    let (server, mut events) = start_observed(accept_first_gated(gate), |b| b.workers(2));
    let addr = server.local_addr();
    let mut peer = connect_resetting(addr);
    peer.send_frame(&ack_msg("RST2"));
    control.wait_entered();
    let me = peer.local_addr();
    drop(peer);
    // The server notices the reset while the message is with the handler.
    let reason = events.close_reason(me);
    assert_eq!(reason, CloseReason::Io(std::io::ErrorKind::ConnectionReset));
    control.release();
    still_serving(addr, "AFTER");
    stop(server);
}

#[test]
fn reset_before_reading_the_ack() {
    let (server, mut events) = start_observed(accept(), |b| b);
    let addr = server.local_addr();
    let mut peer = connect_resetting(addr);
    peer.send_frame(&ack_msg("RST3"));
    // Wait for the ACK to be in our receive buffer, unread.
    let mut first = [0u8; 1];
    let n = peer.stream.peek(&mut first).expect("the ACK arrives");
    assert_eq!(n, 1);
    let me = peer.local_addr();
    drop(peer);
    assert_eq!(
        events.close_reason(me),
        CloseReason::Io(std::io::ErrorKind::ConnectionReset)
    );
    // The message itself was fully answered before the reset.
    events.wait("message stop", |e| {
        matches!(e, Event::MsgStop { seq: 0, .. }) && e.peer() == me
    });
    still_serving(addr, "AFTER");
    stop(server);
}

#[test]
fn half_close_after_sending_still_gets_the_acks() {
    let (server, mut events) = start_observed(accept(), |b| b);
    let mut peer = Peer::connect(server.local_addr());
    let wire: Vec<u8> = ["HC1", "HC2", "HC3"]
        .iter()
        .flat_map(|id| util::frame(&ack_msg(id)))
        .collect();
    peer.send(&wire);
    peer.shutdown_write();
    for id in ["HC1", "HC2", "HC3"] {
        assert_ack(&peer.read_frame(), AckCode::AA, id);
    }
    peer.expect_closed();
    events.expect_close(peer.local_addr(), CloseReason::PeerClosed);
    stop(server);
}

#[test]
fn half_close_while_the_handler_works() {
    let (gate, control) = gate();
    let (server, mut events) = start_observed(accept_first_gated(gate), |b| b);
    let mut peer = Peer::connect(server.local_addr());
    peer.send_frame(&ack_msg("HC4"));
    control.wait_entered();
    peer.shutdown_write();
    let me = peer.local_addr();
    // Give the EOF a chance to be read before the handler returns: it must not end the
    // connection before the reply is out.
    util::pause();
    assert_eq!(
        events.count(|e| matches!(e, Event::ConnStop { .. }) && e.peer() == me),
        0
    );
    control.release();
    assert_ack(&peer.read_frame(), AckCode::AA, "HC4");
    peer.expect_closed();
    events.expect_close(me, CloseReason::PeerClosed);
    stop(server);
}
