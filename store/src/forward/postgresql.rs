//! Delivery state in a PostgreSQL store: one connection per lane, and a session advisory lock
//! per (destination, lane) so that exactly one node delivers a lane at a time.
//!
//! The tables are those of the SQLite store ([`super::sqlite::CREATE_TABLES`]) with
//! PostgreSQL types; messages are read from `mllp_messages`. A lane takes
//! `pg_try_advisory_lock(key)`, with the one-bigint key form (its key space is separate from
//! the two-key form the store's writers use), `key` a hash of `mllp-forward`, the destination
//! and the lane. The lock lives as long as the lane's session: when the delivering node dies,
//! its connections close and PostgreSQL releases the lock at once; the other nodes' lanes try
//! every [`ForwardConfig::lock_retry`](super::ForwardConfig::lock_retry) (1 s) and the first
//! one to get it re-reads the cursor and goes on. If the node's machine vanishes without
//! closing its connections, PostgreSQL notices through TCP keepalives (set the server's
//! `tcp_keepalives_idle`, `_interval` and `_count`, e.g. 10 s, 5 s, 3 → 25 s) and the
//! takeover follows then.

use std::str::FromStr;

use tokio::runtime::Runtime;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Config, NoTls};

use crate::StoreId;
use crate::forward::state::{DeliveryState, Final, Letter, Page, Pending};
use crate::forward::status::{LaneStatus, Requeue};
use crate::forward::watch::WatchKey;
use crate::forward::{Destination, ForwardError, now_us};
use crate::postgresql::PostgresOptions;

const CREATE_TABLES: &str = "
CREATE TABLE IF NOT EXISTS forward_cursor (
    destination       text NOT NULL,
    lane              integer NOT NULL,
    delivered_through bigint NOT NULL,
    PRIMARY KEY (destination, lane)
);
CREATE TABLE IF NOT EXISTS forward_dead_letter (
    destination      text NOT NULL,
    message_id       bigint NOT NULL,
    status           text NOT NULL,
    lane             integer NOT NULL DEFAULT 0,
    attempts         integer NOT NULL DEFAULT 0,
    first_attempt_us bigint NOT NULL DEFAULT 0,
    last_attempt_us  bigint NOT NULL DEFAULT 0,
    reason           text NOT NULL DEFAULT '',
    reply            bytea,
    history          text NOT NULL DEFAULT '',
    updated_at_us    bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (destination, message_id)
);
CREATE INDEX IF NOT EXISTS forward_dead_letter_status
    ON forward_dead_letter (destination, status, message_id);
CREATE TABLE IF NOT EXISTS forward_destination (
    destination      text PRIMARY KEY,
    address          text NOT NULL,
    lanes            integer NOT NULL,
    lane_key         text NOT NULL,
    configured_at_us bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS forward_lane_status (
    destination      text NOT NULL,
    lane             integer NOT NULL,
    last_error       text,
    last_error_at_us bigint,
    PRIMARY KEY (destination, lane)
);
";

/// The transaction-level advisory lock (two-key form) that serialises the set-up of the
/// tables across nodes starting together.
const SETUP_LOCK: &str = "SELECT pg_advisory_xact_lock(1296256080, 2)";

/// One lane's connection.
pub(crate) struct PgState {
    config: Config,
    conn: Option<(Client, Runtime)>,
}

impl std::fmt::Debug for PgState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgState")
            .field("connected", &self.conn.is_some())
            .finish_non_exhaustive()
    }
}

/// A PostgreSQL error as the source of a [`ForwardError`], with the server's message.
#[derive(Debug)]
struct PgError(String);

impl std::fmt::Display for PgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PgError {}

fn pg(action: &'static str) -> impl Fn(tokio_postgres::Error) -> ForwardError {
    move |e| {
        let text = match e.as_db_error() {
            Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
            None => {
                let mut text = e.to_string();
                let mut source = std::error::Error::source(&e);
                while let Some(cause) = source {
                    text.push_str(": ");
                    text.push_str(&cause.to_string());
                    source = cause.source();
                }
                text
            }
        };
        ForwardError::database(action, PgError(text))
    }
}

/// The lock key of a lane: FNV-1a of `mllp-forward/DESTINATION/LANE`.
fn lock_key(destination: &str, lane: u16) -> i64 {
    format!("mllp-forward/{destination}/{lane}")
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        }) as i64
}

