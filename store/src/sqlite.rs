//! The SQLite [`Backend`]: one file, WAL, `synchronous=FULL`.
//!
//! # Schema (version 1)
//!
//! ```sql
//! CREATE TABLE mllp_store_schema (version INTEGER NOT NULL);   -- one row
//! CREATE TABLE messages (
//!     id                  INTEGER PRIMARY KEY AUTOINCREMENT,   -- commit order, never reused
//!     received_at_us      INTEGER NOT NULL,                    -- UTC µs since 1970
//!     peer                TEXT NOT NULL,                       -- IP:PORT / [IPv6]:PORT
//!     local               TEXT NOT NULL,
//!     connection_id       INTEGER NOT NULL,                    -- u64 bits as i64
//!     sequence            INTEGER NOT NULL,                    -- u64 bits as i64
//!     sending_application TEXT,                                -- MSH-3, NULL if missing
//!     sending_facility    TEXT,                                -- MSH-4
//!     message_type        TEXT,                                -- MSH-9
//!     control_id          TEXT,                                -- MSH-10
//!     size                INTEGER NOT NULL,
//!     duplicate_of        INTEGER REFERENCES messages (id),
//!     payload             BLOB NOT NULL,                       -- the exact bytes
//!     client_cert         TEXT                                 -- mTLS: CN, SANs, sha256
//!     patient_id          TEXT                                 -- PID-3.1, raw (search)
//! );
//! CREATE INDEX messages_by_control_id ON messages
//!     (control_id, sending_application, sending_facility, duplicate_of, received_at_us)
//!     WHERE control_id IS NOT NULL;
//! CREATE TABLE mllp_store_identity (token TEXT NOT NULL);       -- one row, random
//! ```
//!
//! `messages_by_control_id` serves both the duplicate lookup (every column an equality but
//! the last, a range on the time; it covers the query, so no row is read) and
//! [`search`](crate::search) by control id (its first column). The patient's index is not
//! in this file: a follower thread keeps it in a file of its own beside the store, off the
//! commit path ([`crate::search_index`], which also says what `mllp_store_identity` is for);
//! a store that has the earlier inline `messages_patient` loses it when a writer opens it. Stores created before it
//! have `messages_original` (the same columns but `duplicate_of`, partial `WHERE
//! duplicate_of IS NULL`) and, if they were opened by a build with search,
//! `messages_control_id (control_id)`: such a store keeps both, since rebuilding an index
//! of a large store would delay the start; one without `messages_control_id` gets
//! `messages_by_control_id` in place of `messages_original` (one index build either way).
//!
//! `client_cert` is added (`ALTER TABLE … ADD COLUMN`) by the first writer that opens a store
//! created before it; rows already there keep NULL. Additive only, so the version stays 1 and
//! older builds still read and write such a store; a reader of a store without it reads NULL.
//!
//! `patient_id` and the search indexes (for [`search`](crate::search)) are added by the
//! first writer that opens a store created before them; the version stays 1, since older
//! builds read and write such a store unchanged. New stores use `auto_vacuum=INCREMENTAL`
//! ([`retention`](crate::retention) gives freed pages back).
//!
//! MSH fields are TEXT so that ad-hoc SQL reads naturally (`WHERE control_id = '42'`); bytes
//! that are not UTF-8 are stored lossily there (the payload column is always exact).
//! `AUTOINCREMENT` costs one row update per commit and guarantees that an id is never reused,
//! even if rows are deleted later, so an export cursor (`--since`) stays valid.
//!
//! # Durability and concurrency
//!
//! The writer connection sets `journal_mode=WAL` and `synchronous=FULL` explicitly and checks
//! both: with FULL, SQLite syncs the WAL at every commit, so a committed batch survives an OS
//! crash or power loss, not only a process crash. It writes a commit's WAL frames with a few
//! large writes made just before that sync (a VFS of our own, `crate::wal_batch`), not two
//! small ones per frame. WAL checkpoints run on a thread of their own, never inside a commit
//! (see [`crate::checkpoint`]). Readers (export) use their own connections and never block
//! the writer, nor it them. Two writers on one file are safe (SQLite serialises them, waiting
//! up to the busy timeout) but pointless.

use std::path::{Path, PathBuf};

use std::time::{Duration, SystemTime};

use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, TransactionBehavior, params};

use crate::backend::Backend;
pub use crate::backend::WriteGate;
use crate::checkpoint::Checkpointer;
use crate::error::{Cause, Found, Problem, StoreError};
use crate::record::{
    DuplicateKey, Record, StoreId, StoreOutcome, StoredRecord, system_time_to_us, text,
};
use crate::search_index::SearchIndexer;

/// The schema version this build writes and the newest it reads.
pub const SCHEMA_VERSION: i64 = 1;

/// How long a statement waits for another connection's lock before failing
/// ([`SqliteOptions::busy_timeout`]'s default).
///
/// Our own writer holds the write lock for one commit (milliseconds); readers in WAL mode
/// never need it. 5 s rides out someone's manual `sqlite3` session or a slow checkpoint while
/// staying well under a sender's usual ACK timeout (30–60 s), so a stuck lock still turns
/// into AE replies rather than sender timeouts.
pub const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// How far back a resend is looked for ([`SqliteOptions::duplicate_window`]'s default): 7 days.
///
/// A resend after a lost ACK normally comes within seconds, but a sending engine replays its
/// queue when it comes back, and an interface down from Friday evening to Monday morning
/// (about 64 h), or over a long holiday weekend, is ordinary. A week covers those. Control ids
/// are counters or UUIDs that repeat only after far longer, so a false match is rare; and its
/// cost is only a `duplicate_of` flag on a message that is still stored and acknowledged.
/// The window also keeps the lookup's index range short for senders that do reuse ids.
pub const DEFAULT_DUPLICATE_WINDOW: Duration = Duration::from_secs(7 * 24 * 3600);

