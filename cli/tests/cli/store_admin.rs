//! The store's admin commands against a store that `serve` filled: `prune`.

use crate::util::{Serve, message, run, scratch, text};

/// Runs `serve --store PATH`, sends `ids` through `send`, and stops it.
pub(crate) fn fill(store: &str, ids: &[&str]) {
    let serve = Serve::start(
        &[
            "--store",
            store,
            "--listen",
            "127.0.0.1:0",
            "--retain",
            "1h",
        ],
        &[],
    );
    let input: String = ids.iter().map(|id| message(id)).collect();
    let out = run(&["send", &serve.addr.to_string(), "-"], input.as_bytes());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let (stopped, _) = serve.stop();
    assert!(stopped.status.success(), "{}", text(&stopped.stderr));
}

#[test]
fn prune_dry_run_counts_and_prune_removes() {
    let dir = scratch("prune");
    let store = dir.join("s.db");
    let _ = std::fs::remove_file(&store);
    let store = store.to_str().unwrap();
    fill(store, &["a1", "a2", "a3"]);

    let kept = run(&["prune", store, "--older-than", "1d"], b"");
    assert!(kept.status.success(), "{}", text(&kept.stderr));
    assert!(
        text(&kept.stdout).starts_with("removed 0 messages"),
        "{}",
        text(&kept.stdout)
    );

    let dry = run(&["prune", store, "--older-than", "0s", "--dry-run"], b"");
    assert!(
        text(&dry.stdout).starts_with("would remove 3 messages"),
        "{}",
        text(&dry.stdout)
    );
    let all = run(&["export", store], b"");
    assert_eq!(text(&all.stdout).lines().count(), 3);

    let done = run(&["prune", store, "--older-than", "0s"], b"");
    assert!(
        text(&done.stdout).starts_with("removed 3 messages"),
        "{}",
        text(&done.stdout)
    );
    let none = run(&["export", store], b"");
    assert_eq!(text(&none.stdout), "");

    let bad = run(&["prune", store, "--older-than", "soon"], b"");
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad.stderr));
    let _ = std::fs::remove_dir_all(&dir);
}
