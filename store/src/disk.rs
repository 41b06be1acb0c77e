//! Free disk space: a [`DiskMonitor`] watches the file system that holds a store and tells the
//! [`Store`](crate::Store) to refuse new messages while free space is below a minimum, so that
//! a filling disk turns into clear AE replies ("free disk space … below the minimum") before
//! it turns into failed commits, and nothing already stored is put at risk.
//!
//! - The monitor is a thread that reads `statvfs` every [`DISK_CHECK_INTERVAL`]; the writer
//!   reads the result (one atomic load per batch), never the file system.
//! - While space is low, every batch fails with [`StoreError::LowDisk`] without touching the
//!   database: no record of it is stored, every sender gets an AE, nothing stored is changed.
//! - Service resumes by itself at the first check that finds enough space again (retention,
//!   an operator deleting files, a bigger volume).
//! - A disk that fills completely between two checks, or inside a commit, takes the ordinary
//!   commit-failure path: the batch fails, its senders get AE, the next batch tries again.

use std::ffi::CString;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::error::StoreError;

/// How often a [`DiskMonitor`] reads the free space: 500 ms.
///
/// A `statvfs` call costs a few microseconds. In 500 ms a server taking 10 000 msg/s of 1 KiB
/// writes about 5 MB, a small fraction of any sensible minimum (the default is 1 GiB), so
/// the check never lets the disk fill between two reads.
pub const DISK_CHECK_INTERVAL: Duration = Duration::from_millis(500);

/// The default minimum free space: 1 GiB or 5 % of the file system, whichever is smaller.
///
/// 1 GiB leaves room for the WAL to checkpoint (it can grow to a few hundred MB under load),
/// for the pruner's transactions, and for the logs and everything else on the volume; 5 %
/// keeps a small volume (a 4 GiB test disk) usable at all.
pub const DEFAULT_MIN_FREE: MinFree = MinFree::Default;

/// The least free space below which new messages are refused.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MinFree {
    /// At least this many bytes available to the server's user.
    Bytes(u64),
    /// At least this percentage (0–100) of the file system's size.
    Percent(f64),
    /// The smaller of 1 GiB and 5 % ([`DEFAULT_MIN_FREE`]).
    Default,
}

impl MinFree {
    /// The minimum in bytes on a file system of `total` bytes.
    pub fn bytes(self, total: u64) -> u64 {
        let percent = |p: f64| (total as f64 * p.clamp(0.0, 100.0) / 100.0) as u64;
        match self {
            Self::Bytes(b) => b,
            Self::Percent(p) => percent(p),
            Self::Default => (1u64 << 30).min(percent(5.0)),
        }
    }
}

/// Free and total bytes of the file system holding `path` (available to unprivileged users).
///
/// # Errors
///
/// What `statvfs` reports (no such directory, …).
// The casts are no-ops on 64-bit Linux, not on 32-bit targets (`c_ulong`, `fsblkcnt_t`).
#[allow(clippy::unnecessary_cast)]
pub fn free_space(path: &Path) -> io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in the path"))?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c_path` is a valid NUL-terminated string that outlives the call, and `stat`
    // points to writable memory of the right type, which statvfs fills on success.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it initialised `stat` (and it was zeroed before anyway).
    #[allow(unsafe_code)]
    let stat = unsafe { stat.assume_init() };
    let block = stat.f_frsize as u64;
    Ok((
        (stat.f_bavail as u64).saturating_mul(block),
        (stat.f_blocks as u64).saturating_mul(block),
    ))
}

/// One reading of a [`DiskMonitor`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskState {
    /// Bytes available.
    pub available: u64,
    /// The minimum, in bytes, on this file system.
    pub minimum: u64,
    /// `available < minimum`.
    pub low: bool,
}

impl DiskState {
    /// The error a refused batch gets while space is low.
    pub fn error(&self) -> StoreError {
        StoreError::LowDisk {
            available: self.available,
            minimum: self.minimum,
        }
    }
}

/// Watches the free space under a directory; see the [module docs](self).
#[derive(Clone, Debug)]
pub struct DiskMonitor {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    low: AtomicBool,
    available: AtomicU64,
    minimum: AtomicU64,
    stop: Mutex<bool>,
    wake: Condvar,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl DiskMonitor {
    /// Reads the free space under `dir` now, then every [`DISK_CHECK_INTERVAL`] on a thread
    /// (`mllp-store-disk`); calls `on_change` with the new state whenever it turns low or
    /// back to normal (not for the first reading unless it is low), so a caller logs once
    /// per change.
    ///
    /// ```
    /// use mllp_store::disk::{DiskMonitor, MinFree};
    /// let monitor = DiskMonitor::start(&std::env::temp_dir(), MinFree::Bytes(0), |_| {})?;
    /// assert!(!monitor.state().low);
    /// monitor.stop();
    /// # Ok::<(), std::io::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// The first reading's error (for example a missing directory).
    pub fn start(
        dir: &Path,
        min: MinFree,
        mut on_change: impl FnMut(DiskState) + Send + 'static,
    ) -> io::Result<Self> {
        let inner = Arc::new(Inner {
            dir: dir.to_owned(),
            low: AtomicBool::new(false),
            available: AtomicU64::new(0),
            minimum: AtomicU64::new(0),
            stop: Mutex::new(false),
            wake: Condvar::new(),
            thread: Mutex::new(None),
        });
        let first = inner.read(min)?;
        if first.low {
            on_change(first);
        }
        let reader = Arc::clone(&inner);
        let thread = std::thread::Builder::new()
            .name("mllp-store-disk".into())
            .spawn(move || {
                let mut was_low = first.low;
                loop {
                    let stop = reader.stop.lock().unwrap_or_else(PoisonError::into_inner);
                    let (stop, _) = reader
                        .wake
                        .wait_timeout_while(stop, DISK_CHECK_INTERVAL, |s| !*s)
                        .unwrap_or_else(PoisonError::into_inner);
                    if *stop {
                        return;
                    }
                    drop(stop);
                    // A failed reading keeps the last state: statvfs on a directory that
                    // exists does not fail in practice, and a commit would show the trouble.
                    if let Ok(state) = reader.read(min)
                        && state.low != was_low
                    {
                        was_low = state.low;
                        on_change(state);
                    }
                }
            })?;
        *inner.thread.lock().unwrap_or_else(PoisonError::into_inner) = Some(thread);
        Ok(Self { inner })
    }

    /// The latest reading.
    pub fn state(&self) -> DiskState {
        DiskState {
            available: self.inner.available.load(Ordering::Relaxed),
            minimum: self.inner.minimum.load(Ordering::Relaxed),
            low: self.inner.low.load(Ordering::Relaxed),
        }
    }

    /// Whether free space was below the minimum at the latest reading (one atomic load).
    pub fn is_low(&self) -> bool {
        self.inner.low.load(Ordering::Relaxed)
    }

    /// Stops the thread (every clone then keeps the last reading).
    pub fn stop(&self) {
        *self
            .inner
            .stop
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = true;
        self.inner.wake.notify_all();
        let thread = self
            .inner
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

impl Inner {
    fn read(&self, min: MinFree) -> io::Result<DiskState> {
        let (available, total) = free_space(&self.dir)?;
        let minimum = min.bytes(total);
        let state = DiskState {
            available,
            minimum,
            low: available < minimum,
        };
        self.available.store(available, Ordering::Relaxed);
        self.minimum.store(minimum, Ordering::Relaxed);
        self.low.store(state.low, Ordering::Relaxed);
        Ok(state)
    }
}
