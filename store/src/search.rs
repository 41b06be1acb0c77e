//! Finding messages: a [`SearchFilter`] (control id, sender, type, patient, time, delivery
//! status, ids) and [`search`], which answers it from the store's indexes, on SQLite
//! ([`search_sqlite`]) and PostgreSQL (`search_postgres`, feature `postgres`) alike: one
//! filter, rendered as SQL for either. `search` and `resend` share the filter.
//!
//! # What is indexed
//!
//! - **Control id** (MSH-10) and **patient** (PID-3.1, see
//!   [`Header::patient_id`](crate::Header::patient_id)) each lead an index, so a search by
//!   either is an index probe however large the store (BENCHMARKS.md: 10 million messages).
//!   The control id's is the duplicate lookup's index (`messages_by_control_id`, see
//!   [`crate::sqlite`]). On SQLite the patient's is kept off the commit path, in a file of
//!   its own beside the store that a follower thread fills ([`crate::search_index`]): a
//!   search by patient reads it for the messages it covers and scans the few committed
//!   since (the follower's lag) by their `patient_id` column, in one statement, and
//!   checks every match against the message row. Without a usable index file (none yet,
//!   being rebuilt, damaged) it scans: slower, same answer.
//! - Sender, type and time narrow those results, or else are checked on a scan that walks
//!   the store newest first and stops after `limit` matches: fine for "the last 20 ADT^A01
//!   from LAB", slow for a rare match in a large store (add a control id or patient).
//! - On PostgreSQL the same: `mllp_messages_control_id` (also the duplicate lookup's) and
//!   `mllp_messages_patient` (see `crate::postgresql`'s schema).
//! - PID-3.1 is extracted when the message is stored, raw (escape sequences are not decoded:
//!   `\T\` stays `\T\`), like the other header columns. Messages stored before the column
//!   existed have none.
//!
//! # Delivery status
//!
//! [`DeliveryStatus`] reads the forwarder's tables (`forward_cursor`, `forward_dead_letter`;
//! see [`retention`](crate::retention) for their contract). Without them, no message is
//! queued, delivered or dead: only `stored` matches.
//!
//! Searching works while `serve` writes: it opens its own read-only connection.

use std::fmt::Write as _;
use std::path::Path;

use rusqlite::OpenFlags;
use rusqlite::types::Value;

use crate::error::StoreError;
use crate::open::OpenOptions;
use crate::record::{StoreId, StoredRecord};
use crate::spec::StoreSpec;
use crate::sqlite::{RECORD_COLUMNS, SqliteOptions, open_connection, stored_record};

/// Default of [`SearchFilter::limit`]: 100 messages, a screenful in a terminal.
pub const DEFAULT_LIMIT: usize = 100;

/// Where a message stands with forwarding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryStatus {
    /// Any stored message.
    Stored,
    /// Not yet delivered to every destination (requeued dead letters included).
    Queued,
    /// Delivered to every destination.
    Delivered,
    /// Dead-lettered for some destination and not requeued.
    Dead,
}

impl std::str::FromStr for DeliveryStatus {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stored" => Ok(Self::Stored),
            "queued" => Ok(Self::Queued),
            "delivered" => Ok(Self::Delivered),
            "dead" => Ok(Self::Dead),
            _ => Err(format!(
                "{s:?} is not a status (stored, queued, delivered or dead)"
            )),
        }
    }
}

