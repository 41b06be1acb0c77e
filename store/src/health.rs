//! [`Health`]: whether a [`Store`](crate::Store) is storing, as of its last commit, for
//! readiness checks (`/readyz`) and an operator's log; [`Pulse`]: whether its writer thread
//! is alive (a heartbeat) and whether a commit found its file damaged. The decisions of
//! `/readyz` and `/healthz` that use them are in [`crate::readiness`].

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::error::{Problem, StoreError};

/// Whether a store is storing, as of its last commit: [`Store::health`](crate::Store::health).
///
/// A readiness check (`/readyz`) should answer "ready" only for [`Health::Ok`]: a
/// [`Failing`](Health::Failing) store answers every message AE until a commit succeeds again,
/// and a [`Broken`](Health::Broken) one until the server is restarted.
///
/// ```
/// use mllp_store::{Health, OpenOptions, Store, StoreConfig, StoreSpec};
///
/// let dir = std::env::temp_dir().join(format!("mllp-doc-health-{}", std::process::id()));
/// std::fs::create_dir_all(&dir)?;
/// let spec = StoreSpec::parse(dir.join("s.db").to_str().unwrap())?;
/// let store = Store::open(&spec, &OpenOptions::default(), StoreConfig::default())?;
/// assert_eq!(store.health(), Health::Ok);
/// assert!(store.health().is_ready());
/// # drop(store);
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Health {
    /// The last commit succeeded, or none was tried yet.
    Ok,
    /// The last batch failed to commit (database down, disk full, a lock held too long…).
    /// The store goes on trying with each new batch and is `Ok` again after the first that
    /// commits.
    Failing,
    /// The store can store nothing more until it is reopened: its SQLite file was deleted or
    /// replaced under it ([`Problem::FileReplaced`]). Every batch fails.
    Broken,
    /// The store's database cannot be reached (PostgreSQL: the connection was lost and
    /// reconnecting fails, see [`StoreError::is_connection_lost`]). Noticed by the last
    /// commit or by the idle writer's probe every few seconds; `Ok` again once a probe or a
    /// commit gets through.
    Disconnected,
}

impl Health {
    /// Whether a readiness check should pass: only when [`Ok`](Self::Ok).
    pub fn is_ready(self) -> bool {
        self == Self::Ok
    }

    /// `ok`, `failing`, `broken` or `disconnected`: for a status page or a log field.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Failing => "failing",
            Self::Broken => "broken",
            Self::Disconnected => "disconnected",
        }
    }

    /// The health a commit's result leaves the store in.
    fn after<T>(result: &Result<T, StoreError>) -> Self {
        match result {
            Ok(_) => Self::Ok,
            Err(e) if e.problem() == Some(&Problem::FileReplaced) => Self::Broken,
            Err(e) if e.is_connection_lost() => Self::Disconnected,
            Err(_) => Self::Failing,
        }
    }

    fn from_u8(value: u8) -> Self {
        match value {
            0 => Self::Ok,
            1 => Self::Failing,
            3 => Self::Disconnected,
            _ => Self::Broken,
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            Self::Ok => 0,
            Self::Failing => 1,
            Self::Broken => 2,
            Self::Disconnected => 3,
        }
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

type Watcher = Box<dyn Fn(Health, Option<&StoreError>) + Send + Sync>;

/// The health shared by a store and its writer thread: one atomic store per batch, and the
/// watcher called only when the health changes.
#[derive(Default)]
pub(crate) struct HealthState {
    value: AtomicU8,
    watcher: Mutex<Option<Watcher>>,
}

impl HealthState {
    pub(crate) fn get(&self) -> Health {
        Health::from_u8(self.value.load(Ordering::Relaxed))
    }

    pub(crate) fn watch(&self, watcher: Watcher) {
        *self.watcher.lock().unwrap_or_else(PoisonError::into_inner) = Some(watcher);
    }

    /// Records the health a commit's `result` leaves; tells the watcher if it changed.
    pub(crate) fn record<T>(&self, result: &Result<T, StoreError>) {
        let now = Health::after(result);
        let before = Health::from_u8(self.value.swap(now.to_u8(), Ordering::Relaxed));
        if before != now {
            let watcher = self.watcher.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(watcher) = &*watcher {
                // A panicking watcher must not take the writer down.
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    watcher(now, result.as_ref().err())
                }));
            }
        }
    }
}

/// Longest time an idle writer waits for records before stamping its heartbeat: the
/// server's [`HEARTBEAT_INTERVAL`](mllp_reactor::HEARTBEAT_INTERVAL), for the same reasons.
pub const WRITER_HEARTBEAT: Duration = mllp_reactor::HEARTBEAT_INTERVAL;

/// The longest a heartbeat (a reactor's or the store writer's) may be silent before
/// `/healthz` calls the process stuck: 5 s, five heartbeat intervals, so a loaded machine's
/// scheduling hiccup is not a failure, while a thread stuck for good is caught within seconds.
pub const MAX_SILENCE: Duration = Duration::from_secs(5);

/// A store writer's heartbeat and corruption flag, shared with its writer thread: cheap to
/// clone, read from any thread ([`Store::pulse`](crate::Store::pulse)).
#[derive(Clone, Debug)]
pub struct Pulse {
    inner: Arc<PulseInner>,
}

#[derive(Debug)]
struct PulseInner {
    epoch: Instant,
    /// Microseconds after `epoch` of the writer's last stamp.
    beat_us: AtomicU64,
    /// Set for good by the first commit that found the file damaged.
    corrupt: AtomicBool,
}

impl Default for Pulse {
    fn default() -> Self {
        Self {
            inner: Arc::new(PulseInner {
                epoch: Instant::now(),
                beat_us: AtomicU64::new(0),
                corrupt: AtomicBool::new(false),
            }),
        }
    }
}

impl Pulse {
    /// Stamps the writer's heartbeat.
    pub(crate) fn beat(&self, now: Instant) {
        let us = now.saturating_duration_since(self.inner.epoch).as_micros();
        self.inner
            .beat_us
            .store(u64::try_from(us).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Notes a commit's error; returns whether it says the file is damaged
    /// ([`crate::integrity`]), which then stays set.
    pub(crate) fn commit_failed(&self, error: &StoreError) -> bool {
        let corrupt = error.problem() == Some(&Problem::Corrupt);
        if corrupt {
            self.inner.corrupt.store(true, Ordering::Relaxed);
        }
        corrupt
    }

    /// How long ago the writer last showed it is alive (it stamps at least every
    /// [`WRITER_HEARTBEAT`] when idle, and after every commit).
    pub fn writer_beat_age(&self, now: Instant) -> Duration {
        let since = now.saturating_duration_since(self.inner.epoch);
        since.saturating_sub(Duration::from_micros(
            self.inner.beat_us.load(Ordering::Relaxed),
        ))
    }

    /// Whether a commit found the store's file damaged (stays set until restart: see
    /// [`crate::integrity`]).
    pub fn is_corrupt(&self) -> bool {
        self.inner.corrupt.load(Ordering::Relaxed)
    }
}
