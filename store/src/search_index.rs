//! The patient search index, kept off the commit path: a derived SQLite file beside the
//! store, filled by a follower thread from messages already committed.
//!
//! An index on `messages (patient_id)` in the store itself cost the durable receive path up
//! to 16 % of its throughput (BENCHMARKS.md, issue #20: every message added a random B-tree
//! leaf to the commit's WAL, which the commit's sync had to write). So the writer only
//! stores `patient_id` in the row, and the index lives elsewhere:
//!
//! - **The file** is the store's path with [`SUFFIX`] appended (`messages.db` →
//!   `messages.db-search`, beside SQLite's own `-wal` and `-shm`), in WAL mode with
//!   `synchronous=NORMAL`: it is derived data, never synced on anyone's commit path, and
//!   re-derived when lost.
//!
//!   ```sql
//!   CREATE TABLE search_index_state (
//!       store_token     TEXT NOT NULL,     -- the store's `mllp_store_identity.token`
//!       indexed_through INTEGER NOT NULL   -- every message with id <= this is indexed
//!   );
//!   CREATE TABLE patient_index (              -- one B-tree: a patient's ids, in order
//!       patient_id TEXT NOT NULL,             -- messages.patient_id (PID-3.1, raw)
//!       id         INTEGER NOT NULL,          -- messages.id
//!       PRIMARY KEY (patient_id, id)
//!   ) WITHOUT ROWID;
//!   ```
//!
//!   One B-tree, not a table keyed by id plus an index: a fifth fewer instructions per
//!   message for the follower (callgrind, BENCHMARKS.md); the pruner, which deletes by id,
//!   gets each deleted message's patient from its `DELETE … RETURNING`.
//!
//! - **The follower** ([`SearchIndexer`], started by every SQLite writer,
//!   [`SqliteBackend::open`](crate::SqliteBackend::open)) reads the committed messages after
//!   `indexed_through` from the store (read-only: it never takes the store's write lock nor
//!   the [`WriteGate`](crate::WriteGate)) and indexes up to [`CHUNK_MESSAGES`] of them per
//!   transaction, moving `indexed_through` **in the same transaction** as the rows, so a
//!   crash leaves both as of one commit. The writer wakes it after a commit with one atomic
//!   swap (a lock and a notify only for the first commit after a pass; nothing per
//!   message); it then runs at most once per [`PACE`], so
//!   under load each of its transactions covers hundreds or thousands of messages. It runs
//!   at a lower CPU priority ([`FOLLOWER_NICE`]) than the receive path.
//! - **Search** ([`search`](crate::search)) reads the index for ids up to `indexed_through`
//!   and scans the messages after it (the follower's lag, a short range of the primary key)
//!   by their `patient_id` column, in one statement; every match is checked against the
//!   message row itself, so a stale entry never returns a wrong message. The gauge
//!   `mllp_store_search_index_lag_messages` is the lag as of the follower's last pass.
//! - **Identity.** The store holds a random token (`mllp_store_identity`, written once by the
//!   first writer of this version). An index file whose token differs, whose
//!   `indexed_through` is past the store's highest id ever given, or that is missing, not a
//!   database or damaged (found by `quick_check` when the follower starts, or by any of its
//!   statements) is deleted and rebuilt from id 0 in the background; meanwhile search scans
//!   (slower, still right). A search that finds the index unusable ignores it.
//! - **Retention.** The pruner deletes its batches' entries from the index after deleting the
//!   messages; an entry that escapes (a message indexed at the moment it was
//!   pruned) only costs space: search joins every entry to its message row.
//! - **Migration.** A store with the old inline index `messages_patient` loses it when a
//!   writer of this version opens it (`DROP INDEX`, once; freed pages go to the freelist),
//!   and the follower builds the file from id 0.
//!
//! `export` ignores the file; `check` checks it too (damage there is reported, and repaired
//! by the next `serve`). Messages stored before the `patient_id` column existed have none
//! and are not indexed (as before).

use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use metrics::{Gauge, Unit};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use crate::record::StoreId;
use crate::sqlite_uri::uri;

/// What is appended to the store's path to name the index file: `-search`.
pub const SUFFIX: &str = "-search";

/// Gauge: messages committed but not yet in the search index, as of the follower's last pass.
pub const LAG_MESSAGES: &str = "mllp_store_search_index_lag_messages";

