//! Error types: [`StoreError`] (opening, committing, reading) with its [`Cause`], [`Found`]
//! and [`Problem`]; [`ConfigError`] and [`CloseError`]. [`SubmitError`](crate::SubmitError)
//! (the queue) lives beside the queue.

use std::fmt::{self, Write as _};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why a store could not be opened, a batch not committed, or records not read.
///
/// The `path` of a PostgreSQL store's error is its URL without the password
/// (`postgres://user@host:port/db`).
///
/// `Clone` (cheap: causes are shared), because every record of a failed batch gets its own
/// copy. `Display` is one complete line without a trailing period, cause included, fit for
/// `error: …` on a terminal or a log line; [`source`](std::error::Error::source) returns the
/// [`Cause`] for programs that inspect it. Its text may name the store's location (for
/// PostgreSQL: user, host, port and database), so it is for the operator, not for remote
/// senders: [`StoreThenAck`](crate::StoreThenAck) sends them a generic text.
///
/// ```
/// use std::error::Error;
/// use mllp_store::{SqliteOptions, StoreConfig, Store, StoreError};
///
/// let dir = std::env::temp_dir().join(format!("mllp-doc-error-{}", std::process::id()));
/// let err = Store::open_sqlite(dir.join("no/such/dir/s.db"), &SqliteOptions::default(), StoreConfig::default())
///     .unwrap_err();
/// assert!(matches!(err, StoreError::Open { .. }), "{err}");
/// assert!(err.source().is_some());
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum StoreError {
    /// The store file does not exist (reading never creates one).
    NotFound {
        /// The path given.
        path: PathBuf,
    },
    /// The file (or database) exists but is not a store: a foreign database is never
    /// modified.
    NotAStore {
        /// The path given.
        path: PathBuf,
        /// What was found instead.
        found: Found,
    },
    /// Another connection held a lock for longer than the busy timeout.
    Locked {
        /// The path given.
        path: PathBuf,
    },
    /// The store was written by a newer version of this crate.
    UnsupportedVersion {
        /// The path given.
        path: PathBuf,
        /// Schema version found in the file.
        found: i64,
        /// Newest schema version this build reads.
        supported: i64,
    },
    /// The store cannot be opened or created (missing directory, permissions, a directory
    /// where the file should be, a read-only file system, an unreachable database server, …).
    Open {
        /// The path given.
        path: PathBuf,
        /// Why.
        source: Cause,
    },
    /// A batch did not commit; none of its records is stored (or, for
    /// [`Problem::OutcomeUnknown`], it cannot be told whether they are).
    Commit {
        /// Why.
        source: Cause,
    },
    /// Reading records back failed.
    Read {
        /// Why.
        source: Cause,
    },
    /// A [`StoreConfig`](crate::StoreConfig) value is out of range.
    Config(ConfigError),
    /// The queue was full: the record was not taken (see
    /// [`SubmitError::reason`](crate::SubmitError::reason)).
    QueueFull,
    /// The store was closed: the record was not taken (see
    /// [`SubmitError::reason`](crate::SubmitError::reason)).
    Closed,
    /// The writer thread stopped before it committed the record (it never does on its own:
    /// only a panic in the backend outside a batch could cause this).
    WriterGone,
    /// Free disk space is below the minimum ([`disk`](crate::disk)): the record was not
    /// stored, nothing stored was touched; service resumes once space is freed.
    LowDisk {
        /// Bytes available at the last check.
        available: u64,
        /// The minimum, in bytes.
        minimum: u64,
    },
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotFound { path } => write!(f, "{}: no such store file", path.display()),
            Self::NotAStore { path, found } => {
                write!(
                    f,
                    "{} is not an mllp-reactor store ({found})",
                    path.display()
                )
            }
            Self::Locked { path } => {
                write!(f, "{} is locked by another connection", path.display())
            }
            Self::UnsupportedVersion {
                path,
                found,
                supported,
            } => write!(
                f,
                "{} has store schema version {found}; this build reads versions up to {supported}",
                path.display()
            ),
            Self::Open { path, source } => {
                write!(f, "cannot open store {}: {source}", path.display())
            }
            Self::Commit { source } => write!(f, "commit failed: {source}"),
            Self::Read { source } => write!(f, "cannot read the store: {source}"),
            Self::Config(e) => e.fmt(f),
            Self::QueueFull => f.write_str("the store's queue is full"),
            Self::Closed => f.write_str("the store is closed"),
            Self::WriterGone => f.write_str("the store's writer thread has stopped"),
            Self::LowDisk { available, minimum } => write!(
                f,
                "free disk space is below the minimum ({} MiB left, {} MiB required): new \
                 messages are refused until space is freed",
                available >> 20,
                minimum >> 20
            ),
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Open { source, .. } | Self::Commit { source } | Self::Read { source } => {
                Some(source)
            }
            Self::Config(e) => Some(e),
            _ => None,
        }
    }
}

