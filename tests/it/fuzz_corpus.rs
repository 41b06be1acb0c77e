//! Replays every committed fuzz input (`fuzz/corpus/<target>/*` and any crash saved under
//! `fuzz/artifacts/<target>/*`) through the same entry points the fuzzer calls, so
//! `cargo test` exercises them without cargo-fuzz.

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut count = 0;
    for dir in [
        root.join("corpus").join(target),
        root.join("artifacts").join(target),
    ] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("readable corpus directory").path();
            if path.is_file() {
                let data = std::fs::read(&path).expect("readable corpus file");
                run(&data);
                count += 1;
            }
        }
    }
    count
}

#[test]
fn decode_corpus() {
    assert!(
        replay("decode", mllp_reactor::__fuzz::decode) > 0,
        "the decode corpus is empty"
    );
}

#[test]
fn ack_corpus() {
    assert!(
        replay("ack", mllp_reactor::__fuzz::ack) > 0,
        "the ack corpus is empty"
    );
}

#[test]
fn ack_memo_corpus() {
    assert!(
        replay("ack_memo", mllp_reactor::__fuzz::ack_memo) > 0,
        "the ack_memo corpus is empty"
    );
}

#[test]
fn connection_corpus() {
    assert!(
        replay("connection", mllp_reactor::__fuzz::connection) > 0,
        "the connection corpus is empty"
    );
}

#[test]
fn proxy_corpus() {
    assert!(
        replay("proxy", mllp_reactor::proxy::__fuzz_decode) > 0,
        "the proxy corpus is empty"
    );
}
