//! Retention on PostgreSQL: the SQLite tests' records, forwarding state and expectations
//! (`crate::retention`) through `prune_postgres`; the table's freed space reused; a size cap;
//! a pruner under a steady load keeps the table from growing.

use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use mllp_store::retention::{
    PruneMode, PruneReport, Pruner, RetentionPolicy, prune_postgres, usage_postgres,
};
use mllp_store::{Backend, Record, Store, StoreConfig, StoreError};

use super::{cluster::PgCluster, connect, options};
use crate::retention::{
    DAY, FORWARD_STATE, KEPT, at, backdated, big, steady_load, the_oldest_went_first,
};
use crate::util::WAIT;

fn prune(url: &str, policy: &RetentionPolicy, mode: PruneMode) -> PruneReport {
    prune_postgres(url, policy, SystemTime::now(), mode, &options()).unwrap()
}

fn ids(pg: &PgCluster, db: &str) -> Vec<i64> {
    pg.sql(db, "SELECT id FROM mllp_messages ORDER BY id")
        .lines()
        .map(|l| l.parse().unwrap())
        .collect()
}

fn heap_bytes(pg: &PgCluster, db: &str) -> i64 {
    pg.sql(db, "SELECT pg_relation_size('mllp_messages')")
        .parse()
        .unwrap()
}

/// A message of about `len` bytes that PostgreSQL cannot compress (pseudo-random text), so
/// that sizes on disk follow the payloads.
fn noisy(n: u32, len: usize) -> Bytes {
    let mut x = u64::from(n).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let filler: String = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
                    [(x % 62) as usize],
            )
        })
        .collect();
    Bytes::from(format!(
        "MSH|^~\\&|LAB|HOSP|EHR|HOSP|20260101120000||ADT^A01|{n}|P|2.5.1\rNTE|1||{filler}\r"
    ))
}

#[test]
fn prune_removes_exactly_the_expired_delivered_messages() {
    let Some(pg) = PgCluster::start() else { return };
    let url = pg.create_db("exact");
    connect(&url).commit_batch(&backdated()).unwrap();
    pg.sql("exact", FORWARD_STATE);
    let policy = RetentionPolicy::default();

    let dry = prune(&url, &policy, PruneMode::DryRun);
    assert_eq!((dry.deleted, dry.protected), (6, 2), "{dry:?}");
    assert_eq!(ids(&pg, "exact"), (1..=15).collect::<Vec<_>>());

    let done = prune(&url, &policy, PruneMode::Delete);
    assert_eq!((done.deleted, done.protected), (6, 2), "{done:?}");
    assert_eq!(done.first_kept, Some(9), "9 is not delivered to 'ehr' yet");
    assert_eq!(done.released_bytes, 0, "PostgreSQL reuses, never returns");
    assert_eq!(ids(&pg, "exact"), KEPT);
    assert_eq!(prune(&url, &policy, PruneMode::Delete).deleted, 0);
}

/// An original goes before its (younger) resend, which keeps `duplicate_of`: the store has
/// no foreign key that would make the delete fail (or scan the table per row).
#[test]
fn an_original_is_pruned_before_its_resend() {
    let Some(pg) = PgCluster::start() else { return };
    let url = pg.create_db("dup");
    let out = connect(&url)
        .commit_batch(&[
            Record::new(big(1), at(SystemTime::now() - 31 * DAY)),
            Record::new(big(1), at(SystemTime::now() - 25 * DAY)),
        ])
        .unwrap();
    assert_eq!(out[1].duplicate_of, Some(out[0].id));
    let done = prune(&url, &RetentionPolicy::default(), PruneMode::Delete);
    assert_eq!(done.deleted, 1);
    assert_eq!(
        pg.sql("dup", "SELECT id, duplicate_of FROM mllp_messages"),
        format!("{}|{}", out[1].id, out[0].id)
    );
}

