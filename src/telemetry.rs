//! Telemetry: five events (connection start and stop, message start, stop and exception) as an
//! [`Observer`] hook, and metrics through the [`metrics`] facade.
//!
//! # Observer
//!
//! Every observer method is called **on the reactor thread**, in the order things happened,
//! exactly once per event (of those it asks for: [`Observer::message_events`]):
//! `connection_start` before anything else of that connection, `message_start` before that
//! message's `message_stop` or `message_exception`, and `connection_stop` last. An oversize
//! frame gives a `message_exception` with no `message_start` (the handler never saw it).
//! Observers must be cheap and must not block: the reactor serves every connection of the
//! server from that thread. Forward to a channel if you need to do real work.
//!
//! # Metrics
//!
//! Every metric carries the label `listener` (the builder's `listener_name`, default `mllp`).
//! Handles are registered once when the server is bound, with whatever recorder is installed
//! (globally, or with `metrics::with_local_recorder` around `bind()`), so **install the
//! recorder before `bind()`**; the hot path then costs one atomic operation per update and never
//! builds a key. Without a recorder, turn the timing histograms off
//! ([`Builder::timing_histograms`](crate::Builder::timing_histograms)): the three `_seconds`
//! histograms per message then stay empty and cost no clock reading.
//!
//! | name | kind | unit | labels |
//! |---|---|---|---|
//! | `mllp_connections_accepted_total` | counter | | |
//! | `mllp_connections_rejected_total` | counter | | `reason` = `max_connections`, `not_allowed`, `proxy_header`, `handshake_timeout`, `tls_plaintext`, `tls_no_client_cert`, `tls_bad_client_cert`, `tls_handshake`, `shutdown`, `probe` |
//! | `mllp_connections_closed_total` | counter | | `reason` = [`CloseReason::as_str`] |
//! | `mllp_connections_active` | gauge | | |
//! | `mllp_connection_duration_seconds` | histogram | seconds | |
//! | `mllp_messages_received_total` | counter | | |
//! | `mllp_messages_handled_total` | counter | | `outcome` = reply, no_reply, error, panic, timeout |
//! | `mllp_message_size_bytes` | histogram | bytes (unframed) | |
//! | `mllp_response_size_bytes` | histogram | bytes (unframed) | |
//! | `mllp_handler_queue_seconds` | histogram | seconds: frame complete → handler start | |
//! | `mllp_handler_duration_seconds` | histogram | seconds: handler run time (inline: from the reactor's latest clock reading before the call, so the message's read and decode since it count too) | |
//! | `mllp_response_latency_seconds` | histogram | seconds: frame complete → reply written | |
//! | `mllp_bytes_received_total` | counter | bytes | |
//! | `mllp_bytes_sent_total` | counter | bytes | |
//! | `mllp_socket_writes_total` | counter | | |
//! | `mllp_junk_bytes_total` | counter | bytes outside frames | |
//! | `mllp_frames_rejected_total` | counter | | `reason` = too_large, frame_timeout |
//! | `mllp_naks_sent_total` | counter | | `code` = AE, AR: NAKs the server builds and NAKs a handler returns (by MSA-1), alike |
//! | `mllp_handler_late_results_total` | counter | | |
//! | `mllp_workers_replaced_total` | counter | | |
//! | `mllp_workers_busy` | gauge | | |
//! | `mllp_handler_jobs_dropped_total` | counter | | |
//! | `mllp_inline_handler_slow_total` | counter | | |
//! | `mllp_observer_panics_total` | counter | | |
//! | `mllp_buffered_bytes` | gauge | bytes | |
//! | `mllp_read_pauses_total` | counter | | |

use std::net::SocketAddr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use metrics::{Counter, Gauge, Histogram, Unit};

use crate::ack::AckCode;
use crate::connection::{Event, FrameRejection, Handled};
use crate::outcome::ConnectionId;
use crate::reason::{CloseReason, ExceptionReason, RejectReason};

