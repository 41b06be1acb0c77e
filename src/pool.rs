//! Handler threads: a job queue, `catch_unwind`, and replacement of stuck workers.
//!
//! Workers pull [`Job`]s, run the handler, and send a [`Completion`] back over a channel,
//! then wake the reactor through a [`Notifier`] that coalesces wake-ups (one `eventfd` write per
//! batch of completions, not per message).
//!
//! A thread cannot be killed (seed-spec §3): when a message's handler deadline passes, the
//! reactor moves the connection on and calls [`Pool::on_handler_timeout`], which starts a
//! replacement worker if fewer than `workers` healthy ones remain, up to `max_extra_workers`
//! threads beyond `workers`. A worker counts as stuck once the deadline of the job it runs has
//! passed: the same deadline the connection uses, which runs from dispatch, so a job that
//! waited in the queue counts as stuck although its handler has run for less than
//! `handler_timeout`. When a stuck handler finally returns, its result is discarded by the
//! connection (counted as late) and a surplus worker retires, so the pool returns to `workers`
//! threads. If `max_extra_workers` handlers are stuck at once, no more threads are started and
//! new messages wait in the queue (and time out there, answered by AE NAKs) until one returns.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use bytes::Bytes;

use crate::ack::{self, AckCode};
use crate::connection::{NakPolicy, Outcome};
use crate::error::ExceptionReason;
use crate::handler::{ConnectionId, Context, Handler};
use crate::telemetry::Metrics;

/// A message for the handler.
#[derive(Debug)]
pub(crate) struct Job {
    pub(crate) id: ConnectionId,
    pub(crate) seq: u64,
    pub(crate) payload: Bytes,
    pub(crate) cx: Context,
    /// Past this, a worker that has not started the job skips it: the connection has already
    /// answered it with a timeout NAK, and running it now could duplicate the message.
    pub(crate) deadline: Instant,
}

/// A worker's result for a job.
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
}

impl Notifier {
    pub(crate) fn new(waker: mio::Waker) -> Self {
        Self {
            waker,
            pending: AtomicBool::new(false),
        }
    }

    /// Wakes the reactor unless a wake-up is already on its way.
    pub(crate) fn notify(&self) {
        if !self.pending.swap(true, Ordering::AcqRel) {
            // A failed wake leaves the completion queued; the reactor's next wake-up or
            // timer tick drains it. Nothing better can be done from a worker.
            let _ = self.waker.wake();
        }
    }

    /// Called by the reactor *before* draining its queues, so a completion sent during the
    /// drain triggers a fresh wake-up.
    pub(crate) fn reset(&self) {
        self.pending.store(false, Ordering::Release);
    }
}

/// `Slot` states, in an `AtomicU64` per worker slot.
const SLOT_FREE: u64 = u64::MAX;
const SLOT_IDLE: u64 = 0;

struct Queue {
    jobs: VecDeque<Job>,
    closed: bool,
    /// Workers blocked in `available.wait`. `Condvar::notify_one` is a futex syscall even with
    /// no waiter, so `submit` only notifies when this is non-zero: under load (workers busy)
    /// handing a job over costs one uncontended lock and no syscall.
    waiting: usize,
}

struct Shared {
    queue: Mutex<Queue>,
    available: Condvar,
    handler: Arc<dyn Handler>,
    completions: Sender<Completion>,
    notifier: Arc<Notifier>,
    metrics: Metrics,
    nak_policy: NakPolicy,
    epoch: Instant,
    /// One per possible worker: `SLOT_FREE`, `SLOT_IDLE`, or the deadline of the job its
    /// handler is running, as microseconds since `epoch` (plus one).
    slots: Box<[AtomicU64]>,
    /// Healthy workers wanted.
    target: usize,
    /// Threads alive (healthy or stuck).
    live: AtomicUsize,
    /// Threads alive changes, for [`Pool::join`].
    exited: Condvar,
}