const CREATE_SCHEMA: &str = "
CREATE TABLE mllp_store_schema (version INTEGER NOT NULL);
CREATE TABLE messages (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at_us      INTEGER NOT NULL,
    peer                TEXT NOT NULL,
    local               TEXT NOT NULL,
    connection_id       INTEGER NOT NULL,
    sequence            INTEGER NOT NULL,
    sending_application TEXT,
    sending_facility    TEXT,
    message_type        TEXT,
    control_id          TEXT,
    size                INTEGER NOT NULL,
    duplicate_of        INTEGER REFERENCES messages (id),
    payload             BLOB NOT NULL,
    client_cert         TEXT,
    patient_id          TEXT
);
CREATE INDEX messages_by_control_id ON messages
    (control_id, sending_application, sending_facility, duplicate_of, received_at_us)
    WHERE control_id IS NOT NULL;
";

/// The earlier inline patient index, dropped when a writer opens a store that has it: the
/// index is now kept off the commit path ([`crate::search_index`]). Older builds still read
/// and write such a store (they would add the index back).
const DROP_INLINE_PATIENT_INDEX: &str = "DROP INDEX IF EXISTS messages_patient";

/// For a store created before search: the index that serves search by control id and the
/// duplicate lookup, in place of the duplicate lookup's own (see the module docs).
const CONTROL_ID_INDEX: &str = "
BEGIN IMMEDIATE;
CREATE INDEX IF NOT EXISTS messages_by_control_id ON messages
    (control_id, sending_application, sending_facility, duplicate_of, received_at_us)
    WHERE control_id IS NOT NULL;
DROP INDEX IF EXISTS messages_original;
COMMIT;
";

/// `IS` compares NULL with NULL as equal: a message without MSH-3 matches another without it.
/// The terms imply the partial index's WHERE clause and are equalities on its first four
/// columns (`messages_by_control_id`; `messages_original` in older stores), so SQLite probes
/// it and reads no row (checked in a test). The order is the index's own (received time, then
/// id: the original is the earliest), so no temporary B-tree sorts the matches: ordering by id
/// alone cost a sort per message, 40% of the writer's instructions (callgrind).
const FIND_ORIGINAL: &str = "
SELECT id FROM messages
WHERE control_id = ?1 AND sending_application IS ?2 AND sending_facility IS ?3
  AND duplicate_of IS NULL AND received_at_us >= ?4
ORDER BY received_at_us, id LIMIT 1";

const INSERT: &str = "
INSERT INTO messages (received_at_us, peer, local, connection_id, sequence,
    sending_application, sending_facility, message_type, control_id, size, duplicate_of, payload,
    client_cert, patient_id)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)";

const READ_AFTER: &str = "
SELECT id, received_at_us, peer, local, connection_id, sequence, sending_application,
    sending_facility, message_type, control_id, size, duplicate_of, payload, client_cert
FROM messages WHERE id > ?1 AND id <= ?2 ORDER BY id LIMIT ?3";

/// [`READ_AFTER`] for a store created before `client_cert` and opened read-only.
const READ_AFTER_WITHOUT_CERT: &str = "
SELECT id, received_at_us, peer, local, connection_id, sequence, sending_application,
    sending_facility, message_type, control_id, size, duplicate_of, payload, NULL
FROM messages WHERE id > ?1 AND id <= ?2 ORDER BY id LIMIT ?3";

/// The column added after version 1 (see the module docs).
const ADD_CLIENT_CERT: &str = "ALTER TABLE messages ADD COLUMN client_cert TEXT";

/// Options of a [`SqliteBackend`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SqliteOptions {
    /// How long to wait for another connection's lock (default [`DEFAULT_BUSY_TIMEOUT`]).
    pub busy_timeout: Duration,
    /// How far back to look for the original of a resend (default
    /// [`DEFAULT_DUPLICATE_WINDOW`]).
    pub duplicate_window: Duration,
    /// WAL size at which the writer starts the WAL over (default
    /// [`WAL_LIMIT_BYTES`](crate::checkpoint::WAL_LIMIT_BYTES); see [`crate::checkpoint`]).
    pub wal_limit: u64,
    /// TESTS ONLY: open the writer with `synchronous=NORMAL`, which does NOT sync the WAL at
    /// each commit, so an AA can precede its message's arrival on stable storage. It exists
    /// so the power-loss test can show that it detects exactly that (its negative control).
    #[doc(hidden)]
    pub unsafe_synchronous_normal_for_tests: bool,
    /// TESTS ONLY: the checkpointer's connection runs with `synchronous=OFF`, so its
    /// checkpoints do not sync the database file before they record the WAL as copied, and
    /// the WAL can start over while pages it carried are not yet on stable storage (the
    /// checkpointer's own sync after each copy comes too late to prevent that; the writer's
    /// `RESTART` still syncs what it copies). It exists so the power-loss test can show that
    /// it detects a WAL reused too early (its negative control; see [`crate::checkpoint`]).
    #[doc(hidden)]
    pub unsafe_checkpoint_synchronous_off_for_tests: bool,
    /// BENCHMARKS ONLY: a writer starts no search index follower ([`crate::search_index`];
    /// `search --patient` then scans), to measure what the index costs the receive path
    /// (BENCHMARKS.md).
    #[doc(hidden)]
    pub bench_without_patient_index: bool,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self {
            busy_timeout: DEFAULT_BUSY_TIMEOUT,
            duplicate_window: DEFAULT_DUPLICATE_WINDOW,
            wal_limit: crate::checkpoint::WAL_LIMIT_BYTES,
            unsafe_synchronous_normal_for_tests: false,
            unsafe_checkpoint_synchronous_off_for_tests: false,
            bench_without_patient_index: false,
        }
    }
}

