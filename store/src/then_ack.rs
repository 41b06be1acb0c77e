//! [`StoreThenAck`]: the handler that acknowledges a message only once it is stored.

use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use mllp_reactor::ack::{Ack, AckCode};
use mllp_reactor::{ConnectionId, Context, Handler, HandlerError, Reply};

use crate::error::StoreError;
use crate::record::{Record, StoreOutcome};
use crate::writer::Store;

/// Which acknowledgment a stored message gets.
pub trait AckPolicy: Send + Sync + 'static {
    /// The acknowledgment of `message`, stored as `outcome`, and the code it carries.
    /// Runs on the store's writer thread: it should be quick.
    fn ack(&self, message: &[u8], outcome: &StoreOutcome) -> (AckCode, Bytes);

    /// The acknowledgment of `message` whatever it is stored as, for a policy whose
    /// [`ack`](Self::ack) does not look at the outcome: [`StoreThenAck`] then builds it on
    /// the thread that received the message, before the message is stored, and the store's
    /// writer, the one thread every message passes through, only sends it once the commit
    /// returned (it is dropped unsent if the commit fails). `None` (the default): `ack` is
    /// called on the writer after the commit.
    fn ack_before_commit(&self, message: &[u8]) -> Option<(AckCode, Bytes)> {
        let _ = message;
        None
    }
}

/// The default [`AckPolicy`]: AA for every stored message (resends included), built by
/// [`Ack`]; AR when the message has no usable MSH-10 (stored all the same), since the sender
/// cannot be told which message is meant.
#[derive(Clone, Copy, Debug, Default)]
pub struct AcceptStored;

impl AckPolicy for AcceptStored {
    fn ack(&self, message: &[u8], _outcome: &StoreOutcome) -> (AckCode, Bytes) {
        Ack::new(AckCode::AA).build_coded(message)
    }

    /// Always: the ACK does not depend on the outcome (built off the writer thread, which
    /// at S3 had spent 6 % of its instructions on it: `BENCHMARKS.md`, issue #21).
    fn ack_before_commit(&self, message: &[u8]) -> Option<(AckCode, Bytes)> {
        Some(Ack::new(AckCode::AA).build_coded(message))
    }
}

/// What [`StoreThenAck`] answered for one stored message, reported to
/// [`on_ack`](StoreThenAck::on_ack) on the store's writer thread after the reply was handed
/// to the server. Failures are not reported here: they reach the server's observer as a
/// message exception, like any handler failure.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Acknowledged<'a> {
    /// The connection the message came on.
    pub connection_id: ConnectionId,
    /// The message's sequence number on its connection.
    pub sequence: u64,
    /// The sender's address.
    pub peer: SocketAddr,
    /// The code of the acknowledgment sent (AR for a message without a usable MSH-10).
    pub code: AckCode,
    /// Where the message was stored.
    pub outcome: StoreOutcome,
    /// The message.
    pub message: &'a [u8],
}

