//! Metric names and the handles the writer records into.
//!
//! Handles are registered once, when a [`Store`](crate::Store) starts, with whatever `metrics`
//! recorder is current then (install it first), and moved to the writer thread: recording is
//! one atomic operation, with no key lookup. No metric has labels.

use metrics::{Counter, Gauge, Histogram, Unit};

/// Histogram: seconds per batch commit (successful or not), sync included.
pub const COMMIT_SECONDS: &str = "mllp_store_commit_seconds";
/// Histogram: messages per committed batch: how well group commit is grouping.
pub const BATCH_MESSAGES: &str = "mllp_store_batch_messages";
/// Gauge: messages queued for the writer and not yet taken into a batch.
pub const QUEUE_MESSAGES: &str = "mllp_store_queue_messages";
/// Counter: messages whose batch failed to commit (each got an error, never an AA).
pub const ERRORS_TOTAL: &str = "mllp_store_errors_total";
/// Counter: messages stored as resends of an earlier one (`duplicate_of` set).
pub const DUPLICATES_TOTAL: &str = "mllp_store_duplicates_total";
/// Counter: messages committed (duplicates included).
pub const MESSAGES_TOTAL: &str = "mllp_store_messages_total";
/// Counter: commits that found the store's file damaged (see `integrity`).
pub const CORRUPTIONS_TOTAL: &str = "mllp_store_corruptions_total";

/// The writer's handles.
#[derive(Clone, Debug)]
pub(crate) struct Metrics {
    pub(crate) commit_seconds: Histogram,
    pub(crate) batch_messages: Histogram,
    pub(crate) queue_messages: Gauge,
    pub(crate) errors: Counter,
    pub(crate) duplicates: Counter,
    pub(crate) messages: Counter,
    pub(crate) corruptions: Counter,
}

impl Metrics {
    /// Describes every metric and registers its handle with the current recorder.
    pub(crate) fn register() -> Self {
        metrics::describe_histogram!(
            COMMIT_SECONDS,
            Unit::Seconds,
            "Time to commit one batch of messages, sync included"
        );
        metrics::describe_histogram!(
            BATCH_MESSAGES,
            Unit::Count,
            "Messages per committed batch (group commit)"
        );
        metrics::describe_gauge!(
            QUEUE_MESSAGES,
            Unit::Count,
            "Messages waiting for the store writer"
        );
        metrics::describe_counter!(
            ERRORS_TOTAL,
            Unit::Count,
            "Messages not stored because their batch failed to commit"
        );
        metrics::describe_counter!(
            DUPLICATES_TOTAL,
            Unit::Count,
            "Messages stored as resends of an earlier message"
        );
        metrics::describe_counter!(MESSAGES_TOTAL, Unit::Count, "Messages committed");
        metrics::describe_counter!(
            CORRUPTIONS_TOTAL,
            Unit::Count,
            "Commits that found the store's file damaged"
        );
        Self {
            commit_seconds: metrics::histogram!(COMMIT_SECONDS),
            batch_messages: metrics::histogram!(BATCH_MESSAGES),
            queue_messages: metrics::gauge!(QUEUE_MESSAGES),
            errors: metrics::counter!(ERRORS_TOTAL),
            duplicates: metrics::counter!(DUPLICATES_TOTAL),
            messages: metrics::counter!(MESSAGES_TOTAL),
            corruptions: metrics::counter!(CORRUPTIONS_TOTAL),
        }
    }
}
