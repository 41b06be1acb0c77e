//! Retention: removing old messages so that the store stops growing, and giving the space back.
//!
//! A [`RetentionPolicy`] says how long messages are kept ([`RetentionPolicy::max_age`],
//! default [`DEFAULT_RETAIN`], 30 days) and optionally how large the store may grow
//! ([`RetentionPolicy::max_bytes`]). [`prune`] applies it once (the CLI's `prune`; SQLite:
//! [`prune_sqlite`], PostgreSQL: `prune_postgres`); a [`Pruner`] applies it in the
//! background, on its own thread and connection, while a [`Store`](crate::Store) writes
//! ([`Pruner::start`]). What is removed and in which order is decided here, once, for both
//! backends; each backend only lists candidates, deletes, gives space back and measures (a
//! `PruneTarget`). For PostgreSQL's side (batched `DELETE`, `VACUUM`, what a size cap is
//! measured against) see `crate::postgresql` (feature `postgres`).
//!
//! # What is removed, and what never is
//!
//! - Messages go **oldest first**, in store (id) order, which is commit order and therefore
//!   receive order. A pass stops at the first message that is inside the retention period
//!   (and, with a size cap, once the store is below it).
//! - **Never** a message that a forwarding destination has not delivered yet: when the table
//!   `forward_cursor(destination, lane, delivered_through)` exists and has rows, only ids up to
//!   the smallest `delivered_through` are candidates (everything up to a cursor is delivered
//!   or dead-lettered).
//! - **Never** a dead-lettered message: ids in `forward_dead_letter(message_id, status)` with a
//!   status other than `delivered` are skipped (and counted in [`PruneReport::protected`]).
//! - Both tables are the forwarder's; without them nothing is protected beyond age and size.
//! - A resend (`duplicate_of` set) is younger than its original, so the original goes first;
//!   the resend keeps the original's id as the record that it was one.
//!
//! # Small batches, off the commit path
//!
//! Each batch deletes at most [`RetentionPolicy::batch_rows`] messages in one short
//! transaction. In the same process the pruner and the store's writer take turns through a
//! [`WriteGate`] (a mutex) rather than SQLite's busy handler, which sleeps in steps of
//! milliseconds, and the writer comes first:
//!
//! - a batch ends early, after the row being deleted, as soon as the writer waits for the
//!   gate, and the pruner never takes the gate while the writer waits for it;
//! - the pruner commits without syncing (`synchronous=NORMAL` on its own connection: a delete
//!   lost to a power cut is redone by the next pass; the writer's next commit syncs it), and
//!   never checkpoints (SQLite's automatic checkpoint is off on its connection: it would copy
//!   the WAL and sync the database file while holding the gate); the store's checkpointer
//!   does that off everyone's path;
//! - a pass is paced ([`RetentionPolicy::rate`]): what a delete costs the writer is mostly
//!   disk writes, not the gate;
//! - between batches the pruner pauses ([`RetentionPolicy::pause`], and at least twice as long
//!   as the batch took), so it holds the gate at most a third of the time; after a batch the
//!   writer cut short only the pace applies (the writer has had its turn, and pausing after
//!   every cut would let a busy writer hold the pass below the arrival rate).
//!
//! (The gate, the unsynced commit and the pacing are SQLite's; a PostgreSQL pass uses the
//! batches and pauses.)
//!
//! Measured (BENCHMARKS.md, "p99 commit time with and without pruning"): the p99 commit time
//! under a fixed load with a pass running against the same load without.
//!
//! # Getting the space back (SQLite)
//!
//! Deleted rows leave free pages on SQLite's freelist; inserts reuse them, so the file stops
//! growing once retention runs. Stores created by this version have
//! `auto_vacuum=INCREMENTAL`, and the pruner also **returns** free pages to the file system
//! with `PRAGMA incremental_vacuum`, at most [`RELEASE_PAGES_PER_STEP`] pages per transaction
//! so that no step holds the write lock for long. Returning, not only reusing, because the
//! point of a size cap or a shorter retention is disk that other things can use again, and
//! because free space inside the file is invisible to the low-disk check.
//! Incremental mode over full `VACUUM`: it moves only pages at the end of the file, in small
//! steps, while the server runs; `VACUUM` rewrites the whole file and blocks writers.
//!
//! Stores created before (with `auto_vacuum=NONE`) keep working: their freed pages are
//! reused, so the file stops growing but does not shrink. `auto_vacuum` can only be switched
//! on by a full `VACUUM` with the server stopped (`sqlite3 FILE 'PRAGMA
//! auto_vacuum=INCREMENTAL; VACUUM'`, which needs free space about the size of the file).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use metrics::{Counter, Gauge, Unit};
use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};

use crate::error::{Cause, StoreError};
use crate::open::OpenOptions;
pub use crate::prune_target::StoreUsage;
use crate::prune_target::{Candidate, Candidates, PruneTarget, ROW_OVERHEAD};
use crate::record::{StoreId, system_time_to_us};
use crate::search_index;
use crate::spec::StoreSpec;
use crate::sqlite::{SqliteOptions, WriteGate, open_connection};

