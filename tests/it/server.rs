//! Loopback tests of the server's connection lifecycle (issue #3): framing over real sockets,
//! pipelining, half-close, context, stuck workers, shutdown, many connections, IPv6.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mllp_reactor::ack::{self, AckCode};
use mllp_reactor::{CloseReason, Reply, Server, handler_fn};

use crate::obs_util::{Client, GRACE, TestServer, WAIT, ack_of, frame, message};

fn ack_server() -> mllp_reactor::Builder {
    Server::builder(handler_fn(|msg, _cx| Ok(Reply::Send(ack::accept(msg)))))
}

fn echo_server() -> mllp_reactor::Builder {
    Server::builder(handler_fn(|msg, _cx| Ok(Reply::Send(msg.clone()))))
}

#[test]
fn echo_is_byte_exact_and_payload_is_unframed() {
    let server = TestServer::start(echo_server());
    let mut c = server.connect();
    let payload: Vec<u8> = (0u8..=255).filter(|b| *b != 0x1C).collect();
    c.send(&frame(&payload));
    assert_eq!(c.read_frame(), payload);
    c.finish();
    server.stop(GRACE);
}

#[test]
fn hundred_frames_in_one_write_are_answered_in_order() {
    let server = TestServer::start(ack_server());
    let mut c = server.connect();
    let wire: Vec<u8> = (0..100)
        .flat_map(|i| frame(&message(&format!("P{i}"))))
        .collect();
    c.send(&wire);
    for i in 0..100 {
        assert_eq!(ack_of(&c.read_frame()), (AckCode::AA, format!("P{i}")));
    }
    c.finish();
    server.stop(GRACE);
}

#[test]
fn one_byte_per_write_and_split_between_1c_and_0d() {
    let server = TestServer::start(ack_server());
    let mut c = server.connect();
    for b in frame(&message("DRIP")) {
        c.send(&[b]);
    }
    assert_eq!(ack_of(&c.read_frame()), (AckCode::AA, "DRIP".to_owned()));
    let wire = frame(&message("SPLIT"));
    let (head, tail) = wire.split_at(wire.len() - 1); // head ends with 0x1C
    c.send(head);
    c.send(tail);
    assert_eq!(ack_of(&c.read_frame()), (AckCode::AA, "SPLIT".to_owned()));
    c.finish();
    server.stop(GRACE);
}

#[test]
fn junk_before_and_between_frames_and_an_empty_frame() {
    let server = TestServer::start(echo_server());
    let mut c = server.connect();
    let mut wire = b"garbage\r\n\x1c\x0d".to_vec();
    wire.extend(frame(b"first"));
    wire.extend(b"\r\n more junk ");
    wire.extend(frame(b""));
    wire.extend(frame(b"third"));
    c.send(&wire);
    assert_eq!(c.read_frame(), b"first");
    assert_eq!(c.read_frame(), b"");
    assert_eq!(c.read_frame(), b"third");
    c.finish();
    server.stop(GRACE);
}

#[test]
fn half_close_after_sending_still_gets_every_ack() {
    let server = TestServer::start(ack_server());
    let mut c = server.connect();
    c.send(&[frame(&message("H1")), frame(&message("H2"))].concat());
    let mut stream = c.into_stream();
    stream.shutdown(Shutdown::Write).unwrap();
    let mut all = Vec::new();
    stream
        .read_to_end(&mut all)
        .expect("read until the server closes");
    let text = String::from_utf8_lossy(&all);
    assert!(
        text.contains("MSA|AA|H1\r") && text.contains("MSA|AA|H2\r"),
        "{text}"
    );
    let stopped = server.stop(GRACE);
    let _ = stopped.events.connection_start();
    let reason = loop {
        if let crate::obs_util::Event::ConnectionStop(stop) = stopped.events.next() {
            break stop.reason;
        }
    };
    assert_eq!(reason, CloseReason::PeerClosed);
}

#[test]
fn context_reaches_the_handler() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    let server = TestServer::start(Server::builder(handler_fn(move |msg, cx| {
        record.lock().unwrap().push((
            cx.peer_addr(),
            cx.local_addr(),
            cx.connection_id(),
            cx.sequence(),
        ));
        Ok(Reply::Send(ack::accept(msg)))
    })));
    let mut c = server.connect();
    for i in 0..3 {
        c.send(&frame(&message(&format!("C{i}"))));
        c.read_frame();
    }
    let peer = c.local_addr();
    c.finish();
    let addr = server.addr;
    server.stop(GRACE);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 3);
    for (i, (p, l, id, seq)) in seen.iter().enumerate() {
        assert_eq!((*p, *l, *seq), (peer, addr, i as u64));
        assert_eq!(*id, seen[0].2, "one connection id for the connection");
    }
}

#[test]
fn all_workers_stuck_other_connections_still_served() {
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let release_rx = Mutex::new(release_rx);
    let server = TestServer::start(
        Server::builder(handler_fn(move |msg, _cx| {
            if msg.windows(5).any(|w| w == b"STUCK") {
                let _ = release_rx
                    .lock()
                    .unwrap()
                    .recv_timeout(Duration::from_secs(10));
            }
            Ok(Reply::Send(ack::accept(msg)))
        }))
        .workers(1)
        .handler_timeout(Duration::from_millis(300)),
    );
    let mut stuck = server.connect();
    stuck.send(&frame(&message("STUCK")));
    // The stuck message times out: AE, and a replacement worker serves the others.
    assert_eq!(
        ack_of(&stuck.read_frame()),
        (AckCode::AE, "STUCK".to_owned())
    );
    let mut other = server.connect();
    other.send(&frame(&message("OTHER")));
    assert_eq!(
        ack_of(&other.read_frame()),
        (AckCode::AA, "OTHER".to_owned())
    );
    // The stuck connection goes on serving too.
    stuck.send(&frame(&message("NEXT")));
    assert_eq!(
        ack_of(&stuck.read_frame()),
        (AckCode::AA, "NEXT".to_owned())
    );
    release_tx.send(()).unwrap();
    other.finish();
    stuck.finish();
    server.stop(GRACE);
}