/// Which messages to find; every field set must match. Build one with the setters:
///
/// ```
/// use mllp_store::search::SearchFilter;
/// let f = SearchFilter::default().sender("LAB^HOSP").message_type("ADT^A01").limit(10);
/// assert_eq!(f.sending_application.as_deref(), Some("LAB"));
/// assert_eq!(f.sending_facility.as_deref(), Some("HOSP"));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SearchFilter {
    /// MSH-10, exactly.
    pub control_id: Option<String>,
    /// MSH-3, exactly (all components as stored).
    pub sending_application: Option<String>,
    /// MSH-4, exactly.
    pub sending_facility: Option<String>,
    /// MSH-9: `ADT^A01` matches `ADT^A01` and `ADT^A01^ADT_A01`.
    pub message_type: Option<String>,
    /// PID-3.1, exactly (raw, as stored).
    pub patient_id: Option<String>,
    /// Received at or after (µs since the epoch).
    pub since_us: Option<i64>,
    /// Received before (µs since the epoch).
    pub until_us: Option<i64>,
    /// Delivery status.
    pub status: Option<DeliveryStatus>,
    /// Only these ids (empty: any).
    pub ids: Vec<StoreId>,
    /// Most messages returned, newest first (0 means [`DEFAULT_LIMIT`]).
    pub limit: usize,
}

impl SearchFilter {
    /// MSH-10.
    pub fn control_id(mut self, id: impl Into<String>) -> Self {
        self.control_id = Some(id.into());
        self
    }

    /// `APP` or `APP^FAC`: MSH-3, and MSH-4 when given after a `^`.
    pub fn sender(mut self, sender: &str) -> Self {
        match sender.split_once('^') {
            Some((app, facility)) => {
                self.sending_application = Some(app.to_owned());
                self.sending_facility = Some(facility.to_owned());
            }
            None => self.sending_application = Some(sender.to_owned()),
        }
        self
    }

    /// MSH-9 (a prefix of whole components).
    pub fn message_type(mut self, message_type: impl Into<String>) -> Self {
        self.message_type = Some(message_type.into());
        self
    }

    /// PID-3.1.
    pub fn patient(mut self, id: impl Into<String>) -> Self {
        self.patient_id = Some(id.into());
        self
    }

    /// Received in `[since, until)` (µs since the epoch; either may be open).
    pub fn received(mut self, since_us: Option<i64>, until_us: Option<i64>) -> Self {
        self.since_us = since_us;
        self.until_us = until_us;
        self
    }

    /// Delivery status.
    pub fn status(mut self, status: DeliveryStatus) -> Self {
        self.status = Some(status);
        self
    }

    /// Only these ids.
    pub fn ids(mut self, ids: Vec<StoreId>) -> Self {
        self.ids = ids;
        self
    }

    /// Most messages returned.
    pub fn limit(mut self, limit: usize) -> Self {
        self.limit = limit;
        self
    }

    fn effective_limit(&self) -> i64 {
        let limit = if self.limit == 0 {
            DEFAULT_LIMIT
        } else {
            self.limit
        };
        i64::try_from(limit).unwrap_or(i64::MAX)
    }