/// Receives the server's events. Every method has a no-op default; implement the ones you
/// need. See the [module docs](self) for threading and ordering.
///
/// ```
/// use std::sync::mpsc;
/// use std::sync::Mutex;
/// use mllp_reactor::{ConnectionStop, Observer};
///
/// struct Stops(Mutex<mpsc::Sender<String>>);
/// impl Observer for Stops {
///     fn connection_stop(&self, e: &ConnectionStop) {
///         let _ = self.0.lock().unwrap().send(format!("{} closed: {}", e.peer, e.reason));
///     }
/// }
/// let (tx, _stops) = mpsc::channel();
/// let handler = mllp_reactor::handler_fn(|_, _| Ok(mllp_reactor::Reply::NoReply));
/// let server = mllp_reactor::Server::builder(handler).observer(Stops(Mutex::new(tx))).bind("127.0.0.1:0")?;
/// # drop(server);
/// # Ok::<(), mllp_reactor::Error>(())
/// ```
#[allow(unused_variables)]
pub trait Observer: Send + Sync + 'static {
    /// A connection was accepted (and, behind PROXY protocol or TLS, has started).
    fn connection_start(&self, event: &ConnectionStart) {}
    /// A connection ended.
    fn connection_stop(&self, event: &ConnectionStop) {}
    /// A complete message was handed to the handler.
    fn message_start(&self, event: &MessageStart) {}
    /// A message's reply was written, or it needed none.
    fn message_stop(&self, event: &MessageStop) {}
    /// A message failed: handler error, panic, timeout, or an oversize frame.
    fn message_exception(&self, event: &MessageException<'_>) {}

    /// Which of [`message_start`](Self::message_start) and
    /// [`message_stop`](Self::message_stop) this observer wants, asked once when the server
    /// is bound (a later answer changes nothing). The default, [`MessageEvents::All`], is
    /// every one of them; an observer that ignores most of them says so here, and the reactor
    /// then skips building and delivering them (two events per message, with the peer's
    /// addresses: the largest part of an observer's cost per message). Connection events and
    /// [`message_exception`](Self::message_exception) always come. Metrics do not depend
    /// on it.
    ///
    /// ```
    /// use mllp_reactor::{MessageEvents, MessageStart, Observer};
    ///
    /// /// Logs each connection's first message only.
    /// struct FirstMessages;
    /// impl Observer for FirstMessages {
    ///     fn message_start(&self, e: &MessageStart) {
    ///         // Sequence 0 only: the others are not even built.
    ///         println!("{} sent its first message", e.peer);
    ///     }
    ///     fn message_events(&self) -> MessageEvents {
    ///         MessageEvents::FirstStart
    ///     }
    /// }
    /// let handler = mllp_reactor::handler_fn(|_, _| Ok(mllp_reactor::Reply::NoReply));
    /// let server = mllp_reactor::Server::builder(handler).observer(FirstMessages).bind("127.0.0.1:0")?;
    /// # drop(server);
    /// # Ok::<(), mllp_reactor::Error>(())
    /// ```
    fn message_events(&self) -> MessageEvents {
        MessageEvents::All
    }
}

/// The per-message events an [`Observer`] wants ([`Observer::message_events`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum MessageEvents {
    /// [`Observer::message_start`] and [`Observer::message_stop`] for every message (the
    /// default).
    #[default]
    All,
    /// [`Observer::message_start`] for each connection's first message only (sequence 0:
    /// the connection carries data, not a health check's probe), and no
    /// [`Observer::message_stop`].
    FirstStart,
    /// Neither.
    None,
}

impl MessageEvents {
    /// Whether message `seq`'s start is delivered.
    fn start(self, seq: u64) -> bool {
        match self {
            Self::All => true,
            Self::FirstStart => seq == 0,
            Self::None => false,
        }
    }
}

/// A connection was accepted.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ConnectionStart {
    /// The connection's unique id.
    pub connection: ConnectionId,
    /// The peer's address.
    pub peer: SocketAddr,
    /// The local address it connected to.
    pub local: SocketAddr,
    /// Wall-clock time of the accept.
    pub system_time: SystemTime,
    /// The verified client certificate's identity (mutual TLS; feature `tls`).
    pub peer_identity: Option<Arc<crate::identity::PeerIdentity>>,
}

