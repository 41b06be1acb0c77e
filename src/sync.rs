//! Small synchronisation helpers shared by the runtime modules.

use std::sync::{Mutex, MutexGuard};

/// Locks, ignoring poison: every mutex of this crate guards plain data (queues, lists, an
/// `Arc` swapped whole) that a panicking holder cannot leave half-updated.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
