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
//! - Once the WAL holds the limit ([`WAL_LIMIT_BYTES`] by default), the checkpointer copies
//!   on (woken after every commit) until at most [`RESTART_BUDGET_DIV`] pages are left
//!   uncopied, and the writer then runs a `RESTART` checkpoint itself before its next
//!   transaction (after the previous batch's ACKs went out): it copies those few pages, syncs
//!   the database file, and the next commit starts the WAL over; `journal_size_limit` cuts
//!   the file back to [`WAL_LIMIT_BYTES`]. It never waits: with the checkpointer mid-copy, or a
//!   reader (export) still in the WAL, it gives up at once and tries again before the next
//!   transaction. Past the hard limit (the limit plus half of it, [`HARD_LIMIT_NUM`]) the
//!   checkpointer stands aside and the writer restarts whatever is left to copy. The WAL so
//!   stays below 1.5 × [`WAL_LIMIT_BYTES`] plus a batch or two while the checkpointer keeps
//!   up; should a copy it had started take long (a machine short of CPU), the writer's
//!   restart waits for it (up to the busy timeout) once the WAL holds twice the limit
//!   ([`WAIT_LIMIT_NUM`]), so the WAL stays below about twice the limit plus a batch, except
//!   while a reader holds an old snapshot for longer than the busy timeout (SQLite's own
//!   checkpoints have the same limit).
//! - The checkpointer syncs the database file after each `PASSIVE` that copied anything: SQLite
//!   itself syncs it only after a checkpoint that left nothing in the WAL to copy, which under
//!   load is only the writer's `RESTART`, which then had to write back everything copied
//!   since the last restart, on the commit path.
//!
//! Durability is unchanged: a commit is durable once the WAL is synced (`synchronous=FULL`),
//! and the WAL is reused only after the database file holds what it carried on stable
//! storage. That ordering is SQLite's, not the checkpointer's sync above (a latency measure,
//! neither needed nor enough for it): a writer starts the WAL over only once a checkpoint has
//! recorded every frame as copied (`nBackfill` = `mxFrame` in the WAL index), and
//! `walCheckpoint` (`sqlite3.c`, SQLite 3.54) records that only after it has synced the
//! database file, inside the same checkpoint, with the sync flags of the connection that runs
//! it: the writer's (`synchronous=FULL`) or the checkpointer's, which is therefore set to
//! `FULL` explicitly rather than left to the build's default (at `OFF` both syncs are no-ops).
//! The checkpointer's own sync comes after the checkpoint has returned, too late: a writer
//! may have started the WAL over in between. `cli/tests/powerloss.rs`
//! (`wal_restarts_only_after_the_database_sync`) checks the ordering in a recorded run and by
//! simulated power cuts right after each restart; its negative control
//! ([`SqliteOptions::unsafe_checkpoint_synchronous_off_for_tests`](crate::SqliteOptions):
//! the checkpointer's connection at `synchronous=OFF`, its own sync still on) restarts the
//! WAL before the database sync and loses AA'd messages (`BENCHMARKS.md`).

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

/// The WAL may pass the limit by this fraction of it, 1/2, while the checkpointer copies
/// what is left: past `limit + limit / HARD_LIMIT_NUM` (96 MiB with the default limit) the
/// writer restarts the WAL whatever is left to copy.
pub const HARD_LIMIT_NUM: u32 = 2;

/// Past this many times the limit, 2, the writer's `RESTART` waits (up to the connection's
/// `busy_timeout`) for a checkpoint in progress or a reader instead of trying again before
/// the next transaction. Past the hard limit the checkpointer stands aside, but a `PASSIVE`
/// it had started goes on; on a machine short of CPU (a 2-core machine running a test suite
/// and a fuzzer) that copy took so long that the writer's attempts all failed and the WAL
/// reached 3.2 times a 4 MiB limit (`store/tests/it/checkpoint.rs`). Waiting here delays one
/// transaction, only when the checkpointer has fallen that far behind, and bounds the WAL.
pub const WAIT_LIMIT_NUM: u32 = 2;

/// At the limit, the most uncopied WAL pages that the writer's own `RESTART` copies (and
/// syncs) on the commit path: 1/64 of the limit (256 pages, 1 MiB, with the default limit),
/// at least [`CHEAP_RESTART_PAGES`]. With more left, the checkpointer copies on (the hook
/// wakes it after every commit) until this is reached: under load a `PASSIVE` of the rest
/// takes a few milliseconds, during which a few hundred pages come in, so it converges to
/// about that within a few rounds.
pub const RESTART_BUDGET_DIV: u32 = 64;

