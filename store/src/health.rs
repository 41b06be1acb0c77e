//! What a health endpoint needs to know about a [`Store`](crate::Store): whether its writer
//! thread is alive (a heartbeat) and whether its last commit succeeded.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::error::{Problem, StoreError};

/// Longest time an idle writer waits for records before stamping its heartbeat: the
/// server's [`HEARTBEAT_INTERVAL`](mllp_reactor::HEARTBEAT_INTERVAL), for the same reasons.
pub const WRITER_HEARTBEAT: Duration = mllp_reactor::HEARTBEAT_INTERVAL;

/// A store's health, shared with its writer thread; cheap to clone, read from any thread.
#[derive(Clone, Debug)]
pub struct StoreHealth {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    epoch: Instant,
    /// Microseconds after `epoch` of the writer's last stamp.
    beat_us: AtomicU64,
    /// The last commit's error; `None` after a successful one (or before any).
    last_error: Mutex<Option<StoreError>>,
    /// Set for good by the first commit that found the file damaged.
    corrupt: AtomicBool,
}

impl Default for StoreHealth {
    fn default() -> Self {
        Self {
            inner: Arc::new(Inner {
                epoch: Instant::now(),
                beat_us: AtomicU64::new(0),
                last_error: Mutex::new(None),
                corrupt: AtomicBool::new(false),
            }),
        }
    }
}

impl StoreHealth {
    /// Stamps the writer's heartbeat.
    pub(crate) fn beat(&self, now: Instant) {
        let us = now.saturating_duration_since(self.inner.epoch).as_micros();
        self.inner
            .beat_us
            .store(u64::try_from(us).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Records a commit's result (once per batch, off the hot path of each record). Returns
    /// whether the error says the file is damaged ([`crate::integrity`]).
    pub(crate) fn commit_result(&self, error: Option<&StoreError>) -> bool {
        let corrupt = error.and_then(StoreError::problem) == Some(&Problem::Corrupt);
        if corrupt {
            self.inner.corrupt.store(true, Ordering::Relaxed);
        }
        let mut last = self
            .inner
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match (error, last.is_some()) {
            (None, false) => {}
            (None, true) => *last = None,
            (Some(e), _) => *last = Some(e.clone()),
        }
        corrupt
    }

    /// Whether a commit found the store's file damaged (stays set until restart: see
    /// [`crate::integrity`]).
    pub fn is_corrupt(&self) -> bool {
        self.inner.corrupt.load(Ordering::Relaxed)
    }

    /// How long ago the writer last showed it is alive (it stamps at least every
    /// [`WRITER_HEARTBEAT`] when idle, and after every commit).
    pub fn writer_beat_age(&self, now: Instant) -> Duration {
        let since = now.saturating_duration_since(self.inner.epoch);
        since.saturating_sub(Duration::from_micros(
            self.inner.beat_us.load(Ordering::Relaxed),
        ))
    }

    /// The last commit's error, `None` if it succeeded (or none was needed yet).
    pub fn last_commit_error(&self) -> Option<StoreError> {
        self.inner
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// The longest a heartbeat (a reactor's or the store writer's) may be silent before
/// `/healthz` calls the process stuck: 5 s, five heartbeat intervals, so a loaded machine's
/// scheduling hiccup is not a failure, while a thread stuck for good is caught within seconds.
pub const MAX_SILENCE: Duration = Duration::from_secs(5);

/// Why a server should not get new connections (`/readyz` 503), in the order checked.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum NotReady {
    /// The server is draining (SIGTERM): it finishes what it has and takes nothing new.
    Draining,
    /// The last commit failed: the store does not accept messages now.
    Store(StoreError),
    /// A commit found the store's file damaged ([`crate::integrity`]); until restart.
    Corrupt,
    /// Free disk space is below the minimum.
    LowDisk(crate::disk::DiskState),
}

impl NotReady {
    /// A short machine-readable name: `draining`, `store`, `disk`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Draining => "draining",
            Self::Store(_) => "store",
            Self::Corrupt => "corrupt",
            Self::LowDisk(_) => "disk",
        }
    }
}

impl std::fmt::Display for NotReady {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Draining => f.write_str("the server is draining"),
            Self::Store(e) => e.fmt(f),
            Self::Corrupt => f.write_str(
                "the store's file is damaged: stop the server and run `mllp-reactor check`",
            ),
            Self::LowDisk(state) => state.error().fmt(f),
        }
    }
}

impl std::error::Error for NotReady {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Store(e) => Some(e),
            _ => None,
        }
    }
}

/// Whether a server should get new connections: not draining, the store's last commit
/// succeeded (or none was needed), free disk above the minimum. With PostgreSQL a lost
/// connection shows as a failed commit, and readiness returns with the first good one.
///
/// ```
/// use mllp_store::health::{ready, NotReady};
/// assert!(ready(false, None, None).is_ok());
/// assert!(matches!(ready(true, None, None), Err(NotReady::Draining)));
/// ```
///
/// # Errors
///
/// The first reason found, as a [`NotReady`].
pub fn ready(
    draining: bool,
    store: Option<&StoreHealth>,
    disk: Option<&crate::disk::DiskMonitor>,
) -> Result<(), NotReady> {
    if draining {
        return Err(NotReady::Draining);
    }
    if store.is_some_and(StoreHealth::is_corrupt) {
        return Err(NotReady::Corrupt);
    }
    if let Some(error) = store.and_then(StoreHealth::last_commit_error) {
        return Err(NotReady::Store(error));
    }
    match disk.map(crate::disk::DiskMonitor::state) {
        Some(state) if state.low => Err(NotReady::LowDisk(state)),
        _ => Ok(()),
    }
}

/// Whether the process is alive: every reactor and the store writer stamped a heartbeat
/// within [`MAX_SILENCE`] of `now`. Returns the silent part and how long it has been silent.
///
/// # Errors
///
/// `("reactor", age)` or `("store writer", age)` for the first silent one.
pub fn alive(
    reactors: &mllp_reactor::Heartbeat,
    store: Option<&StoreHealth>,
    now: Instant,
) -> Result<(), (&'static str, Duration)> {
    let reactor = reactors.oldest(now);
    if reactor > MAX_SILENCE {
        return Err(("reactor", reactor));
    }
    match store.map(|s| s.writer_beat_age(now)) {
        Some(age) if age > MAX_SILENCE => Err(("store writer", age)),
        _ => Ok(()),
    }
}
