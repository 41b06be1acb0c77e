//! What a new connection checks and sets up before it is used.

use tokio_postgres::{Client, Statement};

use super::describe::show;
use super::schema::{Schema, foreign, inspect_schema, migrate};
use super::sql::begin_locked;
use super::sql::{
    ADD_CLIENT_CERT, ADD_PATIENT_ID, ADDITIONS, FIND_ORIGINALS, IDS_AND_ORIGINALS, INSERT,
    NO_INSERT, READ_AFTER, READ_AFTER_WITHOUT_CERT, SEARCH_INDEXES,
};
use super::{IDLE_IN_TRANSACTION_TIMEOUT, PostgresOptions, SCHEMA_VERSION};
use crate::error::{Cause, Found, Problem, StoreError};

/// What a new connection checks and sets up before it is used.
pub(super) struct Session<'a> {
    pub(super) path: &'a std::path::Path,
    pub(super) options: &'a PostgresOptions,
    pub(super) read_only: bool,
    /// Whether an empty database gets the schema (only at the first connect of a writer).
    pub(super) create: bool,
}

impl Session<'_> {
    fn error(&self, problem: Problem) -> StoreError {
        StoreError::open(self.path, problem)
    }

    fn pg_error(&self, e: tokio_postgres::Error) -> StoreError {
        StoreError::open(self.path, Cause::postgres(e))
    }

    /// Sets the session up, checks durability and the schema (creating or migrating it when
    /// allowed), and prepares the statements. Returns `synchronous_commit` (writers only).
    pub(super) async fn start(
        &self,
        client: &Client,
    ) -> Result<(Option<String>, [Statement; 4]), StoreError> {
        let mut setup = format!(
            "SET lock_timeout = {}; SET idle_in_transaction_session_timeout = {};",
            self.options.lock_timeout.as_millis().max(1),
            IDLE_IN_TRANSACTION_TIMEOUT.as_millis()
        );
        if self.read_only {
            setup.push_str("SET default_transaction_read_only = on;");
        }
        client
            .batch_execute(&setup)
            .await
            .map_err(|e| self.pg_error(e))?;
        let encoding = show(client, "server_encoding")
            .await
            .map_err(|e| self.pg_error(e))?;
        if !encoding.eq_ignore_ascii_case("UTF8") {
            return Err(self.error(Problem::Encoding(encoding)));
        }
        let mut sync = None;
        if !self.read_only {
            let level = show(client, "synchronous_commit")
                .await
                .map_err(|e| self.pg_error(e))?;
            let fsync = show(client, "fsync").await.map_err(|e| self.pg_error(e))?;
            if !self.options.allow_async_commit {
                if level == "off" {
                    return Err(self.error(Problem::AsyncCommit));
                }
                if fsync == "off" {
                    return Err(self.error(Problem::FsyncOff));
                }
            }
            sync = Some(level);
        }
        let schema = inspect_schema(client).await.map_err(|e| self.pg_error(e))?;
        match schema {
            Schema::Version(v) if v == SCHEMA_VERSION => {}
            Schema::Version(found) if found > SCHEMA_VERSION => {
                return Err(StoreError::UnsupportedVersion {
                    path: self.path.to_owned(),
                    found: found.into(),
                    supported: SCHEMA_VERSION.into(),
                });
            }
            Schema::Foreign => return Err(foreign(self.path)),
            Schema::Empty | Schema::Version(_) if self.read_only || !self.create => {
                return Err(StoreError::NotAStore {
                    path: self.path.to_owned(),
                    found: match schema {
                        Schema::Empty => Found::NoTables,
                        _ => Found::NotMigrated,
                    },
                });
            }
            Schema::Empty | Schema::Version(_) => migrate(client, self.path).await?,
        }
        if !self.read_only {
            // A session caches CACHE ids ahead: with more than one, two nodes would hand out
            // ids out of commit order, and `--since` could skip records.
            let cache: i64 = client
                .query_one(
                    "SELECT seqcache FROM pg_catalog.pg_sequence \
                     WHERE seqrelid = pg_get_serial_sequence('mllp_messages', 'id')::regclass",
                    &[],
                )
                .await
                .and_then(|row| row.try_get(0))
                .map_err(|e| self.pg_error(e))?;
            if cache != 1 {
                return Err(self.error(Problem::SequenceCache(cache)));
            }
        }
        let has_cert = if self.read_only {
            let row = client
                .query_one(ADDITIONS, &[])
                .await
                .map_err(|e| self.pg_error(e))?;
            row.try_get(0).map_err(|e| self.pg_error(e))?
        } else {
            self.add_what_is_missing(client).await?;
            if self.options.bench_without_patient_index {
                client
                    .batch_execute("DROP INDEX IF EXISTS mllp_messages_patient")
                    .await
                    .map_err(|e| self.pg_error(e))?;
            }
            true
        };
        // A reader never inserts; without the column (a store no writer of this version has
        // opened yet) it reads NULL for the certificate.
        let (insert, read_after) = match (self.read_only, has_cert) {
            (false, _) => (INSERT, READ_AFTER),
            (true, true) => (NO_INSERT, READ_AFTER),
            (true, false) => (NO_INSERT, READ_AFTER_WITHOUT_CERT),
        };
        let mut statements = Vec::with_capacity(4);
        for sql in [IDS_AND_ORIGINALS, FIND_ORIGINALS, insert, read_after] {
            statements.push(client.prepare(sql).await.map_err(|e| self.pg_error(e))?);
        }
        let statements: [Statement; 4] = statements
            .try_into()
            .unwrap_or_else(|_| unreachable!("four statements were prepared"));
        Ok((sync, statements))
    }

    /// Brings a version-1 store up to what this build writes ([`ADDITIONS`]): the
    /// `client_cert` and `patient_id` columns, the search indexes, and no foreign key on
    /// `duplicate_of` (retention deletes an original whose resend is kept, and PostgreSQL
    /// would otherwise scan the table for references at every deleted row). A store that
    /// has them all costs one query (every reconnect asks); otherwise the missing steps run
    /// in one transaction under the store's lock, so that nodes starting together take
    /// turns (the second finds the work done) and never deadlock on the table's locks.
    async fn add_what_is_missing(&self, client: &Client) -> Result<(), StoreError> {
        let fail = |e| self.pg_error(e);
        if missing(client).await.map_err(fail)?.is_none() {
            return Ok(());
        }
        client.batch_execute(&begin_locked()).await.map_err(fail)?;
        // Under the lock, what is still missing (another node may have done it meanwhile).
        // On an error the caller drops the connection, which rolls the transaction back.
        if let Some(steps) = missing(client).await.map_err(fail)? {
            for step in steps {
                client.batch_execute(&step).await.map_err(fail)?;
            }
        }
        client.batch_execute("COMMIT").await.map_err(fail)
    }
}

/// The statements that would bring the store up to this build's additions, `None` if none.
async fn missing(client: &Client) -> Result<Option<Vec<String>>, tokio_postgres::Error> {
    let row = client.query_one(ADDITIONS, &[]).await?;
    let mut steps = Vec::new();
    if !row.try_get::<_, bool>(0)? {
        steps.push(ADD_CLIENT_CERT.to_owned());
    }
    if !row.try_get::<_, bool>(1)? {
        steps.push(ADD_PATIENT_ID.to_owned());
    }
    for name in row.try_get::<_, Vec<String>>(2)? {
        steps.push(format!(
            "ALTER TABLE mllp_messages DROP CONSTRAINT IF EXISTS \"{}\"",
            name.replace('"', "\"\"")
        ));
    }
    for (i, sql) in SEARCH_INDEXES.iter().enumerate() {
        if !row.try_get::<_, bool>(3 + i)? {
            steps.push((*sql).to_owned());
        }
    }
    if row.try_get::<_, bool>(5)? {
        steps.push("DROP INDEX IF EXISTS mllp_messages_original".to_owned());
    }
    Ok((!steps.is_empty()).then_some(steps))
}
