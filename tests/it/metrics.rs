//! Metrics over loopback: one scenario per test, one `DebuggingRecorder` snapshot after the
//! shutdown, and an exact expectation of which metrics moved by how much (every other one
//! must read zero). The recorder captures the handles at `bind()` through
//! `with_local_recorder`, so values recorded on the reactor and worker threads land in it
//! without a global install and tests stay independent of each other.
//!
//! Waits are signals (replies, EOF, observer events through a channel), each bounded by
//! `obs_util::WAIT`; the only deliberate delays are the small server timeouts under test.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use metrics::Unit;
use mllp_reactor::ack::{self, AckCode};
use mllp_reactor::telemetry::names::*;
use mllp_reactor::{CloseReason, Handler, Reply, Server, handler_fn};

use crate::obs_util::{
    Event, Expected, GRACE, Recorded, TestServer, WAIT, ack_of, closed, frame, message, secs,
};

fn ack_handler() -> impl Handler {
    handler_fn(|msg, _| Ok(Reply::Send(ack::accept(msg))))
}

/// Reads the next event until the connection stop, returning it (the other events of the
/// scenario are checked by the observer tests).
#[track_caller]
fn wait_stop(server: &TestServer) -> mllp_reactor::ConnectionStop {
    loop {
        if let Event::ConnectionStop(stop) = server.events.next() {
            return stop;
        }
    }
}

/// A handler that blocks on messages whose payload contains `STUCK` until released (bounded),
/// and acknowledges everything else at once.
fn stuck_handler() -> (impl Handler, mpsc::Sender<()>) {
    let (release, released) = mpsc::channel::<()>();
    let released = Mutex::new(released);
    let handler = handler_fn(move |msg, _| {
        if msg.windows(5).any(|w| w == b"STUCK") {
            // Bounded: a test that fails early must not leave the worker blocked forever.
            let _ = released.lock().unwrap().recv_timeout(4 * WAIT);
        }
        Ok(Reply::Send(ack::accept(msg)))
    });
    (handler, release)
}

#[test]
fn every_metric_is_registered_at_bind_with_listener_label_unit_and_description() {
    let server = TestServer::start(Server::builder(ack_handler()));
    let stopped = server.stop(GRACE);
    // Nothing happened: every metric reads zero.
    stopped.metrics.assert_exactly(&Expected::new());

    let m = &stopped.metrics;
    for metric in &m.0 {
        assert!(metric.has_description, "{} has no description", metric.name);
        let want = match metric.name.as_str() {
            CONNECTION_DURATION | HANDLER_QUEUE | HANDLER_DURATION | RESPONSE_LATENCY => {
                Some(Unit::Seconds)
            }
            MESSAGE_SIZE | RESPONSE_SIZE | BYTES_RECEIVED | BYTES_SENT | JUNK_BYTES
            | BUFFERED_BYTES => Some(Unit::Bytes),
            _ => None,
        };
        assert_eq!(metric.unit, want, "unit of {}", metric.name);
    }
    let label_values = |name: &str, key: &str| {
        let mut values: Vec<String> =
            m.0.iter()
                .filter(|x| x.name == name)
                .map(|x| {
                    assert_eq!(x.labels.len(), 1, "{name} labels {:?}", x.labels);
                    assert_eq!(x.labels[0].0, key, "{name} label key");
                    x.labels[0].1.clone()
                })
                .collect();
        values.sort();
        values
    };
    let mut reasons: Vec<String> = CloseReason::ALL
        .iter()
        .map(|r| r.as_str().to_owned())
        .collect();
    reasons.sort();
    assert_eq!(label_values(CONNECTIONS_CLOSED, "reason"), reasons);
    assert_eq!(
        label_values(CONNECTIONS_REJECTED, "reason"),
        [
            "handshake_timeout",
            "max_connections",
            "not_allowed",
            "proxy_header"
        ]
    );
    assert_eq!(
        label_values(MESSAGES_HANDLED, "outcome"),
        ["error", "no_reply", "panic", "reply", "timeout"]
    );
    assert_eq!(
        label_values(FRAMES_REJECTED, "reason"),
        ["frame_timeout", "too_large"]
    );
    assert_eq!(label_values(NAKS_SENT, "code"), ["AE", "AR"]);
    // Unlabelled families (besides `listener`) are registered once.
    for name in [
        CONNECTIONS_ACCEPTED,
        CONNECTIONS_ACTIVE,
        CONNECTION_DURATION,
        MESSAGES_RECEIVED,
        MESSAGE_SIZE,
        RESPONSE_SIZE,
        HANDLER_QUEUE,
        HANDLER_DURATION,
        RESPONSE_LATENCY,
        BYTES_RECEIVED,
        BYTES_SENT,
        JUNK_BYTES,
        LATE_RESULTS,
        WORKERS_REPLACED,
        WORKERS_BUSY,
    ] {
        let n = m.0.iter().filter(|x| x.name == name).count();
        assert_eq!(n, 1, "{name} registered {n} times");
        assert!(m.0.iter().all(|x| x.name != name || x.labels.is_empty()));
    }
}

