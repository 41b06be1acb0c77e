//! What application code implements: [`Handler`], the [`Context`] it gets and the [`Reply`] it
//! returns.
//!
//! Where a handler runs is the server's [`Dispatch`] option: on the reactor thread itself
//! ([`Dispatch::Inline`], for handlers that never block) or on a worker thread of the pool
//! ([`Dispatch::Pool`]). Either way, calls for one connection never overlap and come in
//! message order, and replies leave in message order. A handler carries its own state: share
//! what several threads touch with `Arc`/`Mutex` or atomics.
//!
//! A handler can answer later: it calls [`Context::defer`], returns [`Reply::Deferred`], and
//! completes the [`ReplyHandle`] from any thread (for example once a store has committed the
//! message).

use std::cell::Cell;
use std::fmt;
use std::net::SocketAddr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;

use crate::completion::{CompletionSink, ReplyHandle};
use crate::limits::{DEFAULT_MAX_IN_FLIGHT_INLINE, DEFAULT_MAX_IN_FLIGHT_POOL};
use crate::outcome::{ConnectionId, HandlerError, Outcome, Reply, describe};
use crate::reason::ExceptionReason;

/// Where the handler runs. See [`Builder::dispatch`](crate::Builder::dispatch).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Dispatch {
    /// On the reactor thread, with no hand-off: the fastest path, for handlers that never
    /// block (build an ACK, push the message into a queue, defer the reply).
    ///
    /// **An inline handler that blocks stalls every connection of its reactor** for as long as
    /// it blocks: reads, writes, timers, other connections' replies. Each call is timed
    /// (`mllp_handler_duration_seconds`, from the reactor's latest clock reading before the
    /// call, so the message's read and decode count too), and calls longer than the builder's
    /// `inline_slow_threshold` are counted in `mllp_inline_handler_slow_total`. A panic is
    /// caught and answered like a handler error. The handler deadline cannot interrupt an
    /// inline call; it applies to deferred replies.
    Inline,
    /// On a worker thread of the server's pool: for handlers that may block (I/O, locks,
    /// slow computation). The default. The pool's threads exist only in this mode.
    #[default]
    Pool,
}

impl Dispatch {
    /// The `max_in_flight` a server uses with this dispatch when the builder sets none:
    /// [`DEFAULT_MAX_IN_FLIGHT_INLINE`](crate::DEFAULT_MAX_IN_FLIGHT_INLINE) or
    /// [`DEFAULT_MAX_IN_FLIGHT_POOL`](crate::DEFAULT_MAX_IN_FLIGHT_POOL). For code that sizes
    /// something by it (a store's queue) without copying the rule.
    ///
    /// ```
    /// assert_eq!(mllp_reactor::Dispatch::Pool.default_max_in_flight(), 1);
    /// ```
    pub fn default_max_in_flight(self) -> usize {
        match self {
            Self::Inline => DEFAULT_MAX_IN_FLIGHT_INLINE,
            Self::Pool => DEFAULT_MAX_IN_FLIGHT_POOL,
        }
    }
}

/// Application code that turns one HL7 message into a reply.
///
/// Called on the reactor thread ([`Dispatch::Inline`]) or a pool worker ([`Dispatch::Pool`]),
/// never concurrently for one connection.
///
/// `message` is the unframed payload (no `0x0B`, `0x1C 0x0D`), shared with the read buffer it
/// came from: clone the `Bytes` (cheap) to keep it past the call.
///
/// Returning `Err` or panicking counts as a handler failure: the connection stays open and,
/// under the default [`NakPolicy::Send`](crate::NakPolicy::Send), the sender gets an AE NAK
/// quoting its MSH-10.
///
/// ```
/// use mllp_reactor::{ack, Bytes, Context, Handler, HandlerError, Reply};
///
/// struct Accept;
/// impl Handler for Accept {
///     fn handle(&self, message: &Bytes, _cx: &Context) -> Result<Reply, HandlerError> {
///         Ok(Reply::Send(ack::accept(message)))
///     }
/// }
/// let server = mllp_reactor::Server::builder(Accept).bind("127.0.0.1:0")?;
/// # drop(server);
/// # Ok::<(), mllp_reactor::Error>(())
/// ```
pub trait Handler: Send + Sync + 'static {
    /// Handles one message. See [`Dispatch`] for the thread it runs on.
    ///
    /// # Errors
    ///
    /// Any error the application reports; see the trait docs for what the peer then gets.
    fn handle(&self, message: &Bytes, cx: &Context) -> Result<Reply, HandlerError>;
}

/// A [`Handler`] made from a closure; see [`handler_fn`].
#[derive(Clone)]
pub struct HandlerFn<F>(F);

impl<F> fmt::Debug for HandlerFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HandlerFn")
    }
}