/// A connection ended.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ConnectionStop {
    /// The connection's unique id.
    pub connection: ConnectionId,
    /// The peer's address.
    pub peer: SocketAddr,
    /// The local address it connected to.
    pub local: SocketAddr,
    /// Time since the accept.
    pub duration: Duration,
    /// Why it ended.
    pub reason: CloseReason,
    /// The verified client certificate's identity (mutual TLS; feature `tls`).
    pub peer_identity: Option<Arc<crate::identity::PeerIdentity>>,
}

/// A complete message was handed to the pool.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct MessageStart {
    /// The connection's unique id.
    pub connection: ConnectionId,
    /// The peer's address.
    pub peer: SocketAddr,
    /// The local address it connected to.
    pub local: SocketAddr,
    /// The message's sequence number on the connection, from 0.
    pub sequence: u64,
    /// Payload size, unframed.
    pub message_size: usize,
    /// Wall-clock time the message was complete.
    pub system_time: SystemTime,
}

/// A message was answered (or needed no answer).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct MessageStop {
    /// The connection's unique id.
    pub connection: ConnectionId,
    /// The peer's address.
    pub peer: SocketAddr,
    /// The local address it connected to.
    pub local: SocketAddr,
    /// The message's sequence number on the connection.
    pub sequence: u64,
    /// From the message's last byte read to its reply's last byte written.
    pub duration: Duration,
    /// Reply size, unframed; `None` when the handler sent no reply.
    pub response_size: Option<usize>,
}

/// A message failed.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct MessageException<'a> {
    /// The connection's unique id.
    pub connection: ConnectionId,
    /// The peer's address.
    pub peer: SocketAddr,
    /// The local address it connected to.
    pub local: SocketAddr,
    /// The message's sequence number; `None` for an oversize frame (never dispatched).
    pub sequence: Option<u64>,
    /// From the message's last byte read to the failure; zero for an oversize frame.
    pub duration: Duration,
    /// Payload bytes (for an oversize frame: bytes received when it was rejected).
    pub message_size: usize,
    /// What went wrong.
    pub reason: ExceptionReason,
    /// The handler's error text or panic message, when there is one.
    pub detail: Option<&'a str>,
    /// The message's MSH-10 as a NAK quotes it (block bytes escaped, at most 199 bytes), when
    /// the message has a readable one.
    pub control_id: Option<&'a [u8]>,
}

