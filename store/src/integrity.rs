//! Integrity: finding damage in a store before it loses messages.
//!
//! - [`check_sqlite`] runs SQLite's `PRAGMA integrity_check` (every page, every index entry
//!   against its row) or, with [`CheckDepth::Quick`], `PRAGMA quick_check` (pages and rows,
//!   not index contents), within an optional time budget. The CLI's `check STORE` runs the
//!   full check without a budget and exits non-zero on damage.
//! - `serve` runs a quick check at start, bounded by [`STARTUP_CHECK_BUDGET`]: a damaged store
//!   is refused with one line that names `check`; a store too large to finish in the budget
//!   starts anyway (the check is then reported as incomplete, never as passed).
//! - During service, a commit that fails because SQLite found corruption (`SQLITE_CORRUPT`,
//!   `SQLITE_NOTADB`) is counted in `mllp_store_corruptions_total`, marks the store's
//!   [`Pulse`](crate::health::Pulse) corrupt for good (so `/readyz` stays 503
//!   until the store is repaired and the server restarted), and is logged as an error by the
//!   server.
//!
//! PostgreSQL keeps its own page checksums and WAL; what applies there is the server's
//! `amcheck`, run by a database administrator, so `check` on a PostgreSQL store only verifies
//! that it connects and reads its schema.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::error::StoreError;
use crate::open::OpenOptions;
use crate::spec::StoreSpec;
use crate::sqlite::{SqliteOptions, is_corruption};

/// How long `serve`'s start-up check may take: 2 s.
///
/// `quick_check` reads every page once: about 1 GB/s from the page cache, a few hundred MB/s
/// from disk. 2 s covers stores up to several hundred MB entirely, and delays the start of a
/// larger one by no more than a restart's usual jitter; beyond it the check stops (reported as
/// incomplete) and `check STORE` is the tool.
pub const STARTUP_CHECK_BUDGET: Duration = Duration::from_secs(2);

/// Most problems a check collects (SQLite's own default for `integrity_check` is 100).
pub const MAX_PROBLEMS: usize = 100;

/// How thorough a check is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckDepth {
    /// `PRAGMA quick_check`: every page and row, not index contents.
    Quick,
    /// `PRAGMA integrity_check`: also every index entry against its row.
    Full,
}

/// What a check found.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CheckOutcome {
    /// No damage.
    Ok,
    /// Damage: SQLite's descriptions, at most [`MAX_PROBLEMS`].
    Damaged(Vec<String>),
    /// The budget ran out before the check finished: nothing is known.
    Incomplete,
    /// No damage found, but the store cannot keep its promise as configured (PostgreSQL:
    /// `fsync=off` or `synchronous_commit=off` on the server): the reasons.
    Unsafe(Vec<String>),
    /// The settings are sound, but the data could not be checked, and why (PostgreSQL
    /// without the `amcheck` extension).
    Unchecked(String),
}

/// Checks the SQLite store at `path` (read-only; works while `serve` runs, though a store
/// being written is best checked on a copy or with the server stopped).
///
/// ```
/// use mllp_store::integrity::{check_sqlite, CheckDepth, CheckOutcome};
/// use mllp_store::{SqliteBackend, SqliteOptions};
///
/// let dir = std::env::temp_dir().join(format!("mllp-store-doc-check-{}", std::process::id()));
/// std::fs::create_dir_all(&dir)?;
/// let path = dir.join("store.db");
/// drop(SqliteBackend::open(&path, &SqliteOptions::default())?);
/// let outcome = check_sqlite(&path, CheckDepth::Full, None, &SqliteOptions::default())?;
/// assert_eq!(outcome, CheckOutcome::Ok);
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
///
/// As [`SqliteBackend::open_read_only`](crate::SqliteBackend::open_read_only) (a file whose
/// header is damaged is [`StoreError::NotAStore`] or [`StoreError::Open`]); a check that
/// SQLite aborts because of the damage itself gives [`CheckOutcome::Damaged`], not an error.
pub fn check_sqlite(
    path: &Path,
    depth: CheckDepth,
    budget: Option<Duration>,
    options: &SqliteOptions,
) -> Result<CheckOutcome, StoreError> {
    let conn = crate::SqliteBackend::open_read_only(path, options)?.into_connection()?;
    run_check(&conn, depth, budget)
}

/// Checks the store's search index file ([`crate::search_index`]) beside the SQLite store at
/// `path`, as [`check_sqlite`] checks the store; `None` when there is none. A file that is
/// not a database is [`CheckOutcome::Damaged`]. Damage there loses nothing (the file is
/// derived from the store, and the next writer rebuilds it), so `check` reports it without
/// failing, and `serve`'s start-up check leaves the file to the follower.
///
/// # Errors
///
/// [`StoreError::Read`] when the check itself fails for another reason than damage.
pub fn check_search_index_sqlite(
    path: &Path,
    depth: CheckDepth,
) -> Result<Option<CheckOutcome>, StoreError> {
    let side = crate::search_index::index_path(path);
    if !side.is_file() {
        return Ok(None);
    }
    let flags =
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
    match rusqlite::Connection::open_with_flags(&side, flags) {
        Ok(conn) => run_check(&conn, depth, None).map(Some),
        Err(e) if is_corruption(&e) => Ok(Some(CheckOutcome::Damaged(vec![e.to_string()]))),
        Err(e) => Err(StoreError::read(e)),
    }
}