impl StoreError {
    /// A [`StoreError::Commit`] caused by `cause`.
    pub fn commit(cause: impl Into<Cause>) -> Self {
        Self::Commit {
            source: cause.into(),
        }
    }

    /// A [`StoreError::Read`] caused by `cause`.
    pub fn read(cause: impl Into<Cause>) -> Self {
        Self::Read {
            source: cause.into(),
        }
    }

    /// A [`StoreError::Open`] of `path` caused by `cause`.
    pub fn open(path: &Path, cause: impl Into<Cause>) -> Self {
        Self::Open {
            path: path.to_owned(),
            source: cause.into(),
        }
    }

    /// The [`Problem`] behind this error, if it is one this crate found itself (rather than
    /// an error of the operating system or the database).
    pub fn problem(&self) -> Option<&Problem> {
        match self {
            Self::Open { source, .. } | Self::Commit { source } | Self::Read { source } => {
                source.problem()
            }
            _ => None,
        }
    }

    /// Whether this error says the store's database could not be reached: a PostgreSQL
    /// connection that was closed, failed on the network, could not be opened, or is
    /// waiting to be retried. An error the database itself returned (a lock timeout, a
    /// failed authentication) is not one. Never for SQLite.
    pub fn is_connection_lost(&self) -> bool {
        match self {
            Self::Open { source, .. } | Self::Commit { source } | Self::Read { source } => {
                source.is_connection_lost()
            }
            _ => false,
        }
    }
}

/// What was found where a store was expected ([`StoreError::NotAStore`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Found {
    /// A file that is not an SQLite database.
    NotSqlite,
    /// An SQLite database without tables (reading never creates the schema).
    EmptyDatabase,
    /// An SQLite database with other tables; it was not changed.
    OtherTables,
    /// A PostgreSQL database with a table `mllp_messages` but no `mllp_store_schema`; it was
    /// not changed.
    ForeignMessagesTable,
    /// A PostgreSQL database without the store's tables (a reader never creates them).
    NoTables,
    /// A PostgreSQL schema older than this build, not migrated yet (only a writer's first
    /// connect migrates).
    NotMigrated,
}

impl fmt::Display for Found {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NotSqlite => "not an SQLite database",
            Self::EmptyDatabase => "an empty database",
            Self::OtherTables => "an SQLite database with other tables; it was not changed",
            Self::ForeignMessagesTable => {
                "table mllp_messages exists without mllp_store_schema; it was not changed"
            }
            Self::NoTables => "the database has no mllp-reactor tables",
            Self::NotMigrated => "its schema is older than this build and was not migrated yet",
        })
    }
}

/// Whether the PostgreSQL server said it is ending the session (class 57P, "operator
/// intervention": `pg_terminate_backend`, a shutdown, a crash restart): its FATAL error can
/// reach a query before the closed socket does.
#[cfg(feature = "postgres")]
pub(crate) fn ends_session(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| c.code().starts_with("57P"))
}

