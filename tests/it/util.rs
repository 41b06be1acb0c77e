//! Bounded helpers for the loopback tests (after mio's `tests/util`): every socket gets read
//! and write timeouts, every wait has a deadline, and every helper is `#[track_caller]` so a
//! failure points at the test line that called it.
//!
//! Waiting is done on signals where one exists: the [`Events`] channel fed by the server's
//! observer, a [`gate`] or channel inside the handler, or reading until EOF. Where none exists
//! (a socket closed just after its stop event, a counter updated), [`wait_until`] polls up to a
//! deadline. [`pause`] only paces a sender; no test relies on it for correctness.
//!
//! The client side (sockets, deframing, descriptor counts) is in `net.rs`.

use std::net::SocketAddr;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use bytes::Bytes;
use mllp_reactor::{
    Builder, CloseReason, ConnectionId, ConnectionStart, ConnectionStop, ExceptionReason, Handler,
    MessageException, MessageStart, MessageStop, Observer, Reply, Server, ServerHandle, ack,
    handler_fn,
};

pub(crate) use crate::net::{Peer, Sockets, connection_sockets, is_reset, open_fds};

/// Read/write timeout of every test socket: far above anything a passing test waits for, so a
/// loaded 2-core machine does not fail a test, but a hang ends in seconds, not never.
pub(crate) const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a test waits for an observer event or a handler signal.
pub(crate) const WAIT: Duration = Duration::from_secs(10);
/// Grace period passed to `shutdown` at the end of a test.
pub(crate) const GRACE: Duration = Duration::from_secs(5);

pub(crate) const SB: u8 = 0x0B;
pub(crate) const EB: u8 = 0x1C;
pub(crate) const CR: u8 = 0x0D;

