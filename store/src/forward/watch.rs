//! Waiting for the destinations' answers to one message: the `--ack-after forwarded` mode.
//!
//! A [`Watcher`] holds one entry per message whose upstream reply waits for the
//! destinations. The entry is made *before* the message is submitted to the store (its id is
//! not known yet, and a lane may deliver it as soon as it is committed), keyed by where it
//! came from ([`WatchKey`]: connection, sequence, receive time). Each lane reports the first
//! answer of its destination for a message it sends; when every destination has answered,
//! or the deadline passes, or the caller cancels (the commit failed), the entry's callback
//! runs once with a [`Verdict`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use mllp_reactor::ack::{Ack, AckCode};
use mllp_reactor::{Handler, Reply, handler_fn};

use crate::record::{Origin, Record, system_time_to_us};
use crate::{Store, StoreError};

/// Identifies a message before it has a store id: connection id, sequence number on the
/// connection, and receive time (µs), which together never repeat across restarts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WatchKey {
    connection_id: u64,
    sequence: u64,
    received_at_us: i64,
}

impl WatchKey {
    /// The key of a message with this origin.
    pub fn of(origin: &Origin) -> Self {
        Self {
            connection_id: origin.connection_id,
            sequence: origin.sequence,
            received_at_us: system_time_to_us(origin.received_at),
        }
    }

    /// The key of a stored row.
    pub(crate) fn from_columns(connection_id: i64, sequence: i64, received_at_us: i64) -> Self {
        Self {
            connection_id: connection_id as u64,
            sequence: sequence as u64,
            received_at_us,
        }
    }
}

/// How the destinations answered a watched message.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Verdict {
    /// Every destination answered AA or CA.
    Accepted,
    /// A destination answered something else (its first answer), or dead-lettered it.
    NotAccepted {
        /// The destination.
        destination: String,
        /// Its answer: `AE: text`, `AR`, …
        reason: String,
    },
    /// Not every destination answered before the deadline; the message stays queued.
    TimedOut {
        /// A destination that had not answered.
        destination: String,
    },
    /// The message was not stored (the commit failed, or the store refused it).
    NotStored(StoreError),
}

/// The callback of a watched message, called exactly once.
pub type OnVerdict = Box<dyn FnOnce(Verdict) + Send + 'static>;

struct Entry {
    deadline: Instant,
    /// Destinations (by index) that answered, as a bit set.
    answered: u64,
    /// The first answer that was not an accept.
    refusal: Option<(usize, String)>,
    done: OnVerdict,
}

/// The registry shared by the lanes, the expiry thread and the [`Watcher`]s.
pub(crate) struct Registry {
    entries: Mutex<HashMap<WatchKey, Entry>>,
    /// `entries.len()`, read by the lanes without the lock.
    len: AtomicUsize,
    destinations: Vec<String>,
    expiry: Condvar,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("watched", &self.len.load(Ordering::Relaxed))
            .field("destinations", &self.destinations)
            .finish()
    }
}

impl Registry {
    pub(crate) fn new(destinations: Vec<String>) -> Arc<Self> {
        Arc::new(Self {
            entries: Mutex::new(HashMap::new()),
            len: AtomicUsize::new(0),
            destinations,
            expiry: Condvar::new(),
        })
    }

    /// A lane's report: destination `index` answered the message `key` (`refusal`: not an
    /// accept, with its reason). Costs one atomic load when nothing is watched.
    pub(crate) fn answer(&self, key: WatchKey, index: usize, refusal: Option<&str>) {
        if self.len.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(entry) = entries.get_mut(&key) else {
            return;
        };
        entry.answered |= 1 << index;
        if let (None, Some(reason)) = (&entry.refusal, refusal) {
            entry.refusal = Some((index, reason.to_owned()));
        }
        let all = (1u64 << self.destinations.len()) - 1;
        if entry.answered & all != all {
            return;
        }
        let entry = entries.remove(&key).expect("found above");
        self.len.store(entries.len(), Ordering::Release);
        drop(entries);
        let verdict = match entry.refusal {
            None => Verdict::Accepted,
            Some((i, reason)) => Verdict::NotAccepted {
                destination: self.destinations[i].clone(),
                reason,
            },
        };
        (entry.done)(verdict);
    }

