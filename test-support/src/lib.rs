//! Test helpers shared by the workspace's crates (dev-only, never published): a private
//! PostgreSQL cluster ([`pg`]), a real HAProxy on the committed template ([`haproxy`]), test
//! certificates and TLS clients (`tls`, feature `tls`), a scripted downstream MLLP system
//! (`downstream`, feature `downstream`), `serve` child processes ([`process`]), temporary
//! directories ([`TempDir`]; on a small tmpfs: [`tmpfs`]), process memory and large frames
//! ([`memory`]), a sample message ([`hl7`]), the fuzz corpus replay ([`fuzz_corpus`]), and
//! the rule for a missing tool ([`unavailable`]). One crate instead of `#[path]` includes
//! across crates and test binaries.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

#[cfg(feature = "downstream")]
pub mod downstream;
pub mod fuzz_corpus;
pub mod haproxy;
pub mod hl7;
pub mod memory;
pub mod pg;
pub mod process;
#[cfg(feature = "tls")]
pub mod tls;
pub mod tmpfs;

/// A fresh directory under the system temp dir (named after the process, a per-process
/// counter and `tag`), removed with its contents on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates the directory (emptied first if a previous run left it behind).
    ///
    /// # Panics
    ///
    /// If it cannot be created.
    pub fn new(tag: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("mllp-test-{}-{n}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// `name` inside the directory.
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Reports that a test's external tool (PostgreSQL, HAProxy, ...) cannot be had. Locally the
/// test prints a skip line and returns; under `CI=true` it fails: CI installs every tool, so a
/// missing one is a broken CI machine, never a reason to pass without running.
///
/// # Panics
///
/// Under `CI=true` (or `CI=1`).
#[track_caller]
pub fn unavailable(tool: &str, why: &str) {
    assert!(
        !in_ci(),
        "{tool} is required under CI=true and is not available: {why}"
    );
    eprintln!("skipped: {tool} is not available: {why}");
}

/// Whether the tests run under CI (`CI=true` or `CI=1`, as CI services set it).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}
