//! Store and forward: deliver every stored message to downstream MLLP systems, in order, at
//! least once.
//!
//! ```text
//!  Store writer ──commit──▶ messages (id order)
//!                               │ read in pages (rows and bytes capped), never the reactor
//!            ┌──────────────────┼──────────────────┐
//!      lane 0 thread      lane 1 thread  …   lane N-1 thread      (per destination)
//!   keep key%N == 0      keep key%N == 1
//!   send one, wait ACK ─▶ downstream (blocking Client, TLS possible)
//!   AA/CA: cursor = id   AE: retry, then dead letter   AR: dead letter   down: retry forever
//! ```
//!
//! A [`Forwarder`] runs one thread per lane of each [`Destination`]. A lane reads the store's
//! messages after its cursor, a page at a time ([`ForwardConfig::page_records`] rows and
//! [`ForwardConfig::page_bytes`] of its payloads at most), keeps those whose [`LaneKey`]
//! hashes to it, and sends them one by one with the crate's blocking client, which checks
//! that each ACK's MSA-2 is the message's MSH-10. After each outcome it writes the result to
//! the store before it sends the next message. Nothing of the backlog is held in memory
//! beyond one page per lane: a slow or dead downstream grows the backlog on disk only.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use mllp_reactor::{ack, handler_fn, Reply, Server};
//! use mllp_store::forward::{Destination, ForwardConfig, Forwarder};
//! use mllp_store::{Record, Origin, SqliteOptions, Store, StoreConfig};
//!
//! // The downstream system: counts what it gets.
//! let (tx, rx) = std::sync::mpsc::channel();
//! let downstream = Server::builder(handler_fn(move |m, _| {
//!     tx.send(m.to_vec()).unwrap();
//!     Ok(Reply::Send(ack::accept(m)))
//! }))
//! .bind("127.0.0.1:0")?
//! .spawn()?;
//!
//! let dir = std::env::temp_dir().join(format!("mllp-forward-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir)?;
//! let path = dir.join("store.db");
//! let store = Store::open_sqlite(&path, &SqliteOptions::default(), StoreConfig::default())?;
//! let lab = Destination::new("lab", downstream.local_addr().to_string());
//! let forwarder = Forwarder::start_sqlite(&path, vec![lab], ForwardConfig::default(), None)?;
//!
//! let origin = Origin {
//!     received_at: std::time::SystemTime::now(),
//!     peer: "10.0.0.7:40000".parse()?,
//!     local: "10.0.0.1:2575".parse()?,
//!     connection_id: 1,
//!     sequence: 0,
//! };
//! let msg = bytes::Bytes::from_static(b"MSH|^~\\&|A|B|C|D|20260101||ADT^A01|42|P|2.5\r");
//! let waker = forwarder.waker();
//! store.submit(Record::new(msg.clone(), origin), Box::new(move |r| {
//!     if r.is_ok() { waker.wake() } // optional: a lane otherwise polls
//! }))?;
//! assert_eq!(rx.recv_timeout(Duration::from_secs(10))?, msg.to_vec());
//! forwarder.stop(Duration::from_secs(5));
//! store.close(Duration::from_secs(5))?;
//! downstream.shutdown(Duration::from_secs(5))?;
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Guarantees
//!
//! - **Order.** With one lane (the default) a destination gets its messages strictly in store
//!   order (id order, which is commit order), one in flight. With N lanes, each lane is in
//!   store order on its own, so messages with the same key (e.g. the same patient, PID-3.1)
//!   keep their order; messages of different lanes may overtake each other. A dead letter
//!   leaves its lane, so the messages behind it go on; a requeued dead letter is sent again
//!   between two pages of its lane, out of store order.
//! - **At least once.** A message is delivered (AA/CA with the right MSA-2) or dead-lettered
//!   before its lane's cursor passes it. After a crash, a lane starts again after its durable
//!   cursor, so what it can send twice is the message that was in flight plus those delivered
//!   since the cursor was last written: none when the store was idle enough for the lane to
//!   write the cursor after each message, at most [`ForwardConfig::max_unrecorded`] (32)
//!   under load (set it to 1 for "only the one in flight", at the cost of one store write
//!   wait per message). A dead letter is written at once. The downstream sees the same bytes,
//!   so the same MSH-10, and can drop the repeat. A power loss may also undo the last cursor
//!   moves (see "Durability") and repeat those messages.
//! - **Every stored message goes to every destination**, resends stored with `duplicate_of`
//!   included: the downstream decides what a resend means.
//! - **Forwarding never slows receiving**: it runs on its own threads with its own
//!   connections; the server's threads only call [`ForwardWaker::wake`] (an atomic add, and a
//!   notify only when a lane sleeps).
//!
//! # Outcomes
//!
//! | Reply | Default action ([`RetryPolicy`], per destination) |
//! |---|---|
//! | AA, CA | delivered |
//! | AE, CE | retried with backoff, up to [`RetryPolicy::max_attempts`] (5), then dead letter |
//! | AR, CR | dead letter at once |
//! | timeout, refused, reset | retried forever, jittered backoff 1 s → 60 s (not configurable) |
//! | not an ACK, or MSA-2 ≠ MSH-10 | retried forever (configurable) |
//! | the message has no MSH-10 | dead letter at once (nothing can verify its ACK) |
//!
//! A dead letter keeps every attempt's time, outcome and reason (the last 64 lines), the last
//! reply, and its lane; `forward requeue` ([`requeue_sqlite`]) puts it back.
//!
//! # Durability: the tables (contract with retention)
//!
//! In the store file (created with `CREATE TABLE IF NOT EXISTS` when a forwarder starts):
//!
//! ```sql
//! forward_cursor(destination TEXT, lane INTEGER, delivered_through INTEGER NOT NULL,
//!                PRIMARY KEY (destination, lane))
//! forward_dead_letter(destination TEXT, message_id INTEGER, status TEXT NOT NULL,
//!                     -- 'dead' | 'requeued' | 'delivered'
//!                     lane, attempts, first_attempt_us, last_attempt_us, reason, reply,
//!                     history, updated_at_us, PRIMARY KEY (destination, message_id))
//! forward_destination(destination PRIMARY KEY, address, lanes, lane_key, configured_at_us)
//! forward_lane_status(destination, lane, last_error, last_error_at_us)
//! ```
//!
//! - Every message with `id <= delivered_through` that maps to that (destination, lane) is
//!   delivered or dead-lettered. Retention may remove a message only if its id is at most
//!   `MIN(delivered_through)` over all cursor rows and it has no `forward_dead_letter` row
//!   whose status is not `'delivered'`.
//! - **Cursors.** A destination seen for the first time starts at the store's highest id at
//!   that moment: it gets the messages stored from then on, not the store's history. Its rows
//!   exist for every lane from that first start. When its lane count or key changes, every
//!   lane restarts from the lowest of its cursors (messages may be sent twice, never skipped).
//!   A destination removed from the configuration keeps its rows, and so holds retention back,
//!   until they are deleted by hand.
//! - **SQLite.** The store's writer thread owns the message inserts; each lane has its own
//!   connection to the same file (WAL) and writes short `BEGIN IMMEDIATE` transactions with
//!   `synchronous=NORMAL`: they survive a crash of the process, and a power loss may undo
//!   the last ones (those messages are then sent again). In the store's own process, lanes
//!   and writer take turns through the writer's [`WriteGate`] ([`ForwardConfig::gate`]), so
//!   a lane's write never makes a commit wait on SQLite's sleeping busy handler. Only one
//!   process may forward from one SQLite file.
//! - **PostgreSQL** (`Forwarder::start_postgres`, feature `postgres`): the same tables
//!   (reading `mllp_messages`), one connection per lane, every write its own transaction
//!   (so with `synchronous_commit=on`, durable). Several nodes may forward from one
//!   database: a lane delivers only while it holds a session advisory lock for its
//!   (destination, lane); a node that dies loses its sessions and so its locks, and another
//!   node's lane takes over within [`ForwardConfig::lock_retry`] (1 s; measured 1.0–1.2 s in
//!   the two-node test), resuming after the durable cursor. If the node's machine vanishes
//!   without closing its connections, PostgreSQL releases the locks only when its TCP
//!   keepalives give up (set `tcp_keepalives_idle`/`_interval`/`_count` on the server, e.g.
//!   10 s/5 s/3 → about 25 s). Writes are not batched there: every delivery is written
//!   before the next send.
//!
//! # Metrics
//!
//! Labelled `destination` and `lane`; registered when the forwarder starts.
//!
//! | Name | Kind | Meaning |
//! |---|---|---|
//! | `mllp_forward_queue_messages` | gauge | messages stored after the lane's cursor (one lane: its depth; several: an upper bound) |
//! | `mllp_forward_oldest_age_seconds` | gauge | age of the message the lane is delivering, 0 when idle |
//! | `mllp_forward_delivered_total{code}` | counter | messages delivered, by ACK code (AA, CA) |
//! | `mllp_forward_attempts_total{outcome}` | counter | attempts by outcome (delivered, error, rejected, timeout, refused, reset, invalid, mismatch, no_control_id) |
//! | `mllp_forward_dead_letters_total` | counter | messages dead-lettered |
//! | `mllp_forward_delivery_seconds` | histogram | from receipt to the downstream's AA |
//!
//! Events ([`ForwardEvent`]) go to an observer: one per change of a destination's state
//! (up, retrying, down), one per dead letter, one per store error.

