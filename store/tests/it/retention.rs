//! Retention: exactly the expired, delivered messages go; undelivered and dead-lettered ones
//! stay; the space is reused or returned; under a steady load the store stops growing.

use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use mllp_store::retention::{PruneMode, Pruner, RetentionPolicy, prune_sqlite, usage_sqlite};
use mllp_store::{Backend as _, Origin, Record, SqliteBackend, SqliteOptions, Store, StoreConfig};
use rusqlite::Connection;

use crate::util::{TempDir, WAIT, channel, done, origin, read_all, recv};

pub(crate) const DAY: Duration = Duration::from_secs(24 * 3600);

/// An 8 KiB message, so that deleting a few frees whole pages.
pub(crate) fn big(control_id: u32) -> Bytes {
    let filler = "X".repeat(8 * 1024);
    Bytes::from(format!(
        "MSH|^~\\&|LAB|HOSP|EHR|HOSP|20260101120000||ADT^A01|{control_id}|P|2.5.1\rNTE|1||{filler}\r"
    ))
}

pub(crate) fn at(received_at: SystemTime) -> Origin {
    Origin {
        received_at,
        ..origin(1, 0)
    }
}

/// Ids 1..=10 received 40 days ago, 11..=15 now.
fn backdated_store(path: &Path) {
    let mut b = SqliteBackend::open(path, &SqliteOptions::default()).unwrap();
    b.commit_batch(&backdated()).unwrap();
}

/// Ids 1..=10 received 40 days ago, 11..=15 now (in a new store).
pub(crate) fn backdated() -> Vec<Record> {
    let old = SystemTime::now() - 40 * DAY;
    (1..=15)
        .map(|i| Record::new(big(i), at(if i <= 10 { old } else { SystemTime::now() })))
        .collect()
}

/// The forwarder's tables as its contract describes them (SQL both backends take): 1..=8
/// delivered to every destination; 3 dead, 4 requeued, 5 dead-lettered once but delivered
/// since. Pruning [`backdated`] then keeps [`KEPT`].
pub(crate) const FORWARD_STATE: &str =
    "CREATE TABLE forward_cursor (destination TEXT, lane INTEGER, delivered_through INTEGER);
     INSERT INTO forward_cursor VALUES ('ehr', 0, 8), ('lab', 0, 12), ('lab', 1, 9);
     CREATE TABLE forward_dead_letter (destination TEXT, message_id INTEGER, status TEXT);
     INSERT INTO forward_dead_letter VALUES ('ehr', 3, 'dead'), ('ehr', 4, 'requeued'),
         ('lab', 5, 'delivered');";

/// What is left of [`backdated`] with [`FORWARD_STATE`] after a prune at the default 30 days.
pub(crate) const KEPT: [i64; 9] = [3, 4, 9, 10, 11, 12, 13, 14, 15];

fn forward_state(path: &Path) {
    Connection::open(path)
        .unwrap()
        .execute_batch(FORWARD_STATE)
        .unwrap();
}

fn ids(path: &Path) -> Vec<i64> {
    read_all(path).iter().map(|r| r.id).collect()
}

fn pragma(path: &Path, name: &str) -> i64 {
    Connection::open(path)
        .unwrap()
        .pragma_query_value(None, name, |r| r.get(0))
        .unwrap()
}

fn prune(path: &Path, mode: PruneMode) -> mllp_store::retention::PruneReport {
    prune_sqlite(
        path,
        &RetentionPolicy::default(),
        SystemTime::now(),
        mode,
        &SqliteOptions::default(),
    )
    .unwrap()
}

#[test]
fn prune_removes_exactly_the_expired_delivered_messages() {
    let dir = TempDir::new("prune-exact");
    let path = dir.join("s.db");
    backdated_store(&path);
    forward_state(&path);
    let pages_before = pragma(&path, "page_count");

    let dry = prune(&path, PruneMode::DryRun);
    assert_eq!((dry.deleted, dry.protected), (6, 2), "{dry:?}");
    assert_eq!(
        ids(&path),
        (1..=15).collect::<Vec<_>>(),
        "a dry run deletes nothing"
    );

    let done = prune(&path, PruneMode::Delete);
    assert_eq!((done.deleted, done.protected), (6, 2), "{done:?}");
    assert_eq!(done.first_kept, Some(9), "9 is not delivered to 'ehr' yet");
    assert_eq!(ids(&path), KEPT);
    // A new store has incremental auto_vacuum: the pages came back to the file system.
    assert_eq!(pragma(&path, "auto_vacuum"), 2);
    assert!(done.released_bytes >= 6 * 8 * 1024, "{done:?}");
    assert!(pragma(&path, "page_count") < pages_before);
    assert_eq!(pragma(&path, "freelist_count"), 0);

    // Nothing more is due: a second prune is a no-op.
    assert_eq!(prune(&path, PruneMode::Delete).deleted, 0);
}