impl PgState {
    /// A state that connects on first use (so a lane started while the database is down
    /// keeps retrying).
    pub(crate) fn open(url: &str, options: &PostgresOptions) -> Result<Self, ForwardError> {
        let mut config = Config::from_str(url).map_err(pg("parse the PostgreSQL URL"))?;
        if config.get_password().is_none()
            && let Some(password) = &options.password
        {
            config.password(password);
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(options.connect_timeout);
        }
        config.application_name("mllp-reactor forward");
        Ok(Self { config, conn: None })
    }

    /// Runs `f` with a live connection, connecting first if needed; forgets the connection
    /// after an error that closed it.
    fn with<T>(
        &mut self,
        action: &'static str,
        f: impl AsyncFnOnce(&Client) -> Result<T, tokio_postgres::Error>,
    ) -> Result<T, ForwardError> {
        if self.conn.is_none() {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| ForwardError::database("start a runtime", e))?;
            let (client, connection) = runtime
                .block_on(self.config.connect(NoTls))
                .map_err(pg("connect to PostgreSQL"))?;
            runtime.spawn(async move {
                let _ = connection.await;
            });
            self.conn = Some((client, runtime));
        }
        let (client, runtime) = self.conn.as_ref().expect("connected above");
        let result = runtime.block_on(f(client));
        if let Err(e) = &result
            && (e.is_closed() || e.as_db_error().is_none() || client.is_closed())
        {
            self.conn = None;
        }
        result.map_err(pg(action))
    }

    /// Every lane's state, for `forward status`.
    pub(crate) fn status(&mut self) -> Result<Vec<LaneStatus>, ForwardError> {
        self.with("read the forwarding state", async |c| {
            let exists: bool = c
                .query_one("SELECT to_regclass('forward_cursor') IS NOT NULL", &[])
                .await?
                .get(0);
            if !exists {
                return Ok(Vec::new());
            }
            let last_id: i64 = c
                .query_one("SELECT coalesce(max(id), 0) FROM mllp_messages", &[])
                .await?
                .get(0);
            let rows = c
                .query(
                    "SELECT c.destination, c.lane, c.delivered_through, d.address, d.lanes,
                        s.last_error, s.last_error_at_us,
                        (SELECT count(*) FROM forward_dead_letter l WHERE l.destination = c.destination
                            AND l.status = 'dead' AND l.lane % coalesce(d.lanes, 1) = c.lane),
                        (SELECT count(*) FROM forward_dead_letter l WHERE l.destination = c.destination
                            AND l.status = 'requeued' AND l.lane % coalesce(d.lanes, 1) = c.lane),
                        (SELECT received_at_us FROM mllp_messages m WHERE m.id > c.delivered_through
                            ORDER BY m.id LIMIT 1)
                     FROM forward_cursor c
                     LEFT JOIN forward_destination d ON d.destination = c.destination
                     LEFT JOIN forward_lane_status s
                        ON s.destination = c.destination AND s.lane = c.lane
                     ORDER BY c.destination, c.lane",
                    &[],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| {
                    let through: i64 = r.get(2);
                    LaneStatus {
                        destination: r.get(0),
                        lane: r.get::<_, i32>(1) as u16,
                        delivered_through: through,
                        address: r.get(3),
                        lanes: r.get::<_, Option<i32>>(4).unwrap_or(1) as u16,
                        after_cursor: (last_id - through).max(0) as u64,
                        last_error: r.get(5),
                        last_error_at_us: r.get(6),
                        dead_letters: r.get::<_, i64>(7) as u64,
                        requeued: r.get::<_, i64>(8) as u64,
                        oldest_received_at_us: r.get(9),
                    }
                })
                .collect())
        })
    }

    /// Marks dead letters as requeued; returns how many changed.
    pub(crate) fn requeue(
        &mut self,
        which: &Requeue,
        destination: Option<&str>,
    ) -> Result<u64, ForwardError> {
        let ids: Option<Vec<i64>> = match which {
            Requeue::AllDead => None,
            Requeue::Ids(ids) => Some(ids.clone()),
        };
        let destination = destination.map(str::to_owned);
        self.with("requeue dead letters", async move |c| {
            let exists: bool = c
                .query_one("SELECT to_regclass('forward_dead_letter') IS NOT NULL", &[])
                .await?
                .get(0);
            if !exists {
                return Ok(0);
            }
            c.execute(
                "UPDATE forward_dead_letter SET status = 'requeued', updated_at_us = $1
                 WHERE status = 'dead' AND ($2::text IS NULL OR destination = $2)
                   AND ($3::bigint[] IS NULL OR message_id = ANY($3))",
                &[&now_us(), &destination, &ids],
            )
            .await
        })
    }
}

