//! Per-thread pools of the memory a connection holds only while busy: read buffers and slot
//! queues (see the connection's module docs).
//!
//! The box that holds a connection's read buffer and frame decoder is pooled too (see
//! `busy`). An idle connection owns none of them, so that a thousand idle connections cost a thousand
//! small structs. A connection in use keeps what it took between messages and gives it back
//! once idle (see `Connection::release_idle`); a connection that wakes takes them from the
//! pool instead of allocating them. Connections live on their reactor's thread, so a
//! thread-local pool is a per-reactor pool with no lock. Each pool is bounded in count and in
//! the size of what it keeps, so what it holds does not grow with the number of connections:
//! at most 32 read buffers of 64 KiB, 4 large read buffers of 16 MiB together (for senders of
//! large frames), and 64 slot queues, per reactor thread; and what nobody took for a sweep
//! period goes back to the allocator ([`trim`]), down to one of each.

use std::cell::{Cell, RefCell};

use bytes::BytesMut;

use super::busy::Parts;
use super::slots::SlotQueue;

/// Read buffers kept per thread.
const BUFFERS: usize = 32;
/// A new read buffer's capacity: several small messages fit before it is reclaimed.
const BUFFER_START: usize = 8 * 1024;
/// The largest read buffer (capacity) kept: larger ones are freed.
pub(super) const BUFFER_CAPACITY: usize = 64 * 1024;
/// Large read buffers (above [`BUFFER_CAPACITY`]) kept per thread, for connections that send
/// large frames one after another: without them each large frame takes fresh memory from the
/// system (at 1 MiB frames, a `brk` and 256 page faults per message) and gives it back.
const LARGE_BUFFERS: usize = 4;
/// The most bytes the kept large buffers hold together, per thread.
pub(super) const LARGE_BYTES: usize = 16 << 20;
/// Slot queues kept per thread.
const QUEUES: usize = 64;
/// The most slots a kept queue has room for: larger ones are freed.
const QUEUE_CAPACITY: usize = 64;
/// Boxes of a read buffer and decoder (without the buffer) kept per thread.
const PARTS: usize = 64;

thread_local! {
    /// A large frame was received since the last [`trim`] (see [`note_large_frame`]).
    static LARGE_FRAME_SEEN: Cell<bool> = const { Cell::new(false) };
    static BUFFER_POOL: RefCell<Kept<BytesMut>> = const { RefCell::new(Kept::new()) };
    static LARGE_POOL: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
    // Boxed on purpose: a connection holds its queue as a `Box` (8 bytes while idle), and
    // handing the box back and forth is what saves the allocation.
    static QUEUE_POOL: RefCell<Kept<Box<SlotQueue>>> = const { RefCell::new(Kept::new()) };
    static PARTS_POOL: RefCell<Kept<Box<Parts>>> = const { RefCell::new(Kept::new()) };
}

/// One pool: what it keeps, and the fewest it kept since the last [`trim`] (what nobody took
/// for a whole sweep period is surplus).
struct Kept<T> {
    items: Vec<T>,
    low: usize,
}

impl<T> Kept<T> {
    const fn new() -> Self {
        Self {
            items: Vec::new(),
            low: 0,
        }
    }

    fn take(&mut self) -> Option<T> {
        let item = self.items.pop();
        self.low = self.low.min(self.items.len());
        item
    }

    /// Keeps `item` if the pool holds fewer than `max`.
    fn put(&mut self, item: T, max: usize) {
        if self.items.len() < max {
            self.items.push(item);
        }
    }

    /// Drops what sat unused since the last trim, down to [`KEPT_IDLE`]; returns whether the
    /// pool still holds more than that.
    fn trim(&mut self) -> bool {
        let surplus = self.low.min(self.items.len().saturating_sub(KEPT_IDLE));
        self.items.truncate(self.items.len() - surplus);
        self.low = self.items.len();
        self.items.len() > KEPT_IDLE
    }
}

/// What each pool keeps once nothing has been taken from it for a sweep period: one of each,
/// for the next connection to wake.
const KEPT_IDLE: usize = 1;

/// Returns to the allocator what the pools kept and nobody took since the last call (the
/// reactor calls it from its periodic sweep, see `Loop::sweep`): after a burst the pools
/// shrink back to [`KEPT_IDLE`] each within two sweeps, so they hold what the load needs,
/// not what its peak left behind. Returns whether another call may free more.
pub(crate) fn trim() -> bool {
    if LARGE_FRAME_SEEN
        .try_with(|f| f.replace(false))
        .unwrap_or(false)
    {
        return_free_pages();
    }
    let small = BUFFER_POOL
        .try_with(|p| p.borrow_mut().trim())
        .unwrap_or(false);
    let queues = QUEUE_POOL
        .try_with(|p| p.borrow_mut().trim())
        .unwrap_or(false);
    let parts = PARTS_POOL
        .try_with(|p| p.borrow_mut().trim())
        .unwrap_or(false);
    small || queues || parts
}

