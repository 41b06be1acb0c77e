//! Replays the committed fuzz inputs of a target through the entry point its
//! `fuzz/fuzz_targets/TARGET.rs` calls, so `cargo test` exercises them without cargo-fuzz.

use std::path::Path;

/// Runs `run` on every file of `fuzz/corpus/TARGET/` and `fuzz/artifacts/TARGET/` (a crash
/// saved there); returns how many there were.
///
/// # Panics
///
/// If a directory or file cannot be read, or where `run` panics.
pub fn replay(target: &str, run: fn(&[u8])) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
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
                run(&std::fs::read(&path).expect("readable corpus file"));
                count += 1;
            }
        }
    }
    count
}
