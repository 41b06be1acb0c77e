//! Delivery state in the SQLite store file: each lane thread has its own connection.
//!
//! The writer thread keeps its connection for the message inserts; lanes only read `messages`
//! and write the `forward_*` tables, each write a short `BEGIN IMMEDIATE` transaction. Lane
//! connections commit with `synchronous=NORMAL`: in WAL mode a commit then survives a crash
//! of the process (the SIGKILL test) but not necessarily a power loss, after which the last
//! cursor moves may be undone and those messages are delivered again (at least once still
//! holds; messages themselves are committed by the writer with `synchronous=FULL`). Syncing
//! every cursor move would cost one fsync per delivered message on the disk the writer syncs.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};

use crate::forward::state::{DeliveryState, Final, Letter, Page, Pending};
use crate::forward::status::{LaneStatus, Requeue};
use crate::forward::watch::WatchKey;
use crate::forward::{Destination, ForwardError, now_us};
use crate::{StoreId, WriteGate};

/// The forwarding tables. `forward_cursor` and `forward_dead_letter`'s first three columns are
/// the contract with retention (see the module docs of [`crate::forward`]).
pub(crate) const CREATE_TABLES: &str = "
CREATE TABLE IF NOT EXISTS forward_cursor (
    destination       TEXT NOT NULL,
    lane              INTEGER NOT NULL,
    delivered_through INTEGER NOT NULL,
    PRIMARY KEY (destination, lane)
);
CREATE TABLE IF NOT EXISTS forward_dead_letter (
    destination      TEXT NOT NULL,
    message_id       INTEGER NOT NULL,
    status           TEXT NOT NULL,
    lane             INTEGER NOT NULL DEFAULT 0,
    attempts         INTEGER NOT NULL DEFAULT 0,
    first_attempt_us INTEGER NOT NULL DEFAULT 0,
    last_attempt_us  INTEGER NOT NULL DEFAULT 0,
    reason           TEXT NOT NULL DEFAULT '',
    reply            BLOB,
    history          TEXT NOT NULL DEFAULT '',
    updated_at_us    INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (destination, message_id)
);
CREATE INDEX IF NOT EXISTS forward_dead_letter_status
    ON forward_dead_letter (destination, status, message_id);
