//! Fuzz entry points. Each `fuzz/fuzz_targets/*.rs` is one line calling a function here, so
//! `cargo test` can replay the corpus through exactly the code the fuzzer runs.

/// Fuzz target `decode`: see [`crate::codec`].
pub fn decode(data: &[u8]) {
    let _ = data;
}

/// Fuzz target `ack`: see [`crate::ack`].
pub fn ack(data: &[u8]) {
    let _ = data;
}