/// Runs SQLite's check on `conn` within `budget`.
fn run_check(
    conn: &rusqlite::Connection,
    depth: CheckDepth,
    budget: Option<Duration>,
) -> Result<CheckOutcome, StoreError> {
    let timed_out = Arc::new(AtomicBool::new(false));
    let watchdog = budget.map(|budget| {
        let handle = conn.get_interrupt_handle();
        let timed_out = Arc::clone(&timed_out);
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            // Only a timeout: the check finishing drops the sender (Disconnected).
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = done_rx.recv_timeout(budget) {
                timed_out.store(true, Ordering::SeqCst);
                handle.interrupt();
            }
        });
        (done_tx, thread)
    });
    let pragma = match depth {
        CheckDepth::Quick => "quick_check",
        CheckDepth::Full => "integrity_check",
    };
    let result = (|| -> rusqlite::Result<Vec<String>> {
        let mut stmt = conn.prepare(&format!("PRAGMA {pragma}({MAX_PROBLEMS})"))?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        rows.collect()
    })();
    if let Some((done, thread)) = watchdog {
        drop(done);
        let _ = thread.join();
    }
    match result {
        Ok(lines) if lines.len() == 1 && lines[0] == "ok" => Ok(CheckOutcome::Ok),
        Ok(lines) => Ok(CheckOutcome::Damaged(lines)),
        Err(_) if timed_out.load(Ordering::SeqCst) => Ok(CheckOutcome::Incomplete),
        Err(e) if is_corruption(&e) => Ok(CheckOutcome::Damaged(vec![e.to_string()])),
        Err(e) => Err(StoreError::read(e)),
    }
}

/// Checks the store `spec` names: [`check_sqlite`] or `check_postgres` (feature
/// `postgres`; `budget` does not apply there).
///
/// # Errors
///
/// As [`check_sqlite`] and `check_postgres`; [`StoreError::Open`] with
/// [`Problem::NoPostgres`](crate::Problem::NoPostgres) for a URL in a build without the
/// feature `postgres`.
pub fn check(
    spec: &StoreSpec,
    depth: CheckDepth,
    budget: Option<Duration>,
    options: &OpenOptions,
) -> Result<CheckOutcome, StoreError> {
    match spec {
        StoreSpec::Sqlite(path) => check_sqlite(path, depth, budget, &options.sqlite),
        #[cfg(feature = "postgres")]
        StoreSpec::Postgres(url) => check_postgres(url, depth, &options.postgres),
        #[cfg(not(feature = "postgres"))]
        StoreSpec::Postgres(_) => Err(crate::open::no_postgres(spec)),
    }
}

/// Checks the PostgreSQL store at `url` on a read-only connection: what applies (see the
/// module docs). Works while `serve` runs; `amcheck` takes only `AccessShareLock`s.
///
/// # Errors
///
/// As [`PostgresBackend::connect_read_only`](crate::PostgresBackend::connect_read_only) (no
/// schema, a newer one, an unreachable server); [`StoreError::Read`] when a query fails.
#[cfg(feature = "postgres")]
pub fn check_postgres(
    url: &str,
    depth: CheckDepth,
    options: &crate::PostgresOptions,
) -> Result<CheckOutcome, StoreError> {
    let full = depth == CheckDepth::Full;
    let found =
        crate::PostgresBackend::connect_read_only(url, options)?.check(full, MAX_PROBLEMS)?;
    Ok(if !found.damage.is_empty() {
        CheckOutcome::Damaged(
            found
                .damage
                .into_iter()
                .chain(found.unsafe_settings)
                .collect(),
        )
    } else if !found.unsafe_settings.is_empty() {
        CheckOutcome::Unsafe(found.unsafe_settings)
    } else if full && !found.amcheck {
        CheckOutcome::Unchecked(
            "the database has no amcheck extension (CREATE EXTENSION amcheck, as a superuser, \
             to check the tables' pages and indexes)"
                .to_owned(),
        )
    } else {
        CheckOutcome::Ok
    })
}

/// The one-line refusal `serve` prints for a damaged store.
pub fn refusal(path: &Path, problems: &[String]) -> String {
    format!(
        "store {} is damaged ({}{}): run `mllp-reactor check {}` for details, and restore it \
         from a backup or move it aside",
        path.display(),
        problems.first().map_or("", String::as_str),
        if problems.len() > 1 { ", …" } else { "" },
        path.display()
    )
}
