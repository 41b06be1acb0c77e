//! Retention on a PostgreSQL store ([`crate::retention`]): the pruner's connection, deleting in
//! small batches, and what "size" means for a table that reuses its space.
//!
//! - **Batched `DELETE`**, each batch one short transaction with `synchronous_commit = off`
//!   (`SET LOCAL`): a delete lost in a crash of the database server only brings expired rows
//!   back for the next pass, so waiting for its WAL flush would cost the writers' commits
//!   (which share that flush) for nothing. It never takes the store's advisory lock: writers
//!   insert new rows, the pruner deletes old ones, and the two never touch the same row.
//! - **Space is reused, not returned.** A deleted row's space becomes free once `VACUUM` has
//!   passed; inserts then fill it, so the table stops growing. After a pass that deleted
//!   something the pruner runs `VACUUM (TRUNCATE false) mllp_messages` itself rather than
//!   wait for autovacuum (whose default trigger, 20 % dead rows, a daily prune of a 30-day
//!   store never reaches): it takes no lock that blocks inserts, and reads only the pages
//!   changed since the last vacuum (the visibility map). `TRUNCATE false` because giving the
//!   empty end of the table back needs an exclusive lock, and the end is where inserts go.
//!   The table's size on disk therefore never shrinks (`VACUUM FULL` would, by rewriting
//!   the table under an exclusive lock: a maintenance window's job).
//! - **Size.** [`StoreUsage::file_bytes`] is `pg_total_relation_size('mllp_messages')`
//!   (table, TOAST and indexes). That size does not go down when rows are deleted, so a size
//!   cap cannot be measured against it: it is measured against an estimate of the data,
//!   [`StoreUsage::used_bytes`] = rows × (mean payload of the newest 1 000 + a row's overhead),
//!   rows = the id span (`max(id) - min(id) + 1`, two index probes; ids are dense but for
//!   failed batches and protected messages), at most `file_bytes`.

use std::collections::HashSet;
use std::time::Duration;

use tokio_postgres::error::SqlState;

use super::PostgresBackend;
use crate::error::{Cause, StoreError};
use crate::prune_target::{Candidate, Candidates, PruneTarget, ROW_OVERHEAD, StoreUsage};
use crate::record::StoreId;

const CANDIDATES: &str =
    "SELECT id, received_at_us, size FROM mllp_messages WHERE id > $1 ORDER BY id LIMIT $2";

const FORWARD_TABLES: &str = "SELECT to_regclass('forward_cursor') IS NOT NULL, \
     to_regclass('forward_dead_letter') IS NOT NULL";

const DEAD_LETTERS: &str = "SELECT message_id::int8 FROM forward_dead_letter \
     WHERE status <> 'delivered' AND message_id BETWEEN $1::int8 AND $2::int8";

/// One query: total size, the oldest message's time, the id span, the newest rows' mean size.
const USAGE: &str = "SELECT pg_total_relation_size('mllp_messages'), \
     (SELECT received_at_us FROM mllp_messages ORDER BY id LIMIT 1), \
     (SELECT coalesce(max(id) - min(id) + 1, 0) FROM mllp_messages), \
     (SELECT coalesce(avg(size), 0)::int8 FROM \
        (SELECT size FROM mllp_messages ORDER BY id DESC LIMIT 1000) newest)";

/// A PostgreSQL store's connection that prunes.
pub(crate) struct PgTarget {
    backend: PostgresBackend,
    /// Rows were deleted since the last `VACUUM`.
    vacuum_due: bool,
}

impl PgTarget {
    /// Connects a writer session to an existing store (never creates one).
    pub(crate) fn connect(url: &str, options: &super::PostgresOptions) -> Result<Self, StoreError> {
        Ok(Self {
            backend: PostgresBackend::connect_existing(url, options)?,
            vacuum_due: false,
        })
    }
}