/// The default retention period: 30 days.
///
/// Long enough to look up, export or resend a month of messages (a billing cycle, the usual
/// window for "did this order ever arrive?"), short enough that an ordinary feed (100 msg/s of
/// 2 KiB: about 17 GB a day) needs about half a terabyte, not an ever-growing disk.
pub const DEFAULT_RETAIN: Duration = Duration::from_secs(30 * 24 * 3600);

/// Default of [`RetentionPolicy::batch_rows`]: 16 messages per delete transaction.
///
/// A delete costs about as much per row as an insert (the row, its index entries and the
/// pages it frees), so 16 rows hold the write lock for a fraction of a millisecond, and a
/// commit that arrives meanwhile does not even wait for them: the batch ends after the row
/// being deleted (see the module docs). Small batches matter when the pruner's thread loses
/// the CPU while it holds the gate (a loaded machine), and they spread the pass's disk writes
/// evenly between the writer's syncs: at 500 messages/s, a batch every ~30 ms. Measured
/// against 64 (BENCHMARKS.md), the p99 commit time was steadier.
pub const DEFAULT_BATCH_ROWS: usize = 16;

/// Default of [`RetentionPolicy::pause`]: at least 20 ms between two delete batches (and at
/// least twice as long as the batch took), so a pass gives the writer the lock back for
/// several commits between its own transactions and holds it at most a third of the time;
/// [`RetentionPolicy::rate`] usually asks for longer.
pub const DEFAULT_PAUSE: Duration = Duration::from_millis(20);

/// Default of [`RetentionPolicy::rate`]: 100 messages (or pages) per second, or
/// [`ARRIVAL_FACTOR`] times the arrival rate when that is higher.
///
/// What a delete costs the writer is mostly not the write gate but the disk: each deleted
/// message rewrites about its size in pages (table, indexes, free-list, pointer map) into the
/// WAL, which the writer's next sync and the checkpoints must write out too. Unpaced, a pass
/// over a backlog deleted ~10 000 messages/s and the p99 commit time under a 200 msg/s load
/// rose 5–20×; paced at 500/s it still rose about 2× on the loaded build machine
/// (BENCHMARKS.md). The pruner only has to keep up: it removes faster than messages arrive,
/// and a backlog (a shorter `--retain`, a store that ran without retention) shrinks at half
/// the arrival rate, or at 100/s (8.6 million a day) on a quiet store.
pub const DEFAULT_RATE: u32 = 100;

/// How much faster than messages arrive a paced pass may delete (see [`DEFAULT_RATE`]).
pub const ARRIVAL_FACTOR: f64 = 1.5;

/// Most free pages given back per `incremental_vacuum` transaction: 128 pages (512 KiB at
/// the default 4 KiB page). A step cannot end early like a delete batch, so it is kept to
/// about a millisecond of page moves: each moved page is written once to the WAL.
pub const RELEASE_PAGES_PER_STEP: i64 = 128;

/// How long messages are kept and how large the store may grow.
///
/// ```
/// use std::time::Duration;
/// use mllp_store::retention::{RetentionPolicy, DEFAULT_RETAIN};
///
/// let policy = RetentionPolicy::default().max_bytes(Some(50 << 30));
/// assert_eq!(policy.max_age, Some(DEFAULT_RETAIN));
/// assert_eq!(policy.interval(), Duration::from_secs(60));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetentionPolicy {
    /// Remove messages received longer ago than this (default [`DEFAULT_RETAIN`]); `None`
    /// keeps them whatever their age.
    pub max_age: Option<Duration>,
    /// Remove the oldest messages while the store's data (pages in use, not free pages) is
    /// larger than this many bytes; `None` (the default): no size cap.
    pub max_bytes: Option<u64>,
    /// Messages per delete transaction (default [`DEFAULT_BATCH_ROWS`]).
    pub batch_rows: usize,
    /// Pause between two batches of a pass (default [`DEFAULT_PAUSE`]).
    pub pause: Duration,
    /// Pace of a [`Pruner`]'s pass, in messages deleted (or pages given back) per second: at
    /// most this, or [`ARRIVAL_FACTOR`] times the rate at which messages arrive (over the
    /// newest 1 000) when that is higher (default [`DEFAULT_RATE`]); SQLite only. [`prune`] is not paced (someone waits for it), only
    /// paused.
    pub rate: u32,
}

impl Default for RetentionPolicy {
    fn default() -> Self {
        Self {
            max_age: Some(DEFAULT_RETAIN),
            max_bytes: None,
            batch_rows: DEFAULT_BATCH_ROWS,
            pause: DEFAULT_PAUSE,
            rate: DEFAULT_RATE,
        }
    }
}

impl RetentionPolicy {
    /// Sets [`max_age`](Self::max_age).
    pub fn max_age(mut self, age: Option<Duration>) -> Self {
        self.max_age = age;
        self
    }

    /// Sets [`max_bytes`](Self::max_bytes).
    pub fn max_bytes(mut self, bytes: Option<u64>) -> Self {
        self.max_bytes = bytes;
        self
    }