/// A large frame was received on this thread: its buffers (the ones it outgrew, and its own
/// unless the pool keeps it) are freed by the time the next sweep runs, which then gives
/// their pages back to the system (see [`trim`]).
pub(super) fn note_large_frame() {
    let _ = LARGE_FRAME_SEEN.try_with(|f| f.set(true));
}

/// Gives the allocator's free pages back to the system. glibc keeps freed memory of its
/// heaps resident, and after the first large buffer is freed it raises its mmap threshold,
/// so that later large buffers (a frame's buffer doubling to 8 MiB) come from a heap too: the
/// halves left behind by each doubling, and buffers freed after their messages were answered,
/// stayed resident until reused (`tests/budget.rs`: up to 53 MiB of peak RSS above what the
/// budget counted; BENCHMARKS.md, third session, S4). Called at most once per sweep period
/// (10 ms), and only after a large frame.
fn return_free_pages() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` takes no pointer and only returns free memory of glibc's own
    // heaps to the system (under each arena's lock): it is safe to call from any thread at
    // any time; `0` asks for no padding to be kept.
    #[allow(unsafe_code)]
    unsafe {
        libc::malloc_trim(0);
    }
}

/// A kept box for a connection's read buffer and decoder, if the thread has one (its buffer
/// is empty and without capacity: the caller takes one with [`take_buffer`]).
pub(super) fn take_parts() -> Option<Box<Parts>> {
    PARTS_POOL
        .try_with(|p| p.borrow_mut().take())
        .ok()
        .flatten()
}

/// Keeps a box whose buffer was given back (see [`take_parts`]).
pub(super) fn put_parts(parts: Box<Parts>) {
    debug_assert_eq!(parts.buf.capacity(), 0);
    let _ = PARTS_POOL.try_with(|p| p.borrow_mut().put(parts, PARTS));
}

/// An empty read buffer: a pooled one if there is one, else a new one.
pub(super) fn take_buffer() -> BytesMut {
    BUFFER_POOL
        .try_with(|p| p.borrow_mut().take())
        .ok()
        .flatten()
        .unwrap_or_else(|| BytesMut::with_capacity(BUFFER_START))
}

/// A kept large read buffer with room for at least `capacity` bytes, if the thread has one:
/// the one given back last that fits. Its memory is the likeliest to be in the CPU's cache
/// still (it held the frame just answered): the kernel's copy of the next frame into it
/// and the scan for the frame's end that follows then miss the cache less than in a buffer
/// that sat unused while the others were read into (the first that fit, as before: at S4,
/// four connections of 1 MiB frames cycled through four buffers, 4 MiB against a core's
/// 1 MiB of L2; BENCHMARKS.md, sixth pass).
pub(super) fn take_large(capacity: usize) -> Option<BytesMut> {
    LARGE_POOL
        .try_with(|p| {
            let mut p = p.borrow_mut();
            let i = p.iter().rposition(|b| b.capacity() >= capacity)?;
            Some(p.remove(i))
        })
        .ok()
        .flatten()
}

/// Gives back an empty read buffer. It may still share its allocation with payloads split
/// from it (their slots account for it until they are answered); the allocation is reused in
/// place once they are gone. `large`: the size of the connection's last large frame's buffer
/// (0: none yet); such a connection's buffer is kept as a large one if all of its allocation
/// is free again (the payloads split from it are gone), else dropped.
pub(super) fn put_buffer(mut buf: BytesMut, large: usize) {
    debug_assert!(buf.is_empty());
    if large > 0 {
        // After a large frame the buffer is the tail of a large allocation: kept as a small
        // one it would pin the whole allocation.
        if buf.try_reclaim(large) {
            put_large(buf);
        }
        return;
    }
    // Frames split off the front used up its capacity; once they are gone, the space is
    // this buffer's again (no allocation, no copy: it is empty).
    if buf.capacity() < BUFFER_START && !buf.try_reclaim(BUFFER_START) {
        return;
    }
    if buf.capacity() > BUFFER_CAPACITY {
        return;
    }
    let _ = BUFFER_POOL.try_with(|p| p.borrow_mut().put(buf, BUFFERS));
}

/// Keeps an empty large buffer within the pool's bounds.
fn put_large(buf: BytesMut) {
    if buf.capacity() <= BUFFER_CAPACITY {
        return put_buffer(buf, 0);
    }
    let _ = LARGE_POOL.try_with(|p| {
        let mut p = p.borrow_mut();
        let held: usize = p.iter().map(BytesMut::capacity).sum();
        if p.len() < LARGE_BUFFERS && held + buf.capacity() <= LARGE_BYTES {
            p.push(buf);
        }
    });
}

/// An empty slot queue, pooled if there is one.
pub(super) fn take_queue() -> Box<SlotQueue> {
    QUEUE_POOL
        .try_with(|p| p.borrow_mut().take())
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// Gives back a slot queue; its slots (if any) are dropped first.
pub(super) fn put_queue(mut queue: Box<SlotQueue>) {
    if queue.capacity() > QUEUE_CAPACITY {
        return;
    }
    queue.reset();
    let _ = QUEUE_POOL.try_with(|p| p.borrow_mut().put(queue, QUEUES));
}

/// Empties this thread's pools.
#[cfg(test)]
pub(super) fn drain() {
    BUFFER_POOL.with(|p| *p.borrow_mut() = Kept::new());
    LARGE_POOL.with(|p| p.borrow_mut().clear());
    QUEUE_POOL.with(|p| *p.borrow_mut() = Kept::new());
    PARTS_POOL.with(|p| *p.borrow_mut() = Kept::new());
}

/// How many boxes of a read buffer and decoder this thread's pool holds.
#[cfg(test)]
pub(super) fn pooled_parts() -> usize {
    PARTS_POOL.with(|p| p.borrow().items.len())
}

/// How many read buffers and slot queues this thread's pools hold.
#[cfg(test)]
pub(super) fn pooled() -> (usize, usize) {
    (
        BUFFER_POOL.with(|p| p.borrow().items.len()),
        QUEUE_POOL.with(|p| p.borrow().items.len()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_frame_has_the_next_trim_give_free_pages_back_once() {
        let freed = || LARGE_FRAME_SEEN.with(Cell::get);
        trim();
        assert!(!freed());
        note_large_frame();
        assert!(freed());
        // A large buffer freed, as after a large frame's message was answered.
        drop(Vec::<u8>::with_capacity(8 << 20));
        trim();
        assert!(!freed(), "once per large frame, not at every sweep");
    }

    #[test]
    fn a_large_buffer_is_taken_from_those_given_back_last_first() {
        drain();
        let (big, small) = (
            BytesMut::with_capacity(256 * 1024),
            BytesMut::with_capacity(128 * 1024),
        );
        let (big_at, small_at) = (big.as_ptr(), small.as_ptr());
        put_large(big);
        put_large(small);
        let take = |capacity| take_large(capacity).map(|b| b.as_ptr());
        assert_eq!(
            take(200 * 1024),
            Some(big_at),
            "the last given back that fits"
        );
        assert_eq!(take(100 * 1024), Some(small_at), "the last given back");
        assert_eq!(take(1), None);
        // The one given back last comes first, not the one kept longest.
        let (first, second) = (
            BytesMut::with_capacity(256 * 1024),
            BytesMut::with_capacity(256 * 1024),
        );
        let second_at = second.as_ptr();
        put_large(first);
        put_large(second);
        assert_eq!(take(200 * 1024), Some(second_at));
        drain();
    }

    #[test]
    fn a_pool_gives_back_what_nobody_took_for_a_sweep_period_down_to_one() {
        let mut pool = Kept::new();
        for i in 0..5 {
            pool.put(i, 4);
        }
        assert_eq!(pool.items.len(), 4, "bounded");
        assert!(
            pool.trim(),
            "the first trim sees what came since the pool was made"
        );
        assert_eq!(pool.items.len(), 4);
        // Two taken and put back: the two at the bottom sat unused for the period.
        let (a, b) = (pool.take().unwrap(), pool.take().unwrap());
        pool.put(a, 4);
        pool.put(b, 4);
        assert!(pool.trim());
        assert_eq!(pool.items.len(), 2, "what sat unused is dropped");
        assert!(!pool.trim(), "nothing taken: down to one");
        assert_eq!(pool.items.len(), KEPT_IDLE);
        assert!(!pool.trim());
        assert_eq!(
            pool.items.len(),
            KEPT_IDLE,
            "one is kept for the next connection"
        );
        // A burst put back after the trim is kept for one period, then dropped.
        for i in 0..3 {
            pool.put(i, 4);
        }
        assert!(pool.trim());
        assert_eq!(pool.items.len(), 3);
        assert!(!pool.trim());
        assert_eq!(pool.items.len(), KEPT_IDLE);
    }
}