/// The space of deleted rows is reused by the next inserts: the table does not grow.
#[test]
fn the_freed_space_is_reused() {
    let Some(pg) = PgCluster::start() else { return };
    let url = pg.create_db("reuse");
    let mut backend = connect(&url);
    let old = SystemTime::now() - 40 * DAY;
    let batch: Vec<Record> = (0..300)
        .map(|i| Record::new(noisy(i, 1000), at(old)))
        .collect();
    backend.commit_batch(&batch).unwrap();
    let before = heap_bytes(&pg, "reuse");
    let done = prune(&url, &RetentionPolicy::default(), PruneMode::Delete);
    assert_eq!(done.deleted, 300);
    let batch: Vec<Record> = (300..600)
        .map(|i| Record::new(noisy(i, 1000), at(SystemTime::now())))
        .collect();
    backend.commit_batch(&batch).unwrap();
    let after = heap_bytes(&pg, "reuse");
    assert!(
        after <= before,
        "the table grew from {before} to {after} bytes"
    );
    let usage = usage_postgres(&url, &options()).unwrap();
    assert_eq!(usage.oldest_received_us.map(|us| us > 0), Some(true));
    assert!(usage.file_bytes >= after as u64, "{usage:?}");
}

#[test]
fn a_size_cap_removes_the_oldest_first() {
    let Some(pg) = PgCluster::start() else { return };
    let url = pg.create_db("size");
    let batch: Vec<Record> = (1..=40)
        .map(|i| Record::new(noisy(i, 4096), at(SystemTime::now())))
        .collect();
    connect(&url).commit_batch(&batch).unwrap();
    let cap = 100 * 1024;
    let policy = RetentionPolicy::default()
        .max_age(None)
        .max_bytes(Some(cap))
        .batch_rows(4);
    let done = prune(&url, &policy, PruneMode::Delete);
    let left = ids(&pg, "size");
    assert!(done.deleted > 0, "{done:?}");
    the_oldest_went_first(&left, done.deleted, 40);
    let usage = usage_postgres(&url, &options()).unwrap();
    assert!(usage.used_bytes <= cap, "{usage:?} {done:?} {left:?}");
}

/// A steady load with a short retention, through a running store and pruner: after the first
/// periods the table stops growing.
#[test]
fn under_a_steady_load_with_short_retention_the_table_stops_growing() {
    let Some(pg) = PgCluster::start() else { return };
    let url = pg.create_db("steady");
    let store = Store::open_postgres(&url, &options(), StoreConfig::default()).unwrap();
    let (passes_tx, passes) = mpsc::channel();
    let policy = RetentionPolicy::default()
        .max_age(Some(Duration::from_millis(400)))
        .pause(Duration::ZERO);
    let pruner = Pruner::start_postgres(&url, &options(), policy, move |r| {
        let _ = passes_tx.send(
            r.as_ref()
                .map(|(report, _)| report.deleted)
                .map_err(|e| e.to_string()),
        );
    })
    .unwrap();
    // 200 messages/s of 2 KiB for 3 s (7.5 retention periods).
    let (sent, sizes) = steady_load(
        &store,
        Duration::from_millis(3_000),
        |n| noisy(n, 2000),
        || {
            pg.sql("steady", "SELECT pg_total_relation_size('mllp_messages')")
                .parse()
                .unwrap()
        },
    );
    store.close(WAIT).unwrap();
    pruner.stop();
    let deleted: u64 = passes.try_iter().map(|r| r.unwrap()).sum();
    assert!(
        deleted > u64::from(sent) / 3,
        "only {deleted} of {sent} pruned"
    );
    // The table's size on disk (which includes its indexes' and TOAST's fixed first pages)
    // levels off once the pruner keeps up: what it held half-way is at least half of what
    // it holds at the end, while the rows written went on growing linearly.
    let middle = sizes[sizes.len() / 2];
    let last = *sizes.last().unwrap();
    assert!(last <= middle * 2, "still growing: {sizes:?}");
    let left: u64 = pg
        .sql("steady", "SELECT count(*) FROM mllp_messages")
        .parse()
        .unwrap();
    assert!(left < u64::from(sent) / 2, "{left} of {sent} left");
}