#[test]
fn accepted_message_moves_each_metric_once() {
    let server = TestServer::start(Server::builder(ack_handler()));
    let payload = message("M1");
    let mut client = server.connect();
    client.send(&frame(&payload));
    let reply = client.read_frame();
    assert_eq!(ack_of(&reply), (AckCode::AA, "M1".to_owned()));
    client.finish();
    let stopped = server.stop(GRACE);

    let expected = Expected::new()
        .counter(CONNECTIONS_ACCEPTED, &[], 1)
        .counter(MESSAGES_RECEIVED, &[], 1)
        .counter(MESSAGES_HANDLED, &[("outcome", "reply")], 1)
        .counter(BYTES_RECEIVED, &[], payload.len() as u64 + 3)
        .counter(BYTES_SENT, &[], reply.len() as u64 + 3)
        .samples(MESSAGE_SIZE, &[payload.len() as f64])
        .samples(RESPONSE_SIZE, &[reply.len() as f64])
        .handled_timings(1)
        .durations(RESPONSE_LATENCY, 1)
        .counter(CONNECTIONS_CLOSED, &closed(CloseReason::PeerClosed), 1)
        .durations(CONNECTION_DURATION, 1)
        .gauge(CONNECTIONS_ACTIVE, 0.0)
        .gauge(WORKERS_BUSY, 0.0);
    stopped.metrics.assert_exactly(&expected);
    assert_eq!(
        stopped.report.closed, 0,
        "the connection closed before the shutdown"
    );
}

#[test]
fn idle_timeout_closes_with_its_reason() {
    let idle = Duration::from_millis(300);
    let server = TestServer::start(Server::builder(ack_handler()).idle_timeout(idle));
    let mut client = server.connect();
    assert!(client.read_to_eof().is_empty());
    let stopped = server.stop(GRACE);

    let expected = Expected::new()
        .counter(CONNECTIONS_ACCEPTED, &[], 1)
        .counter(CONNECTIONS_CLOSED, &closed(CloseReason::IdleTimeout), 1)
        .durations(CONNECTION_DURATION, 1);
    stopped.metrics.assert_exactly(&expected);
    let lifetime = stopped.metrics.histogram(CONNECTION_DURATION)[0];
    assert!(
        lifetime >= secs(idle),
        "closed after {lifetime} s, before the idle timeout"
    );
}

#[test]
fn frame_timeout_rejects_the_frame_and_closes() {
    let limit = Duration::from_millis(300);
    let server = TestServer::start(Server::builder(ack_handler()).frame_timeout(limit));
    let partial = &frame(&message("SLOW"))[..20];
    let mut client = server.connect();
    client.send(partial);
    assert!(client.read_to_eof().is_empty());
    let stopped = server.stop(GRACE);

    let expected = Expected::new()
        .counter(CONNECTIONS_ACCEPTED, &[], 1)
        .counter(BYTES_RECEIVED, &[], partial.len() as u64)
        .counter(FRAMES_REJECTED, &[("reason", "frame_timeout")], 1)
        .counter(CONNECTIONS_CLOSED, &closed(CloseReason::FrameTimeout), 1)
        .durations(CONNECTION_DURATION, 1);
    stopped.metrics.assert_exactly(&expected);
    let lifetime = stopped.metrics.histogram(CONNECTION_DURATION)[0];
    assert!(
        lifetime >= secs(limit),
        "closed after {lifetime} s, before the frame deadline"
    );
}