impl SqliteOptions {
    /// Sets [`busy_timeout`](Self::busy_timeout).
    pub fn busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = timeout;
        self
    }

    /// Sets [`duplicate_window`](Self::duplicate_window).
    pub fn duplicate_window(mut self, window: Duration) -> Self {
        self.duplicate_window = window;
        self
    }

    /// Sets [`wal_limit`](Self::wal_limit).
    pub fn wal_limit(mut self, bytes: u64) -> Self {
        self.wal_limit = bytes;
        self
    }
}

/// A store in one SQLite file.
///
/// [`open`](Self::open) for the writer (creates the file and schema if needed),
/// [`open_read_only`](Self::open_read_only) for readers such as export.
///
/// ```
/// use mllp_store::{Backend, SqliteBackend, SqliteOptions, StoreError};
///
/// let dir = std::env::temp_dir().join(format!("mllp-store-doc-sqlite-{}", std::process::id()));
/// std::fs::create_dir_all(&dir)?;
/// let path = dir.join("store.db");
/// let mut writer = SqliteBackend::open(&path, &SqliteOptions::default())?;
/// assert_eq!(writer.last_id()?, 0);
///
/// // A reader never creates anything: a missing file is a typed error.
/// let missing = SqliteBackend::open_read_only(dir.join("nope.db"), &SqliteOptions::default());
/// assert!(matches!(missing, Err(StoreError::NotFound { .. })));
/// # drop(writer);
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct SqliteBackend {
    path: PathBuf,
    options: SqliteOptions,
    read_only: bool,
    /// The WAL checkpointer of a writer (`None` for a reader). Declared before `conn` so it
    /// stops first: the writer's connection, closing last, then checkpoints and removes the WAL.
    checkpointer: Option<Checkpointer>,
    /// The patient search index's follower of a writer (`None` for a reader, or with
    /// [`SqliteOptions::bench_without_patient_index`]).
    search_index: Option<SearchIndexer>,
    /// `None` after a failed commit: the next commit reopens it (a fresh connection is the
    /// surest way out of whatever state the failure left, and costs about 100 µs).
    conn: Option<Connection>,
    /// Held for each commit; the pruner of the same process holds it for each of its batches.
    gate: WriteGate,
    /// The file's identity (device, inode) when a writer opened it: every commit checks that
    /// the path still names that file (one `stat` per batch), so a store file deleted or
    /// replaced under a running server is noticed at the next commit instead of
    /// acknowledging messages into an unlinked file. `None` for a reader, or where the
    /// platform has no inode numbers.
    identity: Option<FileId>,
    /// Set once the path was found naming another file or none: every later commit fails
    /// with [`Problem::FileReplaced`] (a store cannot follow a file it no longer has).
    replaced: bool,
}

/// A file's device and inode numbers.
type FileId = (u64, u64);

