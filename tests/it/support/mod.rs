//! The one harness of the loopback tests (after mio's `tests/util`): a test server with an
//! observer and a metrics recorder ([`start`]), a bounded client ([`Peer`]), the observer's
//! events ([`Events`]), the recorder's values ([`Recorded`], checked with [`Expected`]), and
//! one set of named timeouts.
//!
//! Every socket gets read and write timeouts, every wait has a deadline, and every helper that
//! can fail is `#[track_caller]`, so a failure points at the test line that called it.
//!
//! Waiting is done on signals where one exists: the observer's events (an unbounded channel
//! read with `recv_timeout`), a [`gate`] inside the handler, a reply, or EOF. Where none
//! exists (a socket closed just after its stop event, a counter updated after the reply went
//! out), [`wait_until`] and [`TestServer::wait_counter`] poll up to a deadline. [`pause`] only
//! paces a sender; no test relies on it for correctness.

mod events;
mod peer;
mod recorded;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use metrics_util::debugging::DebuggingRecorder;
use mllp_reactor::ack::{self, AckCode};
use mllp_reactor::{
    Builder, CloseReason, Handler, Reply, ServerHandle, ShutdownReport, handler_fn,
};

pub(crate) use events::{Event, Events, kinds};
pub(crate) use peer::{Peer, Sockets, connection_sockets, is_reset, open_fds};
pub(crate) use recorded::{ALL_NAMES, Expected, Recorded};

/// Read, write and connect timeout of every test socket: far above anything a passing test
/// waits for, so a loaded 2-core machine does not fail a test, but a hang ends in seconds.
pub(crate) const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a test waits for an observer event, a handler signal or a counter.
pub(crate) const WAIT: Duration = Duration::from_secs(10);
/// The longest a handler held in a [`gate`] waits for the test to release it: above [`WAIT`]
/// so a slow test still releases it in time, bounded so a failed test leaves no worker
/// blocked for good.
pub(crate) const HOLD: Duration = Duration::from_secs(30);
/// Grace period of [`TestServer::stop`].
pub(crate) const GRACE: Duration = Duration::from_secs(5);
/// The server timeouts under test (idle, frame, write, handler): short to keep the tests
/// quick. Tests assert only that a deadline did not fire early, never how late it fired.
pub(crate) const SHORT: Duration = Duration::from_millis(300);

/// The `listener` label of every test server.
pub(crate) const LISTENER: &str = "t";

pub(crate) const SB: u8 = 0x0B;
pub(crate) const EB: u8 = 0x1C;
pub(crate) const CR: u8 = 0x0D;

/// A sample ADT^A01 message (unframed) whose MSH-10 is `control_id`.
pub(crate) fn message(control_id: &str) -> Vec<u8> {
    format!(
        "MSH|^~\\&|ADT1|GOOD HEALTH HOSPITAL|GHH LAB|GHH|20260101120000||ADT^A01^ADT_A01|{control_id}|P|2.5.1\r\
         EVN||20260101120000\r\
         PID|1||PATID1234^^^GOOD HEALTH HOSPITAL^MR||EVERYMAN^ADAM^A^III||19610615|M\r\
         PV1|1|I|2000^2012^01||||004777^ATTEND^AARON^A|||SUR\r"
    )
    .into_bytes()
}

/// `payload` framed: `0B payload 1C 0D`.
pub(crate) fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 3);
    out.push(SB);
    out.extend_from_slice(payload);
    out.extend_from_slice(&[EB, CR]);
    out
}

/// The MSH-10 of `message`, or "" if it has none.
pub(crate) fn control_id(message: &[u8]) -> String {
    let id = mllp_reactor::msh::Msh::parse(message)
        .ok()
        .and_then(|m| m.control_id())
        .unwrap_or_default();
    String::from_utf8_lossy(id).into_owned()
}

/// Checks that `reply` is an ACK with code `code` answering MSH-10 `control_id`.
#[track_caller]
pub(crate) fn assert_ack(reply: &[u8], code: AckCode, control_id: &str) {
    let shown = || Bytes::copy_from_slice(reply);
    let parsed = ack::parse(reply).unwrap_or_else(|e| panic!("not an ACK ({e}): {:?}", shown()));
    assert_eq!(parsed.code, code, "MSA-1 of {:?}", shown());
    assert_eq!(
        parsed.control_id,
        control_id.as_bytes(),
        "MSA-2 of {:?}",
        shown()
    );
}

