//! A few large writes per commit to the WAL: an SQLite VFS that gathers a connection's WAL
//! appends and makes them, in 124 KiB writes, when SQLite syncs the file.
//!
//! SQLite writes each WAL frame with two `pwrite` calls, its 24-byte header and then its page,
//! so a commit of `n` pages costs `2 n` system calls before its one `fsync`. At S3 (50
//! connections × 8 in flight, 1 KiB messages) the writer's commits carry ~0.7 frames per
//! message, and on the development machine two writes of a frame cost 2.1–2.3 µs of CPU
//! against 0.4–0.5 µs for the same bytes in large writes (`benches/wal_writes.c`): the
//! writer's system time fell from 3.5–4.2 to 1.3–1.7 µs per message, the server's CPU per
//! message by a sixth, and S3 against the durable baseline rose from 1.235 to 1.38
//! (`BENCHMARKS.md`, issue #21).
//!
//! [`NAME`] wraps the platform's default VFS. For a file that SQLite opens as a WAL
//! (`SQLITE_OPEN_WAL`), each write that continues the one before it is appended to a buffer in
//! memory instead; the buffer is written ([`WRITE_CHUNK`] bytes per call) before anything
//! that needs the bytes in the file:
//!
//! - `xSync` (so what SQLite syncs is exactly what it wrote, in the same order: the
//!   power-loss ordering of `cli/tests/powerloss.rs` is unchanged, and that test runs through
//!   this VFS),
//! - `xRead` of a range that overlaps the buffer, `xFileSize`, `xTruncate`, `xFileControl`,
//!   `xClose`,
//! - a write that does not continue the buffer (SQLite rewrites a frame of the same
//!   transaction in place), or a buffer past [`GATHER_LIMIT`].
//!
//! Every other file (the database, `-shm`) and every other method pass straight through.
//!
//! **Only for connections at `synchronous=FULL`.** Another connection (the checkpointer, the
//! search follower, an export) finds a commit's frames through the WAL index, which SQLite
//! updates after the commit's WAL sync: at `FULL` every commit syncs, so the frames are in the
//! file before any reader can look for them. At `NORMAL` a commit updates the index without a
//! sync, and a reader could look for frames still in this buffer. So only the store's
//! writer connection (`Role::Writer` in `crate::sqlite`), which sets and checks `FULL`, opens
//! through this VFS; the test-only `NORMAL` switch, and every other connection (the pruner
//! runs at `NORMAL`), use the default VFS.
//!
//! A write that fails while the buffer is written is reported by the call that wrote it
//! (`xSync` for a commit), with the code of the underlying write (`SQLITE_FULL` for a full
//! disk), so the commit fails as it would have; the buffer is dropped, as SQLite writes the
//! frames again from the same offset.
//!
//! The VFS holds no state of its own; each file's buffer belongs to its connection, which
//! SQLite uses from one thread at a time. A buffer keeps its capacity while its WAL is open:
//! the largest commit's frames (a few hundred KiB at S3), at most [`GATHER_LIMIT`], beside
//! SQLite's own page cache.

#![allow(unsafe_code)]

use std::ffi::{CStr, c_char, c_int, c_void};
use std::ptr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicPtr, Ordering};

use rusqlite::ffi;

/// The VFS's registered name: `mllp-wal-batch`.
pub(crate) const NAME: &CStr = c"mllp-wal-batch";

/// The most bytes gathered before they are written anyway: 4 MiB (about a thousand 4 KiB
/// frames; a commit of the writer's largest batches is well under it).
const GATHER_LIMIT: usize = 4 << 20;

/// The most bytes passed to the wrapped VFS's `xWrite` at once: 124 KiB. The unix VFS writes
/// at most 128 KiB − 1 bytes per call (`seekAndWriteFd` masks the length with `0x1ffff`,
/// `sqlite3.c`) and reports a longer write as a full disk; 124 KiB keeps chunks page-aligned.
/// One call per 124 KiB instead of two per 4 KiB page is still the saving.
const WRITE_CHUNK: usize = 124 << 10;

/// The VFS wrapped (the platform's default), set once before [`NAME`] is registered.
static INNER: AtomicPtr<ffi::sqlite3_vfs> = AtomicPtr::new(ptr::null_mut());