/// The identity of the file at `path`; `Err` only when there is no file there.
#[cfg(unix)]
fn file_id(path: &Path) -> Result<Option<FileId>, ()> {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(path) {
        Ok(meta) => Ok(Some((meta.dev(), meta.ino()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(()),
        // Cannot tell (a transient error): do not cry wolf.
        Err(_) => Ok(None),
    }
}

#[cfg(not(unix))]
fn file_id(_path: &Path) -> Result<Option<FileId>, ()> {
    Ok(None)
}

impl SqliteBackend {
    /// Opens the store at `path` for writing, creating the file and the schema if the file is
    /// missing or empty; sets WAL and `synchronous=FULL`.
    ///
    /// # Errors
    ///
    /// [`StoreError::Open`] if the file cannot be opened or created,
    /// [`StoreError::NotAStore`] for a file that is not an SQLite database or holds other
    /// tables (it is left untouched), [`StoreError::UnsupportedVersion`] for a newer schema,
    /// [`StoreError::Locked`] if another connection holds the lock past the busy timeout.
    pub fn open(path: impl AsRef<Path>, options: &SqliteOptions) -> Result<Self, StoreError> {
        let path = path.as_ref();
        check_path(path, true)?;
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let mut conn = open_connection(path, flags, options, true, Role::Writer)?;
        let checkpointer = start_checkpointer(path, options, &mut conn)?;
        let search_index = if options.bench_without_patient_index {
            None
        } else {
            Some(
                SearchIndexer::start(path, options.busy_timeout)
                    .map_err(|e| StoreError::open(path, e))?,
            )
        };
        Ok(Self {
            path: path.to_owned(),
            options: options.clone(),
            read_only: false,
            checkpointer: Some(checkpointer),
            search_index,
            conn: Some(conn),
            gate: WriteGate::default(),
            identity: file_id(path).ok().flatten(),
            replaced: false,
        })
    }

    /// Opens an existing store for reading only (export). Works while a writer is running.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`] if there is no such file, [`StoreError::NotAStore`] for a
    /// file that is not a store (an empty database included), [`StoreError::Locked`],
    /// [`StoreError::UnsupportedVersion`] or [`StoreError::Open`] as for
    /// [`open`](Self::open).
    pub fn open_read_only(
        path: impl AsRef<Path>,
        options: &SqliteOptions,
    ) -> Result<Self, StoreError> {
        let path = path.as_ref();
        check_path(path, false)?;
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = open_connection(path, flags, options, false, Role::Other)?;
        Ok(Self {
            path: path.to_owned(),
            options: options.clone(),
            read_only: true,
            checkpointer: None,
            search_index: None,
            conn: Some(conn),
            gate: WriteGate::default(),
            identity: None,
            replaced: false,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open connection, for this crate's other readers (search, retention statistics).
    pub(crate) fn into_connection(mut self) -> Result<Connection, StoreError> {
        self.connection()?;
        Ok(self.conn.take().expect("connection was just opened"))
    }

    /// The gate this backend holds while it commits: give it to a
    /// [`Pruner`](crate::retention::Pruner) of the same file so that the two take turns
    /// without SQLite's sleeping busy handler.
    pub fn write_gate(&self) -> WriteGate {
        self.gate.clone()
    }

    /// The follower that keeps this writer's patient search index
    /// ([`crate::search_index`]); `None` for a reader.
    pub fn search_index(&self) -> Option<&SearchIndexer> {
        self.search_index.as_ref()
    }

    /// The open connection, reopening it after a failure.
    fn connection(&mut self) -> Result<&mut Connection, StoreError> {
        if self.conn.is_none() {
            let mut flags = OpenFlags::SQLITE_OPEN_NO_MUTEX;
            // Never CREATE on reopen: a file deleted under us must not silently restart empty.
            flags |= if self.read_only {
                OpenFlags::SQLITE_OPEN_READ_ONLY
            } else {
                OpenFlags::SQLITE_OPEN_READ_WRITE
            };
            let mut conn = open_connection(&self.path, flags, &self.options, false, Role::Writer)?;
            if let Some(checkpointer) = &self.checkpointer {
                checkpointer
                    .attach(&mut conn)
                    .map_err(|e| classify_open_error(&self.path, flags, e))?;
            }
            self.conn = Some(conn);
        }
        // INVARIANT: set just above if it was None.
        Ok(self.conn.as_mut().expect("connection was just opened"))
    }

    /// Whether the path still names the file this writer opened (a `stat`).
    fn still_at_path(&self) -> bool {
        match (self.identity, file_id(&self.path)) {
            (None, _) | (_, Ok(None)) => true,
            (Some(opened), Ok(Some(now))) => opened == now,
            (Some(_), Err(())) => false,
        }
    }

    /// The duplicate window in microseconds.
    fn window_us(&self) -> i64 {
        i64::try_from(self.options.duplicate_window.as_micros()).unwrap_or(i64::MAX)
    }

    /// Maps a read-side failure, forgetting the connection so the next call reopens it.
    fn read_error(&mut self, e: rusqlite::Error) -> StoreError {
        self.conn = None;
        match e.sqlite_error_code() {
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => StoreError::Locked {
                path: self.path.clone(),
            },
            _ if is_corruption(&e) => StoreError::read(Problem::Corrupt),
            _ => StoreError::read(Cause::sqlite(e)),
        }
    }
}

impl Backend for SqliteBackend {
    fn commit_batch(&mut self, batch: &[Record]) -> Result<Vec<StoreOutcome>, StoreError> {
        if self.read_only {
            return Err(StoreError::commit(Problem::ReadOnly));
        }
        if self.replaced {
            return Err(StoreError::commit(Problem::FileReplaced));
        }
        let window = self.window_us();
        let busy_timeout = self.options.busy_timeout;
        let gate = self.gate.clone();
        let _turn = gate.enter();
        if self
            .checkpointer
            .as_ref()
            .is_some_and(Checkpointer::restart_due)
        {
            let wait = self
                .checkpointer
                .as_ref()
                .is_some_and(Checkpointer::restart_must_wait);
            let conn = self.connection()?;
            if let Err(e) = Checkpointer::restart(conn, busy_timeout, wait) {
                self.conn = None;
                return Err(StoreError::commit(Cause::sqlite(e)));
            }
        }
        let result = self.connection().and_then(|conn| {
            insert_batch(conn, batch, window).map_err(|e| {
                if is_corruption(&e) {
                    StoreError::commit(Problem::Corrupt)
                } else {
                    StoreError::commit(Cause::sqlite(e))
                }
            })
        });
        match &result {
            Ok(outcomes) => {
                if let (Some(indexer), Some(last)) = (&self.search_index, outcomes.last()) {
                    indexer.committed(last.id);
                }
            }
            // Dropping the connection rolls back whatever is left of the transaction.
            Err(_) => self.conn = None,
        }
        // Committed, but into the file at the path? After a failure too: a deleted file can
        // be why it failed.
        if !self.still_at_path() {
            self.replaced = true;
            self.conn = None;
            return Err(StoreError::commit(Problem::FileReplaced));
        }
        result
    }

    fn read_after(
        &mut self,
        after: StoreId,
        until: StoreId,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredRecord>, StoreError> {
        let conn = self.connection()?;
        let limit = i64::try_from(max_records).unwrap_or(i64::MAX);
        let result = (|| {
            let sql = if has_client_cert(conn)? {
                READ_AFTER
            } else {
                READ_AFTER_WITHOUT_CERT
            };
            let mut stmt = conn.prepare_cached(sql)?;
            let mut rows = stmt.query(params![after, until, limit])?;
            let mut page = Vec::new();
            let mut bytes = 0usize;
            while let Some(row) = rows.next()? {
                let record = stored_record(row)?;
                bytes = bytes.saturating_add(record.payload.len());
                page.push(record);
                if bytes >= max_bytes {
                    break;
                }
            }
            Ok(page)
        })();
        result.map_err(|e| self.read_error(e))
    }

    fn last_id(&mut self) -> Result<StoreId, StoreError> {
        let conn = self.connection()?;
        let result = conn
            .query_row("SELECT coalesce(max(id), 0) FROM messages", [], |r| {
                r.get(0)
            })
            .or_else(|e| {
                // The last page damaged: AUTOINCREMENT's counter, kept in a table of its own,
                // is the highest id ever given (an export past damage needs an end).
                if !is_corruption(&e) {
                    return Err(e);
                }
                conn.query_row(
                    "SELECT seq FROM sqlite_sequence WHERE name = 'messages'",
                    [],
                    |r| r.get(0),
                )
                .or(Err(e))
            });
        result.map_err(|e| self.read_error(e))
    }

    fn find_original(
        &mut self,
        key: &DuplicateKey<'_>,
        received_at: SystemTime,
    ) -> Result<Option<StoreId>, StoreError> {
        let since = system_time_to_us(received_at).saturating_sub(self.window_us());
        let conn = self.connection()?;
        let result = conn.prepare_cached(FIND_ORIGINAL).and_then(|mut stmt| {
            stmt.query_row(
                params![
                    key.control_id,
                    key.sending_application,
                    key.sending_facility,
                    since
                ],
                |r| r.get(0),
            )
            .optional()
        });
        result.map_err(|e| self.read_error(e))
    }

    fn location(&self) -> String {
        format!("sqlite:{}", self.path.display())
    }

    fn write_gate(&self) -> Option<WriteGate> {
        Some(Self::write_gate(self))
    }

    /// The absolute path: `./mllp-reactor.db` does not say which directory.
    fn summary(&self) -> String {
        std::fs::canonicalize(&self.path)
            .unwrap_or_else(|_| self.path.clone())
            .display()
            .to_string()
    }
}

/// The columns [`stored_record`] reads, in its order.
pub(crate) const RECORD_COLUMNS: &str = "id, received_at_us, peer, local, connection_id, sequence, \
    sending_application, sending_facility, message_type, control_id, size, duplicate_of, payload, \
    client_cert";

/// A row of [`RECORD_COLUMNS`] as a record.
pub(crate) fn stored_record(row: &rusqlite::Row<'_>) -> rusqlite::Result<StoredRecord> {
    Ok(StoredRecord {
        id: row.get(0)?,
        received_at_us: row.get(1)?,
        peer: row.get(2)?,
        local: row.get(3)?,
        connection_id: row.get::<_, i64>(4)? as u64,
        sequence: row.get::<_, i64>(5)? as u64,
        sending_application: row.get(6)?,
        sending_facility: row.get(7)?,
        message_type: row.get(8)?,
        control_id: row.get(9)?,
        size: row.get::<_, i64>(10)? as u64,
        duplicate_of: row.get(11)?,
        payload: row.get(12)?,
        client_cert: row.get(13)?,
    })
}

/// Inserts `batch` in one IMMEDIATE transaction (the write lock is taken up front, so waiting
/// for it is bounded by the busy timeout and never ends in a deadlock error mid-batch).
fn insert_batch(
    conn: &mut Connection,
    batch: &[Record],
    window_us: i64,
) -> rusqlite::Result<Vec<StoreOutcome>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut outcomes = Vec::with_capacity(batch.len());
    {
        let mut find = tx.prepare_cached(FIND_ORIGINAL)?;
        let mut insert = tx.prepare_cached(INSERT)?;
        // Bound one by one: SQLite keeps a parameter's value until it is bound again, so the
        // addresses are bound only when they change (a connection's pipelined messages sit
        // together in a batch; every record of a listener has the same local address),
        // saving two TEXT copies per row. A fresh `AddrText` per batch binds them on its
        // first record, whatever the cached statement held before.
        let (mut peer, mut local) = (AddrText::default(), AddrText::default());
        for record in batch {
            let header = record.header();
            let app = text(header.sending_application);
            let facility = text(header.sending_facility);
            let control = text(header.control_id);
            let received = record.received_at_us();
            let duplicate_of: Option<StoreId> = match &control {
                Some(control) => {
                    find.raw_bind_parameter(1, control)?;
                    find.raw_bind_parameter(2, &app)?;
                    find.raw_bind_parameter(3, &facility)?;
                    find.raw_bind_parameter(4, received.saturating_sub(window_us))?;
                    // Dropping the rows resets the statement.
                    let mut rows = find.raw_query();
                    rows.next()?.map(|r| r.get(0)).transpose()?
                }
                None => None,
            };
            insert.raw_bind_parameter(1, received)?;
            peer.bind(&mut insert, 2, record.origin.peer)?;
            local.bind(&mut insert, 3, record.origin.local)?;
            insert.raw_bind_parameter(4, record.origin.connection_id as i64)?;
            insert.raw_bind_parameter(5, record.origin.sequence as i64)?;
            insert.raw_bind_parameter(6, &app)?;
            insert.raw_bind_parameter(7, &facility)?;
            insert.raw_bind_parameter(8, text(header.message_type))?;
            insert.raw_bind_parameter(9, &control)?;
            insert.raw_bind_parameter(10, i64::try_from(record.size()).unwrap_or(i64::MAX))?;
            insert.raw_bind_parameter(11, duplicate_of)?;
            insert.raw_bind_parameter(12, &record.payload[..])?;
            insert.raw_bind_parameter(13, record.client_cert_text())?;
            insert.raw_bind_parameter(14, text(header.patient_id))?;
            insert.raw_execute()?;
            outcomes.push(StoreOutcome::new(tx.last_insert_rowid(), duplicate_of));
        }
    }
    tx.commit()?;
    Ok(outcomes)
}

/// An address as the TEXT the store keeps, formatted and bound once for a run of records from
/// the same address into a buffer reused across the batch: no allocation, no copy per record.
#[derive(Default)]
struct AddrText {
    addr: Option<std::net::SocketAddr>,
    text: String,
}

impl AddrText {
    /// Binds `addr` as parameter `index` of `stmt` unless the previous call bound it already.
    fn bind(
        &mut self,
        stmt: &mut rusqlite::Statement<'_>,
        index: usize,
        addr: std::net::SocketAddr,
    ) -> rusqlite::Result<()> {
        if self.addr != Some(addr) {
            use std::fmt::Write as _;
            self.text.clear();
            // Writing into a String cannot fail.
            let _ = write!(self.text, "{addr}");
            stmt.raw_bind_parameter(index, self.text.as_str())?;
            self.addr = Some(addr);
        }
        Ok(())
    }
}

/// Starts the WAL checkpointer on a connection of its own and attaches it to the writer's
/// `conn` (which stops checkpointing inside commits).
fn start_checkpointer(
    path: &Path,
    options: &SqliteOptions,
    conn: &mut Connection,
) -> Result<Checkpointer, StoreError> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let classify = |e: rusqlite::Error| classify_open_error(path, flags, e);
    let own = Connection::open_with_flags(path, flags).map_err(classify)?;
    own.busy_timeout(options.busy_timeout).map_err(classify)?;
    // A checkpoint's syncs (the WAL before it copies, the database file before it records
    // the WAL as all copied) follow the `synchronous` of the connection that runs it: set it
    // rather than trust the build's default (see `crate::checkpoint`).
    let level = if options.unsafe_checkpoint_synchronous_off_for_tests {
        OFF
    } else {
        FULL
    };
    set_synchronous(&own, path, flags, level)?;
    crate::checkpoint::open_wal(&own).map_err(classify)?;
    let page_size: u32 = own
        .pragma_query_value(None, "page_size", |r| r.get(0))
        .map_err(classify)?;
    let checkpointer = Checkpointer::start(own, page_size, options.wal_limit)
        .map_err(|e| StoreError::open(path, e))?;
    checkpointer.attach(conn).map_err(classify)?;
    Ok(checkpointer)
}

/// Every file a store at `path` has or may have: the database, SQLite's `-wal` and `-shm`
/// beside it, and the search index file ([`crate::search_index::index_path`]) with its own.
///
/// ```
/// use std::path::Path;
/// let files = mllp_store::sqlite::files(Path::new("m.db"));
/// assert_eq!(files.len(), 6);
/// assert_eq!(files[3], Path::new("m.db-search"));
/// ```
pub fn files(path: &Path) -> Vec<PathBuf> {
    let side = crate::search_index::index_path(path);
    [path, side.as_path()]
        .into_iter()
        .flat_map(|base| {
            ["", "-wal", "-shm"].into_iter().map(move |suffix| {
                let mut name = base.as_os_str().to_owned();
                name.push(suffix);
                PathBuf::from(name)
            })
        })
        .collect()
}

/// Whether an SQLite error means the file is damaged (see [`crate::integrity`]).
pub(crate) fn is_corruption(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase)
    )
}

/// Clear errors for the common path mistakes, before SQLite's generic "unable to open".
fn check_path(path: &Path, create: bool) -> Result<(), StoreError> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => Err(StoreError::open(path, Problem::IsADirectory)),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if !create {
                return Err(StoreError::NotFound {
                    path: path.to_owned(),
                });
            }
            match path.parent().filter(|p| !p.as_os_str().is_empty()) {
                Some(dir) if !dir.is_dir() => {
                    Err(StoreError::open(path, Problem::NoDirectory(dir.to_owned())))
                }
                _ => Ok(()),
            }
        }
        Err(e) => Err(StoreError::open(path, e)),
    }
}

