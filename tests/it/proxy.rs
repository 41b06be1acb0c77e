//! PROXY protocol and the allow-list, through the server.

use std::net::SocketAddr;
use std::time::Duration;

use mllp_reactor::ack::AckCode;
use mllp_reactor::cidr::AllowList;
use mllp_reactor::proxy::{ProxyHeader, ProxyMode, encode_v1, encode_v2};
use mllp_reactor::{CloseReason, Server};

use crate::util::{
    Event, Peer, accept, ack_msg, assert_ack, frame, start_observed, start_with, stop,
    with_test_reactors,
};

fn client(addr: &str) -> SocketAddr {
    addr.parse().unwrap()
}

fn proxied(source: &str) -> ProxyHeader {
    ProxyHeader::Proxied {
        source: client(source),
        destination: client("10.0.0.1:2575"),
    }
}

fn allow(list: &[&str]) -> AllowList {
    list.iter().map(|c| c.parse().unwrap()).collect()
}

#[test]
fn v2_header_source_becomes_the_peer() {
    let (server, mut events) = start_observed(accept(), |b| b.proxy_protocol(ProxyMode::V2));
    let mut peer = Peer::connect(server.local_addr());
    let mut wire = encode_v2(&proxied("203.0.113.7:40123"));
    wire.extend(frame(&ack_msg("PX1")));
    peer.send(&wire);
    assert_ack(&peer.read_frame(), AckCode::AA, "PX1");
    let started = events.wait("connection start", |e| matches!(e, Event::ConnStart { .. }));
    assert_eq!(started.peer(), client("203.0.113.7:40123"));
    events.wait(
        "message start from the real client",
        |e| matches!(e, Event::MsgStart { peer, .. } if *peer == client("203.0.113.7:40123")),
    );
    stop(server);
}

#[test]
fn v1_header_byte_by_byte_then_pipelined_messages() {
    let server = start_with(accept(), |b| b.proxy_protocol(ProxyMode::Any));
    let mut peer = Peer::connect(server.local_addr());
    for b in encode_v1(&proxied("[2001:db8::1]:5000")) {
        peer.send(&[b]);
    }
    let mut wire = Vec::new();
    for i in 0..5 {
        wire.extend(frame(&ack_msg(&format!("V1_{i}"))));
    }
    peer.send(&wire);
    for i in 0..5 {
        assert_ack(&peer.read_frame(), AckCode::AA, &format!("V1_{i}"));
    }
    stop(server);
}

#[test]
fn local_header_is_a_health_check_served_with_the_socket_peer() {
    let (server, mut events) = start_observed(accept(), |b| b.proxy_protocol(ProxyMode::V2));
    let mut peer = Peer::connect(server.local_addr());
    peer.send(&encode_v2(&ProxyHeader::Local));
    peer.shutdown_write();
    peer.expect_closed();
    events.expect_close(peer.local_addr(), CloseReason::PeerClosed);
    stop(server);
}

#[test]
fn a_connection_without_a_header_is_rejected_and_counted() {
    let (server, mut events) = start_observed(accept(), |b| b.proxy_protocol(ProxyMode::V2));
    let mut peer = Peer::connect(server.local_addr());
    // Plain MLLP where a header must be: no guessing, the connection is closed unanswered.
    peer.send(&frame(&ack_msg("NOHDR")));
    peer.expect_closed();
    events.expect_close(peer.local_addr(), CloseReason::ProxyHeader);
    stop(server);
}

#[test]
fn a_silent_connection_is_closed_at_the_handshake_deadline() {
    let (server, mut events) = start_observed(accept(), |b| {
        b.proxy_protocol(ProxyMode::Any)
            .handshake_timeout(Duration::from_millis(200))
    });
    let mut peer = Peer::connect(server.local_addr());
    peer.expect_closed();
    events.expect_close(peer.local_addr(), CloseReason::HandshakeTimeout);
    stop(server);
}

