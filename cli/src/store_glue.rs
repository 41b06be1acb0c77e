//! The handler that stores each message before acknowledging it (issue 10).
//!
//! STOPGAP until the server's deferred replies land: this runs in the handler pool and blocks
//! its worker on the commit result. Group commit still batches, because many workers wait at
//! once (`serve` defaults to [`STORE_WORKERS`] workers with a store). The deferred version:
//!
//! ```ignore
//! handler_fn(move |msg, cx| {
//!     let reply = cx.defer();
//!     let payload = msg.clone();
//!     let done: mllp_store::Done = Box::new(move |result| {
//!         reply.send(Reply::Send(match result {
//!             Ok(_) => ack::accept(&payload),
//!             Err(e) => ack::nak(&payload, AckCode::AE, &format!("message not stored: {e}")),
//!         }))
//!     });
//!     if let Err(refused) = store.submit(Record::from_message(msg.clone(), cx), done) {
//!         // Full (the reactor should have paused reading first) or Closed: answer AE now.
//!         let reason = refused.reason();
//!         (refused.into_submission().into_parts().1)(Err(reason));
//!     }
//!     Ok(Reply::Deferred)
//! })
//! ```
//!
//! This file is also compiled into `tests/store.rs` (`#[path]`), so it depends only on the
//! library crates.

use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use mllp_reactor::ack::{self, AckCode};
use mllp_reactor::{Handler, Reply, handler_fn};
use mllp_store::postgresql::is_postgres_url;
use mllp_store::{
    PostgresBackend, PostgresOptions, Record, SqliteOptions, Store, StoreConfig, StoreError,
    SubmitError,
};

/// Handler threads `serve` starts with a store unless `--workers` says otherwise: each one
/// waits for a commit, so this is the most messages one batch can gather. 64 lets a batch
/// amortise the sync ~64 ways (the store commits ~100 000 rows/s in batches of that size)
/// for 64 threads' stacks of memory.
pub const STORE_WORKERS: usize = 64;

/// How long a message waits for room in a full store queue before it is answered AE: a full
/// queue is a store that is behind, and a short wait rides out a burst; a long one would only
/// hold the sender past its own ACK timeout.
const QUEUE_FULL_WAIT: Duration = Duration::from_secs(5);

/// Poll interval while the queue is full (stopgap only: the deferred version stops reading).
const QUEUE_FULL_POLL: Duration = Duration::from_millis(1);

/// A handler that submits every message to `store` and answers AA once it is committed, or
/// AE "message not stored: …" when the commit failed (never AA then).
pub fn store_handler(store: Arc<Store>) -> impl Handler {
    handler_fn(move |msg, cx| {
        let (tx, rx) = mpsc::sync_channel(1);
        let mut record = Record::from_message(msg.clone(), cx);
        let mut done: mllp_store::Done = Box::new(move |result| {
            let _ = tx.send(result);
        });
        let deadline = Instant::now() + QUEUE_FULL_WAIT;
        let outcome: Result<_, String> = loop {
            match store.submit(record, done) {
                Ok(()) => {
                    let result = rx.recv().unwrap_or(Err(StoreError::WriterGone));
                    break result.map_err(|e| e.to_string());
                }
                Err(SubmitError::Full(back)) if Instant::now() < deadline => {
                    (record, done) = back.into_parts();
                    std::thread::sleep(QUEUE_FULL_POLL);
                }
                Err(e) => break Err(e.to_string()),
            }
        };
        Ok(Reply::Send(match outcome {
            Ok(_) => ack::accept(msg),
            Err(e) => ack::nak(msg, AckCode::AE, &format!("message not stored: {e}")),
        }))
    })
}

/// Opens the store `serve --store` names: a `postgres://` (or `postgresql://`) URL, or an
/// SQLite file path. Returns it and the line `serve` prints ("storing to …").
///
/// The PostgreSQL connection is made here, on the calling thread, and then moves to the
/// store's writer thread, where all of its (blocking) work happens: never the reactor's.
pub fn open_store(spec: &str, allow_async_commit: bool) -> Result<(Store, String), String> {
    if is_postgres_url(spec) {
        let options = postgres_options().allow_async_commit(allow_async_commit);
        let backend = PostgresBackend::connect(spec, &options).map_err(|e| e.to_string())?;
        let shown = format!(
            "storing to {} (synchronous_commit={})",
            mllp_store::Backend::location(&backend),
            backend.synchronous_commit()
        );
        let store = Store::start(backend, StoreConfig::default()).map_err(|e| e.to_string())?;
        return Ok((store, shown));
    }
    if allow_async_commit {
        return Err(
            "--allow-async-commit applies only to a PostgreSQL store (--store postgres://…)"
                .to_owned(),
        );
    }
    let store = Store::open_sqlite(spec, &SqliteOptions::default(), StoreConfig::default())
        .map_err(|e| e.to_string())?;
    // The absolute path: "./mllp-reactor.db" does not say which directory.
    let path = std::path::Path::new(spec);
    let shown = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    Ok((store, format!("storing to {}", shown.display())))
}

/// PostgreSQL options for the CLI: the password comes from `PGPASSWORD` when the URL has
/// none, as with libpq's tools, so it need not appear in the process list.
pub fn postgres_options() -> PostgresOptions {
    PostgresOptions::default().password(std::env::var("PGPASSWORD").ok())
}