impl DeliveryState for PgState {
    fn prepare(&mut self, destinations: &[Destination]) -> Result<(), ForwardError> {
        let now = now_us();
        self.with("prepare the forwarding tables", async |c| {
            c.batch_execute("BEGIN").await?;
            c.execute(SETUP_LOCK, &[]).await?;
            c.batch_execute(CREATE_TABLES).await?;
            let last_id: i64 = c
                .query_one("SELECT coalesce(max(id), 0) FROM mllp_messages", &[])
                .await?
                .get(0);
            for d in destinations {
                let lanes = i32::from(d.lanes);
                let known = c
                    .query_opt(
                        "SELECT lanes, lane_key FROM forward_destination WHERE destination = $1",
                        &[&d.name],
                    )
                    .await?
                    .map(|r| (r.get::<_, i32>(0), r.get::<_, String>(1)));
                let lowest: Option<i64> = c
                    .query_one(
                        "SELECT min(delivered_through) FROM forward_cursor WHERE destination = $1",
                        &[&d.name],
                    )
                    .await?
                    .get(0);
                let start = match (&known, lowest) {
                    (None, None) => last_id,
                    (_, Some(lowest)) => lowest,
                    (Some(_), None) => 0,
                };
                let same = known
                    .as_ref()
                    .is_some_and(|(l, key)| *l == lanes && key == d.key.as_str());
                if !same {
                    c.execute(
                        "DELETE FROM forward_cursor WHERE destination = $1",
                        &[&d.name],
                    )
                    .await?;
                }
                for lane in 0..lanes {
                    c.execute(
                        "INSERT INTO forward_cursor (destination, lane, delivered_through)
                         VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                        &[&d.name, &lane, &start],
                    )
                    .await?;
                }
                c.execute(
                    "INSERT INTO forward_destination
                         (destination, address, lanes, lane_key, configured_at_us)
                     VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (destination) DO UPDATE SET address = excluded.address,
                         lanes = excluded.lanes, lane_key = excluded.lane_key",
                    &[&d.name, &d.address, &lanes, &d.key.as_str(), &now],
                )
                .await?;
            }
            c.batch_execute("COMMIT").await
        })
        .inspect_err(|_| {
            // A failed statement left the transaction open: start over on a new session.
            self.conn = None;
        })
    }

    fn acquire(&mut self, destination: &str, lane: u16) -> Result<Option<StoreId>, ForwardError> {
        let key = lock_key(destination, lane);
        let lane = i32::from(lane);
        self.with("take the lane's lock", async |c| {
            let held: bool = c
                .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
                .await?
                .get(0);
            if !held {
                return Ok(None);
            }
            let cursor: i64 = c
                .query_one(
                    "SELECT delivered_through FROM forward_cursor
                     WHERE destination = $1 AND lane = $2",
                    &[&destination, &lane],
                )
                .await?
                .get(0);
            Ok(Some(cursor))
        })
    }

    fn read_page(
        &mut self,
        after: StoreId,
        max_records: usize,
        max_bytes: usize,
        keep: &dyn Fn(&[u8]) -> bool,
    ) -> Result<Page, ForwardError> {
        let limit = i64::try_from(max_records).unwrap_or(i64::MAX);
        let (last_id, rows) = self.with("read the backlog", async |c| {
            let last: i64 = c
                .query_one("SELECT coalesce(max(id), 0) FROM mllp_messages", &[])
                .await?
                .get(0);
            let rows = c
                .query(
                    "SELECT id, received_at_us, payload, connection_id, sequence
                     FROM mllp_messages WHERE id > $1 ORDER BY id LIMIT $2",
                    &[&after, &limit],
                )
                .await?;
            Ok((last, rows))
        })?;
        let mut page = Page {
            messages: Vec::new(),
            scanned_through: after,
            last_id,
        };
        let mut bytes = 0usize;
        for row in rows {
            let id: i64 = row.get(0);
            page.scanned_through = id;
            let payload: &[u8] = row.get(2);
            if !keep(payload) {
                continue;
            }
            bytes = bytes.saturating_add(payload.len());
            let received_at_us: i64 = row.get(1);
            page.messages.push(Pending {
                id,
                received_at_us,
                payload: payload.to_vec(),
                key: Some(WatchKey::from_columns(
                    row.get(3),
                    row.get(4),
                    received_at_us,
                )),
            });
            if bytes >= max_bytes {
                break;
            }
        }
        Ok(page)
    }