CREATE TABLE IF NOT EXISTS forward_destination (
    destination      TEXT PRIMARY KEY,
    address          TEXT NOT NULL,
    lanes            INTEGER NOT NULL,
    lane_key         TEXT NOT NULL,
    configured_at_us INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS forward_lane_status (
    destination      TEXT NOT NULL,
    lane             INTEGER NOT NULL,
    last_error       TEXT,
    last_error_at_us INTEGER,
    PRIMARY KEY (destination, lane)
);
";

const READ_PAGE: &str = "SELECT id, received_at_us, payload, connection_id, sequence
    FROM messages WHERE id > ?1 ORDER BY id LIMIT ?2";

const ADVANCE: &str = "UPDATE forward_cursor SET delivered_through = ?3
    WHERE destination = ?1 AND lane = ?2 AND delivered_through < ?3";

const DEAD_LETTER: &str = "
INSERT INTO forward_dead_letter (destination, message_id, status, lane, attempts,
    first_attempt_us, last_attempt_us, reason, reply, history, updated_at_us)
VALUES (?1, ?2, 'dead', ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?6)
ON CONFLICT (destination, message_id) DO UPDATE SET
    status = 'dead', attempts = attempts + excluded.attempts,
    last_attempt_us = excluded.last_attempt_us, reason = excluded.reason,
    reply = excluded.reply, history = history || excluded.history,
    updated_at_us = excluded.updated_at_us";

const FINISH_REQUEUED: &str = "
UPDATE forward_dead_letter SET status = ?3, attempts = attempts + ?4, last_attempt_us = ?5,
    reason = ?6, reply = ?7, history = history || ?8, updated_at_us = ?5
WHERE destination = ?1 AND message_id = ?2";

const NEXT_REQUEUED: &str = "
SELECT d.message_id, m.received_at_us, m.payload
FROM forward_dead_letter d JOIN messages m ON m.id = d.message_id
WHERE d.destination = ?1 AND d.status = 'requeued' AND d.lane % ?2 = ?3
ORDER BY d.message_id LIMIT 1";

const LAST_ERROR: &str = "
INSERT INTO forward_lane_status (destination, lane, last_error, last_error_at_us)
VALUES (?1, ?2, ?3, ?4)
ON CONFLICT (destination, lane) DO UPDATE SET
    last_error = excluded.last_error, last_error_at_us = excluded.last_error_at_us";

/// One lane's (or the set-up's) connection to the store file.
#[derive(Debug)]
pub(crate) struct SqliteState {
    conn: Connection,
    /// The store writer's gate, held for each write transaction (see `ForwardConfig::gate`).
    gate: Option<WriteGate>,
}

impl SqliteState {
    /// Opens an existing store for forwarding. `writable`: lanes and requeue; status reads.
    pub(crate) fn open(
        path: &Path,
        busy_timeout: Duration,
        writable: bool,
        gate: Option<WriteGate>,
    ) -> Result<Self, ForwardError> {
        let flags = OpenFlags::SQLITE_OPEN_NO_MUTEX
            | if writable {
                OpenFlags::SQLITE_OPEN_READ_WRITE
            } else {
                OpenFlags::SQLITE_OPEN_READ_ONLY
            };
        let db = |e| ForwardError::database("open the store", e);
        let conn = Connection::open_with_flags(path, flags).map_err(db)?;
        conn.busy_timeout(busy_timeout).map_err(db)?;
        if writable {
            // See the module docs: crash-safe, and cheap next to the writer's synced commits.
            conn.pragma_update(None, "synchronous", "NORMAL")
                .map_err(db)?;
        }
        if writable && gate.is_some() {
            // In the server's process (it gave us its write gate) the store's checkpointer
            // copies the WAL (`crate::checkpoint`). SQLite's automatic checkpoint would
            // otherwise run inside this connection's commits whenever the WAL holds 1 000
            // pages, while the gate is held, and the store's writer would wait for a copy of
            // the WAL and a sync of the database file (the pruner had the same defect).
            conn.pragma_update(None, "wal_autocheckpoint", 0)
                .map_err(db)?;
        }
        let has_messages: bool = conn
            .query_row(
                "SELECT count(*) > 0 FROM sqlite_schema WHERE type = 'table' AND name = 'messages'",
                [],
                |r| r.get(0),
            )
            .map_err(db)?;
        if !has_messages {
            return Err(ForwardError::NotAStore {
                location: path.display().to_string(),
            });
        }
        Ok(Self { conn, gate })
    }
}

impl SqliteState {
    /// See [`DeliveryState::prepare`].
    fn prepare_tables(&mut self, destinations: &[Destination]) -> Result<(), ForwardError> {
        let db = |e| ForwardError::database("prepare the forwarding tables", e);
        let _turn = self.gate.as_ref().map(WriteGate::enter);
        self.conn.execute_batch(CREATE_TABLES).map_err(db)?;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        let last_id: StoreId = tx
            .query_row("SELECT coalesce(max(id), 0) FROM messages", [], |r| {
                r.get(0)
            })
            .map_err(db)?;
        for d in destinations {
            let known: Option<(u16, String)> = tx
                .query_row(
                    "SELECT lanes, lane_key FROM forward_destination WHERE destination = ?1",
                    [&d.name],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()
                .map_err(db)?;
            let lowest: Option<StoreId> = tx
                .query_row(
                    "SELECT min(delivered_through) FROM forward_cursor WHERE destination = ?1",
                    [&d.name],
                    |r| r.get(0),
                )
                .map_err(db)?;
            let start = match (&known, lowest) {
                // First configured: from now on (see the docs), unless rows were left.
                (None, None) => last_id,
                (_, Some(lowest)) => lowest,
                (Some(_), None) => 0,
            };
            let same = known
                .as_ref()
                .is_some_and(|(lanes, key)| *lanes == d.lanes && key == d.key.as_str());
            if !same {
                // Lanes or key changed: every message may now map to another lane, so all
                // lanes restart from the lowest cursor (duplicates possible, never a loss).
                tx.execute(
                    "DELETE FROM forward_cursor WHERE destination = ?1",
                    [&d.name],
                )
                .map_err(db)?;
            }
            for lane in 0..d.lanes {
                tx.execute(
                    "INSERT OR IGNORE INTO forward_cursor (destination, lane, delivered_through)
                     VALUES (?1, ?2, ?3)",
                    params![d.name, lane, start],
                )
                .map_err(db)?;
            }
            tx.execute(
                "INSERT INTO forward_destination (destination, address, lanes, lane_key, configured_at_us)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (destination) DO UPDATE SET address = excluded.address,
                     lanes = excluded.lanes, lane_key = excluded.lane_key",
                params![d.name, d.address, d.lanes, d.key.as_str(), now_us()],
            )
            .map_err(db)?;
        }
        tx.commit().map_err(db)
    }

    /// The cursor of one lane.
    fn cursor(&mut self, destination: &str, lane: u16) -> Result<StoreId, ForwardError> {
        self.conn
            .query_row(
                "SELECT delivered_through FROM forward_cursor WHERE destination = ?1 AND lane = ?2",
                params![destination, lane],
                |r| r.get(0),
            )
            .map_err(|e| ForwardError::database("read a cursor", e))
    }

    /// Whether the forwarding tables exist.
    fn has_tables(&self) -> Result<bool, ForwardError> {
        self.conn
            .query_row(
                "SELECT count(*) > 0 FROM sqlite_schema WHERE type = 'table' AND name = 'forward_cursor'",
                [],
                |r| r.get(0),
            )
            .map_err(|e| ForwardError::database("read the schema", e))
    }

    /// Every lane's state, for `forward status`.
    pub(crate) fn status(&mut self) -> Result<Vec<LaneStatus>, ForwardError> {
        if !self.has_tables()? {
            return Ok(Vec::new());
        }
        let db = |e| ForwardError::database("read the forwarding state", e);
        let tx = self.conn.transaction().map_err(db)?;
        let last_id: StoreId = tx
            .query_row("SELECT coalesce(max(id), 0) FROM messages", [], |r| {
                r.get(0)
            })
            .map_err(db)?;
        let mut stmt = tx
            .prepare(
                "SELECT c.destination, c.lane, c.delivered_through, d.address, d.lanes,
                    s.last_error, s.last_error_at_us,
                    (SELECT count(*) FROM forward_dead_letter l WHERE l.destination = c.destination
                        AND l.status = 'dead' AND l.lane % coalesce(d.lanes, 1) = c.lane),
                    (SELECT count(*) FROM forward_dead_letter l WHERE l.destination = c.destination
                        AND l.status = 'requeued' AND l.lane % coalesce(d.lanes, 1) = c.lane),
                    (SELECT received_at_us FROM messages m WHERE m.id > c.delivered_through
                        ORDER BY m.id LIMIT 1)
                 FROM forward_cursor c
                 LEFT JOIN forward_destination d ON d.destination = c.destination
                 LEFT JOIN forward_lane_status s ON s.destination = c.destination AND s.lane = c.lane
                 ORDER BY c.destination, c.lane",
            )
            .map_err(db)?;
        let rows = stmt
            .query_map([], |r| {
                let through: StoreId = r.get(2)?;
                Ok(LaneStatus {
                    destination: r.get(0)?,
                    lane: r.get(1)?,
                    delivered_through: through,
                    address: r.get(3)?,
                    lanes: r.get::<_, Option<u16>>(4)?.unwrap_or(1),
                    after_cursor: (last_id - through).max(0) as u64,
                    last_error: r.get(5)?,
                    last_error_at_us: r.get(6)?,
                    dead_letters: r.get::<_, i64>(7)? as u64,
                    requeued: r.get::<_, i64>(8)? as u64,
                    oldest_received_at_us: r.get(9)?,
                })
            })
            .map_err(db)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db)?;
        Ok(rows)
    }

    /// Marks dead letters as requeued; returns how many changed.
    pub(crate) fn requeue(
        &mut self,
        which: &Requeue,
        destination: Option<&str>,
    ) -> Result<u64, ForwardError> {
        if !self.has_tables()? {
            return Ok(0);
        }
        let db = |e| ForwardError::database("requeue dead letters", e);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        let now = now_us();
        let mut changed = 0u64;
        {
            let mut stmt = tx
                .prepare(
                    "UPDATE forward_dead_letter SET status = 'requeued', updated_at_us = ?1
                     WHERE status = 'dead' AND (?2 IS NULL OR destination = ?2)
                       AND (?3 IS NULL OR message_id = ?3)",
                )
                .map_err(db)?;
            match which {
                Requeue::AllDead => {
                    changed += stmt
                        .execute(params![now, destination, None::<StoreId>])
                        .map_err(db)? as u64;
                }
                Requeue::Ids(ids) => {
                    for id in ids {
                        changed += stmt.execute(params![now, destination, id]).map_err(db)? as u64;
                    }
                }
            }
        }
        tx.commit().map_err(db)?;
        Ok(changed)
    }

    fn write(
        &mut self,
        action: &'static str,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<()>,
    ) -> Result<(), ForwardError> {
        let _turn = self.gate.as_ref().map(WriteGate::enter);
        let result = (|| {
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)?;
            f(&tx)?;
            tx.commit()
        })();
        result.map_err(|e| ForwardError::database(action, e))
    }
}