/// A sample ADT^A01 message whose MSH-10 is `control_id`.
pub(crate) fn ack_msg(control_id: &str) -> Vec<u8> {
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

/// Replies with the payload it got.
pub(crate) fn echo() -> impl Handler {
    handler_fn(|msg, _cx| Ok(Reply::Send(msg.clone())))
}

/// Replies with an AA built from the message.
pub(crate) fn accept() -> impl Handler {
    handler_fn(|msg, _cx| Ok(Reply::Send(ack::accept(msg))))
}

/// Starts `handler` on 127.0.0.1:0 with default options.
#[track_caller]
pub(crate) fn start(handler: impl Handler) -> ServerHandle {
    start_with(handler, |b| b)
}

/// Starts `handler` on 127.0.0.1:0 with the builder tweaked by `tweak`.
#[track_caller]
pub(crate) fn start_with(
    handler: impl Handler,
    tweak: impl FnOnce(Builder) -> Builder,
) -> ServerHandle {
    start_at("127.0.0.1:0", handler, tweak)
}

/// Starts `handler` on `addr` with the builder tweaked by `tweak`.
#[track_caller]
pub(crate) fn start_at(
    addr: &str,
    handler: impl Handler,
    tweak: impl FnOnce(Builder) -> Builder,
) -> ServerHandle {
    tweak(with_test_reactors(Server::builder(handler)))
        .bind(addr)
        .unwrap_or_else(|e| panic!("bind {addr}: {e}"))
        .spawn()
        .expect("spawn the server")
}

/// Starts `handler` on 127.0.0.1:0 with an observer that forwards every event to the returned
/// [`Events`].
#[track_caller]
pub(crate) fn start_observed(
    handler: impl Handler,
    tweak: impl FnOnce(Builder) -> Builder,
) -> (ServerHandle, Events) {
    let (observer, events) = observer();
    (start_with(handler, |b| tweak(b.observer(observer))), events)
}

/// Applies `MLLP_TEST_REACTORS` (default 1): CI runs this suite with 2 reactors too, so every
/// behaviour is checked with connections spread over reactors.
pub(crate) fn with_test_reactors(builder: Builder) -> Builder {
    let n = std::env::var("MLLP_TEST_REACTORS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    builder.reactors(n)
}

/// Shuts the server down gracefully and checks it stopped cleanly.
#[track_caller]
pub(crate) fn stop(server: ServerHandle) -> mllp_reactor::ShutdownReport {
    server.shutdown(GRACE).expect("server shut down cleanly")
}

/// One observer event, owned.
#[derive(Clone, Debug)]
#[allow(dead_code)] // ids are read through `Debug`, in failure messages
pub(crate) enum Event {
    ConnStart {
        id: ConnectionId,
        peer: SocketAddr,
    },
    ConnStop {
        id: ConnectionId,
        peer: SocketAddr,
        reason: CloseReason,
    },
    MsgStart {
        id: ConnectionId,
        peer: SocketAddr,
        seq: u64,
        size: usize,
    },
    MsgStop {
        id: ConnectionId,
        peer: SocketAddr,
        seq: u64,
        response_size: Option<usize>,
    },
    MsgException {
        id: ConnectionId,
        peer: SocketAddr,
        seq: Option<u64>,
        reason: ExceptionReason,
        size: usize,
    },
}

impl Event {
    pub(crate) fn peer(&self) -> SocketAddr {
        match self {
            Self::ConnStart { peer, .. }
            | Self::ConnStop { peer, .. }
            | Self::MsgStart { peer, .. }
            | Self::MsgStop { peer, .. }
            | Self::MsgException { peer, .. } => *peer,
        }
    }
}

/// Forwards every observer event into a channel.
pub(crate) struct Forward(Sender<Event>);

impl Observer for Forward {
    fn connection_start(&self, e: &ConnectionStart) {
        let _ = self.0.send(Event::ConnStart {
            id: e.connection,
            peer: e.peer,
        });
    }
    fn connection_stop(&self, e: &ConnectionStop) {
        let _ = self.0.send(Event::ConnStop {
            id: e.connection,
            peer: e.peer,
            reason: e.reason,
        });
    }
    fn message_start(&self, e: &MessageStart) {
        let _ = self.0.send(Event::MsgStart {
            id: e.connection,
            peer: e.peer,
            seq: e.sequence,
            size: e.message_size,
        });
    }
    fn message_stop(&self, e: &MessageStop) {
        let _ = self.0.send(Event::MsgStop {
            id: e.connection,
            peer: e.peer,
            seq: e.sequence,
            response_size: e.response_size,
        });
    }
    fn message_exception(&self, e: &MessageException<'_>) {
        let _ = self.0.send(Event::MsgException {
            id: e.connection,
            peer: e.peer,
            seq: e.sequence,
            reason: e.reason,
            size: e.message_size,
        });
    }
}

/// An observer and the receiving end of its events.
pub(crate) fn observer() -> (Forward, Events) {
    let (tx, rx) = mpsc::channel();
    (
        Forward(tx),
        Events {
            rx,
            seen: Vec::new(),
        },
    )
}

/// The events a server reported so far, and a way to wait for more.
pub(crate) struct Events {
    rx: Receiver<Event>,
    /// Every event received, in order.
    pub(crate) seen: Vec<Event>,
}

impl Events {
    /// Takes whatever has arrived without waiting.
    pub(crate) fn drain(&mut self) {
        self.seen.extend(self.rx.try_iter());
    }

    /// Waits up to [`WAIT`] for an event (seen before or arriving now) matching `pred`.
    #[track_caller]
    pub(crate) fn wait(&mut self, what: &str, pred: impl Fn(&Event) -> bool) -> Event {
        self.wait_count(what, 1, &pred);
        self.seen
            .iter()
            .find(|e| pred(e))
            .cloned()
            .expect("counted above")
    }

    /// Waits up to [`WAIT`] until `n` events match `pred`.
    #[track_caller]
    pub(crate) fn wait_count(&mut self, what: &str, n: usize, pred: impl Fn(&Event) -> bool) {
        let deadline = Instant::now() + WAIT;
        let mut count = self.seen.iter().filter(|e| pred(e)).count();
        while count < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(event) => {
                    count += usize::from(pred(&event));
                    self.seen.push(event);
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "waited {WAIT:?} for {n} × {what}, saw {count}; last events: {:?}",
                        self.tail()
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("server gone while waiting for {what}")
                }
            }
        }
    }

    /// How many events seen so far match `pred` (after taking what has arrived).
    pub(crate) fn count(&mut self, pred: impl Fn(&Event) -> bool) -> usize {
        self.drain();
        self.seen.iter().filter(|e| pred(e)).count()
    }

    /// Waits for the connection from `peer` (the client's local address) to close; its reason.
    #[track_caller]
    pub(crate) fn close_reason(&mut self, peer: SocketAddr) -> CloseReason {
        match self.wait("connection stop", |e| {
            matches!(e, Event::ConnStop { .. }) && e.peer() == peer
        }) {
            Event::ConnStop { reason, .. } => reason,
            _ => unreachable!(),
        }
    }

    /// Waits for the connection from `peer` to close and checks why.
    #[track_caller]
    pub(crate) fn expect_close(&mut self, peer: SocketAddr, reason: CloseReason) {
        assert_eq!(self.close_reason(peer), reason, "close reason of {peer}");
    }

    fn tail(&self) -> &[Event] {
        &self.seen[self.seen.len().saturating_sub(8)..]
    }
}