    /// Sets [`batch_rows`](Self::batch_rows) (at least 1).
    pub fn batch_rows(mut self, rows: usize) -> Self {
        self.batch_rows = rows.max(1);
        self
    }

    /// Sets [`pause`](Self::pause).
    pub fn pause(mut self, pause: Duration) -> Self {
        self.pause = pause;
        self
    }

    /// Sets [`rate`](Self::rate) (at least 1 per second).
    pub fn rate(mut self, per_second: u32) -> Self {
        self.rate = per_second.max(1);
        self
    }

    /// How often a [`Pruner`] starts a pass: a tenth of the retention period, between 100 ms
    /// and 60 s. A message therefore outlives its period by at most a tenth of it (a minute
    /// at most), and an idle store costs one cheap query a minute.
    pub fn interval(&self) -> Duration {
        let tenth = self.max_age.map_or(Duration::MAX, |age| age / 10);
        tenth.clamp(Duration::from_millis(100), Duration::from_secs(60))
    }
}

/// Whether [`prune_sqlite`] deletes or only counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PruneMode {
    /// Delete, and give free pages back.
    Delete,
    /// Count what would be deleted; change nothing.
    DryRun,
}

/// What one prune did (or, dry run, would do).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PruneReport {
    /// Messages deleted.
    pub deleted: u64,
    /// Their payload bytes.
    pub deleted_bytes: u64,
    /// Expired messages kept because they are dead-lettered (never removed).
    pub protected: u64,
    /// Bytes given back to the file system (0 for a store without incremental auto_vacuum).
    pub released_bytes: u64,
    /// The first message kept, if a pass stopped at one (oldest remaining, not protected).
    pub first_kept: Option<StoreId>,
}

impl PruneReport {
    fn add(&mut self, other: &Self) {
        self.deleted += other.deleted;
        self.deleted_bytes += other.deleted_bytes;
        self.protected += other.protected;
        self.released_bytes += other.released_bytes;
        self.first_kept = other.first_kept.or(self.first_kept);
    }
}

/// Applies `policy` once to the SQLite store at `path`, at time `now`: deletes (or, with
/// [`PruneMode::DryRun`], counts) the expired messages in batches, then gives free pages back.
/// Works while `serve` runs (it waits for SQLite's lock like any other writer).
///
/// ```
/// use std::time::SystemTime;
/// use mllp_store::retention::{prune_sqlite, PruneMode, RetentionPolicy};
/// use mllp_store::{SqliteBackend, SqliteOptions};
///
/// let dir = std::env::temp_dir().join(format!("mllp-store-doc-prune-{}", std::process::id()));
/// std::fs::create_dir_all(&dir)?;
/// let path = dir.join("store.db");
/// drop(SqliteBackend::open(&path, &SqliteOptions::default())?);
/// let report = prune_sqlite(&path, &RetentionPolicy::default(), SystemTime::now(),
///     PruneMode::DryRun, &SqliteOptions::default())?;
/// assert_eq!(report.deleted, 0);
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
///
/// As [`SqliteBackend::open`](crate::SqliteBackend::open) (a missing file is
/// [`StoreError::NotFound`]); [`StoreError::Read`] or [`StoreError::Commit`] when a query
/// fails. Batches deleted before the failure stay deleted.
pub fn prune_sqlite(
    path: &Path,
    policy: &RetentionPolicy,
    now: SystemTime,
    mode: PruneMode,
    options: &SqliteOptions,
) -> Result<PruneReport, StoreError> {
    let mut prune = Prune::new(SqliteTarget::open(path, options, None)?);
    prune.pass(policy, now, mode, &|| false)
}

/// Applies `policy` once to the store `spec` names: [`prune_sqlite`] or `prune_postgres`
/// (feature `postgres`).
///
/// # Errors
///
/// As those; [`StoreError::Open`] with [`Problem::NoPostgres`](crate::Problem::NoPostgres)
/// for a URL in a build without the feature `postgres`.
pub fn prune(
    spec: &StoreSpec,
    policy: &RetentionPolicy,
    now: SystemTime,
    mode: PruneMode,
    options: &OpenOptions,
) -> Result<PruneReport, StoreError> {
    match spec {
        StoreSpec::Sqlite(path) => prune_sqlite(path, policy, now, mode, &options.sqlite),
        #[cfg(feature = "postgres")]
        StoreSpec::Postgres(url) => prune_postgres(url, policy, now, mode, &options.postgres),
        #[cfg(not(feature = "postgres"))]
        StoreSpec::Postgres(_) => Err(crate::open::no_postgres(spec)),
    }
}