/// See [`RESTART_BUDGET_DIV`].
fn restart_budget(limit_pages: u32) -> u32 {
    (limit_pages / RESTART_BUDGET_DIV).max(CHEAP_RESTART_PAGES)
}

/// Default WAL size at which the writer restarts the WAL (`RESTART`), and the size the file is
/// cut back to when it is reused (`journal_size_limit`): 64 MiB
/// ([`SqliteOptions::wal_limit`](crate::SqliteOptions::wal_limit)).
///
/// Under sustained load the WAL grows to about this (at most half as much again while the
/// checkpointer copies the rest: [`HARD_LIMIT_NUM`]; twice it, where the writer waits, if
/// the checkpointer falls behind: [`WAIT_LIMIT_NUM`]), then starts over; at the 30–100 MB/s of
/// WAL a loopback S3 run writes, that is one restart every second or two, each delaying one
/// batch by at most [`RESTART_BUDGET_DIV`] pages to copy plus one sync of the database file.
/// Much smaller and restarts come too often, and checkpoints copy the same hot pages (the
/// indexes' and the table's last) more often; much larger and opening the store after a
/// crash replays a longer WAL.
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
    /// Past it the writer restarts the WAL however much is left to copy (see
    /// [`HARD_LIMIT_NUM`]).
    hard_limit_pages: u32,
    /// Past it the writer's restart waits for a checkpoint in progress (see
    /// [`WAIT_LIMIT_NUM`]).
    wait_limit_pages: u32,
    /// At the limit, the most uncopied pages the writer's restart copies itself (see
    /// [`RESTART_BUDGET_DIV`]).
    budget_pages: u32,
    /// Uncopied pages that make the checkpointer run (see [`CHECKPOINTS_PER_LIMIT`]).
    every_pages: u32,
    /// The WAL limit in bytes.
    limit_bytes: u64,
}

