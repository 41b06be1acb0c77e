//! Error types: [`StoreError`] (opening, committing, reading), [`SubmitError`] (the queue),
//! [`ConfigError`] and [`CloseError`].

use std::fmt;
use std::path::{Path, PathBuf};

use crate::record::Record;
use crate::writer::Done;

/// Why a store could not be opened, a batch not committed, or records not read.
///
/// The `path` of a PostgreSQL store's error is its URL without the password
/// (`postgres://user@host:port/db`).
///
/// `Clone`, because every record of a failed batch gets its own copy. `Display` is one line
/// without a trailing period, fit for `error: …` on a terminal or MSA-3 of an AE.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreError {
    /// The store file does not exist (reading never creates one).
    NotFound {
        /// The path given.
        path: PathBuf,
    },
    /// The file exists but is not a store: not an SQLite database, or one without this
    /// crate's schema (a foreign database is never modified).
    NotAStore {
        /// The path given.
        path: PathBuf,
        /// What was found instead.
        reason: String,
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
    /// The file cannot be opened or created: missing directory, permissions, a directory
    /// where the file should be, a read-only file system, …
    Open {
        /// The path given.
        path: PathBuf,
        /// Why, in words.
        reason: String,
    },
    /// A batch did not commit; none of its records is stored.
    Commit {
        /// Why, in words.
        reason: String,
    },
    /// Reading records back failed.
    Read {
        /// Why, in words.
        reason: String,
    },
    /// A [`StoreConfig`](crate::StoreConfig) value is out of range.
    Config(ConfigError),
    /// The queue was full: the record was not taken (see [`SubmitError::reason`]).
    QueueFull,
    /// The store was closed: the record was not taken (see [`SubmitError::reason`]).
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
            Self::NotAStore { path, reason } => {
                write!(
                    f,
                    "{} is not an mllp-reactor store ({reason})",
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
            Self::Open { path, reason } => {
                write!(f, "cannot open store {}: {reason}", path.display())
            }
            Self::Commit { reason } => write!(f, "commit failed: {reason}"),
            Self::Read { reason } => write!(f, "cannot read the store: {reason}"),
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

impl std::error::Error for StoreError {}

impl StoreError {
    /// A [`StoreError::Commit`] whose reason is `reason` squeezed onto one line.
    pub fn commit(reason: impl fmt::Display) -> Self {
        Self::Commit {
            reason: one_line(reason),
        }
    }

    /// A [`StoreError::Read`] whose reason is `reason` squeezed onto one line.
    pub fn read(reason: impl fmt::Display) -> Self {
        Self::Read {
            reason: one_line(reason),
        }
    }

    /// A [`StoreError::Open`] for `path`, `reason` squeezed onto one line.
    pub fn open(path: &Path, reason: impl fmt::Display) -> Self {
        Self::Open {
            path: path.to_owned(),
            reason: one_line(reason),
        }
    }
}

/// `text` with line breaks replaced by spaces: every error of this crate prints as one line.
pub(crate) fn one_line(text: impl fmt::Display) -> String {
    text.to_string().replace(['\r', '\n'], " ")
}

/// A record (and its callback) the queue did not take, handed back so the caller can retry
/// without copying anything.
pub struct Submission {
    pub(crate) record: Record,
    pub(crate) done: Done,
}

impl Submission {
    /// The record and its callback, as passed to [`Store::submit`](crate::Store::submit).
    pub fn into_parts(self) -> (Record, Done) {
        (self.record, self.done)
    }

    /// The record.
    pub fn record(&self) -> &Record {
        &self.record
    }
}

impl fmt::Debug for Submission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Submission")
            .field("record", &self.record)
            .finish_non_exhaustive()
    }
}

/// Why [`Store::submit`](crate::Store::submit) did not take a record. Either way the callback
/// was not called and comes back inside the [`Submission`].
#[derive(Debug)]
pub enum SubmitError {
    /// The queue is at its cap in messages or bytes: try again after some replies went out
    /// (a server stops reading meanwhile, so TCP pushes back on senders).
    Full(Submission),
    /// The store is closed (or closing): nothing more is accepted.
    Closed(Submission),
}

impl SubmitError {
    /// Why, as the [`StoreError`] to complete the returned callback with when the caller will
    /// not retry ([`StoreError::QueueFull`] or [`StoreError::Closed`]).
    pub fn reason(&self) -> StoreError {
        match self {
            Self::Full(_) => StoreError::QueueFull,
            Self::Closed(_) => StoreError::Closed,
        }
    }

    /// The record and callback that were not taken.
    pub fn into_submission(self) -> Submission {
        match self {
            Self::Full(s) | Self::Closed(s) => s,
        }
    }
}

impl fmt::Display for SubmitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.reason().fmt(f)
    }
}

impl std::error::Error for SubmitError {}

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