/// Applies `policy` once to the PostgreSQL store at `url`, as [`prune_sqlite`] does to a
/// file: oldest first, never an undelivered or dead-lettered message, in batches of
/// [`RetentionPolicy::batch_rows`] (see [`crate::postgresql`]'s retention notes for how the
/// space is reused). Works while `serve` runs, on any node.
///
/// # Errors
///
/// As [`PostgresBackend::connect`](crate::PostgresBackend::connect), except that a database
/// without a store is [`StoreError::NotAStore`]; [`StoreError::Read`] or
/// [`StoreError::Commit`] when a query fails. Batches deleted before the failure stay
/// deleted.
#[cfg(feature = "postgres")]
pub fn prune_postgres(
    url: &str,
    policy: &RetentionPolicy,
    now: SystemTime,
    mode: PruneMode,
    options: &crate::PostgresOptions,
) -> Result<PruneReport, StoreError> {
    let mut prune = Prune::new(crate::postgresql::retention::PgTarget::connect(
        url, options,
    )?);
    prune.pass(policy, now, mode, &|| false)
}

/// Reads a PostgreSQL store's [`StoreUsage`]: `file_bytes` is the table's
/// `pg_total_relation_size`, `used_bytes` an estimate of its data (see
/// [`prune_postgres`]).
///
/// # Errors
///
/// As [`prune_postgres`].
#[cfg(feature = "postgres")]
pub fn usage_postgres(
    url: &str,
    options: &crate::PostgresOptions,
) -> Result<StoreUsage, StoreError> {
    crate::postgresql::retention::PgTarget::connect(url, options)?.usage()
}

/// Reads a store's [`StoreUsage`] (file sizes, free pages, oldest message).
///
/// # Errors
///
/// As [`SqliteBackend::open_read_only`](crate::SqliteBackend::open_read_only), and
/// [`StoreError::Read`].
pub fn usage_sqlite(path: &Path, options: &SqliteOptions) -> Result<StoreUsage, StoreError> {
    let conn = crate::SqliteBackend::open_read_only(path, options)?.into_connection()?;
    usage(&conn, path).map_err(StoreError::read)
}

/// Metric names of the pruner (registered by [`Pruner::start_sqlite`]).
pub mod metric {
    /// Counter: messages removed by retention.
    pub const PRUNED_TOTAL: &str = "mllp_store_pruned_total";
    /// Gauge: bytes the store takes on disk (SQLite: database file plus WAL; PostgreSQL:
    /// `pg_total_relation_size` of the messages table).
    pub const STORE_BYTES: &str = "mllp_store_bytes";
    /// Gauge: age of the oldest stored message, in seconds (0 for an empty store).
    pub const OLDEST_AGE_SECONDS: &str = "mllp_store_oldest_age_seconds";
    /// Counter: retention passes that failed (each is reported to the pruner's callback).
    pub const PRUNE_ERRORS_TOTAL: &str = "mllp_store_prune_errors_total";
}

struct PruneMetrics {
    pruned: Counter,
    bytes: Gauge,
    oldest_age: Gauge,
    errors: Counter,
}

impl PruneMetrics {
    fn register() -> Self {
        use metric::*;
        metrics::describe_counter!(PRUNED_TOTAL, Unit::Count, "Messages removed by retention");
        metrics::describe_gauge!(
            STORE_BYTES,
            Unit::Bytes,
            "Bytes the store takes on disk (SQLite: file and WAL; PostgreSQL: the messages table)"
        );
        metrics::describe_gauge!(
            OLDEST_AGE_SECONDS,
            Unit::Seconds,
            "Age of the oldest stored message"
        );
        metrics::describe_counter!(
            PRUNE_ERRORS_TOTAL,
            Unit::Count,
            "Retention passes that failed"
        );
        Self {
            pruned: metrics::counter!(PRUNED_TOTAL),
            bytes: metrics::gauge!(STORE_BYTES),
            oldest_age: metrics::gauge!(OLDEST_AGE_SECONDS),
            errors: metrics::counter!(PRUNE_ERRORS_TOTAL),
        }
    }
}

/// What a [`Pruner`] reports after each pass (to the callback given to
/// [`Pruner::start_sqlite`]).
pub type PassResult = Result<(PruneReport, StoreUsage), StoreError>;

/// Retention in the background: a thread (`mllp-store-prune`) with its own connection that
/// applies a [`RetentionPolicy`] every [`RetentionPolicy::interval`], and publishes
/// `mllp_store_pruned_total`, `mllp_store_bytes` and `mllp_store_oldest_age_seconds`.
///
/// Stopping (or dropping) it ends the current batch and joins the thread.
#[derive(Debug)]
pub struct Pruner {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Pruner {
    /// Opens a second connection to the SQLite store at `path` and starts pruning it; `gate`
    /// is the store writer's ([`SqliteBackend::write_gate`](crate::SqliteBackend::write_gate)).
    /// `report` is called on the pruner's thread after every pass.
    ///
    /// # Errors
    ///
    /// As [`SqliteBackend::open`](crate::SqliteBackend::open); [`StoreError::Open`] if the
    /// thread cannot be spawned.
    pub fn start_sqlite(
        path: &Path,
        options: &SqliteOptions,
        policy: RetentionPolicy,
        gate: WriteGate,
        report: impl FnMut(&PassResult) + Send + 'static,
    ) -> Result<Self, StoreError> {
        let mut target = SqliteTarget::open(path, options, Some(gate))?;
        target.rate = Some(policy.rate);
        let prune = Prune::new(target);
        Self::spawn(prune, policy, report).map_err(|e| StoreError::open(path, e))
    }