    fn advance(
        &mut self,
        destination: &str,
        lane: u16,
        through: StoreId,
    ) -> Result<(), ForwardError> {
        let lane = i32::from(lane);
        self.with("move a cursor", async |c| {
            c.execute(
                "UPDATE forward_cursor SET delivered_through = $3
                 WHERE destination = $1 AND lane = $2 AND delivered_through < $3",
                &[&destination, &lane, &through],
            )
            .await
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
        let lane = i32::from(lane);
        let attempts = i32::try_from(letter.attempts).unwrap_or(i32::MAX);
        let params: [&(dyn ToSql + Sync); 9] = [
            &destination,
            &id,
            &lane,
            &attempts,
            &letter.first_attempt_us,
            &letter.last_attempt_us,
            &letter.reason,
            &letter.reply,
            &letter.history,
        ];
        self.with("write a dead letter", async |c| {
            // One transaction: the dead letter and the cursor move together.
            let sql = if advance {
                "WITH dead AS (
                    INSERT INTO forward_dead_letter (destination, message_id, status, lane,
                        attempts, first_attempt_us, last_attempt_us, reason, reply, history,
                        updated_at_us)
                    VALUES ($1, $2, 'dead', $3, $4, $5, $6, $7, $8, $9, $6)
                    ON CONFLICT (destination, message_id) DO UPDATE SET
                        status = 'dead',
                        attempts = forward_dead_letter.attempts + excluded.attempts,
                        last_attempt_us = excluded.last_attempt_us, reason = excluded.reason,
                        reply = excluded.reply,
                        history = forward_dead_letter.history || excluded.history,
                        updated_at_us = excluded.updated_at_us
                    RETURNING 1)
                 UPDATE forward_cursor SET delivered_through = $2
                 WHERE destination = $1 AND lane = $3 AND delivered_through < $2
                   AND EXISTS (SELECT 1 FROM dead)"
            } else {
                "INSERT INTO forward_dead_letter (destination, message_id, status, lane,
                    attempts, first_attempt_us, last_attempt_us, reason, reply, history,
                    updated_at_us)
                 VALUES ($1, $2, 'dead', $3, $4, $5, $6, $7, $8, $9, $6)
                 ON CONFLICT (destination, message_id) DO UPDATE SET
                    status = 'dead',
                    attempts = forward_dead_letter.attempts + excluded.attempts,
                    last_attempt_us = excluded.last_attempt_us, reason = excluded.reason,
                    reply = excluded.reply,
                    history = forward_dead_letter.history || excluded.history,
                    updated_at_us = excluded.updated_at_us"
            };
            c.execute(sql, &params).await.map(drop)
        })
    }

    fn next_requeued(
        &mut self,
        destination: &str,
        lane: u16,
        lanes: u16,
    ) -> Result<Option<Pending>, ForwardError> {
        let (lane, lanes) = (i32::from(lane), i32::from(lanes.max(1)));
        self.with("read requeued messages", async |c| {
            let row = c
                .query_opt(
                    "SELECT d.message_id, m.received_at_us, m.payload
                     FROM forward_dead_letter d JOIN mllp_messages m ON m.id = d.message_id
                     WHERE d.destination = $1 AND d.status = 'requeued' AND d.lane % $2 = $3
                     ORDER BY d.message_id LIMIT 1",
                    &[&destination, &lanes, &lane],
                )
                .await?;
            Ok(row.map(|r| Pending {
                id: r.get(0),
                received_at_us: r.get(1),
                payload: r.get(2),
                key: None,
            }))
        })
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
        let attempts = i32::try_from(letter.attempts).unwrap_or(i32::MAX);
        self.with("finish a requeued message", async |c| {
            c.execute(
                "UPDATE forward_dead_letter SET status = $3, attempts = attempts + $4,
                    last_attempt_us = $5, reason = $6, reply = $7, history = history || $8,
                    updated_at_us = $5
                 WHERE destination = $1 AND message_id = $2",
                &[
                    &destination,
                    &id,
                    &status,
                    &attempts,
                    &letter.last_attempt_us,
                    &letter.reason,
                    &letter.reply,
                    &letter.history,
                ],
            )
            .await
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
        let lane = i32::from(lane);
        self.with("record the last error", async |c| {
            c.execute(
                "INSERT INTO forward_lane_status (destination, lane, last_error, last_error_at_us)
                 VALUES ($1, $2, $3, $4)
                 ON CONFLICT (destination, lane) DO UPDATE SET
                    last_error = excluded.last_error, last_error_at_us = excluded.last_error_at_us",
                &[&destination, &lane, &error, &at_us],
            )
            .await
            .map(drop)
        })
    }
}
