//! The [`Store`] front: a bounded queue and one writer thread doing group commit.
//!
//! ```text
//!  submit() ──▶ ┌──────────── queue ────────────┐      writer thread
//!  (any thread, │ record+done, record+done, …   │ ──▶ take ≤ max_batch ──▶ commit_batch()
//!   never       └─ cap: messages and bytes ─────┘                              │
//!   blocks)                                        done(Ok|Err) for each ◀────┘
//! ```
//!
//! The writer takes everything queued (up to the batch caps) as soon as the previous commit
//! returns, so while one batch syncs the next one grows: there is no timer, an idle store
//! commits a lone message at once, and a busy one commits hundreds per sync.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mllp_reactor::send_together;

use crate::backend::{Backend, WriteGate};
use crate::disk::DiskMonitor;
use crate::error::{Cause, CloseError, ConfigError, Problem, StoreError};
use crate::health::{Health, HealthState, Pulse, WRITER_HEARTBEAT};
use crate::record::{Record, StoreOutcome};
use crate::sqlite::{SqliteBackend, SqliteOptions};
use crate::submit::{Done, Submission, SubmitError};
use crate::telemetry::Metrics;

/// Default of [`StoreConfig::max_queue_messages`]: 16 384.
///
/// At the ~100 000 messages/s a batched SQLite commit sustains on a local SSD this is about
/// 0.15 s of work: enough to keep the writer fed through any burst a server can read, small
/// enough that a full queue (which makes the server stop reading) means a store that is truly
/// behind. Per queued message it costs one queue slot and one boxed callback (~100 B) besides
/// the payload, which [`DEFAULT_MAX_QUEUE_BYTES`] bounds.
pub const DEFAULT_MAX_QUEUE_MESSAGES: usize = 16_384;

/// Default of [`StoreConfig::max_queue_bytes`]: 64 MiB of payloads.
///
/// Bounds the memory held for messages not yet committed. Six of the server's largest
/// messages (10 MiB) fit, or 65 536 typical 1 KiB ones, more than the message cap allows.
pub const DEFAULT_MAX_QUEUE_BYTES: usize = 64 << 20;

/// Default of [`StoreConfig::max_batch_messages`]: 1 024.
///
/// A commit costs a sync plus a per-row cost, so rows/s grow with the batch while every
/// message of a batch waits for the whole of it. Measured (`cargo bench -p mllp-store`, crate
/// docs "Measurements"): one row per commit gives ~1 400 rows/s, 100 rows ~10 600, 1 000
/// rows ~18 000 at 56 ms per commit on the loaded build machine (~10 ms quiet). Bigger batches
/// still gain (4 000 rows: ~30 700/s) but at 130 ms per commit. 1 024 keeps one batch's wait
/// near 10 ms on a quiet machine; batches that large form only under overload, since a batch
/// holds just what queued during the previous commit.
pub const DEFAULT_MAX_BATCH_MESSAGES: usize = 1_024;

/// Default of [`StoreConfig::max_batch_bytes`]: 8 MiB of payloads per transaction.
///
/// Keeps one transaction's WAL growth, and the time its first message waits, bounded when
/// messages are large. A single message larger than this still forms a batch of its own.
pub const DEFAULT_MAX_BATCH_BYTES: usize = 8 << 20;

