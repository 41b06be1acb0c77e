//! Builds the ACK of the load generator's S1 message (`mllp-reactor bench --size 1024`) many
//! times, as `serve --no-store` does: for counting the builder's instructions per message
//! under callgrind without a server and a network around it.
//!
//! ```text
//! cargo build --release --example ack_builder
//! valgrind --tool=callgrind --toggle-collect='*Ack*build_coded*' \
//!     target/release/examples/ack_builder 100000 [same|alternate]
//! ```
//!
//! The instructions callgrind reports, over the count given, are the builder's per message.
//! `same` (the default) sends one sender's messages, MSH-10 counting up like the load
//! generator's; `alternate` switches between two senders every message.

use std::hint::black_box;
use std::time::{Duration, UNIX_EPOCH};

use mllp_reactor::ack::{Ack, AckCode};

/// MSH up to MSH-10 and the rest of the message after it, as the load generator sends them.
const HEADS: [&[u8]; 2] = [
    b"MSH|^~\\&|LOADGEN|BENCH|MLLP|REACTOR|20260101120000||ADT^A01^ADT_A01|",
    b"MSH|^~\\&|LAB|GENERAL HOSPITAL|MLLP|REACTOR|20260101120001||ORU^R01^ORU_R01|",
];
const BODY: &[u8] = b"|P|2.5.1\r\
EVN|A01|20260101120000\r\
PID|1||100001^^^BENCH^MR||DOE^JANE^Q||19800101|F|||1 MAIN ST^^SPRINGFIELD^IL^62701\r\
PV1|1|I|WARD^101^A|||||||MED\r";

fn main() {
    let mut args = std::env::args().skip(1);
    let count: u64 = args.next().and_then(|n| n.parse().ok()).unwrap_or(100_000);
    let senders = match args.next().as_deref() {
        Some("alternate") => 2,
        _ => 1,
    };
    let start = UNIX_EPOCH + Duration::from_secs(1_767_268_800);
    let messages: Vec<Vec<u8>> = (0..count)
        .map(|seq| {
            let mut m = HEADS[(seq % senders) as usize].to_vec();
            m.extend_from_slice(format!("0badcafe-0-{seq:010}").as_bytes());
            m.extend_from_slice(BODY);
            m.resize(1024, b'A');
            m
        })
        .collect();
    let mut aa = 0;
    for (seq, message) in messages.iter().enumerate() {
        // About 20 000 messages per second, as at S1.
        let now = start + Duration::from_micros(50 * seq as u64);
        let (code, ack) = Ack::new(AckCode::AA)
            .timestamp(now)
            .build_coded(black_box(message));
        aa += usize::from(code == AckCode::AA);
        black_box(ack);
    }
    assert_eq!(aa, messages.len());
}
