//! One lane's thread: read the backlog page by page, deliver each of the lane's messages with
//! one in flight, record the outcome, move the cursor.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use metrics::{Counter, Gauge, Histogram};
use mllp_reactor::client::Ack;
use mllp_reactor::{Backoff, Client, ClientConfig, ClientError};

use crate::StoreId;
use crate::forward::outcome::{Action, Outcome};
use crate::forward::state::{DeliveryState, Final, Letter, Pending};
use crate::forward::{
    DestinationState, ForwardConfig, ForwardError, ForwardEvent, Shared, Signal, now_us,
};

/// Attempt lines kept per message for its dead letter: the latest ones (a message retried
/// forever for a week must not grow without bound).
const MAX_HISTORY: usize = 64;

/// What happened to one message.
enum Delivery {
    Delivered(Attempts),
    Dead(Attempts),
    Stopped,
}

/// The record of one message's attempts.
#[derive(Default)]
struct Attempts {
    count: u32,
    first_us: i64,
    last_us: i64,
    reason: String,
    reply: Option<Bytes>,
    history: VecDeque<String>,
}

impl Attempts {
    fn with_letter<T>(&self, f: impl FnOnce(&Letter<'_>) -> T) -> T {
        let mut history = String::new();
        for line in &self.history {
            history.push_str(line);
            history.push('\n');
        }
        f(&Letter {
            attempts: self.count,
            first_attempt_us: self.first_us,
            last_attempt_us: self.last_us,
            reason: &self.reason,
            reply: self.reply.as_deref(),
            history: &history,
        })
    }
}

/// What a turn of the loop did.
enum Turn {
    Worked,
    Idle(u64),
    Stopped,
}

/// One lane's metric handles, registered once.
struct LaneMetrics {
    queue: Gauge,
    oldest: Gauge,
    delivered: [Counter; 2],
    attempts: Vec<Counter>,
    dead_letters: Counter,
    delivery: Histogram,
}

impl LaneMetrics {
    fn register(destination: &str, lane: u16) -> Self {
        use crate::forward::telemetry::*;
        let d = destination.to_owned();
        let l = lane.to_string();
        let labels = [("destination", d), ("lane", l)];
        let with = |key: &'static str, value: &'static str| {
            let mut all = labels.to_vec();
            all.push((key, value.to_owned()));
            all
        };
        Self {
            queue: metrics::gauge!(QUEUE_MESSAGES, &labels),
            oldest: metrics::gauge!(OLDEST_AGE_SECONDS, &labels),
            delivered: [
                metrics::counter!(DELIVERED_TOTAL, &with("code", "AA")),
                metrics::counter!(DELIVERED_TOTAL, &with("code", "CA")),
            ],
            attempts: Outcome::LABELS
                .iter()
                .map(|o| metrics::counter!(ATTEMPTS_TOTAL, &with("outcome", o)))
                .collect(),
            dead_letters: metrics::counter!(DEAD_LETTERS_TOTAL, &labels),
            delivery: metrics::histogram!(DELIVERY_SECONDS, &labels),
        }
    }
}

/// A lane of a destination, run on its own thread by [`Lane::run`].
pub(crate) struct Lane<S> {
    dest: Arc<Shared>,
    lane: u16,
    state: S,
    signal: Arc<Signal>,
    config: ForwardConfig,
    client_config: ClientConfig,
    client: Option<Client>,
    metrics: LaneMetrics,
    /// Whether the lane holds its exclusive right to deliver (see
    /// [`DeliveryState::acquire`]); dropped after any store error.
    held: bool,
    /// Durable: every message of the lane up to here is done.
    cursor: StoreId,
    /// In memory: every message up to here has been read.
    scanned: StoreId,
    /// In memory: every message of the lane up to here is delivered or dead-lettered; ahead
    /// of `cursor` by at most `config.max_unrecorded` deliveries.
    done: StoreId,
    /// Deliveries between `cursor` and `done`.
    unrecorded: usize,
    /// xorshift64* state for the jitter. INVARIANT: never 0.
    rng: u64,
}

impl<S: DeliveryState> Lane<S> {
    pub(crate) fn new(
        dest: Arc<Shared>,
        lane: u16,
        state: S,
        signal: Arc<Signal>,
        config: ForwardConfig,
    ) -> Self {
        // The client reopens a dropped connection once, at once, on the next send: the lane's
        // own backoff decides when to try again after that fails.
        let client_config = dest.destination.client.clone().reconnect(Some(Backoff::new(
            Duration::ZERO,
            Duration::ZERO,
            1,
        )));
        let metrics = LaneMetrics::register(&dest.destination.name, lane);
        Self {
            lane,
            state,
            signal,
            config,
            client_config,
            client: None,
            metrics,
            held: false,
            cursor: 0,
            scanned: 0,
            done: 0,
            unrecorded: 0,
            rng: RandomState::new().hash_one((Instant::now(), lane)) | 1,
            dest,
        }
    }