/// Default of [`StoreConfig::close_timeout`] (used by `Drop`): 10 s, the CLI's default drain
/// grace. A full queue of small messages commits in well under a second; the rest of the bound
/// is for a slow disk.
pub const DEFAULT_CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Queue and batch caps of a [`Store`]; see each default's docs for the reasoning.
///
/// ```
/// use mllp_store::StoreConfig;
/// let config = StoreConfig::default().max_queue_messages(1_000).max_batch_messages(100);
/// assert_eq!(config.max_queue_messages, 1_000);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreConfig {
    /// Most records queued for the writer (default [`DEFAULT_MAX_QUEUE_MESSAGES`]); past it
    /// [`Store::submit`] answers [`SubmitError::Full`].
    pub max_queue_messages: usize,
    /// Most payload bytes queued (default [`DEFAULT_MAX_QUEUE_BYTES`]). An empty queue takes
    /// one record of any size, so no record is refused forever; the worst case is therefore
    /// this plus one message.
    pub max_queue_bytes: usize,
    /// Most records per transaction (default [`DEFAULT_MAX_BATCH_MESSAGES`]).
    pub max_batch_messages: usize,
    /// Most payload bytes per transaction (default [`DEFAULT_MAX_BATCH_BYTES`]); a larger
    /// record forms a batch alone.
    pub max_batch_bytes: usize,
    /// How long `Drop` waits for the writer to drain (default [`DEFAULT_CLOSE_TIMEOUT`]).
    pub close_timeout: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            max_queue_messages: DEFAULT_MAX_QUEUE_MESSAGES,
            max_queue_bytes: DEFAULT_MAX_QUEUE_BYTES,
            max_batch_messages: DEFAULT_MAX_BATCH_MESSAGES,
            max_batch_bytes: DEFAULT_MAX_BATCH_BYTES,
            close_timeout: DEFAULT_CLOSE_TIMEOUT,
        }
    }
}

impl StoreConfig {
    /// Sets [`max_queue_messages`](Self::max_queue_messages).
    pub fn max_queue_messages(mut self, n: usize) -> Self {
        self.max_queue_messages = n;
        self
    }

    /// Sets [`max_queue_bytes`](Self::max_queue_bytes).
    pub fn max_queue_bytes(mut self, bytes: usize) -> Self {
        self.max_queue_bytes = bytes;
        self
    }

    /// Sets [`max_batch_messages`](Self::max_batch_messages).
    pub fn max_batch_messages(mut self, n: usize) -> Self {
        self.max_batch_messages = n;
        self
    }

    /// Sets [`max_batch_bytes`](Self::max_batch_bytes).
    pub fn max_batch_bytes(mut self, bytes: usize) -> Self {
        self.max_batch_bytes = bytes;
        self
    }

    /// Queue caps that a server's own limits always reach first, so the store never has to
    /// refuse a message: every queued record is a message in flight, so at most
    /// `max_connections` × `max_in_flight` of them (the server's effective value: see
    /// [`Dispatch::default_max_in_flight`](mllp_reactor::Dispatch::default_max_in_flight))
    /// and `max_memory` bytes (the server's budget) can be queued. When those are reached
    /// the server stops reading and TCP pushes back on senders.
    pub fn for_server(
        mut self,
        max_connections: usize,
        max_in_flight: usize,
        max_memory: usize,
    ) -> Self {
        self.max_queue_messages = max_connections.saturating_mul(max_in_flight).max(1);
        self.max_queue_bytes = max_memory.max(1);
        self
    }

    /// Sets [`close_timeout`](Self::close_timeout).
    pub fn close_timeout(mut self, timeout: Duration) -> Self {
        self.close_timeout = timeout;
        self
    }

    fn validate(&self) -> Result<(), ConfigError> {
        for (name, value) in [
            ("max_queue_messages", self.max_queue_messages),
            ("max_queue_bytes", self.max_queue_bytes),
            ("max_batch_messages", self.max_batch_messages),
            ("max_batch_bytes", self.max_batch_bytes),
        ] {
            if value == 0 {
                return Err(ConfigError::ZeroCap(name));
            }
        }
        Ok(())
    }
}

