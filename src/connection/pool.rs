//! Per-thread pools of the memory a connection holds only while busy: read buffers and slot
//! queues (see the connection's module docs).
//!
//! The box that holds a connection's read buffer and frame decoder is pooled too (see
//! `busy`). An idle connection owns none of them, so that a thousand idle connections cost a thousand
//! small structs. Without a pool, a connection answering one message at a time would then
//! allocate both again for every message (four of the five heap allocations per message at
//! S1, callgrind). Connections live on their reactor's thread, so a thread-local pool is a
//! per-reactor pool with no lock. Each pool is bounded in count and in the size of what it
//! keeps, so what it holds does not grow with the number of connections: at most 32 read
//! buffers of 64 KiB, 4 large read buffers of 16 MiB together (for senders of large frames),
//! and 64 slot queues, per reactor thread.

use std::cell::RefCell;

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
    static BUFFER_POOL: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
    static LARGE_POOL: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
    // Boxed on purpose: a connection holds its queue as a `Box` (8 bytes while idle), and
    // handing the box back and forth is what saves the allocation.
    #[allow(clippy::vec_box)]
    static QUEUE_POOL: RefCell<Vec<Box<SlotQueue>>> = const { RefCell::new(Vec::new()) };
    #[allow(clippy::vec_box)]
    static PARTS_POOL: RefCell<Vec<Box<Parts>>> = const { RefCell::new(Vec::new()) };
}

/// A kept box for a connection's read buffer and decoder, if the thread has one (its buffer
/// is empty and without capacity: the caller takes one with [`take_buffer`]).
pub(super) fn take_parts() -> Option<Box<Parts>> {
    PARTS_POOL.try_with(|p| p.borrow_mut().pop()).ok().flatten()
}

/// Keeps a box whose buffer was given back (see [`take_parts`]).
pub(super) fn put_parts(parts: Box<Parts>) {
    debug_assert_eq!(parts.buf.capacity(), 0);
    let _ = PARTS_POOL.try_with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < PARTS {
            p.push(parts);
        }
    });
}

/// An empty read buffer: a pooled one if there is one, else a new one.
pub(super) fn take_buffer() -> BytesMut {
    BUFFER_POOL
        .try_with(|p| p.borrow_mut().pop())
        .ok()
        .flatten()
        .unwrap_or_else(|| BytesMut::with_capacity(BUFFER_START))
}

/// A kept large read buffer with room for at least `capacity` bytes, if the thread has one.
pub(super) fn take_large(capacity: usize) -> Option<BytesMut> {
    LARGE_POOL
        .try_with(|p| {
            let mut p = p.borrow_mut();
            let i = p.iter().position(|b| b.capacity() >= capacity)?;
            Some(p.swap_remove(i))
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
    let _ = BUFFER_POOL.try_with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < BUFFERS {
            p.push(buf);
        }
    });
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
        .try_with(|p| p.borrow_mut().pop())
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
    let _ = QUEUE_POOL.try_with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < QUEUES {
            p.push(queue);
        }
    });
}

/// Empties this thread's pools.
#[cfg(test)]
pub(super) fn drain() {
    BUFFER_POOL.with(|p| p.borrow_mut().clear());
    LARGE_POOL.with(|p| p.borrow_mut().clear());
    QUEUE_POOL.with(|p| p.borrow_mut().clear());
    PARTS_POOL.with(|p| p.borrow_mut().clear());
}

/// How many boxes of a read buffer and decoder this thread's pool holds.
#[cfg(test)]
pub(super) fn pooled_parts() -> usize {
    PARTS_POOL.with(|p| p.borrow().len())
}

/// How many read buffers and slot queues this thread's pools hold.
#[cfg(test)]
pub(super) fn pooled() -> (usize, usize) {
    (
        BUFFER_POOL.with(|p| p.borrow().len()),
        QUEUE_POOL.with(|p| p.borrow().len()),
    )
}
