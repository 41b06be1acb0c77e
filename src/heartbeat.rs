//! Liveness of a server's reactor threads: poll turns stamp the time (a busy reactor at most
//! every 10 ms, so a stamp lags its last turn by at most that), and an idle reactor wakes at
//! least every [`HEARTBEAT_INTERVAL`] to do so. A health endpoint reads the stamps:
//! a reactor stuck in a handler, a busy loop that never returns to poll, or a dead thread
//! shows as a stamp that grows old.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Longest time an idle reactor waits in `poll` before stamping its heartbeat: 1 s.
///
/// A wake-up costs one `epoll_wait` return (microseconds), so once a second is free; a health
/// check that allows several intervals (the CLI's `/healthz` allows 5 s) then never mistakes
/// an idle reactor for a stuck one.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);

/// The reactors' heartbeats of one server; cheap to clone, read from any thread.
///
/// ```
/// use std::time::{Duration, Instant};
/// use mllp_reactor::{Server, handler_fn, Reply};
///
/// let server = Server::builder(handler_fn(|_, _| Ok(Reply::NoReply))).reactors(2).bind("127.0.0.1:0")?;
/// let heartbeat = server.heartbeat();
/// assert_eq!(heartbeat.reactors(), 2);
/// // Not running yet: the stamps are those of `bind`.
/// assert!(heartbeat.oldest(Instant::now()) < Duration::from_secs(60));
/// # Ok::<(), mllp_reactor::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Heartbeat {
    epoch: Instant,
    /// Per reactor: microseconds after `epoch` of its last poll turn.
    stamps: Arc<[AtomicU64]>,
}

impl Heartbeat {
    pub(crate) fn new(reactors: usize) -> Self {
        Self {
            epoch: Instant::now(),
            stamps: (0..reactors).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Stamps reactor `index` at `now` (one relaxed store; the reactor calls it at most
    /// every 10 ms).
    pub(crate) fn beat(&self, index: usize, now: Instant) {
        if let Some(stamp) = self.stamps.get(index) {
            let us = now.saturating_duration_since(self.epoch).as_micros();
            stamp.store(u64::try_from(us).unwrap_or(u64::MAX), Ordering::Relaxed);
        }
    }

    /// How many reactors beat.
    pub fn reactors(&self) -> usize {
        self.stamps.len()
    }

    /// The age at `now` of the oldest reactor's last stamp: the longest any reactor has gone
    /// without a poll turn (give or take the 10 ms a busy reactor goes between stamps). Above a few [`HEARTBEAT_INTERVAL`]s, that reactor is stuck or gone.
    pub fn oldest(&self, now: Instant) -> Duration {
        let since_epoch = now.saturating_duration_since(self.epoch);
        self.stamps
            .iter()
            .map(|s| since_epoch.saturating_sub(Duration::from_micros(s.load(Ordering::Relaxed))))
            .max()
            .unwrap_or_default()
    }
}
