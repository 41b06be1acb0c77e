//! Handler outcomes: replies, no reply, close, errors, panics and timeouts, and what the
//! peer, the observer and the metrics get for each.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use mllp_reactor::ack::{self, AckCode};
use mllp_reactor::telemetry::names::*;
use mllp_reactor::{
    CloseReason, Context, Dispatch, ExceptionReason, HandlerError, NakPolicy, Reply, Server,
    handler_fn,
};

use crate::support::{
    self, Event, Expected, Stopped, accept_first_gated, accept_gating, assert_ack, control_id,
    frame, gate, message, secs, start,
};

/// A handler that acts on the message's control id: `ERR*` returns an error, `PANIC*`
/// panics, `NOREPLY*`, `CLOSE*` and `BYE*` return those replies, anything else is accepted.
fn by_control_id(msg: &Bytes, _cx: &Context) -> Result<Reply, HandlerError> {
    let id = control_id(msg);
    if id.starts_with("ERR") {
        Err(format!("cannot store {id}").into())
    } else if id.starts_with("PANIC") {
        panic!("handler panicked on {id}");
    } else if id.starts_with("NOREPLY") {
        Ok(Reply::NoReply)
    } else if id.starts_with("CLOSE") {
        Ok(Reply::Close)
    } else if id.starts_with("BYE") {
        Ok(Reply::SendAndClose(ack::accept(msg)))
    } else {
        Ok(Reply::Send(ack::accept(msg)))
    }
}

/// Sends `failing`, expects an AE NAK quoting it, then checks the connection still answers;
/// then checks the exact events (an exception with `reason` and `detail`, no message stop)
/// and metrics (handler outcome `outcome`, one AE NAK). Returns the NAK.
#[track_caller]
fn failure_is_naked(
    failing: &str,
    reason: ExceptionReason,
    outcome: &str,
    detail: &str,
) -> Vec<u8> {
    let server = start(Server::builder(handler_fn(by_control_id)));
    let addr = server.addr;
    let (bad, good) = (message(failing), message("NEXT"));
    let mut client = server.connect();
    let me = client.local_addr();
    let nak = client.roundtrip(&bad);
    assert_ack(&nak, AckCode::AE, failing);
    // The connection stays open and serves the next message.
    let reply = client.roundtrip(&good);
    assert_ack(&reply, AckCode::AA, "NEXT");
    client.finish();
    let Stopped {
        metrics,
        mut events,
        ..
    } = server.stop();

    let id = events.started(me, addr).connection;
    let msg = events.message_start();
    assert_eq!(
        (msg.connection, msg.sequence, msg.message_size),
        (id, 0, bad.len())
    );
    let failed = events.message_exception();
    assert_eq!(failed.connection, id);
    assert_eq!((failed.peer, failed.local), (me, addr));
    assert_eq!(failed.reason, reason);
    assert_eq!(failed.sequence, Some(0));
    assert_eq!(failed.message_size, bad.len());
    assert_eq!(failed.detail.as_deref(), Some(detail));
    events.answered(id, 1, good.len(), Some(reply.len()));
    events.stopped(id, CloseReason::PeerClosed);
    events.assert_drained();

    let expected = Expected::new()
        .accepted(1)
        .naked(&bad, &nak, outcome)
        .handled_timings(1)
        .replied(&good, &reply)
        .closed(CloseReason::PeerClosed, 1);
    metrics.assert_exactly(&expected);
    nak
}

#[test]
fn handler_error_gets_an_ae_nak_and_the_connection_goes_on() {
    let nak = failure_is_naked(
        "ERR1",
        ExceptionReason::HandlerError,
        "error",
        "cannot store ERR1",
    );
    // The error's text reaches the observer, not the peer (unless exposed, below).
    let text = ack::parse(&nak).unwrap().text.expect("MSA-3").to_vec();
    assert_eq!(text, b"application error", "{:?}", Bytes::from(nak));
}

#[test]
fn handler_error_text_reaches_the_nak_when_exposed() {
    let server = start(Server::builder(handler_fn(by_control_id)).expose_handler_errors(true));
    let mut peer = server.connect();
    let nak = peer.roundtrip(&message("ERR2"));
    assert_ack(&nak, AckCode::AE, "ERR2");
    let text = ack::parse(&nak).unwrap().text.expect("MSA-3").to_vec();
    assert!(
        String::from_utf8_lossy(&text).contains("cannot store ERR2"),
        "{:?}",
        Bytes::from(nak)
    );
    server.stop();
}

