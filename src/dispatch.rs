//! Where a reactor's messages go: [`Dispatcher::Inline`] calls the handler right here, on the
//! reactor thread; [`Dispatcher::Pool`] batches jobs for the [`Pool`], whose threads exist only
//! in that mode. The reactor calls the same four methods either way and never asks which mode
//! it runs in.

use std::cell::Cell;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::completion::CompletionSink;
use crate::connection::Dispatched;
use crate::handler::{Context, Dispatch, Handler, call};
use crate::link::Link;
use crate::outcome::{ConnectionId, Outcome};
use crate::pool::{Job, Pool};
use crate::telemetry::Metrics;

/// One reactor's way to its handler.
pub(crate) enum Dispatcher {
    /// The handler runs on the reactor thread, one call at a time.
    Inline {
        handler: Arc<dyn Handler>,
        /// Calls longer than this count as slow.
        slow: Duration,
        metrics: Metrics,
        /// The one `Context` of the reactor's inline calls, filled in per message: a call
        /// borrows it, so a message costs no `Arc` of the completion sink and no `Job`
        /// (callgrind, S1).
        cx: Box<Context>,
        /// The connection whose peer and local addresses `cx` holds: a message from the same
        /// connection as the last one (every message at one connection) leaves them (about 20
        /// instructions per message, callgrind, S1).
        addressed: Option<ConnectionId>,
    },
    /// The handler runs on the server's pool.
    Pool {
        pool: Arc<Pool>,
        /// Jobs of this poll turn, handed to the pool together at its end ([`flush`](Self::flush)).
        batch: Vec<Job>,
        metrics: Metrics,
        /// Where the jobs' completions go (each job carries a share).
        sink: Arc<CompletionSink>,
    },
}

/// One message for the handler, as the reactor hands it over: what the connection
/// dispatched, and the link it came from (read where the `Context` is filled in, not copied
/// on the way).
#[derive(Debug)]
pub(crate) struct Message<'a> {
    pub(crate) link: &'a Link,
    pub(crate) local: SocketAddr,
    pub(crate) d: Dispatched,
    pub(crate) received_time: SystemTime,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Inline { .. } => f.write_str("Dispatcher::Inline"),
            Self::Pool { batch, .. } => f
                .debug_struct("Dispatcher::Pool")
                .field("batch", &batch.len())
                .finish_non_exhaustive(),
        }
    }
}

impl Dispatcher {
    /// The dispatcher for `mode`: `pool` is `Some` exactly in [`Dispatch::Pool`] mode.
    /// Completions of deferred replies and pool jobs go to `sink`.
    pub(crate) fn new(
        mode: Dispatch,
        handler: Arc<dyn Handler>,
        pool: Option<Arc<Pool>>,
        sink: Arc<CompletionSink>,
        slow: Duration,
        metrics: Metrics,
    ) -> Self {
        match (mode, pool) {
            (Dispatch::Pool, Some(pool)) => Self::Pool {
                pool,
                batch: Vec::new(),
                metrics,
                sink,
            },
            (Dispatch::Inline, _) | (Dispatch::Pool, None) => {
                let nowhere = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);
                let now = Instant::now();
                Self::Inline {
                    handler,
                    slow,
                    metrics,
                    cx: Box::new(Context {
                        peer: nowhere,
                        local: nowhere,
                        connection: ConnectionId {
                            index: 0,
                            generation: 0,
                        },
                        sequence: 0,
                        received_at: now,
                        received_time: SystemTime::UNIX_EPOCH,
                        sink,
                        deferred: Cell::new(false),
                        identity: None,
                    }),
                    addressed: None,
                }
            }
        }
    }

    /// Hands one message to the handler. Inline: the call's outcome, at once, with the
    /// clock reading taken when the handler returned (the reactor's latest `now`). Pool:
    /// `None`; the outcome comes back through the reactor's completion queue.
    ///
    /// `since` is the reactor's latest clock reading before the call (the poll turn's, or
    /// the end of the previous inline call or write): an inline call is timed from it, so
    /// one clock reading per message times it. What the reactor did since that reading
    /// (this message's read and decode, a few microseconds) counts in the call's time; a
    /// second reading before the call would cost about 30 instructions per message
    /// (callgrind, S1) to leave them out.
    pub(crate) fn dispatch(
        &mut self,
        m: Message<'_>,
        since: Instant,
    ) -> Option<(Outcome, Instant)> {
        let Message {
            link,
            local,
            d,
            received_time,
        } = m;
        match self {
            Self::Inline {
                handler,
                slow,
                metrics,
                cx,
                addressed,
            } => {
                if *addressed != Some(link.id) {
                    cx.peer = link.peer();
                    cx.local = local;
                    cx.connection = link.id;
                    *addressed = Some(link.id);
                }
                cx.sequence = d.seq;
                cx.received_at = d.received_at;
                cx.received_time = received_time;
                cx.deferred.set(false);
                cx.identity = link.identity();
                let outcome = call(&**handler, &d.payload, cx);
                if cx.identity.is_some() {
                    cx.identity = None; // not kept past the call
                }
                let done = Instant::now();
                let is_slow = if metrics.timings {
                    let took = done.saturating_duration_since(since);
                    metrics.handler_duration.record(took.as_secs_f64());
                    took > *slow
                } else {
                    // No subtraction: a comparison of instants.
                    since.checked_add(*slow).is_some_and(|limit| done > limit)
                };
                if is_slow {
                    metrics.inline_slow.increment(1);
                }
                Some((outcome, done))
            }
            Self::Pool { batch, sink, .. } => {
                let deadline = d.deadline();
                batch.push(Job {
                    id: link.id,
                    seq: d.seq,
                    payload: d.payload,
                    cx: Context {
                        peer: link.peer(),
                        local,
                        connection: link.id,
                        sequence: d.seq,
                        received_at: d.received_at,
                        received_time,
                        sink: Arc::clone(sink),
                        deferred: Cell::new(false),
                        identity: link.identity(),
                    },
                    deadline,
                });
                None
            }
        }
    }

    /// Ends the poll turn: the pool gets this turn's jobs under one lock.
    #[inline]
    pub(crate) fn flush(&mut self) {
        if let Self::Pool { pool, batch, .. } = self {
            pool.submit_all(batch);
        }
    }

    /// Connection `id` closed: its jobs not yet started never run (nobody would get the
    /// answer; the sender resends).
    pub(crate) fn cancel(&mut self, id: ConnectionId) {
        if let Self::Pool {
            pool,
            batch,
            metrics,
            ..
        } = self
        {
            let before = batch.len();
            batch.retain(|j| j.id != id);
            metrics
                .jobs_dropped
                .increment((before - batch.len()) as u64);
            pool.cancel(id, None);
        }
    }

    /// Connection `id` abandoned a handler call at its deadline. Inline there is nothing to do
    /// (the call already returned); on the pool, a job still queued is dropped, and one that a
    /// worker runs may mean a stuck worker, to be replaced.
    pub(crate) fn abandoned(&mut self, id: ConnectionId, now: Instant) {
        if let Self::Pool { pool, .. } = self
            && pool.cancel(id, None) == 0
        {
            pool.on_abandoned(now);
        }
    }
}
