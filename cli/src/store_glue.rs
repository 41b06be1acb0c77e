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
use mllp_store::{Record, Store, StoreError, SubmitError};

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