mod key;
mod lane;
mod outcome;
#[cfg(feature = "postgres")]
mod postgresql;
mod sqlite;
mod state;
mod status;
mod watch;

use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use mllp_reactor::ClientConfig;

pub use key::{LaneKey, UnknownLaneKey};
pub use outcome::{
    Action, DEFAULT_INITIAL_BACKOFF, DEFAULT_MAX_ATTEMPTS, DEFAULT_MAX_BACKOFF, Outcome,
    RetryPolicy, UnknownAction,
};
pub use status::{LaneStatus, Requeue, requeue_sqlite, status_sqlite};
#[cfg(feature = "postgres")]
pub use status::{requeue_postgres, status_postgres};
pub use watch::{OnVerdict, Verdict, WatchKey, Watcher, ack_after_forwarded};

use crate::record::system_time_to_us;
use crate::{StoreId, WriteGate};
use lane::Lane;
use sqlite::SqliteState;
use watch::Registry;

/// Metric names.
pub mod telemetry {
    /// Gauge: messages stored after the lane's cursor.
    pub const QUEUE_MESSAGES: &str = "mllp_forward_queue_messages";
    /// Gauge: age in seconds of the message the lane is delivering (0 when idle).
    pub const OLDEST_AGE_SECONDS: &str = "mllp_forward_oldest_age_seconds";
    /// Counter: messages delivered, label `code` (AA or CA).
    pub const DELIVERED_TOTAL: &str = "mllp_forward_delivered_total";
    /// Counter: attempts, label `outcome`.
    pub const ATTEMPTS_TOTAL: &str = "mllp_forward_attempts_total";
    /// Counter: messages dead-lettered.
    pub const DEAD_LETTERS_TOTAL: &str = "mllp_forward_dead_letters_total";
    /// Histogram: seconds from receipt to the downstream's accepting ACK.
    pub const DELIVERY_SECONDS: &str = "mllp_forward_delivery_seconds";
}