#[test]
fn pruning_a_database_without_a_store_is_a_typed_error() {
    let Some(pg) = PgCluster::start() else { return };
    let url = pg.create_db("none");
    let e = prune_postgres(
        &url,
        &RetentionPolicy::default(),
        SystemTime::now(),
        PruneMode::DryRun,
        &options(),
    )
    .unwrap_err();
    assert!(matches!(e, StoreError::NotAStore { .. }), "{e}");
    assert!(pg.psql("none", "SELECT 1 FROM mllp_messages").is_err());
}

/// BENCHMARKS.md "p99 commit time with and without pruning (PostgreSQL)": the SQLite test's
/// method (`crate::retention::p99_commit_with_and_without_pruning`) against a private
/// PostgreSQL 15: the same fixed-rate load on copies (`CREATE DATABASE … TEMPLATE`) of one
/// store holding 150 000 expired 1 KiB messages, with nothing else running, with a pruner
/// deleting them meanwhile, or with the expired rows' copy in a table of their own dropped
/// at the start of the window (what dropping a time partition costs the disk, without the
/// lock a `DETACH PARTITION` takes on the parent table). Rounds alternate.
/// Run: `cargo test -p mllp-store --features postgres --test it pg::retention::p99 --
/// --ignored --nocapture`.
#[test]
#[ignore = "a measurement (about three minutes), not a check"]
fn p99_commit_with_and_without_pruning() {
    use crate::retention::{p99_under_load, small};
    let Some(pg) = PgCluster::start() else { return };
    let seed = pg.create_db("seed");
    {
        let mut b = connect(&seed);
        let old = SystemTime::now() - 40 * DAY;
        for chunk in 0..150u64 {
            let batch: Vec<Record> = (0..1000)
                .map(|i| Record::new(small(chunk * 1000 + i), at(old)))
                .collect();
            b.commit_batch(&batch).unwrap();
        }
    }
    pg.sql(
        "seed",
        "CREATE TABLE expired AS SELECT * FROM mllp_messages",
    );
    pg.sql("seed", "VACUUM ANALYZE");
    let rate = 200;
    let window = Duration::from_secs(8);
    let mut p99s: [Vec<f64>; 3] = Default::default();
    for round in 0..5 {
        for (variant, name) in ["none", "pruner", "drop"].iter().enumerate() {
            let db = format!("r{round}{name}");
            pg.sql("postgres", &format!("CREATE DATABASE {db} TEMPLATE seed"));
            let url = pg.url(&db);
            let store = Store::open_postgres(&url, &options(), StoreConfig::default()).unwrap();
            let (deleted_tx, deleted) = mpsc::channel();
            let pruner = (variant == 1).then(|| {
                Pruner::start_postgres(&url, &options(), RetentionPolicy::default(), move |r| {
                    let _ = deleted_tx.send(r.as_ref().map_or(0, |(report, _)| report.deleted));
                })
                .unwrap()
            });
            let (p99, n) = std::thread::scope(|scope| {
                if variant == 2 {
                    scope.spawn(|| pg.sql(&db, "DROP TABLE expired"));
                }
                p99_under_load(&store, rate, window, 1_000_000)
            });
            drop(pruner);
            store.close(WAIT).unwrap();
            let pruned: u64 = deleted.try_iter().sum();
            let ms = p99.as_secs_f64() * 1e3;
            p99s[variant].push(ms);
            println!(
                "round {round} {name}: {n} msgs at {rate}/s, p99 {ms:.3} ms (the pruner deleted {pruned})"
            );
            pg.sql("postgres", &format!("DROP DATABASE {db}"));
        }
    }
    for (variant, name) in ["none", "pruner", "drop"].iter().enumerate() {
        let mut v = p99s[variant].clone();
        v.sort_by(f64::total_cmp);
        println!("median p99 {name}: {:.3} ms (rounds {v:?})", v[v.len() / 2]);
    }
}