    /// Starts pruning the store `spec` names: [`start_sqlite`](Self::start_sqlite) (with
    /// `gate`, the store writer's [`Store::write_gate`](crate::Store::write_gate); without one
    /// the two meet at SQLite's lock) or `start_postgres`.
    ///
    /// # Errors
    ///
    /// As those; [`StoreError::Open`] with [`Problem::NoPostgres`](crate::Problem::NoPostgres)
    /// for a URL in a build without the feature `postgres`.
    pub fn start(
        spec: &StoreSpec,
        options: &OpenOptions,
        policy: RetentionPolicy,
        gate: Option<WriteGate>,
        report: impl FnMut(&PassResult) + Send + 'static,
    ) -> Result<Self, StoreError> {
        match spec {
            StoreSpec::Sqlite(path) => Self::start_sqlite(
                path,
                &options.sqlite,
                policy,
                gate.unwrap_or_default(),
                report,
            ),
            #[cfg(feature = "postgres")]
            StoreSpec::Postgres(url) => {
                Self::start_postgres(url, &options.postgres, policy, report)
            }
            #[cfg(not(feature = "postgres"))]
            StoreSpec::Postgres(_) => {
                let _ = (policy, gate, report);
                Err(crate::open::no_postgres(spec))
            }
        }
    }

    /// Opens a connection of its own to the PostgreSQL store at `url` and starts pruning it.
    /// Every node of a cluster may run one: two pruners deleting the same rows only wait for
    /// each other's row locks, and a row is counted by the one that deleted it.
    ///
    /// # Errors
    ///
    /// As [`prune_postgres`]; [`StoreError::Open`] if the thread cannot be spawned.
    #[cfg(feature = "postgres")]
    pub fn start_postgres(
        url: &str,
        options: &crate::PostgresOptions,
        policy: RetentionPolicy,
        report: impl FnMut(&PassResult) + Send + 'static,
    ) -> Result<Self, StoreError> {
        let target = crate::postgresql::retention::PgTarget::connect(url, options)?;
        Self::spawn(Prune::new(target), policy, report)
            .map_err(|e| StoreError::open(std::path::Path::new(&crate::spec::redact(url)), e))
    }

