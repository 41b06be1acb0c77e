//! SQLite WAL checkpoints off the commit path.
//!
//! By default SQLite copies the WAL back into the database file inside a commit, once the WAL
//! holds 1 000 pages: that commit (and every message waiting on it for an ACK) waits for the
//! copy and the database file's sync. The store's writer connection turns that off, and a
//! `Checkpointer` thread with its own connection does the copying instead:
//!
//! - After a commit leaves a quarter of the limit ([`CHECKPOINTS_PER_LIMIT`]) or more in the
//!   WAL that no checkpoint has copied yet, the writer's WAL hook (a few atomic operations,
//!   on the writer thread) wakes the checkpointer, which runs a `PASSIVE` checkpoint: it
//!   copies what it can without taking any lock a writer or reader needs, so commits go on
//!   meanwhile.
//! - A WAL is only reused from its start once a checkpoint copied all of it while no commit
//!   came in between, which under sustained load never happens by itself. Reuse matters
//!   beyond the WAL's size: a commit that appends to the WAL file makes its sync allocate
//!   blocks too, and on the development machine's ext4 such a sync took ~100 µs longer than
//!   one that overwrites blocks already there (`BENCHMARKS.md`, issue #21). So:
//! - When a `PASSIVE` leaves at most [`CHEAP_RESTART_PAGES`] uncopied (light load: the
//!   checkpointer runs a few more `PASSIVE`s while what is left shrinks fast), and the WAL
//!   holds at least a quarter of the limit, the writer restarts the WAL (`RESTART`, below)
//!   before its next transaction: it copies those few pages, and from then on commits
//!   overwrite the same quarter of the limit instead of growing the file.
//! - Once the WAL holds the limit ([`WAL_LIMIT_BYTES`] by default), the checkpointer stops,
//!   and the writer runs a `RESTART` checkpoint itself before its next transaction (after
//!   the previous batch's ACKs went out): it copies only the pages the last `PASSIVE` had
//!   not, syncs the database file, and the next commit starts the WAL over; `journal_size_limit` cuts the file back to
//!   [`WAL_LIMIT_BYTES`]. It never waits: with the checkpointer mid-copy, or a reader (export)
//!   still in the WAL, it gives up at once and tries again before the next transaction. The
//!   WAL so stays near [`WAL_LIMIT_BYTES`] plus a batch or two, except while a reader holds an
//!   old snapshot for a long time (SQLite's own checkpoints have the same limit).
//!
//! Durability is unchanged: a commit is durable once the WAL is synced (`synchronous=FULL`);
//! a checkpoint syncs the database file before the WAL is reused.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;

use rusqlite::Connection;
use rusqlite::hooks::Wal;
use rusqlite::wal::CheckpointMode;

/// The checkpointer runs once the WAL holds this fraction of the limit that no checkpoint
/// has copied yet: 4, so a quarter (16 MiB, 4 096 pages, with the default 64 MiB limit).
///
/// A checkpoint copies each page once however many commits rewrote it in the meantime, and a
/// commit rewrites the same few index pages and the table's last page again and again, so
/// the less often it runs, the less it copies and syncs. SQLite's own threshold (1 000 pages)
/// cost the checkpointer 4.7 µs of CPU per message at S3 (50 connections × 8 in flight),
/// 4 000 pages 2.2 µs, 8 000 pages 1.4 µs (`BENCHMARKS.md`, issue #21). A quarter keeps the
/// writer's own `RESTART` at the limit short: it copies only what came since the last
/// `PASSIVE`, at most a quarter of the WAL, once per limit's worth of commits.
pub const CHECKPOINTS_PER_LIMIT: u32 = 4;

/// The most WAL pages that a `PASSIVE` may have left uncopied for the writer to restart the
/// WAL before the limit: 64 (256 KiB with 4 KiB pages). The writer's `RESTART` copies them
/// and syncs the database file on the commit path, once per quarter of the limit.
pub const CHEAP_RESTART_PAGES: u32 = 64;

