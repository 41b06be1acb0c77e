//! Handler threads: a batched job queue, `catch_unwind`, and replacement of stuck workers.
//!
//! The reactor hands over the jobs of one poll turn under one lock with at most one wake-up
//! ([`Pool::submit_all`]). A woken worker takes one job, wakes one more worker if work is left
//! (so a burst fans out without the reactor paying a wake-up per job), and keeps taking jobs
//! until the queue is empty before it sleeps. A worker never holds jobs it has not started:
//! behind a handler that blocks they would wait while other workers idle. Each result goes
//! straight back to the job's reactor ([`CompletionSink::push`]): one uncontended lock, and the
//! reactor is woken at most once per batch of results however many arrive before it runs. The
//! connection turns results into replies and NAKs.
//!
//! One pool serves every reactor of a server: each job carries where its completion goes.
//! A pool per reactor would split the blocking-handler capacity `workers` N ways, so one busy
//! reactor could not use the idle workers of another.
//!
//! A thread cannot be killed: when a message's handler deadline passes, the reactor moves the
//! connection on and calls [`Pool::on_abandoned`], which starts a replacement worker if fewer
//! than `workers` healthy ones remain, up to `max_extra_workers` threads beyond `workers`. A
//! worker counts as stuck once the deadline of the job it runs has passed. When a stuck handler
//! finally returns, its result is discarded by the connection (counted as late) and a surplus
//! worker retires, so the pool returns to `workers` threads. If `max_extra_workers` handlers
//! are stuck at once, no more threads are started and new messages wait in the queue (and time
//! out there, answered by AE NAKs) until one returns.
//!
//! The queue holds at most one job per connection (a connection dispatches its next message
//! only once the handler call for the previous one returned), so it is bounded by
//! `max_connections`, and its payloads count in the server's memory budget through their
//! connections. A job whose connection closed or whose message was already answered (timed
//! out) is removed from the queue ([`Pool::cancel`]) and never runs: a handler never sees a
//! message after its sender got a NAK for it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use bytes::Bytes;

use crate::completion::Completion;
use crate::handler::{Context, Handler, call};
use crate::outcome::{ConnectionId, Outcome};
use crate::sync::lock;
use crate::telemetry::Metrics;

/// A message for the handler.
#[derive(Debug)]
pub(crate) struct Job {
    pub(crate) id: ConnectionId,
    pub(crate) seq: u64,
    pub(crate) payload: Bytes,
    /// Carries where the completion goes (`cx.sink`, the job's reactor).
    pub(crate) cx: Context,
    /// Past this, a worker that has not started the job skips it: the connection has already
    /// answered it with a timeout NAK, and running it now could duplicate the message.
    pub(crate) deadline: Instant,
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
    metrics: Metrics,
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
}

impl Pool {
    /// Starts `config.workers` threads.
    pub(crate) fn start(
        config: PoolConfig,
        handler: Arc<dyn Handler>,
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
            metrics,
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

    /// Queues the jobs of one poll turn under one lock, waking at most one worker (which
    /// wakes another if work is left); leaves `jobs` empty.
    pub(crate) fn submit_all(&self, jobs: &mut Vec<Job>) {
        if jobs.is_empty() {
            return;
        }
        let mut queue = lock(&self.shared.queue);
        queue.jobs.extend(jobs.drain(..));
        let wake = queue.waiting > 0;
        drop(queue);
        if wake {
            self.shared.available.notify_one();
        }
    }

    /// Removes the queued job for message `seq` of connection `id` (any message when `seq` is
    /// `None`): its connection closed or its message was answered already. Returns how many
    /// jobs were removed (and counted as dropped).
    pub(crate) fn cancel(&self, id: ConnectionId, seq: Option<u64>) -> usize {
        let removed = {
            let mut queue = lock(&self.shared.queue);
            let before = queue.jobs.len();
            queue
                .jobs
                .retain(|j| !(j.id == id && seq.is_none_or(|s| s == j.seq)));
            before - queue.jobs.len()
        };
        self.shared.metrics.jobs_dropped.increment(removed as u64);
        removed
    }

    /// A handler call overran its deadline and was abandoned: start a replacement if fewer
    /// than `workers` healthy workers remain and a slot is free. Returns whether one was
    /// started.
    pub(crate) fn on_abandoned(&self, now: Instant) -> bool {
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

    /// Blocks until there is work, then takes one job. Returns `None` once the pool is
    /// closed.
    fn next_job(&self) -> Option<Job> {
        let mut queue = lock(&self.queue);
        loop {
            if let Some(job) = queue.jobs.pop_front() {
                // Fan a burst out: one wake-up per job taken, not per job submitted.
                let wake = !queue.jobs.is_empty() && queue.waiting > 0;
                drop(queue);
                if wake {
                    self.available.notify_one();
                }
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
        // `live` may change under us (a replacement spawning): saturate rather than underflow.
        live > self.target
            && live
                .saturating_sub(1)
                .saturating_sub(self.stuck_workers(Instant::now(), slot))
                >= self.target
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
        let timings = shared.metrics.timings;
        if timings {
            shared.metrics.handler_queue.record(
                started
                    .saturating_duration_since(job.cx.received_at)
                    .as_secs_f64(),
            );
        }
        let outcome = if started >= job.deadline {
            Outcome::Expired
        } else {
            shared.slots[slot].store(shared.micros_since_epoch(job.deadline), Ordering::Release);
            shared.metrics.workers_busy.increment(1.0);
            let outcome = call(&*shared.handler, &job.payload, &job.cx);
            shared.metrics.workers_busy.decrement(1.0);
            if timings {
                shared
                    .metrics
                    .handler_duration
                    .record(started.elapsed().as_secs_f64());
            }
            shared.slots[slot].store(SLOT_IDLE, Ordering::Release);
            outcome
        };
        // The payload goes before the completion: the reactor stops counting the message's
        // memory against the budget when the completion arrives, and a worker preempted by
        // the wake-up it sends would otherwise hold the frame's buffer (up to the largest
        // frame) uncounted until it runs again.
        drop(job.payload);
        job.cx.sink.push(Completion {
            id: job.id,
            seq: job.seq,
            outcome,
        });
        if shared.should_retire(slot) {
            break;
        }
    }
    shared.exit(slot);
}

impl Drop for Pool {
    /// Closes the queue so no worker stays blocked waiting for work (a reactor that failed,
    /// a spawn that failed half-way). Never blocks: running handlers finish on their own.
    fn drop(&mut self) {
        self.close();
    }
}