/// Metric names, public so dashboards and tests can refer to them.
pub mod names {
    /// Counter: connections accepted and served.
    pub const CONNECTIONS_ACCEPTED: &str = "mllp_connections_accepted_total";
    /// Counter: connections accepted and closed at once; label `reason`.
    pub const CONNECTIONS_REJECTED: &str = "mllp_connections_rejected_total";
    /// Counter: connections closed; label `reason`.
    pub const CONNECTIONS_CLOSED: &str = "mllp_connections_closed_total";
    /// Gauge: connections open now.
    pub const CONNECTIONS_ACTIVE: &str = "mllp_connections_active";
    /// Histogram: connection lifetime, seconds.
    pub const CONNECTION_DURATION: &str = "mllp_connection_duration_seconds";
    /// Counter: complete frames handed to the handler.
    pub const MESSAGES_RECEIVED: &str = "mllp_messages_received_total";
    /// Counter: handler outcomes; label `outcome`.
    pub const MESSAGES_HANDLED: &str = "mllp_messages_handled_total";
    /// Histogram: message payload size, bytes.
    pub const MESSAGE_SIZE: &str = "mllp_message_size_bytes";
    /// Histogram: reply payload size, bytes.
    pub const RESPONSE_SIZE: &str = "mllp_response_size_bytes";
    /// Histogram: frame complete → handler start, seconds.
    pub const HANDLER_QUEUE: &str = "mllp_handler_queue_seconds";
    /// Histogram: handler run time, seconds. On a pool worker, the call itself; inline, from
    /// the reactor's latest clock reading before the call (the poll turn's start, or the end
    /// of the previous inline call or of a write) to its return, so the message's read and
    /// decode since that reading (microseconds) count too: one clock reading per message.
    pub const HANDLER_DURATION: &str = "mllp_handler_duration_seconds";
    /// Histogram: frame complete → reply's last byte written, seconds.
    pub const RESPONSE_LATENCY: &str = "mllp_response_latency_seconds";
    /// Counter: bytes read from peers.
    pub const BYTES_RECEIVED: &str = "mllp_bytes_received_total";
    /// Counter: bytes written to peers.
    pub const BYTES_SENT: &str = "mllp_bytes_sent_total";
    /// Counter: write system calls to peers (one `writev` carries many replies).
    pub const SOCKET_WRITES: &str = "mllp_socket_writes_total";
    /// Counter: bytes dropped outside frames.
    pub const JUNK_BYTES: &str = "mllp_junk_bytes_total";
    /// Counter: frames rejected before the handler; label `reason`.
    pub const FRAMES_REJECTED: &str = "mllp_frames_rejected_total";
    /// Counter: NAKs sent by the server itself; label `code`.
    pub const NAKS_SENT: &str = "mllp_naks_sent_total";
    /// Counter: handler results discarded because their message had timed out or its
    /// connection had closed (e.g. reset by the peer) before the result arrived.
    pub const LATE_RESULTS: &str = "mllp_handler_late_results_total";
    /// Counter: workers started to replace stuck ones.
    pub const WORKERS_REPLACED: &str = "mllp_workers_replaced_total";
    /// Gauge: workers running a handler now.
    pub const WORKERS_BUSY: &str = "mllp_workers_busy";
    /// Counter: queued handler jobs dropped before running (connection closed, or message
    /// already answered with a timeout NAK).
    pub const JOBS_DROPPED: &str = "mllp_handler_jobs_dropped_total";
    /// Counter: inline handler calls slower than the builder's `inline_slow_threshold`.
    pub const INLINE_SLOW: &str = "mllp_inline_handler_slow_total";
    /// Counter: observer calls that panicked (caught; the server goes on).
    pub const OBSERVER_PANICS: &str = "mllp_observer_panics_total";
    /// Gauge: bytes buffered by the server (partial frames, read-ahead, messages in flight,
    /// replies not yet written), counted against `max_memory`.
    pub const BUFFERED_BYTES: &str = "mllp_buffered_bytes";
    /// Counter: times the server stopped reading because buffered bytes reached `max_memory`.
    pub const READ_PAUSES: &str = "mllp_read_pauses_total";
}

/// Pre-registered metric handles of one server. Cloning shares them.
#[derive(Clone, Debug)]
pub(crate) struct Metrics {
    pub(crate) accepted: Counter,
    /// By [`RejectReason::index`]. A connection that never started (over the cap, not
    /// allowed, no valid PROXY header, no completed handshake) counts only here, so accepted =
    /// Σ closed + active holds.
    rejected: [Counter; RejectReason::ALL.len()],
    closed: [Counter; CloseReason::ALL.len()],
    pub(crate) active: Gauge,
    pub(crate) connection_duration: Histogram,
    pub(crate) received: Counter,
    handled: [Counter; Handled::LABELS.len()],
    pub(crate) message_size: Histogram,
    pub(crate) response_size: Histogram,
    pub(crate) handler_queue: Histogram,
    pub(crate) handler_duration: Histogram,
    pub(crate) response_latency: Histogram,
    pub(crate) bytes_received: Counter,
    pub(crate) bytes_sent: Counter,
    pub(crate) socket_writes: Counter,
    pub(crate) junk: Counter,
    pub(crate) frames_too_large: Counter,
    pub(crate) frames_timed_out: Counter,
    pub(crate) naks_ae: Counter,
    pub(crate) naks_ar: Counter,
    pub(crate) late_results: Counter,
    pub(crate) workers_replaced: Counter,
    pub(crate) workers_busy: Gauge,
    pub(crate) jobs_dropped: Counter,
    pub(crate) inline_slow: Counter,
    pub(crate) observer_panics: Counter,
    pub(crate) buffered_bytes: Gauge,
    pub(crate) read_pauses: Counter,
    /// Whether messages are timed for the timing histograms (queue, handler, response
    /// latency): the builder's `timing_histograms`.
    pub(crate) timings: bool,
}