type OnAck = Box<dyn Fn(&Acknowledged<'_>) + Send + Sync>;

/// A [`Handler`] that stores every message in a [`Store`] and acknowledges it only once it
/// is committed: AA (or what its [`AckPolicy`] builds), or, when the commit failed, a failure
/// that the server answers under its NAK policy (AE by default). Never AA for a message that
/// is not stored.
///
/// ```text
///  reactor thread                       store writer thread
///  handle(msg) ── submit(record) ──▶ queue ──▶ commit batch ──┬─ Ok  → ReplyHandle::send(AA)
///    └─ Reply::Deferred                                        └─ Err → ReplyHandle::fail(…)
/// ```
///
/// The handler never blocks: it hands the message to the store's writer thread and returns
/// [`Reply::Deferred`]. The writer commits a whole batch in one transaction, then completes
/// each message: the [`AckPolicy`]'s ACK (AA by default; built before the commit on the
/// receiving thread where the policy allows, [`AckPolicy::ack_before_commit`], and only sent
/// by the writer) once committed, or
/// [`ReplyHandle::fail`](mllp_reactor::ReplyHandle::fail) when the commit failed (never an AA then). A failure is answered by
/// the server like any handler failure, so its [`NakPolicy`](mllp_reactor::NakPolicy) and
/// `expose_handler_errors` apply (by default the sender reads a generic "application error";
/// the store error's full text, which may name the database's user, host and database, goes
/// to the server's message-exception event, that is, to the operator's log). Meanwhile the
/// connection keeps reading and handing over its next messages (up to `max_in_flight`);
/// replies still go out in order.
///
/// Use it with [`Dispatch::Inline`](mllp_reactor::Dispatch::Inline): it never blocks. Size
/// the store's queue with [`StoreConfig::for_server`](crate::StoreConfig::for_server), so
/// that the server's own caps on messages in flight and buffered bytes bite first (then
/// reading stops and TCP pushes back on senders). A store that still refuses a message
/// (closed, or full despite that) fails it at once.
///
/// ```
/// use std::sync::Arc;
/// use mllp_reactor::{ack::AckCode, Client, ClientConfig, Dispatch, Server};
/// use mllp_store::{OpenOptions, Store, StoreConfig, StoreSpec, StoreThenAck};
///
/// let dir = std::env::temp_dir().join(format!("mllp-doc-then-ack-{}", std::process::id()));
/// std::fs::create_dir_all(&dir)?;
/// let spec = StoreSpec::parse(dir.join("s.db").to_str().unwrap())?;
/// let config = StoreConfig::default().for_server(64, Dispatch::Inline.default_max_in_flight(), 1 << 20);
/// let store = Arc::new(Store::open(&spec, &OpenOptions::default(), config)?);
///
/// let handler = StoreThenAck::new(Arc::clone(&store))
///     .on_ack(|acked| println!("{} stored as {}", acked.code, acked.outcome.id));
/// let server = Server::builder(handler).dispatch(Dispatch::Inline).bind("127.0.0.1:0")?;
/// let addr = server.local_addr();
/// let running = server.spawn()?;
/// let mut client = Client::connect(addr, ClientConfig::default())?;
/// let reply = client.send(b"MSH|^~\\&|A|B|C|D|20260101||ADT^A01|7|P|2.5.1\r")?;
/// assert_eq!(reply.code, AckCode::AA);
/// running.shutdown(std::time::Duration::from_secs(5))?;
/// store.close(std::time::Duration::from_secs(5))?;
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct StoreThenAck<P = AcceptStored> {
    store: Arc<Store>,
    /// What each message's callback needs: one reference count per message.
    reply: Arc<Replier<P>>,
}

/// How a stored message is answered, on the writer thread.
struct Replier<P> {
    policy: P,
    on_ack: OnceLock<OnAck>,
}

impl StoreThenAck {
    /// Stores into `store` and acknowledges with [`AcceptStored`].
    pub fn new(store: Arc<Store>) -> Self {
        Self::with_policy(store, AcceptStored)
    }
}

impl<P: AckPolicy> StoreThenAck<P> {
    /// Stores into `store` and acknowledges with `policy`.
    pub fn with_policy(store: Arc<Store>, policy: P) -> Self {
        Self {
            store,
            reply: Arc::new(Replier {
                policy,
                on_ack: OnceLock::new(),
            }),
        }
    }

    /// Calls `f` for every stored message with the acknowledgment sent (on the store's
    /// writer thread: it must be quick), e.g. to log an AR. Only the first `on_ack` counts.
    pub fn on_ack(self, f: impl Fn(&Acknowledged<'_>) + Send + Sync + 'static) -> Self {
        let _ = self.reply.on_ack.set(Box::new(f));
        self
    }

    /// The store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }
}

impl<P> fmt::Debug for StoreThenAck<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreThenAck")
            .field("store", &self.store)
            .field("on_ack", &self.reply.on_ack.get().is_some())
            .finish_non_exhaustive()
    }
}

impl<P: AckPolicy> Handler for StoreThenAck<P> {
    fn handle(&self, message: &Bytes, cx: &Context) -> Result<Reply, HandlerError> {
        let reply = cx.defer();
        let payload = message.clone();
        let replier = Arc::clone(&self.reply);
        let peer = cx.peer_addr();
        let prebuilt = self.reply.policy.ack_before_commit(message);
        let done: crate::submit::Done = Box::new(move |result| match result {
            Ok(outcome) => {
                let (code, ack) =
                    prebuilt.unwrap_or_else(|| replier.policy.ack(&payload, &outcome));
                if let Some(on_ack) = replier.on_ack.get() {
                    on_ack(&Acknowledged {
                        connection_id: reply.connection_id(),
                        sequence: reply.sequence(),
                        peer,
                        code,
                        outcome,
                        message: &payload,
                    });
                }
                reply.send(Reply::SendAck(code, ack));
            }
            // Low disk is the operator's state, not a secret: the sender reads why (the AE
            // text names the free and required space), whatever `expose_handler_errors` says.
            Err(error @ StoreError::LowDisk { .. }) => reply.send(Reply::Send(
                Ack::new(AckCode::AE)
                    .text(&NotStored(error).to_string())
                    .build(&payload),
            )),
            Err(error) => reply.fail(NotStored(error)),
        });
        if let Err(refused) = self
            .store
            .submit(Record::from_message(message.clone(), cx), done)
        {
            let reason = refused.reason();
            (refused.into_submission().into_parts().1)(Err(reason));
        }
        Ok(Reply::Deferred)
    }
}

/// The handler error of a message that was not stored: "message not stored: …" with the
/// store's error (one line) as its source.
#[derive(Debug)]
struct NotStored(StoreError);

impl fmt::Display for NotStored {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "message not stored: {}", self.0)
    }
}

impl std::error::Error for NotStored {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}