impl DeliveryState for SqliteState {
    fn prepare(&mut self, destinations: &[Destination]) -> Result<(), ForwardError> {
        self.prepare_tables(destinations)
    }

    fn acquire(&mut self, destination: &str, lane: u16) -> Result<Option<StoreId>, ForwardError> {
        self.cursor(destination, lane).map(Some)
    }

    fn read_page(
        &mut self,
        after: StoreId,
        max_records: usize,
        max_bytes: usize,
        keep: &dyn Fn(&[u8]) -> bool,
    ) -> Result<Page, ForwardError> {
        let db = |e| ForwardError::database("read the backlog", e);
        let limit = i64::try_from(max_records).unwrap_or(i64::MAX);
        // One read transaction for both statements, short: it never holds back checkpoints.
        let tx = self.conn.transaction().map_err(db)?;
        let last_id: StoreId = tx
            .query_row("SELECT coalesce(max(id), 0) FROM messages", [], |r| {
                r.get(0)
            })
            .map_err(db)?;
        let mut page = Page {
            messages: Vec::new(),
            scanned_through: after,
            last_id,
        };
        {
            let mut stmt = tx.prepare_cached(READ_PAGE).map_err(db)?;
            let mut rows = stmt.query(params![after, limit]).map_err(db)?;
            let mut bytes = 0usize;
            while let Some(row) = rows.next().map_err(db)? {
                let id: StoreId = row.get(0).map_err(db)?;
                page.scanned_through = id;
                let payload = row
                    .get_ref(2)
                    .map_err(db)?
                    .as_blob()
                    .map_err(|e| ForwardError::database("read the backlog", e))?;
                if !keep(payload) {
                    continue;
                }
                bytes = bytes.saturating_add(payload.len());
                let received_at_us = row.get(1).map_err(db)?;
                page.messages.push(Pending {
                    id,
                    received_at_us,
                    payload: payload.to_vec(),
                    key: Some(WatchKey::from_columns(
                        row.get(3).map_err(db)?,
                        row.get(4).map_err(db)?,
                        received_at_us,
                    )),
                });
                if bytes >= max_bytes {
                    break;
                }
            }
        }
        tx.commit().map_err(db)?;
        Ok(page)
    }