    /// The query for this filter in `dialect`, and its parameters. `forwarding` says whether
    /// the forwarder's tables exist; `patient_index` where a patient's messages are found.
    /// One rendering for both backends: they differ only in the table's name, placeholders
    /// and boolean literals.
    pub(crate) fn render(
        &self,
        dialect: Dialect,
        forwarding: bool,
        patient_index: PatientIndex,
    ) -> (String, Vec<Param>) {
        let (table, mark, yes, no) = match dialect {
            Dialect::Sqlite => ("messages", '?', "1", "0"),
            Dialect::Postgres => ("mllp_messages", '$', "true", "false"),
        };
        let mut sql = format!("SELECT {RECORD_COLUMNS} FROM {table} WHERE {yes}");
        let mut params: Vec<Param> = Vec::new();
        let mut eq = |sql: &mut String, column: &str, value: &Option<String>| {
            if let Some(v) = value {
                params.push(Param::Text(v.clone()));
                let _ = write!(sql, " AND {column} = {mark}{}", params.len());
            }
        };
        eq(&mut sql, "control_id", &self.control_id);
        eq(&mut sql, "sending_application", &self.sending_application);
        eq(&mut sql, "sending_facility", &self.sending_facility);
        eq(&mut sql, "patient_id", &self.patient_id);
        if let (Some(_), PatientIndex::Attached { through }) = (&self.patient_id, patient_index) {
            // The patient's equality just rendered is parameter `p`: the index file's
            // entries up to `through`, and the messages after it by their column (the
            // follower's lag, a range of the primary key). The equality on the row itself
            // stays, so a stale entry matches nothing.
            let p = params.len();
            params.push(Param::Int(through));
            let _ = write!(
                sql,
                " AND id IN (SELECT id FROM search.patient_index WHERE patient_id = {mark}{p} \
                 UNION ALL SELECT id FROM {table} WHERE id > {mark}{t} AND patient_id = {mark}{p})",
                t = params.len()
            );
        }
        if let Some(t) = &self.message_type {
            params.push(Param::Text(t.clone()));
            let exact = params.len();
            // `^` followed by anything: a prefix of whole components (no LIKE wildcards, so
            // a type with `%` or `_` in it matches only itself and its longer forms).
            params.push(Param::Text(format!("{t}^")));
            let _ = write!(
                sql,
                " AND (message_type = {mark}{exact} \
                 OR substr(message_type, 1, length({mark}{p})) = {mark}{p})",
                p = params.len()
            );
        }
        if let Some(since) = self.since_us {
            params.push(Param::Int(since));
            let _ = write!(sql, " AND received_at_us >= {mark}{}", params.len());
        }
        if let Some(until) = self.until_us {
            params.push(Param::Int(until));
            let _ = write!(sql, " AND received_at_us < {mark}{}", params.len());
        }
        if !self.ids.is_empty() {
            sql.push_str(" AND id IN (");
            for (i, id) in self.ids.iter().enumerate() {
                params.push(Param::Int(*id));
                let _ = write!(
                    sql,
                    "{}{mark}{}",
                    if i == 0 { "" } else { "," },
                    params.len()
                );
            }
            sql.push(')');
        }
        const FLOOR: &str = "(SELECT coalesce(min(delivered_through), 0) FROM forward_cursor)";
        const DEAD: &str = "(SELECT message_id FROM forward_dead_letter WHERE status = 'dead')";
        const REQUEUED: &str =
            "(SELECT message_id FROM forward_dead_letter WHERE status = 'requeued')";
        match (self.status, forwarding) {
            (None | Some(DeliveryStatus::Stored), _) => {}
            (Some(_), false) => {
                let _ = write!(sql, " AND {no}");
            }
            (Some(DeliveryStatus::Queued), true) => {
                let _ = write!(
                    sql,
                    " AND ((id > {FLOOR} AND id NOT IN {DEAD}) OR id IN {REQUEUED})"
                );
            }
            (Some(DeliveryStatus::Delivered), true) => {
                let _ = write!(
                    sql,
                    " AND id <= {FLOOR} AND id NOT IN {DEAD} AND id NOT IN {REQUEUED}"
                );
            }
            (Some(DeliveryStatus::Dead), true) => {
                let _ = write!(sql, " AND id IN {DEAD}");
            }
        }
        params.push(Param::Int(self.effective_limit()));
        let _ = write!(sql, " ORDER BY id DESC LIMIT {mark}{}", params.len());
        (sql, params)
    }
}

/// The SQL dialect a [`SearchFilter`] is rendered in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dialect {
    Sqlite,
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    Postgres,
}

/// Where a rendered filter finds a patient's messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PatientIndex {
    /// By the `patient_id` column (PostgreSQL's index on it; on SQLite a scan).
    Column,
    /// SQLite: the index file attached as `search`, valid through this id
    /// ([`crate::search_index`]), and the column after it.
    Attached { through: StoreId },
}

/// A parameter of a rendered filter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Param {
    Text(String),
    Int(i64),
}

impl From<Param> for Value {
    fn from(param: Param) -> Self {
        match param {
            Param::Text(t) => Self::Text(t),
            Param::Int(i) => Self::Integer(i),
        }
    }
}

