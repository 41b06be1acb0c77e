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
use mllp_store::{Record, Store};

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
