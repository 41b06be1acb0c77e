//! What a backend offers [`crate::retention`]: a [`PruneTarget`] (list candidates, delete,
//! give space back, measure) and the [`StoreUsage`] it measures. Below both retention and the
//! backends, so that each backend implements it without depending on retention's decisions.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use crate::error::StoreError;
use crate::record::{StoreId, system_time_to_us};

/// How large a store is and how old its oldest message.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreUsage {
    /// Bytes on disk: the database file plus its WAL (PostgreSQL: the messages table's
    /// `pg_total_relation_size`: heap, TOAST and indexes).
    pub file_bytes: u64,
    /// Bytes in pages that hold data (the file's pages minus its free pages; PostgreSQL: an
    /// estimate from the rows' sizes, see `crate::postgresql`).
    pub used_bytes: u64,
    /// Bytes in free pages: reused by the next inserts, or given back by the pruner.
    pub free_bytes: u64,
    /// When the oldest message was received (µs since the epoch), `None` for an empty store.
    pub oldest_received_us: Option<i64>,
}

impl StoreUsage {
    /// The oldest message's age at `now`, `None` for an empty store.
    pub fn oldest_age(&self, now: SystemTime) -> Option<Duration> {
        let oldest = self.oldest_received_us?;
        let age = system_time_to_us(now).saturating_sub(oldest).max(0);
        Some(Duration::from_micros(u64::try_from(age).unwrap_or(0)))
    }
}

/// What a pass needs from a backend: the rows to consider, deleting some, giving space back,
/// and measuring. The decisions (what goes, in which order, at what pace) are
/// [`crate::retention`]'s, the same for every backend.
pub(crate) trait PruneTarget: Send {
    /// Up to `limit` rows with an id above `after`, in id order; the forwarding floor; and
    /// which of those rows are dead-lettered.
    fn candidates(&mut self, after: StoreId, limit: i64) -> Result<Candidates, StoreError>;

    /// Deletes these messages in one short transaction.
    fn delete(&mut self, ids: &[StoreId]) -> Result<(), StoreError>;

    /// Deletes a prefix of these messages (at least one) in one short transaction: all of
    /// them, unless the store's writer asked for the store meanwhile; returns how many.
    fn delete_some(&mut self, ids: &[StoreId]) -> Result<usize, StoreError> {
        self.delete(ids).map(|()| ids.len())
    }

    /// The pace of a pass in messages per second (`RetentionPolicy::rate`), `None` for
    /// pauses only.
    fn pace(&self) -> Option<u32> {
        None
    }

    /// Messages per second arriving lately, for a paced pass (0: unknown).
    fn arrival_rate(&mut self) -> Result<f64, StoreError> {
        Ok(0.0)
    }

    /// Gives free space back to the file system, in steps of at most `pause`'s worth;
    /// returns the bytes given back.
    fn release(&mut self, pause: Duration, stopped: &dyn Fn() -> bool) -> Result<u64, StoreError>;

    /// Sizes and the oldest message.
    fn usage(&mut self) -> Result<StoreUsage, StoreError>;
}

/// What [`PruneTarget::candidates`] found.
pub(crate) struct Candidates {
    pub(crate) rows: Vec<Candidate>,
    /// The highest id that every forwarding cursor has passed, `None` if none constrains.
    pub(crate) floor: Option<StoreId>,
    /// Dead-lettered (not re-delivered) ids among `rows`.
    pub(crate) dead: HashSet<StoreId>,
}

/// One row as the pruner sees it.
pub(crate) struct Candidate {
    pub(crate) id: StoreId,
    pub(crate) received_at_us: i64,
    pub(crate) size: i64,
}

/// Rough bytes a row takes besides its payload (columns, index entries, cell overhead): used
/// only to estimate progress towards a size cap within a batch; each batch re-measures.
pub(crate) const ROW_OVERHEAD: i64 = 200;
