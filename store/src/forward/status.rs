//! Reading and changing the delivery state from outside a running forwarder:
//! [`status_sqlite`] (`forward status`) and [`requeue_sqlite`] (`forward requeue`).
//! Both work while `serve` runs.

use std::path::Path;

use crate::StoreId;
use crate::forward::sqlite::SqliteState;
use crate::forward::{DEFAULT_BUSY_TIMEOUT, ForwardError};

/// One lane of one destination, as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct LaneStatus {
    /// The destination's name.
    pub destination: String,
    /// The lane, `0..lanes`.
    pub lane: u16,
    /// The destination's lane count.
    pub lanes: u16,
    /// `HOST:PORT` as last configured (`None` if only cursor rows are left).
    pub address: Option<String>,
    /// Every message of this lane up to this id is delivered or dead-lettered.
    pub delivered_through: StoreId,
    /// Messages stored after the cursor: the lane's depth with one lane; with several, an
    /// upper bound (it counts the other lanes' messages too).
    pub after_cursor: u64,
    /// When the first message after the cursor was received (µs since the Unix epoch): the
    /// oldest undelivered message with one lane; with several, no younger than the lane's.
    pub oldest_received_at_us: Option<i64>,
    /// Dead letters of this lane waiting for a requeue.
    pub dead_letters: u64,
    /// Dead letters requeued and not yet delivered.
    pub requeued: u64,
    /// The last failed attempt's outcome and reason, and when it happened.
    pub last_error: Option<String>,
    /// When the last error happened (µs since the Unix epoch).
    pub last_error_at_us: Option<i64>,
}

/// Which dead letters [`requeue_sqlite`] puts back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Requeue {
    /// These message ids.
    Ids(Vec<StoreId>),
    /// Every dead letter.
    AllDead,
}

/// Every lane's state in the store at `path`, by destination and lane; empty when the store
/// was never forwarded from.
///
/// # Errors
///
/// [`ForwardError::NotAStore`] or [`ForwardError::Database`].
pub fn status_sqlite(path: impl AsRef<Path>) -> Result<Vec<LaneStatus>, ForwardError> {
    SqliteState::open(path.as_ref(), DEFAULT_BUSY_TIMEOUT, false, None)?.status()
}

/// Marks dead letters (of `destination`, or of every destination) as requeued: a running
/// forwarder delivers them again, each in its lane between two backlog pages (so out of
/// store order). Returns how many dead letters were requeued; an id that is not a dead letter
/// is skipped.
///
/// # Errors
///
/// [`ForwardError::NotAStore`] or [`ForwardError::Database`].
pub fn requeue_sqlite(
    path: impl AsRef<Path>,
    which: &Requeue,
    destination: Option<&str>,
) -> Result<u64, ForwardError> {
    SqliteState::open(path.as_ref(), DEFAULT_BUSY_TIMEOUT, true, None)?.requeue(which, destination)
}

/// As [`status_sqlite`], for a PostgreSQL store.
///
/// # Errors
///
/// [`ForwardError::Database`].
#[cfg(feature = "postgres")]
pub fn status_postgres(
    url: &str,
    options: &crate::PostgresOptions,
) -> Result<Vec<LaneStatus>, ForwardError> {
    crate::forward::postgresql::PgState::open(url, options)?.status()
}

/// As [`requeue_sqlite`], for a PostgreSQL store.
///
/// # Errors
///
/// [`ForwardError::Database`].
#[cfg(feature = "postgres")]
pub fn requeue_postgres(
    url: &str,
    options: &crate::PostgresOptions,
    which: &Requeue,
    destination: Option<&str>,
) -> Result<u64, ForwardError> {
    crate::forward::postgresql::PgState::open(url, options)?.requeue(which, destination)
}
