//! What an idle connection costs on the heap (#21 item 6: at most 256 B per idle connection,
//! measured as RSS by `benches/e2e.sh idle1000`).
//!
//! A test binary of its own: it counts this process's heap through a global allocator, and
//! tests running beside it would be counted too.
//!
//! An ACK-only server (inline handler) takes 1 000 connections that each send two messages,
//! one after the other's ACK, then stay open (the reactor's sweep gives back the buffers of
//! those that kept them between the two). An idle connection holds its slab entry (168 B, asserted in
//! `src/reactor.rs`; the slab's room for the first 4 096 connections is allocated when the
//! reactor starts, so it is not counted here) and, on the heap, its timer-wheel entry (16 B
//! plus its share of its wheel slot's spare capacity): no read buffer, no decoder, no slot
//! queue, no box. The heap the 1 000 connections add, counted as glibc's chunks (request plus its
//! 8-byte header, rounded to 16, at least 32 bytes), divided by their number, must stay
//! within [`MAX_HEAP_PER_IDLE`]: a buffer or a box kept per idle connection fails it.

// A global allocator needs `unsafe`: it forwards to `System` (see its SAFETY comment).
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use mllp_reactor::{Reply, Server, ack, handler_fn};

/// Idle connections opened.
const IDLE: usize = 1_000;
/// Heap per idle connection allowed beside its slab entry, in bytes (allocator chunks, see the
/// module docs). Measured: 32–41 B, the 16-byte timer entry in slot `Vec`s that grew by
/// doubling (how many connections share a slot, one per 10 ms tick, depends on timing). A
/// 32-byte buffer or box kept per idle connection takes it to 64 B or more.
const MAX_HEAP_PER_IDLE: usize = 56;

/// Bytes held in allocator chunks, and allocations made.
static HELD: AtomicIsize = AtomicIsize::new(0);
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

/// glibc's chunk for a request of `size` bytes on 64-bit Linux: the request plus an 8-byte
/// header, rounded up to 16, at least 32.
fn chunk(size: usize) -> isize {
    ((size + 8).div_ceil(16) * 16).max(32) as isize
}

/// The system allocator, counting what it holds.
struct Counting;

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so the
// caller's obligations are `System`'s; the counters are plain atomics and allocate nothing.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged (see the impl).
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            HELD.fetch_add(chunk(layout.size()), Ordering::Relaxed);
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged (see the impl).
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            HELD.fetch_add(chunk(layout.size()), Ordering::Relaxed);
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged (see the impl).
        unsafe { System.dealloc(ptr, layout) };
        HELD.fetch_sub(chunk(layout.size()), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded unchanged (see the impl).
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            HELD.fetch_add(chunk(new_size) - chunk(layout.size()), Ordering::Relaxed);
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// One framed message with control id `n`.
fn frame(n: usize) -> Vec<u8> {
    format!("\x0bMSH|^~\\&|A|B|C|D|20260101120000||ADT^A01|ID{n}|P|2.5.1\rPID|1||{n}\r\x1c\r")
        .into_bytes()
}

/// Sends `wire` on a new connection and reads its ACK (one frame) into `buf`, twice: a
/// connection that sends again soon after an answer keeps its buffers until the reactor's
/// sweep finds it idle, so these are given back by the sweep, not at once.
fn served(addr: std::net::SocketAddr, wire: &[u8], buf: &mut [u8]) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    for _ in 0..2 {
        s.write_all(wire).expect("send");
        let mut got = 0;
        while !buf[..got].ends_with(b"\x1c\r") {
            let n = s.read(&mut buf[got..]).expect("read the ACK");
            assert!(n > 0, "closed before the ACK");
            got += n;
        }
        assert!(
            buf[..got].windows(4).any(|w| w == b"|AA|"),
            "not an AA: {:?}",
            String::from_utf8_lossy(&buf[..got])
        );
    }
    s
}

/// The heap held once it stops changing (a connection keeps its buffers until the reactor's
/// next sweep, every 10 ms, and the pools give back what they kept beyond one of each within
/// two more): three equal readings 20 ms apart, within 5 s.
fn settled() -> isize {
    let until = Instant::now() + Duration::from_secs(5);
    let mut last = HELD.load(Ordering::Relaxed);
    let mut equal = 0;
    loop {
        std::thread::sleep(Duration::from_millis(20));
        let now = HELD.load(Ordering::Relaxed);
        equal = if now == last { equal + 1 } else { 0 };
        if equal == 2 || Instant::now() > until {
            return now;
        }
        last = now;
    }
}

/// The heap held once it is at most `bound`, or after 5 s: the reactor's sweeps give the
/// buffers of connections just served back some milliseconds after their ACKs.
fn held_within(bound: isize) -> isize {
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let now = HELD.load(Ordering::Relaxed);
        if now <= bound || Instant::now() > until {
            return now;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn an_idle_connection_holds_no_heap_but_its_timer_entry() {
    let handler = handler_fn(|msg, _cx| Ok(Reply::Send(ack::accept(msg))));
    let server = Server::builder(handler)
        .bind("127.0.0.1:0")
        .expect("bind")
        .spawn()
        .expect("spawn");
    let addr = server.local_addr();
    // Everything the client side needs, allocated before counting.
    let wires: Vec<Vec<u8>> = (0..=IDLE).map(frame).collect();
    let mut streams = Vec::with_capacity(IDLE);
    let mut buf = vec![0u8; 4096];
    // One connection first: what the first connection and message pay once (the thread's
    // pooled read buffer and slot queue, lazily built state) is not a per-connection cost.
    streams.push(served(addr, &wires[IDLE], &mut buf));

    let before = settled();
    let allocations = ALLOCATIONS.load(Ordering::Relaxed);
    for wire in &wires[..IDLE] {
        streams.push(served(addr, wire, &mut buf));
    }
    let after = held_within(before + (MAX_HEAP_PER_IDLE * IDLE) as isize);
    let allocations = ALLOCATIONS.load(Ordering::Relaxed) - allocations;
    let per_conn = (after - before) / IDLE as isize;
    eprintln!(
        "heap per idle connection: {per_conn} B ({} B for {IDLE}); allocations per connection: {:.2}",
        after - before,
        allocations as f64 / IDLE as f64
    );
    assert!(
        per_conn <= MAX_HEAP_PER_IDLE as isize,
        "an idle connection holds {per_conn} B of heap (at most {MAX_HEAP_PER_IDLE})"
    );
    drop(streams);
    server.shutdown(Duration::from_secs(5)).expect("shutdown");
}