/// A message over `max` bytes whose MSH-10 is `control_id` (readable early in the frame).
fn oversize_message(control_id: &str, max: usize) -> Vec<u8> {
    let mut payload = message(control_id);
    payload.extend_from_slice(b"OBX|1|TX|||");
    payload.resize(payload.len() + 2 * max, b'x');
    payload.push(b'\r');
    payload
}

#[test]
fn oversize_frame_sends_ar_nak_and_closes() {
    let max = 100;
    let server = TestServer::start(Server::builder(ack_handler()).max_message_size(max));
    let framed = frame(&oversize_message("BIG", max));
    let mut client = server.connect();
    client.send(&framed);
    let nak = client.read_frame();
    assert_eq!(ack_of(&nak), (AckCode::AR, "BIG".to_owned()));
    assert!(client.read_to_eof().is_empty());
    let stopped = server.stop(GRACE);

    // The rest of the rejected frame is discarded with the connection: not counted as junk.
    let expected = Expected::new()
        .counter(CONNECTIONS_ACCEPTED, &[], 1)
        .counter(BYTES_RECEIVED, &[], framed.len() as u64)
        .counter(BYTES_SENT, &[], nak.len() as u64 + 3)
        .counter(FRAMES_REJECTED, &[("reason", "too_large")], 1)
        .counter(NAKS_SENT, &[("code", "AR")], 1)
        .counter(CONNECTIONS_CLOSED, &closed(CloseReason::MessageTooLarge), 1)
        .durations(CONNECTION_DURATION, 1);
    stopped.metrics.assert_exactly(&expected);
}

#[test]
fn reset_by_peer_closes_with_io_error() {
    let server = TestServer::start(Server::builder(ack_handler()));
    let payload = message("R1");
    let mut client = server.connect();
    client.send(&frame(&payload));
    // Wait for the ACK without reading it: closing a socket with unread data sends a RST.
    client.wait_readable();
    drop(client.into_stream());
    let stop = wait_stop(&server);
    assert_eq!(
        stop.reason,
        CloseReason::Io(std::io::ErrorKind::ConnectionReset)
    );
    let stopped = server.stop(GRACE);

    let ack_len = ack::accept(&payload).len();
    let expected = Expected::new()
        .counter(CONNECTIONS_ACCEPTED, &[], 1)
        .counter(MESSAGES_RECEIVED, &[], 1)
        .counter(MESSAGES_HANDLED, &[("outcome", "reply")], 1)
        .counter(BYTES_RECEIVED, &[], payload.len() as u64 + 3)
        .counter(BYTES_SENT, &[], ack_len as u64 + 3)
        .samples(MESSAGE_SIZE, &[payload.len() as f64])
        .samples(RESPONSE_SIZE, &[ack_len as f64])
        .handled_timings(1)
        .durations(RESPONSE_LATENCY, 1)
        .counter(CONNECTIONS_CLOSED, &closed(stop.reason), 1)
        .durations(CONNECTION_DURATION, 1);
    stopped.metrics.assert_exactly(&expected);
}

#[test]
fn peer_that_stops_reading_closes_with_write_stalled() {
    // Far more than loopback socket buffers hold, so the write stalls.
    let big = Bytes::from(vec![b'x'; 32 << 20]);
    let reply = big.clone();
    let handler = handler_fn(move |_, _| Ok(Reply::Send(reply.clone())));
    let stall = Duration::from_millis(300);
    let server = TestServer::start(Server::builder(handler).write_timeout(stall));
    let payload = message("W1");
    let mut client = server.connect();
    client.send(&frame(&payload));
    let stop = wait_stop(&server);
    assert_eq!(stop.reason, CloseReason::WriteStalled);
    // The server closed gracefully (it had read everything we sent): every byte it wrote
    // reaches us before EOF, so what we read is exactly what it counted as sent.
    let delivered = client.read_to_eof();
    assert!(!delivered.is_empty() && delivered.len() < big.len() + 3);
    let stopped = server.stop(GRACE);

    // The reply was never fully written: no message stop, so no response size or latency.
    let expected = Expected::new()
        .counter(CONNECTIONS_ACCEPTED, &[], 1)
        .counter(MESSAGES_RECEIVED, &[], 1)
        .counter(MESSAGES_HANDLED, &[("outcome", "reply")], 1)
        .counter(BYTES_RECEIVED, &[], payload.len() as u64 + 3)
        .counter(BYTES_SENT, &[], delivered.len() as u64)
        .samples(MESSAGE_SIZE, &[payload.len() as f64])
        .handled_timings(1)
        .counter(CONNECTIONS_CLOSED, &closed(CloseReason::WriteStalled), 1)
        .durations(CONNECTION_DURATION, 1);
    stopped.metrics.assert_exactly(&expected);
}

