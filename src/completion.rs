//! How a handler's result gets back to the reactor that owns the connection: the per-reactor [`CompletionSink`] (one lock and at most one wake-up per
//! batch), and the [`ReplyHandle`] a handler uses to answer later, from any thread.
//!
//! Nothing here builds a NAK: the connection applies the NAK policy to the raw outcome, so
//! every NAK the server sends is built in one place (`connection.rs`).

use std::cell::{Cell, RefCell};
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
    /// drain triggers a fresh wake-up. Returns whether a wake-up was sent since the last
    /// call: if not, the completion queue was empty when this flag was read (a push that
    /// finds the queue empty notifies, at once or at the end of its [`send_together`]), and
    /// the reactor need not lock it (callgrind, S1: about 40 instructions per poll turn). A
    /// push after the read notifies again and so gets a turn of its own.
    pub(crate) fn reset(&self) -> bool {
        self.pending.swap(false, Ordering::AcqRel)
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
        if first && !HELD.with(|held| held.hold(&self.notifier)) {
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

/// Runs `f`, holding back the reactor wake-ups of the replies sent on this thread inside it
/// until `f` returns: then each reactor that got one is woken once.
///
/// A [`ReplyHandle::send`] wakes its reactor when it finds the reactor's queue empty. A
/// thread that answers a whole batch at once (a store's writer after a group commit) would
/// otherwise wake the reactor at its first reply; the reactor drains the few replies queued by
/// then, sleeps, and is woken again by the next one, dozens of times per batch. Inside
/// `send_together` the replies queue up silently and the reactor takes them in one drain.
/// Nothing is lost if `f` panics: the held wake-ups are sent as the panic unwinds. Nested
/// calls wake at the outermost one's end.
///
/// ```
/// use mllp_reactor::{ack, handler_fn, send_together, Client, ClientConfig, Dispatch, Reply};
/// use mllp_reactor::Server;
///
/// // Answer each message from another thread, replies sent together.
/// let handler = handler_fn(|msg, cx| {
///     let handle = cx.defer();
///     let msg = msg.clone();
///     std::thread::spawn(move || send_together(|| handle.send(Reply::Send(ack::accept(&msg)))));
///     Ok(Reply::Deferred)
/// });
/// let server = Server::builder(handler).dispatch(Dispatch::Inline).bind("127.0.0.1:0")?;
/// let addr = server.local_addr();
/// let running = server.spawn()?;
/// let mut client = Client::connect(addr, ClientConfig::default())?;
/// assert_eq!(client.send(b"MSH|^~\\&|A|B|C|D|20260101||ADT^A01|7|P|2.5.1\r")?.code, ack::AckCode::AA);
/// running.shutdown(std::time::Duration::from_secs(5))?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn send_together<R>(f: impl FnOnce() -> R) -> R {
    let _release = Release(HELD.with(Held::begin));
    f()
}

/// Ends a [`send_together`] when dropped, on return or unwind alike: `true` for the
/// outermost call, which wakes what was held.
struct Release(bool);

impl Drop for Release {
    fn drop(&mut self) {
        if self.0 {
            HELD.with(Held::end);
        }
    }
}

thread_local! {
    /// The wake-ups [`send_together`] holds on this thread.
    static HELD: Held = const { Held { active: Cell::new(false), notifiers: RefCell::new(Vec::new()) } };
}

/// The reactors to wake at the end of a [`send_together`], one entry each.
struct Held {
    active: Cell<bool>,
    notifiers: RefCell<Vec<Arc<Notifier>>>,
}

impl Held {
    /// Starts holding; `false` if already holding (a nested call).
    fn begin(&self) -> bool {
        !self.active.replace(true)
    }

    /// Holds `notifier`'s wake-up if holding; `false` (wake now) otherwise.
    fn hold(&self, notifier: &Arc<Notifier>) -> bool {
        if !self.active.get() {
            return false;
        }
        let mut notifiers = self.notifiers.borrow_mut();
        if !notifiers.iter().any(|n| Arc::ptr_eq(n, notifier)) {
            notifiers.push(Arc::clone(notifier));
        }
        true
    }

    /// Stops holding and wakes what was held (the list keeps its capacity).
    fn end(&self) {
        self.active.set(false);
        for notifier in self.notifiers.borrow_mut().drain(..) {
            notifier.notify();
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink whose reactor wake-ups can be counted: the notifier's flag says whether a wake
    /// was sent since the last `reset`.
    fn sink() -> (mio::Poll, Arc<CompletionSink>) {
        let poll = mio::Poll::new().unwrap();
        let waker = mio::Waker::new(poll.registry(), mio::Token(0)).unwrap();
        let sink = Arc::new(CompletionSink::new(Arc::new(Notifier::new(waker))));
        (poll, sink)
    }

    fn woken(sink: &CompletionSink) -> bool {
        sink.notifier().pending.load(Ordering::Acquire)
    }

    fn reply(sink: &Arc<CompletionSink>, seq: u64) {
        ReplyHandle::new(
            Arc::clone(sink),
            ConnectionId {
                index: 1,
                generation: 0,
            },
            seq,
        )
        .send(Reply::Send(Vec::new().into()));
    }

    /// Outside `send_together` the first reply wakes the reactor; inside, no reply does until
    /// the end, and then one wake-up covers them all.
    #[test]
    fn replies_sent_together_wake_the_reactor_once_at_the_end() {
        let (_poll, sink) = sink();
        reply(&sink, 1);
        assert!(woken(&sink), "a lone reply wakes at once");
        assert!(sink.notifier().reset());
        sink.drain_into(&mut Vec::new());

        send_together(|| {
            for seq in 2..10 {
                reply(&sink, seq);
                assert!(!woken(&sink), "woken at reply {seq}, inside send_together");
            }
            // Nested: the inner end wakes nothing.
            send_together(|| reply(&sink, 10));
            assert!(!woken(&sink), "woken at the end of a nested send_together");
        });
        assert!(woken(&sink), "not woken after send_together");
        let mut drained = Vec::new();
        sink.drain_into(&mut drained);
        assert_eq!(drained.len(), 9);
    }

    /// A panic inside `send_together` still wakes the reactor for what was sent, and the
    /// thread sends normally afterwards.
    #[test]
    fn a_panic_inside_send_together_still_wakes() {
        let (_poll, sink) = sink();
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            send_together(|| {
                reply(&sink, 1);
                panic!("handler bug");
            })
        }));
        assert!(caught.is_err());
        assert!(woken(&sink), "the held wake-up was lost in the unwind");
        assert!(sink.notifier().reset());
        sink.drain_into(&mut Vec::new());
        reply(&sink, 2);
        assert!(woken(&sink), "still holding after the panic");
    }
}