impl Metrics {
    /// Describes every metric and registers the handles with the current recorder.
    pub(crate) fn register(listener: &str) -> Self {
        use names::*;
        describe();
        let l = || [("listener", listener.to_owned())];
        let counter = |name: &'static str| metrics::counter!(name, &l());
        let labelled = |name: &'static str, key: &'static str, value: &'static str| {
            metrics::counter!(
                name,
                &[("listener", listener.to_owned()), (key, value.to_owned())]
            )
        };
        Self {
            accepted: counter(CONNECTIONS_ACCEPTED),
            rejected: RejectReason::ALL
                .map(|r| labelled(CONNECTIONS_REJECTED, "reason", r.as_str())),
            closed: CloseReason::ALL.map(|r| labelled(CONNECTIONS_CLOSED, "reason", r.as_str())),
            active: metrics::gauge!(CONNECTIONS_ACTIVE, &l()),
            connection_duration: metrics::histogram!(CONNECTION_DURATION, &l()),
            received: counter(MESSAGES_RECEIVED),
            handled: Handled::LABELS.map(|o| labelled(MESSAGES_HANDLED, "outcome", o)),
            message_size: metrics::histogram!(MESSAGE_SIZE, &l()),
            response_size: metrics::histogram!(RESPONSE_SIZE, &l()),
            handler_queue: metrics::histogram!(HANDLER_QUEUE, &l()),
            handler_duration: metrics::histogram!(HANDLER_DURATION, &l()),
            response_latency: metrics::histogram!(RESPONSE_LATENCY, &l()),
            bytes_received: counter(BYTES_RECEIVED),
            bytes_sent: counter(BYTES_SENT),
            socket_writes: counter(SOCKET_WRITES),
            junk: counter(JUNK_BYTES),
            frames_too_large: labelled(FRAMES_REJECTED, "reason", "too_large"),
            frames_timed_out: labelled(FRAMES_REJECTED, "reason", "frame_timeout"),
            naks_ae: labelled(NAKS_SENT, "code", "AE"),
            naks_ar: labelled(NAKS_SENT, "code", "AR"),
            late_results: counter(LATE_RESULTS),
            workers_replaced: counter(WORKERS_REPLACED),
            workers_busy: metrics::gauge!(WORKERS_BUSY, &l()),
            jobs_dropped: counter(JOBS_DROPPED),
            inline_slow: counter(INLINE_SLOW),
            observer_panics: counter(OBSERVER_PANICS),
            buffered_bytes: metrics::gauge!(BUFFERED_BYTES, &l()),
            read_pauses: counter(READ_PAUSES),
            timings: true,
        }
    }

    /// The rejected-connections counter for `reason`.
    pub(crate) fn rejected(&self, reason: RejectReason) -> &Counter {
        &self.rejected[reason.index()]
    }

    pub(crate) fn closed(&self, reason: CloseReason) -> &Counter {
        &self.closed[reason.index()]
    }
}