impl PruneTarget for PgTarget {
    fn candidates(&mut self, after: StoreId, limit: i64) -> Result<Candidates, StoreError> {
        let conn = self.backend.connection().map_err(StoreError::read)?;
        let result = conn.block_on(async {
            let client = &conn.client;
            let tables = client.query_one(FORWARD_TABLES, &[]).await?;
            let (has_cursor, has_dead): (bool, bool) = (tables.try_get(0)?, tables.try_get(1)?);
            // One snapshot for the floor and the dead letters: a message dead-lettered while
            // we look is either below the floor and in the set, or above the floor.
            client
                .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .await?;
            let rows: Vec<Candidate> = client
                .query(CANDIDATES, &[&after, &limit])
                .await?
                .iter()
                .map(|r| {
                    Ok(Candidate {
                        id: r.try_get(0)?,
                        received_at_us: r.try_get(1)?,
                        size: r.try_get(2)?,
                    })
                })
                .collect::<Result<_, tokio_postgres::Error>>()?;
            let floor = if has_cursor {
                client
                    .query_one(
                        "SELECT min(delivered_through)::int8 FROM forward_cursor",
                        &[],
                    )
                    .await?
                    .try_get(0)?
            } else {
                None
            };
            let mut dead = HashSet::new();
            if let (true, Some(first), Some(last)) = (has_dead, rows.first(), rows.last()) {
                for row in client.query(DEAD_LETTERS, &[&first.id, &last.id]).await? {
                    dead.insert(row.try_get(0)?);
                }
            }
            client.batch_execute("COMMIT").await?;
            Ok(Candidates { rows, floor, dead })
        });
        result.map_err(|e| self.fail(e))
    }

    fn delete(&mut self, ids: &[StoreId]) -> Result<(), StoreError> {
        let conn = self.backend.connection().map_err(StoreError::commit)?;
        let result = conn.block_on(async {
            let client = &conn.client;
            client
                .batch_execute("BEGIN; SET LOCAL synchronous_commit = off")
                .await?;
            client
                .execute("DELETE FROM mllp_messages WHERE id = ANY($1)", &[&ids])
                .await?;
            client.batch_execute("COMMIT").await
        });
        match result {
            Ok(()) => {
                self.vacuum_due = true;
                Ok(())
            }
            Err(e) => Err(StoreError::commit(
                Cause::from(self.fail(e)).context("prune"),
            )),
        }
    }

    /// Makes the deleted rows' space reusable now (see the module docs); gives nothing back
    /// to the file system.
    fn release(&mut self, _pause: Duration, stopped: &dyn Fn() -> bool) -> Result<u64, StoreError> {
        if !self.vacuum_due || stopped() {
            return Ok(0);
        }
        let conn = self.backend.connection().map_err(StoreError::commit)?;
        let result = conn.block_on(
            conn.client
                .batch_execute("VACUUM (TRUNCATE false) mllp_messages"),
        );
        match result {
            Ok(()) => {}
            // Not the table's owner: autovacuum will do it, later.
            Err(e) if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => {}
            Err(e) => {
                return Err(StoreError::commit(
                    Cause::from(self.fail(e)).context("prune"),
                ));
            }
        }
        self.vacuum_due = false;
        Ok(0)
    }

    fn usage(&mut self) -> Result<StoreUsage, StoreError> {
        let conn = self.backend.connection().map_err(StoreError::read)?;
        let row = conn.block_on(conn.client.query_one(USAGE, &[]));
        let read = |row: tokio_postgres::Row| -> Result<StoreUsage, tokio_postgres::Error> {
            let total = row.try_get::<_, i64>(0)?.max(0) as u64;
            let rows = row.try_get::<_, i64>(2)?.max(0) as u64;
            let mean = row.try_get::<_, i64>(3)?.max(0) as u64;
            let used = rows.saturating_mul(mean + ROW_OVERHEAD as u64).min(total);
            Ok(StoreUsage {
                file_bytes: total,
                used_bytes: used,
                free_bytes: total - used,
                oldest_received_us: row.try_get(1)?,
            })
        };
        row.and_then(read).map_err(|e| self.fail(e))
    }
}

impl PgTarget {
    /// A failed query: the session may be inside a transaction, or gone; either way the next
    /// call starts on a fresh connection.
    fn fail(&mut self, e: tokio_postgres::Error) -> StoreError {
        let error = self.backend.read_error(e);
        self.backend.conn = None;
        error
    }
}
