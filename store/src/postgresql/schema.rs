//! Finding the schema's version, and creating or migrating it.

use tokio_postgres::Client;

use super::SCHEMA_VERSION;
use super::sql::{MIGRATIONS, begin_locked};
use crate::error::{Cause, Found, StoreError};

pub(super) enum Schema {
    Empty,
    Foreign,
    Version(i32),
}

pub(super) async fn inspect_schema(client: &Client) -> Result<Schema, tokio_postgres::Error> {
    // pg_class through the statement's snapshot, not to_regclass: that reads the catalog
    // cache, which may not yet show a table another node created while we waited for the lock.
    let row = client
        .query_one(
            "SELECT coalesce(bool_or(relname = 'mllp_store_schema'), false), \
                    coalesce(bool_or(relname = 'mllp_messages'), false) \
             FROM pg_catalog.pg_class \
             WHERE relname IN ('mllp_store_schema', 'mllp_messages') \
               AND relnamespace = (SELECT oid FROM pg_catalog.pg_namespace \
                                   WHERE nspname = current_schema())",
            &[],
        )
        .await?;
    let (has_schema, has_messages): (bool, bool) = (row.try_get(0)?, row.try_get(1)?);
    if !has_schema {
        return Ok(if has_messages {
            Schema::Foreign
        } else {
            Schema::Empty
        });
    }
    let version: Option<i32> = client
        .query_one("SELECT max(version) FROM mllp_store_schema", &[])
        .await?
        .try_get(0)?;
    Ok(match version {
        Some(v) if v >= 1 && has_messages => Schema::Version(v),
        _ => Schema::Foreign,
    })
}

pub(super) fn foreign(path: &std::path::Path) -> StoreError {
    StoreError::NotAStore {
        path: path.to_owned(),
        found: Found::ForeignMessagesTable,
    }
}

/// Creates or migrates the schema in one transaction under the store's lock (nodes starting
/// together wait for each other; the second finds the work done). On an error the caller
/// drops the connection, which rolls the transaction back.
pub(super) async fn migrate(client: &Client, path: &std::path::Path) -> Result<(), StoreError> {
    let fail = |e: tokio_postgres::Error| {
        StoreError::open(path, Cause::postgres(e).context("cannot create the schema"))
    };
    client.batch_execute(&begin_locked()).await.map_err(fail)?;
    let from = match inspect_schema(client).await.map_err(fail)? {
        Schema::Empty => 0,
        Schema::Version(v) if v >= SCHEMA_VERSION => {
            return client.batch_execute("COMMIT").await.map_err(fail);
        }
        Schema::Version(v) => v,
        Schema::Foreign => return Err(foreign(path)),
    };
    for step in &MIGRATIONS[from as usize..] {
        client.batch_execute(step).await.map_err(fail)?;
    }
    let version = if from == 0 {
        "INSERT INTO mllp_store_schema (version) VALUES ($1)"
    } else {
        "UPDATE mllp_store_schema SET version = $1"
    };
    client
        .execute(version, &[&SCHEMA_VERSION])
        .await
        .map_err(fail)?;
    client.batch_execute("COMMIT").await.map_err(fail)
}
