//! What the operator's commands need from a PostgreSQL store besides storing: records by a
//! query ([`crate::search`]), a write under the store's lock ([`crate::resend`]'s audit), and
//! the checks that apply ([`crate::integrity`]). The SQL of each command lives with the
//! command; this module only runs it on the backend's connection (so that it depends on none
//! of them).

use tokio_postgres::types::ToSql;

use super::PostgresBackend;
use super::describe::show;
use super::sql::LOCK_KEY;
use crate::error::{Cause, StoreError};
use crate::record::StoredRecord;

/// Whether the forwarder's tables exist (search by delivery status reads them).
const HAS_FORWARDING: &str = "SELECT to_regclass('forward_cursor') IS NOT NULL \
     AND to_regclass('forward_dead_letter') IS NOT NULL";

/// What [`PostgresBackend::check`] found.
#[derive(Debug, Default)]
pub(crate) struct PgCheck {
    /// Settings under which an AA can be lost (`fsync=off`, `synchronous_commit=off`).
    pub(crate) unsafe_settings: Vec<String>,
    /// What `amcheck` reported.
    pub(crate) damage: Vec<String>,
    /// Whether the database has the `amcheck` extension.
    pub(crate) amcheck: bool,
}

impl PostgresBackend {
    /// Whether the forwarder's tables exist.
    pub(crate) fn has_forwarding(&mut self) -> Result<bool, StoreError> {
        let conn = self.connection().map_err(StoreError::read)?;
        let result =
            conn.block_on(async { conn.client.query_one(HAS_FORWARDING, &[]).await?.try_get(0) });
        result.map_err(|e| self.read_error(e))
    }

    /// The records a query of the record columns returns (a search's).
    pub(crate) fn records(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<StoredRecord>, StoreError> {
        let conn = self.connection().map_err(StoreError::read)?;
        let result = conn.block_on(async {
            let rows = conn.client.query(sql, params).await?;
            rows.iter()
                .map(super::stored_record)
                .collect::<Result<Vec<_>, tokio_postgres::Error>>()
        });
        result.map_err(|e| self.read_error(e))
    }

    /// Runs `setup` (statements without parameters, e.g. `CREATE TABLE IF NOT EXISTS`) and
    /// then `sql` in one transaction under the advisory lock `(LOCK_KEY.0, lock)`, so that
    /// two tools doing the same set-up at once take turns. `context` names the work in the
    /// error.
    pub(crate) fn write_locked(
        &mut self,
        lock: i32,
        setup: &str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        context: &'static str,
    ) -> Result<u64, StoreError> {
        let conn = self.connection().map_err(StoreError::commit)?;
        let begin = format!(
            "BEGIN; SELECT pg_advisory_xact_lock({}, {lock}); {setup}",
            LOCK_KEY.0
        );
        let result = conn.block_on(async {
            conn.client.batch_execute(&begin).await?;
            let n = conn.client.execute(sql, params).await?;
            conn.client.batch_execute("COMMIT").await?;
            Ok::<_, tokio_postgres::Error>(n)
        });
        result.map_err(|e| {
            // The session may be inside the failed transaction: start afresh next time.
            self.conn = None;
            StoreError::commit(Cause::postgres(e).context(context))
        })
    }

    /// The durability settings, and with `amcheck`, what `verify_heapam` and
    /// `bt_index_check` find in the store's tables and indexes (at most `limit` problems).
    pub(crate) fn check(&mut self, amcheck: bool, limit: usize) -> Result<PgCheck, StoreError> {
        let conn = self.connection().map_err(StoreError::read)?;
        let result = conn.block_on(async {
            let mut found = PgCheck::default();
            if show(&conn.client, "fsync").await? == "off" {
                found.unsafe_settings.push(
                    "fsync=off: a crash of the database server can lose acknowledged messages"
                        .to_owned(),
                );
            }
            if show(&conn.client, "synchronous_commit").await? == "off" {
                found.unsafe_settings.push(
                    "synchronous_commit=off: COMMIT returns before the WAL is flushed, so an \
                     AA can be lost"
                        .to_owned(),
                );
            }
            found.amcheck = conn
                .client
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'amcheck')",
                    &[],
                )
                .await?
                .try_get(0)?;
            if amcheck && found.amcheck {
                found.damage = amcheck_store(&conn.client, limit).await?;
            }
            Ok::<_, tokio_postgres::Error>(found)
        });
        result.map_err(|e| self.read_error(e))
    }
}

/// `verify_heapam` on the store's tables and `bt_index_check` (with `heapallindexed`) on
/// their B-tree indexes: every problem found, at most `limit`. `amcheck` reports damage as
/// rows (heap) or as an error (index); both become problems.
async fn amcheck_store(
    client: &tokio_postgres::Client,
    limit: usize,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let tables = ["mllp_messages", "mllp_store_schema"];
    let max = i64::try_from(limit).unwrap_or(i64::MAX);
    let mut problems = Vec::new();
    for table in tables {
        let rows = client
            .query(
                "SELECT blkno, offnum, msg FROM verify_heapam($1::text::regclass) LIMIT $2",
                &[&table, &max],
            )
            .await;
        match rows {
            Ok(rows) => {
                for row in rows {
                    let block: i64 = row.try_get(0)?;
                    let offset: Option<i32> = row.try_get(1)?;
                    let msg: String = row.try_get(2)?;
                    problems.push(format!(
                        "{table}: block {block}{}: {msg}",
                        offset.map(|o| format!(" item {o}")).unwrap_or_default()
                    ));
                }
            }
            Err(e) if e.as_db_error().is_some() => problems.push(format!("{table}: {e}")),
            Err(e) => return Err(e),
        }
    }
    let indexes = client
        .query(
            "SELECT c.relname::text FROM pg_catalog.pg_index i \
             JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid \
             JOIN pg_catalog.pg_class t ON t.oid = i.indrelid \
             JOIN pg_catalog.pg_am a ON a.oid = c.relam \
             WHERE t.relname = ANY($1) AND a.amname = 'btree' \
               AND t.relnamespace = (SELECT oid FROM pg_catalog.pg_namespace \
                                     WHERE nspname = current_schema()) \
             ORDER BY 1",
            &[&tables.as_slice()],
        )
        .await?;
    for row in indexes {
        let index: String = row.try_get(0)?;
        let checked = client
            .execute("SELECT bt_index_check($1::text::regclass, true)", &[&index])
            .await;
        match checked {
            Ok(_) => {}
            Err(e) if e.as_db_error().is_some() => {
                let detail = e.as_db_error().map(|d| d.message().to_owned());
                problems.push(format!("index {index}: {}", detail.unwrap_or_default()));
            }
            Err(e) => return Err(e),
        }
    }
    problems.truncate(limit);
    Ok(problems)
}