#[test]
fn shutdown_closes_idle_connection_with_its_reason() {
    let server = TestServer::start(Server::builder(ack_handler()));
    let mut client = server.connect();
    server.events.connection_start();
    let stopped = server.stop(GRACE);
    assert!(client.read_to_eof().is_empty());
    assert_eq!(
        (
            stopped.report.closed,
            stopped.report.forced,
            stopped.report.in_flight
        ),
        (1, 0, 0)
    );

    let expected = Expected::new()
        .counter(CONNECTIONS_ACCEPTED, &[], 1)
        .counter(CONNECTIONS_CLOSED, &closed(CloseReason::Shutdown), 1)
        .durations(CONNECTION_DURATION, 1);
    stopped.metrics.assert_exactly(&expected);
}

#[test]
fn send_and_close_closes_by_handler_after_the_reply() {
    let handler = handler_fn(|msg, _| Ok(Reply::SendAndClose(ack::accept(msg))));
    let server = TestServer::start(Server::builder(handler));
    let payload = message("C1");
    let mut client = server.connect();
    client.send(&frame(&payload));
    let reply = client.read_frame();
    assert_eq!(ack_of(&reply).0, AckCode::AA);
    assert!(client.read_to_eof().is_empty());
    let stopped = server.stop(GRACE);

    let expected = Expected::new()
        .counter(CONNECTIONS_ACCEPTED, &[], 1)
        .counter(MESSAGES_RECEIVED, &[], 1)
        .counter(MESSAGES_HANDLED, &[("outcome", "reply")], 1)
        .counter(BYTES_RECEIVED, &[], payload.len() as u64 + 3)
        .counter(BYTES_SENT, &[], reply.len() as u64 + 3)
        .samples(MESSAGE_SIZE, &[payload.len() as f64])
        .samples(RESPONSE_SIZE, &[reply.len() as f64])
        .handled_timings(1)
        .durations(RESPONSE_LATENCY, 1)
        .counter(CONNECTIONS_CLOSED, &closed(CloseReason::ClosedByHandler), 1)
        .durations(CONNECTION_DURATION, 1);
    stopped.metrics.assert_exactly(&expected);
}

#[test]
fn no_reply_then_close_counts_no_reply_and_sends_nothing() {
    let handler = handler_fn(|msg, _| {
        Ok(if msg.windows(5).any(|w| w == b"CLOSE") {
            Reply::Close
        } else {
            Reply::NoReply
        })
    });
    let server = TestServer::start(Server::builder(handler));
    let (first, second) = (message("QUIET"), message("CLOSE"));
    let mut sent = frame(&first);
    sent.extend_from_slice(&frame(&second));
    let mut client = server.connect();
    client.send(&sent);
    assert!(client.read_to_eof().is_empty(), "no reply expected");
    let stopped = server.stop(GRACE);

    // A message stop without a reply: latency is recorded, response size is not.
    let expected = Expected::new()
        .counter(CONNECTIONS_ACCEPTED, &[], 1)
        .counter(MESSAGES_RECEIVED, &[], 2)
        .counter(MESSAGES_HANDLED, &[("outcome", "no_reply")], 2)
        .counter(BYTES_RECEIVED, &[], sent.len() as u64)
        .samples(MESSAGE_SIZE, &[first.len() as f64, second.len() as f64])
        .handled_timings(2)
        .durations(RESPONSE_LATENCY, 2)
        .counter(CONNECTIONS_CLOSED, &closed(CloseReason::ClosedByHandler), 1)
        .durations(CONNECTION_DURATION, 1);
    stopped.metrics.assert_exactly(&expected);
}

