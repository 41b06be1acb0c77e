//! Test helpers shared by the workspace's crates (dev-only, never published): a private
//! PostgreSQL cluster ([`pg`]), a real HAProxy on the committed template ([`haproxy`]), and
//! the rule for a missing tool ([`unavailable`]). One crate instead of `#[path]` includes
//! across crates.

pub mod haproxy;
pub mod pg;
pub mod tmpfs;

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