/// An original goes before its (younger) resend, which keeps `duplicate_of` (the schema's
/// reference to it must not make the delete fail).
#[test]
fn an_original_is_pruned_before_its_resend() {
    let dir = TempDir::new("prune-dup");
    let path = dir.join("s.db");
    let mut b = SqliteBackend::open(&path, &SqliteOptions::default()).unwrap();
    let out = b
        .commit_batch(&[
            Record::new(big(1), at(SystemTime::now() - 31 * DAY)),
            Record::new(big(1), at(SystemTime::now() - 25 * DAY)),
        ])
        .unwrap();
    drop(b);
    assert_eq!(out[1].duplicate_of, Some(out[0].id));
    let done = prune(&path, PruneMode::Delete);
    assert_eq!(done.deleted, 1);
    let left = read_all(&path);
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].duplicate_of, Some(out[0].id));
}

#[test]
fn an_existing_store_without_auto_vacuum_reuses_the_freed_pages() {
    let dir = TempDir::new("prune-legacy");
    let path = dir.join("s.db");
    backdated_store(&path);
    // What a store created before retention looks like.
    Connection::open(&path)
        .unwrap()
        .execute_batch("PRAGMA auto_vacuum = NONE; VACUUM;")
        .unwrap();
    assert_eq!(pragma(&path, "auto_vacuum"), 0);
    let pages_before = pragma(&path, "page_count");
    let free_before = pragma(&path, "freelist_count");

    let done = prune(&path, PruneMode::Delete);
    assert_eq!(done.deleted, 10);
    assert_eq!(done.released_bytes, 0);
    assert_eq!(ids(&path), (11..=15).collect::<Vec<_>>());
    // The reusable space grew by at least the deleted payloads' pages...
    let free = pragma(&path, "freelist_count");
    assert!(
        free >= free_before + 10 * 2,
        "freelist {free_before} -> {free}"
    );
    // ...and the next inserts take them instead of growing the file.
    let mut b = SqliteBackend::open(&path, &SqliteOptions::default()).unwrap();
    let batch: Vec<Record> = (100..105)
        .map(|i| Record::new(big(i), at(SystemTime::now())))
        .collect();
    b.commit_batch(&batch).unwrap();
    drop(b);
    assert_eq!(pragma(&path, "page_count"), pages_before);
    assert!(pragma(&path, "freelist_count") < free);
}

#[test]
fn a_size_cap_removes_the_oldest_first() {
    let dir = TempDir::new("prune-size");
    let path = dir.join("s.db");
    let mut b = SqliteBackend::open(&path, &SqliteOptions::default()).unwrap();
    let batch: Vec<Record> = (1..=40)
        .map(|i| Record::new(big(i), at(SystemTime::now())))
        .collect();
    b.commit_batch(&batch).unwrap();
    drop(b);
    let policy = RetentionPolicy::default()
        .max_age(None)
        .max_bytes(Some(200 * 1024))
        .batch_rows(4);
    let done = prune_sqlite(
        &path,
        &policy,
        SystemTime::now(),
        PruneMode::Delete,
        &SqliteOptions::default(),
    )
    .unwrap();
    let left = ids(&path);
    the_oldest_went_first(&left, done.deleted, 40);
    let usage = usage_sqlite(&path, &SqliteOptions::default()).unwrap();
    assert!(
        usage.used_bytes <= 200 * 1024,
        "{usage:?} {done:?} {left:?}"
    );
}

/// Of ids 1..=`total`, `deleted` were pruned by size and `left` remain: the oldest went.
#[track_caller]
pub(crate) fn the_oldest_went_first(left: &[i64], deleted: u64, total: i64) {
    assert_eq!(left.len() as i64 + deleted as i64, total);
    assert_eq!(left.last(), Some(&total), "the newest stay");
    assert_eq!(
        left.first(),
        Some(&(deleted as i64 + 1)),
        "the oldest go first"
    );
}

