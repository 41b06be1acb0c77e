//! PROXY protocol and the allow-list, through the server.

use std::net::SocketAddr;
use std::time::Duration;

use mllp_reactor::ack::AckCode;
use mllp_reactor::cidr::AllowList;
use mllp_reactor::proxy::{ProxyHeader, ProxyMode, encode_v1, encode_v2};
use mllp_reactor::{Builder, CloseReason, ConfigError, Server};

use mllp_reactor::telemetry::names::{CONNECTIONS_CLOSED, CONNECTIONS_REJECTED};

use crate::support::{
    Event, Peer, TestServer, accepting, assert_ack, closed, frame, message, start, start_at,
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

/// A server requiring PROXY headers, trusting the loopback balancer (the test itself).
fn behind_balancer(mode: ProxyMode) -> Builder {
    Server::builder(accepting())
        .proxy_protocol(mode)
        .proxy_sources(allow(&["127.0.0.0/8", "::1/128"]))
}

/// Issue 18 defect 1: a PROXY header was trusted from anyone, so a client on 127.0.0.1 could
/// claim an allowed address and get past the allow-list (and into the records as that
/// address). PROXY protocol now needs the trusted sources, and the allow-list applies to the
/// balancer (the socket's peer) as well as the client the header names.
#[test]
fn issue_1_a_proxy_header_does_not_get_past_the_allow_list() {
    let err = Server::builder(accepting())
        .proxy_protocol(ProxyMode::V1)
        .allow(allow(&["10.9.9.9/32"]))
        .bind("127.0.0.1:0")
        .expect_err("PROXY protocol without trusted sources");
    assert!(
        matches!(
            err,
            mllp_reactor::Error::Config(ConfigError::ProxySourcesRequired)
        ),
        "{err:?}"
    );

    // Every source trusted explicitly: the allow-list still checks the socket's peer.
    let mut server = start(
        Server::builder(accepting())
            .proxy_protocol(ProxyMode::V1)
            .proxy_sources(allow(&["0.0.0.0/0", "::/0"]))
            .allow(allow(&["10.9.9.9/32"])),
    );
    let mut forger = server.connect();
    let mut wire = b"PROXY TCP4 10.9.9.9 10.0.0.1 4000 2575\r\n".to_vec();
    wire.extend(frame(&message("FORGED")));
    // The server may close before taking the bytes: a failed send is fine.
    let _ = std::io::Write::write_all(&mut forger.stream, &wire);
    forger.expect_closed();
    server
        .events
        .expect_close(forger.local_addr(), CloseReason::NotAllowed);
    assert_eq!(
        server.events.count(|e| matches!(e, Event::MessageStart(_))),
        0,
        "a message from a forged source was handled"
    );
    server.stop();
}

#[test]
fn v2_header_source_becomes_the_peer() {
    let mut server = start(behind_balancer(ProxyMode::V2));
    let mut peer = server.connect();
    let mut wire = encode_v2(&proxied("203.0.113.7:40123"));
    wire.extend(frame(&message("PX1")));
    peer.send(&wire);
    assert_ack(&peer.read_frame(), AckCode::AA, "PX1");
    let started = server.events.connection_start();
    assert_eq!(started.peer, client("203.0.113.7:40123"));
    server
        .events
        .wait("message start from the real client", |e| {
            matches!(e, Event::MessageStart(_)) && e.peer() == client("203.0.113.7:40123")
        });
    server.stop();
}

#[test]
fn v1_header_byte_by_byte_then_pipelined_messages() {
    let server = start(behind_balancer(ProxyMode::Any));
    let mut peer = server.connect();
    for b in encode_v1(&proxied("[2001:db8::1]:5000")) {
        peer.send(&[b]);
    }
    let mut wire = Vec::new();
    for i in 0..5 {
        wire.extend(frame(&message(&format!("V1_{i}"))));
    }
    peer.send(&wire);
    for i in 0..5 {
        assert_ack(&peer.read_frame(), AckCode::AA, &format!("V1_{i}"));
    }
    server.stop();
}

#[test]
fn local_header_is_a_health_check_served_with_the_socket_peer() {
    let mut server = start(behind_balancer(ProxyMode::V2));
    let mut peer = server.connect();
    peer.send(&encode_v2(&ProxyHeader::Local));
    peer.send(&frame(&message("LOCAL")));
    assert_ack(&peer.read_frame(), AckCode::AA, "LOCAL");
    peer.shutdown_write();
    peer.expect_closed();
    server
        .events
        .expect_close(peer.local_addr(), CloseReason::PeerClosed);
    server.stop();
}

/// Issue 18: a balancer's health check (connect, then close or reset, with no bytes, or with
/// a PROXY header alone, as HAProxy's checks send) is a probe: its own close reason and counter, which the CLI
/// logs at debug level, never a warning per probe.
#[test]
fn health_checks_are_probes() {
    let mut server = start(behind_balancer(ProxyMode::V2));
    // Connect, then close: before the header, so rejected (as a probe).
    let mut silent = server.connect();
    silent.shutdown_write();
    silent.expect_closed();
    server
        .events
        .expect_close(silent.local_addr(), CloseReason::Probe);
    // Connect, then reset.
    let reset = Peer::connect_resetting(server.addr);
    let reset_addr = reset.local_addr();
    drop(reset);
    server.events.expect_close(reset_addr, CloseReason::Probe);
    // HAProxy's check-send-proxy: a LOCAL header, then close: started, then closed.
    let mut checked = server.connect();
    checked.send(&encode_v2(&ProxyHeader::Local));
    checked.shutdown_write();
    checked.expect_closed();
    server
        .events
        .expect_close(checked.local_addr(), CloseReason::Probe);
    let metrics = server.stop().metrics;
    assert_eq!(
        metrics.counter(CONNECTIONS_CLOSED, &closed(CloseReason::Probe)),
        1
    );
    assert_eq!(
        metrics.counter(CONNECTIONS_REJECTED, &[("reason", "probe")]),
        2
    );
}

#[test]
fn a_connection_without_a_header_is_rejected_and_counted() {
    let mut server = start(behind_balancer(ProxyMode::V2));
    let mut peer = server.connect();
    // Plain MLLP where a header must be: no guessing, the connection is closed unanswered.
    peer.send(&frame(&message("NOHDR")));
    peer.expect_closed();
    server
        .events
        .expect_close(peer.local_addr(), CloseReason::ProxyHeader);
    server.stop();
}

#[test]
fn a_silent_connection_is_closed_at_the_handshake_deadline() {
    let mut server =
        start(behind_balancer(ProxyMode::Any).handshake_timeout(Duration::from_millis(200)));
    let mut peer = server.connect();
    peer.expect_closed();
    server
        .events
        .expect_close(peer.local_addr(), CloseReason::HandshakeTimeout);
    server.stop();
}

#[test]
fn allow_list_accepts_and_rejects_ipv4_and_ipv6() {
    let server = start(Server::builder(accepting()).allow(allow(&["127.0.0.1/32"])));
    let mut ok = server.connect();
    assert_ack(&ok.roundtrip(&message("IN")), AckCode::AA, "IN");
    server.stop();

    // ::1 is not on an IPv4-only list.
    let Some(server) = start_v6(&["127.0.0.0/8"]) else {
        return;
    };
    let mut out = server.connect();
    out.expect_closed();
    server.stop();

    let mut server = start_v6(&["::1/128"]).expect("bound ::1 above");
    let mut ok6 = server.connect();
    assert_ack(&ok6.roundtrip(&message("IN6")), AckCode::AA, "IN6");
    drop(ok6);
    server.events.wait("an IPv6 connection", |e| {
        matches!(e, Event::ConnectionStart(_))
    });
    server.stop();
}

/// A server on `[::1]:0` allowing `list`, or `None` (the test skips) without IPv6 loopback.
fn start_v6(list: &[&str]) -> Option<TestServer> {
    match start_at("[::1]:0", Server::builder(accepting()).allow(allow(list))) {
        Ok(server) => Some(server),
        Err(e) => {
            eprintln!("skipped: no IPv6 loopback ({e})");
            None
        }
    }
}

#[test]
fn the_allow_list_checks_the_proxied_client_and_the_balancer() {
    // Balancer trusted and allowed (loopback), client 198.51.100.9 not on the list.
    let mut server = start(
        Server::builder(accepting())
            .proxy_protocol(ProxyMode::V2)
            .proxy_sources(allow(&["127.0.0.0/8"]))
            .allow(allow(&["127.0.0.0/8", "203.0.113.0/24"])),
    );
    let mut good = server.connect();
    let mut wire = encode_v2(&proxied("203.0.113.5:1000"));
    wire.extend(frame(&message("OK")));
    good.send(&wire);
    assert_ack(&good.read_frame(), AckCode::AA, "OK");

    let mut bad = server.connect();
    bad.send(&encode_v2(&proxied("198.51.100.9:1000")));
    bad.expect_closed();
    server
        .events
        .wait("the proxied client is not allowed", |e| {
            matches!(e, Event::ConnectionStop(stop) if stop.reason == CloseReason::NotAllowed)
                && e.peer() == client("198.51.100.9:1000")
        });
    server.stop();

    // A balancer trusted to send headers but not on the allow-list is refused before a byte
    // is read, whatever client it would name.
    let mut server = start(
        Server::builder(accepting())
            .proxy_protocol(ProxyMode::V2)
            .proxy_sources(allow(&["127.0.0.0/8"]))
            .allow(allow(&["203.0.113.0/24"])),
    );
    let mut not_allowed = server.connect();
    not_allowed.expect_closed();
    server
        .events
        .expect_close(not_allowed.local_addr(), CloseReason::NotAllowed);
    server.stop();

    // A balancer that is not trusted is refused before a byte is read.
    let mut server = start(
        Server::builder(accepting())
            .proxy_protocol(ProxyMode::V2)
            .proxy_sources(allow(&["10.9.9.9/32"])),
    );
    let mut untrusted = server.connect();
    untrusted.expect_closed();
    server
        .events
        .expect_close(untrusted.local_addr(), CloseReason::NotAllowed);
    server.stop();
}

/// Issue 18: rejected connections were reported as `conn=4294967295.N` (a made-up index). They
/// get a proper id now: unique, shaped like any other (reactor and slot, generation).
#[test]
fn rejected_connections_get_a_proper_id() {
    let mut server = start(Server::builder(accepting()).allow(allow(&["192.0.2.0/24"])));
    let mut ids = Vec::new();
    for _ in 0..2 {
        let mut peer = server.connect();
        peer.expect_closed();
        match server.events.wait("the rejection", |e| {
            matches!(e, Event::ConnectionStop(_)) && e.peer() == peer.local_addr()
        }) {
            Event::ConnectionStop(stop) => {
                assert_eq!(stop.reason, CloseReason::NotAllowed);
                ids.push(stop.connection);
            }
            _ => unreachable!("matched a connection stop"),
        }
    }
    for id in &ids {
        let index = id
            .to_string()
            .split('.')
            .next()
            .unwrap()
            .parse::<u32>()
            .unwrap();
        assert!(index < 1 << 24, "{id}: index beyond reactor 0's slots");
    }
    assert_ne!(ids[0], ids[1], "ids are unique");
    server.stop();
}

#[test]
fn reloading_the_allow_list_affects_new_connections_only() {
    let server = start(Server::builder(accepting()));
    let reloader = server.handle.reloader();
    let mut old = server.connect();
    assert_ack(&old.roundtrip(&message("OLD1")), AckCode::AA, "OLD1");
    reloader.set_allow_list(Some(allow(&["192.0.2.0/24"])));
    let mut new = server.connect();
    new.expect_closed();
    assert_ack(&old.roundtrip(&message("OLD2")), AckCode::AA, "OLD2");
    reloader.set_allow_list(None);
    let mut again = server.connect();
    assert_ack(&again.roundtrip(&message("AGAIN")), AckCode::AA, "AGAIN");
    server.stop();
}
