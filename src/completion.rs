//! How a handler's result gets back to the reactor that owns the connection: the per-reactor [`CompletionSink`] (one lock and at most one wake-up per
//! batch), and the [`ReplyHandle`] a handler uses to answer later, from any thread.
//!
//! Nothing here builds a NAK: the connection applies the NAK policy to the raw outcome, so
//! every NAK the server sends is built in one place (`connection.rs`).

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::outcome::{ConnectionId, HandlerError, Outcome, Reply, describe};
use crate::reason::ExceptionReason;
use crate::sync::lock;

/// A result for message `seq` of connection `id`.
#[derive(Debug)]
pub(crate) struct Completion {
    pub(crate) id: ConnectionId,
    pub(crate) seq: u64,
    pub(crate) outcome: Outcome,
}

/// Wakes the reactor at most once per batch of completions.
#[derive(Debug)]
pub(crate) struct Notifier {
    waker: mio::Waker,
    pending: AtomicBool,
    /// A command was sent on the reactor's command channel since the reactor last looked
    /// ([`take_commands`](Self::take_commands)): an idle channel then costs the reactor one
    /// atomic swap per poll turn instead of a `try_recv` (callgrind, S1: about 45
    /// instructions per turn).
    commands: AtomicBool,
}

impl Notifier {
    pub(crate) fn new(waker: mio::Waker) -> Self {
        Self {
            waker,
            pending: AtomicBool::new(false),
            commands: AtomicBool::new(false),
        }
    }

    /// Wakes the reactor unless a wake-up is already on its way.
    pub(crate) fn notify(&self) {
        if !self.pending.swap(true, Ordering::AcqRel) {
            // A failed wake leaves the completion queued; the reactor's next wake-up or
            // timer tick drains it. Nothing better can be done from another thread.
            let _ = self.waker.wake();
        }
    }

    /// A command was just sent on the reactor's channel: flags it, then wakes the reactor.
    /// The flag is set after the send, so a reactor that finds it set finds the command.
    pub(crate) fn command_sent(&self) {
        self.commands.store(true, Ordering::Release);
        self.notify();
    }

    /// Whether a command was sent since the last call (clearing the flag). Called after
    /// [`reset`](Self::reset) in a turn: a command flagged after this call finds the wake-up
    /// flag cleared, so it wakes the reactor for another turn.
    pub(crate) fn take_commands(&self) -> bool {
        self.commands.swap(false, Ordering::AcqRel)
    }

    /// Called by the reactor *before* draining its queues, so a completion sent during the
    /// drain triggers a fresh wake-up.
    pub(crate) fn reset(&self) {
        self.pending.store(false, Ordering::Release);
    }
}

/// The completion queue of one reactor. Workers and reply handles push; the reactor swaps the
/// whole queue out once per poll turn. A push wakes the reactor only when it finds the queue
/// empty: every completion after it in the same batch rides on that one wake-up.
#[derive(Debug)]
pub(crate) struct CompletionSink {
    queue: Mutex<Vec<Completion>>,
    notifier: Arc<Notifier>,
}

impl CompletionSink {
    pub(crate) fn new(notifier: Arc<Notifier>) -> Self {
        Self {
            queue: Mutex::new(Vec::new()),
            notifier,
        }
    }

    /// Queues one completion.
    pub(crate) fn push(&self, completion: Completion) {
        let mut queue = lock(&self.queue);
        queue.push(completion);
        let first = queue.len() == 1;
        drop(queue);
        if first {
            self.notifier.notify();
        }
    }

    /// Moves everything queued into `into` (which the reactor keeps, so its capacity is
    /// reused and the swap allocates nothing in steady state).
    pub(crate) fn drain_into(&self, into: &mut Vec<Completion>) {
        let mut queue = lock(&self.queue);
        std::mem::swap(&mut *queue, into);
    }

    pub(crate) fn notifier(&self) -> &Arc<Notifier> {
        &self.notifier
    }
}

/// Answers one message later, from any thread: what a handler keeps after returning
/// [`Reply::Deferred`].
///
/// Get one from [`Context::defer`](crate::Context::defer). It completes at most once: `send`
/// and `fail` take it by value. Dropping it unanswered counts as a handler failure (an AE
/// NAK under [`NakPolicy::Send`](crate::NakPolicy::Send)). A completion that arrives after
/// the message's handler deadline is discarded and counted in
/// `mllp_handler_late_results_total`; it is never written. Many completions in a burst cost
/// the reactor at most one wake-up.
///
/// ```
/// use mllp_reactor::{ack, handler_fn, Client, ClientConfig, Dispatch, Reply, Server};
///
/// // Answer from another thread, e.g. after a store committed the message.
/// let handler = handler_fn(|msg, cx| {
///     let handle = cx.defer();
///     let msg = msg.clone();
///     std::thread::spawn(move || handle.send(Reply::Send(ack::accept(&msg))));
///     Ok(Reply::Deferred)
/// });
/// let server = Server::builder(handler).dispatch(Dispatch::Inline).bind("127.0.0.1:0")?;
/// let addr = server.local_addr();
/// let running = server.spawn()?;
/// let mut client = Client::connect(addr, ClientConfig::default())?;
/// let reply = client.send(b"MSH|^~\\&|A|B|C|D|20260101||ADT^A01|7|P|2.5.1\r")?;
/// assert_eq!(reply.code, ack::AckCode::AA);
/// running.shutdown(std::time::Duration::from_secs(5))?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct ReplyHandle {
    sink: Arc<CompletionSink>,
    id: ConnectionId,
    seq: u64,
    /// False once `send` or `fail` ran, so `Drop` reports nothing more.
    armed: bool,
}

impl fmt::Debug for ReplyHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplyHandle")
            .field("connection", &self.id)
            .field("sequence", &self.seq)
            .finish()
    }
}

impl ReplyHandle {
    pub(crate) fn new(sink: Arc<CompletionSink>, id: ConnectionId, seq: u64) -> Self {
        Self {
            sink,
            id,
            seq,
            armed: true,
        }
    }

    /// The connection the message came on.
    pub fn connection_id(&self) -> ConnectionId {
        self.id
    }

    /// The message's sequence number on its connection.
    pub fn sequence(&self) -> u64 {
        self.seq
    }

    /// Completes the message with `reply`. [`Reply::Deferred`] here is a failure (there is
    /// nothing left to defer to).
    pub fn send(mut self, reply: Reply) {
        let outcome = match reply {
            Reply::Deferred => Outcome::Failed {
                reason: ExceptionReason::HandlerError,
                detail: "a reply handle was completed with Reply::Deferred".to_owned(),
            },
            reply => Outcome::Reply(reply),
        };
        self.complete(outcome);
    }

    /// Completes the message as failed: the sender gets an AE under
    /// [`NakPolicy::Send`](crate::NakPolicy::Send), and `error`'s text goes to the
    /// message-exception event.
    pub fn fail(mut self, error: impl Into<HandlerError>) {
        let detail = describe(&*error.into());
        self.complete(Outcome::Failed {
            reason: ExceptionReason::HandlerError,
            detail,
        });
    }

    fn complete(&mut self, outcome: Outcome) {
        self.armed = false;
        self.sink.push(Completion {
            id: self.id,
            seq: self.seq,
            outcome,
        });
    }
}

impl Drop for ReplyHandle {
    fn drop(&mut self) {
        if self.armed {
            self.complete(Outcome::Failed {
                reason: ExceptionReason::HandlerError,
                detail: "reply handle dropped without an answer".to_owned(),
            });
        }
    }
}