/// Registers units and descriptions with the current recorder.
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    use names::*;
    describe_counter!(CONNECTIONS_ACCEPTED, "Connections accepted and served");
    describe_counter!(
        CONNECTIONS_REJECTED,
        "Connections accepted and closed at once"
    );
    describe_counter!(CONNECTIONS_CLOSED, "Connections closed, by reason");
    describe_gauge!(CONNECTIONS_ACTIVE, "Connections open now");
    describe_histogram!(CONNECTION_DURATION, Unit::Seconds, "Connection lifetime");
    describe_counter!(MESSAGES_RECEIVED, "Complete messages handed to the handler");
    describe_counter!(MESSAGES_HANDLED, "Handler outcomes");
    describe_histogram!(MESSAGE_SIZE, Unit::Bytes, "Message payload size, unframed");
    describe_histogram!(RESPONSE_SIZE, Unit::Bytes, "Reply payload size, unframed");
    describe_histogram!(
        HANDLER_QUEUE,
        Unit::Seconds,
        "Frame complete to handler start"
    );
    describe_histogram!(HANDLER_DURATION, Unit::Seconds, "Handler run time");
    describe_histogram!(
        RESPONSE_LATENCY,
        Unit::Seconds,
        "Frame complete to reply written"
    );
    describe_counter!(BYTES_RECEIVED, Unit::Bytes, "Bytes read from peers");
    describe_counter!(BYTES_SENT, Unit::Bytes, "Bytes written to peers");
    describe_counter!(SOCKET_WRITES, "Write system calls to peers");
    describe_counter!(JUNK_BYTES, Unit::Bytes, "Bytes dropped outside frames");
    describe_counter!(
        FRAMES_REJECTED,
        "Frames rejected before reaching the handler"
    );
    describe_counter!(NAKS_SENT, "NAKs sent by the server");
    describe_counter!(
        LATE_RESULTS,
        "Handler results discarded: the message timed out or its connection closed first"
    );
    describe_counter!(WORKERS_REPLACED, "Workers started to replace stuck ones");
    describe_gauge!(WORKERS_BUSY, "Workers running a handler");
    describe_counter!(
        JOBS_DROPPED,
        "Queued handler jobs dropped before running: connection closed or message already answered"
    );
    describe_counter!(
        INLINE_SLOW,
        "Inline handler calls slower than the threshold"
    );
    describe_counter!(OBSERVER_PANICS, "Observer calls that panicked");
    describe_gauge!(
        BUFFERED_BYTES,
        Unit::Bytes,
        "Bytes buffered by the server, counted against max_memory"
    );
    describe_counter!(READ_PAUSES, "Times reading stopped at the memory budget");
}

/// The per-message counters of one poll turn, kept in plain integers and added to the metric
/// handles once per turn ([`flush`](Self::flush)): one add per counter per turn instead of
/// one per message (with a recorder installed, each add is an atomic read-modify-write on a
/// line every reactor shares). Counts reach the recorder at the end of the turn they happen
/// in, before the reactor sleeps again. Histograms are still recorded per message.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    received: u64,
    /// Messages handled with a reply (`outcome="reply"`): the other outcomes are rare.
    replied: u64,
    /// Counts of the rare events, looked at only when `rare` is set: the flush after a turn
    /// of ordinary messages checks two numbers (callgrind, S1: checking the five outcomes
    /// every turn was about 20 instructions per turn).
    rare: bool,
    /// Messages handled, by outcome (`Handled as usize`); the replies are in `replied`.
    handled: [u64; Handled::LABELS.len()],
    junk: u64,
    naks_ae: u64,
    naks_ar: u64,
    late_results: u64,
    frames_too_large: u64,
    frames_timed_out: u64,
}

impl Tally {
    /// Adds the turn's counts to the metric handles and starts again from zero.
    // Inline: two counts checked per turn, the rare ones out of line (callgrind, S1: the
    // call and its saved registers were about a third of its 33 instructions).
    #[inline]
    pub(crate) fn flush(&mut self, m: &Metrics) {
        add(&m.received, &mut self.received);
        add(&m.handled[Handled::Reply as usize], &mut self.replied);
        if std::mem::take(&mut self.rare) {
            self.flush_rare(m);
        }
    }

    /// [`flush`](Self::flush) of the rare counts.
    #[inline(never)]
    fn flush_rare(&mut self, m: &Metrics) {
        // `handled` is indexed by `Handled as usize`, as the tally is.
        for (counter, n) in m.handled.iter().zip(&mut self.handled) {
            add(counter, n);
        }
        add(&m.junk, &mut self.junk);
        add(&m.naks_ae, &mut self.naks_ae);
        add(&m.naks_ar, &mut self.naks_ar);
        add(&m.late_results, &mut self.late_results);
        add(&m.frames_too_large, &mut self.frames_too_large);
        add(&m.frames_timed_out, &mut self.frames_timed_out);
    }

