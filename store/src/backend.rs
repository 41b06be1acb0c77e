//! The interface a storage engine implements: [`Backend`].
//!
//! The [`Store`](crate::Store) front owns queueing, batching, callbacks and metrics; a backend
//! only writes a batch in one transaction and reads records back. SQLite
//! ([`SqliteBackend`](crate::SqliteBackend)) and PostgreSQL (`PostgresBackend`, cargo feature
//! `postgres`) implement it; nothing here is specific to either.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use crate::error::StoreError;
use crate::record::{DuplicateKey, Record, StoreId, StoreOutcome, StoredRecord};

/// A storage engine for the [`Store`](crate::Store).
///
/// Opening (and creating and versioning the schema) is each backend's own constructor, since
/// what it needs differs (a path, a connection string). A backend is moved to the store's one
/// writer thread, so it is `Send` but never shared; an export opens a second instance.
///
/// # Contract
///
/// - **Atomic batches.** [`commit_batch`](Self::commit_batch) stores all of a batch in one
///   transaction and returns only after it is durable (SQLite: WAL synced with
///   `synchronous=FULL`; PostgreSQL: `COMMIT` returned), or stores none of it and returns
///   `Err`. The store then fails every record of the batch: nobody gets an AA for it.
/// - **Recovery is the backend's job.** After an `Err` the next call starts from scratch
///   (roll back, reopen or reconnect as needed): the writer simply goes on with the next batch.
/// - **Ids** increase in commit order, within a batch in batch order, and ids visible to a
///   reader form a prefix of all ids committed (no gaps filled in later), so that
///   [`read_after`](Self::read_after) with the last id seen never misses a record.
/// - **Duplicates.** A record whose [`DuplicateKey`] matches a stored original (a record
///   that is not itself a duplicate) received no earlier than the backend's duplicate window
///   before it gets `duplicate_of` = that original's id; earlier records of the same batch
///   count. Records without MSH-10 are never duplicates.
/// - **Nothing panics** on any payload; errors are [`StoreError`]s whose `Display` is one line.
pub trait Backend: Send + 'static {
    /// Stores `batch` in one transaction and returns one outcome per record, in order.
    ///
    /// # Errors
    ///
    /// [`StoreError::Commit`] (or another variant) when the transaction did not commit; none
    /// of the batch is stored.
    fn commit_batch(&mut self, batch: &[Record]) -> Result<Vec<StoreOutcome>, StoreError>;

    /// Up to `max_records` records with `after < id <= until`, in id order. Stops early after
    /// the record that brings the payload total to `max_bytes` (always returns at least one
    /// record if any is in range), so a page holds at most `max_bytes` plus one message.
    ///
    /// # Errors
    ///
    /// [`StoreError::Read`], or [`StoreError::Locked`] when a lock outlasted the busy timeout.
    fn read_after(
        &mut self,
        after: StoreId,
        until: StoreId,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredRecord>, StoreError>;

    /// The highest id committed so far (0 for an empty store).
    ///
    /// # Errors
    ///
    /// As [`read_after`](Self::read_after).
    fn last_id(&mut self) -> Result<StoreId, StoreError>;

    /// The original that a record with `key`, received at `received_at`, would be a duplicate
    /// of; `None` if there is none within the duplicate window.
    ///
    /// # Errors
    ///
    /// As [`read_after`](Self::read_after).
    fn find_original(
        &mut self,
        key: &DuplicateKey<'_>,
        received_at: SystemTime,
    ) -> Result<Option<StoreId>, StoreError>;

    /// Where the data lives, for messages (`sqlite:/var/lib/mllp.db`). Never a password.
    fn location(&self) -> String;

    /// One line for an operator starting a server: where the data lives and what its
    /// durability depends on (default: [`location`](Self::location)). Never a password.
    fn summary(&self) -> String {
        self.location()
    }

    /// The gate this backend holds while it commits, if it has one (SQLite): give it to a
    /// [`Pruner`](crate::retention::Pruner) of the same file so that the two take turns
    /// without SQLite's sleeping busy handler. [`Store::write_gate`](crate::Store::write_gate)
    /// keeps it after the backend moved to the writer thread.
    fn write_gate(&self) -> Option<WriteGate> {
        None
    }

    /// Whether an idle [`Store`](crate::Store) should also probe this backend while it is
    /// healthy, with an empty [`commit_batch`](Self::commit_batch) every few seconds, because
    /// it can stop working without a commit to notice it (PostgreSQL: the connection to the
    /// database). Default `false`: a store that is not committing cannot fail (SQLite), and
    /// an idle store probes only after a failed commit, to notice its recovery.
    fn probe_when_idle(&self) -> bool {
        false
    }
}