/// Default WAL size at which the writer restarts the WAL (`RESTART`), and the size the file is
/// cut back to when it is reused (`journal_size_limit`): 64 MiB
/// ([`SqliteOptions::wal_limit`](crate::SqliteOptions::wal_limit)).
///
/// Under sustained load the WAL grows to about this, then starts over; at the 30–50 MB/s of
/// WAL a loopback S3 run writes, that is one restart every second or two, each delaying one
/// batch by the pages the last `PASSIVE` had not copied plus one sync of the database file.
/// Much smaller and restarts come too often; much larger and opening the store after a crash
/// replays a longer WAL.
pub const WAL_LIMIT_BYTES: u64 = 64 << 20;

/// The checkpointer thread and its wake-up state.
#[derive(Debug)]
pub(crate) struct Checkpointer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct Shared {
    /// Set by the hook when a checkpoint is due, cleared by the checkpointer as it starts one.
    requested: Mutex<bool>,
    wake: Condvar,
    closed: AtomicBool,
    /// WAL frames the last checkpoint covered (copied or not): the hook asks for the next
    /// checkpoint once the WAL passes this plus `every_pages`.
    covered: AtomicU32,
    /// WAL frames copied into the database, as of the last checkpoint.
    backfilled: AtomicU32,
    /// Frames in the WAL after the writer's last commit.
    wal_pages: AtomicU32,
    /// The WAL limit in pages.
    limit_pages: u32,
    /// Uncopied pages that make the checkpointer run (see [`CHECKPOINTS_PER_LIMIT`]).
    every_pages: u32,
    /// The WAL limit in bytes.
    limit_bytes: u64,
}

impl Checkpointer {
    /// Starts the checkpointer on `conn` (its own connection to the store file, with the busy
    /// timeout set and the WAL open: see [`open_wal`]) for a database with `page_size`-byte
    /// pages, keeping the WAL near `limit_bytes`.
    pub(crate) fn start(
        conn: Connection,
        page_size: u32,
        limit_bytes: u64,
    ) -> std::io::Result<Self> {
        let limit_pages =
            u32::try_from(limit_bytes / u64::from(page_size.max(512))).unwrap_or(u32::MAX);
        let shared = Arc::new(Shared {
            requested: Mutex::new(false),
            wake: Condvar::new(),
            closed: AtomicBool::new(false),
            covered: AtomicU32::new(0),
            backfilled: AtomicU32::new(0),
            wal_pages: AtomicU32::new(0),
            limit_pages,
            limit_bytes,
            every_pages: (limit_pages / CHECKPOINTS_PER_LIMIT).max(1),
        });
        let thread = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("mllp-store-checkpoint".into())
                .spawn(move || run(&conn, &shared))?
        };
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Installs the WAL hook on the writer's connection, which turns SQLite's automatic
    /// checkpoints off (they are a WAL hook too) and wakes this checkpointer instead.
    pub(crate) fn attach(&self, writer: &mut Connection) -> rusqlite::Result<()> {
        writer.pragma_update(None, "wal_autocheckpoint", 0)?;
        writer.pragma_update(
            None,
            "journal_size_limit",
            i64::try_from(self.shared.limit_bytes).unwrap_or(i64::MAX),
        )?;
        let shared = Arc::clone(&self.shared);
        writer.wal_hook(Some(move |_: &mut Wal, pages: std::ffi::c_int| {
            let pages = u32::try_from(pages).unwrap_or(0);
            if pages < shared.wal_pages.swap(pages, Ordering::Relaxed) {
                // The WAL started over: nothing in it is covered yet.
                shared.covered.store(0, Ordering::Relaxed);
                shared.backfilled.store(0, Ordering::Relaxed);
            }
            // Past the limit the writer restarts the WAL itself (`restart_due`); a
            // checkpoint running then would only make that attempt fail.
            if pages < shared.limit_pages
                && pages >= shared.covered.load(Ordering::Relaxed) + shared.every_pages
            {
                shared.request();
            }
            Ok(())
        }))
    }

    /// Whether the writer should [`restart`](Self::restart) the WAL before its next
    /// transaction: it has reached the limit, or it holds a quarter of it and nearly all of
    /// it is copied (see the module docs).
    pub(crate) fn restart_due(&self) -> bool {
        let shared = &self.shared;
        let pages = shared.wal_pages.load(Ordering::Relaxed);
        pages >= shared.limit_pages
            || (pages >= shared.every_pages
                && pages.saturating_sub(shared.backfilled.load(Ordering::Relaxed))
                    <= CHEAP_RESTART_PAGES)
    }