/// The handler thread pool of one server.
pub(crate) struct Pool {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("target", &self.shared.target)
            .field("live", &self.shared.live.load(Ordering::Relaxed))
            .finish()
    }
}

/// Pool settings, checked by the builder.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PoolConfig {
    pub(crate) workers: usize,
    pub(crate) max_extra_workers: usize,
    pub(crate) nak_policy: NakPolicy,
}

impl Pool {
    /// Starts `config.workers` threads.
    pub(crate) fn start(
        config: PoolConfig,
        handler: Arc<dyn Handler>,
        completions: Sender<Completion>,
        notifier: Arc<Notifier>,
        metrics: Metrics,
    ) -> std::io::Result<Self> {
        let slots = (0..config.workers + config.max_extra_workers)
            .map(|_| AtomicU64::new(SLOT_FREE))
            .collect();
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                jobs: VecDeque::new(),
                closed: false,
                waiting: 0,
            }),
            available: Condvar::new(),
            handler,
            completions,
            notifier,
            metrics,
            nak_policy: config.nak_policy,
            epoch: Instant::now(),
            slots,
            target: config.workers,
            live: AtomicUsize::new(0),
            exited: Condvar::new(),
        });
        let pool = Self { shared };
        for slot in 0..config.workers {
            pool.spawn(slot)?;
        }
        Ok(pool)
    }

    /// Queues a job for the next free worker.
    pub(crate) fn submit(&self, job: Job) {
        let mut queue = lock(&self.shared.queue);
        queue.jobs.push_back(job);
        let wake = queue.waiting > 0;
        drop(queue);
        if wake {
            self.shared.available.notify_one();
        }
    }

    /// A handler overran its deadline: start a replacement if fewer than `workers` healthy
    /// workers remain and a slot is free. Returns whether one was started.
    pub(crate) fn on_handler_timeout(&self, now: Instant) -> bool {
        let shared = &self.shared;
        let stuck = shared.stuck_workers(now, usize::MAX);
        let live = shared.live.load(Ordering::Acquire);
        if live.saturating_sub(stuck) >= shared.target {
            return false;
        }
        let free = shared
            .slots
            .iter()
            .position(|s| s.load(Ordering::Acquire) == SLOT_FREE);
        match free.map(|slot| self.spawn(slot)) {
            Some(Ok(())) => {
                shared.metrics.workers_replaced.increment(1);
                true
            }
            _ => false,
        }
    }

    /// Stops taking work: queued jobs are dropped (never run, so never answered: the peer
    /// resends), running handlers finish, and every worker exits when idle.
    pub(crate) fn close(&self) {
        let dropped = {
            let mut queue = lock(&self.shared.queue);
            queue.closed = true;
            std::mem::take(&mut queue.jobs)
        };
        drop(dropped);
        self.shared.available.notify_all();
    }

    /// Waits until every worker has exited or `deadline` passes; returns how many remain
    /// (stuck in a handler; they are detached and exit when it returns).
    pub(crate) fn join(&self, deadline: Instant) -> usize {
        let mut queue = lock(&self.shared.queue);
        loop {
            let live = self.shared.live.load(Ordering::Acquire);
            let now = Instant::now();
            if live == 0 || now >= deadline {
                return live;
            }
            queue = match self.shared.exited.wait_timeout(queue, deadline - now) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }

    fn spawn(&self, slot: usize) -> std::io::Result<()> {
        let shared = Arc::clone(&self.shared);
        if shared.slots[slot]
            .compare_exchange(SLOT_FREE, SLOT_IDLE, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Ok(());
        }
        shared.live.fetch_add(1, Ordering::AcqRel);
        let spawned = std::thread::Builder::new()
            .name(format!("mllp-worker-{slot}"))
            .spawn(move || worker(&shared, slot));
        if let Err(e) = spawned {
            self.shared.slots[slot].store(SLOT_FREE, Ordering::Release);
            self.shared.live.fetch_sub(1, Ordering::AcqRel);
            return Err(e);
        }
        Ok(())
    }
}