/// The messages of the store `spec` names that match `filter`, newest first: an SQLite file
/// ([`search_sqlite`]) or a PostgreSQL database (`search_postgres`, feature `postgres`).
///
/// # Errors
///
/// As [`search_sqlite`] and `search_postgres`; [`StoreError::Open`] with
/// [`Problem::NoPostgres`](crate::Problem::NoPostgres) for a URL in a build without the
/// feature `postgres`.
pub fn search(
    spec: &StoreSpec,
    filter: &SearchFilter,
    options: &OpenOptions,
) -> Result<Vec<StoredRecord>, StoreError> {
    match spec {
        StoreSpec::Sqlite(path) => search_sqlite(path, filter, &options.sqlite),
        #[cfg(feature = "postgres")]
        StoreSpec::Postgres(url) => search_postgres(url, filter, &options.postgres),
        #[cfg(not(feature = "postgres"))]
        StoreSpec::Postgres(_) => Err(crate::open::no_postgres(spec)),
    }
}

/// The messages of the PostgreSQL store at `url` that match `filter`, newest first, on a
/// read-only connection of its own (works while `serve` writes).
///
/// # Errors
///
/// As [`PostgresBackend::connect_read_only`](crate::PostgresBackend::connect_read_only);
/// [`StoreError::Read`] when the query fails (a search by patient in a store no writer of
/// this version has opened yet, included).
#[cfg(feature = "postgres")]
pub fn search_postgres(
    url: &str,
    filter: &SearchFilter,
    options: &crate::PostgresOptions,
) -> Result<Vec<StoredRecord>, StoreError> {
    use tokio_postgres::types::ToSql;
    let mut backend = crate::PostgresBackend::connect_read_only(url, options)?;
    let (sql, params) = filter.render(
        Dialect::Postgres,
        backend.has_forwarding()?,
        PatientIndex::Column,
    );
    let params: Vec<&(dyn ToSql + Sync)> = params
        .iter()
        .map(|p| match p {
            Param::Text(t) => t as &(dyn ToSql + Sync),
            Param::Int(i) => i as &(dyn ToSql + Sync),
        })
        .collect();
    backend.records(&sql, &params)
}

/// The messages of the SQLite store at `path` that match `filter`, newest first.
///
/// ```
/// use std::time::SystemTime;
/// use bytes::Bytes;
/// use mllp_store::search::{search_sqlite, SearchFilter};
/// use mllp_store::{Backend, Origin, Record, SqliteBackend, SqliteOptions};
///
/// let dir = std::env::temp_dir().join(format!("mllp-store-doc-search-{}", std::process::id()));
/// std::fs::create_dir_all(&dir)?;
/// let path = dir.join("store.db");
/// let origin = Origin { received_at: SystemTime::now(), peer: "10.0.0.7:4000".parse()?,
///     local: "10.0.0.1:2575".parse()?, connection_id: 1, sequence: 0 };
/// let msg = Bytes::from_static(b"MSH|^~\\&|LAB|HOSP|EHR|HOSP|||ADT^A01^ADT_A01|ACC123|P|2.5\rPID|1||MRN7^^^HOSP^MR\r");
/// SqliteBackend::open(&path, &SqliteOptions::default())?.commit_batch(&[Record::new(msg, origin)])?;
///
/// let by_patient = SearchFilter::default().patient("MRN7").message_type("ADT^A01");
/// let found = search_sqlite(&path, &by_patient, &SqliteOptions::default())?;
/// assert_eq!(found[0].control_id.as_deref(), Some("ACC123"));
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
///
/// As [`SqliteBackend::open_read_only`](crate::SqliteBackend::open_read_only);
/// [`StoreError::Read`] when the query fails (a store written before the patient column
/// existed, searched by patient before a writer opened it, included).
pub fn search_sqlite(
    path: &Path,
    filter: &SearchFilter,
    options: &SqliteOptions,
) -> Result<Vec<StoredRecord>, StoreError> {
    check_path_is_store(path, options)?;
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY
        | OpenFlags::SQLITE_OPEN_NO_MUTEX
        | OpenFlags::SQLITE_OPEN_URI;
    let conn = open_connection(path, flags, options, false, crate::sqlite::Role::Other)?;
    let through = match filter.patient_id {
        Some(_) => crate::search_index::attach_for_search(&conn, path),
        None => None,
    };
    if let Some(through) = through {
        let indexed = run_search(&conn, filter, PatientIndex::Attached { through });
        // A damaged index file must not fail the search: the column answers it too.
        if indexed.is_ok() {
            return indexed;
        }
        let _ = conn.execute_batch("DETACH DATABASE search");
    }
    run_search(&conn, filter, PatientIndex::Column)
}