/// A problem this crate found itself, as opposed to an error of the operating system or the
/// database (both are a [`Cause`]'s `source()`).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Problem {
    /// A write to a store opened read-only.
    ReadOnly,
    /// The backend panicked during a commit.
    BackendPanicked,
    /// The backend returned a different number of outcomes than records.
    OutcomeCount {
        /// Records in the batch.
        records: usize,
        /// Outcomes returned.
        outcomes: usize,
    },
    /// A failure injected by [`crate::fault`].
    Injected,
    /// The store's path is a directory.
    IsADirectory,
    /// The directory the store file should be created in does not exist.
    NoDirectory(PathBuf),
    /// SQLite reports the file as corrupt.
    Corrupt,
    /// `PRAGMA synchronous=FULL` did not take effect (the level read back).
    SynchronousNotFull(i64),
    /// The journal mode could not be switched to WAL (the mode it stays in).
    NotWal(String),
    /// The store file was deleted, renamed or replaced while the store had it open: what is
    /// committed now would not be in the file at the path. The store answers every batch
    /// with this until it is restarted ([`Health::Broken`](crate::Health::Broken)).
    FileReplaced,
    /// A PostgreSQL URL in a build without the cargo feature `postgres`.
    NoPostgres,
    /// The PostgreSQL server has `synchronous_commit=off`, so a `COMMIT` returns before it is
    /// durable (refused unless `allow_async_commit`).
    AsyncCommit,
    /// The PostgreSQL server has `fsync=off` (refused unless `allow_async_commit`).
    FsyncOff,
    /// The PostgreSQL database's encoding (not UTF-8).
    Encoding(String),
    /// The id sequence's `CACHE` (ids stay in commit order across nodes only with 1).
    SequenceCache(i64),
    /// The connection to the database was lost while `COMMIT` was in flight and the outcome
    /// could not be looked up: the batch may or may not be stored. The senders get AE; a
    /// resend is then stored flagged as a duplicate if the first copy did commit.
    OutcomeUnknown,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ReadOnly => f.write_str("the store was opened read-only"),
            Self::BackendPanicked => f.write_str("the store backend panicked"),
            Self::OutcomeCount { records, outcomes } => write!(
                f,
                "the backend returned {outcomes} outcomes for {records} records"
            ),
            Self::Injected => f.write_str("injected fault"),
            Self::IsADirectory => f.write_str("it is a directory"),
            Self::NoDirectory(dir) => write!(f, "directory {} does not exist", dir.display()),
            Self::Corrupt => f.write_str("the database file is corrupt"),
            Self::SynchronousNotFull(level) => {
                write!(f, "synchronous=FULL did not stick (got {level})")
            }
            Self::NotWal(mode) => {
                write!(f, "cannot switch to WAL (journal mode stays {mode})")
            }
            Self::FileReplaced => f.write_str(
                "the store file was deleted or replaced while the server had it open; \
                 restart the server to store again",
            ),
            Self::NoPostgres => {
                f.write_str("this build has no PostgreSQL support (cargo feature \"postgres\")")
            }
            Self::AsyncCommit => f.write_str(
                "the server has synchronous_commit=off, so a COMMIT returns before it is \
                 durable and an AA could be lost; set it to on (or local), or accept the risk \
                 with --allow-async-commit",
            ),
            Self::FsyncOff => f.write_str(
                "the server has fsync=off, so a crash can lose committed messages; turn it \
                 on, or accept the risk with --allow-async-commit",
            ),
            Self::Encoding(encoding) => write!(
                f,
                "the database's encoding is {encoding}, not UTF8 (create it with ENCODING 'UTF8')"
            ),
            Self::SequenceCache(cache) => write!(
                f,
                "the id sequence of mllp_messages has CACHE {cache}; ids stay in commit order \
                 across nodes only with CACHE 1 (ALTER TABLE mllp_messages ALTER COLUMN id SET \
                 CACHE 1)"
            ),
            Self::OutcomeUnknown => f.write_str(
                "the connection to the database was lost while COMMIT was in flight and the \
                 outcome could not be looked up",
            ),
        }
    }
}

impl std::error::Error for Problem {}

/// Why a store operation failed: an error of the operating system, of the database, of
/// another store operation, or a [`Problem`] this crate found. `Display` is one line;
/// [`source`](std::error::Error::source) is the underlying error where there is one (an
/// [`io::Error`], the SQLite or PostgreSQL driver's error, a [`StoreError`]).
///
/// Build one for your own [`Backend`](crate::Backend) from an [`io::Error`] or a [`Problem`]
/// (`.into()`), or from any error with [`Cause::other`].
#[derive(Clone)]
pub struct Cause {
    /// What was being done, when that is not clear from the error itself.
    context: Option<&'static str>,
    kind: Kind,
}