    fn try_advance(
        &mut self,
        destination: &str,
        lane: u16,
        through: StoreId,
    ) -> Result<bool, ForwardError> {
        let Some(gate) = self.gate.clone() else {
            return self.advance(destination, lane, through).map(|()| true);
        };
        let Some(_turn) = gate.try_enter() else {
            return Ok(false);
        };
        let result = (|| {
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.prepare_cached(ADVANCE)?
                .execute(params![destination, lane, through])?;
            tx.commit()
        })();
        result
            .map(|()| true)
            .map_err(|e| ForwardError::database("move a cursor", e))
    }

    fn advance(
        &mut self,
        destination: &str,
        lane: u16,
        through: StoreId,
    ) -> Result<(), ForwardError> {
        self.write("move a cursor", |tx| {
            tx.prepare_cached(ADVANCE)?
                .execute(params![destination, lane, through])
                .map(drop)
        })
    }

    fn dead_letter(
        &mut self,
        destination: &str,
        lane: u16,
        id: StoreId,
        letter: &Letter<'_>,
        advance: bool,
    ) -> Result<(), ForwardError> {
        self.write("write a dead letter", |tx| {
            tx.prepare_cached(DEAD_LETTER)?.execute(params![
                destination,
                id,
                lane,
                letter.attempts,
                letter.first_attempt_us,
                letter.last_attempt_us,
                letter.reason,
                letter.reply,
                letter.history,
            ])?;
            if advance {
                tx.prepare_cached(ADVANCE)?
                    .execute(params![destination, lane, id])?;
            }
            Ok(())
        })
    }

