//! The durable delivery state a lane reads and writes, whatever the backend.

use crate::StoreId;
use crate::forward::watch::WatchKey;
use crate::forward::{Destination, ForwardError};

/// A message to deliver.
#[derive(Debug)]
pub(crate) struct Pending {
    pub(crate) id: StoreId,
    pub(crate) received_at_us: i64,
    pub(crate) payload: Vec<u8>,
    /// Where it came from, for `--ack-after forwarded` (`None` for a requeued message).
    pub(crate) key: Option<WatchKey>,
}

/// One page of the backlog: the lane's own messages among those scanned.
#[derive(Debug)]
pub(crate) struct Page {
    /// The lane's messages, in id order.
    pub(crate) messages: Vec<Pending>,
    /// The highest id scanned (any lane's); `after` when nothing was found.
    pub(crate) scanned_through: StoreId,
    /// The store's highest id when the page was read.
    pub(crate) last_id: StoreId,
}

/// A dead letter's attempt record, appended to the row.
#[derive(Debug)]
pub(crate) struct Letter<'a> {
    /// Attempts made this time (since the message was taken up or requeued).
    pub(crate) attempts: u32,
    pub(crate) first_attempt_us: i64,
    pub(crate) last_attempt_us: i64,
    /// The last attempt's outcome and reason, one line.
    pub(crate) reason: &'a str,
    /// The last reply received, if any.
    pub(crate) reply: Option<&'a [u8]>,
    /// One line per attempt: `TIME_US OUTCOME REASON`.
    pub(crate) history: &'a str,
}

/// How a requeued message ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Final {
    Delivered,
    Dead,
}

/// What a lane needs from the store. One instance per lane thread (its own connection).
pub(crate) trait DeliveryState: Send + 'static {
    /// Creates the tables if needed and makes the cursor rows match `destinations` (see
    /// "Cursors" in the module docs). Called once, on one connection, before the lanes start.
    fn prepare(&mut self, destinations: &[Destination]) -> Result<(), ForwardError>;

    /// Takes the lane's exclusive right to deliver and returns its cursor; `None` while
    /// another node holds it (PostgreSQL: a session advisory lock, held until the connection
    /// ends; SQLite: one process per file, always granted).
    fn acquire(&mut self, destination: &str, lane: u16) -> Result<Option<StoreId>, ForwardError>;

    /// The lane's messages with `after < id`, at most `max_records` scanned and stopping
    /// after `max_bytes` of the lane's payloads; `keep` says whether a payload is the lane's.
    fn read_page(
        &mut self,
        after: StoreId,
        max_records: usize,
        max_bytes: usize,
        keep: &dyn Fn(&[u8]) -> bool,
    ) -> Result<Page, ForwardError>;

    /// As [`advance`](Self::advance) when that costs no wait for another writer (SQLite:
    /// the store writer's gate is free); `Ok(false)` otherwise, and nothing is written.
    fn try_advance(
        &mut self,
        destination: &str,
        lane: u16,
        through: StoreId,
    ) -> Result<bool, ForwardError> {
        self.advance(destination, lane, through).map(|()| true)
    }

    /// Moves the lane's cursor forward to `through` (never back).
    fn advance(
        &mut self,
        destination: &str,
        lane: u16,
        through: StoreId,
    ) -> Result<(), ForwardError>;

    /// Dead-letters message `id` and, with `advance`, moves the cursor to it, in one
    /// transaction.
    fn dead_letter(
        &mut self,
        destination: &str,
        lane: u16,
        id: StoreId,
        letter: &Letter<'_>,
        advance: bool,
    ) -> Result<(), ForwardError>;

    /// The oldest requeued dead letter of the lane (`dead letter lane % lanes == lane`).
    fn next_requeued(
        &mut self,
        destination: &str,
        lane: u16,
        lanes: u16,
    ) -> Result<Option<Pending>, ForwardError>;

    /// Records how a requeued message ended.
    fn finish_requeued(
        &mut self,
        destination: &str,
        id: StoreId,
        end: Final,
        letter: &Letter<'_>,
    ) -> Result<(), ForwardError>;

    /// Remembers the lane's last error for `forward status`.
    fn last_error(
        &mut self,
        destination: &str,
        lane: u16,
        error: &str,
        at_us: i64,
    ) -> Result<(), ForwardError>;
}