/// Checks that `reply` is an ACK with code `code` answering MSH-10 `control_id`.
#[track_caller]
pub(crate) fn assert_ack(reply: &[u8], code: ack::AckCode, control_id: &str) {
    let parsed = ack::parse(reply)
        .unwrap_or_else(|e| panic!("not an ACK ({e}): {:?}", Bytes::copy_from_slice(reply)));
    assert_eq!(
        parsed.code,
        code,
        "MSA-1 of {:?}",
        Bytes::copy_from_slice(reply)
    );
    assert_eq!(
        parsed.control_id,
        control_id.as_bytes(),
        "MSA-2 of {:?}",
        Bytes::copy_from_slice(reply)
    );
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
/// waits (at most [`WAIT`]) until the test releases it.
pub(crate) struct Gate {
    entered: std::sync::Mutex<Sender<()>>,
    release: std::sync::Mutex<Receiver<()>>,
}

impl Gate {
    pub(crate) fn block(&self) {
        let _ = self.entered.lock().unwrap().send(());
        let _ = self.release.lock().unwrap().recv_timeout(WAIT);
    }
}

/// The test's side of a [`gate`].
pub(crate) struct GateControl {
    entered: Receiver<()>,
    release: Sender<()>,
}

impl GateControl {
    /// Waits until a handler is blocked in the gate.
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
pub(crate) fn gate() -> (std::sync::Arc<Gate>, GateControl) {
    let (entered_tx, entered) = mpsc::channel();
    let (release, release_rx) = mpsc::channel();
    let gate = Gate {
        entered: std::sync::Mutex::new(entered_tx),
        release: std::sync::Mutex::new(release_rx),
    };
    (std::sync::Arc::new(gate), GateControl { entered, release })
}

/// Counter totals of a `DebuggingRecorder` (whose snapshots reset its counters, so the totals
/// are kept here), summed over labels.
pub(crate) struct Counters {
    snapshotter: metrics_util::debugging::Snapshotter,
    totals: std::collections::HashMap<String, u64>,
}

impl Counters {
    pub(crate) fn new(snapshotter: metrics_util::debugging::Snapshotter) -> Self {
        Self {
            snapshotter,
            totals: std::collections::HashMap::new(),
        }
    }

    /// The total of counter `name` so far.
    pub(crate) fn get(&mut self, name: &str) -> u64 {
        for (key, _, _, value) in self.snapshotter.snapshot().into_vec() {
            if let metrics_util::debugging::DebugValue::Counter(n) = value {
                *self.totals.entry(key.key().name().to_owned()).or_default() += n;
            }
        }
        self.totals.get(name).copied().unwrap_or(0)
    }

    /// Waits up to [`WAIT`] for counter `name` to reach `want`: counters updated on the reactor
    /// thread lag the replies the test sees. Returns the last total read.
    pub(crate) fn wait_for(&mut self, name: &str, want: u64) -> u64 {
        let deadline = Instant::now() + WAIT;
        loop {
            let value = self.get(name);
            if value >= want || Instant::now() >= deadline {
                return value;
            }
            // No event marks these updates: poll, bounded by the deadline.
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// A handler that holds the first message it gets in `gate`, then accepts it, and accepts
/// every later message at once.
pub(crate) fn accept_first_gated(gate: std::sync::Arc<Gate>) -> impl Handler {
    let first = std::sync::atomic::AtomicBool::new(true);
    handler_fn(move |msg, _| {
        if first.swap(false, std::sync::atomic::Ordering::SeqCst) {
            gate.block();
        }
        Ok(Reply::Send(ack::accept(msg)))
    })
}

/// The MSH-10 of `message`, or "" if it has none.
pub(crate) fn control_id(message: &[u8]) -> String {
    let id = mllp_reactor::msh::Msh::parse(message)
        .ok()
        .and_then(|m| m.control_id())
        .unwrap_or_default();
    String::from_utf8_lossy(id).into_owned()
}