/// Replies with the payload it got.
pub(crate) fn echo() -> impl Handler {
    handler_fn(|msg, _cx| Ok(Reply::Send(msg.clone())))
}

/// Replies with an AA built from the message.
pub(crate) fn accepting() -> impl Handler {
    handler_fn(|msg, _cx| Ok(Reply::Send(ack::accept(msg))))
}

/// A running test server: its address, its observer's [`Events`], and the recorder that
/// captured its metric handles at `bind()`.
#[derive(Debug)]
pub(crate) struct TestServer {
    pub(crate) addr: SocketAddr,
    pub(crate) events: Events,
    /// Public so a test can shut down from another thread; [`stop`](Self::stop) otherwise.
    pub(crate) handle: ServerHandle,
    recorder: recorded::Recorder,
}

/// Binds `builder` on 127.0.0.1:0 with listener name [`LISTENER`], [`with_test_reactors`], an
/// observer feeding [`TestServer::events`] and a recorder of its own, and spawns it.
#[track_caller]
pub(crate) fn start(builder: Builder) -> TestServer {
    start_at("127.0.0.1:0", builder).unwrap_or_else(|e| panic!("bind 127.0.0.1:0: {e}"))
}

/// [`start`] on `addr`; the bind error is returned for tests that skip when `addr` is not
/// available (IPv6).
pub(crate) fn start_at(addr: &str, builder: Builder) -> Result<TestServer, mllp_reactor::Error> {
    launch(addr, builder, true)
}

/// [`start`], keeping the observer `builder` has (a test of observers themselves):
/// [`TestServer::events`] then reports nothing.
#[track_caller]
pub(crate) fn start_with_own_observer(builder: Builder) -> TestServer {
    launch("127.0.0.1:0", builder, false).unwrap_or_else(|e| panic!("bind 127.0.0.1:0: {e}"))
}

/// Applies `MLLP_TEST_REACTORS` (default 1): CI runs this suite with 2 reactors too, so every
/// behaviour is checked with connections spread over reactors.
pub(crate) fn with_test_reactors(builder: Builder) -> Builder {
    builder.reactors(test_reactors())
}