    /// On the writer's connection, before a transaction: a `RESTART` checkpoint that does not
    /// wait (see the module docs), then the connection's usual `busy_timeout` again.
    pub(crate) fn restart(
        writer: &Connection,
        busy_timeout: std::time::Duration,
    ) -> rusqlite::Result<()> {
        writer.busy_timeout(std::time::Duration::ZERO)?;
        // BUSY (the checkpointer or a reader is in the WAL) only means "next time".
        let outcome = writer.wal_checkpoint_v2(None::<&str>, CheckpointMode::RESTART);
        writer.busy_timeout(busy_timeout)?;
        match outcome {
            Ok(_) => Ok(()),
            Err(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

impl Shared {
    fn request(&self) {
        let mut requested = self
            .requested
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if !*requested {
            *requested = true;
            self.wake.notify_one();
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Relaxed);
        {
            let _requested = self
                .shared
                .requested
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            self.shared.wake.notify_one();
        }
        if let Some(thread) = self.thread.take() {
            // A checkpoint in progress finishes first (bounded by the busy timeout).
            let _ = thread.join();
        }
    }
}

/// Opens the WAL on `conn`, the checkpointer's connection, by one read transaction.
///
/// A connection opens the WAL only with its first read; until then a checkpoint on it does
/// nothing at all and reports a log of -1 (`sqlite3PagerCheckpoint` without a WAL). That was
/// the checkpointer's state for its whole life before this read: every `PASSIVE` did nothing,
/// the hook (seeing nothing covered) woke it after every commit once the WAL passed its
/// threshold, and only the writer's `RESTART` at the limit ever copied the WAL,
/// all of it at once, on the commit path.
pub(crate) fn open_wal(conn: &Connection) -> rusqlite::Result<()> {
    conn.query_row("SELECT count(*) FROM sqlite_schema", [], |_| Ok(()))
}

/// The checkpointer's loop: wait for a request, checkpoint, repeat until closed.
fn run(conn: &Connection, shared: &Shared) {
    loop {
        {
            let mut requested = shared
                .requested
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            while !*requested && !shared.closed.load(Ordering::Relaxed) {
                requested = shared
                    .wake
                    .wait(requested)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            if shared.closed.load(Ordering::Relaxed) {
                return;
            }
            *requested = false;
        }
        checkpoint(conn, shared);
        // Light load: what came in during the copy is little, so copy that too while it
        // shrinks, until the writer can restart the WAL cheaply (`restart_due`). Under heavy
        // load the rest is large and waits for the next request.
        for _ in 0..FOLLOW_UPS {
            let left = shared
                .wal_pages
                .load(Ordering::Relaxed)
                .saturating_sub(shared.backfilled.load(Ordering::Relaxed));
            if left <= CHEAP_RESTART_PAGES || left > shared.every_pages / 8 {
                break;
            }
            checkpoint(conn, shared);
        }
    }
}

/// At most this many `PASSIVE`s follow a requested one (see [`run`]).
const FOLLOW_UPS: usize = 4;

/// One `PASSIVE` checkpoint. A failure (an I/O error, or a checkpoint that covered nothing)
/// only means the WAL stays longer: it counts as covering the WAL as it was when the
/// checkpoint started, so the hook asks again a quarter of the limit later rather than
/// after every commit, and the writer's restart at the limit holds regardless.
fn checkpoint(conn: &Connection, shared: &Shared) {
    let started_at = shared.wal_pages.load(Ordering::Relaxed);
    let covered = match conn.wal_checkpoint_v2(None::<&str>, CheckpointMode::PASSIVE) {
        Ok((log, copied)) => {
            if let Ok(copied) = u32::try_from(copied) {
                shared.backfilled.store(copied, Ordering::Relaxed);
            }
            u32::try_from(log).unwrap_or(started_at)
        }
        Err(_) => started_at,
    };
    shared.covered.store(covered, Ordering::Relaxed);
}