/// For a read-only open of a store that no writer has open (no `-wal` file beside it: a
/// writer keeps one while it runs and removes it when it closes cleanly), the `immutable=1` URI:
/// SQLite then reads the file as it is and creates no `-wal` or `-shm` file, so an export of a
/// store on a read-only file system, or of a copy, works and leaves nothing behind. With a
/// `-wal` file present (a server running, or one that crashed) the ordinary WAL reader is
/// used, which sees the committed transactions still in the log.
fn immutable_uri(path: &Path, flags: OpenFlags) -> Option<String> {
    if !flags.contains(OpenFlags::SQLITE_OPEN_READ_ONLY) {
        return None;
    }
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    if Path::new(&wal).exists() {
        return None;
    }
    crate::sqlite_uri::uri(path, "immutable=1")
}

/// Who opens a connection with [`open_connection`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// The store's writer ([`SqliteBackend`]): keeps `synchronous=FULL`.
    Writer,
    /// Anyone else (readers, the pruner, resend, search).
    Other,
}

/// Opens a connection, checks (and if `create`, creates) the schema, and sets the pragmas.
pub(crate) fn open_connection(
    path: &Path,
    flags: OpenFlags,
    options: &SqliteOptions,
    create: bool,
    role: Role,
) -> Result<Connection, StoreError> {
    let classify = |e: rusqlite::Error| classify_open_error(path, flags, e);
    let writable = !flags.contains(OpenFlags::SQLITE_OPEN_READ_ONLY);
    // The store's writer, at `synchronous=FULL` (set below), writes each commit's WAL frames
    // with a few large writes (`crate::wal_batch`, only correct where every commit syncs the
    // WAL: not for connections that lower `synchronous` after this, like the pruner's).
    let batch_wal =
        (role == Role::Writer && writable && !options.unsafe_synchronous_normal_for_tests)
            .then(crate::wal_batch::registered)
            .flatten();
    let conn = match (immutable_uri(path, flags), batch_wal) {
        (Some(uri), _) => Connection::open_with_flags(uri, flags | OpenFlags::SQLITE_OPEN_URI),
        (None, Some(vfs)) => Connection::open_with_flags_and_vfs(path, flags, vfs),
        (None, None) => Connection::open_with_flags(path, flags),
    }
    .map_err(classify)?;
    conn.busy_timeout(options.busy_timeout).map_err(classify)?;
    // Inspect before changing anything: a foreign database must stay untouched (switching it
    // to WAL would rewrite its header).
    match inspect_schema(&conn).map_err(classify)? {
        Schema::Ours => {}
        Schema::Empty if create => {
            // Before the first table: only then can auto_vacuum be chosen without a VACUUM.
            // INCREMENTAL lets retention give freed pages back to the file system
            // (`crate::retention`); it costs one pointer-map page per ~800 pages.
            conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")
                .map_err(classify)?;
            set_wal(&conn, path)?;
            create_schema(&conn).map_err(classify)?;
        }
        Schema::Empty => return Err(not_a_store(path, Found::EmptyDatabase)),
        Schema::Foreign => {
            return Err(not_a_store(path, Found::OtherTables));
        }
        Schema::Newer(found) => {
            return Err(StoreError::UnsupportedVersion {
                path: path.to_owned(),
                found,
                supported: SCHEMA_VERSION,
            });
        }
    }
    if writable {
        if !has_client_cert(&conn).map_err(classify)? {
            add_client_cert(&conn).map_err(classify)?;
        }
        add_search_schema(&conn).map_err(classify)?;
        crate::search_index::ensure_identity(&conn).map_err(classify)?;
        set_wal(&conn, path)?;
        stable_plans(&conn).map_err(classify)?;
        let level = if options.unsafe_synchronous_normal_for_tests {
            NORMAL
        } else {
            FULL
        };
        set_synchronous(&conn, path, flags, level)?;
    }
    Ok(conn)
}