    /// Starts the pruner's thread over `prune`.
    fn spawn(
        mut prune: Prune,
        policy: RetentionPolicy,
        mut report: impl FnMut(&PassResult) + Send + 'static,
    ) -> std::io::Result<Self> {
        let metrics = PruneMetrics::register();
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let stop_flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("mllp-store-prune".into())
            .spawn(move || {
                let (lock, wake) = &*stop_flag;
                let stopped = || *lock.lock().unwrap_or_else(PoisonError::into_inner);
                loop {
                    let now = SystemTime::now();
                    let result = prune
                        .pass(&policy, now, PruneMode::Delete, &stopped)
                        .and_then(|r| Ok((r, prune.target.usage()?)));
                    match &result {
                        Ok((done, usage)) => {
                            metrics.pruned.increment(done.deleted);
                            metrics.bytes.set(usage.file_bytes as f64);
                            metrics
                                .oldest_age
                                .set(usage.oldest_age(now).unwrap_or_default().as_secs_f64());
                        }
                        Err(_) => metrics.errors.increment(1),
                    }
                    report(&result);
                    let guard = lock.lock().unwrap_or_else(PoisonError::into_inner);
                    let (guard, _) = wake
                        .wait_timeout_while(guard, policy.interval(), |stop| !*stop)
                        .unwrap_or_else(PoisonError::into_inner);
                    if *guard {
                        return;
                    }
                }
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops after the current batch and joins the thread.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let (lock, wake) = &*self.stop;
        *lock.lock().unwrap_or_else(PoisonError::into_inner) = true;
        wake.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Pruner {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Applies a policy to one store through its [`PruneTarget`].
struct Prune {
    target: Box<dyn PruneTarget>,
}

/// An SQLite store's connection that prunes.
struct SqliteTarget {
    conn: Connection,
    path: PathBuf,
    gate: Option<WriteGate>,
    /// [`RetentionPolicy::rate`] for a background pruner, `None` on demand.
    rate: Option<u32>,
    /// The store's search index file, once a batch was deleted ([`search_index::forget`]).
    search_index: Option<Connection>,
}

impl SqliteTarget {
    fn open(
        path: &Path,
        options: &SqliteOptions,
        gate: Option<WriteGate>,
    ) -> Result<Self, StoreError> {
        // Through the backend first: the same checks (exists, is a store, version) and errors.
        drop(crate::SqliteBackend::open_read_only(path, options)?);
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = open_connection(path, flags, options, false, crate::sqlite::Role::Other)?;
        // `duplicate_of REFERENCES messages (id)` has no index on the referencing side: with
        // foreign keys enforced (this SQLite build's default), every delete would scan the
        // whole table for duplicates of the row, and deleting an original that a (younger,
        // kept) resend points to would fail. A resend keeps its `duplicate_of` id as the
        // record that it was one, also once its original is gone.
        conn.pragma_update(None, "foreign_keys", false)
            .map_err(|e| StoreError::open(path, e))?;
        // SQLite's automatic checkpoint would run inside the pruner's commit, while it holds
        // the write gate, whenever the WAL holds 1 000 pages (which under load it nearly
        // always does): the writer would wait for a copy of the whole WAL and a sync of the
        // database file. The store's checkpointer does that off everyone's path
        // (`crate::checkpoint`); it sees the pruner's pages at the writer's next commit.
        // (Only beside a writer of this process: alone, as `prune`, nobody else would.)
        if gate.is_some() {
            conn.pragma_update(None, "wal_autocheckpoint", 0)
                .map_err(|e| StoreError::open(path, e))?;
        }
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(|e| StoreError::open(path, e))?;
        Ok(Self {
            conn,
            path: path.to_owned(),
            gate,
            rate: None,
            search_index: None,
        })
    }
}

impl Prune {
    fn new(target: impl PruneTarget + 'static) -> Self {
        Self {
            target: Box::new(target),
        }
    }

    /// One pass: batches until nothing more is due (or `stopped()`), then gives pages back.
    fn pass(
        &mut self,
        policy: &RetentionPolicy,
        now: SystemTime,
        mode: PruneMode,
        stopped: &dyn Fn() -> bool,
    ) -> Result<PruneReport, StoreError> {
        let cutoff = policy.max_age.map(|age| {
            system_time_to_us(now)
                .saturating_sub(i64::try_from(age.as_micros()).unwrap_or(i64::MAX))
        });
        let mut total = PruneReport::default();
        let mut after: StoreId = 0;
        let rate = self.target.pace();
        let mut pace = Pacer::new(rate);
        // Dry run: the size still to free is estimated from the rows counted so far.
        let mut dry_freed: i64 = 0;
        loop {
            let over = match policy.max_bytes {
                Some(max) => {
                    let used = self.target.usage()?.used_bytes;
                    (used as i64)
                        .saturating_sub(max as i64)
                        .saturating_sub(dry_freed)
                }
                None => 0,
            };
            let started = Instant::now();
            let (report, more, freed, cut_short) =
                self.batch(policy, cutoff, over, &mut after, mode)?;
            if mode == PruneMode::DryRun {
                dry_freed += freed;
            }
            total.add(&report);
            // The size estimate within a batch is rough: after deleting, measure again.
            let remeasure = mode == PruneMode::Delete && policy.max_bytes.is_some();
            if !(more || remeasure && report.deleted > 0) || stopped() {
                break;
            }
            if mode == PruneMode::Delete {
                let arriving = match rate {
                    // An error only leaves the pace at the policy's rate.
                    Some(_) => self.target.arrival_rate().unwrap_or(0.0),
                    None => 0.0,
                };
                // Cut short by the writer: it has had its turn, so no pause beyond the pace
                // (a pause after every cut-short batch would let a busy writer starve the
                // pass below the arrival rate).
                let pause = if cut_short {
                    Duration::ZERO
                } else {
                    policy.pause
                };
                pace.give_way(started, report.deleted, pause, arriving);
            }
        }
        if mode == PruneMode::Delete {
            total.released_bytes = self.target.release(policy.pause, stopped)?;
        }
        Ok(total)
    }

    /// One batch after id `after`. Returns the batch's report, whether more may be due, the
    /// estimated bytes it freed, and whether the writer cut it short.
    fn batch(
        &mut self,
        policy: &RetentionPolicy,
        cutoff: Option<i64>,
        mut over: i64,
        after: &mut StoreId,
        mode: PruneMode,
    ) -> Result<(PruneReport, bool, i64, bool), StoreError> {
        let mut report = PruneReport::default();
        let limit = i64::try_from(policy.batch_rows).unwrap_or(i64::MAX);
        let Candidates { rows, floor, dead } = self.target.candidates(*after, limit)?;
        let full = rows.len() as i64 == limit;
        // Rows this batch is done with (deleted or protected), in id order, with their sizes
        // (`None`: protected); the delete may stop early, after any prefix of them.
        let mut done: Vec<(StoreId, Option<i64>)> = Vec::with_capacity(rows.len());
        let mut freed = 0i64;
        let mut stopped_at = None;
        for row in &rows {
            let expired = cutoff.is_some_and(|c| row.received_at_us < c);
            let delivered = floor.is_none_or(|f| row.id <= f);
            if !delivered || !(expired || over > 0) {
                stopped_at = Some(row.id);
                break;
            }
            if dead.contains(&row.id) {
                done.push((row.id, None));
                continue;
            }
            done.push((row.id, Some(row.size)));
            over -= row.size + ROW_OVERHEAD;
        }
        let victims: Vec<StoreId> = done
            .iter()
            .filter_map(|(id, size)| size.map(|_| *id))
            .collect();
        let deleted = if mode == PruneMode::Delete && !victims.is_empty() {
            self.target.delete_some(&victims)?
        } else {
            victims.len()
        };
        // Up to the last row deleted (all, unless the writer cut the batch short).
        let through = if deleted == victims.len() {
            done.len()
        } else {
            done.iter()
                .position(|(id, _)| *id == victims[deleted])
                .unwrap_or(done.len())
        };
        for (id, size) in &done[..through] {
            *after = *id;
            match size {
                Some(size) => {
                    report.deleted += 1;
                    report.deleted_bytes += (*size).max(0) as u64;
                    freed += size + ROW_OVERHEAD;
                }
                None => report.protected += 1,
            }
        }
        let cut_short = through < done.len();
        report.first_kept = if cut_short { None } else { stopped_at };
        Ok((
            report,
            cut_short || stopped_at.is_none() && full,
            freed,
            cut_short,
        ))
    }
}

impl PruneTarget for SqliteTarget {
    fn candidates(&mut self, after: StoreId, limit: i64) -> Result<Candidates, StoreError> {
        let conn = &self.conn;
        let read = || -> rusqlite::Result<_> {
            let rows = conn
                .prepare_cached(
                    "SELECT id, received_at_us, size FROM messages WHERE id > ?1 ORDER BY id LIMIT ?2",
                )?
                .query_map(params![after, limit], |r| {
                    Ok(Candidate {
                        id: r.get(0)?,
                        received_at_us: r.get(1)?,
                        size: r.get(2)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let floor = forward_floor(conn)?;
            let dead = match (rows.first(), rows.last()) {
                (Some(first), Some(last)) => dead_letters(conn, first.id, last.id)?,
                _ => HashSet::new(),
            };
            Ok(Candidates { rows, floor, dead })
        };
        read().map_err(StoreError::read)
    }

    fn delete(&mut self, ids: &[StoreId]) -> Result<(), StoreError> {
        let mut done = 0;
        while done < ids.len() {
            done += self.delete_some(&ids[done..])?;
        }
        Ok(())
    }

    /// Ends the transaction early when the store's writer waits for the gate.
    fn delete_some(&mut self, ids: &[StoreId]) -> Result<usize, StoreError> {
        let gate = self.gate.clone();
        let turn = gate.as_ref().map(WriteGate::enter_background);
        // Each deleted message's patient, for the search index file.
        let mut gone: Vec<(String, StoreId)> = Vec::new();
        let mut run = |conn: &mut Connection| -> rusqlite::Result<usize> {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut deleted = 0;
            {
                let mut delete =
                    tx.prepare_cached("DELETE FROM messages WHERE id = ?1 RETURNING patient_id")?;
                for id in ids {
                    let patient: Option<Option<String>> =
                        delete.query_row([id], |r| r.get(0)).optional()?;
                    if let Some(Some(patient)) = patient {
                        gone.push((patient, *id));
                    }
                    deleted += 1;
                    if gate.as_ref().is_some_and(WriteGate::writer_waiting) {
                        break;
                    }
                }
            }
            tx.commit()?;
            Ok(deleted)
        };
        let result = run(&mut self.conn);
        drop(turn);
        let deleted = result.map_err(|e| StoreError::commit(Cause::from(e).context("prune")))?;
        // Outside the gate: the index file is not the store's.
        search_index::forget(&mut self.search_index, &self.path, &gone);
        Ok(deleted)
    }

    fn pace(&self) -> Option<u32> {
        self.rate
    }

    fn arrival_rate(&mut self) -> Result<f64, StoreError> {
        arrival_rate(&self.conn).map_err(StoreError::read)
    }

    /// Gives free pages back to the file system in steps (incremental auto_vacuum only).
    fn release(&mut self, pause: Duration, stopped: &dyn Fn() -> bool) -> Result<u64, StoreError> {
        let pragma = |conn: &Connection, name: &str| -> rusqlite::Result<i64> {
            conn.pragma_query_value(None, name, |r| r.get(0))
        };
        let err = |e: rusqlite::Error| StoreError::commit(Cause::from(e).context("prune"));
        // 2 = INCREMENTAL (sqlite.org/pragma.html#pragma_auto_vacuum).
        if pragma(&self.conn, "auto_vacuum").map_err(err)? != 2 {
            return Ok(0);
        }
        let page_size = pragma(&self.conn, "page_size").map_err(err)?;
        let mut released = 0u64;
        let mut pace = Pacer::new(self.rate);
        loop {
            let free = pragma(&self.conn, "freelist_count").map_err(err)?;
            if free == 0 || stopped() {
                return Ok(released);
            }
            let step = free.min(RELEASE_PAGES_PER_STEP);
            let started = Instant::now();
            {
                let _turn = self.gate.as_ref().map(WriteGate::enter_background);
                self.conn
                    .execute_batch(&format!("PRAGMA incremental_vacuum({step})"))
                    .map_err(err)?;
            }
            let left = pragma(&self.conn, "freelist_count").map_err(err)?;
            let moved = free.saturating_sub(left);
            released += (moved * page_size) as u64;
            if moved == 0 {
                return Ok(released);
            }
            let arriving = match self.rate {
                Some(_) => arrival_rate(&self.conn).unwrap_or(0.0),
                None => 0.0,
            };
            pace.give_way(started, moved.max(0) as u64, pause, arriving);
        }
    }

    fn usage(&mut self) -> Result<StoreUsage, StoreError> {
        usage(&self.conn, &self.path).map_err(StoreError::read)
    }
}

/// Paces a pass (see [`RetentionPolicy::rate`]): after each step, sleeps the longest of
/// `pause`, twice the step's duration (so that retention holds the write gate at most a third
/// of the time however slow the disk), and, with a rate, what keeps the pass at that rate (or
/// [`ARRIVAL_FACTOR`] times the arrival rate, when higher) since it began.
struct Pacer {
    began: Instant,
    /// Messages deleted and pages given back so far in this pass.
    done: u64,
    /// The policy's rate, `None`: pauses only.
    rate: Option<f64>,
}

impl Pacer {
    fn new(rate: Option<u32>) -> Self {
        Self {
            began: Instant::now(),
            done: 0,
            rate: rate.map(|r| f64::from(r.max(1))),
        }
    }

    /// After a step that began at `step_started` and did `units`, with messages arriving at
    /// `arriving` per second.
    fn give_way(&mut self, step_started: Instant, units: u64, pause: Duration, arriving: f64) {
        self.done += units;
        let mut wait = pause.max(step_started.elapsed() * 2);
        if let Some(floor) = self.rate {
            let rate = floor.max(ARRIVAL_FACTOR * arriving);
            let due = Duration::from_secs_f64(self.done as f64 / rate);
            wait = wait.max(due.saturating_sub(self.began.elapsed()));
        }
        std::thread::sleep(wait);
    }
}

/// Messages that the arrival rate is measured over: the newest 1 000.
const ARRIVAL_WINDOW: i64 = 1_000;

/// Messages per second arriving lately: the newest [`ARRIVAL_WINDOW`] messages (fewer where
/// older ones were pruned) over the time since the oldest of them arrived (two probes by id).
/// 0 for an empty or idle store.
fn arrival_rate(conn: &Connection) -> rusqlite::Result<f64> {
    let newest: StoreId = conn
        .prepare_cached("SELECT coalesce(max(id), 0) FROM messages")?
        .query_row([], |r| r.get(0))?;
    let since: Option<(StoreId, i64)> = conn
        .prepare_cached(
            "SELECT id, received_at_us FROM messages WHERE id >= ?1 ORDER BY id LIMIT 1",
        )?
        .query_row([newest.saturating_sub(ARRIVAL_WINDOW).max(1)], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()?;
    let Some((id, received_at_us)) = since else {
        return Ok(0.0);
    };
    let age_us = system_time_to_us(SystemTime::now()).saturating_sub(received_at_us);
    Ok(if age_us > 0 {
        (newest - id) as f64 * 1e6 / age_us as f64
    } else {
        0.0
    })
}

/// Whether the database has a table of this name (the forwarder's may be absent).
fn has_table(conn: &Connection, name: &str) -> rusqlite::Result<bool> {
    conn.prepare_cached("SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = ?1")?
        .query_row([name], |_| Ok(()))
        .optional()
        .map(|found| found.is_some())
}

/// The highest id that every forwarding cursor has passed, `None` if none constrains.
fn forward_floor(conn: &Connection) -> rusqlite::Result<Option<StoreId>> {
    if !has_table(conn, "forward_cursor")? {
        return Ok(None);
    }
    conn.query_row(
        "SELECT min(delivered_through) FROM forward_cursor",
        [],
        |r| r.get(0),
    )
}

/// Dead-lettered (not re-delivered) message ids in `first..=last`.
fn dead_letters(
    conn: &Connection,
    first: StoreId,
    last: StoreId,
) -> rusqlite::Result<HashSet<StoreId>> {
    if !has_table(conn, "forward_dead_letter")? {
        return Ok(HashSet::new());
    }
    conn.prepare_cached(
        "SELECT message_id FROM forward_dead_letter
         WHERE status <> 'delivered' AND message_id BETWEEN ?1 AND ?2",
    )?
    .query_map([first, last], |r| r.get(0))?
    .collect()
}

fn usage(conn: &Connection, path: &Path) -> rusqlite::Result<StoreUsage> {
    let pragma =
        |name: &str| -> rusqlite::Result<i64> { conn.pragma_query_value(None, name, |r| r.get(0)) };
    let page_size = pragma("page_size")?.max(0) as u64;
    let pages = pragma("page_count")?.max(0) as u64;
    let free = pragma("freelist_count")?.max(0) as u64;
    let oldest = conn
        .query_row(
            "SELECT received_at_us FROM messages ORDER BY id LIMIT 1",
            [],
            |r| r.get(0),
        )
        .optional()?;
    let on_disk = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    Ok(StoreUsage {
        file_bytes: on_disk(path) + on_disk(Path::new(&wal)),
        used_bytes: pages.saturating_sub(free) * page_size,
        free_bytes: free * page_size,
        oldest_received_us: oldest,
    })
}