/// Most lanes per destination: each is a thread with a connection to the store and one to the
/// downstream, and reads every message of the backlog to find its own.
pub const MAX_LANES: u16 = 64;

/// Most destinations per forwarder (a watched message keeps one bit per destination).
pub const MAX_DESTINATIONS: usize = 64;

/// Default of [`ForwardConfig::page_records`]: 256 rows scanned per page.
pub const DEFAULT_PAGE_RECORDS: usize = 256;

/// Default of [`ForwardConfig::page_bytes`]: 1 MiB of a lane's payloads per page (plus one
/// message), so 8 lanes hold at most 8 MiB of backlog in memory, whatever its size on disk.
pub const DEFAULT_PAGE_BYTES: usize = 1 << 20;

/// Default of [`ForwardConfig::poll_interval`]: 50 ms. An idle lane looks for new messages
/// this often when nobody calls [`ForwardWaker::wake`]; with the waker (as `serve` does) a
/// new message is picked up at once and this is only a fallback.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Default of [`ForwardConfig::lock_retry`]: 1 s, the bulk of the takeover time after the
/// delivering node's connection to PostgreSQL closes. Each try is one cheap statement per
/// waiting lane and node.
pub const DEFAULT_LOCK_RETRY: Duration = Duration::from_secs(1);

