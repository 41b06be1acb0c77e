//! Opening whichever store a [`StoreSpec`] names, with [`OpenOptions`] for both backends.

use std::time::Duration;

use crate::error::StoreError;
use crate::spec::StoreSpec;
use crate::sqlite::{SqliteBackend, SqliteOptions};
use crate::writer::{Store, StoreConfig};

/// Options for opening a store named by a [`StoreSpec`]: those of each backend, of which the
/// one the spec names applies.
///
/// ```
/// use std::time::Duration;
/// use mllp_store::OpenOptions;
///
/// let options = OpenOptions::default().lock_timeout(Duration::from_secs(1));
/// assert_eq!(options.sqlite.busy_timeout, Duration::from_secs(1));
/// ```
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct OpenOptions {
    /// Used for an SQLite file.
    pub sqlite: SqliteOptions,
    /// Used for a PostgreSQL URL (feature `postgres`).
    #[cfg(feature = "postgres")]
    pub postgres: crate::postgresql::PostgresOptions,
}

impl OpenOptions {
    /// How long to wait for another connection's lock, with either backend
    /// ([`SqliteOptions::busy_timeout`], `PostgresOptions::lock_timeout`).
    pub fn lock_timeout(mut self, timeout: Duration) -> Self {
        self.sqlite.busy_timeout = timeout;
        #[cfg(feature = "postgres")]
        {
            self.postgres.lock_timeout = timeout;
        }
        self
    }

    /// How far back to look for the original of a resend, with either backend.
    pub fn duplicate_window(mut self, window: Duration) -> Self {
        self.sqlite.duplicate_window = window;
        #[cfg(feature = "postgres")]
        {
            self.postgres.duplicate_window = window;
        }
        self
    }
}

impl Store {
    /// Opens (or creates) the store `spec` names and starts a store over it: the SQLite
    /// file, or a connection to the PostgreSQL database (made here, on the calling thread,
    /// then moved to the writer thread, where all of its blocking work happens).
    ///
    /// ```
    /// use mllp_store::{OpenOptions, Store, StoreConfig, StoreSpec};
    ///
    /// let dir = std::env::temp_dir().join(format!("mllp-doc-open-{}", std::process::id()));
    /// std::fs::create_dir_all(&dir)?;
    /// let spec = StoreSpec::parse(dir.join("s.db").to_str().unwrap())?;
    /// let store = Store::open(&spec, &OpenOptions::default(), StoreConfig::default())?;
    /// assert!(store.summary().ends_with("s.db"));
    /// # drop(store);
    /// # std::fs::remove_dir_all(&dir)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// As [`SqliteBackend::open`], `PostgresBackend::connect` and [`Store::start`];
    /// [`StoreError::Open`] with [`Problem::NoPostgres`](crate::Problem::NoPostgres) for a URL in a build without the
    /// feature `postgres`.
    pub fn open(
        spec: &StoreSpec,
        options: &OpenOptions,
        config: StoreConfig,
    ) -> Result<Self, StoreError> {
        match spec {
            StoreSpec::Sqlite(path) => {
                Self::start(SqliteBackend::open(path, &options.sqlite)?, config)
            }
            #[cfg(feature = "postgres")]
            StoreSpec::Postgres(url) => Self::start(
                crate::postgresql::PostgresBackend::connect(url, &options.postgres)?,
                config,
            ),
            #[cfg(not(feature = "postgres"))]
            StoreSpec::Postgres(_) => Err(no_postgres(spec)),
        }
    }
}

/// The error for a PostgreSQL URL in a build without the feature `postgres`.
#[cfg(not(feature = "postgres"))]
pub(crate) fn no_postgres(spec: &StoreSpec) -> StoreError {
    StoreError::open(
        std::path::Path::new(&spec.to_string()),
        crate::error::Problem::NoPostgres,
    )
}
