//! Replays the store's committed fuzz inputs (`fuzz/corpus/store_*/`) through the entry
//! points the fuzzer calls, as the core's `tests/it/fuzz_corpus.rs` does for its targets.

use mllp_test_support::fuzz_corpus::replay;

#[test]
fn store_header_corpus() {
    assert!(
        replay("store_header", mllp_store::__fuzz::header) > 0,
        "the store_header corpus is empty"
    );
}