/// A `PRAGMA synchronous` level: its name and the number SQLite reads back
/// (sqlite.org/pragma.html#pragma_synchronous).
type Synchronous = (&'static str, i64);
const FULL: Synchronous = ("FULL", 2);
const NORMAL: Synchronous = ("NORMAL", 1);
const OFF: Synchronous = ("OFF", 0);

/// Sets `synchronous` on `conn` (opened on `path` with `flags`) and checks that it took.
fn set_synchronous(
    conn: &Connection,
    path: &Path,
    flags: OpenFlags,
    (name, expected): Synchronous,
) -> Result<(), StoreError> {
    let classify = |e: rusqlite::Error| classify_open_error(path, flags, e);
    conn.pragma_update(None, "synchronous", name)
        .map_err(classify)?;
    let level: i64 = conn
        .pragma_query_value(None, "synchronous", |r| r.get(0))
        .map_err(classify)?;
    if level != expected {
        return Err(StoreError::open(path, Problem::SynchronousNotFull(level)));
    }
    Ok(())
}

/// Turns on SQLite's query planner stability guarantee on a writer's connection: plans never
/// depend on the values bound to a statement.
///
/// Without it the planner consults the bound values of [`FIND_ORIGINAL`] (its partial index
/// and `IS ?` terms), which marks the statement for re-preparation whenever its bindings are
/// cleared: once per transaction, when the statement goes back to the cache. That
/// re-preparation cost ~80 000 instructions, 53 % of the writer's work per message at one
/// message per commit (callgrind, `BENCHMARKS.md`, issue #21); the plan it chooses is the
/// same (`the_duplicate_lookup_uses_the_control_id_index`).
fn stable_plans(conn: &Connection) -> rusqlite::Result<()> {
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )
    .map(drop)
}