impl Checkpointer {
    /// Starts the checkpointer on `conn` (its own connection to the store file, with the busy
    /// timeout and `synchronous` set and the WAL open: see [`open_wal`]) for a database with
    /// `page_size`-byte pages, keeping the WAL near `limit_bytes`.
    pub(crate) fn start(
        conn: Connection,
        page_size: u32,
        limit_bytes: u64,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared::new(page_size, limit_bytes));
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
            if shared.checkpoint_due(pages) {
                shared.request();
            }
            Ok(())
        }))
    }

    /// Whether the writer should [`restart`](Self::restart) the WAL before its next
    /// transaction: it has reached the limit, or it holds a quarter of it and nearly all of
    /// it is copied (see the module docs).
    pub(crate) fn restart_due(&self) -> bool {
        self.shared.restart_due()
    }

    /// Whether the writer's [`restart`](Self::restart) should wait for the checkpointer (or
    /// a reader) instead of trying again next time: the WAL holds [`WAIT_LIMIT_NUM`] times
    /// the limit or more.
    pub(crate) fn restart_must_wait(&self) -> bool {
        self.shared.wal_pages.load(Ordering::Relaxed) >= self.shared.wait_limit_pages
    }

    /// On the writer's connection, before a transaction: a `RESTART` checkpoint, then the
    /// connection's usual `busy_timeout` again. It does not wait (see the module docs) unless
    /// `wait` ([`restart_must_wait`](Self::restart_must_wait)): then a checkpoint in progress
    /// or a reader in the WAL is waited for up to `busy_timeout`.
    pub(crate) fn restart(
        writer: &Connection,
        busy_timeout: std::time::Duration,
        wait: bool,
    ) -> rusqlite::Result<()> {
        if !wait {
            writer.busy_timeout(std::time::Duration::ZERO)?;
        }
        // BUSY (the checkpointer or a reader is in the WAL) only means "next time".
        let outcome = writer.wal_checkpoint_v2(None::<&str>, CheckpointMode::RESTART);
        if !wait {
            writer.busy_timeout(busy_timeout)?;
        }
        match outcome {
            Ok(_) => Ok(()),
            Err(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

impl Shared {
    fn new(page_size: u32, limit_bytes: u64) -> Self {
        let limit_pages =
            u32::try_from(limit_bytes / u64::from(page_size.max(512))).unwrap_or(u32::MAX);
        Self {
            requested: Mutex::new(false),
            wake: Condvar::new(),
            closed: AtomicBool::new(false),
            covered: AtomicU32::new(0),
            backfilled: AtomicU32::new(0),
            wal_pages: AtomicU32::new(0),
            limit_pages,
            hard_limit_pages: limit_pages.saturating_add(limit_pages / HARD_LIMIT_NUM),
            wait_limit_pages: limit_pages.saturating_mul(WAIT_LIMIT_NUM),
            budget_pages: restart_budget(limit_pages),
            limit_bytes,
            every_pages: (limit_pages / CHECKPOINTS_PER_LIMIT).max(1),
        }
    }

    /// See [`Checkpointer::restart_due`].
    fn restart_due(&self) -> bool {
        let pages = self.wal_pages.load(Ordering::Relaxed);
        let uncopied = self.uncopied(pages);
        pages >= self.hard_limit_pages
            || (pages >= self.limit_pages && uncopied <= self.budget_pages)
            || (pages >= self.every_pages && uncopied <= CHEAP_RESTART_PAGES)
    }

    /// WAL pages no checkpoint has copied yet, of `pages`.
    fn uncopied(&self, pages: u32) -> u32 {
        pages.saturating_sub(self.backfilled.load(Ordering::Relaxed))
    }

    /// Whether a commit that left `pages` in the WAL should wake the checkpointer: a
    /// [quarter](CHECKPOINTS_PER_LIMIT) of the limit came since the last checkpoint; or the
    /// WAL is past the limit and more is left to copy than the writer's restart should copy
    /// on the commit path. Not past the hard limit: there the writer restarts the WAL itself
    /// ([`restart_due`](Checkpointer::restart_due)), and a checkpoint running then would only
    /// make that attempt fail.
    fn checkpoint_due(&self, pages: u32) -> bool {
        if pages < self.limit_pages {
            pages >= self.covered.load(Ordering::Relaxed) + self.every_pages
        } else {
            pages < self.hard_limit_pages && self.uncopied(pages) > self.budget_pages
        }
    }

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
///
/// A `PASSIVE` during which commits came in (always, under load) leaves the pages it wrote
/// unsynced: SQLite syncs the database file only when a checkpoint ends with nothing left in
/// the WAL to copy, which under load means the writer's `RESTART`, which
/// so had to write back everything every `PASSIVE` had copied since the last restart (53 ms
/// for one restart under S3: `BENCHMARKS.md`, issue #21). The checkpointer therefore syncs the
/// database file itself after such a `PASSIVE`, off the commit path. Durability does not
/// depend on this sync (see the module docs): it only moves the write-back off the commit path.
/// `cli/tests/powerloss.rs` (`wal_restarts_only_after_the_database_sync`) checks in a recorded
/// run that each copy this thread starts is followed by its sync of the database file (it
/// fails without this sync: 21–36 of 64–105 copies left unsynced, `BENCHMARKS.md`).
fn checkpoint(conn: &Connection, shared: &Shared) {
    let started_at = shared.wal_pages.load(Ordering::Relaxed);
    let before = shared.backfilled.load(Ordering::Relaxed);
    let covered = match conn.wal_checkpoint_v2(None::<&str>, CheckpointMode::PASSIVE) {
        Ok((log, copied)) => {
            if let Ok(copied) = u32::try_from(copied) {
                shared.backfilled.store(copied, Ordering::Relaxed);
                // Copied something: sync. (SQLite synced already if no commit came in
                // meanwhile; a second sync of a clean file costs little.) A failed sync only
                // leaves the writer's restart more to write back.
                if copied != before {
                    let _ = sync_database(conn);
                }
            }
            u32::try_from(log).unwrap_or(started_at)
        }
        Err(_) => started_at,
    };
    shared.covered.store(covered, Ordering::Relaxed);
}

/// Syncs the database file of `conn` (its main database) through SQLite's own file handle
/// (`xSync`, as a checkpoint does), so no second descriptor of the file is ever opened and
/// closed (closing one would drop every POSIX lock this process holds on the file).
fn sync_database(conn: &Connection) -> rusqlite::Result<()> {
    use rusqlite::ffi;
    let mut file: *mut ffi::sqlite3_file = std::ptr::null_mut();
    // SAFETY: `conn.handle()` is the live connection, used only by this thread while `conn`
    // is borrowed; SQLITE_FCNTL_FILE_POINTER writes one `sqlite3_file *` through the pointer
    // passed, which points at `file`, a local of that type.
    #[allow(unsafe_code)]
    let rc = unsafe {
        ffi::sqlite3_file_control(
            conn.handle(),
            c"main".as_ptr(),
            ffi::SQLITE_FCNTL_FILE_POINTER,
            std::ptr::from_mut(&mut file).cast(),
        )
    };
    if rc != ffi::SQLITE_OK {
        return Err(rusqlite::Error::SqliteFailure(ffi::Error::new(rc), None));
    }
    // SAFETY: SQLite returned its open database file for `conn` (or null, checked), valid
    // while `conn` is open and this thread the only user of `conn`; `pMethods` of an open
    // file is its VFS's method table (null for a file that failed to open, checked).
    #[allow(unsafe_code)]
    let sync = unsafe {
        file.as_ref()
            .and_then(|f| f.pMethods.as_ref())
            .and_then(|m| m.xSync)
    };
    let Some(sync) = sync else {
        return Ok(());
    };
    // SAFETY: `xSync` of the file's own method table, called on that file with a valid
    // flag, as SQLite's checkpoint calls it; no other call on `conn` runs meanwhile.
    #[allow(unsafe_code)]
    let rc = unsafe { sync(file, ffi::SQLITE_SYNC_NORMAL) };
    if rc == ffi::SQLITE_OK {
        Ok(())
    } else {
        Err(rusqlite::Error::SqliteFailure(ffi::Error::new(rc), None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default limit's state after a commit left `pages` in the WAL, `covered` of them
    /// seen by the last checkpoint and `backfilled` copied.
    fn state(pages: u32, covered: u32, backfilled: u32) -> Shared {
        let shared = Shared::new(4096, WAL_LIMIT_BYTES);
        shared.wal_pages.store(pages, Ordering::Relaxed);
        shared.covered.store(covered, Ordering::Relaxed);
        shared.backfilled.store(backfilled, Ordering::Relaxed);
        shared
    }

    /// At the limit with much left to copy, the checkpointer copies it (off the commit
    /// path) and the writer waits for it; once little is left, the writer restarts and the
    /// checkpointer stands aside; past the hard limit the writer restarts regardless. Before,
    /// the writer's restart at the limit copied everything since the last `PASSIVE` (up to a
    /// quarter of the limit) and synced it on the commit path.
    #[test]
    fn at_the_limit_the_checkpointer_copies_the_rest_before_the_writer_restarts() {
        let limit = 16_384; // 64 MiB of 4 KiB pages
        assert_eq!(state(0, 0, 0).limit_pages, limit);
        let budget = limit / RESTART_BUDGET_DIV;

        let much_left = state(limit, limit - 4_096, limit - 4_096);
        assert!(
            much_left.checkpoint_due(limit),
            "the checkpointer is not asked"
        );
        assert!(
            !much_left.restart_due(),
            "the writer copies 4 096 pages itself"
        );

        let little_left = state(limit + 100, limit, limit + 100 - budget);
        assert!(!little_left.checkpoint_due(limit + 100));
        assert!(little_left.restart_due());

        let hard = limit + limit / 2;
        let past_hard = state(hard, hard - 4_096, hard - 4_096);
        assert!(
            !past_hard.checkpoint_due(hard),
            "a checkpoint would block the restart"
        );
        assert!(past_hard.restart_due());
    }

    /// Below the limit: a `PASSIVE` per quarter of the limit, an early restart only when
    /// nearly everything is copied.
    #[test]
    fn below_the_limit_a_checkpoint_per_quarter() {
        let quarter = 4_096;
        assert!(!state(quarter - 1, 0, 0).checkpoint_due(quarter - 1));
        assert!(state(quarter, 0, 0).checkpoint_due(quarter));
        assert!(!state(quarter + 10, quarter, 0).checkpoint_due(quarter + 10));
        assert!(!state(quarter + 10, quarter, quarter - 100).restart_due());
        assert!(state(quarter + 10, quarter, quarter).restart_due());
    }

    /// The checkpointer's own sync of the database file works on its connection.
    #[test]
    fn the_database_file_syncs_through_sqlites_handle() {
        let dir = std::env::temp_dir().join(format!("mllp-ckpt-sync-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let conn = Connection::open(dir.join("s.db")).unwrap();
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; CREATE TABLE t (x); INSERT INTO t VALUES (1);",
        )
        .unwrap();
        sync_database(&conn).unwrap();
        drop(conn);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