/// A durable message store: submit records from any thread, get each one's commit result in
/// a callback. See the [crate docs](crate) for an example and the guarantees.
///
/// `Store` is `Sync`: share it with `Arc`. [`close`](Self::close) (or dropping it) stops
/// taking records, commits what is queued and joins the writer within a bound.
pub struct Store {
    shared: Arc<Shared>,
    config: StoreConfig,
    location: String,
    summary: String,
    gate: Option<WriteGate>,
    /// The writer and the receiving end of its exit signal (the writer holds the sender;
    /// it disconnects when the thread ends, however it ends). `None` once joined.
    writer: Mutex<Option<(JoinHandle<()>, Receiver<()>)>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("location", &self.location)
            .field("queue_len", &self.queue_len())
            .field("queued_bytes", &self.queued_bytes())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

struct Shared {
    queue: Mutex<Queue>,
    /// As of the last commit; written by the writer.
    health: HealthState,
    /// Signalled when a record is queued while the writer waits, and on close.
    wake: Condvar,
    /// Mirrors of the queue's counts, readable without the lock (the server polls them).
    len: AtomicUsize,
    bytes: AtomicUsize,
    /// The writer's heartbeat and corruption flag, for health checks.
    pulse: Pulse,
    /// Set by [`Store::refuse_when_disk_low`].
    disk: OnceLock<DiskMonitor>,
}

struct Queue {
    items: VecDeque<Submission>,
    /// INVARIANT: the sum of `items[i].record.size()`.
    bytes: usize,
    closed: bool,
    /// Whether the writer sleeps on `wake`: `submit` signals only then, saving a futex wake
    /// syscall per message while the writer is busy committing.
    writer_waiting: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // Nothing panics while holding the lock; if something ever did, the queue's data is
        // still consistent (every change is a push or pop plus counters).
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn publish(&self, queue: &Queue, metrics: &Metrics) {
        self.len.store(queue.items.len(), Ordering::Relaxed);
        self.bytes.store(queue.bytes, Ordering::Relaxed);
        metrics.queue_messages.set(queue.items.len() as f64);
    }
}

impl Store {
    /// Starts a store over `backend`: registers the metric handles with the current recorder
    /// and spawns the writer thread (`mllp-store-writer`).
    ///
    /// # Errors
    ///
    /// [`StoreError::Config`] for a zero cap, [`StoreError::Open`] if the thread cannot be
    /// spawned.
    pub fn start(backend: impl Backend, config: StoreConfig) -> Result<Self, StoreError> {
        config.validate().map_err(StoreError::Config)?;
        let metrics = Metrics::register();
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                items: VecDeque::new(),
                bytes: 0,
                closed: false,
                writer_waiting: false,
            }),
            health: HealthState::default(),
            wake: Condvar::new(),
            len: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            pulse: Pulse::default(),
            disk: OnceLock::new(),
        });
        let location = backend.location();
        let summary = backend.summary();
        let gate = backend.write_gate();
        let (exit_tx, exit_rx) = mpsc::channel::<()>();
        let writer = Writer {
            shared: Arc::clone(&shared),
            probe_when_idle: backend.probe_when_idle(),
            backend,
            metrics,
            max_batch_messages: config.max_batch_messages,
            max_batch_bytes: config.max_batch_bytes,
            last_probe: Instant::now(),
        };
        let handle = std::thread::Builder::new()
            .name("mllp-store-writer".into())
            .spawn(move || {
                let _exit = exit_tx;
                writer.run();
            })
            .map_err(|e| {
                StoreError::open(
                    Path::new(&location),
                    Cause::from(e).context("cannot start the writer thread"),
                )
            })?;
        Ok(Self {
            shared,
            config,
            location,
            summary,
            gate,
            writer: Mutex::new(Some((handle, exit_rx))),
        })
    }

    /// Opens (or creates) the SQLite store at `path` and starts a store over it.
    ///
    /// # Errors
    ///
    /// As [`SqliteBackend::open`] and [`Store::start`].
    pub fn open_sqlite(
        path: impl AsRef<Path>,
        options: &SqliteOptions,
        config: StoreConfig,
    ) -> Result<Self, StoreError> {
        Self::start(SqliteBackend::open(path, options)?, config)
    }

    /// Connects to the PostgreSQL store at `url` (creating its schema if needed) and starts a
    /// store over it; the connection lives on the writer thread (feature `postgres`).
    ///
    /// # Errors
    ///
    /// As [`PostgresBackend::connect`](crate::postgresql::PostgresBackend::connect) and [`Store::start`].
    #[cfg(feature = "postgres")]
    pub fn open_postgres(
        url: &str,
        options: &crate::postgresql::PostgresOptions,
        config: StoreConfig,
    ) -> Result<Self, StoreError> {
        Self::start(
            crate::postgresql::PostgresBackend::connect(url, options)?,
            config,
        )
    }

    /// Queues `record`; `done` is called with its outcome once its batch committed or failed.
    ///
    /// Never blocks beyond a short mutex hold, so it may be called on an I/O thread. A
    /// [`StoreOutcome`] with `duplicate_of` set is still a success.
    ///
    /// # Errors
    ///
    /// [`SubmitError::Full`] when the queue is at [`StoreConfig::max_queue_messages`] or
    /// adding the record would pass [`StoreConfig::max_queue_bytes`] (an empty queue takes any
    /// record); [`SubmitError::Closed`] after [`close`](Self::close). Either way `done` was
    /// not called and comes back in the error.
    // The error hands the record back by value (~150 bytes): boxing it would allocate on the
    // path that runs exactly when the store is behind and memory is tight.
    #[allow(clippy::result_large_err)]
    pub fn submit(&self, record: Record, done: Done) -> Result<(), SubmitError> {
        let size = record.size();
        let mut queue = self.shared.lock();
        let submission = Submission { record, done };
        if queue.closed {
            return Err(SubmitError::Closed(submission));
        }
        if !queue.items.is_empty()
            && (queue.items.len() >= self.config.max_queue_messages
                || queue.bytes.saturating_add(size) > self.config.max_queue_bytes)
        {
            return Err(SubmitError::Full(submission));
        }
        queue.items.push_back(submission);
        queue.bytes += size;
        self.shared.len.store(queue.items.len(), Ordering::Relaxed);
        self.shared.bytes.store(queue.bytes, Ordering::Relaxed);
        let wake = queue.writer_waiting;
        drop(queue);
        if wake {
            self.shared.wake.notify_one();
        }
        Ok(())
    }

    /// Records queued and not yet taken into a batch (a relaxed read: exact once quiet).
    pub fn queue_len(&self) -> usize {
        self.shared.len.load(Ordering::Relaxed)
    }

    /// Payload bytes queued and not yet taken into a batch.
    pub fn queued_bytes(&self) -> usize {
        self.shared.bytes.load(Ordering::Relaxed)
    }

    /// Whether a record of `size` bytes would be refused as [`SubmitError::Full`] now: lets
    /// a server stop reading before it has a message it cannot queue.
    pub fn is_full_for(&self, size: usize) -> bool {
        let len = self.queue_len();
        len > 0
            && (len >= self.config.max_queue_messages
                || self.queued_bytes().saturating_add(size) > self.config.max_queue_bytes)
    }

    /// The caps this store runs with.
    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    /// From now on, while `monitor` reports low disk space, fail every batch with
    /// [`StoreError::LowDisk`] without touching the backend (see [`crate::disk`]). Only the
    /// first monitor given counts.
    pub fn refuse_when_disk_low(&self, monitor: DiskMonitor) {
        let _ = self.shared.disk.set(monitor);
    }

    /// The writer's heartbeat and corruption flag, for a liveness check (`/healthz`).
    pub fn pulse(&self) -> Pulse {
        self.shared.pulse.clone()
    }

    /// Where the backend keeps the data (`sqlite:/path/to/file.db`).
    pub fn location(&self) -> &str {
        &self.location
    }

    /// The backend's one-line summary for an operator ([`Backend::summary`]): the absolute
    /// path of an SQLite file; a PostgreSQL URL (no password) and its `synchronous_commit`.
    pub fn summary(&self) -> &str {
        &self.summary
    }

    /// Whether the store is storing, as of its last commit (one atomic load): what a
    /// readiness check (`/readyz`) reads. See [`Health`].
    pub fn health(&self) -> Health {
        self.shared.health.get()
    }

    /// Calls `f` on the writer thread each time [`health`](Self::health) changes, with the
    /// new health and, unless it is [`Health::Ok`], the error of the batch that changed it:
    /// for one log line per change rather than one per failed message. Replaces an earlier
    /// watcher. `f` must be quick; a panic in it is contained.
    pub fn on_health_change(
        &self,
        f: impl Fn(Health, Option<&StoreError>) + Send + Sync + 'static,
    ) {
        self.shared.health.watch(Box::new(f));
    }

    /// The backend's [write gate](Backend::write_gate), for a pruner of the same SQLite file.
    pub fn write_gate(&self) -> Option<&WriteGate> {
        self.gate.as_ref()
    }

    /// Stops taking records, lets the writer commit everything queued, and joins it, waiting
    /// at most `timeout`. Calling it again (or dropping the store) waits again if the writer
    /// was still busy.
    ///
    /// # Errors
    ///
    /// [`CloseError::Timeout`] if the writer is still working after `timeout`; it goes on in
    /// the background and every queued callback is still called.
    pub fn close(&self, timeout: Duration) -> Result<(), CloseError> {
        {
            let mut queue = self.shared.lock();
            queue.closed = true;
        }
        self.shared.wake.notify_all();
        let mut writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let Some((handle, exited)) = writer.take() else {
            return Ok(());
        };
        match exited.recv_timeout(timeout) {
            Ok(()) | Err(RecvTimeoutError::Disconnected) => {
                // The thread has returned (its sender is gone); join only reaps it. A panic
                // inside it was already accounted for by its exit guard.
                let _ = handle.join();
                Ok(())
            }
            Err(RecvTimeoutError::Timeout) => {
                *writer = Some((handle, exited));
                Err(CloseError::Timeout {
                    queued: self.queue_len(),
                })
            }
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // Bounded by `close_timeout`; a writer still stuck after it is left to finish alone.
        let _ = self.close(self.config.close_timeout);
    }
}