#[derive(Clone)]
enum Kind {
    Problem(Problem),
    /// A problem, and the error that left it unsolved.
    Because {
        problem: Problem,
        source: Arc<StoreError>,
    },
    Io(Arc<io::Error>),
    Sqlite(Arc<rusqlite::Error>),
    #[cfg(feature = "postgres")]
    Postgres(Arc<tokio_postgres::Error>),
    Store(Arc<StoreError>),
    /// Reconnecting is backing off after `last` failed.
    #[cfg(feature = "postgres")]
    Waiting {
        last: Arc<StoreError>,
        retry_in: std::time::Duration,
    },
    Other(Arc<dyn std::error::Error + Send + Sync>),
}

impl Cause {
    /// Any other error (a custom [`Backend`](crate::Backend)'s).
    pub fn other(error: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::from_kind(Kind::Other(Arc::new(error)))
    }

    /// The [`Problem`], if this cause is one.
    pub fn problem(&self) -> Option<&Problem> {
        match &self.kind {
            Kind::Problem(p) | Kind::Because { problem: p, .. } => Some(p),
            Kind::Store(e) => e.problem(),
            #[cfg(feature = "postgres")]
            Kind::Waiting { last: e, .. } => e.problem(),
            _ => None,
        }
    }

    /// See [`StoreError::is_connection_lost`].
    fn is_connection_lost(&self) -> bool {
        match &self.kind {
            #[cfg(feature = "postgres")]
            Kind::Postgres(e) => {
                use std::error::Error as _;
                e.is_closed() || e.source().is_some_and(|s| s.is::<io::Error>()) || ends_session(e)
            }
            #[cfg(feature = "postgres")]
            Kind::Waiting { .. } => true,
            Kind::Store(e) | Kind::Because { source: e, .. } => e.is_connection_lost(),
            _ => false,
        }
    }

    /// Says what was being done (`"cannot create the schema"`): shown before the error.
    pub(crate) fn context(mut self, context: &'static str) -> Self {
        self.context = Some(context);
        self
    }

    fn from_kind(kind: Kind) -> Self {
        Self {
            context: None,
            kind,
        }
    }

    /// `problem`, left unsolved by `source` (shown as "problem: source").
    pub fn problem_because(problem: Problem, source: StoreError) -> Self {
        Self::from_kind(Kind::Because {
            problem,
            source: Arc::new(source),
        })
    }

    pub(crate) fn sqlite(e: rusqlite::Error) -> Self {
        Self::from_kind(Kind::Sqlite(Arc::new(e)))
    }

    #[cfg(feature = "postgres")]
    pub(crate) fn postgres(e: tokio_postgres::Error) -> Self {
        Self::from_kind(Kind::Postgres(Arc::new(e)))
    }

    /// A reconnect is waiting `retry_in` after `last` failed.
    #[cfg(feature = "postgres")]
    pub(crate) fn waiting(last: StoreError, retry_in: std::time::Duration) -> Self {
        Self::from_kind(Kind::Waiting {
            last: Arc::new(last),
            retry_in,
        })
    }
}

impl From<Problem> for Cause {
    fn from(problem: Problem) -> Self {
        Self::from_kind(Kind::Problem(problem))
    }
}

impl From<rusqlite::Error> for Cause {
    fn from(e: rusqlite::Error) -> Self {
        Self::sqlite(e)
    }
}

impl From<io::Error> for Cause {
    fn from(e: io::Error) -> Self {
        Self::from_kind(Kind::Io(Arc::new(e)))
    }
}

impl From<StoreError> for Cause {
    fn from(e: StoreError) -> Self {
        Self::from_kind(Kind::Store(Arc::new(e)))
    }
}

