//! The handler that stores each message before acknowledging it.
//!
//! It runs inline on the reactor thread and never blocks: it hands the message to the store's
//! writer thread and returns [`Reply::Deferred`]. The writer commits a whole batch in one
//! transaction, then completes each message's [`ReplyHandle`](mllp_reactor::ReplyHandle):
//! AA once committed, AE "message not stored: …" when the commit failed (never AA then). The
//! ACK is built on the writer thread, off the reactor. Meanwhile the connection keeps reading
//! and handing over its next messages (up to `max_in_flight`); replies still go out in order.
//!
//! This file is also compiled into `tests/store.rs` (`#[path]`), so it depends only on the
//! library crates.

use std::sync::Arc;

use mllp_reactor::ack::{self, AckCode};
use mllp_reactor::{Handler, Reply, handler_fn};
use mllp_store::postgresql::is_postgres_url;
use mllp_store::{
    PostgresBackend, PostgresOptions, Record, SqliteBackend, SqliteOptions, Store, StoreConfig,
    WriteGate,
};

/// A handler that submits every message to `store` and answers AA once it is committed, or
/// AE "message not stored: …" when the commit failed (never AA then).
///
/// The store's queue should be sized (as `serve` does) so that the server's own caps on
/// messages in flight and buffered bytes bite before it is full: then reading stops and TCP
/// pushes back on senders. A store that still refuses (closed, or full despite that) gets the
/// message an AE at once.
pub fn store_handler(store: Arc<Store>) -> impl Handler {
    handler_fn(move |msg, cx| {
        let reply = cx.defer();
        let payload = msg.clone();
        let done: mllp_store::Done = Box::new(move |result| {
            reply.send(Reply::Send(match result {
                Ok(_) => ack::accept(&payload),
                Err(e) => ack::nak(&payload, AckCode::AE, &format!("message not stored: {e}")),
            }));
        });
        if let Err(refused) = store.submit(Record::from_message(msg.clone(), cx), done) {
            let reason = refused.reason();
            (refused.into_submission().into_parts().1)(Err(reason));
        }
        Ok(Reply::Deferred)
    })
}

/// Opens the store `serve --store` names: a `postgres://` (or `postgresql://`) URL, or an
/// SQLite file path, with `config`'s caps. Returns it, the line `serve` prints
/// ("storing to …") and, for SQLite, the writer's gate (for the retention pruner).
///
/// The PostgreSQL connection is made here, on the calling thread, and then moves to the
/// store's writer thread, where all of its (blocking) work happens: never a reactor's.
pub fn open_store(
    spec: &str,
    allow_async_commit: bool,
    config: StoreConfig,
) -> Result<(Store, String, Option<WriteGate>), String> {
    if is_postgres_url(spec) {
        let options = postgres_options().allow_async_commit(allow_async_commit);
        let backend = PostgresBackend::connect(spec, &options).map_err(|e| e.to_string())?;
        let shown = format!(
            "storing to {} (synchronous_commit={})",
            mllp_store::Backend::location(&backend),
            backend.synchronous_commit()
        );
        let store = Store::start(backend, config).map_err(|e| e.to_string())?;
        return Ok((store, shown, None));
    }
    if allow_async_commit {
        return Err(
            "--allow-async-commit applies only to a PostgreSQL store (--store postgres://…)"
                .to_owned(),
        );
    }
    let backend =
        SqliteBackend::open(spec, &SqliteOptions::default()).map_err(|e| e.to_string())?;
    let gate = backend.write_gate();
    let store = Store::start(backend, config).map_err(|e| e.to_string())?;
    // The absolute path: "./mllp-reactor.db" does not say which directory.
    let path = std::path::Path::new(spec);
    let shown = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    Ok((store, format!("storing to {}", shown.display()), Some(gate)))
}

/// PostgreSQL options for the CLI: the password comes from `PGPASSWORD` when the URL has
/// none, as with libpq's tools, so it need not appear in the process list.
pub fn postgres_options() -> PostgresOptions {
    PostgresOptions::default().password(std::env::var("PGPASSWORD").ok())
}