/// Registers [`NAME`] (once per process) and returns it, or `None` if SQLite has no default
/// VFS or refused the registration; callers then use the default VFS.
pub(crate) fn registered() -> Option<&'static CStr> {
    static DONE: OnceLock<bool> = OnceLock::new();
    DONE.get_or_init(register).then_some(NAME)
}

fn register() -> bool {
    // SAFETY: `sqlite3_vfs_find(NULL)` initialises SQLite if needed and returns its default
    // VFS, a static object that lives as long as the process, or null.
    let inner = unsafe { ffi::sqlite3_vfs_find(ptr::null()) };
    // SAFETY: non-null `inner` points at a live `sqlite3_vfs` (above); it is only read.
    let Some(base) = (unsafe { inner.as_ref() }) else {
        return false;
    };
    INNER.store(inner, Ordering::Release);
    // A copy of the default VFS with our `xOpen`, name and file size. Every other method is
    // the default's own, called with a pointer to this copy: its `pAppData` and `mxPathname`
    // are the default's, and the unix VFS's other methods read nothing else from it
    // (`unixDelete`, `unixAccess`, `unixFullPathname`… mark it unused).
    let mut ours = *base;
    ours.szOsFile = c_int::try_from(INNER_OFFSET).unwrap_or(c_int::MAX) + base.szOsFile;
    ours.zName = NAME.as_ptr();
    ours.pNext = ptr::null_mut();
    ours.xOpen = Some(open);
    let ours = Box::leak(Box::new(ours));
    // SAFETY: `ours` is a complete VFS that lives for the rest of the process (leaked);
    // registering it as not the default changes nothing for connections that do not name it.
    let rc = unsafe { ffi::sqlite3_vfs_register(ours, 0) };
    rc == ffi::SQLITE_OK
}

/// What SQLite allocates for each file this VFS opens (`szOsFile` bytes): this header, then,
/// at [`INNER_OFFSET`], the wrapped VFS's own file object.
#[repr(C)]
struct File {
    /// SQLite's part: must come first (SQLite casts the allocation to `sqlite3_file`).
    base: ffi::sqlite3_file,
    /// The wrapped VFS's file, inside the same allocation.
    inner: *mut ffi::sqlite3_file,
    /// The WAL's gathered writes; null for every other file (all calls pass through).
    pending: *mut Pending,
}

/// Where the wrapped file starts in the allocation: after [`File`], 16-byte aligned.
const INNER_OFFSET: usize = std::mem::size_of::<File>().next_multiple_of(16);

/// Writes gathered for one WAL file: `bytes` belong at offset `start`.
#[derive(Debug, Default)]
struct Pending {
    start: i64,
    bytes: Vec<u8>,
}

impl Pending {
    /// The end of the gathered range (its last byte's offset + 1).
    fn end(&self) -> i64 {
        self.start + self.bytes.len() as i64
    }

    /// Whether `[offset, offset + len)` overlaps what is gathered.
    fn overlaps(&self, offset: i64, len: usize) -> bool {
        !self.bytes.is_empty() && offset < self.end() && offset + len as i64 > self.start
    }
}

unsafe extern "C" fn open(
    _vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    let inner_vfs = INNER.load(Ordering::Acquire);
    let f = file.cast::<File>();
    // SAFETY: SQLite passes `szOsFile` bytes (our size: the header, then the wrapped file at
    // `INNER_OFFSET`), from its own allocator (8-byte aligned; `INNER_OFFSET` is a multiple
    // of 16, so the wrapped file is aligned as the wrapped VFS expects); `inner_vfs` was set
    // before registration.
    unsafe {
        let inner = file
            .cast::<u8>()
            .add(INNER_OFFSET)
            .cast::<ffi::sqlite3_file>();
        f.write(File {
            base: ffi::sqlite3_file {
                pMethods: ptr::null(),
            },
            inner,
            pending: ptr::null_mut(),
        });
        let Some(inner_open) = (*inner_vfs).xOpen else {
            return ffi::SQLITE_CANTOPEN;
        };
        (*inner).pMethods = ptr::null();
        let rc = inner_open(inner_vfs, name, inner, flags, out_flags);
        // SQLite calls `xClose` exactly when `pMethods` is set after `xOpen`, failed or not:
        // ours is set exactly when the wrapped file's is, so `close` reaches it.
        if (*inner).pMethods.is_null() {
            return rc;
        }
        if rc == ffi::SQLITE_OK && flags & ffi::SQLITE_OPEN_WAL != 0 {
            (*f).pending = Box::into_raw(Box::default());
        }
        (*f).base.pMethods = &METHODS;
        rc
    }
}

