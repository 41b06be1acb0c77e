//! Where a reactor's messages go: [`Dispatcher::Inline`] calls the handler right here, on the
//! reactor thread; [`Dispatcher::Pool`] batches jobs for the [`Pool`], whose threads exist only
//! in that mode. The reactor calls the same four methods either way and never asks which mode
//! it runs in.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::handler::{Dispatch, Handler, call};
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
    },
    /// The handler runs on the server's pool.
    Pool {
        pool: Arc<Pool>,
        /// Jobs of this poll turn, handed to the pool together at its end ([`flush`](Self::flush)).
        batch: Vec<Job>,
        metrics: Metrics,
    },
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
    pub(crate) fn new(
        mode: Dispatch,
        handler: Arc<dyn Handler>,
        pool: Option<Arc<Pool>>,
        slow: Duration,
        metrics: Metrics,
    ) -> Self {
        match (mode, pool) {
            (Dispatch::Pool, Some(pool)) => Self::Pool {
                pool,
                batch: Vec::new(),
                metrics,
            },
            (Dispatch::Inline, _) | (Dispatch::Pool, None) => Self::Inline {
                handler,
                slow,
                metrics,
            },
        }
    }

    /// Hands one message to the handler. Inline: the call's outcome, at once, with the
    /// clock reading taken when the handler returned (the reactor's latest `now`). Pool:
    /// `None`; the outcome comes back through the reactor's completion queue.
    pub(crate) fn dispatch(&mut self, job: Job) -> Option<(Outcome, Instant)> {
        match self {
            Self::Inline {
                handler,
                slow,
                metrics,
            } => {
                // Two readings of its own: the turn's `now` comes before the socket read and
                // the decode, which are not the handler's time.
                let started = Instant::now();
                let outcome = call(&**handler, &job.payload, &job.cx);
                let done = Instant::now();
                let took = done.saturating_duration_since(started);
                metrics.handler_duration.record(took.as_secs_f64());
                if took > *slow {
                    metrics.inline_slow.increment(1);
                }
                Some((outcome, done))
            }
            Self::Pool { batch, .. } => {
                batch.push(job);
                None
            }
        }
    }

    /// Ends the poll turn: the pool gets this turn's jobs under one lock.
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