    /// Runs expired entries' callbacks until the registry is dropped by everyone else.
    pub(crate) fn run_expiry(weak: Weak<Self>) {
        loop {
            let Some(this) = weak.upgrade() else { return };
            let now = Instant::now();
            let expired: Vec<Entry> = {
                let mut entries = this.entries.lock().unwrap_or_else(PoisonError::into_inner);
                let expired = entries
                    .extract_if(|_, entry| entry.deadline <= now)
                    .map(|(_, entry)| entry)
                    .collect();
                this.len.store(entries.len(), Ordering::Release);
                expired
            };
            for entry in expired {
                let missing = (0..this.destinations.len())
                    .find(|i| entry.answered & (1 << i) == 0)
                    .unwrap_or(0);
                (entry.done)(Verdict::TimedOut {
                    destination: this.destinations[missing].clone(),
                });
            }
            let guard = this.entries.lock().unwrap_or_else(PoisonError::into_inner);
            // Deadlines are checked every 50 ms: an upstream AE comes at most that late.
            let _ = this.expiry.wait_timeout(guard, Duration::from_millis(50));
        }
    }
}

/// Registers messages whose upstream reply waits for the destinations; see the module docs.
/// Cheap to clone.
#[derive(Clone, Debug)]
pub struct Watcher {
    pub(crate) registry: Arc<Registry>,
    /// Wakes idle lanes once a watched message is committed (its sender is waiting).
    pub(crate) waker: super::ForwardWaker,
}

impl Watcher {
    /// Watches the message `key` for `timeout`; `done` runs once, on a lane thread, the
    /// expiry thread, or the caller of [`cancel`](Self::cancel).
    pub fn watch(&self, key: WatchKey, timeout: Duration, done: OnVerdict) {
        let mut entries = self
            .registry
            .entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let entry = Entry {
            deadline: Instant::now() + timeout,
            answered: 0,
            refusal: None,
            done,
        };
        if let Some(old) = entries.insert(key, entry) {
            // The same key twice cannot happen (sequence numbers grow); answer the old one.
            drop(entries);
            (old.done)(Verdict::NotStored(StoreError::Closed));
            return;
        }
        self.registry.len.store(entries.len(), Ordering::Release);
    }

    /// Stops watching `key` because the message was not stored; its callback runs with
    /// [`Verdict::NotStored`] unless it already ran.
    pub fn cancel(&self, key: WatchKey, error: StoreError) {
        let entry = {
            let mut entries = self
                .registry
                .entries
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let entry = entries.remove(&key);
            self.registry.len.store(entries.len(), Ordering::Release);
            entry
        };
        if let Some(entry) = entry {
            (entry.done)(Verdict::NotStored(error));
        }
    }
}

/// A handler that stores each message and answers only when every destination of `watcher`'s
/// forwarder has answered it: AA if all answered AA (or CA), AE naming the first destination
/// that did not; AE when `timeout` passes first (the message stays queued and is still
/// delivered). A message that was not stored is a handler failure, answered by the server
/// under its NAK policy, as with [`StoreThenAck`](crate::StoreThenAck). Mirth's "after
/// destinations completed".
///
/// It never blocks: the reply is deferred and completed from a lane or the expiry thread.
/// Use it with [`Dispatch::Inline`](mllp_reactor::Dispatch::Inline).
pub fn ack_after_forwarded(store: Arc<Store>, watcher: Watcher, timeout: Duration) -> impl Handler {
    handler_fn(move |msg, cx| {
        let reply = cx.defer();
        let record = Record::from_message(msg.clone(), cx);
        let key = WatchKey::of(&record.origin);
        let payload = msg.clone();
        let seconds = timeout.as_secs_f64();
        watcher.watch(
            key,
            timeout,
            Box::new(move |verdict| {
                let ae = |text: &str| Reply::Send(Ack::new(AckCode::AE).text(text).build(&payload));
                let answer = match verdict {
                    Verdict::Accepted => Reply::Send(Ack::new(AckCode::AA).build(&payload)),
                    Verdict::NotAccepted {
                        destination,
                        reason,
                    } => ae(&format!("destination {destination} answered {reason}")),
                    Verdict::TimedOut { destination } => ae(&format!(
                        "not forwarded within {seconds}s (destination {destination}); it stays queued"
                    )),
                    Verdict::NotStored(error) => return reply.fail(NotStored(error)),
                };
                reply.send(answer);
            }),
        );
        let cancel = watcher.clone();
        let done: crate::Done = Box::new(move |result: Result<_, StoreError>| match result {
            Ok(_) => cancel.waker.wake(),
            Err(error) => cancel.cancel(key, error),
        });
        if let Err(refused) = store.submit(record, done) {
            let reason = refused.reason();
            (refused.into_submission().into_parts().1)(Err(reason));
        }
        Ok(Reply::Deferred)
    })
}

/// The handler error of a message that was not stored: "message not stored: …".
#[derive(Debug)]
struct NotStored(StoreError);

impl std::fmt::Display for NotStored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "message not stored: {}", self.0)
    }
}

impl std::error::Error for NotStored {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}