/// Whether the store has the `client_cert` column (see the module docs).
fn has_client_cert(conn: &Connection) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT count(*) FROM pragma_table_info('messages') WHERE name = 'client_cert'",
        [],
        |r| r.get::<_, i64>(0).map(|n| n > 0),
    )
}

/// Adds the `client_cert` column to a store created before it, unless a concurrent writer
/// just did (checked under the write lock).
fn add_client_cert(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let result = (|| {
        if !has_client_cert(conn)? {
            conn.execute_batch(ADD_CLIENT_CERT)?;
        }
        conn.execute_batch("COMMIT")
    })();
    if result.is_err() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    result
}

/// Adds the search column and indexes where they are missing (see the module docs).
fn add_search_schema(conn: &Connection) -> rusqlite::Result<()> {
    let has_column: bool = conn.query_row(
        "SELECT count(*) FROM pragma_table_info('messages') WHERE name = 'patient_id'",
        [],
        |r| r.get::<_, i64>(0).map(|n| n > 0),
    )?;
    if !has_column {
        conn.execute_batch("ALTER TABLE messages ADD COLUMN patient_id TEXT")?;
    }
    let has_index = |name: &str| -> rusqlite::Result<bool> {
        conn.query_row(
            "SELECT count(*) FROM sqlite_schema WHERE type = 'index' AND name = ?1",
            [name],
            |r| r.get::<_, i64>(0).map(|n| n > 0),
        )
    };
    if !has_index("messages_by_control_id")? && !has_index("messages_control_id")? {
        conn.execute_batch(CONTROL_ID_INDEX)?;
    }
    conn.execute_batch(DROP_INLINE_PATIENT_INDEX)
}

fn set_wal(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
        .map_err(|e| classify_open_error(path, OpenFlags::SQLITE_OPEN_READ_WRITE, e))?;
    if mode.eq_ignore_ascii_case("wal") {
        Ok(())
    } else {
        Err(StoreError::open(path, Problem::NotWal(mode)))
    }
}

enum Schema {
    Ours,
    Empty,
    Foreign,
    Newer(i64),
}

fn inspect_schema(conn: &Connection) -> rusqlite::Result<Schema> {
    let mut stmt = conn.prepare("SELECT name FROM sqlite_schema WHERE type = 'table'")?;
    let tables = stmt
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let has = |name: &str| tables.iter().any(|t| t == name);
    if !has("mllp_store_schema") {
        return Ok(if tables.is_empty() {
            Schema::Empty
        } else {
            Schema::Foreign
        });
    }
    let version: i64 = conn.query_row("SELECT max(version) FROM mllp_store_schema", [], |r| {
        r.get::<_, Option<i64>>(0).map(|v| v.unwrap_or(0))
    })?;
    Ok(if version > SCHEMA_VERSION {
        Schema::Newer(version)
    } else if version < 1 || !has("messages") {
        Schema::Foreign
    } else {
        Schema::Ours
    })
}