/// The writer thread's state.
struct Writer<B> {
    shared: Arc<Shared>,
    backend: B,
    metrics: Metrics,
    max_batch_messages: usize,
    max_batch_bytes: usize,
    /// When the last empty probe batch ran (see [`PROBE_INTERVAL`]).
    last_probe: Instant,
    /// [`Backend::probe_when_idle`]: probe also while healthy.
    probe_when_idle: bool,
}

/// How often an idle writer whose last commit failed tries an empty batch: 5 s. Each probe is
/// one short transaction; 5 s keeps a node out of a balancer's rotation for at most that long
/// after its store recovered.
const PROBE_INTERVAL: Duration = Duration::from_secs(5);

impl<B: Backend> Writer<B> {
    fn run(mut self) {
        let _guard = ExitGuard(Arc::clone(&self.shared));
        let mut records = Vec::with_capacity(self.max_batch_messages);
        let mut dones: Vec<Done> = Vec::with_capacity(self.max_batch_messages);
        while self.take_batch(&mut records, &mut dones) {
            self.commit(&records, &mut dones);
            records.clear();
        }
    }

    /// Waits for records and moves up to one batch of them out of the queue. Returns `false`
    /// when the store is closed and the queue is empty.
    fn take_batch(&mut self, records: &mut Vec<Record>, dones: &mut Vec<Done>) -> bool {
        let mut queue = self.shared.lock();
        while queue.items.is_empty() {
            if queue.closed {
                return false;
            }
            let now = Instant::now();
            self.shared.pulse.beat(now);
            // Idle after a failed commit: an empty batch tells whether the store works again
            // (readiness must not wait for traffic that a balancer no longer sends). A
            // backend that can fail while idle (a database connection) is probed always.
            if now.duration_since(self.last_probe) >= PROBE_INTERVAL
                && (self.probe_when_idle || self.shared.health.get() != Health::Ok)
            {
                self.last_probe = now;
                return true;
            }
            queue.writer_waiting = true;
            queue = self
                .shared
                .wake
                .wait_timeout(queue, WRITER_HEARTBEAT)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            queue.writer_waiting = false;
        }
        let mut bytes = 0usize;
        while let Some(next) = queue.items.front() {
            let size = next.record.size();
            if !records.is_empty()
                && (records.len() >= self.max_batch_messages
                    || bytes.saturating_add(size) > self.max_batch_bytes)
            {
                break;
            }
            // INVARIANT: `front()` just returned Some under the same lock.
            let Submission { record, done } = queue.items.pop_front().expect("front exists");
            bytes += size;
            records.push(record);
            dones.push(done);
        }
        queue.bytes -= bytes;
        self.shared.publish(&queue, &self.metrics);
        true
    }