#[test]
fn handler_panic_gets_an_ae_nak_and_the_connection_goes_on() {
    failure_is_naked(
        "PANIC1",
        ExceptionReason::Panic,
        "panic",
        "handler panicked on PANIC1",
    );
}

#[test]
fn handler_timeout_gets_an_ae_nak_and_the_late_result_is_discarded() {
    // One worker and no replacements: NEXT waits for the stuck worker, which sends its late
    // result before taking NEXT. Completions arrive in order, so reading NEXT's ACK proves
    // the late result was processed (and not written). The timeout also bounds how soon the
    // released worker must reach NEXT, so it is generous for a loaded 2-core machine.
    let timeout = Duration::from_secs(2);
    let (gate, control) = gate();
    let builder = Server::builder(accept_gating("STUCK", gate))
        .handler_timeout(timeout)
        .workers(1)
        .max_extra_workers(0);
    let server = start(builder);
    let addr = server.addr;
    let (stuck, next) = (message("STUCK"), message("NEXT"));
    let mut client = server.connect();
    let me = client.local_addr();
    let nak = client.roundtrip(&stuck);
    assert_ack(&nak, AckCode::AE, "STUCK");
    client.send_frame(&next);
    control.release();
    // The stuck handler's AA for STUCK is never sent: the next frame answers NEXT.
    let reply = client.read_frame();
    assert_ack(&reply, AckCode::AA, "NEXT");
    client.finish();
    let Stopped {
        report,
        metrics,
        mut events,
    } = server.stop();
    assert_eq!(report.workers_stuck, 0);

    let id = events.started(me, addr).connection;
    let msg = events.message_start();
    assert_eq!(
        (msg.connection, msg.sequence, msg.message_size),
        (id, 0, stuck.len())
    );
    let failed = events.message_exception();
    assert_eq!((failed.connection, failed.sequence), (id, Some(0)));
    assert_eq!(failed.reason, ExceptionReason::HandlerTimeout);
    assert_eq!(failed.message_size, stuck.len());
    assert_eq!(failed.detail, None);
    assert!(
        failed.duration >= timeout,
        "timed out after {:?}",
        failed.duration
    );
    // The late result gives no event.
    events.answered(id, 1, next.len(), Some(reply.len()));
    events.stopped(id, CloseReason::PeerClosed);
    events.assert_drained();

    let expected = Expected::new()
        .accepted(1)
        .naked(&stuck, &nak, "timeout")
        .counter(LATE_RESULTS, &[], 1)
        // The stuck handler's run time is recorded when it returns.
        .handled_timings(1)
        .replied(&next, &reply)
        .closed(CloseReason::PeerClosed, 1);
    metrics.assert_exactly(&expected);
    let run_times = metrics.histogram(HANDLER_DURATION);
    assert!(
        run_times.iter().any(|&t| t >= secs(timeout)),
        "the stuck handler ran past the timeout: {run_times:?}"
    );
}

#[test]
fn silent_policy_sends_nothing_on_failure() {
    let mut server =
        start(Server::builder(handler_fn(by_control_id)).nak_policy(NakPolicy::Silent));
    let mut peer = server.connect();
    peer.send_frame(&message("ERR3"));
    let me = peer.local_addr();
    server.events.wait("exception", |e| {
        matches!(e, Event::MessageException(_)) && e.peer() == me
    });
    peer.send_frame(&message("PANIC3"));
    // The first frame to come back answers the message after both failures.
    assert_ack(&peer.roundtrip(&message("OK3")), AckCode::AA, "OK3");
    assert_eq!(
        server
            .events
            .count(|e| matches!(e, Event::MessageException(_)) && e.peer() == me),
        2
    );
    server.stop();
}

#[test]
fn no_reply_sends_nothing_and_keeps_the_connection() {
    let mut server = start(Server::builder(handler_fn(by_control_id)));
    let addr = server.addr;
    let mut peer = server.connect();
    let me = peer.local_addr();
    let (quiet, ok) = (message("NOREPLY1"), message("OK4"));
    peer.send_frame(&quiet);
    // Nothing comes back to wait for: the message stop is the signal.
    server.events.wait("the no-reply message's stop", |e| {
        matches!(e, Event::MessageStop(_)) && e.peer() == me
    });
    let reply = peer.roundtrip(&ok);
    assert_ack(&reply, AckCode::AA, "OK4");
    peer.finish();
    let mut events = server.stop().events;

    // Handled (a message stop without a response size), not an exception.
    let id = events.started(me, addr).connection;
    events.answered(id, 0, quiet.len(), None);
    events.answered(id, 1, ok.len(), Some(reply.len()));
    events.stopped(id, CloseReason::PeerClosed);
    events.assert_drained();
}

