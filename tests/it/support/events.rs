//! The observer side of the harness: an observer that forwards owned copies of its events into
//! a channel, and [`Events`], which reads them in order or waits for one that matches.

use std::net::SocketAddr;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::Duration;

use mllp_reactor::{
    CloseReason, ConnectionId, ConnectionStart, ConnectionStop, ExceptionReason, MessageException,
    MessageStart, MessageStop, Observer,
};

use super::WAIT;

/// An owned copy of a [`MessageException`].
#[derive(Clone, Debug)]
pub(crate) struct Exception {
    pub(crate) connection: ConnectionId,
    pub(crate) peer: SocketAddr,
    pub(crate) local: SocketAddr,
    pub(crate) sequence: Option<u64>,
    pub(crate) duration: Duration,
    pub(crate) message_size: usize,
    pub(crate) reason: ExceptionReason,
    pub(crate) detail: Option<String>,
}

/// One observer call, owned.
#[derive(Clone, Debug)]
pub(crate) enum Event {
    ConnectionStart(ConnectionStart),
    ConnectionStop(ConnectionStop),
    MessageStart(MessageStart),
    MessageStop(MessageStop),
    MessageException(Exception),
}

impl Event {
    /// The client's address (the connection's peer).
    pub(crate) fn peer(&self) -> SocketAddr {
        match self {
            Self::ConnectionStart(e) => e.peer,
            Self::ConnectionStop(e) => e.peer,
            Self::MessageStart(e) => e.peer,
            Self::MessageStop(e) => e.peer,
            Self::MessageException(e) => e.peer,
        }
    }
}

/// The kinds of `events`, for comparing a connection's sequence at a glance.
pub(crate) fn kinds(events: &[Event]) -> Vec<&'static str> {
    events
        .iter()
        .map(|e| match e {
            Event::ConnectionStart(_) => "connection_start",
            Event::ConnectionStop(_) => "connection_stop",
            Event::MessageStart(_) => "message_start",
            Event::MessageStop(_) => "message_stop",
            Event::MessageException(_) => "message_exception",
        })
        .collect()
}

/// Forwards every event into a channel (the observer runs on the reactor thread and must not
/// block: an unbounded send never does).
#[derive(Debug)]
pub(crate) struct Forward(Sender<Event>);

impl Observer for Forward {
    fn connection_start(&self, e: &ConnectionStart) {
        let _ = self.0.send(Event::ConnectionStart(e.clone()));
    }
    fn connection_stop(&self, e: &ConnectionStop) {
        let _ = self.0.send(Event::ConnectionStop(e.clone()));
    }
    fn message_start(&self, e: &MessageStart) {
        let _ = self.0.send(Event::MessageStart(e.clone()));
    }
    fn message_stop(&self, e: &MessageStop) {
        let _ = self.0.send(Event::MessageStop(e.clone()));
    }
    fn message_exception(&self, e: &MessageException<'_>) {
        let _ = self.0.send(Event::MessageException(Exception {
            connection: e.connection,
            peer: e.peer,
            local: e.local,
            sequence: e.sequence,
            duration: e.duration,
            message_size: e.message_size,
            reason: e.reason,
            detail: e.detail.map(str::to_owned),
        }));
    }
}

/// An observer and the receiving end of its events.
pub(super) fn observer() -> (Forward, Events) {
    let (tx, rx) = mpsc::channel();
    (
        Forward(tx),
        Events {
            rx,
            seen: Vec::new(),
            taken: 0,
        },
    )
}

/// The events a server reported. Two ways to read them:
/// - in order: [`next`](Self::next) and the typed `connection_start()` ... `message_exception()`
///   return the next event not yet taken, and [`assert_drained`](Self::assert_drained) checks
///   that none is left: for the exact sequence of a scenario;
/// - by search: [`wait`](Self::wait), [`wait_count`](Self::wait_count), [`count`](Self::count)
///   look at every event received so far (taken or not) and move nothing: for a test with
///   several connections, whose events interleave.
#[derive(Debug)]
pub(crate) struct Events {
    rx: Receiver<Event>,
    /// Every event received, in order.
    seen: Vec<Event>,
    /// How many of `seen` [`next`](Self::next) has returned.
    taken: usize,
}

macro_rules! expect_event {
    ($name:ident, $variant:ident, $ty:ty) => {
        #[doc = concat!("The next event, which must be a `", stringify!($variant), "`.")]
        #[track_caller]
        pub(crate) fn $name(&mut self) -> $ty {
            match self.next() {
                Event::$variant(e) => e,
                other => panic!(
                    concat!("expected ", stringify!($variant), ", got {:?}"),
                    other
                ),
            }
        }
    };
}

impl Events {
    /// The next event not yet taken, waiting at most [`WAIT`] for it.
    #[track_caller]
    pub(crate) fn next(&mut self) -> Event {
        if self.taken == self.seen.len() {
            let event = self.recv("the next event");
            self.seen.push(event);
        }
        self.taken += 1;
        self.seen[self.taken - 1].clone()
    }

