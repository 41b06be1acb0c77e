//! The reply path: inline and pooled handlers, deferred replies, pipelining in order, and the
//! hardening of the job queue, deadlines and closes.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mllp_reactor::ack::{self, AckCode};
use mllp_reactor::telemetry::names;
use mllp_reactor::{Dispatch, Reply, ReplyHandle, Server, handler_fn};

use crate::support::{
    self, Event, IO_TIMEOUT, Peer, WAIT, accepting, assert_ack, control_id, frame, gate, message,
    start, start_with_own_observer,
};

/// Reads `n` frames and returns their control ids (MSA-2) in order.
#[track_caller]
fn read_acks(peer: &mut Peer, n: usize) -> Vec<(AckCode, String)> {
    (0..n)
        .map(|_| {
            let reply = peer.read_frame();
            let parsed = ack::parse(&reply).expect("an ACK");
            (
                parsed.code,
                String::from_utf8_lossy(parsed.control_id).into_owned(),
            )
        })
        .collect()
}

#[test]
fn deferred_replies_completed_out_of_order_from_several_threads_are_written_in_order() {
    const N: usize = 40;
    let (tx, rx) = mpsc::channel::<(ReplyHandle, bytes::Bytes)>();
    let tx = Mutex::new(tx);
    let handler = handler_fn(move |msg, cx| {
        tx.lock().unwrap().send((cx.defer(), msg.clone())).unwrap();
        Ok(Reply::Deferred)
    });
    let server = start(Server::builder(handler).dispatch(Dispatch::Inline));
    let mut peer = server.connect();
    let mut wire = Vec::new();
    for i in 0..N {
        wire.extend(frame(&message(&format!("D{i}"))));
    }
    peer.send(&wire);
    // Collect every handle (all N are in flight at once: max_in_flight 64), then complete
    // them in reverse order from four threads.
    let mut pending: Vec<_> = (0..N)
        .map(|_| rx.recv_timeout(WAIT).expect("dispatched"))
        .collect();
    pending.reverse();
    let mut chunks: Vec<Vec<_>> = (0..4).map(|_| Vec::new()).collect();
    for (i, item) in pending.into_iter().enumerate() {
        chunks[i % 4].push(item);
    }
    let threads: Vec<_> = chunks
        .into_iter()
        .map(|chunk| {
            std::thread::spawn(move || {
                for (handle, msg) in chunk {
                    handle.send(Reply::Send(ack::accept(&msg)));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let acks = read_acks(&mut peer, N);
    let want: Vec<_> = (0..N).map(|i| (AckCode::AA, format!("D{i}"))).collect();
    assert_eq!(acks, want);
    server.stop();
}

#[test]
fn a_dropped_reply_handle_gets_an_ae() {
    let handler = handler_fn(|_msg, cx| {
        drop(cx.defer());
        Ok(Reply::Deferred)
    });
    let server = start(Server::builder(handler).dispatch(Dispatch::Pool));
    let mut peer = server.connect();
    let reply = peer.roundtrip(&message("DROP1"));
    assert_ack(&reply, AckCode::AE, "DROP1");
    server.stop();
}

#[test]
fn deferred_without_a_handle_gets_an_ae_at_once() {
    let handler = handler_fn(|_msg, _cx| Ok(Reply::Deferred));
    let server = start(
        Server::builder(handler)
            .dispatch(Dispatch::Inline)
            .handler_timeout(Duration::from_secs(3600)),
    );
    let mut peer = server.connect();
    let reply = peer.roundtrip(&message("NOHANDLE"));
    assert_ack(&reply, AckCode::AE, "NOHANDLE");
    server.stop();
}

#[test]
fn a_completion_after_the_deadline_is_counted_and_never_written() {
    let (tx, rx) = mpsc::channel::<(ReplyHandle, bytes::Bytes)>();
    let tx = Mutex::new(tx);
    let handler = handler_fn(move |msg, cx| {
        tx.lock().unwrap().send((cx.defer(), msg.clone())).unwrap();
        Ok(Reply::Deferred)
    });
    let server = start(
        Server::builder(handler)
            .dispatch(Dispatch::Inline)
            .handler_timeout(Duration::from_millis(200)),
    );
    let mut peer = server.connect();
    peer.send(&frame(&message("LATE1")));
    let (handle, msg) = rx.recv_timeout(WAIT).expect("dispatched");
    // The deadline answers with AE first.
    assert_ack(&peer.read_frame(), AckCode::AE, "LATE1");
    handle.send(Reply::Send(ack::accept(&msg)));
    assert_eq!(server.wait_counter(names::LATE_RESULTS, &[], 1), 1);
    // The late AA never reaches the wire: the next reply is the next message's.
    peer.send(&frame(&message("NEXT")));
    let (handle, msg) = rx.recv_timeout(WAIT).expect("dispatched");
    handle.send(Reply::Send(ack::accept(&msg)));
    assert_ack(&peer.read_frame(), AckCode::AA, "NEXT");
    server.stop();
}

#[test]
fn a_thousand_pipelined_messages_in_one_write_get_in_order_acks_in_few_writes() {
    const N: usize = 1000;
    let handler = handler_fn(|msg, _cx| Ok(Reply::Send(ack::accept(msg))));
    let server = start(Server::builder(handler).dispatch(Dispatch::Inline));
    let mut peer = server.connect();
    let mut wire = Vec::new();
    for i in 0..N {
        wire.extend(frame(&message(&format!("P{i}"))));
    }
    // One write; a reader thread keeps up so neither side blocks on full buffers.
    let mut writer = peer.stream.try_clone().unwrap();
    let sender = std::thread::spawn(move || writer.write_all(&wire).unwrap());
    let acks = read_acks(&mut peer, N);
    sender.join().unwrap();
    let want: Vec<_> = (0..N).map(|i| (AckCode::AA, format!("P{i}"))).collect();
    assert_eq!(acks, want);
    let writes = server.metrics().counter(names::SOCKET_WRITES, &[]);
    assert!(
        writes <= (N / 10) as u64,
        "{writes} writes for {N} replies: replies are not batched"
    );
    server.stop();
}

#[test]
fn at_max_in_flight_reading_stops_and_memory_stays_bounded() {
    const IN_FLIGHT: usize = 4;
    let held = Arc::new(Mutex::new(Vec::<ReplyHandle>::new()));
    let calls = Arc::new(AtomicUsize::new(0));
    let (h, c) = (Arc::clone(&held), Arc::clone(&calls));
    let handler = handler_fn(move |_msg, cx| {
        c.fetch_add(1, Ordering::SeqCst);
        h.lock().unwrap().push(cx.defer());
        Ok(Reply::Deferred)
    });
    let server = start(
        Server::builder(handler)
            .dispatch(Dispatch::Inline)
            .max_in_flight(IN_FLIGHT)
            .read_ahead(16 * 1024)
            .handler_timeout(Duration::from_secs(3600)),
    );
    let mut stream = TcpStream::connect(server.addr).unwrap();
    stream
        .set_write_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    // Write until the kernel buffers fill: the server must stop reading, so a write times out.
    let message = frame(&message("FLOOD"));
    let deadline = Instant::now() + WAIT;
    let mut sent = 0usize;
    loop {
        match stream.write(&message) {
            Ok(n) => sent += n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break;
            }
            Err(e) => panic!("write: {e}"),
        }
        assert!(
            Instant::now() < deadline,
            "the server kept reading {sent} bytes"
        );
    }
    support::wait_until("the handler got max_in_flight messages", || {
        calls.load(Ordering::SeqCst) >= IN_FLIGHT
    });
    assert_eq!(
        calls.load(Ordering::SeqCst),
        IN_FLIGHT,
        "no more than max_in_flight dispatched"
    );
    let buffered = server.metrics().gauge(names::BUFFERED_BYTES);
    // In flight: 4 messages; read ahead: 16 KiB plus one 64 KiB read.
    let bound = (IN_FLIGHT * message.len() + 16 * 1024 + 64 * 1024) as f64 * 2.0;
    assert!(
        buffered > 0.0 && buffered <= bound,
        "buffered {buffered} > {bound}"
    );
    // Answering the held messages lets reading resume.
    for handle in held.lock().unwrap().drain(..) {
        handle.send(Reply::NoReply);
    }
    support::wait_until("reading resumed", || {
        calls.load(Ordering::SeqCst) > IN_FLIGHT
    });
    drop(stream);
    held.lock().unwrap().clear();
    server.stop();
}

#[test]
fn pool_mode_stays_strictly_serial() {
    // Records, per message, when its handler started and when the previous reply was read.
    let active = Arc::new(AtomicUsize::new(0));
    let overlap = Arc::new(AtomicUsize::new(0));
    let (a, o) = (Arc::clone(&active), Arc::clone(&overlap));
    let handler = handler_fn(move |msg, _cx| {
        if a.fetch_add(1, Ordering::SeqCst) != 0 {
            o.fetch_add(1, Ordering::SeqCst);
        }
        std::thread::sleep(Duration::from_millis(1));
        a.fetch_sub(1, Ordering::SeqCst);
        Ok(Reply::Send(ack::accept(msg)))
    });
    let mut server = start(Server::builder(handler).dispatch(Dispatch::Pool).workers(4));
    let mut peer = server.connect();
    let mut wire = Vec::new();
    for i in 0..20 {
        wire.extend(frame(&message(&format!("S{i}"))));
    }
    peer.send(&wire);
    let acks = read_acks(&mut peer, 20);
    let want: Vec<_> = (0..20).map(|i| (AckCode::AA, format!("S{i}"))).collect();
    assert_eq!(acks, want);
    assert_eq!(
        overlap.load(Ordering::SeqCst),
        0,
        "handler calls overlapped"
    );
    // Strictly serial: each message starts only after the previous one stopped.
    server.events.wait_count("20 message stops", 20, |e| {
        matches!(e, Event::MessageStop(_))
    });
    let mut last = None;
    for event in server.events.of(peer.local_addr()) {
        match event {
            Event::MessageStart(start) => {
                let seq = start.sequence;
                assert_eq!(last, seq.checked_sub(1), "message {seq} started early");
            }
            Event::MessageStop(stop) => last = Some(stop.sequence),
            _ => {}
        }
    }
    server.stop();
}

#[test]
fn issue_9_jobs_of_closed_connections_never_run() {
    let (gate, control) = gate();
    let ran = Arc::new(Mutex::new(Vec::<String>::new()));
    let r = Arc::clone(&ran);
    let handler = handler_fn(move |msg, _| {
        let id = control_id(msg);
        r.lock().unwrap().push(id.clone());
        if id == "STUCK" {
            gate.block();
        }
        Ok(Reply::Send(ack::accept(msg)))
    });
    let server = start(
        Server::builder(handler)
            .dispatch(Dispatch::Pool)
            .workers(1)
            .max_extra_workers(0),
    );
    let mut stuck = server.connect();
    stuck.send(&frame(&message("STUCK")));
    control.wait_entered();
    for i in 0..20 {
        let mut peer = server.connect();
        peer.send(&frame(&message(&format!("GONE{i}"))));
        // The sender resets before its message runs.
        socket2::Socket::from(peer.stream)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
    }
    assert_eq!(server.wait_counter(names::JOBS_DROPPED, &[], 20), 20);
    control.release();
    assert_ack(&stuck.read_frame(), AckCode::AA, "STUCK");
    // A live connection is served next, and nothing of the closed ones ran.
    let mut live = server.connect();
    assert_ack(&live.roundtrip(&message("LIVE")), AckCode::AA, "LIVE");
    assert_eq!(
        *ran.lock().unwrap(),
        vec!["STUCK".to_owned(), "LIVE".to_owned()]
    );
    server.stop();
}

#[test]
fn issue_9_duration_max_means_no_timeout() {
    let server = start(
        Server::builder(accepting())
            .idle_timeout(Duration::MAX)
            .frame_timeout(Duration::MAX)
            .handler_timeout(Duration::MAX)
            .write_timeout(Duration::MAX),
    );
    let mut peer = server.connect();
    assert_ack(&peer.roundtrip(&message("MAX1")), AckCode::AA, "MAX1");
    let report = server.stop_within(Duration::MAX).report;
    assert_eq!(report.forced, 0);
}

#[test]
fn issue_9_the_oversize_nak_survives_a_sender_that_keeps_sending() {
    let server = start(Server::builder(accepting()).max_message_size(64 * 1024));
    let mut stream = TcpStream::connect(server.addr).unwrap();
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut writer = stream.try_clone().unwrap();
    // A sender that streams a 4 MiB message and does not read until it is done writing (or
    // cut off): the AR must reach it intact, not be destroyed by a reset.
    let sender = std::thread::spawn(move || {
        let mut msg = message("BIG");
        msg.truncate(msg.len() - 1);
        let _ = writer.write_all(&[0x0b]);
        let _ = writer.write_all(&msg);
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..64 {
            if writer.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    let mut reply = Vec::new();
    let result = stream.read_to_end(&mut reply);
    sender.join().unwrap();
    assert!(
        result.is_ok(),
        "read failed ({result:?}) after {} bytes",
        reply.len()
    );
    let body = reply
        .strip_prefix(&[0x0b])
        .and_then(|r| r.strip_suffix(&[0x1c, 0x0d]))
        .expect("one complete frame");
    assert_ack(body, AckCode::AR, "BIG");
    server.stop();
}

/// A handle dropped by a server that stopped is harmless.
#[test]
fn a_handle_outliving_its_server_is_harmless() {
    let (tx, rx) = mpsc::channel::<ReplyHandle>();
    let tx = Mutex::new(tx);
    let handler = handler_fn(move |_msg, cx| {
        tx.lock().unwrap().send(cx.defer()).unwrap();
        Ok(Reply::Deferred)
    });
    let server = start(Server::builder(handler).dispatch(Dispatch::Inline));
    let mut peer = server.connect();
    peer.send(&frame(&message("ORPHAN")));
    let handle = rx.recv_timeout(WAIT).unwrap();
    server.stop_within(Duration::from_millis(100));
    handle.send(Reply::NoReply);
}

#[test]
fn a_panicking_observer_is_counted_and_the_server_goes_on() {
    struct Panics;
    impl mllp_reactor::Observer for Panics {
        fn message_start(&self, _: &mllp_reactor::MessageStart) {
            panic!("observer bug");
        }
    }
    let server = start_with_own_observer(Server::builder(accepting()).observer(Panics));
    let mut peer = server.connect();
    assert_ack(&peer.roundtrip(&message("OBS1")), AckCode::AA, "OBS1");
    assert_ack(&peer.roundtrip(&message("OBS2")), AckCode::AA, "OBS2");
    assert_eq!(server.wait_counter(names::OBSERVER_PANICS, &[], 2), 2);
    server.stop();
}

#[test]
fn issue_9_an_error_whose_display_panics_still_gets_an_ae_and_frees_the_worker() {
    #[derive(Debug)]
    struct Evil;
    impl std::fmt::Display for Evil {
        fn fmt(&self, _: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            panic!("Display of a handler error panicked")
        }
    }
    impl std::error::Error for Evil {}
    let handler = handler_fn(|msg, _| {
        if control_id(msg) == "EVIL" {
            Err(Box::new(Evil))
        } else {
            Ok(Reply::Send(ack::accept(msg)))
        }
    });
    let server = start(Server::builder(handler).dispatch(Dispatch::Pool).workers(1));
    let mut peer = server.connect();
    assert_ack(&peer.roundtrip(&message("EVIL")), AckCode::AE, "EVIL");
    // The only worker is still alive and serving.
    assert_ack(&peer.roundtrip(&message("NEXT")), AckCode::AA, "NEXT");
    let report = server.stop().report;
    assert_eq!(report.workers_stuck, 0);
}

#[test]
fn issue_9_a_failure_without_a_readable_msh_is_counted_as_the_ar_it_is() {
    let handler = handler_fn(|_msg, _| Err("no".into()));
    let server = start(Server::builder(handler));
    let mut peer = server.connect();
    let reply = peer.roundtrip(b"not an HL7 message");
    assert_eq!(ack::parse(&reply).unwrap().code, AckCode::AR);
    let metrics = server.stop().metrics;
    assert_eq!(metrics.counter(names::NAKS_SENT, &[("code", "AR")]), 1);
    assert_eq!(metrics.counter(names::NAKS_SENT, &[("code", "AE")]), 0);
}

/// An observer's `message_events` (asked once, at bind) decides which per-message events it
/// gets; connection events, exceptions and the metrics do not depend on it, and the events it
/// gets keep their order. `serve`'s log observer asks for `FirstStart` below debug.
#[test]
fn an_observer_gets_the_message_events_it_asks_for() {
    use mllp_reactor::{
        ConnectionStart, ConnectionStop, MessageEvents, MessageException, MessageStart,
        MessageStop, Observer,
    };
    struct Picky(MessageEvents, mpsc::Sender<String>);
    impl Observer for Picky {
        fn connection_start(&self, _: &ConnectionStart) {
            let _ = self.1.send("connection_start".to_owned());
        }
        fn connection_stop(&self, _: &ConnectionStop) {
            let _ = self.1.send("connection_stop".to_owned());
        }
        fn message_start(&self, e: &MessageStart) {
            let _ = self.1.send(format!("start {}", e.sequence));
        }
        fn message_stop(&self, e: &MessageStop) {
            let _ = self.1.send(format!("stop {}", e.sequence));
        }
        fn message_exception(&self, e: &MessageException<'_>) {
            let _ = self.1.send(format!("exception {:?}", e.sequence));
        }
        fn message_events(&self) -> MessageEvents {
            self.0
        }
    }
    let all = [
        "connection_start",
        "start 0",
        "stop 0",
        "start 1",
        "stop 1",
        "start 2",
        "exception Some(2)",
        "start 3",
        "stop 3",
        "connection_stop",
    ];
    let first = [
        "connection_start",
        "start 0",
        "exception Some(2)",
        "connection_stop",
    ];
    let none = ["connection_start", "exception Some(2)", "connection_stop"];
    for dispatch in [Dispatch::Inline, Dispatch::Pool] {
        for (asked, want) in [
            (MessageEvents::All, &all[..]),
            (MessageEvents::FirstStart, &first[..]),
            (MessageEvents::None, &none[..]),
        ] {
            let (tx, rx) = mpsc::channel();
            let handler = handler_fn(|msg, _| match control_id(msg).as_str() {
                "ERR" => Err("refused".into()),
                _ => Ok(Reply::Send(ack::accept(msg))),
            });
            let server = start_with_own_observer(
                Server::builder(handler)
                    .dispatch(dispatch)
                    .observer(Picky(asked, tx)),
            );
            let mut peer = server.connect();
            assert_ack(&peer.roundtrip(&message("M0")), AckCode::AA, "M0");
            assert_ack(&peer.roundtrip(&message("M1")), AckCode::AA, "M1");
            assert_ack(&peer.roundtrip(&message("ERR")), AckCode::AE, "ERR");
            assert_ack(&peer.roundtrip(&message("M3")), AckCode::AA, "M3");
            drop(peer);
            let mut got = Vec::new();
            while got.last().map(String::as_str) != Some("connection_stop") {
                got.push(rx.recv_timeout(WAIT).expect("the connection's events"));
            }
            let stopped = server.stop();
            got.extend(rx.try_iter());
            assert_eq!(got, want, "{dispatch:?}, {asked:?}");
            // Metrics: every message, whatever the observer asked for.
            let m = &stopped.metrics;
            assert_eq!(m.counter(names::MESSAGES_RECEIVED, &[]), 4);
            assert_eq!(m.histogram(names::MESSAGE_SIZE).len(), 4);
            assert_eq!(m.histogram(names::RESPONSE_LATENCY).len(), 3);
            assert_eq!(m.histogram(names::HANDLER_DURATION).len(), 4);
        }
    }
}