#[test]
fn close_reply_closes_without_sending() {
    let mut server = start(Server::builder(handler_fn(by_control_id)));
    let mut peer = server.connect();
    let mut wire = frame(&message("CLOSE1"));
    // A message pipelined behind it is never dispatched.
    wire.extend(frame(&message("AFTER")));
    peer.send(&wire);
    peer.expect_closed();
    let me = peer.local_addr();
    server.events.expect_close(me, CloseReason::ClosedByHandler);
    assert_eq!(
        server
            .events
            .count(|e| matches!(e, Event::MessageStart(_)) && e.peer() == me),
        1
    );
    server.stop();
}

#[test]
fn send_and_close_sends_then_closes() {
    let mut server = start(Server::builder(handler_fn(by_control_id)));
    let mut peer = server.connect();
    let payload = message("BYE1");
    let reply = peer.roundtrip(&payload);
    assert_ack(&reply, AckCode::AA, "BYE1");
    assert!(peer.read_to_eof().is_empty());
    server
        .events
        .expect_close(peer.local_addr(), CloseReason::ClosedByHandler);
    let expected = Expected::new()
        .accepted(1)
        .replied(&payload, &reply)
        .closed(CloseReason::ClosedByHandler, 1);
    server.stop().metrics.assert_exactly(&expected);
}

#[test]
fn all_workers_stuck_a_replacement_serves_others() {
    let (gate, control) = gate();
    let server = start(
        Server::builder(accept_first_gated(gate))
            .workers(1)
            .handler_timeout(support::SHORT),
    );
    let mut stuck = server.connect();
    stuck.send_frame(&message("HANG"));
    control.wait_entered();
    // The only worker is stuck; after the handler timeout the sender gets its AE ...
    assert_ack(&stuck.read_frame(), AckCode::AE, "HANG");
    // ... and a replacement worker serves another connection ...
    let mut other = server.connect();
    assert_ack(&other.roundtrip(&message("OTHER")), AckCode::AA, "OTHER");
    // ... and the stuck one's.
    assert_ack(&stuck.roundtrip(&message("AGAIN")), AckCode::AA, "AGAIN");
    control.release();
    assert_eq!(server.wait_counter(LATE_RESULTS, &[], 1), 1);
    assert_eq!(server.metrics().counter(WORKERS_REPLACED, &[]), 1);
    // The late AA for HANG never reaches the wire.
    assert_ack(&stuck.roundtrip(&message("LAST")), AckCode::AA, "LAST");
    let me = stuck.local_addr();
    let mut stopped = server.stop();
    assert_eq!(
        stopped
            .events
            .count(|e| matches!(e, Event::MessageStop(m) if m.sequence == 0) && e.peer() == me),
        0
    );
    assert_eq!(stopped.report.workers_stuck, 0);
}

#[test]
fn queued_message_times_out_while_the_worker_is_stuck_and_is_never_run() {
    // One worker and no replacements: a message queued behind a stuck handler is answered by
    // the timeout, and the worker, once free, must not run it (its sender already has an AE).
    let (gate, control) = gate();
    let ran = Arc::new(Mutex::new(Vec::<String>::new()));
    let log = Arc::clone(&ran);
    let server = start(
        Server::builder(handler_fn(move |msg, _| {
            let id = control_id(msg);
            log.lock().unwrap().push(id.clone());
            if id == "HANG" {
                gate.block();
            }
            Ok(Reply::Send(ack::accept(msg)))
        }))
        .workers(1)
        .max_extra_workers(0)
        .handler_timeout(support::SHORT),
    );
    let mut stuck = server.connect();
    stuck.send_frame(&message("HANG"));
    control.wait_entered();
    let mut queued = server.connect();
    assert_ack(&queued.roundtrip(&message("QUEUED")), AckCode::AE, "QUEUED");
    assert_ack(&stuck.read_frame(), AckCode::AE, "HANG");
    control.release();
    // Once the worker is back, new messages are served again.
    assert_ack(&queued.roundtrip(&message("LATER")), AckCode::AA, "LATER");
    assert_eq!(*ran.lock().unwrap(), ["HANG", "LATER"]);
    server.stop();
}