impl fmt::Debug for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Cause");
        if let Some(context) = self.context {
            d.field("context", &context);
        }
        match &self.kind {
            Kind::Problem(p) => d.field("problem", p),
            Kind::Because { problem, source } => {
                d.field("problem", problem).field("source", source)
            }
            Kind::Io(e) => d.field("io", e),
            Kind::Sqlite(e) => d.field("sqlite", e),
            #[cfg(feature = "postgres")]
            Kind::Postgres(e) => d.field("postgres", e),
            Kind::Store(e) => d.field("store", e),
            #[cfg(feature = "postgres")]
            Kind::Waiting { last, retry_in } => d.field("last", last).field("retry_in", retry_in),
            Kind::Other(e) => d.field("other", e),
        };
        d.finish()
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Every error of this crate prints as one line, whatever the drivers' texts hold.
        let mut out = OneLine(f);
        if let Some(context) = self.context {
            write!(out, "{context}: ")?;
        }
        match &self.kind {
            Kind::Problem(p) => write!(out, "{p}"),
            Kind::Because { problem, source } => write!(out, "{problem}: {source}"),
            Kind::Io(e) => write!(out, "{e}"),
            Kind::Sqlite(e) => write!(out, "{e}"),
            #[cfg(feature = "postgres")]
            Kind::Postgres(e) => describe_postgres(e, &mut out),
            Kind::Store(e) => write!(out, "{e}"),
            #[cfg(feature = "postgres")]
            Kind::Waiting { last, retry_in } => match &**last {
                // The location is already in the enclosing error.
                StoreError::Open { source, .. } => write!(
                    out,
                    "{source} (next attempt in {} ms)",
                    retry_in.as_millis()
                ),
                other => write!(out, "{other} (next attempt in {} ms)", retry_in.as_millis()),
            },
            Kind::Other(e) => write!(out, "{e}"),
        }
    }
}

impl std::error::Error for Cause {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.kind {
            Kind::Problem(p) => Some(p),
            Kind::Because { source, .. } => Some(&**source),
            Kind::Io(e) => Some(&**e),
            Kind::Sqlite(e) => Some(&**e),
            #[cfg(feature = "postgres")]
            Kind::Postgres(e) => Some(&**e),
            Kind::Store(e) => Some(&**e),
            #[cfg(feature = "postgres")]
            Kind::Waiting { last: e, .. } => Some(&**e),
            Kind::Other(e) => Some(&**e),
        }
    }
}

/// A PostgreSQL error in words: the server's message and SQLSTATE for database errors (the
/// driver's own `Display` says only "db error"), the cause chain otherwise.
#[cfg(feature = "postgres")]
fn describe_postgres(e: &tokio_postgres::Error, out: &mut impl fmt::Write) -> fmt::Result {
    if let Some(db) = e.as_db_error() {
        write!(
            out,
            "{}: {} (SQLSTATE {})",
            db.severity(),
            db.message(),
            db.code().code()
        )?;
        if let Some(detail) = db.detail() {
            write!(out, "; {detail}")?;
        }
        return Ok(());
    }
    write!(out, "{e}")?;
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        write!(out, ": {cause}")?;
        source = cause.source();
    }
    Ok(())
}

/// Writes through to a formatter with line breaks replaced by spaces.
struct OneLine<'a, 'b>(&'a mut fmt::Formatter<'b>);

impl fmt::Write for OneLine<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut rest = s;
        while let Some(i) = rest.find(['\r', '\n']) {
            self.0.write_str(&rest[..i])?;
            self.0.write_char(' ')?;
            rest = &rest[i + 1..];
        }
        self.0.write_str(rest)
    }
}

/// A [`StoreConfig`](crate::StoreConfig) value out of range.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// A cap is zero; every cap must let at least one message through.
    ZeroCap(&'static str),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ZeroCap(name) => write!(f, "store option {name} must be at least 1"),
        }
    }
}

impl std::error::Error for ConfigError {}

/// [`Store::close`](crate::Store::close) gave up waiting.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseError {
    /// The writer had not drained the queue when the timeout passed; it goes on in the
    /// background and still completes every callback.
    Timeout {
        /// Records still queued when waiting stopped.
        queued: usize,
    },
}

impl fmt::Display for CloseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Timeout { queued } => write!(
                f,
                "the store writer did not finish in time ({queued} records still queued)"
            ),
        }
    }
}

impl std::error::Error for CloseError {}
