//! Frame codec benchmarks (criterion); filled in as the codec lands.
fn main() {}