/// The wrapped file and its methods.
///
/// # Safety
///
/// `file` is a file opened by [`open`] whose wrapped file is open (SQLite calls methods only
/// between a successful `pMethods` and `xClose`).
unsafe fn inner(
    file: *mut ffi::sqlite3_file,
) -> (*mut ffi::sqlite3_file, &'static ffi::sqlite3_io_methods) {
    // SAFETY: per this function's contract, `file` is our `File` and its `inner` an open file
    // whose `pMethods` points at its VFS's static method table.
    unsafe {
        let inner = (*file.cast::<File>()).inner;
        (inner, &*(*inner).pMethods)
    }
}

/// Writes what is gathered for `file` (nothing to do for a file that is not a WAL).
///
/// # Safety
///
/// As for [`inner`].
unsafe fn flush(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: as for `inner`; `pending` is null or the box `open` made, used by this thread.
    unsafe {
        let Some(pending) = (*file.cast::<File>()).pending.as_mut() else {
            return ffi::SQLITE_OK;
        };
        if pending.bytes.is_empty() {
            return ffi::SQLITE_OK;
        }
        let (inner, methods) = inner(file);
        let Some(write) = methods.xWrite else {
            pending.bytes.clear();
            return ffi::SQLITE_IOERR_WRITE;
        };
        let mut rc = ffi::SQLITE_OK;
        let mut offset = pending.start;
        for chunk in pending.bytes.chunks(WRITE_CHUNK) {
            #[cfg(test)]
            tests::count(|c| c.made += 1);
            // `WRITE_CHUNK` fits a `c_int`.
            rc = write(inner, chunk.as_ptr().cast(), chunk.len() as c_int, offset);
            if rc != ffi::SQLITE_OK {
                break;
            }
            offset += chunk.len() as i64;
        }
        // Written or failed, the bytes are done with: after a failure SQLite writes the
        // frames again (a failed commit leaves the WAL's end where it was).
        pending.bytes.clear();
        rc
    }
}

/// Flushes, then runs `then` if that worked.
///
/// # Safety
///
/// As for [`inner`].
unsafe fn flushed(file: *mut ffi::sqlite3_file, then: impl FnOnce() -> c_int) -> c_int {
    // SAFETY: per this function's contract.
    match unsafe { flush(file) } {
        ffi::SQLITE_OK => then(),
        rc => rc,
    }
}

unsafe extern "C" fn close(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: SQLite closes each file it opened once; after this nothing uses it.
    unsafe {
        let flushed = flush(file);
        let f = file.cast::<File>();
        if !(*f).pending.is_null() {
            drop(Box::from_raw((*f).pending));
            (*f).pending = ptr::null_mut();
        }
        let (inner, methods) = inner(file);
        let closed = methods.xClose.map_or(ffi::SQLITE_OK, |close| close(inner));
        if flushed == ffi::SQLITE_OK {
            closed
        } else {
            flushed
        }
    }
}

unsafe extern "C" fn read(
    file: *mut ffi::sqlite3_file,
    buf: *mut c_void,
    amount: c_int,
    offset: i64,
) -> c_int {
    // SAFETY: SQLite calls this on an open file with a buffer of `amount` bytes; the
    // reference to the gathered writes ends before `flush` makes its own.
    unsafe {
        let len = usize::try_from(amount).unwrap_or(0);
        let gathered = (*file.cast::<File>())
            .pending
            .as_ref()
            .is_some_and(|p| p.overlaps(offset, len));
        if gathered {
            let rc = flush(file);
            if rc != ffi::SQLITE_OK {
                return rc;
            }
        }
        let (inner, methods) = inner(file);
        methods.xRead.map_or(ffi::SQLITE_IOERR_READ, |read| {
            read(inner, buf, amount, offset)
        })
    }
}