    /// Counts one rare event into `field`.
    fn rare(&mut self, field: fn(&mut Self) -> &mut u64, n: u64) {
        self.rare = true;
        *field(self) += n;
    }
}

/// Adds `n` to `counter` and zeroes it, if it is not zero.
#[inline]
fn add(counter: &Counter, n: &mut u64) {
    if *n > 0 {
        counter.increment(std::mem::take(n));
    }
}

/// Who a connection's events are about (the reactor's view of it).
#[derive(Clone, Debug)]
pub(crate) struct Peer {
    pub(crate) connection: ConnectionId,
    pub(crate) peer: SocketAddr,
    pub(crate) local: SocketAddr,
    /// The verified client certificate (mutual TLS).
    pub(crate) identity: Option<Arc<crate::identity::PeerIdentity>>,
}

/// Where events go: the metric handles and the optional observer. Observer panics are caught
/// and counted: a faulty observer must not take the reactor down.
#[derive(Clone)]
pub(crate) struct Telemetry {
    pub(crate) metrics: Metrics,
    observer: Option<Arc<dyn Observer>>,
    /// The observer's [`Observer::message_events`], asked once ([`MessageEvents::None`]
    /// without one): one branch per message decides whether an event is built.
    messages: MessageEvents,
    /// A message stop's duration is wanted: by the response-latency histogram or by the
    /// observer.
    times_stops: bool,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry").finish_non_exhaustive()
    }
}

impl Telemetry {
    /// Events go to `observer` (if any) and `metrics`.
    pub(crate) fn new(metrics: Metrics, observer: Option<Arc<dyn Observer>>) -> Self {
        let messages = observer
            .as_deref()
            .map_or(MessageEvents::None, Observer::message_events);
        Self {
            times_stops: metrics.timings || messages == MessageEvents::All,
            metrics,
            observer,
            messages,
        }
    }

    /// Whether a message stop's duration is wanted, so the reactor reads a fresh clock for it
    /// after a write. Without one, events are reported with the reactor's latest reading,
    /// which is never earlier than the event (an exception's duration ends there).
    pub(crate) fn times_stops(&self) -> bool {
        self.times_stops
    }

    /// Calls the observer (if any), catching a panic.
    pub(crate) fn observe(&self, call: impl FnOnce(&dyn Observer)) {
        if let Some(o) = self.observer.as_deref()
            && catch_unwind(AssertUnwindSafe(|| call(o))).is_err()
        {
            self.metrics.observer_panics.increment(1);
        }
    }

    /// A connection was accepted.
    pub(crate) fn connection_start(&self, p: &Peer) {
        self.observe(|o| {
            o.connection_start(&ConnectionStart {
                connection: p.connection,
                peer: p.peer,
                local: p.local,
                system_time: SystemTime::now(),
                peer_identity: p.identity.clone(),
            })
        });
    }

    /// A connection ended after `duration`.
    pub(crate) fn connection_stop(&self, p: &Peer, duration: Duration, reason: CloseReason) {
        self.observe(|o| {
            o.connection_stop(&ConnectionStop {
                connection: p.connection,
                peer: p.peer,
                local: p.local,
                duration,
                reason,
                peer_identity: p.identity.clone(),
            })
        });
    }

    /// A message goes to the handler. `peer` says who it came from; it is called only when
    /// the observer wants this start ([`Observer::message_events`]).
    #[inline]
    pub(crate) fn message_start(
        &self,
        peer: &dyn Fn() -> Peer,
        seq: u64,
        size: usize,
        system_time: SystemTime,
        tally: &mut Tally,
    ) {
        tally.received += 1;
        self.metrics.message_size.record(size as f64);
        if self.messages.start(seq) {
            self.observe_start(peer, seq, size, system_time);
        }
    }