    expect_event!(connection_start, ConnectionStart, ConnectionStart);
    expect_event!(connection_stop, ConnectionStop, ConnectionStop);
    expect_event!(message_start, MessageStart, MessageStart);
    expect_event!(message_stop, MessageStop, MessageStop);
    expect_event!(message_exception, MessageException, Exception);

    /// The next event, which must be the start of the connection from `client` to `server`
    /// (the client's and the server's address), with a current `system_time`.
    #[track_caller]
    pub(crate) fn started(&mut self, client: SocketAddr, server: SocketAddr) -> ConnectionStart {
        let start = self.connection_start();
        assert_eq!(start.peer, client, "peer is the client's local address");
        assert_eq!(start.local, server, "local is the server's address");
        super::assert_recent(start.system_time);
        start
    }

    /// The next two events, which must be message `sequence` of connection `id` starting with
    /// `size` bytes and stopping with a response of `response` bytes (`None`: no reply).
    #[track_caller]
    pub(crate) fn answered(
        &mut self,
        id: ConnectionId,
        sequence: u64,
        size: usize,
        response: Option<usize>,
    ) {
        let msg = self.message_start();
        assert_eq!(
            (msg.connection, msg.sequence, msg.message_size),
            (id, sequence, size),
            "message start"
        );
        let done = self.message_stop();
        assert_eq!(
            (done.connection, done.sequence, done.response_size),
            (id, sequence, response),
            "message stop"
        );
    }

    /// The next event, which must be the stop of connection `id` for `reason`; its lifetime.
    #[track_caller]
    pub(crate) fn stopped(&mut self, id: ConnectionId, reason: CloseReason) -> Duration {
        let stop = self.connection_stop();
        assert_eq!(
            (stop.connection, stop.reason),
            (id, reason),
            "connection stop"
        );
        stop.duration
    }

    /// Every event received so far (taking what has arrived, without waiting) from the
    /// connection of `peer`, in order, whether taken or not.
    pub(crate) fn of(&mut self, peer: SocketAddr) -> Vec<Event> {
        self.drain();
        self.seen
            .iter()
            .filter(|e| e.peer() == peer)
            .cloned()
            .collect()
    }

    /// Asserts that [`next`](Self::next) has taken every event received. Call it after the
    /// shutdown, when no more can come.
    #[track_caller]
    pub(crate) fn assert_drained(&mut self) {
        self.drain();
        let rest = &self.seen[self.taken..];
        assert!(rest.is_empty(), "unexpected extra events: {rest:#?}");
    }

    /// Waits up to [`WAIT`] for an event (received before or arriving now) matching `pred`.
    #[track_caller]
    pub(crate) fn wait(&mut self, what: &str, pred: impl Fn(&Event) -> bool) -> Event {
        self.wait_count(what, 1, &pred);
        self.seen
            .iter()
            .find(|e| pred(e))
            .cloned()
            .expect("counted above")
    }

    /// Waits up to [`WAIT`] until `n` events received match `pred`.
    #[track_caller]
    pub(crate) fn wait_count(&mut self, what: &str, n: usize, pred: impl Fn(&Event) -> bool) {
        let mut count = self.seen.iter().filter(|e| pred(e)).count();
        let deadline = std::time::Instant::now() + WAIT;
        while count < n {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(event) => {
                    count += usize::from(pred(&event));
                    self.seen.push(event);
                }
                Err(RecvTimeoutError::Timeout) => panic!(
                    "waited {WAIT:?} for {n} × {what}, saw {count}; last events: {:#?}",
                    &self.seen[self.seen.len().saturating_sub(8)..]
                ),
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("server gone while waiting for {what}")
                }
            }
        }
    }

    /// How many events received so far (taking what has arrived, without waiting) match
    /// `pred`.
    pub(crate) fn count(&mut self, pred: impl Fn(&Event) -> bool) -> usize {
        self.drain();
        self.seen.iter().filter(|e| pred(e)).count()
    }

    /// Waits for the connection from `peer` (the client's local address) to stop; its reason.
    #[track_caller]
    pub(crate) fn close_reason(&mut self, peer: SocketAddr) -> CloseReason {
        match self.wait("connection stop", |e| {
            matches!(e, Event::ConnectionStop(_)) && e.peer() == peer
        }) {
            Event::ConnectionStop(stop) => stop.reason,
            _ => unreachable!("matched a connection stop"),
        }
    }

    /// Waits for the connection from `peer` to stop and checks why.
    #[track_caller]
    pub(crate) fn expect_close(&mut self, peer: SocketAddr, reason: CloseReason) {
        assert_eq!(self.close_reason(peer), reason, "close reason of {peer}");
    }

    /// Takes whatever has arrived, without waiting.
    fn drain(&mut self) {
        self.seen.extend(self.rx.try_iter());
    }

    #[track_caller]
    fn recv(&self, what: &str) -> Event {
        match self.rx.recv_timeout(WAIT) {
            Ok(event) => event,
            Err(RecvTimeoutError::Timeout) => panic!("no {what} within {WAIT:?}"),
            Err(RecvTimeoutError::Disconnected) => {
                panic!("the server stopped; no {what} will come")
            }
        }
    }
}
