//! The handler that stores each message before acknowledging it.
//!
//! It runs inline on the reactor thread and never blocks: it hands the message to the store's
//! writer thread and returns [`Reply::Deferred`]. The writer commits a whole batch in one
//! transaction, then completes each message's [`ReplyHandle`](mllp_reactor::ReplyHandle):
//! AA once committed, AE "message not stored: …" when the commit failed (never AA then). The
//! ACK is built on the writer thread, off the reactor. Meanwhile the connection keeps reading
//! and handing over its next messages (up to `max_in_flight`); replies still go out in order.
//! Every NAK it answers (AR for a message without MSH-10, AE for a failed commit) is logged
//! by [`log_nak`], as `--no-store`'s are.
//!
//! This file is also compiled into `tests/store.rs` (`#[path]`), so it depends only on the
//! library crates and `tracing`.

use std::net::SocketAddr;
use std::sync::Arc;

use mllp_reactor::ack::{self, AckCode};
use mllp_reactor::msh::Msh;
use mllp_reactor::{ConnectionId, Handler, Reply, handler_fn};
use mllp_store::{PostgresOptions, Record, Store};

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
        let (conn, peer, seq) = (cx.connection_id(), cx.peer_addr(), cx.sequence());
        let done: mllp_store::Done = Box::new(move |result| {
            reply.send(Reply::Send(match result {
                Ok(_) => {
                    let ack = ack::accept(&payload);
                    if ack_code(&ack) == Some(AckCode::AR) {
                        log_nak(conn, peer, seq, &payload, AckCode::AR, None);
                    }
                    ack
                }
                Err(e) => {
                    let detail = e.to_string();
                    log_nak(conn, peer, seq, &payload, AckCode::AE, Some(&detail));
                    ack::nak(
                        &payload,
                        AckCode::AE,
                        &format!("message not stored: {detail}"),
                    )
                }
            }));
        });
        if let Err(refused) = store.submit(Record::from_message(msg.clone(), cx), done) {
            let reason = refused.reason();
            (refused.into_submission().into_parts().1)(Err(reason));
        }
        Ok(Reply::Deferred)
    })
}

/// MSA-1 of an ACK the library built.
fn ack_code(reply: &[u8]) -> Option<AckCode> {
    ack::parse(reply).ok().map(|parsed| parsed.code)
}

/// Logs one NAK the CLI's handlers answer, at warn on `mllp::msg`: connection, peer, sequence,
/// code, the message's control id where it has one, why, and `detail` (the store's error) for
/// an AE. The same line in every mode.
pub fn log_nak(
    conn: ConnectionId,
    peer: SocketAddr,
    seq: u64,
    message: &[u8],
    code: AckCode,
    detail: Option<&str>,
) {
    let msh = Msh::parse(message);
    let control_id = msh
        .as_ref()
        .ok()
        .and_then(|m| m.control_id())
        .map(|id| String::from_utf8_lossy(id).into_owned())
        .unwrap_or_default();
    let reason = match (code, &msh) {
        (AckCode::AR, Ok(_)) => "no MSH-10",
        (AckCode::AR, Err(_)) => "no readable MSH",
        _ => "not stored",
    };
    tracing::warn!(
        target: "mllp::msg",
        conn = %conn,
        peer = %peer,
        seq,
        code = code.as_str(),
        control_id,
        reason,
        size = message.len(),
        detail = detail.unwrap_or(""),
        "message rejected"
    );
}

/// PostgreSQL options for the CLI: the password comes from `PGPASSWORD` when the URL has
/// none, as with libpq's tools, so it need not appear in the process list.
pub fn postgres_options() -> PostgresOptions {
    PostgresOptions::default().password(std::env::var("PGPASSWORD").ok())
}
