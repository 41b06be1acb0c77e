//! [`PostgresOptions`].

use std::fmt;
use std::time::Duration;

use super::{DEFAULT_CONNECT_TIMEOUT, DEFAULT_LOCK_TIMEOUT};

/// Options of a [`PostgresBackend`](super::PostgresBackend).
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PostgresOptions {
    /// How long a statement waits for a lock (default [`DEFAULT_LOCK_TIMEOUT`]).
    pub lock_timeout: Duration,
    /// How long connecting may take (default [`DEFAULT_CONNECT_TIMEOUT`]); a timeout in the
    /// URL (`connect_timeout=`) wins.
    pub connect_timeout: Duration,
    /// How far back to look for the original of a resend (default
    /// [`crate::sqlite::DEFAULT_DUPLICATE_WINDOW`], 7 days, for the same reasons).
    pub duplicate_window: Duration,
    /// Accept a server whose `synchronous_commit` (or `fsync`) is `off` (default `false`):
    /// then an AA no longer survives a crash of the database server.
    pub allow_async_commit: bool,
    /// A password to use when the URL has none (the CLI passes `PGPASSWORD`, so the password
    /// need not appear in the process list). Never shown by `Debug`.
    pub password: Option<String>,
    /// BENCHMARKS ONLY: a writer drops the patient index `mllp_messages_patient` after its
    /// session set-up (`search --patient` then scans), to measure what the index costs the
    /// receive path, as [`SqliteOptions::bench_without_patient_index`](crate::SqliteOptions)
    /// does for SQLite. Never set it in service.
    #[doc(hidden)]
    pub bench_without_patient_index: bool,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        Self {
            lock_timeout: DEFAULT_LOCK_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            duplicate_window: crate::sqlite::DEFAULT_DUPLICATE_WINDOW,
            allow_async_commit: false,
            password: None,
            bench_without_patient_index: false,
        }
    }
}

impl fmt::Debug for PostgresOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresOptions")
            .field("lock_timeout", &self.lock_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("duplicate_window", &self.duplicate_window)
            .field("allow_async_commit", &self.allow_async_commit)
            .field("password", &self.password.as_ref().map(|_| "_"))
            .finish()
    }
}

impl PostgresOptions {
    /// Sets [`lock_timeout`](Self::lock_timeout).
    pub fn lock_timeout(mut self, timeout: Duration) -> Self {
        self.lock_timeout = timeout;
        self
    }

    /// Sets [`connect_timeout`](Self::connect_timeout).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets [`duplicate_window`](Self::duplicate_window).
    pub fn duplicate_window(mut self, window: Duration) -> Self {
        self.duplicate_window = window;
        self
    }

    /// Sets [`allow_async_commit`](Self::allow_async_commit).
    pub fn allow_async_commit(mut self, allow: bool) -> Self {
        self.allow_async_commit = allow;
        self
    }

    /// Sets [`password`](Self::password).
    pub fn password(mut self, password: Option<String>) -> Self {
        self.password = password;
        self
    }
}

/// Whether `store` names a PostgreSQL store (`postgres://…` or `postgresql://…`) rather than
/// an SQLite file: [`StoreSpec::parse`](crate::StoreSpec::parse) decides.
///
/// ```
/// assert!(mllp_store::postgresql::is_postgres_url("postgres://mllp@db:5432/mllp"));
/// assert!(!mllp_store::postgresql::is_postgres_url("./mllp-reactor.db"));
/// ```
pub fn is_postgres_url(store: &str) -> bool {
    crate::StoreSpec::parse(store).is_ok_and(|spec| spec.is_postgres())
}