#[test]
fn connection_over_the_cap_is_rejected_and_counted_apart() {
    let server = TestServer::start(Server::builder(ack_handler()).max_connections(1));
    let first = server.connect();
    server.events.connection_start();
    let mut second = server.connect();
    assert!(
        second.read_to_eof().is_empty(),
        "a rejected connection is closed at once"
    );
    first.finish();
    let stopped = server.stop(GRACE);

    // A rejected connection is counted only in `connections_rejected_total`: never accepted,
    // never active, so `closed_total{reason="rejected"}` stays 0 and
    // accepted = Σ closed + active holds.
    let expected = Expected::new()
        .counter(CONNECTIONS_ACCEPTED, &[], 1)
        .counter(CONNECTIONS_REJECTED, &[("reason", "max_connections")], 1)
        .counter(CONNECTIONS_CLOSED, &closed(CloseReason::PeerClosed), 1)
        .durations(CONNECTION_DURATION, 1);
    stopped.metrics.assert_exactly(&expected);
}

#[test]
fn junk_outside_frames_is_counted_exactly() {
    let server = TestServer::start(Server::builder(ack_handler()));
    let (m1, m2) = (message("J1"), message("J2"));
    let mut sent = b"junk".to_vec(); // 4 before the first SB
    sent.extend_from_slice(&frame(&m1));
    sent.extend_from_slice(b"\x1c\x0d"); // 2: a lone trailer
    sent.extend_from_slice(b"more"); // 4 between frames
    sent.extend_from_slice(&frame(&m2));
    sent.extend_from_slice(b"tail!"); // 5 after the last frame
    let junk = 4 + 2 + 4 + 5;
    let mut client = server.connect();
    client.send(&sent);
    let a1 = client.read_frame();
    let a2 = client.read_frame();
    assert_eq!(ack_of(&a1), (AckCode::AA, "J1".to_owned()));
    assert_eq!(ack_of(&a2), (AckCode::AA, "J2".to_owned()));
    client.finish();
    let stopped = server.stop(GRACE);

    let expected = Expected::new()
        .counter(CONNECTIONS_ACCEPTED, &[], 1)
        .counter(MESSAGES_RECEIVED, &[], 2)
        .counter(MESSAGES_HANDLED, &[("outcome", "reply")], 2)
        .counter(BYTES_RECEIVED, &[], sent.len() as u64)
        .counter(BYTES_SENT, &[], (a1.len() + a2.len()) as u64 + 6)
        .counter(JUNK_BYTES, &[], junk)
        .samples(MESSAGE_SIZE, &[m1.len() as f64, m2.len() as f64])
        .samples(RESPONSE_SIZE, &[a1.len() as f64, a2.len() as f64])
        .handled_timings(2)
        .durations(RESPONSE_LATENCY, 2)
        .counter(CONNECTIONS_CLOSED, &closed(CloseReason::PeerClosed), 1)
        .durations(CONNECTION_DURATION, 1);
    stopped.metrics.assert_exactly(&expected);
}

/// Sends one message to a handler that fails it, reads the NAK, and checks the metrics.
fn failed_message(handler: impl Handler, outcome: &str) {
    let server = TestServer::start(Server::builder(handler));
    let payload = message("F1");
    let mut client = server.connect();
    client.send(&frame(&payload));
    let nak = client.read_frame();
    assert_eq!(ack_of(&nak), (AckCode::AE, "F1".to_owned()));
    client.finish();
    let stopped = server.stop(GRACE);

    // A NAK is not a reply: no message stop, so no response size or latency.
    let expected = Expected::new()
        .counter(CONNECTIONS_ACCEPTED, &[], 1)
        .counter(MESSAGES_RECEIVED, &[], 1)
        .counter(MESSAGES_HANDLED, &[("outcome", outcome)], 1)
        .counter(NAKS_SENT, &[("code", "AE")], 1)
        .counter(BYTES_RECEIVED, &[], payload.len() as u64 + 3)
        .counter(BYTES_SENT, &[], nak.len() as u64 + 3)
        .samples(MESSAGE_SIZE, &[payload.len() as f64])
        .handled_timings(1)
        .counter(CONNECTIONS_CLOSED, &closed(CloseReason::PeerClosed), 1)
        .durations(CONNECTION_DURATION, 1);
    stopped.metrics.assert_exactly(&expected);
}