    /// Runs until the forwarder stops.
    pub(crate) fn run(mut self) {
        let mut failures = 0u32;
        while !self.signal.is_stopping() {
            if !self.held {
                match self.state.acquire(&self.dest.destination.name, self.lane) {
                    Ok(Some(cursor)) => {
                        self.held = true;
                        self.cursor = cursor;
                        self.scanned = cursor;
                        self.done = cursor;
                        self.unrecorded = 0;
                    }
                    Ok(None) => {
                        // Another node delivers this lane; take over when it lets go.
                        if self.signal.sleep(self.config.lock_retry) {
                            return;
                        }
                        continue;
                    }
                    Err(error) => {
                        failures = failures.saturating_add(1);
                        if self.store_failed(&error, failures) {
                            return;
                        }
                        continue;
                    }
                }
            }
            match self.turn() {
                Ok(Turn::Worked) => failures = 0,
                Ok(Turn::Idle(generation)) => {
                    failures = 0;
                    self.metrics.oldest.set(0.0);
                    self.signal.wait(generation, self.config.poll_interval);
                }
                Ok(Turn::Stopped) => return,
                Err(error) => {
                    failures = failures.saturating_add(1);
                    if self.store_failed(&error, failures) {
                        return;
                    }
                }
            }
        }
    }

    /// After a store error (locked past the busy timeout, disk error, connection lost):
    /// nothing was lost; the lane takes its right to deliver again and starts from its last
    /// durable position, after a pause. Returns whether stopping.
    fn store_failed(&mut self, error: &ForwardError, failures: u32) -> bool {
        self.dest.emit(&ForwardEvent::StoreError {
            destination: &self.dest.destination.name,
            lane: self.lane,
            error,
        });
        self.held = false;
        let pause = self.jitter(self.dest.destination.policy.pause(failures));
        self.signal.sleep(pause)
    }

    fn name(&self) -> &str {
        &self.dest.destination.name
    }

    /// Writes the cursor up to `done`: always when `force`, otherwise only if that needs no
    /// wait (see [`ForwardConfig::max_unrecorded`]).
    fn record(&mut self, name: &str, force: bool) -> Result<(), ForwardError> {
        if self.done <= self.cursor {
            return Ok(());
        }
        let written = if force {
            self.state
                .advance(name, self.lane, self.done)
                .map(|()| true)?
        } else {
            self.state.try_advance(name, self.lane, self.done)?
        };
        if written {
            self.cursor = self.done;
            self.unrecorded = 0;
        }
        Ok(())
    }

    /// Delivers requeued dead letters first, then one page of the backlog.
    fn turn(&mut self) -> Result<Turn, ForwardError> {
        let generation = self.signal.generation();
        let (name, lanes) = (
            self.dest.destination.name.clone(),
            self.dest.destination.lanes,
        );
        if let Some(message) = self.state.next_requeued(&name, self.lane, lanes)? {
            let (end, attempts) = match self.deliver(&message) {
                Delivery::Delivered(a) => (Final::Delivered, a),
                Delivery::Dead(a) => (Final::Dead, a),
                Delivery::Stopped => return Ok(Turn::Stopped),
            };
            attempts
                .with_letter(|letter| self.state.finish_requeued(&name, message.id, end, letter))?;
            return Ok(Turn::Worked);
        }
        let key = self.dest.destination.key;
        let lane = self.lane;
        let keep = move |payload: &[u8]| key.lane(payload, lanes) == lane;
        let page = self.state.read_page(
            self.scanned,
            self.config.page_records,
            self.config.page_bytes,
            &keep,
        )?;
        self.metrics
            .queue
            .set((page.last_id - self.cursor).max(0) as f64);
        if page.scanned_through == self.scanned {
            return Ok(Turn::Idle(generation));
        }
        for message in &page.messages {
            match self.deliver(message) {
                Delivery::Delivered(_) => {
                    self.done = message.id;
                    self.unrecorded += 1;
                    self.record(&name, self.unrecorded >= self.config.max_unrecorded)?;
                }
                Delivery::Dead(attempts) => {
                    attempts.with_letter(|letter| {
                        self.state
                            .dead_letter(&name, lane, message.id, letter, true)
                    })?;
                    self.cursor = message.id;
                    self.done = message.id;
                    self.unrecorded = 0;
                }
                Delivery::Stopped => {
                    // Keep what was delivered: fewer repeats at the next start.
                    self.record(&name, true)?;
                    return Ok(Turn::Stopped);
                }
            }
            self.scanned = message.id;
            self.metrics
                .queue
                .set((page.last_id - self.cursor).max(0) as f64);
        }
        // The rest of the page is other lanes' messages: step over them durably too, so that
        // retention and a restart need not look at them again for this lane. Every page ends
        // with the cursor written.
        self.done = self.done.max(page.scanned_through);
        self.record(&name, true)?;
        self.scanned = page.scanned_through;
        Ok(Turn::Worked)
    }