/// Creates the schema unless a concurrent opener just did (checked under the write lock).
fn create_schema(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let result = (|| {
        if matches!(inspect_schema(conn)?, Schema::Empty) {
            conn.execute_batch(CREATE_SCHEMA)?;
            conn.execute(
                "INSERT INTO mllp_store_schema (version) VALUES (?1)",
                [SCHEMA_VERSION],
            )?;
        }
        conn.execute_batch("COMMIT")
    })();
    if result.is_err() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    result
}

fn not_a_store(path: &Path, found: Found) -> StoreError {
    StoreError::NotAStore {
        path: path.to_owned(),
        found,
    }
}

/// Turns an SQLite error while opening into the typed, one-line error a user can act on.
fn classify_open_error(path: &Path, flags: OpenFlags, e: rusqlite::Error) -> StoreError {
    match e.sqlite_error_code() {
        Some(ErrorCode::NotADatabase) => not_a_store(path, Found::NotSqlite),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => StoreError::Locked {
            path: path.to_owned(),
        },
        Some(ErrorCode::DatabaseCorrupt) => StoreError::open(path, Problem::Corrupt),
        Some(ErrorCode::CannotOpen | ErrorCode::PermissionDenied | ErrorCode::ReadOnly) => {
            // SQLite's text ("unable to open database file") hides the reason; the OS has it.
            let writable = !flags.contains(OpenFlags::SQLITE_OPEN_READ_ONLY);
            let create = flags.contains(OpenFlags::SQLITE_OPEN_CREATE)
                && std::fs::symlink_metadata(path).is_err();
            let os = if create {
                // The file is missing: opening it would say "No such file or directory", while
                // what failed is creating it (a directory this user cannot write, a read-only
                // file system). Try that, and undo it should it work after all.
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(path)
                    .map(|file| {
                        drop(file);
                        let _ = std::fs::remove_file(path);
                    })
            } else {
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(writable)
                    .open(path)
                    .map(drop)
            };
            match os {
                Err(io) => StoreError::open(path, io),
                Ok(_) => StoreError::open(path, Cause::sqlite(e)),
            }
        }
        _ => StoreError::open(path, Cause::sqlite(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(schema: &str) -> String {
        let conn = Connection::open_in_memory().unwrap();
        stable_plans(&conn).unwrap();
        conn.execute_batch(schema).unwrap();
        let plan: Vec<String> = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {FIND_ORIGINAL}"))
            .unwrap()
            .query_map(params!["c", "a", "f", 0], |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        plan.join("; ")
    }

    /// The duplicate lookup must be an index probe, not a scan of every message, and read
    /// no row: the index covers it.
    #[test]
    fn the_duplicate_lookup_uses_the_control_id_index() {
        let plan = plan(CREATE_SCHEMA);
        assert!(
            plan.contains("USING COVERING INDEX messages_by_control_id"),
            "{plan}"
        );
        assert!(!plan.contains("SCAN messages"), "{plan}");
        assert!(!plan.contains("TEMP B-TREE"), "a sort per lookup: {plan}");
    }

    /// The writer's duplicate lookup is prepared once, not once per transaction: without the
    /// planner stability guarantee ([`stable_plans`]) SQLite re-prepared it at the first
    /// lookup of every commit (its bound values had informed the plan).
    #[test]
    fn the_duplicate_lookup_is_not_re_prepared_per_commit() {
        let dir = mllp_test_support::TempDir::new("sqlite-qpsg");
        let mut backend = SqliteBackend::open(dir.join("s.db"), &SqliteOptions::default()).unwrap();
        for n in 0..5u64 {
            let payload = format!("MSH|^~\\&|APP|FAC|R|F|20260101||ADT^A01|c{n}|P|2.5\r");
            let origin = crate::record::Origin {
                received_at: SystemTime::now(),
                peer: "10.0.0.7:40000".parse().unwrap(),
                local: "[::1]:2575".parse().unwrap(),
                connection_id: 1,
                sequence: n,
            };
            let record = Record::new(payload.into_bytes().into(), origin);
            backend.commit_batch(std::slice::from_ref(&record)).unwrap();
        }
        let conn = backend.conn.as_ref().unwrap();
        let reprepared = conn
            .prepare_cached(FIND_ORIGINAL)
            .unwrap()
            .get_status(rusqlite::StatementStatus::RePrepare);
        assert_eq!(reprepared, 0, "re-prepared over 5 commits");
    }

    /// A store created before `messages_by_control_id` keeps its partial index, and the
    /// lookup uses it (not the search index on the control id alone).
    #[test]
    fn the_duplicate_lookup_uses_an_older_stores_partial_index() {
        let older = CREATE_SCHEMA.replace(
            "CREATE INDEX messages_by_control_id ON messages
    (control_id, sending_application, sending_facility, duplicate_of, received_at_us)
    WHERE control_id IS NOT NULL;",
            "CREATE INDEX messages_original ON messages
    (control_id, sending_application, sending_facility, received_at_us)
    WHERE duplicate_of IS NULL AND control_id IS NOT NULL;
CREATE INDEX messages_control_id ON messages (control_id) WHERE control_id IS NOT NULL;",
        );
        assert!(older.contains("messages_original"));
        let plan = plan(&older);
        assert!(plan.contains("USING INDEX messages_original"), "{plan}");
        assert!(!plan.contains("TEMP B-TREE"), "a sort per lookup: {plan}");
    }
}
