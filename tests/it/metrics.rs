//! Metrics that no other scenario shows: what `bind()` registers, the handler outcomes
//! `no_reply`, the state a shutdown leaves with a worker still stuck, and the gauges read
//! mid-run. Every other scenario checks its exact metrics in the file of its concern.
//!
//! Exact checks take the totals after the shutdown, when the reactor and worker threads have
//! recorded everything; the recorder captured the handles at `bind()` through
//! `with_local_recorder`, so tests stay independent of each other.

use std::time::Duration;

use metrics::Unit;
use mllp_reactor::ack::AckCode;
use mllp_reactor::telemetry::names::*;
use mllp_reactor::{CloseReason, Reply, Server, handler_fn};

use crate::support::{
    ALL_NAMES, Expected, accept_first_gated, accept_gating, accepting, assert_ack, closed,
    control_id, frame, gate, message, start,
};

#[test]
fn every_metric_is_registered_at_bind_with_listener_label_unit_and_description() {
    let stopped = start(Server::builder(accepting())).stop();
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
            "probe",
            "proxy_header",
            "shutdown",
            "tls_bad_client_cert",
            "tls_handshake",
            "tls_no_client_cert",
            "tls_plaintext"
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
    // Every other family is unlabelled (besides `listener`) and registered once.
    let labelled = [
        CONNECTIONS_CLOSED,
        CONNECTIONS_REJECTED,
        MESSAGES_HANDLED,
        FRAMES_REJECTED,
        NAKS_SENT,
    ];
    let unlabelled: Vec<&str> = ALL_NAMES
        .into_iter()
        .filter(|name| !labelled.contains(name))
        .collect();
    assert!(labelled.iter().all(|name| ALL_NAMES.contains(name)));
    for name in unlabelled {
        let n = m.0.iter().filter(|x| x.name == name).count();
        assert_eq!(n, 1, "{name} registered {n} times");
        assert!(m.0.iter().all(|x| x.name != name || x.labels.is_empty()));
    }
}

#[test]
fn no_reply_then_close_counts_no_reply_and_sends_nothing() {
    let handler = handler_fn(|msg, _| {
        Ok(if control_id(msg) == "CLOSE" {
            Reply::Close
        } else {
            Reply::NoReply
        })
    });
    let server = start(Server::builder(handler));
    let (first, second) = (message("QUIET"), message("CLOSE"));
    let mut sent = frame(&first);
    sent.extend_from_slice(&frame(&second));
    let mut client = server.connect();
    client.send(&sent);
    assert!(client.read_to_eof().is_empty(), "no reply expected");
    let stopped = server.stop();

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
fn shutdown_with_a_stuck_worker_leaves_it_busy_and_replaced() {
    let (gate, control) = gate();
    let builder = Server::builder(accept_gating("STUCK", gate))
        .handler_timeout(Duration::from_millis(500))
        .workers(1);
    let server = start(builder);
    let (m1, m2) = (message("STUCK"), message("NEXT"));
    let mut client = server.connect();
    let nak = client.roundtrip(&m1);
    assert_ack(&nak, AckCode::AE, "STUCK");
    // Served by the replacement while the first worker is still stuck.
    let reply = client.roundtrip(&m2);
    assert_ack(&reply, AckCode::AA, "NEXT");
    client.finish();
    let stopped = server.stop_within(Duration::from_millis(100));
    assert_eq!(stopped.report.workers_stuck, 1);
    control.release();

    // The stuck worker is still inside the handler: busy 1, no run time, no late result yet.
    let expected = Expected::new()
        .accepted(1)
        .naked(&m1, &nak, "timeout")
        .counter(WORKERS_REPLACED, &[], 1)
        .gauge(WORKERS_BUSY, 1.0)
        .durations(HANDLER_QUEUE, 1)
        .replied(&m2, &reply)
        .closed(CloseReason::PeerClosed, 1);
    stopped.metrics.assert_exactly(&expected);
}

#[test]
fn gauges_follow_open_connections_and_busy_workers() {
    // The one test that reads the totals mid-run: the gauges and the accept counter move
    // before the events the test waits for.
    let (gate, control) = gate();
    let mut server = start(Server::builder(accept_first_gated(gate)).workers(2));
    let mut a = server.connect();
    let b = server.connect();
    server.events.connection_start();
    server.events.connection_start();
    a.send_frame(&message("HOLD"));
    control.wait_entered();

    let during = server.metrics();
    assert_eq!(during.gauge(CONNECTIONS_ACTIVE), 2.0);
    assert_eq!(during.gauge(WORKERS_BUSY), 1.0);
    assert_eq!(during.counter(CONNECTIONS_ACCEPTED, &[]), 2);

    control.release();
    assert_ack(&a.read_frame(), AckCode::AA, "HOLD");
    a.finish();
    b.finish();
    let after = server.stop().metrics;
    assert_eq!(after.gauge(CONNECTIONS_ACTIVE), 0.0);
    assert_eq!(after.gauge(WORKERS_BUSY), 0.0);
    assert_eq!(after.counter(CONNECTIONS_ACCEPTED, &[]), 2);
    assert_eq!(
        after.counter(CONNECTIONS_CLOSED, &closed(CloseReason::PeerClosed)),
        1
    );
    // `b` sent nothing: a connect-then-close is a probe (issue 18), counted apart.
    assert_eq!(
        after.counter(CONNECTIONS_CLOSED, &closed(CloseReason::Probe)),
        1
    );
}

/// `timing_histograms(false)`: the three timing histograms stay empty, and nothing else
/// changes: the other metrics, the slow-inline counter, and the observer's message stops with
/// their durations.
#[test]
fn without_timing_histograms_only_the_timings_are_missing() {
    for dispatch in [mllp_reactor::Dispatch::Inline, mllp_reactor::Dispatch::Pool] {
        let handler = handler_fn(|msg, _| {
            if control_id(msg) == "SLOW" {
                // Far above the 1 ms threshold.
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(Reply::Send(mllp_reactor::ack::accept(msg)))
        });
        let server = start(
            Server::builder(handler)
                .dispatch(dispatch)
                .timing_histograms(false),
        );
        let mut peer = server.connect();
        assert_ack(&peer.roundtrip(&message("T1")), AckCode::AA, "T1");
        assert_ack(&peer.roundtrip(&message("SLOW")), AckCode::AA, "SLOW");
        drop(peer);
        let mut stopped = server.stop();
        let m = &stopped.metrics;
        for name in [HANDLER_QUEUE, HANDLER_DURATION, RESPONSE_LATENCY] {
            assert!(
                m.histogram(name).is_empty(),
                "{dispatch:?}: {name} recorded"
            );
        }
        assert_eq!(m.counter(MESSAGES_RECEIVED, &[]), 2, "{dispatch:?}");
        assert_eq!(m.histogram(MESSAGE_SIZE).len(), 2, "{dispatch:?}");
        assert_eq!(m.histogram(RESPONSE_SIZE).len(), 2, "{dispatch:?}");
        let slow = u64::from(dispatch == mllp_reactor::Dispatch::Inline);
        assert_eq!(m.counter(INLINE_SLOW, &[]), slow, "{dispatch:?}");
        let long_stops = stopped.events.count(|e| {
            matches!(e, crate::support::Event::MessageStop(s)
                if s.sequence == 1 && s.duration >= Duration::from_millis(20))
        });
        assert_eq!(
            long_stops, 1,
            "{dispatch:?}: the slow message's stop and its duration"
        );
    }
}