impl<B: Backend + ?Sized> Backend for Box<B> {
    fn commit_batch(&mut self, batch: &[Record]) -> Result<Vec<StoreOutcome>, StoreError> {
        (**self).commit_batch(batch)
    }

    fn read_after(
        &mut self,
        after: StoreId,
        until: StoreId,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredRecord>, StoreError> {
        (**self).read_after(after, until, max_records, max_bytes)
    }

    fn last_id(&mut self) -> Result<StoreId, StoreError> {
        (**self).last_id()
    }

    fn find_original(
        &mut self,
        key: &DuplicateKey<'_>,
        received_at: SystemTime,
    ) -> Result<Option<StoreId>, StoreError> {
        (**self).find_original(key, received_at)
    }

    fn location(&self) -> String {
        (**self).location()
    }

    fn summary(&self) -> String {
        (**self).summary()
    }

    fn write_gate(&self) -> Option<WriteGate> {
        (**self).write_gate()
    }

    fn probe_when_idle(&self) -> bool {
        (**self).probe_when_idle()
    }
}

/// Serialises this process's writers of one SQLite file (the store's writer and the
/// [`Pruner`](crate::retention::Pruner)) with a mutex instead of SQLite's lock.
///
/// SQLite's busy handler waits by sleeping 1, 2, 5, 10… ms between retries, so a commit that
/// finds the pruner's transaction open would wait milliseconds longer than the transaction
/// lasts; a mutex hands over as soon as it is released. Other processes still meet SQLite's
/// lock and busy timeout as before.
///
/// The store's writer comes first: while it waits for the gate, a background writer (the
/// pruner) holding it sees that and ends its transaction early, and a background writer
/// never takes the gate ahead of a waiting store writer.
#[derive(Clone, Debug, Default)]
pub struct WriteGate(Arc<GateState>);

#[derive(Debug, Default)]
struct GateState {
    lock: Mutex<()>,
    /// Store writers blocked in `enter`.
    waiting: AtomicUsize,
}

impl WriteGate {
    /// The store writer's turn: waits for the gate (a panic while it was held does not
    /// matter: it guards no data). Uncontended, one compare-and-swap, as a plain lock.
    pub(crate) fn enter(&self) -> MutexGuard<'_, ()> {
        if let Some(guard) = self.try_enter() {
            return guard;
        }
        self.0.waiting.fetch_add(1, Ordering::SeqCst);
        let guard = self.0.lock.lock().unwrap_or_else(PoisonError::into_inner);
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
        guard
    }

    /// A background writer's turn: waits for the gate and for no store writer to be waiting
    /// for it, so that the store's commits never queue behind a background transaction.
    pub(crate) fn enter_background(&self) -> MutexGuard<'_, ()> {
        loop {
            while self.writer_waiting() {
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
            let guard = self.0.lock.lock().unwrap_or_else(PoisonError::into_inner);
            if !self.writer_waiting() {
                return guard;
            }
        }
    }

    /// Whether the store's writer is waiting for the gate now: a background writer that
    /// holds it should commit what it has and let go.
    pub(crate) fn writer_waiting(&self) -> bool {
        self.0.waiting.load(Ordering::SeqCst) > 0
    }

    /// The gate if it is free now, `None` while another writer holds it.
    pub(crate) fn try_enter(&self) -> Option<MutexGuard<'_, ()>> {
        match self.0.lock.try_lock() {
            Ok(guard) => Some(guard),
            Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }
}