/// Default of [`ForwardConfig::max_unrecorded`]: 32 messages.
///
/// The store writer holds its gate through each commit's fsync (milliseconds under load),
/// and a lane that waited for it after every message would deliver one message per commit
/// (measured: about 1 400 msg/s for one lane against 7 800 msg/s for a bare connection to
/// the same downstream). Going on while the gate is busy removes that wait; the price is
/// that a crash may repeat up to this many messages per lane (those delivered since the
/// last cursor write), not only the one in flight. 32 messages are a few milliseconds of a
/// lane's work.
pub const DEFAULT_MAX_UNRECORDED: usize = 32;

/// How long a lane's store statement waits for the writer's lock before it fails (and the
/// lane retries): the store's own default.
pub const DEFAULT_BUSY_TIMEOUT: Duration = crate::sqlite::DEFAULT_BUSY_TIMEOUT;

/// One downstream system.
///
/// ```
/// use std::time::Duration;
/// use mllp_reactor::ClientConfig;
/// use mllp_store::forward::{Destination, LaneKey, RetryPolicy};
///
/// let ehr = Destination::new("ehr", "ehr.example:2575")
///     .lanes(8)
///     .key(LaneKey::Pid3)
///     .client(ClientConfig::default().response_timeout(Duration::from_secs(10)))
///     .policy(RetryPolicy::default().max_attempts(3));
/// assert_eq!(ehr.lanes, 8);
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Destination {
    /// Its name: letters, digits, `-`, `_` and `.`; the key of its rows in the store.
    pub name: String,
    /// `HOST:PORT`, resolved at every connect.
    pub address: String,
    /// Connect and ACK timeouts, TLS (feature `tls` of `mllp-reactor`). Its `reconnect` is
    /// ignored: the lane's own backoff decides.
    pub client: ClientConfig,
    /// Lanes, 1 to [`MAX_LANES`] (default 1: strict FIFO).
    pub lanes: u16,
    /// What picks a message's lane when there are several (default [`LaneKey::Pid3`]).
    pub key: LaneKey,
    /// What to do with each kind of reply.
    pub policy: RetryPolicy,
}

impl Destination {
    /// A destination with one lane and the default client and policy.
    pub fn new(name: impl Into<String>, address: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            address: address.into(),
            client: ClientConfig::default(),
            lanes: 1,
            key: LaneKey::default(),
            policy: RetryPolicy::default(),
        }
    }

    /// Sets [`lanes`](Self::lanes).
    pub fn lanes(mut self, lanes: u16) -> Self {
        self.lanes = lanes;
        self
    }

    /// Sets [`key`](Self::key).
    pub fn key(mut self, key: LaneKey) -> Self {
        self.key = key;
        self
    }

    /// Sets [`client`](Self::client).
    pub fn client(mut self, client: ClientConfig) -> Self {
        self.client = client;
        self
    }

    /// Sets [`policy`](Self::policy).
    pub fn policy(mut self, policy: RetryPolicy) -> Self {
        self.policy = policy;
        self
    }
}