unsafe extern "C" fn write(
    file: *mut ffi::sqlite3_file,
    buf: *const c_void,
    amount: c_int,
    offset: i64,
) -> c_int {
    // SAFETY: SQLite calls this on an open file with `amount` readable bytes at `buf`, valid
    // for the call (they are copied before it returns); each reference to the gathered
    // writes ends before `flush` makes its own.
    unsafe {
        let len = usize::try_from(amount).unwrap_or(0);
        let pending = (*file.cast::<File>()).pending;
        #[cfg(test)]
        if !pending.is_null() {
            tests::count(|c| c.asked += 1);
        }
        if !pending.is_null() && len <= GATHER_LIMIT {
            let continues = {
                let p = &*pending;
                !p.bytes.is_empty() && offset == p.end() && p.bytes.len() + len <= GATHER_LIMIT
            };
            if !continues {
                let rc = flush(file);
                if rc != ffi::SQLITE_OK {
                    return rc;
                }
                (*pending).start = offset;
            }
            if len > 0 {
                // (SQLite never writes 0 bytes; a slice from a possibly null pointer would be
                // undefined even then.)
                (*pending)
                    .bytes
                    .extend_from_slice(std::slice::from_raw_parts(buf.cast::<u8>(), len));
            }
            return ffi::SQLITE_OK;
        }
        // Larger than the buffer: written as it comes, after what is gathered.
        let rc = flush(file);
        if rc != ffi::SQLITE_OK {
            return rc;
        }
        #[cfg(test)]
        if !pending.is_null() {
            tests::count(|c| c.made += 1);
        }
        let (inner, methods) = inner(file);
        methods.xWrite.map_or(ffi::SQLITE_IOERR_WRITE, |write| {
            write(inner, buf, amount, offset)
        })
    }
}

unsafe extern "C" fn truncate(file: *mut ffi::sqlite3_file, size: i64) -> c_int {
    // SAFETY: SQLite calls this on an open file.
    unsafe {
        flushed(file, || {
            let (inner, methods) = inner(file);
            methods
                .xTruncate
                .map_or(ffi::SQLITE_IOERR_TRUNCATE, |f| f(inner, size))
        })
    }
}

unsafe extern "C" fn sync(file: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    // SAFETY: SQLite calls this on an open file.
    unsafe {
        flushed(file, || {
            let (inner, methods) = inner(file);
            methods
                .xSync
                .map_or(ffi::SQLITE_IOERR_FSYNC, |f| f(inner, flags))
        })
    }
}

unsafe extern "C" fn file_size(file: *mut ffi::sqlite3_file, size: *mut i64) -> c_int {
    // SAFETY: SQLite calls this on an open file with a place for the size.
    unsafe {
        flushed(file, || {
            let (inner, methods) = inner(file);
            methods
                .xFileSize
                .map_or(ffi::SQLITE_IOERR_FSTAT, |f| f(inner, size))
        })
    }
}

unsafe extern "C" fn lock(file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    // SAFETY: SQLite calls this on an open file.
    unsafe {
        let (inner, methods) = inner(file);
        methods
            .xLock
            .map_or(ffi::SQLITE_IOERR_LOCK, |f| f(inner, level))
    }
}

unsafe extern "C" fn unlock(file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    // SAFETY: SQLite calls this on an open file.
    unsafe {
        let (inner, methods) = inner(file);
        methods
            .xUnlock
            .map_or(ffi::SQLITE_IOERR_UNLOCK, |f| f(inner, level))
    }
}

unsafe extern "C" fn check_reserved_lock(file: *mut ffi::sqlite3_file, out: *mut c_int) -> c_int {
    // SAFETY: SQLite calls this on an open file with a place for the answer.
    unsafe {
        let (inner, methods) = inner(file);
        methods
            .xCheckReservedLock
            .map_or(ffi::SQLITE_IOERR_CHECKRESERVEDLOCK, |f| f(inner, out))
    }
}

unsafe extern "C" fn file_control(
    file: *mut ffi::sqlite3_file,
    op: c_int,
    arg: *mut c_void,
) -> c_int {
    // SAFETY: SQLite calls this on an open file; `arg` is passed on as it came.
    unsafe {
        flushed(file, || {
            let (inner, methods) = inner(file);
            methods
                .xFileControl
                .map_or(ffi::SQLITE_NOTFOUND, |f| f(inner, op, arg))
        })
    }
}