#[test]
fn allow_list_accepts_and_rejects_ipv4_and_ipv6() {
    let (server, mut events) = start_observed(accept(), |b| b.allow(allow(&["127.0.0.1/32"])));
    let mut ok = Peer::connect(server.local_addr());
    assert_ack(&ok.roundtrip(&ack_msg("IN")), AckCode::AA, "IN");
    stop(server);

    // ::1 is not on an IPv4-only list.
    let server = match with_test_reactors(Server::builder(accept()))
        .allow(allow(&["127.0.0.0/8"]))
        .observer(crate::util::observer().0)
        .bind("[::1]:0")
    {
        Ok(server) => server.spawn().unwrap(),
        Err(e) => {
            eprintln!("skipped: no IPv6 loopback ({e})");
            return;
        }
    };
    let mut out = Peer::connect(server.local_addr());
    out.expect_closed();
    stop(server);

    let (server, mut v6events) = start_v6_observed(&["::1/128"]);
    let mut ok6 = Peer::connect(server.local_addr());
    assert_ack(&ok6.roundtrip(&ack_msg("IN6")), AckCode::AA, "IN6");
    drop(ok6);
    v6events.wait("an IPv6 connection", |e| {
        matches!(e, Event::ConnStart { .. })
    });
    stop(server);
    events.drain();
}

fn start_v6_observed(list: &[&str]) -> (mllp_reactor::ServerHandle, crate::util::Events) {
    let (observer, events) = crate::util::observer();
    let server = with_test_reactors(Server::builder(accept()))
        .allow(allow(list))
        .observer(observer)
        .bind("[::1]:0")
        .expect("bind ::1")
        .spawn()
        .unwrap();
    (server, events)
}

#[test]
fn the_allow_list_checks_the_proxied_client_and_the_balancer() {
    // Balancer allowed (loopback), client 198.51.100.9 not on the list.
    let (server, mut events) = start_observed(accept(), |b| {
        b.proxy_protocol(ProxyMode::V2)
            .proxy_sources(allow(&["127.0.0.0/8"]))
            .allow(allow(&["203.0.113.0/24"]))
    });
    let mut good = Peer::connect(server.local_addr());
    let mut wire = encode_v2(&proxied("203.0.113.5:1000"));
    wire.extend(frame(&ack_msg("OK")));
    good.send(&wire);
    assert_ack(&good.read_frame(), AckCode::AA, "OK");

    let mut bad = Peer::connect(server.local_addr());
    bad.send(&encode_v2(&proxied("198.51.100.9:1000")));
    bad.expect_closed();
    events.wait("the proxied client is not allowed", |e| {
        matches!(e, Event::ConnStop { reason: CloseReason::NotAllowed, peer, .. }
            if *peer == client("198.51.100.9:1000"))
    });
    stop(server);

    // A balancer that is not trusted is refused before a byte is read.
    let (server, mut events) = start_observed(accept(), |b| {
        b.proxy_protocol(ProxyMode::V2)
            .proxy_sources(allow(&["10.9.9.9/32"]))
    });
    let mut untrusted = Peer::connect(server.local_addr());
    untrusted.expect_closed();
    events.expect_close(untrusted.local_addr(), CloseReason::NotAllowed);
    stop(server);
}

#[test]
fn reloading_the_allow_list_affects_new_connections_only() {
    let server = with_test_reactors(Server::builder(accept()))
        .bind("127.0.0.1:0")
        .unwrap();
    let reloader = server.reloader();
    let server = server.spawn().unwrap();
    let mut old = Peer::connect(server.local_addr());
    assert_ack(&old.roundtrip(&ack_msg("OLD1")), AckCode::AA, "OLD1");
    reloader.set_allow_list(Some(allow(&["192.0.2.0/24"])));
    let mut new = Peer::connect(server.local_addr());
    new.expect_closed();
    assert_ack(&old.roundtrip(&ack_msg("OLD2")), AckCode::AA, "OLD2");
    reloader.set_allow_list(None);
    let mut again = Peer::connect(server.local_addr());
    assert_ack(&again.roundtrip(&ack_msg("AGAIN")), AckCode::AA, "AGAIN");
    stop(server);
}