/// How lanes read the backlog and write their state.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ForwardConfig {
    /// Rows scanned per page (default [`DEFAULT_PAGE_RECORDS`]).
    pub page_records: usize,
    /// A lane's payload bytes per page, plus one message (default [`DEFAULT_PAGE_BYTES`]).
    pub page_bytes: usize,
    /// How often an idle lane looks for new messages (default [`DEFAULT_POLL_INTERVAL`]).
    pub poll_interval: Duration,
    /// How long a store statement waits for a lock (default [`DEFAULT_BUSY_TIMEOUT`]).
    pub busy_timeout: Duration,
    /// The store writer's [`WriteGate`] (from [`SqliteBackend::write_gate`]), when the
    /// forwarder runs in the same process as the store: lanes then take turns with the
    /// writer through it, rather than through SQLite's busy handler, which sleeps
    /// milliseconds after each collision and would delay the writer's commits. With a gate,
    /// the lanes' connections also leave WAL checkpoints to the store's checkpointer, so
    /// none runs inside a lane's commit while it holds the gate.
    ///
    /// [`SqliteBackend::write_gate`]: crate::SqliteBackend::write_gate
    pub gate: Option<WriteGate>,
    /// How often a lane that another node delivers tries to take over (PostgreSQL; default
    /// [`DEFAULT_LOCK_RETRY`]).
    pub lock_retry: Duration,
    /// Most messages a lane delivers beyond its durable cursor (default
    /// [`DEFAULT_MAX_UNRECORDED`]); 1: the cursor is written after every message.
    ///
    /// With the writer's [`gate`](Self::gate), a lane writes its cursor after a delivery
    /// only if the gate is free at that moment, and otherwise goes on with the next message,
    /// up to this many; then it waits for the gate. Every page ends with the cursor written.
    /// Without a gate (and with PostgreSQL) every delivery is written before the next send.
    pub max_unrecorded: usize,
}

impl Default for ForwardConfig {
    fn default() -> Self {
        Self {
            page_records: DEFAULT_PAGE_RECORDS,
            page_bytes: DEFAULT_PAGE_BYTES,
            poll_interval: DEFAULT_POLL_INTERVAL,
            busy_timeout: DEFAULT_BUSY_TIMEOUT,
            gate: None,
            lock_retry: DEFAULT_LOCK_RETRY,
            max_unrecorded: DEFAULT_MAX_UNRECORDED,
        }
    }
}

impl ForwardConfig {
    /// Sets [`poll_interval`](Self::poll_interval).
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// Sets [`gate`](Self::gate).
    pub fn gate(mut self, gate: WriteGate) -> Self {
        self.gate = Some(gate);
        self
    }

    /// Sets both page caps.
    pub fn page(mut self, records: usize, bytes: usize) -> Self {
        self.page_records = records;
        self.page_bytes = bytes;
        self
    }
}

/// A destination's state, as reported by [`ForwardEvent::State`]: the worst of its lanes'.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DestinationState {
    /// The last attempt of every lane delivered.
    Up,
    /// A lane is retrying a message the downstream answered with an error.
    Retrying,
    /// A lane cannot reach the downstream (refused, reset, timeout).
    Down,
}

impl DestinationState {
    /// `up`, `retrying` or `down`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Retrying => "retrying",
            Self::Down => "down",
        }
    }
}

/// Something an operator should see in the log: not one per message.
#[derive(Debug)]
#[non_exhaustive]
pub enum ForwardEvent<'a> {
    /// A destination's state changed.
    State {
        /// The destination.
        destination: &'a str,
        /// Its new state.
        state: DestinationState,
        /// The failed attempt that caused it (`None` for up).
        reason: Option<&'a str>,
    },
    /// A message was dead-lettered.
    DeadLetter {
        /// The destination.
        destination: &'a str,
        /// The lane.
        lane: u16,
        /// The message's store id.
        message_id: StoreId,
        /// Attempts made.
        attempts: u32,
        /// The last attempt's outcome and reason.
        reason: &'a str,
    },
    /// The store failed under a lane; it retries from its last durable position.
    StoreError {
        /// The destination.
        destination: &'a str,
        /// The lane.
        lane: u16,
        /// What failed.
        error: &'a ForwardError,
    },
}

