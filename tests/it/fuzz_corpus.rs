//! Replays every committed fuzz input (`fuzz/corpus/<target>/*` and any crash saved under
//! `fuzz/artifacts/<target>/*`) through the same entry points the fuzzer calls, so
//! `cargo test` exercises them without cargo-fuzz.

use mllp_test_support::fuzz_corpus::replay;

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
