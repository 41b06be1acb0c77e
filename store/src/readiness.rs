//! The decisions of a health endpoint: [`ready`] (`/readyz`: should this node get new
//! connections?) and [`alive`] (`/healthz`: are its threads alive?), from the store's
//! [`Health`] and [`Pulse`](crate::health::Pulse), the free-space monitor and the reactors'
//! heartbeats.

use std::fmt;
use std::time::{Duration, Instant};

use crate::health::{Health, MAX_SILENCE};
use crate::writer::Store;

/// Why a server should not get new connections (`/readyz` 503), in the order checked.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum NotReady {
    /// The server is draining (SIGTERM): it finishes what it has and takes nothing new.
    Draining,
    /// A commit found the store's file damaged ([`crate::integrity`]); until restart.
    Corrupt,
    /// The store is not storing ([`Health::Failing`], [`Health::Broken`] or
    /// [`Health::Disconnected`]: PostgreSQL not connected).
    Store(Health),
    /// Free disk space is below the minimum.
    LowDisk(crate::disk::DiskState),
}

impl NotReady {
    /// A short machine-readable name: `draining`, `corrupt`, `store`, `disk`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Draining => "draining",
            Self::Corrupt => "corrupt",
            Self::Store(_) => "store",
            Self::LowDisk(_) => "disk",
        }
    }
}

impl fmt::Display for NotReady {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Draining => f.write_str("the server is draining"),
            Self::Corrupt => f.write_str(
                "the store's file is damaged: stop the server and run `mllp-reactor check`",
            ),
            Self::Store(Health::Broken) => f.write_str(
                "the store is broken (its file was deleted or replaced): restart the server",
            ),
            Self::Store(Health::Disconnected) => f.write_str(
                "the store's database is not connected: the server reconnects by itself (the \
                 log says why)",
            ),
            Self::Store(health) => write!(
                f,
                "the store is {health}: its last commit failed (the log says why)"
            ),
            Self::LowDisk(state) => state.error().fmt(f),
        }
    }
}

impl std::error::Error for NotReady {}

/// Whether a server should get new connections: not draining, the store's file not found
/// damaged, its [`Health`] `Ok` (an idle writer retries an empty commit every few seconds
/// after a failure, so this recovers without traffic; with PostgreSQL it is also the
/// connection check), free disk above the minimum.
///
/// ```
/// use mllp_store::readiness::{ready, NotReady};
/// assert!(ready(false, None, None).is_ok());
/// assert!(matches!(ready(true, None, None), Err(NotReady::Draining)));
/// ```
///
/// # Errors
///
/// The first reason found, as a [`NotReady`].
pub fn ready(
    draining: bool,
    store: Option<&Store>,
    disk: Option<&crate::disk::DiskMonitor>,
) -> Result<(), NotReady> {
    if draining {
        return Err(NotReady::Draining);
    }
    if let Some(store) = store {
        if store.pulse().is_corrupt() {
            return Err(NotReady::Corrupt);
        }
        let health = store.health();
        if !health.is_ready() {
            return Err(NotReady::Store(health));
        }
    }
    match disk.map(crate::disk::DiskMonitor::state) {
        Some(state) if state.low => Err(NotReady::LowDisk(state)),
        _ => Ok(()),
    }
}

/// Whether the process is alive: every reactor and the store writer stamped a heartbeat
/// within [`MAX_SILENCE`] of `now`.
///
/// # Errors
///
/// `("reactor", age)` or `("store writer", age)` for the first silent one.
pub fn alive(
    reactors: &mllp_reactor::Heartbeat,
    store: Option<&Store>,
    now: Instant,
) -> Result<(), (&'static str, Duration)> {
    let reactor = reactors.oldest(now);
    if reactor > MAX_SILENCE {
        return Err(("reactor", reactor));
    }
    match store.map(|s| s.pulse().writer_beat_age(now)) {
        Some(age) if age > MAX_SILENCE => Err(("store writer", age)),
        _ => Ok(()),
    }
}