/// Receives [`ForwardEvent`]s, on lane threads (keep it quick).
pub type Observer = Arc<dyn Fn(&ForwardEvent<'_>) + Send + Sync>;

/// Why a forwarder could not start, or the delivery state could not be read or written.
#[derive(Debug)]
#[non_exhaustive]
pub enum ForwardError {
    /// A database statement failed.
    Database {
        /// What was being done (`read the backlog`).
        action: &'static str,
        /// The database's error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The location holds no message store.
    NotAStore {
        /// The path or URL.
        location: String,
    },
    /// No destination was given.
    NoDestinations,
    /// More than [`MAX_DESTINATIONS`] destinations.
    TooManyDestinations(usize),
    /// A destination's name is empty or has characters other than letters, digits, `-`,
    /// `_` and `.`.
    InvalidName(String),
    /// Two destinations have the same name.
    DuplicateName(String),
    /// A lane count outside `1..=MAX_LANES`.
    Lanes {
        /// The destination.
        destination: String,
        /// The count given.
        lanes: u16,
    },
    /// A thread could not be started.
    Spawn(std::io::Error),
}

impl ForwardError {
    pub(crate) fn database(
        action: &'static str,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::Database {
            action,
            source: Box::new(source),
        }
    }
}

impl fmt::Display for ForwardError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Database { action, source } => write!(
                f,
                "cannot {action}: {}",
                source.to_string().replace(['\r', '\n'], " ")
            ),
            Self::NotAStore { location } => {
                write!(f, "{location} is not an mllp-reactor store")
            }
            Self::NoDestinations => f.write_str("no destination to forward to"),
            Self::TooManyDestinations(n) => write!(
                f,
                "{n} destinations are too many (at most {MAX_DESTINATIONS})"
            ),
            Self::InvalidName(name) => write!(
                f,
                "destination name {name:?} must be letters, digits, '-', '_' or '.'"
            ),
            Self::DuplicateName(name) => write!(f, "destination {name:?} is given twice"),
            Self::Lanes { destination, lanes } => write!(
                f,
                "destination {destination:?}: {lanes} lanes is out of range (1 to {MAX_LANES})"
            ),
            Self::Spawn(e) => write!(f, "cannot start a forwarding thread: {e}"),
        }
    }
}

impl std::error::Error for ForwardError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Database { source, .. } => Some(&**source),
            Self::Spawn(e) => Some(e),
            _ => None,
        }
    }
}

/// Stop flag and "new messages" wake-up shared by the lanes and the wakers.
#[derive(Debug, Default)]
pub(crate) struct Signal {
    stopping: AtomicBool,
    generation: AtomicU64,
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    cv: Condvar,
}

impl Signal {
    fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    fn wake(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        if self.sleepers.load(Ordering::SeqCst) > 0 {
            let _guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
            self.cv.notify_all();
        }
    }

    fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let _guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        self.cv.notify_all();
    }

    /// Waits until woken after `seen`, stopped, or `timeout` passed.
    fn wait(&self, seen: u64, timeout: Duration) {
        let guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        self.sleepers.fetch_add(1, Ordering::SeqCst);
        if self.generation() == seen && !self.is_stopping() {
            let _ = self.cv.wait_timeout(guard, timeout);
        }
        self.sleepers.fetch_sub(1, Ordering::SeqCst);
    }

    /// Sleeps for `pause` unless stopped first; returns whether stopping.
    fn sleep(&self, pause: Duration) -> bool {
        let until = Instant::now() + pause;
        let mut guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if self.is_stopping() {
                return true;
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            guard = self
                .cv
                .wait_timeout(guard, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// What the lanes of one destination share.
pub(crate) struct Shared {
    destination: Destination,
    /// Its position in the forwarder's list (its bit in a watch entry).
    index: usize,
    registry: Arc<Registry>,
    observer: Option<Observer>,
    /// Each lane's state, and the destination's last reported one.
    states: Mutex<(Vec<Option<DestinationState>>, Option<DestinationState>)>,
}

impl Shared {
    fn emit(&self, event: &ForwardEvent<'_>) {
        if let Some(observer) = &self.observer {
            observer(event);
        }
    }

    /// Records a lane's state; reports the destination's when it changes.
    fn set_state(&self, lane: u16, state: DestinationState, reason: Option<&str>) {
        let changed = {
            let mut states = self.states.lock().unwrap_or_else(PoisonError::into_inner);
            let (lanes, reported) = &mut *states;
            if lanes[usize::from(lane)] == Some(state) {
                return;
            }
            lanes[usize::from(lane)] = Some(state);
            let worst = lanes.iter().flatten().copied().max_by_key(|s| match s {
                DestinationState::Up => 0,
                DestinationState::Retrying => 1,
                DestinationState::Down => 2,
            });
            if worst == *reported {
                None
            } else {
                *reported = worst;
                worst
            }
        };
        if let Some(state) = changed {
            self.emit(&ForwardEvent::State {
                destination: &self.destination.name,
                state,
                reason: if state == DestinationState::Up {
                    None
                } else {
                    reason
                },
            });
        }
    }
}

/// Wakes idle lanes when a message was committed; cheap to clone and to call.
#[derive(Clone, Debug)]
pub struct ForwardWaker(Arc<Signal>);

impl ForwardWaker {
    /// Tells the lanes that new messages may be there: one atomic add, plus a notify when a
    /// lane sleeps.
    pub fn wake(&self) {
        self.0.wake();
    }
}

/// Forwards stored messages to destinations; see the [module docs](self).
#[derive(Debug)]
pub struct Forwarder {
    signal: Arc<Signal>,
    threads: Vec<JoinHandle<()>>,
    registry: Arc<Registry>,
}

impl Forwarder {
    /// Starts forwarding from the SQLite store at `path` (which a [`Store`](crate::Store)
    /// created) to `destinations`: creates the forwarding tables if needed, sets up the
    /// cursors (see "Cursors" above) and starts one thread per lane.
    ///
    /// # Errors
    ///
    /// A configuration error ([`ForwardError::NoDestinations`], [`ForwardError::InvalidName`],
    /// [`ForwardError::DuplicateName`], [`ForwardError::Lanes`]), or the store's.
    pub fn start_sqlite(
        path: impl AsRef<Path>,
        destinations: Vec<Destination>,
        config: ForwardConfig,
        observer: Option<Observer>,
    ) -> Result<Self, ForwardError> {
        let path = path.as_ref();
        check(&destinations)?;
        let open = || SqliteState::open(path, config.busy_timeout, true, config.gate.clone());
        Self::start(destinations, config.clone(), observer, open)
    }

    /// Starts forwarding from the PostgreSQL store at `url` (which a
    /// [`PostgresBackend`](crate::PostgresBackend) created): as
    /// [`start_sqlite`](Self::start_sqlite), with one connection per lane. Several nodes may
    /// run it on one database: each lane is delivered by one node at a time (see
    /// "PostgreSQL" above).
    ///
    /// # Errors
    ///
    /// As [`start_sqlite`](Self::start_sqlite).
    #[cfg(feature = "postgres")]
    pub fn start_postgres(
        url: &str,
        options: &crate::PostgresOptions,
        destinations: Vec<Destination>,
        config: ForwardConfig,
        observer: Option<Observer>,
    ) -> Result<Self, ForwardError> {
        check(&destinations)?;
        let open = || postgresql::PgState::open(url, options);
        Self::start(destinations, config, observer, open)
    }

    /// Prepares the tables on one connection, then starts a lane thread with its own.
    fn start<S: state::DeliveryState>(
        destinations: Vec<Destination>,
        config: ForwardConfig,
        observer: Option<Observer>,
        open: impl Fn() -> Result<S, ForwardError>,
    ) -> Result<Self, ForwardError> {
        open()?.prepare(&destinations)?;
        let signal = Arc::new(Signal::default());
        let registry = Registry::new(destinations.iter().map(|d| d.name.clone()).collect());
        let expiry = Arc::downgrade(&registry);
        std::thread::Builder::new()
            .name("forward-expiry".to_owned())
            .spawn(move || Registry::run_expiry(expiry))
            .map_err(ForwardError::Spawn)?;
        let mut forwarder = Self {
            signal: Arc::clone(&signal),
            threads: Vec::new(),
            registry: Arc::clone(&registry),
        };
        for (index, destination) in destinations.into_iter().enumerate() {
            let lanes = destination.lanes;
            let shared = Arc::new(Shared {
                states: Mutex::new((vec![None; usize::from(lanes)], None)),
                destination,
                index,
                registry: Arc::clone(&registry),
                observer: observer.clone(),
            });
            for lane in 0..lanes {
                let worker = Lane::new(
                    Arc::clone(&shared),
                    lane,
                    open()?,
                    Arc::clone(&signal),
                    config.clone(),
                );
                let thread = std::thread::Builder::new()
                    .name(format!("forward-{}-{lane}", shared.destination.name))
                    .spawn(move || worker.run())
                    .map_err(ForwardError::Spawn)?;
                forwarder.threads.push(thread);
            }
        }
        Ok(forwarder)
    }

    /// Registers messages whose upstream reply waits for the destinations' answers (see
    /// [`ack_after_forwarded`]).
    pub fn watcher(&self) -> Watcher {
        Watcher {
            registry: Arc::clone(&self.registry),
            waker: self.waker(),
        }
    }

    /// A handle that wakes idle lanes; call [`ForwardWaker::wake`] after each commit.
    pub fn waker(&self) -> ForwardWaker {
        ForwardWaker(Arc::clone(&self.signal))
    }

    /// Stops every lane and waits up to `timeout` for their threads. A lane in the middle of
    /// an exchange finishes it first (bounded by the response timeout); its message, if the
    /// result was not written, is sent again at the next start. Returns whether every thread
    /// ended in time (the others end on their own).
    pub fn stop(mut self, timeout: Duration) -> bool {
        self.signal.stop();
        let deadline = Instant::now() + timeout;
        for thread in std::mem::take(&mut self.threads) {
            while !thread.is_finished() {
                if Instant::now() >= deadline {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            let _ = thread.join();
        }
        true
    }
}

impl Drop for Forwarder {
    /// Stops the lanes without waiting for them.
    fn drop(&mut self) {
        self.signal.stop();
    }
}

/// Checks names and lane counts.
fn check(destinations: &[Destination]) -> Result<(), ForwardError> {
    if destinations.is_empty() {
        return Err(ForwardError::NoDestinations);
    }
    if destinations.len() > MAX_DESTINATIONS {
        return Err(ForwardError::TooManyDestinations(destinations.len()));
    }
    for (i, d) in destinations.iter().enumerate() {
        let valid = !d.name.is_empty()
            && d.name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !valid {
            return Err(ForwardError::InvalidName(d.name.clone()));
        }
        if destinations[..i].iter().any(|e| e.name == d.name) {
            return Err(ForwardError::DuplicateName(d.name.clone()));
        }
        if d.lanes == 0 || d.lanes > MAX_LANES {
            return Err(ForwardError::Lanes {
                destination: d.name.clone(),
                lanes: d.lanes,
            });
        }
    }
    Ok(())
}

/// Now as microseconds since the Unix epoch.
pub(crate) fn now_us() -> i64 {
    system_time_to_us(SystemTime::now())
}