#[test]
fn handler_timeout_after_a_queue_wait_still_replaces_the_worker() {
    // The handler timeout runs from dispatch, so a message that waited in the queue behind
    // another times out while its handler has run for less than `handler_timeout`. The pool
    // must still count that worker as stuck and start a replacement, or every other
    // connection's messages wait behind it and time out too.
    let timeout = Duration::from_millis(1000);
    let (slow_gate, slow) = gate();
    let (stuck_gate, stuck) = gate();
    let handler = handler_fn(move |msg, _| {
        match control_id(msg).as_str() {
            "SLOW" => slow_gate.block(),
            "STUCK" => stuck_gate.block(),
            _ => {}
        }
        Ok(Reply::Send(ack::accept(msg)))
    });
    let mut server = start(Server::builder(handler).handler_timeout(timeout).workers(1));
    let mut x = server.connect();
    x.send_frame(&message("SLOW"));
    slow.wait_entered();
    let mut y = server.connect();
    let y_addr = y.local_addr();
    y.send_frame(&message("STUCK"));
    server.events.wait("STUCK's message start", |e| {
        matches!(e, Event::MessageStart(_)) && e.peer() == y_addr
    });
    // Not a synchronisation: this is the queue wait under test. STUCK waits behind SLOW for
    // half its timeout, and SLOW still finishes well within its own.
    std::thread::sleep(timeout / 2);
    slow.release();
    assert_ack(&x.read_frame(), AckCode::AA, "SLOW");
    stuck.wait_entered();
    assert_ack(&y.read_frame(), AckCode::AE, "STUCK");
    // The replacement serves the next message, and another connection's, while STUCK's
    // worker is still blocked.
    assert_ack(&y.roundtrip(&message("NEXT")), AckCode::AA, "NEXT");
    let mut other = server.connect();
    assert_ack(&other.roundtrip(&message("OTHER")), AckCode::AA, "OTHER");
    x.finish();
    y.finish();
    other.finish();
    let stopped = server.stop_within(Duration::from_millis(100));
    stuck.release();
    assert_eq!(stopped.metrics.counter(WORKERS_REPLACED, &[]), 1);
    assert_eq!(
        stopped
            .metrics
            .counter(MESSAGES_HANDLED, &[("outcome", "timeout")]),
        1
    );
    assert_eq!(stopped.report.workers_stuck, 1);
}

/// Issue 18 ("every NAK counted the same way in every mode"): a NAK the handler builds and
/// returns counts in `mllp_naks_sent_total{code}` by its MSA-1, inline and on the pool, as
/// the server's own NAKs do.
#[test]
fn handler_returned_naks_are_counted_by_code() {
    for dispatch in [Dispatch::Inline, Dispatch::Pool] {
        let handler = handler_fn(|msg: &Bytes, _cx: &Context| {
            let code = match control_id(msg).as_str() {
                "REJECT" => AckCode::AR,
                "FAIL" => AckCode::AE,
                _ => AckCode::AA,
            };
            Ok(Reply::Send(ack::nak(msg, code, "by the handler")))
        });
        let server = start(Server::builder(handler).dispatch(dispatch));
        let mut peer = server.connect();
        for (id, code) in [
            ("REJECT", AckCode::AR),
            ("FAIL", AckCode::AE),
            ("FAIL", AckCode::AE),
            ("OK", AckCode::AA),
        ] {
            assert_ack(&peer.roundtrip(&message(id)), code, id);
        }
        peer.finish();
        let metrics = server.stop().metrics;
        let naks = |code| metrics.counter(NAKS_SENT, &[("code", code)]);
        assert_eq!((naks("AR"), naks("AE")), (1, 2), "{dispatch:?}");
    }
}

/// `Context::received_time` (the MSH-7 of `serve --no-store`'s ACK) is the wall clock of the
/// poll turn that read the message (read once per turn, issue 21 item 5), not a time kept
/// from an earlier turn or from start-up: each message's lies between its send and its reply.
#[test]
fn received_time_is_the_wall_clock_of_the_turn_that_read_the_message() {
    let times = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&times);
    let server = start(Server::builder(handler_fn(move |msg, cx| {
        seen.lock().unwrap().push(cx.received_time());
        Ok(Reply::Send(ack::accept(msg)))
    })));
    let mut client = server.connect();
    for id in ["TIME1", "TIME2", "TIME3"] {
        let sent = SystemTime::now();
        assert_ack(&client.roundtrip(&message(id)), AckCode::AA, id);
        let answered = SystemTime::now();
        let received = *times.lock().unwrap().last().expect("the handler ran");
        assert!(
            sent <= received && received <= answered,
            "{id}: sent {sent:?} <= received {received:?} <= answered {answered:?}"
        );
    }
    client.finish();
    assert_eq!(times.lock().unwrap().len(), 3);
}
