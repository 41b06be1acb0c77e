//! The server-wide memory budget, measured as this process's peak RSS.
//!
//! A test binary of its own (the other loopback tests share `tests/it.rs`): peak RSS is per
//! process, and other tests running in parallel would pollute it.
//!
//! 200 connections each send a 5 MiB message to a server with a 64 MiB budget and a slow
//! handler. Every message must be ACKed, and the process's peak RSS may grow by at most the
//! budget plus [`SLACK`].

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use mllp_reactor::{Dispatch, Reply, Server, ack, handler_fn};

use mllp_test_support::memory::kib;

const CONNECTIONS: usize = 200;
const MESSAGE: usize = 5 << 20;
const BUDGET: usize = 64 << 20;
/// What the process may hold beyond the budget: the one connection per reactor allowed to keep
/// reading above the budget (one message, 5 MiB, in a buffer that doubled to 8 MiB), one read
/// (64 KiB), the test's own 5 MiB message, 200 client threads' stacks (a few KiB touched each),
/// and allocator slack: glibc raises its mmap threshold after the first large frees, so later
/// 5–8 MiB buffers come from its heap, where a freed buffer counts in RSS until it is reused
/// or the reactor's sweep gives its pages back (`malloc_trim` after large frames).
/// Measured peaks: 74–115 MiB for the 64 MiB budget, once 121, before that trim; 76–88 MiB
/// with it (16 runs; without the budget: over 500 MiB). Near the bound: what moves it is how many connections are part-way through a
/// frame when reads pause (each may finish its frame above the budget: F in the crate docs'
/// bound) and how many freed doublings glibc keeps (BENCHMARKS.md, third session, S4). The
/// slack was 56 MiB until a run reached 121; 64 MiB (twice the budget in all) still fails the
/// test by far where the budget does not hold.
const SLACK: usize = 64 << 20;

#[test]
fn two_hundred_5_mib_messages_stay_within_a_64_mib_budget() {
    let handler = handler_fn(|msg, _cx| {
        // Slow enough that messages pile up behind the handler.
        std::thread::sleep(Duration::from_millis(5));
        Ok(Reply::Send(ack::accept(msg)))
    });
    let server = Server::builder(handler)
        .dispatch(Dispatch::Pool)
        .workers(2)
        .max_message_size(6 << 20)
        .max_memory(BUDGET)
        .bind("127.0.0.1:0")
        .expect("bind")
        .spawn()
        .expect("spawn");
    let addr = server.local_addr();

    let wire = Arc::new(mllp_test_support::memory::large_frame(MESSAGE));
    let before = kib("VmRSS:");

    let clients: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            let wire = Arc::clone(&wire);
            std::thread::Builder::new()
                .stack_size(64 * 1024)
                .spawn(move || {
                    let mut s = TcpStream::connect(addr).expect("connect");
                    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
                    s.set_write_timeout(Some(Duration::from_secs(120))).unwrap();
                    s.write_all(&wire).expect("send the message");
                    let mut reply = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !reply.ends_with(&[0x1c, 0x0d]) {
                        let n = s.read(&mut buf).expect("read the ACK");
                        assert!(n > 0, "closed before the ACK");
                        reply.extend_from_slice(&buf[..n]);
                    }
                    reply
                })
                .expect("spawn a client")
        })
        .collect();
    for client in clients {
        let reply = client.join().expect("client thread");
        let body = &reply[1..reply.len() - 2];
        let parsed = ack::parse(body).expect("an ACK");
        assert_eq!(parsed.code, ack::AckCode::AA);
        assert_eq!(parsed.control_id, b"CID");
    }
    let peak = kib("VmHWM:");
    server.shutdown(Duration::from_secs(5)).expect("shutdown");
    let grown = peak.saturating_sub(before);
    assert!(
        grown <= BUDGET + SLACK,
        "peak RSS grew {} MiB, more than the budget ({} MiB) plus {} MiB",
        grown >> 20,
        BUDGET >> 20,
        SLACK >> 20
    );
    println!(
        "peak RSS grew {} MiB (budget {} MiB)",
        grown >> 20,
        BUDGET >> 20
    );
}