    /// Sends one message until it is delivered or dead-lettered (or the forwarder stops).
    fn deliver(&mut self, message: &Pending) -> Delivery {
        let policy = self.dest.destination.policy;
        let mut attempts = Attempts::default();
        let mut limited = 0u32;
        let mut failures = 0u32;
        loop {
            if self.signal.is_stopping() {
                return Delivery::Stopped;
            }
            self.set_oldest(message);
            let at = now_us();
            if attempts.count == 0 {
                attempts.first_us = at;
            }
            attempts.count = attempts.count.saturating_add(1);
            attempts.last_us = at;
            let result = self.send(&message.payload);
            let outcome = Outcome::of(&result);
            self.metrics.attempts[outcome.index()].increment(1);
            let reason = describe(outcome, &result);
            if attempts.history.len() == MAX_HISTORY {
                attempts.history.pop_front();
            }
            attempts.history.push_back(format!("{at} {reason}"));
            attempts.reply = result.as_ref().ok().map(|ack| ack.raw.clone());
            if let (Some(key), true) = (message.key, outcome.is_answer()) {
                let refusal = (!matches!(outcome, Outcome::Accepted(_))).then_some(reason.as_str());
                self.dest.registry.answer(key, self.dest.index, refusal);
            }
            let Some(action) = policy.action(outcome) else {
                let code =
                    usize::from(matches!(outcome, Outcome::Accepted(c) if c.as_str() == "CA"));
                self.metrics.delivered[code].increment(1);
                let age_us = (now_us() - message.received_at_us).max(0);
                self.metrics.delivery.record(age_us as f64 / 1e6);
                self.dest.set_state(self.lane, DestinationState::Up, None);
                attempts.reason = reason;
                return Delivery::Delivered(attempts);
            };
            let dead = match action {
                Action::DeadLetter => true,
                Action::Retry => {
                    limited += 1;
                    limited >= policy.max_attempts.max(1)
                }
                Action::RetryForever => false,
            };
            if let Err(e) =
                self.state
                    .last_error(self.name().to_owned().as_str(), self.lane, &reason, at)
            {
                // Only `forward status` misses it; the delivery itself goes on.
                self.dest.emit(&ForwardEvent::StoreError {
                    destination: self.name(),
                    lane: self.lane,
                    error: &e,
                });
            }
            if dead {
                if let Some(key) = message.key {
                    self.dest
                        .registry
                        .answer(key, self.dest.index, Some(&reason));
                }
                self.metrics.dead_letters.increment(1);
                self.dest.emit(&ForwardEvent::DeadLetter {
                    destination: self.name(),
                    lane: self.lane,
                    message_id: message.id,
                    attempts: attempts.count,
                    reason: &reason,
                });
                attempts.reason = reason;
                return Delivery::Dead(attempts);
            }
            let state = if outcome.is_transport() {
                DestinationState::Down
            } else {
                DestinationState::Retrying
            };
            self.dest.set_state(self.lane, state, Some(&reason));
            attempts.reason = reason;
            failures += 1;
            let pause = self.jitter(policy.pause(failures));
            let until = Instant::now() + pause;
            // Sleep in steps of at most a second so the oldest-age gauge keeps moving.
            loop {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                if self.signal.sleep(left.min(Duration::from_secs(1))) {
                    return Delivery::Stopped;
                }
                self.set_oldest(message);
            }
        }
    }

    /// One exchange; connects first if there is no client yet.
    fn send(&mut self, payload: &[u8]) -> Result<Ack, ClientError> {
        let client = match &mut self.client {
            Some(client) => client,
            None => self.client.insert(Client::connect(
                self.dest.destination.address.as_str(),
                self.client_config.clone(),
            )?),
        };
        client.send(payload)
    }

    fn set_oldest(&self, message: &Pending) {
        let age_us = (now_us() - message.received_at_us).max(0);
        self.metrics.oldest.set(age_us as f64 / 1e6);
    }

    /// A uniformly random duration between half of `pause` and all of it.
    fn jitter(&mut self, pause: Duration) -> Duration {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let r = self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d);
        let fraction = 0.5 + (r >> 11) as f64 / (1u64 << 53) as f64 / 2.0;
        pause.mul_f64(fraction)
    }
}

/// The outcome and its reason on one line: `AE: unknown patient`, `timeout: …`.
fn describe(outcome: Outcome, result: &Result<Ack, ClientError>) -> String {
    let mut line = String::new();
    match (outcome, result) {
        (Outcome::Accepted(c) | Outcome::Error(c) | Outcome::Rejected(c), Ok(ack)) => {
            line.push_str(c.as_str());
            if let Some(text) = &ack.text {
                let _ = write!(line, ": {text}");
            }
        }
        (_, Err(e)) => {
            let _ = write!(line, "{}: {e}", outcome.as_str());
        }
        (_, Ok(_)) => line.push_str(outcome.as_str()),
    }
    line.replace(['\r', '\n'], " ")
}