/// Most messages the follower indexes in one transaction: 10 000.
///
/// One transaction per chunk bounds how long it holds a read snapshot of the store (which
/// keeps the checkpointer from starting the WAL over) to milliseconds, and a rebuild of a
/// large store commits its progress every chunk.
pub const CHUNK_MESSAGES: i64 = 10_000;

/// The follower's pace: at most one pass per 200 ms.
///
/// A pass's cost is mostly per transaction (a B-tree descent per index page touched, the
/// commit), so fewer, larger passes cost less per message; 200 ms keeps the unindexed tail
/// that a search scans to a few thousand messages at the highest rates measured (S2,
/// 50 connections: ~20 000 messages/s).
pub const PACE: Duration = Duration::from_millis(200);

/// How long the follower waits before trying again after a failure (the index file cannot
/// be created, the store is locked past the busy timeout): 5 s.
const RETRY: Duration = Duration::from_secs(5);

/// The index file of the store at `store`: its path with [`SUFFIX`] appended.
///
/// ```
/// use std::path::Path;
/// let side = mllp_store::search_index::index_path(Path::new("/var/lib/mllp/messages.db"));
/// assert_eq!(side, Path::new("/var/lib/mllp/messages.db-search"));
/// ```
pub fn index_path(store: &Path) -> PathBuf {
    let mut name = store.as_os_str().to_owned();
    name.push(SUFFIX);
    PathBuf::from(name)
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS search_index_state (
    store_token     TEXT NOT NULL,
    indexed_through INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS patient_index (
    patient_id TEXT NOT NULL,
    id         INTEGER NOT NULL,
    PRIMARY KEY (patient_id, id)
) WITHOUT ROWID;
";

/// The store's identity table (in the store file), written once by a writer.
const IDENTITY: &str = "CREATE TABLE IF NOT EXISTS mllp_store_identity (token TEXT NOT NULL)";

/// The highest id the store ever gave (`AUTOINCREMENT`'s counter survives pruning).
const STORE_SEQUENCE: &str =
    "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'messages'), 0)";

/// On a store writer's connection at open: gives the store its identity token unless it has
/// one (under the write lock, so two openers agree).
pub(crate) fn ensure_identity(conn: &Connection) -> rusqlite::Result<()> {
    if store_token(conn, "main")?.is_some() {
        return Ok(());
    }
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let result = (|| {
        conn.execute_batch(IDENTITY)?;
        if store_token(conn, "main")?.is_none() {
            conn.execute(
                "INSERT INTO mllp_store_identity (token) VALUES (?1)",
                [new_token()],
            )?;
        }
        conn.execute_batch("COMMIT")
    })();
    if result.is_err() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    result
}

/// The token of the store attached as `schema`, `None` before a writer gave it one.
fn store_token(conn: &Connection, schema: &str) -> rusqlite::Result<Option<String>> {
    let has_table: bool = conn.query_row(
        &format!(
            "SELECT count(*) FROM {schema}.sqlite_schema \
             WHERE type = 'table' AND name = 'mllp_store_identity'"
        ),
        [],
        |r| r.get::<_, i64>(0).map(|n| n > 0),
    )?;
    if !has_table {
        return Ok(None);
    }
    conn.query_row(
        &format!("SELECT token FROM {schema}.mllp_store_identity LIMIT 1"),
        [],
        |r| r.get(0),
    )
    .optional()
}

/// 64 random bits (the standard library's per-process random hash keys, mixed with the
/// time and the process id), as hex.
fn new_token() -> String {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    h.write_u128(now);
    h.write_u32(std::process::id());
    format!("{:016x}", h.finish())
}

/// For a search on `conn` (the store, read-only, opened with URIs allowed): attaches the
/// store's index file as `search` and returns how far it is valid (`indexed_through`), or
/// `None` when there is no usable index (missing, not ours, damaged header, ahead of the
/// store): the search then scans.
pub(crate) fn attach_for_search(conn: &Connection, store: &Path) -> Option<StoreId> {
    let side = index_path(store);
    if !side.exists() {
        return None;
    }
    let mut wal = side.as_os_str().to_owned();
    wal.push("-wal");
    // As the store's own read-only open: without a `-wal` (no follower running) read the
    // file as it is, creating nothing.
    let query = if Path::new(&wal).exists() {
        "mode=ro"
    } else {
        "immutable=1"
    };
    let attached = conn
        .execute("ATTACH DATABASE ?1 AS search", [uri(&side, query)?])
        .is_ok();
    if !attached {
        return None;
    }
    let usable = (|| -> rusqlite::Result<Option<StoreId>> {
        let token = store_token(conn, "main")?;
        let state: Option<(String, StoreId)> = conn
            .query_row(
                "SELECT store_token, indexed_through FROM search.search_index_state",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let sequence: StoreId = conn.query_row(STORE_SEQUENCE, [], |r| r.get(0))?;
        Ok(match (token, state) {
            (Some(token), Some((theirs, through))) if token == theirs && through <= sequence => {
                Some(through)
            }
            _ => None,
        })
    })();
    match usable {
        Ok(Some(through)) => Some(through),
        _ => {
            let _ = conn.execute_batch("DETACH DATABASE search");
            None
        }
    }
}

/// After the pruner deleted messages from the store at `store`: deletes their index entries
/// (`(patient, id)` of each deleted message that had a patient), if the store has an index
/// file. Best effort: an entry left behind costs space only.
pub(crate) fn forget(side: &mut Option<Connection>, store: &Path, gone: &[(String, StoreId)]) {
    if gone.is_empty() {
        return;
    }
    if side.is_none() {
        let path = index_path(store);
        if !path.exists() {
            return;
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let Ok(conn) = Connection::open_with_flags(&path, flags) else {
            return;
        };
        if conn.busy_timeout(Duration::from_secs(5)).is_err()
            || conn.pragma_update(None, "synchronous", "NORMAL").is_err()
        {
            return;
        }
        *side = Some(conn);
    }
    let Some(conn) = side.as_mut() else { return };
    let run = |conn: &mut Connection| -> rusqlite::Result<()> {
        let tx = conn.transaction()?;
        {
            let mut delete =
                tx.prepare_cached("DELETE FROM patient_index WHERE patient_id = ?1 AND id = ?2")?;
            for (patient, id) in gone {
                delete.execute(params![patient, id])?;
            }
        }
        tx.commit()
    };
    if run(conn).is_err() {
        // Reopened next time (the file may have been rebuilt meanwhile).
        *side = None;
    }
}

/// The follower thread of one store writer (see the module docs).
#[derive(Debug)]
pub struct SearchIndexer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    /// Set by the writer after a commit, cleared by the follower as it starts a pass.
    pending: AtomicBool,
    /// The highest id the writer committed (for the lag).
    committed: AtomicI64,
    /// The follower's state, and its wake-up.
    state: Mutex<State>,
    wake: Condvar,
    /// Signalled after every chunk the follower commits.
    progress: Condvar,
    /// Interrupts the follower's `quick_check` while one runs (a large file takes a second or
    /// more), so that closing the writer never waits for it. Only then: an interrupt that
    /// finds no statement running would stop the checkpoint at the connection's close.
    interrupt: Mutex<Option<rusqlite::InterruptHandle>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("pending", &self.pending)
            .field("committed", &self.committed)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct State {
    closed: bool,
    /// `indexed_through` as of the follower's last commit (`None` before its first).
    indexed_through: Option<StoreId>,
    /// Tests: the follower does nothing while held.
    held: bool,
}

impl SearchIndexer {
    /// Starts the follower of the store at `store` (its writer gave it its identity).
    pub(crate) fn start(store: &Path, busy_timeout: Duration) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            pending: AtomicBool::new(true),
            committed: AtomicI64::new(0),
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            progress: Condvar::new(),
            interrupt: Mutex::new(None),
        });
        metrics::describe_gauge!(
            LAG_MESSAGES,
            Unit::Count,
            "Messages committed but not yet in the search index (search scans them)"
        );
        let lag = metrics::gauge!(LAG_MESSAGES);
        let thread = {
            let shared = Arc::clone(&shared);
            let store = store.to_owned();
            std::thread::Builder::new()
                .name("mllp-store-search-index".into())
                .spawn(move || Follower::new(store, busy_timeout, shared, lag).run())?
        };
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// On the writer thread after a commit whose last id is `last`: one atomic store, and a
    /// lock and notify only for the first commit since the follower's last pass.
    pub(crate) fn committed(&self, last: StoreId) {
        self.shared.committed.fetch_max(last, Ordering::Relaxed);
        if !self.shared.pending.swap(true, Ordering::AcqRel) {
            let _state = self.lock();
            self.shared.wake.notify_one();
        }
    }

    /// How far the index is built (`None` before the follower's first commit).
    pub fn indexed_through(&self) -> Option<StoreId> {
        self.lock().indexed_through
    }

    /// Waits until the index covers `id` or `timeout` passes; whether it does.
    pub fn wait_for(&self, id: StoreId, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        loop {
            if state.indexed_through.is_some_and(|t| t >= id) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            state = self
                .shared
                .progress
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Tests: holds the follower (it finishes the chunk it is in) or lets it go on.
    pub fn hold(&self, held: bool) {
        self.lock().held = held;
        self.shared.pending.store(true, Ordering::Release);
        self.shared.wake.notify_one();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for SearchIndexer {
    fn drop(&mut self) {
        self.lock().closed = true;
        self.shared.wake.notify_one();
        if let Some(handle) = &*self
            .shared
            .interrupt
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
        {
            handle.interrupt();
        }
        if let Some(thread) = self.thread.take() {
            // The chunk in progress finishes first (milliseconds).
            let _ = thread.join();
        }
    }
}

/// What went wrong in a pass: the file must be rebuilt, or only retried later.
enum Failure {
    Rebuild,
    Retry,
}

impl From<rusqlite::Error> for Failure {
    fn from(e: rusqlite::Error) -> Self {
        // Damage (as `crate::sqlite::is_corruption`): the file goes.
        let code = e.sqlite_error_code();
        if matches!(
            code,
            Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase)
        ) {
            Self::Rebuild
        } else {
            Self::Retry
        }
    }
}

/// The follower thread's state.
struct Follower {
    store: PathBuf,
    busy_timeout: Duration,
    shared: Arc<Shared>,
    lag: Gauge,
    /// The index file, with the store attached read-only as `store`.
    conn: Option<Connection>,
}

impl Follower {
    fn new(store: PathBuf, busy_timeout: Duration, shared: Arc<Shared>, lag: Gauge) -> Self {
        Self {
            store,
            busy_timeout,
            shared,
            lag,
            conn: None,
        }
    }

    fn run(mut self) {
        lower_priority();
        let mut last_pass: Option<Instant> = None;
        loop {
            // Pace: no pass sooner than PACE after the last one.
            if let Some(at) = last_pass
                && !self.sleep_until(at + PACE)
            {
                return;
            }
            if !self.wait_for_work() {
                return;
            }
            last_pass = Some(Instant::now());
            match self.pass() {
                Ok(()) => {}
                Err(Failure::Rebuild) => {
                    self.conn = None;
                    remove_index(&self.store);
                    self.shared.pending.store(true, Ordering::Release);
                }
                Err(Failure::Retry) => {
                    self.conn = None;
                    self.shared.pending.store(true, Ordering::Release);
                    if !self.sleep_until(Instant::now() + RETRY) {
                        return;
                    }
                }
            }
        }
    }

    /// Waits until `deadline` or close; `false` when closed.
    fn sleep_until(&self, deadline: Instant) -> bool {
        let mut state = self.lock();
        while !state.closed {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return true;
            }
            state = self
                .shared
                .wake
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        false
    }

    /// Waits for a commit since the last pass (and not held); `false` when closed.
    fn wait_for_work(&self) -> bool {
        let mut state = self.lock();
        loop {
            if state.closed {
                return false;
            }
            if !state.held && self.shared.pending.swap(false, Ordering::AcqRel) {
                return true;
            }
            state = self
                .shared
                .wake
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Indexes chunks until caught up with the store (or closed, or held).
    fn pass(&mut self) -> Result<(), Failure> {
        if self.conn.is_none() {
            self.conn = Some(self.open()?);
        }
        loop {
            let conn = self.conn.as_mut().ok_or(Failure::Retry)?;
            let (through, last) = index_chunk(conn, CHUNK_MESSAGES)?;
            let full = through < last;
            // The writer's last commit, or the store's last id (a rebuild, before any commit).
            let committed = self.shared.committed.load(Ordering::Relaxed).max(last);
            self.lag
                .set(committed.saturating_sub(through).max(0) as f64);
            let mut state = self.lock();
            state.indexed_through = Some(through);
            self.shared.progress.notify_all();
            if !full || state.closed || state.held {
                return Ok(());
            }
        }
    }

    /// Opens (creating or rebuilding as needed) the index file and attaches the store.
    fn open(&self) -> Result<Connection, Failure> {
        let interrupt = |handle: Option<rusqlite::InterruptHandle>| {
            *self
                .shared
                .interrupt
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = handle;
        };
        match open_index(&self.store, self.busy_timeout, &interrupt) {
            Err(Failure::Rebuild) => {
                remove_index(&self.store);
                open_index(&self.store, self.busy_timeout, &interrupt)
            }
            other => other,
        }
    }
}

/// The follower's nice value: 10. When the CPUs are busy the receive path (reactors, the
/// store's writer) comes first; an idle CPU still runs the follower at once. Under
/// sustained overload it falls behind, and searches scan the longer tail until it catches up.
pub const FOLLOWER_NICE: i32 = 10;

/// Gives this thread (the follower) [`FOLLOWER_NICE`]; best effort.
#[cfg(target_os = "linux")]
fn lower_priority() {
    #[allow(unsafe_code)]
    // SAFETY: `gettid` has no preconditions; `setpriority` with this thread's own id changes
    // only this thread's nice value (on Linux a thread has its own) and touches no memory.
    unsafe {
        let tid = libc::gettid();
        let _ = libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, FOLLOWER_NICE);
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_priority() {}

/// Deletes the index file and its WAL and shared memory.
fn remove_index(store: &Path) {
    let side = index_path(store);
    for suffix in ["", "-wal", "-shm"] {
        let mut name = side.as_os_str().to_owned();
        name.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(name));
    }
}

/// Opens the index file of `store`, creating it, checking it (`quick_check`, identity) and
/// attaching the store read-only as `store`. [`Failure::Rebuild`] when the file must go.
/// `interrupt` gets the connection's interrupt handle for the time the `quick_check` runs.
fn open_index(
    store: &Path,
    busy_timeout: Duration,
    interrupt: &dyn Fn(Option<rusqlite::InterruptHandle>),
) -> Result<Connection, Failure> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX
        | OpenFlags::SQLITE_OPEN_URI;
    let conn = Connection::open_with_flags(index_path(store), flags)?;
    conn.busy_timeout(busy_timeout)?;
    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(Failure::Retry);
    }
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    interrupt(Some(conn.get_interrupt_handle()));
    let ok = conn.query_row("PRAGMA quick_check(1)", [], |r| r.get::<_, String>(0));
    interrupt(None);
    let ok = ok?;
    if ok != "ok" {
        return Err(Failure::Rebuild);
    }
    conn.execute_batch(SCHEMA)?;
    let store_uri = uri(store, "mode=ro").ok_or(Failure::Retry)?;
    conn.execute("ATTACH DATABASE ?1 AS store", [store_uri])?;
    // The store's identity: written by its writer at open, before this thread started.
    let token = store_token(&conn, "store")?.ok_or(Failure::Retry)?;
    let state: Option<(String, StoreId)> = conn
        .query_row(
            "SELECT store_token, indexed_through FROM search_index_state",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let sequence: StoreId = conn.query_row(
        "SELECT coalesce((SELECT seq FROM store.sqlite_sequence WHERE name = 'messages'), 0)",
        [],
        |r| r.get(0),
    )?;
    match state {
        None => {
            conn.execute(
                "INSERT INTO search_index_state (store_token, indexed_through) VALUES (?1, 0)",
                [token],
            )?;
        }
        // Another store's index, or one ahead of this store (a store restored from an older
        // copy would give those ids to other messages): start over.
        Some((theirs, through)) if theirs != token || through > sequence => {
            return Err(Failure::Rebuild);
        }
        Some(_) => {}
    }
    Ok(conn)
}

/// One chunk: indexes the committed messages with ids from `indexed_through` (exclusive)
/// to `indexed_through` plus `limit` and moves `indexed_through` to the last of them, in one
/// transaction of the index file (and one read snapshot of the store). Returns the new
/// `indexed_through` and the store's last id (more follow while it is larger). Ids are dense
/// but for pruned ranges, so a chunk holds at most `limit` messages, and reading them is one
/// range of the store's primary key.
pub(crate) fn index_chunk(
    conn: &mut Connection,
    limit: i64,
) -> rusqlite::Result<(StoreId, StoreId)> {
    let tx = conn.transaction()?;
    // The index file's write lock first, before any read: a transaction that read first
    // could not write after another connection (the pruner's `forget`) wrote in between.
    tx.execute(
        "UPDATE search_index_state SET indexed_through = indexed_through",
        [],
    )?;
    let from: StoreId =
        tx.query_row("SELECT indexed_through FROM search_index_state", [], |r| {
            r.get(0)
        })?;
    let last: Option<StoreId> =
        tx.query_row("SELECT max(id) FROM store.messages", [], |r| r.get(0))?;
    let last = match last {
        Some(last) if last > from => last,
        _ => return Ok((from, last.unwrap_or(0))),
    };
    let through = last.min(from.saturating_add(limit));
    tx.prepare_cached(
        // OR IGNORE: an id already there (indexed by another follower of the same store) has
        // the same patient; and a statement that cannot abort needs no statement journal.
        "INSERT OR IGNORE INTO patient_index (patient_id, id) \
         SELECT patient_id, id FROM store.messages \
         WHERE id > ?1 AND id <= ?2 AND patient_id IS NOT NULL",
    )?
    .execute(params![from, through])?;
    tx.execute(
        "UPDATE search_index_state SET indexed_through = ?1",
        [through],
    )?;
    tx.commit()?;
    Ok((through, last))
}

#[cfg(test)]
mod tests {
    use mllp_test_support::TempDir;

    use super::*;

    /// A store with messages 1..=n (patient `P{id}`), and its index file opened and attached.
    fn fixture(name: &str, n: i64) -> (TempDir, Connection) {
        let dir = TempDir::new(&format!("search-index-{name}"));
        let store = dir.join("store.db");
        {
            let conn = Connection::open(&store).unwrap();
            conn.execute_batch(
                "PRAGMA journal_mode=WAL;
                 CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, patient_id TEXT);",
            )
            .unwrap();
            ensure_identity(&conn).unwrap();
            for i in 1..=n {
                conn.execute(
                    "INSERT INTO messages (patient_id) VALUES (?1)",
                    [format!("P{i}")],
                )
                .unwrap();
            }
        }
        let conn = open_index(&store, Duration::from_secs(5), &drop)
            .ok()
            .unwrap();
        (dir, conn)
    }

    fn state(conn: &Connection) -> (StoreId, i64) {
        conn.query_row(
            "SELECT (SELECT indexed_through FROM search_index_state), \
             (SELECT count(*) FROM patient_index)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap()
    }

    /// Chunks move `indexed_through` with their rows, and stop when caught up.
    #[test]
    fn chunks_index_committed_messages_in_order() {
        let (_dir, mut conn) = fixture("chunks", 25);
        assert_eq!(index_chunk(&mut conn, 10).unwrap(), (10, 25));
        assert_eq!(state(&conn), (10, 10));
        assert_eq!(index_chunk(&mut conn, 10).unwrap(), (20, 25));
        assert_eq!(index_chunk(&mut conn, 10).unwrap(), (25, 25));
        assert_eq!(index_chunk(&mut conn, 10).unwrap(), (25, 25));
        assert_eq!(state(&conn), (25, 25));
    }

    /// Crash consistency: a chunk that fails part-way (here: an insert refused by a trigger)
    /// leaves neither its rows nor a moved `indexed_through`: both are one transaction.
    #[test]
    fn a_failed_chunk_leaves_rows_and_mark_as_they_were() {
        let (_dir, mut conn) = fixture("atomic", 30);
        assert_eq!(index_chunk(&mut conn, 10).unwrap(), (10, 30));
        conn.execute_batch(
            "CREATE TEMP TRIGGER boom BEFORE INSERT ON main.patient_index
             WHEN NEW.patient_id = 'P17' BEGIN SELECT RAISE(ABORT, 'boom'); END;",
        )
        .unwrap();
        assert!(index_chunk(&mut conn, 10).is_err());
        assert_eq!(
            state(&conn),
            (10, 10),
            "rows 11..16 must not stay without the mark"
        );
        conn.execute_batch("DROP TRIGGER boom").unwrap();
        assert_eq!(index_chunk(&mut conn, 10).unwrap(), (20, 30));
        assert_eq!(state(&conn), (20, 20));
    }

    /// An index file of another store (another token) is refused for a rebuild.
    #[test]
    fn another_stores_index_is_rebuilt() {
        let (dir, mut conn) = fixture("token", 3);
        index_chunk(&mut conn, 10).unwrap();
        conn.execute_batch("UPDATE search_index_state SET store_token = 'other'")
            .unwrap();
        drop(conn);
        let store = dir.join("store.db");
        assert!(matches!(
            open_index(&store, Duration::from_secs(5), &drop),
            Err(Failure::Rebuild)
        ));
    }
}