    fn next_requeued(
        &mut self,
        destination: &str,
        lane: u16,
        lanes: u16,
    ) -> Result<Option<Pending>, ForwardError> {
        self.conn
            .prepare_cached(NEXT_REQUEUED)
            .and_then(|mut stmt| {
                stmt.query_row(params![destination, lanes.max(1), lane], |r| {
                    Ok(Pending {
                        id: r.get(0)?,
                        received_at_us: r.get(1)?,
                        payload: r.get(2)?,
                        key: None,
                    })
                })
                .optional()
            })
            .map_err(|e| ForwardError::database("read requeued messages", e))
    }

    fn finish_requeued(
        &mut self,
        destination: &str,
        id: StoreId,
        end: Final,
        letter: &Letter<'_>,
    ) -> Result<(), ForwardError> {
        let status = match end {
            Final::Delivered => "delivered",
            Final::Dead => "dead",
        };
        self.write("finish a requeued message", |tx| {
            tx.prepare_cached(FINISH_REQUEUED)?
                .execute(params![
                    destination,
                    id,
                    status,
                    letter.attempts,
                    letter.last_attempt_us,
                    letter.reason,
                    letter.reply,
                    letter.history,
                ])
                .map(drop)
        })
    }

    fn last_error(
        &mut self,
        destination: &str,
        lane: u16,
        error: &str,
        at_us: i64,
    ) -> Result<(), ForwardError> {
        self.write("record the last error", |tx| {
            tx.prepare_cached(LAST_ERROR)?
                .execute(params![destination, lane, error, at_us])
                .map(drop)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{SqliteBackend, SqliteOptions};

    /// A lane that shares the server's write gate never checkpoints inside its own commits
    /// (the store's checkpointer does); one on its own (the CLI's `forward requeue`) keeps
    /// SQLite's automatic checkpoint.
    #[test]
    fn a_lane_beside_the_store_writer_leaves_checkpoints_to_the_checkpointer() {
        let dir = std::env::temp_dir().join(format!("mllp-forward-ckpt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("store.db");
        let backend = SqliteBackend::open(&path, &SqliteOptions::default()).unwrap();
        let autocheckpoint = |state: &SqliteState| -> i64 {
            state
                .conn
                .pragma_query_value(None, "wal_autocheckpoint", |r| r.get(0))
                .unwrap()
        };
        let beside = SqliteState::open(
            &path,
            Duration::from_secs(1),
            true,
            Some(backend.write_gate()),
        )
        .unwrap();
        let alone = SqliteState::open(&path, Duration::from_secs(1), true, None).unwrap();
        assert_eq!(autocheckpoint(&beside), 0);
        assert!(autocheckpoint(&alone) > 0);
        drop((beside, alone, backend));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