/// A steady load with a short retention: after the first period the store stops growing.
#[test]
fn under_a_steady_load_with_short_retention_the_store_stops_growing() {
    let dir = TempDir::new("prune-steady");
    let path = dir.join("s.db");
    let options = SqliteOptions::default();
    let backend = SqliteBackend::open(&path, &options).unwrap();
    let gate = backend.write_gate();
    let store = Store::start(backend, StoreConfig::default()).unwrap();
    let (passes_tx, passes) = mpsc::channel();
    // Six retention periods in 2.4 s: the default pace (100/s or 1.5 times the arrival rate,
    // 16-row batches: made for periods of days and passes a minute apart) would spend the
    // whole run catching up with the first period; this test is about the file's size, so
    // batches are large and the pace is off (the p99 benchmark measures the default's).
    let policy = RetentionPolicy::default()
        .max_age(Some(Duration::from_millis(400)))
        .pause(Duration::ZERO)
        .batch_rows(256)
        .rate(u32::MAX);
    let pruner = Pruner::start_sqlite(&path, &options, policy, gate, move |r| {
        let _ = passes_tx.send(
            r.as_ref()
                .map(|(report, _)| report.deleted)
                .map_err(|e| e.to_string()),
        );
    })
    .unwrap();

    // 200 messages/s of 8 KiB for 2.4 s (six retention periods).
    let (sent, sizes) = steady_load(&store, Duration::from_millis(2_400), big, || {
        pragma(&path, "page_count")
    });
    // Every pass that finished succeeded; what was deleted is what is no longer there (a
    // paced pass may still be running when the load stops).
    assert!(passes.try_iter().all(|r| r.is_ok()));
    let remaining = ids(&path).len() as u64;
    store.close(WAIT).unwrap();
    pruner.stop();
    let deleted = u64::from(sent) - remaining;
    assert!(
        deleted > u64::from(sent) / 3,
        "only {deleted} of {sent} pruned"
    );
    // Half-way through, the store holds about one period of messages; the end holds no more
    // than a bounded multiple of that (a loaded machine may delay a pass), while without
    // retention it would have grown threefold.
    let middle = sizes[sizes.len() / 2];
    let last = *sizes.last().unwrap();
    let written_pages = i64::from(sent) * 9 * 1024 / 4096;
    assert!(
        last < written_pages / 2,
        "pages: {sizes:?}, {written_pages} written"
    );
    assert!(last <= middle * 2, "still growing: {sizes:?}");
}