/// The typed errors of a read-only open (missing file, not a store) before our own open.
fn check_path_is_store(path: &Path, options: &SqliteOptions) -> Result<(), StoreError> {
    drop(crate::SqliteBackend::open_read_only(path, options)?);
    Ok(())
}

/// Runs `filter` on `conn` (the store, read-only) with `patient_index`.
fn run_search(
    conn: &rusqlite::Connection,
    filter: &SearchFilter,
    patient_index: PatientIndex,
) -> Result<Vec<StoredRecord>, StoreError> {
    let run = || -> rusqlite::Result<Vec<StoredRecord>> {
        let forwarding = conn
            .query_row(
                "SELECT count(*) FROM sqlite_schema WHERE type = 'table' \
                 AND name IN ('forward_cursor', 'forward_dead_letter')",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n == 2)?;
        let (sql, params) = filter.render(Dialect::Sqlite, forwarding, patient_index);
        let mut stmt = conn.prepare(&sql)?;
        let params = params.into_iter().map(Value::from);
        let rows = stmt.query_map(rusqlite::params_from_iter(params), stored_record)?;
        rows.collect()
    };
    run().map_err(StoreError::read)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Backend;

    /// The query plan of `filter` on a store whose follower indexed one message.
    fn plan(filter: &SearchFilter) -> String {
        let dir = mllp_test_support::TempDir::new("search-plan");
        let path = dir.join("store.db");
        {
            let mut writer = crate::SqliteBackend::open(&path, &SqliteOptions::default()).unwrap();
            let origin = crate::Origin {
                received_at: std::time::SystemTime::now(),
                peer: "10.0.0.7:4000".parse().unwrap(),
                local: "10.0.0.1:2575".parse().unwrap(),
                connection_id: 1,
                sequence: 0,
            };
            let msg = bytes::Bytes::from_static(
                b"MSH|^~\\&|LAB|H|EHR|H|||ADT^A01|C1|P|2.5\rPID|1||MRN7^^^H^MR\r",
            );
            let id = writer
                .commit_batch(&[crate::Record::new(msg, origin)])
                .unwrap()[0]
                .id;
            let indexer = writer.search_index().unwrap();
            assert!(indexer.wait_for(id, std::time::Duration::from_secs(20)));
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI;
        let conn = rusqlite::Connection::open_with_flags(&path, flags).unwrap();
        let through = crate::search_index::attach_for_search(&conn, &path).unwrap();
        assert_eq!(through, 1);
        let (sql, params) =
            filter.render(Dialect::Sqlite, false, PatientIndex::Attached { through });
        let params = params.into_iter().map(Value::from);
        let plan: Vec<String> = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .unwrap()
            .query_map(rusqlite::params_from_iter(params), |r| {
                r.get::<_, String>(3)
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        plan.join("; ")
    }

    /// The two searches the issue times must be index probes, not scans: the patient's
    /// reads the index file and only the tail of the primary key after it.
    #[test]
    fn control_id_and_patient_searches_use_their_indexes() {
        let by_control = plan(&SearchFilter::default().control_id("ACC123").sender("LAB"));
        assert!(
            by_control.contains("INDEX messages_by_control_id"),
            "{by_control}"
        );
        let by_patient = plan(
            &SearchFilter::default()
                .patient("MRN7")
                .message_type("ADT^A01"),
        );
        assert!(
            by_patient.contains("SEARCH search.patient_index USING PRIMARY KEY (patient_id=?)"),
            "{by_patient}"
        );
        assert!(
            by_patient.contains("INTEGER PRIMARY KEY (rowid>?)"),
            "{by_patient}"
        );
        assert!(!by_patient.contains("SCAN messages"), "{by_patient}");
    }
}
