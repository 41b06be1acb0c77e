//! The memory budget with pipelining senders (issue 18, defect 3), measured as this process's
//! peak RSS. A test binary of its own, like `tests/budget.rs`: peak RSS is per process.
//!
//! Six connections each pipeline 64 messages of 1 MiB to an inline handler that defers every
//! reply and never answers during the test, against an 8 MiB budget. Before the fix the
//! connection allowed to read above the budget kept that right after its frame was complete,
//! up to `max_in_flight` (64) messages, then the next one took over: everything was read (over
//! 380 MiB; 192 messages and 213 MiB when measured here, the test stopping it at 30 s). Now, above the budget, each connection finishes the frame it is in and no more; the
//! messages handed to the handler and the peak RSS stay within the documented bound.

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mllp_reactor::{Dispatch, Reply, ReplyHandle, Server, handler_fn};

use mllp_test_support::memory::kib;

const CONNECTIONS: usize = 6;
const PIPELINED: usize = 64;
const MESSAGE: usize = 1 << 20;
const MAX_MESSAGE: usize = 2 << 20;
const BUDGET: usize = 8 << 20;
/// The read size of a reactor (one read past a frame's end).
const READ: usize = 64 << 10;
/// The documented bound on what the server reads (crate docs, "Bounded memory"): the budget,
/// plus per connection the rest of the frame it was in when reading paused (with one read
/// past its end) and `read_ahead` (64 KiB). As messages: what fits in the budget plus one
/// frame per connection.
const MAX_HANDLED: usize = BUDGET / MESSAGE + CONNECTIONS;
/// Peak RSS growth allowed: the bound above (the budget; per connection a frame, whose buffer
/// may have doubled to 2 MiB, and two reads) plus 48 MiB for the test's own 1 MiB message
/// buffer, client threads and allocator slack (freed buffers that stay in the heap). About
/// 68 MiB; before the fix the peak grew by about 400 MiB.
const SLACK: usize = 48 << 20;
const BOUND: usize = BUDGET + CONNECTIONS * (MAX_MESSAGE + 2 * READ) + SLACK;

#[test]
fn issue_3_pipelined_messages_held_by_the_handler_stay_within_the_budget() {
    let handled = Arc::new(AtomicUsize::new(0));
    let held: Arc<Mutex<Vec<ReplyHandle>>> = Arc::default();
    let handler = {
        let (handled, held) = (Arc::clone(&handled), Arc::clone(&held));
        handler_fn(move |_msg, cx| {
            handled.fetch_add(1, Ordering::SeqCst);
            held.lock().unwrap().push(cx.defer());
            Ok(Reply::Deferred)
        })
    };
    let server = Server::builder(handler)
        .dispatch(Dispatch::Inline)
        .max_message_size(MAX_MESSAGE)
        .max_memory(BUDGET)
        .bind("127.0.0.1:0")
        .expect("bind")
        .spawn()
        .expect("spawn");
    let addr = server.local_addr();

    let wire = Arc::new(mllp_test_support::memory::large_frame(MESSAGE));
    let before = kib("VmHWM:");

    // The senders block once the server stops reading (TCP pushes back); the server's
    // shutdown at the end fails their writes, which ends them.
    for _ in 0..CONNECTIONS {
        let wire = Arc::clone(&wire);
        std::thread::Builder::new()
            .stack_size(64 * 1024)
            .spawn(move || {
                let mut s = TcpStream::connect(addr).expect("connect");
                s.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
                for _ in 0..PIPELINED {
                    if s.write_all(&wire).is_err() {
                        return;
                    }
                }
            })
            .expect("spawn a sender");
    }

    // Wait until the server has read what it will: the handler count holds still for a
    // second (bounded: 30 s in all). Without the fix it goes on to all 384 messages.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = (0, Instant::now());
    loop {
        let now = handled.load(Ordering::SeqCst);
        if now != last.0 {
            last = (now, Instant::now());
        } else if now > 0 && last.1.elapsed() >= Duration::from_secs(1) {
            break;
        }
        if now > MAX_HANDLED || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let peak = kib("VmHWM:");
    let handled = handled.load(Ordering::SeqCst);
    server
        .shutdown(Duration::from_millis(100))
        .expect("shutdown");
    drop(held);
    let grown = peak.saturating_sub(before);
    println!(
        "handled {handled} messages of 1 MiB; peak RSS grew {} MiB (bound {} MiB)",
        grown >> 20,
        BOUND >> 20
    );
    assert!(
        (1..=MAX_HANDLED).contains(&handled),
        "{handled} messages of 1 MiB handed to the handler with an 8 MiB budget \
         (at most {MAX_HANDLED})"
    );
    assert!(
        grown <= BOUND,
        "peak RSS grew {} MiB, more than the bound of {} MiB",
        grown >> 20,
        BOUND >> 20
    );
}