impl<F> Handler for HandlerFn<F>
where
    F: Fn(&Bytes, &Context) -> Result<Reply, HandlerError> + Send + Sync + 'static,
{
    fn handle(&self, message: &Bytes, cx: &Context) -> Result<Reply, HandlerError> {
        (self.0)(message, cx)
    }
}

/// Wraps a closure as a [`Handler`].
///
/// ```
/// use mllp_reactor::{ack, handler_fn, Reply};
///
/// let handler = handler_fn(|msg, _cx| Ok(Reply::Send(ack::accept(msg))));
/// # let _ = handler;
/// ```
pub fn handler_fn<F>(f: F) -> HandlerFn<F>
where
    F: Fn(&Bytes, &Context) -> Result<Reply, HandlerError> + Send + Sync + 'static,
{
    HandlerFn(f)
}

/// Where a message came from, given to the handler with it.
///
/// Not `Clone`: it hands out the message's one [`ReplyHandle`] ([`defer`](Self::defer)), and a
/// copy could hand out a second.
pub struct Context {
    pub(crate) peer: SocketAddr,
    pub(crate) local: SocketAddr,
    pub(crate) connection: ConnectionId,
    pub(crate) sequence: u64,
    pub(crate) received_at: Instant,
    pub(crate) received_time: SystemTime,
    /// Where this message's completion goes (its reactor's queue).
    pub(crate) sink: Arc<CompletionSink>,
    /// Set once [`defer`](Self::defer) handed out the message's handle.
    pub(crate) deferred: Cell<bool>,
    /// The verified client certificate (mutual TLS).
    pub(crate) identity: Option<Arc<crate::identity::PeerIdentity>>,
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("peer", &self.peer)
            .field("local", &self.local)
            .field("connection", &self.connection)
            .field("sequence", &self.sequence)
            .finish_non_exhaustive()
    }
}

impl Context {
    /// The verified client certificate's identity (subject CN, SANs, SHA-256 fingerprint of
    /// the leaf) when the connection uses mutual TLS (feature `tls`; always `None` without it).
    pub fn peer_identity(&self) -> Option<&crate::identity::PeerIdentity> {
        self.identity.as_deref()
    }

    /// [`peer_identity`](Self::peer_identity), shared: cheap to keep past the handler call
    /// (a store record keeps it with the message).
    pub fn peer_identity_shared(&self) -> Option<Arc<crate::identity::PeerIdentity>> {
        self.identity.clone()
    }

    /// Takes the handle that answers this message later; return [`Reply::Deferred`] from the
    /// handler after taking it. See [`ReplyHandle`].
    ///
    /// # Panics
    ///
    /// If called twice for one message: a message has exactly one answer.
    pub fn defer(&self) -> ReplyHandle {
        assert!(
            !self.deferred.replace(true),
            "Context::defer called twice for one message"
        );
        ReplyHandle::new(Arc::clone(&self.sink), self.connection, self.sequence)
    }

    /// The peer's address (the sending system).
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    /// The local address the connection was accepted on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The connection's unique id.
    pub fn connection_id(&self) -> ConnectionId {
        self.connection
    }

    /// The message's sequence number on its connection, from 0.
    pub fn sequence(&self) -> u64 {
        self.sequence
    }

    /// When the message's last byte was read (monotonic clock).
    pub fn received_at(&self) -> Instant {
        self.received_at
    }

    /// When the message's last byte was read (wall clock). The reactor reads the wall clock
    /// once per poll turn, at the turn's first message: the messages one turn reads share it.
    pub fn received_time(&self) -> SystemTime {
        self.received_time
    }
}

/// Calls the handler, catching a panic; returns the raw outcome (the connection builds any
/// NAK). `Reply::Deferred` without a handle taken is a failure: nothing could ever answer.
// Inline: into the dispatcher's per-message path (callgrind, S1: the call moved its
// outcome once more).
#[inline]
pub(crate) fn call(handler: &dyn Handler, payload: &Bytes, cx: &Context) -> Outcome {
    match catch_unwind(AssertUnwindSafe(|| handler.handle(payload, cx))) {
        Ok(Ok(Reply::Deferred)) if !cx.deferred.get() => Outcome::Failed {
            reason: ExceptionReason::HandlerError,
            detail: "the handler returned Reply::Deferred without calling Context::defer"
                .to_owned(),
        },
        Ok(Ok(Reply::Deferred)) => Outcome::Deferred,
        Ok(Ok(reply)) => Outcome::Reply(reply),
        Ok(Err(e)) => Outcome::Failed {
            reason: ExceptionReason::HandlerError,
            detail: describe(&*e),
        },
        Err(panic) => Outcome::Failed {
            reason: ExceptionReason::Panic,
            detail: panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "handler panicked".to_owned()),
        },
    }
}