/// The reactors [`with_test_reactors`] gives a server: `MLLP_TEST_REACTORS`, default 1.
pub(crate) fn test_reactors() -> usize {
    std::env::var("MLLP_TEST_REACTORS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

fn launch(addr: &str, builder: Builder, observe: bool) -> Result<TestServer, mllp_reactor::Error> {
    // Bound inside `with_local_recorder`, every handle lands in this test's recorder, whatever
    // thread later updates it, and tests running side by side stay apart.
    let recorder = DebuggingRecorder::new();
    let (observer, events) = events::observer();
    let mut builder = with_test_reactors(builder).listener_name(LISTENER);
    if observe {
        builder = builder.observer(observer);
    }
    let server = ::metrics::with_local_recorder(&recorder, || builder.bind(addr))?;
    let handle = server.spawn().expect("spawn the test server");
    Ok(TestServer {
        addr: handle.local_addr(),
        events,
        handle,
        recorder: recorded::Recorder::new(&recorder),
    })
}

impl TestServer {
    /// A client connected to this server.
    #[track_caller]
    pub(crate) fn connect(&self) -> Peer {
        Peer::connect(self.addr)
    }

    /// Every metric's value so far. Values recorded on the reactor thread may lag the replies
    /// the test has read: exact checks belong after [`stop`](Self::stop).
    pub(crate) fn metrics(&self) -> Recorded {
        self.recorder.read()
    }

    /// The largest value gauge `name` was seen at so far (see `Recorder::gauge_peak`): for
    /// `mllp_buffered_bytes`, which the server sets, where [`metrics`](Self::metrics) sums.
    pub(crate) fn gauge_peak(&self, name: &str) -> f64 {
        self.recorder.gauge_peak(name)
    }

    /// Waits up to [`WAIT`] until counter `name` with `labels` reaches `want`; its value.
    #[track_caller]
    pub(crate) fn wait_counter(&self, name: &str, labels: &[(&str, &str)], want: u64) -> u64 {
        let deadline = Instant::now() + WAIT;
        loop {
            let value = self.metrics().counter(name, labels);
            if value >= want || Instant::now() >= deadline {
                return value;
            }
            // No event marks a counter update: poll, bounded by the deadline.
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Shuts down with [`GRACE`]; see [`stop_within`](Self::stop_within).
    #[track_caller]
    pub(crate) fn stop(self) -> Stopped {
        self.stop_within(GRACE)
    }

    /// Shuts down gracefully within `grace` and takes the final metrics. The reactor thread,
    /// the only caller of the observer, is gone by then: [`Stopped::events`] holds every event
    /// the server will ever report.
    #[track_caller]
    pub(crate) fn stop_within(self, grace: Duration) -> Stopped {
        let report = self.handle.shutdown(grace).expect("graceful shutdown");
        Stopped {
            report,
            metrics: self.recorder.read(),
            events: self.events,
        }
    }
}

/// What a stopped server left behind.
#[derive(Debug)]
pub(crate) struct Stopped {
    pub(crate) report: ShutdownReport,
    pub(crate) metrics: Recorded,
    pub(crate) events: Events,
}

/// Polls `done` until it holds, for at most [`WAIT`]: for states no event announces (a
/// socket closed just after the observer heard of it).
#[track_caller]
pub(crate) fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "waited {WAIT:?} for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Runs `f` on a new thread, for a side of a test that blocks.
pub(crate) fn spawn<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    std::thread::Builder::new()
        .name("it-helper".to_owned())
        .spawn(f)
        .expect("spawn a test thread")
}

/// Gives the server a moment to read what was sent so far on its own, so the next bytes
/// likely arrive in a separate read. Not a synchronisation: the test passes whether or not
/// the reads were split, it only exercises the split path most of the time.
pub(crate) fn pause() {
    std::thread::sleep(Duration::from_millis(20));
}

/// The handler's side of a [`gate`]: [`block`](Self::block) signals that the handler is in and
/// waits (at most [`HOLD`]) until the test releases it.
#[derive(Debug)]
pub(crate) struct Gate {
    entered: Mutex<Sender<()>>,
    release: Mutex<Receiver<()>>,
}

impl Gate {
    pub(crate) fn block(&self) {
        let _ = self.entered.lock().unwrap().send(());
        let _ = self.release.lock().unwrap().recv_timeout(HOLD);
    }
}

/// The test's side of a [`gate`].
#[derive(Debug)]
pub(crate) struct GateControl {
    entered: Receiver<()>,
    release: Sender<()>,
}

impl GateControl {
    /// Waits up to [`WAIT`] until a handler is blocked in the gate.
    #[track_caller]
    pub(crate) fn wait_entered(&self) {
        self.entered
            .recv_timeout(WAIT)
            .expect("a handler entered the gate");
    }

    /// Lets one blocked handler go on.
    pub(crate) fn release(&self) {
        let _ = self.release.send(());
    }
}

/// A gate to hold a handler inside `handle` until the test lets it go.
pub(crate) fn gate() -> (Arc<Gate>, GateControl) {
    let (entered_tx, entered) = mpsc::channel();
    let (release, release_rx) = mpsc::channel();
    let gate = Gate {
        entered: Mutex::new(entered_tx),
        release: Mutex::new(release_rx),
    };
    (Arc::new(gate), GateControl { entered, release })
}

/// A handler that holds the first message it gets in `gate`, then accepts it, and accepts
/// every later message at once.
pub(crate) fn accept_first_gated(gate: Arc<Gate>) -> impl Handler {
    let first = AtomicBool::new(true);
    handler_fn(move |msg, _| {
        if first.swap(false, Ordering::SeqCst) {
            gate.block();
        }
        Ok(Reply::Send(ack::accept(msg)))
    })
}

/// A handler that holds every message whose MSH-10 is `held` in `gate`, then accepts it, and
/// accepts every other message at once.
pub(crate) fn accept_gating(held: &'static str, gate: Arc<Gate>) -> impl Handler {
    handler_fn(move |msg, _| {
        if control_id(msg) == held {
            gate.block();
        }
        Ok(Reply::Send(ack::accept(msg)))
    })
}

/// Seconds as `f64`, for comparing with duration histograms.
pub(crate) fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Asserts a wall-clock time is within a minute of now (not a tight bound: it only proves the
/// field was filled in with the current time).
#[track_caller]
pub(crate) fn assert_recent(t: SystemTime) {
    let now = SystemTime::now();
    let diff = now.duration_since(t).unwrap_or_else(|e| e.duration());
    assert!(
        diff < Duration::from_secs(60),
        "system_time {t:?} is not near now {now:?}"
    );
}

/// A close reason's label, for `connections_closed_total`.
pub(crate) fn closed(reason: CloseReason) -> [(&'static str, &'static str); 1] {
    [("reason", reason.as_str())]
}