    /// [`message_start`](Self::message_start)'s observer call, out of line.
    fn observe_start(
        &self,
        peer: &dyn Fn() -> Peer,
        seq: u64,
        size: usize,
        system_time: SystemTime,
    ) {
        self.observe(|o| {
            let p = peer();
            o.message_start(&MessageStart {
                connection: p.connection,
                peer: p.peer,
                local: p.local,
                sequence: seq,
                message_size: size,
                system_time,
            })
        });
    }

    /// Reports one connection event, counting into this turn's `tally` (by reference: the
    /// reactor reports its list of events in place and then clears it, with no move of each
    /// event out of it). `now` should be fresh for latencies (read after the write that
    /// finished the message). `peer` says who the event is about; it is called only for the
    /// observer. Inline for the two events of every message (an outcome to count, a stop to
    /// time), the rest in [`report_other`](Self::report_other).
    #[inline]
    pub(crate) fn report(
        &self,
        peer: &dyn Fn() -> Peer,
        event: &Event,
        now: Instant,
        tally: &mut Tally,
    ) {
        match *event {
            Event::Handled(Handled::Reply) => tally.replied += 1,
            Event::MessageStop {
                seq,
                response_size,
                received_at,
            } => {
                // The size inline, the duration (when wanted) out of line: without a
                // recorder or an observer of stops, a stop is a branch and a no-op record
                // (callgrind, S1: the call, with its saved registers, was about 30
                // instructions per message).
                if let Some(size) = response_size {
                    self.metrics.response_size.record(size as f64);
                }
                if self.times_stops {
                    self.message_stop(peer, seq, response_size, received_at, now);
                }
            }
            _ => self.report_other(peer, event, now, tally),
        }
    }

    /// A message is done, its duration wanted ([`times_stops`](Self::times_stops)): its reply
    /// written (`response_size`) or none needed.
    #[inline(never)]
    fn message_stop(
        &self,
        peer: &dyn Fn() -> Peer,
        seq: u64,
        response_size: Option<usize>,
        received_at: Instant,
        now: Instant,
    ) {
        let m = &self.metrics;
        let duration = now.saturating_duration_since(received_at);
        if m.timings {
            m.response_latency.record(duration.as_secs_f64());
        }
        if self.messages != MessageEvents::All {
            return;
        }
        self.observe(|o| {
            let p = peer();
            o.message_stop(&MessageStop {
                connection: p.connection,
                peer: p.peer,
                local: p.local,
                sequence: seq,
                duration,
                response_size,
            })
        });
    }

    /// [`report`](Self::report) for the events that are not per message.
    fn report_other(
        &self,
        peer: &dyn Fn() -> Peer,
        event: &Event,
        now: Instant,
        tally: &mut Tally,
    ) {
        match *event {
            Event::Junk(n) => tally.rare(|t| &mut t.junk, n),
            Event::Handled(outcome) => {
                tally.rare = true;
                tally.handled[outcome as usize] += 1;
            }
            // Taken by `report`.
            Event::MessageStop { .. } => {}
            Event::MessageException(ref e) => self.observe(|o| {
                let p = peer();
                o.message_exception(&MessageException {
                    connection: p.connection,
                    peer: p.peer,
                    local: p.local,
                    sequence: e.seq,
                    duration: e
                        .received_at
                        .map_or(Duration::ZERO, |t| now.saturating_duration_since(t)),
                    message_size: e.message_size,
                    reason: e.reason,
                    detail: e.detail.as_deref(),
                    control_id: e.control_id.as_deref(),
                })
            }),
            Event::NakQueued(AckCode::AR) => tally.rare(|t| &mut t.naks_ar, 1),
            Event::NakQueued(AckCode::AE) => tally.rare(|t| &mut t.naks_ae, 1),
            Event::NakQueued(_) => {}
            Event::LateResult => tally.rare(|t| &mut t.late_results, 1),
            Event::FrameRejected(FrameRejection::TooLarge) => {
                tally.rare(|t| &mut t.frames_too_large, 1);
            }
            Event::FrameRejected(FrameRejection::Timeout) => {
                tally.rare(|t| &mut t.frames_timed_out, 1);
            }
            // Counted when the reactor removes the connection (with its duration).
            Event::Closed => {}
        }
    }
}
