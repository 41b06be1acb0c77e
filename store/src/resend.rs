//! The audit trail of resends: who resent which stored message, where, when, why, and what the
//! receiver answered. `mllp-reactor resend` finds the messages with a
//! [`SearchFilter`](crate::search::SearchFilter) (the same code as `search`), sends them, checks
//! every ACK, and records one [`ResendAudit`] per message with [`record_resends`]: in SQLite's
//! table `resend_audit`, or PostgreSQL's `mllp_resend_audit` (same columns, PostgreSQL types).
//!
//! ```sql
//! CREATE TABLE resend_audit (
//!     id          INTEGER PRIMARY KEY,
//!     message_id  INTEGER NOT NULL,   -- messages.id (kept if the message is pruned later)
//!     resent_at_us INTEGER NOT NULL,  -- UTC µs since 1970
//!     os_user     TEXT NOT NULL,      -- who ran the command
//!     target      TEXT NOT NULL,      -- HOST:PORT
//!     result      TEXT NOT NULL,      -- "AA", "AE: text", "error: …"
//!     reason      TEXT                -- --reason
//! );
//! ```

use std::path::Path;
use std::time::SystemTime;

use rusqlite::OpenFlags;

use crate::error::StoreError;
use crate::open::OpenOptions;
use crate::record::{StoreId, system_time_to_us};
use crate::spec::StoreSpec;
use crate::sqlite::{SqliteOptions, open_connection};

const CREATE_AUDIT: &str = "
CREATE TABLE IF NOT EXISTS resend_audit (
    id           INTEGER PRIMARY KEY,
    message_id   INTEGER NOT NULL,
    resent_at_us INTEGER NOT NULL,
    os_user      TEXT NOT NULL,
    target       TEXT NOT NULL,
    result       TEXT NOT NULL,
    reason       TEXT
)";

/// One resend of one stored message.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ResendAudit {
    /// The stored message's id.
    pub message_id: StoreId,
    /// When it was sent.
    pub resent_at: SystemTime,
    /// The operating-system user who resent it.
    pub os_user: String,
    /// Where to (`HOST:PORT`).
    pub target: String,
    /// What came back: `AA`, `AE: text`, `error: …`.
    pub result: String,
    /// Why, as the operator wrote it.
    pub reason: Option<String>,
}

impl ResendAudit {
    /// An audit row.
    pub fn new(
        message_id: StoreId,
        os_user: String,
        target: String,
        result: String,
        reason: Option<String>,
    ) -> Self {
        Self {
            message_id,
            resent_at: SystemTime::now(),
            os_user,
            target,
            result,
            reason,
        }
    }
}

/// Appends `audits` to the SQLite store at `path` in one transaction (creating the table on
/// first use). Works while `serve` runs: it waits for the write lock like any writer.
///
/// # Errors
///
/// As [`SqliteBackend::open_read_only`](crate::SqliteBackend::open_read_only) (never creates a
/// store), and [`StoreError::Commit`].
pub fn record_resends_sqlite(
    path: &Path,
    audits: &[ResendAudit],
    options: &SqliteOptions,
) -> Result<(), StoreError> {
    drop(crate::SqliteBackend::open_read_only(path, options)?);
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let mut conn = open_connection(path, flags, options, false, crate::sqlite::Role::Other)?;
    let mut run = || -> rusqlite::Result<()> {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute_batch(CREATE_AUDIT)?;
        {
            let mut insert = tx.prepare(
                "INSERT INTO resend_audit (message_id, resent_at_us, os_user, target, result, reason)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for a in audits {
                insert.execute(rusqlite::params![
                    a.message_id,
                    system_time_to_us(a.resent_at),
                    a.os_user,
                    a.target,
                    a.result,
                    a.reason
                ])?;
            }
        }
        tx.commit()
    };
    run().map_err(StoreError::commit)
}

/// Appends `audits` to the store `spec` names: [`record_resends_sqlite`] or
/// `record_resends_postgres` (feature `postgres`).
///
/// # Errors
///
/// As those; [`StoreError::Open`] with [`Problem::NoPostgres`](crate::Problem::NoPostgres)
/// for a URL in a build without the feature `postgres`.
pub fn record_resends(
    spec: &StoreSpec,
    audits: &[ResendAudit],
    options: &OpenOptions,
) -> Result<(), StoreError> {
    match spec {
        StoreSpec::Sqlite(path) => record_resends_sqlite(path, audits, &options.sqlite),
        #[cfg(feature = "postgres")]
        StoreSpec::Postgres(url) => record_resends_postgres(url, audits, &options.postgres),
        #[cfg(not(feature = "postgres"))]
        StoreSpec::Postgres(_) => Err(crate::open::no_postgres(spec)),
    }
}

/// Appends `audits` to the PostgreSQL store at `url` in one transaction, creating the table
/// `mllp_resend_audit` (the columns of SQLite's `resend_audit`) on first use. Works while
/// `serve` runs.
///
/// # Errors
///
/// As [`PostgresBackend::connect`](crate::PostgresBackend::connect), except that it never
/// creates a store ([`StoreError::NotAStore`] for a database without one), and
/// [`StoreError::Commit`].
#[cfg(feature = "postgres")]
pub fn record_resends_postgres(
    url: &str,
    audits: &[ResendAudit],
    options: &crate::PostgresOptions,
) -> Result<(), StoreError> {
    use tokio_postgres::types::ToSql;
    let text = |t: &str| t.replace('\0', "\u{FFFD}"); // PostgreSQL text cannot hold NUL
    let ids: Vec<i64> = audits.iter().map(|a| a.message_id).collect();
    let at: Vec<i64> = audits
        .iter()
        .map(|a| system_time_to_us(a.resent_at))
        .collect();
    let users: Vec<String> = audits.iter().map(|a| text(&a.os_user)).collect();
    let targets: Vec<String> = audits.iter().map(|a| text(&a.target)).collect();
    let results: Vec<String> = audits.iter().map(|a| text(&a.result)).collect();
    let reasons: Vec<Option<String>> = audits
        .iter()
        .map(|a| a.reason.as_deref().map(text))
        .collect();
    let params: [&(dyn ToSql + Sync); 6] = [&ids, &at, &users, &targets, &results, &reasons];
    crate::PostgresBackend::connect_existing(url, options)?
        .write_locked(
            AUDIT_LOCK,
            CREATE_AUDIT_PG,
            INSERT_AUDIT_PG,
            &params,
            "resend audit",
        )
        .map(drop)
}

/// The audit trail in a PostgreSQL store, created by the first `resend` (prefixed like the
/// store's other tables; the columns of SQLite's `resend_audit`).
#[cfg(feature = "postgres")]
const CREATE_AUDIT_PG: &str = "
CREATE TABLE IF NOT EXISTS mllp_resend_audit (
    id           bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    message_id   bigint NOT NULL,
    resent_at_us bigint NOT NULL,
    os_user      text NOT NULL,
    target       text NOT NULL,
    result       text NOT NULL,
    reason       text
)";

#[cfg(feature = "postgres")]
const INSERT_AUDIT_PG: &str = "
INSERT INTO mllp_resend_audit (message_id, resent_at_us, os_user, target, result, reason)
SELECT * FROM unnest($1::int8[], $2::int8[], $3::text[], $4::text[], $5::text[], $6::text[])";

/// The second key of the advisory lock under which `resend` creates its table in a
/// PostgreSQL store (the first is the store's), so that two resends starting together do not
/// race on `CREATE TABLE IF NOT EXISTS`.
#[cfg(feature = "postgres")]
const AUDIT_LOCK: i32 = 3;