#[test]
fn handler_error_counts_error_and_ae_nak() {
    failed_message(
        handler_fn(|_, _| Err("database unavailable".into())),
        "error",
    );
}

#[test]
fn handler_panic_counts_panic_and_ae_nak() {
    failed_message(
        handler_fn(|_, _| panic!("handler bug (expected by this test)")),
        "panic",
    );
}

#[test]
fn handler_timeout_counts_timeout_nak_and_late_result() {
    // One worker and no replacements: the second message waits for the stuck worker, which
    // sends its late result before taking it. Completions arrive in order, so reading the
    // second ACK proves the late result was counted. The timeout also bounds how soon the
    // released worker must reach NEXT, so it is generous for a loaded 2-core machine.
    let timeout = Duration::from_secs(2);
    let (handler, release) = stuck_handler();
    let builder = Server::builder(handler)
        .handler_timeout(timeout)
        .workers(1)
        .max_extra_workers(0);
    let server = TestServer::start(builder);
    let (m1, m2) = (message("STUCK"), message("NEXT"));
    let mut client = server.connect();
    client.send(&frame(&m1));
    let nak = client.read_frame();
    assert_eq!(ack_of(&nak), (AckCode::AE, "STUCK".to_owned()));
    client.send(&frame(&m2));
    release.send(()).unwrap();
    let reply = client.read_frame();
    assert_eq!(ack_of(&reply), (AckCode::AA, "NEXT".to_owned()));
    client.finish();
    let stopped = server.stop(GRACE);
    assert_eq!(stopped.report.workers_stuck, 0);

    let expected = Expected::new()
        .counter(CONNECTIONS_ACCEPTED, &[], 1)
        .counter(MESSAGES_RECEIVED, &[], 2)
        .counter(MESSAGES_HANDLED, &[("outcome", "timeout")], 1)
        .counter(MESSAGES_HANDLED, &[("outcome", "reply")], 1)
        .counter(NAKS_SENT, &[("code", "AE")], 1)
        .counter(LATE_RESULTS, &[], 1)
        .counter(BYTES_RECEIVED, &[], (m1.len() + m2.len()) as u64 + 6)
        .counter(BYTES_SENT, &[], (nak.len() + reply.len()) as u64 + 6)
        .samples(MESSAGE_SIZE, &[m1.len() as f64, m2.len() as f64])
        .samples(RESPONSE_SIZE, &[reply.len() as f64])
        // The stuck handler's run time is recorded when it returns.
        .handled_timings(2)
        .durations(RESPONSE_LATENCY, 1)
        .counter(CONNECTIONS_CLOSED, &closed(CloseReason::PeerClosed), 1)
        .durations(CONNECTION_DURATION, 1);
    stopped.metrics.assert_exactly(&expected);
    let run_times = stopped.metrics.histogram(HANDLER_DURATION);
    assert!(
        run_times.iter().any(|&t| t >= secs(timeout)),
        "the stuck handler ran past the timeout: {run_times:?}"
    );
}