    /// Commits one batch and completes its callbacks.
    fn commit(&mut self, records: &[Record], dones: &mut Vec<Done>) {
        if records.is_empty() {
            let probe = catch_unwind(AssertUnwindSafe(|| self.backend.commit_batch(&[])))
                .unwrap_or_else(|_| Err(StoreError::commit(Problem::BackendPanicked)));
            if let Err(e) = &probe
                && self.shared.pulse.commit_failed(e)
            {
                self.metrics.corruptions.increment(1);
            }
            self.shared.health.record(&probe);
            return;
        }
        if let Some(disk) = self.shared.disk.get().filter(|d| d.is_low()) {
            let error = disk.state().error();
            self.metrics.errors.increment(dones.len() as u64);
            send_together(|| {
                for done in dones.drain(..) {
                    complete(done, Err(error.clone()));
                }
            });
            return;
        }
        let started = Instant::now();
        // A panicking backend must not leave callbacks uncalled: treat it as a failed batch.
        let result = catch_unwind(AssertUnwindSafe(|| self.backend.commit_batch(records)))
            .unwrap_or_else(|_| Err(StoreError::commit(Problem::BackendPanicked)));
        let result = match result {
            Ok(outcomes) if outcomes.len() != records.len() => {
                Err(StoreError::commit(Problem::OutcomeCount {
                    records: records.len(),
                    outcomes: outcomes.len(),
                }))
            }
            other => other,
        };
        self.shared.health.record(&result);
        self.metrics
            .commit_seconds
            .record(started.elapsed().as_secs_f64());
        self.metrics.batch_messages.record(records.len() as f64);
        if let Err(e) = &result
            && self.shared.pulse.commit_failed(e)
        {
            self.metrics.corruptions.increment(1);
        }
        self.shared.pulse.beat(Instant::now());
        // The batch's replies reach a server's reactor in one wake-up, after the last of
        // them, not at the first (which had the reactor drain a few, sleep and wake again
        // dozens of times per batch: BENCHMARKS.md, issue #21).
        send_together(|| match result {
            Ok(outcomes) => {
                let duplicates = outcomes.iter().filter(|o| o.duplicate_of.is_some()).count();
                self.metrics.messages.increment(outcomes.len() as u64);
                self.metrics.duplicates.increment(duplicates as u64);
                for (done, outcome) in dones.drain(..).zip(outcomes) {
                    complete(done, Ok(outcome));
                }
            }
            Err(error) => {
                self.metrics.errors.increment(dones.len() as u64);
                for done in dones.drain(..) {
                    complete(done, Err(error.clone()));
                }
            }
        });
    }
}

/// Calls one callback, containing a panic to it.
fn complete(done: Done, result: Result<StoreOutcome, StoreError>) {
    let _ = catch_unwind(AssertUnwindSafe(move || done(result)));
}

/// Runs when the writer thread ends, however it ends: closes the queue and fails whatever is
/// left in it, so no callback is lost and no later submit waits forever.
struct ExitGuard(Arc<Shared>);

impl Drop for ExitGuard {
    fn drop(&mut self) {
        let left: Vec<Submission> = {
            let mut queue = self.0.lock();
            queue.closed = true;
            queue.bytes = 0;
            self.0.len.store(0, Ordering::Relaxed);
            self.0.bytes.store(0, Ordering::Relaxed);
            queue.items.drain(..).collect()
        };
        for Submission { done, .. } in left {
            complete(done, Err(StoreError::WriterGone));
        }
    }
}