unsafe extern "C" fn sector_size(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: SQLite calls this on an open file.
    unsafe {
        let (inner, methods) = inner(file);
        methods.xSectorSize.map_or(4096, |f| f(inner))
    }
}

unsafe extern "C" fn device_characteristics(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: SQLite calls this on an open file.
    unsafe {
        let (inner, methods) = inner(file);
        methods.xDeviceCharacteristics.map_or(0, |f| f(inner))
    }
}

unsafe extern "C" fn shm_map(
    file: *mut ffi::sqlite3_file,
    region: c_int,
    size: c_int,
    extend: c_int,
    out: *mut *mut c_void,
) -> c_int {
    // SAFETY: SQLite calls this on an open file with a place for the mapping.
    unsafe {
        let (inner, methods) = inner(file);
        match methods.xShmMap {
            Some(f) if methods.iVersion >= 2 => f(inner, region, size, extend, out),
            _ => ffi::SQLITE_IOERR_SHMMAP,
        }
    }
}

unsafe extern "C" fn shm_lock(
    file: *mut ffi::sqlite3_file,
    offset: c_int,
    n: c_int,
    flags: c_int,
) -> c_int {
    // SAFETY: SQLite calls this on an open file.
    unsafe {
        let (inner, methods) = inner(file);
        match methods.xShmLock {
            Some(f) if methods.iVersion >= 2 => f(inner, offset, n, flags),
            _ => ffi::SQLITE_IOERR_SHMLOCK,
        }
    }
}

unsafe extern "C" fn shm_barrier(file: *mut ffi::sqlite3_file) {
    // SAFETY: SQLite calls this on an open file.
    unsafe {
        let (inner, methods) = inner(file);
        match methods.xShmBarrier {
            Some(f) if methods.iVersion >= 2 => f(inner),
            _ => std::sync::atomic::fence(Ordering::SeqCst),
        }
    }
}

unsafe extern "C" fn shm_unmap(file: *mut ffi::sqlite3_file, delete: c_int) -> c_int {
    // SAFETY: SQLite calls this on an open file.
    unsafe {
        let (inner, methods) = inner(file);
        match methods.xShmUnmap {
            Some(f) if methods.iVersion >= 2 => f(inner, delete),
            _ => ffi::SQLITE_OK,
        }
    }
}

unsafe extern "C" fn fetch(
    file: *mut ffi::sqlite3_file,
    offset: i64,
    amount: c_int,
    out: *mut *mut c_void,
) -> c_int {
    // SAFETY: SQLite calls this on an open file with a place for the pointer. A WAL is never
    // fetched (SQLite maps only database files); null tells SQLite to read instead.
    unsafe {
        let (inner, methods) = inner(file);
        match methods.xFetch {
            Some(f) if methods.iVersion >= 3 => f(inner, offset, amount, out),
            _ => {
                *out = ptr::null_mut();
                ffi::SQLITE_OK
            }
        }
    }
}

unsafe extern "C" fn unfetch(
    file: *mut ffi::sqlite3_file,
    offset: i64,
    page: *mut c_void,
) -> c_int {
    // SAFETY: SQLite calls this on an open file, with a pointer `fetch` gave (or null).
    unsafe {
        let (inner, methods) = inner(file);
        match methods.xUnfetch {
            Some(f) if methods.iVersion >= 3 => f(inner, offset, page),
            _ => ffi::SQLITE_OK,
        }
    }
}

