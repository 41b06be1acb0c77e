//! The memory budget through the server: who may read above it (peak RSS is measured in the
//! test binaries of their own, `tests/budget*.rs`).

use std::io::Write;
use std::time::Duration;

use mllp_reactor::Server;
use mllp_reactor::ack::AckCode;
use mllp_reactor::telemetry::names::READ_PAUSES;

use crate::support::{accepting, assert_ack, message, start};

/// Issue 18 defect 9: peers that each sent most of a frame and stopped filled the budget; the
/// connection allowed to read above it was the largest of those stalled frames, so an honest
/// 80-byte message waited for the stalled frames' deadline. The one allowed to read must have
/// bytes waiting: the honest message is answered at once (the frame deadline is a minute, the
/// reply wait 10 s).
#[test]
fn issue_9_a_stalled_frame_does_not_hold_up_the_budget() {
    const MAX_MESSAGE: usize = 2 << 20;
    const STALLED: usize = 6;
    let server = start(
        Server::builder(accepting())
            .max_message_size(MAX_MESSAGE)
            .max_memory(4 * MAX_MESSAGE)
            .frame_timeout(Duration::from_secs(60)),
    );
    // 6 × 1.9 MiB of unfinished frames against an 8 MiB budget.
    let mut partial = vec![0x0b];
    partial.extend_from_slice(b"MSH|^~\\&|A|B|C|D|20260101||ADT^A01|STALL|P|2.5.1\rNTE|");
    partial.resize(MAX_MESSAGE - (100 << 10), b'x');
    let stalled: Vec<_> = (0..STALLED)
        .map(|_| {
            let peer = server.connect();
            // The server may stop reading before taking all of it: send from a thread.
            let mut stream = peer.stream.try_clone().expect("clone the stream");
            let bytes = partial.clone();
            std::thread::spawn(move || {
                let _ = stream.write_all(&bytes);
            });
            peer.stream
                .set_read_timeout(Some(Duration::from_secs(1)))
                .unwrap();
            peer
        })
        .collect();
    assert!(
        server.wait_counter(READ_PAUSES, &[], 1) >= 1,
        "the stalled frames filled the budget"
    );
    let mut honest = server.connect();
    assert_ack(&honest.roundtrip(&message("HONEST")), AckCode::AA, "HONEST");
    drop(stalled);
    server.stop();
}

/// Issue 18 defect 8: a budget above `isize::MAX` (here `usize::MAX`) read as negative, so the
/// server accepted connections and never read. It saturates now.
#[test]
fn issue_8_a_budget_above_isize_max_saturates() {
    let mut server = start(Server::builder(accepting()).max_memory(usize::MAX));
    let mut peer = server.connect();
    assert_ack(&peer.roundtrip(&message("HUGE")), AckCode::AA, "HUGE");
    drop(peer);
    server.events.wait("the connection", |e| {
        matches!(e, crate::support::Event::ConnectionStart(_))
    });
    server.stop();
}