/// Submits 200 messages/s (`message(n)`, n from 1) to `store` for `duration`, in ticks of
/// 10 ms, measuring the store's size with `size` every 40 messages; waits for every commit.
/// Returns how many were sent and the sizes.
pub(crate) fn steady_load(
    store: &Store,
    duration: Duration,
    message: impl Fn(u32) -> Bytes,
    mut size: impl FnMut() -> i64,
) -> (u32, Vec<i64>) {
    let (tx, rx) = channel();
    let start = Instant::now();
    let mut sent = 0u32;
    let mut sizes = Vec::new();
    while start.elapsed() < duration {
        for _ in 0..2 {
            sent += 1;
            store
                .submit(Record::new(message(sent), at(SystemTime::now())), done(&tx))
                .unwrap();
        }
        if sent.is_multiple_of(40) {
            sizes.push(size());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    for _ in 0..sent {
        recv(&rx).unwrap();
    }
    (sent, sizes)
}

#[test]
fn pruning_a_missing_store_is_a_typed_error() {
    let dir = TempDir::new("prune-missing");
    let err = prune_sqlite(
        &dir.join("nope.db"),
        &RetentionPolicy::default(),
        SystemTime::now(),
        PruneMode::DryRun,
        &SqliteOptions::default(),
    )
    .unwrap_err();
    assert!(
        matches!(err, mllp_store::StoreError::NotFound { .. }),
        "{err}"
    );
}

/// A 1 KiB message with control id `n`.
pub(crate) fn small(n: u64) -> Bytes {
    let filler = "Y".repeat(900);
    Bytes::from(format!(
        "MSH|^~\\&|LAB|HOSP|EHR|HOSP|20260101120000||ADT^A01|{n}|P|2.5.1\rNTE|1||{filler}\r"
    ))
}

/// p99 submit-to-commit latency of `rate` messages/s for `window`, against `store` (the
/// PostgreSQL retention test's).
#[cfg(feature = "postgres")]
pub(crate) fn p99_under_load(
    store: &Store,
    rate: u64,
    window: Duration,
    first: u64,
) -> (Duration, usize) {
    let mut latencies = latencies_under_load(store, rate, window, first);
    (p99(&mut latencies), latencies.len())
}

/// The 99th percentile (sorts `latencies`).
fn p99(latencies: &mut [Duration]) -> Duration {
    latencies.sort();
    latencies[latencies.len() * 99 / 100]
}

/// Submit-to-commit latencies of `rate` messages/s for `window` against `store` (control ids
/// from `first` on), once every commit is in.
fn latencies_under_load(store: &Store, rate: u64, window: Duration, first: u64) -> Vec<Duration> {
    let (tx, rx) = mpsc::channel::<Duration>();
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < window {
        let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
        while sent < due {
            let tx = tx.clone();
            let submitted = Instant::now();
            store
                .submit(
                    Record::new(small(first + sent), at(SystemTime::now())),
                    Box::new(move |r| {
                        if let Err(e) = r {
                            eprintln!("commit failed: {e}");
                        }
                        let _ = tx.send(submitted.elapsed());
                    }),
                )
                .unwrap();
            sent += 1;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    drop(tx);
    (0..sent)
        .map(|_| rx.recv_timeout(Duration::from_secs(120)).unwrap())
        .collect()
}

/// The default policy, with `MLLP_P99_BATCH_ROWS`, `MLLP_P99_PAUSE_MS` and `MLLP_P99_RATE`
/// (messages per second) overriding its pacing, to compare settings.
fn policy_from_env() -> RetentionPolicy {
    let var = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u32>().ok());
    let mut policy = RetentionPolicy::default();
    if let Some(rows) = var("MLLP_P99_BATCH_ROWS") {
        policy = policy.batch_rows(rows as usize);
    }
    if let Some(ms) = var("MLLP_P99_PAUSE_MS") {
        policy = policy.pause(Duration::from_millis(ms.into()));
    }
    if let Some(rate) = var("MLLP_P99_RATE") {
        policy = policy.rate(rate);
    }
    policy
}

/// BENCHMARKS.md "p99 commit time with and without pruning": a fixed-rate load (200 1 KiB
/// messages/s) against a store holding 150 000 expired messages, in one-second slices that
/// alternate between a pruner deleting them and none (started and stopped for each slice), so
/// that the shared machine's noise falls on both alike; the p99 of each side over all its
/// slices, per round (a fresh copy of the store each). `MLLP_P99_ROUNDS` (default 3) and
/// `MLLP_P99_SLICES` (default 20). Run:
/// `cargo test --release -p mllp-store --test it p99_commit -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement (about a minute), not a check"]
fn p99_commit_with_and_without_pruning() {
    let dir = TempDir::new("prune-p99");
    let seed = dir.join("seed.db");
    {
        let mut b = SqliteBackend::open(&seed, &SqliteOptions::default()).unwrap();
        let old = SystemTime::now() - 40 * DAY;
        for chunk in 0..150u64 {
            let batch: Vec<Record> = (0..1000)
                .map(|i| Record::new(small(chunk * 1000 + i), at(old)))
                .collect();
            b.commit_batch(&batch).unwrap();
        }
    }
    let rate = 200;
    let slice = Duration::from_secs(1);
    let var = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let rounds = var("MLLP_P99_ROUNDS", 3);
    let slices = var("MLLP_P99_SLICES", 20);
    let mut ratios = Vec::new();
    for round in 0..rounds {
        let path = dir.join(format!("r{round}.db"));
        std::fs::copy(&seed, &path).unwrap();
        // The seed and its copy (~170 MB each) on stable storage before the load starts:
        // otherwise the kernel writes them back during the first seconds, and the writer's
        // WAL syncs wait behind that (a 7-223 ms stall in one slice per round, on whichever
        // side owned it, so the round's ratio measured where the write-back fell).
        std::fs::File::open(&seed).unwrap().sync_all().unwrap();
        std::fs::File::open(&path).unwrap().sync_all().unwrap();
        let options = SqliteOptions::default();
        let backend = SqliteBackend::open(&path, &options).unwrap();
        let gate = backend.write_gate();
        let store = Store::start(backend, StoreConfig::default()).unwrap();
        // [without, with]
        let mut latencies: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
        let mut first = 1_000_000;
        for i in 0..slices {
            // Alternate which side goes first from round to round.
            let pruning = (i + round) % 2 == 1;
            let pruner = pruning.then(|| {
                Pruner::start_sqlite(&path, &options, policy_from_env(), gate.clone(), |_| {})
                    .unwrap()
            });
            let got = latencies_under_load(&store, rate, slice, first);
            first += got.len() as u64;
            drop(pruner);
            latencies[usize::from(pruning)].extend(got);
        }
        store.close(WAIT).unwrap();
        let remaining: i64 = Connection::open(&path)
            .unwrap()
            .query_row("SELECT count(*) FROM messages", [], |r| r.get(0))
            .unwrap();
        let [mut without, mut with] = latencies;
        let (n_without, n_with) = (without.len(), with.len());
        let (p_without, p_with) = (p99(&mut without), p99(&mut with));
        let ratio = p_with.as_secs_f64() / p_without.as_secs_f64();
        println!(
            "round {round}: p99 without pruning {:.3} ms ({n_without} msgs), with {:.3} ms ({n_with} msgs): ratio {ratio:.2}; {} expired messages deleted",
            p_without.as_secs_f64() * 1e3,
            p_with.as_secs_f64() * 1e3,
            150_000 + first as i64 - 1_000_000 - remaining,
        );
        ratios.push(ratio);
        let _ = std::fs::remove_file(&path);
    }
    ratios.sort_by(f64::total_cmp);
    println!(
        "median ratio over {rounds} rounds: {:.2} (all: {ratios:.2?})",
        ratios[ratios.len() / 2]
    );
}