/// The methods of every file this VFS opens.
static METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 3,
    xClose: Some(close),
    xRead: Some(read),
    xWrite: Some(write),
    xTruncate: Some(truncate),
    xSync: Some(sync),
    xFileSize: Some(file_size),
    xLock: Some(lock),
    xUnlock: Some(unlock),
    xCheckReservedLock: Some(check_reserved_lock),
    xFileControl: Some(file_control),
    xSectorSize: Some(sector_size),
    xDeviceCharacteristics: Some(device_characteristics),
    xShmMap: Some(shm_map),
    xShmLock: Some(shm_lock),
    xShmBarrier: Some(shm_barrier),
    xShmUnmap: Some(shm_unmap),
    xFetch: Some(fetch),
    xUnfetch: Some(unfetch),
};

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::path::Path;

    use mllp_test_support::TempDir;
    use rusqlite::{Connection, OpenFlags};

    use super::*;

    /// WAL writes on this thread: asked for by SQLite, and made to the file.
    #[derive(Debug, Default, Clone, Copy)]
    pub(super) struct Counts {
        pub(super) asked: u64,
        pub(super) made: u64,
    }

    thread_local! {
        static COUNTS: Cell<Counts> = Cell::new(Counts::default());
    }

    pub(super) fn count(f: impl FnOnce(&mut Counts)) {
        COUNTS.with(|c| {
            let mut counts = c.get();
            f(&mut counts);
            c.set(counts);
        });
    }

    fn counts() -> Counts {
        COUNTS.with(Cell::get)
    }

    /// A connection through the VFS at `synchronous=FULL`, as the store's writer opens it.
    fn writer(path: &Path) -> Connection {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE;
        let conn = Connection::open_with_flags_and_vfs(path, flags, registered().unwrap()).unwrap();
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA wal_autocheckpoint=0;
             CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, k INTEGER, v BLOB);",
        )
        .unwrap();
        conn
    }

    /// What another connection (the default VFS, as the checkpointer and readers use) sees.
    fn seen(reader: &Connection) -> (i64, i64, i64) {
        reader
            .query_row(
                "SELECT count(*), coalesce(sum(length(v)), 0), coalesce(sum(k), 0) FROM t",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap()
    }

    /// Commits of ~300 KiB (more than one `WRITE_CHUNK`) reach the file in a few large
    /// writes instead of two per frame, and another connection sees each commit whole.
    #[test]
    fn each_commit_reaches_the_file_in_a_few_writes_that_readers_see() {
        let dir = TempDir::new("wal-batch-commits");
        let path = dir.join("t.db");
        let conn = writer(&path);
        let reader = Connection::open(&path).unwrap();
        let before = counts();
        for round in 1..=5_i64 {
            let tx = conn.unchecked_transaction().unwrap();
            for k in 0..300 {
                tx.execute("INSERT INTO t (k, v) VALUES (?1, randomblob(1000))", [k])
                    .unwrap();
            }
            tx.commit().unwrap();
            assert_eq!(
                seen(&reader),
                (300 * round, 300_000 * round, 44_850 * round)
            );
        }
        let after = counts();
        let (asked, made) = (after.asked - before.asked, after.made - before.made);
        // ~80 frames per commit: two writes each asked for; made: 3 chunks per commit.
        assert!(asked >= 5 * 2 * 70, "asked {asked}");
        assert!(made <= 5 * 4, "made {made} for {asked} asked");
        let check: String = reader
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(check, "ok");
    }

    /// A transaction larger than SQLite's page cache spills pages to the WAL before it
    /// commits, reads them back and rewrites frames in place: the gathered writes are made
    /// before each read of their range and in order, so the result is the same as without
    /// the VFS.
    #[test]
    fn spilled_pages_are_read_back_and_rewritten_in_order() {
        let dir = TempDir::new("wal-batch-spill");
        let path = dir.join("t.db");
        let conn = writer(&path);
        conn.execute_batch("PRAGMA cache_size=20").unwrap();
        let reader = Connection::open(&path).unwrap();
        let tx = conn.unchecked_transaction().unwrap();
        for k in 0..2_000 {
            tx.execute("INSERT INTO t (k, v) VALUES (?1, zeroblob(500))", [k])
                .unwrap();
        }
        // Every row again, twice: pages already spilled are read back and written again.
        for _ in 0..2 {
            tx.execute("UPDATE t SET k = k + 1, v = randomblob(500)", [])
                .unwrap();
        }
        tx.commit().unwrap();
        assert_eq!(seen(&reader), (2_000, 1_000_000, 1_999_000 + 4_000));
        drop(conn);
        // Reopened through the default VFS (the WAL checkpointed by the close): the same.
        let again = Connection::open(&path).unwrap();
        assert_eq!(seen(&again), (2_000, 1_000_000, 1_999_000 + 4_000));
        let check: String = again
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(check, "ok");
    }
}
