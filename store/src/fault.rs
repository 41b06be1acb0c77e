//! Fault injection for tests: a [`Backend`] wrapper whose commits fail on demand.
//!
//! Real disk failures are hard to produce in a test (root ignores file permissions, and a
//! full file system needs a mount), so the commit-failure path is exercised through the
//! interface instead: [`FaultyBackend`] fails whole batches without touching the inner backend,
//! exactly as a backend whose transaction did not commit must behave.
//!
//! ```
//! use mllp_store::fault::{FaultSwitch, FaultyBackend};
//! use mllp_store::{SqliteBackend, SqliteOptions};
//!
//! # let dir = std::env::temp_dir().join(format!("mllp-store-doc-fault-{}", std::process::id()));
//! # std::fs::create_dir_all(&dir)?;
//! let switch = FaultSwitch::new();
//! let backend = FaultyBackend::new(SqliteBackend::open(dir.join("s.db"), &SqliteOptions::default())?, switch.clone());
//! switch.fail_commits(true);   // every commit fails until switched off
//! switch.fail_next(2);         // or: only the next two commits fail
//! # drop(backend);
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::SystemTime;

use crate::backend::Backend;
use crate::error::{Problem, StoreError};
use crate::record::{DuplicateKey, Record, StoreId, StoreOutcome, StoredRecord};

/// Controls a [`FaultyBackend`] from another thread; clones share the same switch.
#[derive(Clone, Debug, Default)]
pub struct FaultSwitch(Arc<Faults>);

#[derive(Debug, Default)]
struct Faults {
    always: AtomicBool,
    next: AtomicU64,
    failed: AtomicU64,
    attempts: AtomicU64,
}

impl FaultSwitch {
    /// A switch with every fault off.
    pub fn new() -> Self {
        Self::default()
    }

    /// While `on`, every commit fails.
    pub fn fail_commits(&self, on: bool) {
        self.0.always.store(on, Ordering::SeqCst);
    }

    /// The next `n` commits fail (in addition to [`fail_commits`](Self::fail_commits)).
    pub fn fail_next(&self, n: u64) {
        self.0.next.store(n, Ordering::SeqCst);
    }

    /// Commits failed on purpose so far.
    pub fn failed(&self) -> u64 {
        self.0.failed.load(Ordering::SeqCst)
    }

    /// Commits attempted so far (failed or not).
    pub fn attempts(&self) -> u64 {
        self.0.attempts.load(Ordering::SeqCst)
    }

    fn should_fail(&self) -> bool {
        let f = &self.0;
        f.attempts.fetch_add(1, Ordering::SeqCst);
        let once = f
            .next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        let fail = once || f.always.load(Ordering::SeqCst);
        if fail {
            f.failed.fetch_add(1, Ordering::SeqCst);
        }
        fail
    }
}

/// Called with the batch size before each commit, on the writer thread.
type BeforeCommit = Box<dyn FnMut(usize) + Send>;

/// A backend whose commits fail while its [`FaultSwitch`] says so; reads always pass through.
pub struct FaultyBackend<B> {
    inner: B,
    switch: FaultSwitch,
    before_commit: Option<BeforeCommit>,
}

impl<B: std::fmt::Debug> std::fmt::Debug for FaultyBackend<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultyBackend")
            .field("inner", &self.inner)
            .field("switch", &self.switch)
            .finish_non_exhaustive()
    }
}

impl<B: Backend> FaultyBackend<B> {
    /// Wraps `inner`.
    pub fn new(inner: B, switch: FaultSwitch) -> Self {
        Self {
            inner,
            switch,
            before_commit: None,
        }
    }

    /// Calls `hook` with the batch size before every commit attempt, on the writer thread:
    /// a test can report batches, or hold the writer inside a commit (so the next batch
    /// grows) until it lets go.
    pub fn before_commit(mut self, hook: impl FnMut(usize) + Send + 'static) -> Self {
        self.before_commit = Some(Box::new(hook));
        self
    }
}

impl<B: Backend> Backend for FaultyBackend<B> {
    fn commit_batch(&mut self, batch: &[Record]) -> Result<Vec<StoreOutcome>, StoreError> {
        if let Some(hook) = &mut self.before_commit {
            hook(batch.len());
        }
        if self.switch.should_fail() {
            return Err(StoreError::commit(Problem::Injected));
        }
        self.inner.commit_batch(batch)
    }

    fn read_after(
        &mut self,
        after: StoreId,
        until: StoreId,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredRecord>, StoreError> {
        self.inner.read_after(after, until, max_records, max_bytes)
    }

    fn last_id(&mut self) -> Result<StoreId, StoreError> {
        self.inner.last_id()
    }

    fn find_original(
        &mut self,
        key: &DuplicateKey<'_>,
        received_at: SystemTime,
    ) -> Result<Option<StoreId>, StoreError> {
        self.inner.find_original(key, received_at)
    }

    fn location(&self) -> String {
        self.inner.location()
    }

    fn summary(&self) -> String {
        self.inner.summary()
    }

    fn write_gate(&self) -> Option<crate::backend::WriteGate> {
        self.inner.write_gate()
    }

    fn probe_when_idle(&self) -> bool {
        self.inner.probe_when_idle()
    }
}
