//! What a handler call produces, as plain data: the [`Reply`] a handler returns, the raw
//! [`Outcome`] of a call, and the [`ConnectionId`] it belongs to. The sans-IO connection turns
//! outcomes into replies and NAKs; the runtime (handler, pool, completion, reactor) produces
//! them. Nothing here does I/O or touches a thread.

use std::fmt;

use bytes::Bytes;

use crate::ack::AckCode;
use crate::reason::ExceptionReason;

/// The error type a handler returns: any error, boxed. Its `Display` text goes into the
/// message-exception event (and so into logs); the AE NAK the sender gets says "application
/// error" unless the builder's `expose_handler_errors` is on, when the text goes into MSA-3
/// and ERR as well.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

/// What the handler wants done after a message.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reply {
    /// Frame and send these bytes (usually an ACK), then keep the connection open.
    Send(Bytes),
    /// Frame and send these bytes, then close the connection.
    SendAndClose(Bytes),
    /// Frame and send an acknowledgment whose MSA-1 is the code given, then keep the
    /// connection open: [`Send`](Self::Send) for a reply whose code the handler already
    /// knows, such as the one [`Ack::build_coded`](crate::ack::Ack::build_coded) returns.
    /// The server counts a NAK (`mllp_naks_sent_total`) from that code instead of reading
    /// MSA-1 back from the bytes, which it does for [`Send`](Self::Send).
    ///
    /// ```
    /// use mllp_reactor::{ack::{Ack, AckCode}, handler_fn, Reply};
    ///
    /// let handler = handler_fn(|msg, _cx| {
    ///     let (code, ack) = Ack::new(AckCode::AA).build_coded(msg);
    ///     Ok(Reply::SendAck(code, ack))
    /// });
    /// # let _ = mllp_reactor::Server::builder(handler);
    /// ```
    SendAck(AckCode, Bytes),
    /// Send nothing; the message counts as handled (not as an error).
    NoReply,
    /// Send nothing and close the connection.
    Close,
    /// The reply comes later, through the [`ReplyHandle`](crate::ReplyHandle) from
    /// [`Context::defer`](crate::Context::defer). Returned
    /// without a handle taken, it counts as a handler failure.
    ///
    /// While a deferred reply is pending, the connection may read and hand over its next
    /// messages (up to the builder's `max_in_flight`); their replies still leave in order.
    Deferred,
}

/// Identifies one connection of one server for its whole life, across all its reactors: the
/// index names the reactor and its slab slot; slots are reused, so the generation makes the id
/// unique (2³² connections per slot).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectionId {
    pub(crate) index: u32,
    pub(crate) generation: u32,
}

impl ConnectionId {
    /// The id as one number, unique among this server's connections.
    pub fn as_u64(self) -> u64 {
        (u64::from(self.generation) << 32) | u64::from(self.index)
    }
}

impl fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.index, self.generation)
    }
}

/// What became of one handler call, as the handler (or the pool) reported it.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// The handler's reply (never [`Reply::Deferred`]).
    Reply(Reply),
    /// The handler call returned [`Reply::Deferred`]: the call is over, its reply comes later
    /// through a [`ReplyHandle`](crate::ReplyHandle).
    Deferred,
    /// The handler (or its reply handle) failed: an error, a panic, a dropped handle.
    Failed {
        reason: ExceptionReason,
        detail: String,
    },
    /// The job's deadline passed before a worker took it: it was not run.
    Expired,
}

/// An error's text, even if its `Display` panics (a handler's error type is foreign code).
pub(crate) fn describe(error: &(dyn std::error::Error + Send + Sync)) -> String {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| error.to_string()))
        .unwrap_or_else(|_| "handler error (its Display panicked)".to_owned())
}