#[test]
fn graceful_shutdown_delivers_the_in_flight_reply_then_refuses_connections() {
    let (started_tx, started_rx) = mpsc::channel::<()>();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let (started_tx, release_rx) = (Mutex::new(started_tx), Mutex::new(release_rx));
    let server = TestServer::start(Server::builder(handler_fn(move |msg, _cx| {
        started_tx.lock().unwrap().send(()).unwrap();
        let _ = release_rx
            .lock()
            .unwrap()
            .recv_timeout(Duration::from_secs(10));
        Ok(Reply::Send(ack::accept(msg)))
    })));
    let addr = server.addr;
    let mut busy = server.connect();
    busy.send(&frame(&message("INFLIGHT")));
    started_rx.recv_timeout(WAIT).expect("the handler started");
    let idle = server.connect();
    let stopper = std::thread::spawn(move || server.stop(Duration::from_secs(10)));
    // The idle connection is closed by the drain; then release the handler.
    let mut idle_stream = idle.into_stream();
    let mut rest = Vec::new();
    // EOF if the reactor had accepted it, a reset if it was still in the backlog when the
    // listener closed: either way the drain closed it (a timeout would fail here).
    match idle_stream.read_to_end(&mut rest) {
        Ok(_) => assert!(rest.is_empty()),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
    release_tx.send(()).unwrap();
    assert_eq!(
        ack_of(&busy.read_frame()),
        (AckCode::AA, "INFLIGHT".to_owned())
    );
    let stopped = stopper.join().unwrap();
    assert_eq!(stopped.report.in_flight, 1);
    assert_eq!(stopped.report.forced, 0);
    assert!(
        TcpStream::connect_timeout(&addr, WAIT).is_err(),
        "new connections are refused after shutdown"
    );
}

#[test]
fn endless_stream_without_end_block_is_closed_at_the_limit() {
    let server = TestServer::start(ack_server().max_message_size(64 * 1024));
    let mut stream = server.connect().into_stream();
    stream.write_all(b"\x0b").unwrap();
    let chunk = [b'x'; 16 * 1024];
    let mut sent = 0usize;
    // The server closes once the payload passes 64 KiB; writes then fail (reset/broken pipe).
    while sent < 64 * 1024 * 1024 {
        match stream.write(&chunk) {
            Ok(n) => sent += n,
            Err(_) => break,
        }
    }
    assert!(
        sent < 16 * 1024 * 1024,
        "the server kept reading {sent} bytes past the limit"
    );
    let stopped = server.stop(GRACE);
    let reason = loop {
        if let crate::obs_util::Event::ConnectionStop(stop) = stopped.events.next() {
            break stop.reason;
        }
    };
    assert_eq!(reason, CloseReason::MessageTooLarge);
}

#[test]
fn two_thousand_concurrent_connections_all_answered() {
    let server = TestServer::start(ack_server());
    let mut clients: Vec<Client> = (0..2000).map(|_| server.connect()).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        c.send(&frame(&message(&format!("K{i}"))));
    }
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(ack_of(&c.read_frame()), (AckCode::AA, format!("K{i}")));
    }
    drop(clients);
    server.stop(Duration::from_secs(10));
}

/// Server-side sockets of `port` still open: ESTABLISHED (01) or CLOSE_WAIT (08) entries of
/// `/proc/net/tcp` whose local port is the server's. A socket the server forgot to close
/// stays in one of these states. (Counting `/proc/self/fd` would include the fds of tests
/// running in parallel in this process.)
fn server_sockets_open(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let local = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.len() > 3
                && fields[1].ends_with(&local)
                && (fields[3] == "01" || fields[3] == "08")
        })
        .count()
}

#[test]
fn five_thousand_connect_send_close_cycles_leave_nothing_behind() {
    let server = TestServer::start(ack_server());
    for i in 0..5000 {
        let mut c = server.connect();
        c.send(&frame(&message(&format!("Z{i}"))));
        c.read_frame();
        c.finish(); // waits for the server's close: the connection is gone server-side
    }
    let open = server_sockets_open(server.addr.port());
    let stopped = server.stop(GRACE);
    assert_eq!(
        open, 0,
        "server-side sockets left open after 5000 closed connections"
    );
    let events = stopped.events.rest();
    let starts = events
        .iter()
        .filter(|e| matches!(e, crate::obs_util::Event::ConnectionStart(_)))
        .count();
    let stops = events
        .iter()
        .filter(|e| matches!(e, crate::obs_util::Event::ConnectionStop(_)))
        .count();
    assert_eq!((starts, stops), (5000, 5000));
}

#[test]
fn ipv6_loopback() {
    let Ok(server) = ack_server().bind("[::1]:0") else {
        eprintln!("::1 unavailable here; skipped");
        return;
    };
    let running = server.spawn().unwrap();
    let mut c = Client::connect(running.local_addr());
    c.send(&frame(&message("V6")));
    assert_eq!(ack_of(&c.read_frame()), (AckCode::AA, "V6".to_owned()));
    c.finish();
    running.shutdown(GRACE).unwrap();
}
