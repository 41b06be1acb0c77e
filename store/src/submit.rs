//! What goes into the queue: a [`Record`] with its [`Done`] callback, and [`SubmitError`]
//! when the queue does not take it.

use std::fmt;

use crate::error::StoreError;
use crate::record::{Record, StoreOutcome};

/// The completion callback of one record: called exactly once, on the writer thread, after
/// the record's batch committed (`Ok`) or failed (`Err`). It should be quick (send on a
/// channel, complete a deferred reply): the next batch waits for it. A panic in it is caught
/// and does not affect other records.
pub type Done = Box<dyn FnOnce(Result<StoreOutcome, StoreError>) + Send + 'static>;

/// A record (and its callback) the queue did not take, handed back so the caller can retry
/// without copying anything.
pub struct Submission {
    pub(crate) record: Record,
    pub(crate) done: Done,
}

impl Submission {
    /// The record and its callback, as passed to [`Store::submit`](crate::Store::submit).
    pub fn into_parts(self) -> (Record, Done) {
        (self.record, self.done)
    }

    /// The record.
    pub fn record(&self) -> &Record {
        &self.record
    }
}

impl fmt::Debug for Submission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Submission")
            .field("record", &self.record)
            .finish_non_exhaustive()
    }
}

/// Why [`Store::submit`](crate::Store::submit) did not take a record. Either way the callback
/// was not called and comes back inside the [`Submission`].
#[derive(Debug)]
pub enum SubmitError {
    /// The queue is at its cap in messages or bytes: try again after some replies went out
    /// (a server stops reading meanwhile, so TCP pushes back on senders).
    Full(Submission),
    /// The store is closed (or closing): nothing more is accepted.
    Closed(Submission),
}

impl SubmitError {
    /// Why, as the [`StoreError`] to complete the returned callback with when the caller will
    /// not retry ([`StoreError::QueueFull`] or [`StoreError::Closed`]).
    pub fn reason(&self) -> StoreError {
        match self {
            Self::Full(_) => StoreError::QueueFull,
            Self::Closed(_) => StoreError::Closed,
        }
    }

    /// The record and callback that were not taken.
    pub fn into_submission(self) -> Submission {
        match self {
            Self::Full(s) | Self::Closed(s) => s,
        }
    }
}

impl fmt::Display for SubmitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.reason().fmt(f)
    }
}

impl std::error::Error for SubmitError {}