impl Shared {
    fn micros_since_epoch(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_micros() as u64 + 1
    }

    /// Workers running a job whose deadline has passed, skipping slot `skip`.
    fn stuck_workers(&self, now: Instant, skip: usize) -> usize {
        let limit = self.micros_since_epoch(now);
        self.slots
            .iter()
            .enumerate()
            .filter(|(i, s)| {
                let v = s.load(Ordering::Acquire);
                *i != skip && v != SLOT_FREE && v != SLOT_IDLE && v <= limit
            })
            .count()
    }

    fn next_job(&self) -> Option<Job> {
        let mut queue = lock(&self.queue);
        loop {
            if let Some(job) = queue.jobs.pop_front() {
                return Some(job);
            }
            if queue.closed {
                return None;
            }
            queue.waiting += 1;
            queue = match self.available.wait(queue) {
                Ok(guard) => guard,
                Err(poisoned) => poisoned.into_inner(),
            };
            queue.waiting -= 1;
        }
    }

    /// After a job: retire if enough healthy workers remain without this one (a replacement
    /// took over while this one was stuck).
    fn should_retire(&self, slot: usize) -> bool {
        let live = self.live.load(Ordering::Acquire);
        live > self.target && live - 1 - self.stuck_workers(Instant::now(), slot) >= self.target
    }

    fn exit(&self, slot: usize) {
        self.slots[slot].store(SLOT_FREE, Ordering::Release);
        let _guard = lock(&self.queue);
        self.live.fetch_sub(1, Ordering::AcqRel);
        self.exited.notify_all();
    }
}

fn worker(shared: &Shared, slot: usize) {
    while let Some(job) = shared.next_job() {
        let started = Instant::now();
        shared.metrics.handler_queue.record(
            started
                .saturating_duration_since(job.cx.received_at)
                .as_secs_f64(),
        );
        let outcome = if started >= job.deadline {
            Outcome::Expired
        } else {
            shared.slots[slot].store(shared.micros_since_epoch(job.deadline), Ordering::Release);
            shared.metrics.workers_busy.increment(1.0);
            let outcome = run(shared, &job);
            shared.metrics.workers_busy.decrement(1.0);
            shared
                .metrics
                .handler_duration
                .record(started.elapsed().as_secs_f64());
            shared.slots[slot].store(SLOT_IDLE, Ordering::Release);
            outcome
        };
        // A send fails only when the reactor is gone (server stopped): nothing to answer.
        if shared
            .completions
            .send(Completion {
                id: job.id,
                seq: job.seq,
                outcome,
            })
            .is_err()
        {
            break;
        }
        shared.notifier.notify();
        if shared.should_retire(slot) {
            break;
        }
    }
    shared.exit(slot);
}

/// Runs the handler, turning an error or a panic into a failed outcome with its AE NAK.
fn run(shared: &Shared, job: &Job) -> Outcome {
    let (reason, detail) = match catch_unwind(AssertUnwindSafe(|| {
        shared.handler.handle(&job.payload, &job.cx)
    })) {
        Ok(Ok(reply)) => return Outcome::Reply(reply),
        Ok(Err(e)) => (ExceptionReason::HandlerError, e.to_string()),
        Err(panic) => {
            let text = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "handler panicked".to_owned());
            (ExceptionReason::Panic, text)
        }
    };
    let nak = match shared.nak_policy {
        NakPolicy::Send => Some(ack::nak(&job.payload, AckCode::AE, &detail)),
        NakPolicy::Silent => None,
    };
    Outcome::Failed {
        reason,
        detail,
        nak,
    }
}

/// Locks, ignoring poison: the queue holds plain data that a panicking holder cannot leave
/// half-updated (handlers never run under this lock).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
