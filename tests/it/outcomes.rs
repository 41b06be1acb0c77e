//! Handler outcomes: replies, no reply, close, errors, panics and timeouts, and
//! what the peer gets for each.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use metrics_util::debugging::DebuggingRecorder;
use mllp_reactor::ack::{self, AckCode};
use mllp_reactor::{
    CloseReason, Context, ExceptionReason, HandlerError, NakPolicy, Reply, handler_fn,
};

use crate::util::{
    self, Counters, Event, Peer, accept_first_gated, ack_msg, assert_ack, gate, start_observed,
    stop,
};

/// A handler that acts on the message's control id: `ERR*` returns an error, `PANIC*`
/// panics, `NOREPLY*`, `CLOSE*` and `BYE*` return those replies, anything else is accepted.
fn by_control_id(msg: &Bytes, _cx: &Context) -> Result<Reply, HandlerError> {
    let id = util::control_id(msg);
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

/// Sends `failing`, expects an AE NAK quoting it and the exception `reason`, then checks the
/// connection still answers.
#[track_caller]
fn failure_is_naked(failing: &str, reason: ExceptionReason) {
    let (server, mut events) = start_observed(handler_fn(by_control_id), |b| b);
    let mut peer = Peer::connect(server.local_addr());
    let nak = peer.roundtrip(&ack_msg(failing));
    assert_ack(&nak, AckCode::AE, failing);
    assert_ack(&peer.roundtrip(&ack_msg("NEXT")), AckCode::AA, "NEXT");
    let me = peer.local_addr();
    let exception = events.wait("exception", |e| {
        matches!(e, Event::MsgException { .. }) && e.peer() == me
    });
    assert!(
        matches!(exception, Event::MsgException { seq: Some(0), reason: r, .. } if r == reason),
        "{exception:?}"
    );
    drop(peer);
    events.expect_close(me, CloseReason::PeerClosed);
    stop(server);
}

#[test]
fn handler_error_gets_an_ae_nak_and_the_connection_goes_on() {
    failure_is_naked("ERR1", ExceptionReason::HandlerError);
}

#[test]
fn handler_panic_gets_an_ae_nak_and_the_connection_goes_on() {
    failure_is_naked("PANIC1", ExceptionReason::Panic);
}

#[test]
fn handler_error_text_stays_private_by_default() {
    let (server, _events) = start_observed(handler_fn(by_control_id), |b| b);
    let mut peer = Peer::connect(server.local_addr());
    let nak = peer.roundtrip(&ack_msg("ERR2"));
    let text = ack::parse(&nak).unwrap().text.expect("MSA-3").to_vec();
    assert_eq!(text, b"application error", "{:?}", Bytes::from(nak));
    stop(server);
}

#[test]
fn handler_error_text_reaches_the_nak_when_exposed() {
    let (server, _events) =
        start_observed(handler_fn(by_control_id), |b| b.expose_handler_errors(true));
    let mut peer = Peer::connect(server.local_addr());
    let nak = peer.roundtrip(&ack_msg("ERR2"));
    let text = ack::parse(&nak).unwrap().text.expect("MSA-3").to_vec();
    assert!(
        String::from_utf8_lossy(&text).contains("cannot store ERR2"),
        "{:?}",
        Bytes::from(nak)
    );
    stop(server);
}

#[test]
fn handler_timeout_gets_an_ae_nak_and_the_late_result_is_discarded() {
    let (gate, control) = gate();
    let (server, mut events) = start_observed(accept_first_gated(gate), |b| {
        b.handler_timeout(Duration::from_millis(300)).workers(2)
    });
    let mut peer = Peer::connect(server.local_addr());
    peer.send_frame(&ack_msg("SLOW"));
    control.wait_entered();
    assert_ack(&peer.read_frame(), AckCode::AE, "SLOW");
    // The connection is usable while the first handler is still stuck.
    assert_ack(&peer.roundtrip(&ack_msg("NEXT1")), AckCode::AA, "NEXT1");
    control.release();
    // The stuck handler's AA for SLOW is never sent: the next frame answers NEXT2.
    assert_ack(&peer.roundtrip(&ack_msg("NEXT2")), AckCode::AA, "NEXT2");
    let me = peer.local_addr();
    events.wait("timeout exception", |e| {
        matches!(
            e,
            Event::MsgException {
                seq: Some(0),
                reason: ExceptionReason::HandlerTimeout,
                ..
            }
        ) && e.peer() == me
    });
    assert_eq!(
        events.count(|e| matches!(e, Event::MsgStop { seq: 0, .. }) && e.peer() == me),
        0
    );
    stop(server);
}

#[test]
fn silent_policy_sends_nothing_on_failure() {
    let (server, mut events) = start_observed(handler_fn(by_control_id), |b| {
        b.nak_policy(NakPolicy::Silent)
    });
    let mut peer = Peer::connect(server.local_addr());
    peer.send_frame(&ack_msg("ERR3"));
    let me = peer.local_addr();
    events.wait("exception", |e| {
        matches!(e, Event::MsgException { .. }) && e.peer() == me
    });
    peer.send_frame(&ack_msg("PANIC3"));
    // The first frame to come back answers the message after both failures.
    assert_ack(&peer.roundtrip(&ack_msg("OK3")), AckCode::AA, "OK3");
    assert_eq!(
        events.count(|e| matches!(e, Event::MsgException { .. }) && e.peer() == me),
        2
    );
    stop(server);
}

#[test]
fn no_reply_sends_nothing_and_keeps_the_connection() {
    let (server, mut events) = start_observed(handler_fn(by_control_id), |b| b);
    let mut peer = Peer::connect(server.local_addr());
    peer.send_frame(&ack_msg("NOREPLY1"));
    assert_ack(&peer.roundtrip(&ack_msg("OK4")), AckCode::AA, "OK4");
    let me = peer.local_addr();
    // Counted as handled (message stop without a response), not as an exception.
    events.wait("message stop", |e| {
        matches!(
            e,
            Event::MsgStop {
                seq: 0,
                response_size: None,
                ..
            }
        ) && e.peer() == me
    });
    assert_eq!(
        events.count(|e| matches!(e, Event::MsgException { .. }) && e.peer() == me),
        0
    );
    stop(server);
}

#[test]
fn close_reply_closes_without_sending() {
    let (server, mut events) = start_observed(handler_fn(by_control_id), |b| b);
    let mut peer = Peer::connect(server.local_addr());
    let mut wire = util::frame(&ack_msg("CLOSE1"));
    // A message pipelined behind it is never dispatched.
    wire.extend(util::frame(&ack_msg("AFTER")));
    peer.send(&wire);
    peer.expect_closed();
    let me = peer.local_addr();
    events.expect_close(me, CloseReason::ClosedByHandler);
    assert_eq!(
        events.count(|e| matches!(e, Event::MsgStart { .. }) && e.peer() == me),
        1
    );
    stop(server);
}

#[test]
fn send_and_close_sends_then_closes() {
    let (server, mut events) = start_observed(handler_fn(by_control_id), |b| b);
    let mut peer = Peer::connect(server.local_addr());
    assert_ack(&peer.roundtrip(&ack_msg("BYE1")), AckCode::AA, "BYE1");
    peer.expect_closed();
    events.expect_close(peer.local_addr(), CloseReason::ClosedByHandler);
    stop(server);
}

#[test]
fn all_workers_stuck_a_replacement_serves_others() {
    let recorder = DebuggingRecorder::new();
    let mut counters = Counters::new(recorder.snapshotter());
    let (gate, control) = gate();
    let (observer, mut events) = util::observer();
    let server = metrics::with_local_recorder(&recorder, || {
        mllp_reactor::Server::builder(accept_first_gated(gate))
            .workers(1)
            .handler_timeout(Duration::from_millis(300))
            .observer(observer)
            .bind("127.0.0.1:0")
            .expect("bind")
    })
    .spawn()
    .expect("spawn");
    let addr = server.local_addr();
    let mut stuck = Peer::connect(addr);
    stuck.send_frame(&ack_msg("HANG"));
    control.wait_entered();
    // The only worker is stuck; after the handler timeout the sender gets its AE ...
    assert_ack(&stuck.read_frame(), AckCode::AE, "HANG");
    // ... and a replacement worker serves another connection ...
    let mut other = Peer::connect(addr);
    assert_ack(&other.roundtrip(&ack_msg("OTHER")), AckCode::AA, "OTHER");
    // ... and the stuck one's.
    assert_ack(&stuck.roundtrip(&ack_msg("AGAIN")), AckCode::AA, "AGAIN");
    control.release();
    assert_eq!(counters.wait_for("mllp_handler_late_results_total", 1), 1);
    assert_eq!(counters.get("mllp_workers_replaced_total"), 1);
    // The late AA for HANG never reaches the wire.
    assert_ack(&stuck.roundtrip(&ack_msg("LAST")), AckCode::AA, "LAST");
    let me = stuck.local_addr();
    assert_eq!(
        events.count(|e| matches!(e, Event::MsgStop { seq: 0, .. }) && e.peer() == me),
        0
    );
    let report = stop(server);
    assert_eq!(report.workers_stuck, 0);
}

#[test]
fn queued_message_times_out_while_the_worker_is_stuck_and_is_never_run() {
    // One worker and no replacements: a message queued behind a stuck handler is answered by
    // the timeout, and the worker, once free, must not run it (its sender already has an AE).
    let (gate, control) = gate();
    let ran = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let log = Arc::clone(&ran);
    let (server, _events) = start_observed(
        handler_fn(move |msg, _| {
            let id = util::control_id(msg);
            log.lock().unwrap().push(id.clone());
            if id == "HANG" {
                gate.block();
            }
            Ok(Reply::Send(ack::accept(msg)))
        }),
        |b| {
            b.workers(1)
                .max_extra_workers(0)
                .handler_timeout(Duration::from_millis(300))
        },
    );
    let addr = server.local_addr();
    let mut stuck = Peer::connect(addr);
    stuck.send_frame(&ack_msg("HANG"));
    control.wait_entered();
    let mut queued = Peer::connect(addr);
    assert_ack(&queued.roundtrip(&ack_msg("QUEUED")), AckCode::AE, "QUEUED");
    assert_ack(&stuck.read_frame(), AckCode::AE, "HANG");
    control.release();
    // Once the worker is back, new messages are served again.
    assert_ack(&queued.roundtrip(&ack_msg("LATER")), AckCode::AA, "LATER");
    assert_eq!(*ran.lock().unwrap(), ["HANG", "LATER"]);
    stop(server);
}

#[test]
fn replacement_starts_for_a_job_that_waited_in_the_queue_before_hanging() {
    // The hanging job waits 500 ms behind another before a worker takes it, so when its
    // 2 s deadline passes the worker has run it for only about 1.5 s. It is stuck all
    // the same (its message is past its deadline): a replacement must start then, or every
    // other connection's messages time out behind it.
    let (gate, control) = gate();
    let (busy_tx, busy) = std::sync::mpsc::channel::<()>();
    let busy_tx = std::sync::Mutex::new(busy_tx);
    let server = util::start_with(
        handler_fn(move |msg, _| {
            match util::control_id(msg).as_str() {
                "BUSY" => {
                    busy_tx.lock().unwrap().send(()).unwrap();
                    // Generous against the 2 s deadline: a loaded 2-core machine must not
                    // time this one out.
                    std::thread::sleep(Duration::from_millis(500));
                }
                "HANG" => gate.block(),
                _ => {}
            }
            Ok(Reply::Send(ack::accept(msg)))
        }),
        |b| b.workers(1).handler_timeout(Duration::from_secs(2)),
    );
    let addr = server.local_addr();
    let mut first = Peer::connect(addr);
    let mut hang = Peer::connect(addr);
    first.send_frame(&ack_msg("BUSY"));
    busy.recv_timeout(util::WAIT)
        .expect("the busy handler started");
    hang.send_frame(&ack_msg("HANG"));
    assert_ack(&first.read_frame(), AckCode::AA, "BUSY");
    control.wait_entered();
    assert_ack(&hang.read_frame(), AckCode::AE, "HANG");
    let mut other = Peer::connect(addr);
    assert_ack(&other.roundtrip(&ack_msg("OTHER")), AckCode::AA, "OTHER");
    control.release();
    stop(server);
}
