//! The live connection, reconnecting with a backoff, and one attempt at a batch.

use std::time::{Duration, Instant};

use tokio::runtime::Runtime;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls, Statement};

use super::batch::{Failure, insert_batch};
use super::session::Session;
use super::sql::begin_locked;
use super::{PostgresBackend, RECONNECT_MAX, RECONNECT_MIN};
use crate::error::{Cause, StoreError, ends_session};
use crate::record::{Record, StoreOutcome};

/// A live connection and its prepared statements.
pub(super) struct Connection {
    /// Its requests; several may be in flight at once (pipelining).
    pub(super) client: Client,
    /// Drives the connection's socket: a current-thread runtime that runs only inside
    /// [`block_on`](Self::block_on), on the thread that owns the backend.
    runtime: Runtime,
    pub(super) ids_and_originals: Statement,
    pub(super) find_originals: Statement,
    pub(super) insert: Statement,
    pub(super) read_after: Statement,
}

impl Connection {
    pub(super) fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }
}

/// How one attempt at a batch failed.
pub(super) enum Attempt {
    /// Nothing committed.
    Failed(StoreError),
    /// The connection died after `COMMIT` was sent: the batch may have committed, with these
    /// outcomes.
    Unknown(StoreError, Vec<StoreOutcome>),
}

/// When the next reconnect may be tried, after failed ones.
#[derive(Debug, Default)]
pub(super) struct Backoff {
    delay: Duration,
    retry_at: Option<Instant>,
    last_error: Option<StoreError>,
}

impl PostgresBackend {
    /// Connects, sets up the session, checks durability and the schema (creating or
    /// migrating it if `create` and this is a writer), and prepares the statements.
    pub(super) fn open(&mut self, create: bool) -> Result<Connection, StoreError> {
        let path = self.path();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| {
                StoreError::open(&path, Cause::from(e).context("cannot start a runtime"))
            })?;
        let (client, connection) = runtime
            .block_on(self.config.connect(NoTls))
            .map_err(|e| StoreError::open(&path, Cause::postgres(e)))?;
        // Runs whenever a call blocks on this runtime; ends when the server closes.
        runtime.spawn(async move {
            let _ = connection.await;
        });
        let session = Session {
            path: &path,
            options: &self.options,
            read_only: self.read_only,
            create,
        };
        let (sync, statements) = runtime.block_on(session.start(&client))?;
        if let Some(sync) = sync {
            self.synchronous_commit = sync;
        }
        let [ids_and_originals, find_originals, insert, read_after] = statements;
        Ok(Connection {
            client,
            runtime,
            ids_and_originals,
            find_originals,
            insert,
            read_after,
        })
    }

    /// The live connection; reconnects if there is none and the backoff allows it.
    pub(super) fn connection(&mut self) -> Result<&mut Connection, StoreError> {
        if self.conn.is_none() {
            if let Some(at) = self.backoff.retry_at {
                let now = Instant::now();
                if now < at
                    && let Some(last) = &self.backoff.last_error
                {
                    return Err(StoreError::open(
                        &self.path(),
                        Cause::waiting(last.clone(), at - now),
                    ));
                }
            }
            match self.open(false) {
                Ok(conn) => {
                    self.backoff = Backoff::default();
                    self.conn = Some(conn);
                }
                Err(e) => {
                    let delay = if self.backoff.delay.is_zero() {
                        RECONNECT_MIN
                    } else {
                        (self.backoff.delay * 2).min(RECONNECT_MAX)
                    };
                    self.backoff = Backoff {
                        delay,
                        retry_at: Some(Instant::now() + delay),
                        last_error: Some(e.clone()),
                    };
                    return Err(e);
                }
            }
        }
        // INVARIANT: set just above if it was None.
        Ok(self.conn.as_mut().expect("connection was just opened"))
    }

    /// The duplicate window in microseconds.
    pub(super) fn window_us(&self) -> i64 {
        i64::try_from(self.options.duplicate_window.as_micros()).unwrap_or(i64::MAX)
    }

    /// Maps a read-side failure, forgetting a dead connection so the next call reconnects.
    pub(super) fn read_error(&mut self, e: tokio_postgres::Error) -> StoreError {
        self.forget_if_dead(&e);
        if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) {
            return StoreError::Locked { path: self.path() };
        }
        StoreError::read(Cause::postgres(e))
    }

    pub(super) fn forget_if_dead(&mut self, e: &tokio_postgres::Error) {
        let dead = e.is_closed()
            || e.as_db_error().is_none()
            || ends_session(e)
            || self.conn.as_ref().is_some_and(|c| c.client.is_closed());
        if dead {
            self.conn = None;
        }
    }

    /// One attempt at a batch.
    pub(super) fn try_commit(&mut self, batch: &[Record]) -> Result<Vec<StoreOutcome>, Attempt> {
        let window = self.window_us();
        let conn = self
            .connection()
            .map_err(|e| Attempt::Failed(StoreError::commit(e)))?;
        match insert_batch(conn, batch, window) {
            Ok(outcomes) => Ok(outcomes),
            Err((e, failure)) => {
                let alive = e.as_db_error().is_some() && !conn.client.is_closed();
                match &failure {
                    // A statement failed (a lock timeout, say): the connection is fine, only
                    // the transaction is aborted.
                    Failure::Open if alive => {
                        if conn
                            .block_on(conn.client.batch_execute("ROLLBACK"))
                            .is_err()
                        {
                            self.conn = None;
                        }
                    }
                    Failure::Ended if alive => {}
                    _ => self.conn = None,
                }
                let error = StoreError::commit(Cause::postgres(e));
                Err(match failure {
                    Failure::Unknown(outcomes) => Attempt::Unknown(error, outcomes),
                    Failure::Open | Failure::Ended => Attempt::Failed(error),
                })
            }
        }
    }

    /// Whether the batch whose first id is `first` committed, asked on a fresh connection
    /// after the old one died with `COMMIT` in flight. Asked under the store's lock: the old
    /// session held it from before its `INSERT`, so once we have it that session's
    /// transaction has ended one way or the other and the answer is final. (A session that
    /// never received the `COMMIT` holds the lock until PostgreSQL ends it, after
    /// [`IDLE_IN_TRANSACTION_TIMEOUT`](super::IDLE_IN_TRANSACTION_TIMEOUT); the lookup gives
    /// up after the lock timeout first, and the batch stays unknown.)
    pub(super) fn committed(&mut self, first: i64) -> Result<bool, StoreError> {
        let conn = self.connection()?;
        let lock = begin_locked();
        let result = conn.block_on(async {
            conn.client.batch_execute(&lock).await?;
            let found = conn
                .client
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM mllp_messages WHERE id = $1)",
                    &[&first],
                )
                .await?
                .try_get::<_, bool>(0)?;
            conn.client.batch_execute("COMMIT").await?;
            Ok::<_, tokio_postgres::Error>(found)
        });
        result.map_err(|e| {
            // Dropping the connection ends whatever is left of the transaction.
            self.conn = None;
            StoreError::read(Cause::postgres(e))
        })
    }
}