#[test]
fn handler_timeout_with_one_worker_replaces_it() {
    let timeout = Duration::from_millis(500);
    let (handler, release) = stuck_handler();
    let builder = Server::builder(handler).handler_timeout(timeout).workers(1);
    let server = TestServer::start(builder);
    let (m1, m2) = (message("STUCK"), message("NEXT"));
    let mut client = server.connect();
    client.send(&frame(&m1));
    let nak = client.read_frame();
    assert_eq!(ack_of(&nak), (AckCode::AE, "STUCK".to_owned()));
    // Served by the replacement while the first worker is still stuck.
    client.send(&frame(&m2));
    let reply = client.read_frame();
    assert_eq!(ack_of(&reply), (AckCode::AA, "NEXT".to_owned()));
    client.finish();
    let stopped = server.stop(Duration::from_millis(100));
    assert_eq!(stopped.report.workers_stuck, 1);
    release.send(()).unwrap();

    // The stuck worker is still inside the handler: busy 1, no run time, no late result yet.
    let expected = Expected::new()
        .counter(CONNECTIONS_ACCEPTED, &[], 1)
        .counter(MESSAGES_RECEIVED, &[], 2)
        .counter(MESSAGES_HANDLED, &[("outcome", "timeout")], 1)
        .counter(MESSAGES_HANDLED, &[("outcome", "reply")], 1)
        .counter(NAKS_SENT, &[("code", "AE")], 1)
        .counter(WORKERS_REPLACED, &[], 1)
        .gauge(WORKERS_BUSY, 1.0)
        .counter(BYTES_RECEIVED, &[], (m1.len() + m2.len()) as u64 + 6)
        .counter(BYTES_SENT, &[], (nak.len() + reply.len()) as u64 + 6)
        .samples(MESSAGE_SIZE, &[m1.len() as f64, m2.len() as f64])
        .samples(RESPONSE_SIZE, &[reply.len() as f64])
        .durations(HANDLER_QUEUE, 2)
        .durations(HANDLER_DURATION, 1)
        .durations(RESPONSE_LATENCY, 1)
        .counter(CONNECTIONS_CLOSED, &closed(CloseReason::PeerClosed), 1)
        .durations(CONNECTION_DURATION, 1);
    stopped.metrics.assert_exactly(&expected);
}

#[test]
fn gauges_follow_open_connections_and_busy_workers() {
    // The one test that reads the recorder mid-run. A snapshot swaps gauges to zero, so the
    // second snapshot shows the change since the first.
    let (entered_tx, entered) = mpsc::channel::<()>();
    let (release, released) = mpsc::channel::<()>();
    let gate = Arc::new(Mutex::new((entered_tx, released)));
    let handler = handler_fn(move |msg, _| {
        let gate = gate.lock().unwrap();
        gate.0.send(()).unwrap();
        let _ = gate.1.recv_timeout(4 * WAIT);
        Ok(Reply::Send(ack::accept(msg)))
    });
    let server = TestServer::start(Server::builder(handler).workers(2));
    let mut a = server.connect();
    let b = server.connect();
    server.events.connection_start();
    server.events.connection_start();
    a.send(&frame(&message("HOLD")));
    entered.recv_timeout(WAIT).expect("the handler started");

    let during = Recorded::take(&server.recorder);
    assert_eq!(during.gauge(CONNECTIONS_ACTIVE), 2.0);
    assert_eq!(during.gauge(WORKERS_BUSY), 1.0);
    assert_eq!(during.counter(CONNECTIONS_ACCEPTED, &[]), 2);

    release.send(()).unwrap();
    assert_eq!(ack_of(&a.read_frame()).0, AckCode::AA);
    a.finish();
    b.finish();
    let after = server.stop(GRACE).metrics;
    assert_eq!(after.gauge(CONNECTIONS_ACTIVE), -2.0);
    assert_eq!(after.gauge(WORKERS_BUSY), -1.0);
    assert_eq!(after.counter(CONNECTIONS_ACCEPTED, &[]), 0);
    assert_eq!(
        after.counter(CONNECTIONS_CLOSED, &closed(CloseReason::PeerClosed)),
        2
    );
}

#[test]
fn handler_timeout_after_a_queue_wait_still_replaces_the_worker() {
    // The handler timeout runs from dispatch, so a message that waited in the queue behind
    // another times out while its handler has run for less than `handler_timeout`. The pool
    // must still count that worker as stuck and start a replacement, or the next message
    // waits behind it and times out too.
    let timeout = Duration::from_millis(1000);
    let (entered_tx, entered) = mpsc::channel::<()>();
    let (release_slow, slow_released) = mpsc::channel::<()>();
    let (release_stuck, stuck_released) = mpsc::channel::<()>();
    let gates = Mutex::new((entered_tx, slow_released, stuck_released));
    let handler = handler_fn(move |msg, _| {
        let has = |tag: &[u8]| msg.windows(tag.len()).any(|w| w == tag);
        if has(b"SLOW") {
            let gates = gates.lock().unwrap();
            gates.0.send(()).unwrap();
            let _ = gates.1.recv_timeout(4 * WAIT);
        } else if has(b"STUCK") {
            let _ = gates.lock().unwrap().2.recv_timeout(4 * WAIT);
        }
        Ok(Reply::Send(ack::accept(msg)))
    });
    let builder = Server::builder(handler).handler_timeout(timeout).workers(1);
    let server = TestServer::start(builder);
    let mut x = server.connect();
    x.send(&frame(&message("SLOW")));
    entered
        .recv_timeout(WAIT)
        .expect("the slow handler started");
    let mut y = server.connect();
    y.send(&frame(&message("STUCK")));
    loop {
        if let Event::MessageStart(start) = server.events.next()
            && start.message_size == message("STUCK").len()
        {
            break;
        }
    }
    // Not a synchronisation: this is the queue wait under test. STUCK waits behind SLOW for
    // half its timeout, and SLOW still finishes well within its own.
    std::thread::sleep(timeout / 2);
    release_slow.send(()).unwrap();
    assert_eq!(ack_of(&x.read_frame()), (AckCode::AA, "SLOW".to_owned()));
    assert_eq!(ack_of(&y.read_frame()), (AckCode::AE, "STUCK".to_owned()));
    // The replacement serves the next message while STUCK's worker is still blocked.
    y.send(&frame(&message("NEXT")));
    assert_eq!(ack_of(&y.read_frame()), (AckCode::AA, "NEXT".to_owned()));
    x.finish();
    y.finish();
    let stopped = server.stop(Duration::from_millis(100));
    release_stuck.send(()).unwrap();
    assert_eq!(stopped.metrics.counter(WORKERS_REPLACED, &[]), 1);
    assert_eq!(
        stopped
            .metrics
            .counter(MESSAGES_HANDLED, &[("outcome", "timeout")]),
        1
    );
    assert_eq!(stopped.report.workers_stuck, 1);
}

#[test]
fn result_for_a_connection_reset_mid_handler_is_discarded_as_late() {
    // The peer resets while its second message is with the handler. The result arrives for a
    // connection that is gone: it is discarded and counted as late, not as handled.
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
    // One worker: the probe below is handled after the held message, and completions are
    // FIFO, so the probe's reply proves the late result was counted.
    let server = TestServer::start(Server::builder(handler).workers(1));
    let (m1, m2, probe) = (message("FIRST"), message("HOLD"), message("PROBE"));
    let mut client = server.connect();
    let mut sent = frame(&m1);
    sent.extend_from_slice(&frame(&m2));
    client.send(&sent);
    entered
        .recv_timeout(WAIT)
        .expect("the second message reached the handler");
    // The first ACK is unread in our receive buffer: closing now sends a RST.
    client.wait_readable();
    drop(client.into_stream());
    let stop = wait_stop(&server);
    assert_eq!(
        stop.reason,
        CloseReason::Io(std::io::ErrorKind::ConnectionReset)
    );
    release.send(()).unwrap();
    let mut other = server.connect();
    other.send(&frame(&probe));
    let probe_ack = other.read_frame();
    assert_eq!(ack_of(&probe_ack), (AckCode::AA, "PROBE".to_owned()));
    other.finish();
    let stopped = server.stop(GRACE);

    let first_ack = ack::accept(&m1).len();
    let expected = Expected::new()
        .counter(CONNECTIONS_ACCEPTED, &[], 2)
        .counter(MESSAGES_RECEIVED, &[], 3)
        .counter(MESSAGES_HANDLED, &[("outcome", "reply")], 2)
        .counter(LATE_RESULTS, &[], 1)
        .counter(BYTES_RECEIVED, &[], (sent.len() + probe.len() + 3) as u64)
        .counter(BYTES_SENT, &[], (first_ack + probe_ack.len()) as u64 + 6)
        .samples(
            MESSAGE_SIZE,
            &[m1.len() as f64, m2.len() as f64, probe.len() as f64],
        )
        .samples(RESPONSE_SIZE, &[first_ack as f64, probe_ack.len() as f64])
        .handled_timings(3)
        .durations(RESPONSE_LATENCY, 2)
        .counter(CONNECTIONS_CLOSED, &closed(stop.reason), 1)
        .counter(CONNECTIONS_CLOSED, &closed(CloseReason::PeerClosed), 1)
        .durations(CONNECTION_DURATION, 2);
    stopped.metrics.assert_exactly(&expected);
}
