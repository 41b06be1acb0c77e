//! Commit throughput against batch size, on the disk that holds `target/` (WAL,
//! `synchronous=FULL`, 1 KiB messages with unique control ids, so every row also does its
//! duplicate lookup).
//!
//! `backend/N`: one `commit_batch` of N records straight on the SQLite backend.
//! `store/N`: N records submitted at once through the `Store` front, timed until the last
//! callback: the writer's group commit cuts them into batches of at most 1 024.
//!
//! Run: `cargo bench -p mllp-store --bench commit`. `MLLP_STORE_BENCH_DIR=/dev/shm` puts the
//! files elsewhere (on tmpfs, `fsync` is free, which isolates the CPU cost per row).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use criterion::{BatchSize, Criterion, Throughput};
use mllp_store::{Backend, Origin, Record, SqliteBackend, SqliteOptions, Store, StoreConfig};

/// Payload size of every message (the e2e benchmarks' default message size).
const MESSAGE_BYTES: usize = 1024;

fn records(n: usize, next: &AtomicU64) -> Vec<Record> {
    let origin = Origin {
        received_at: SystemTime::now(),
        peer: SocketAddr::from(([127, 0, 0, 1], 40_000)),
        local: SocketAddr::from(([127, 0, 0, 1], 2575)),
        connection_id: 1,
        sequence: 0,
    };
    (0..n)
        .map(|_| {
            let id = next.fetch_add(1, Ordering::Relaxed);
            let mut text = format!(
                "MSH|^~\\&|LAB|HOSP|EHR|HOSP|20260101120000||ADT^A01^ADT_A01|{id}|P|2.5.1\rPID|1||"
            );
            text.extend(std::iter::repeat_n(
                'x',
                MESSAGE_BYTES.saturating_sub(text.len() + 1),
            ));
            text.push('\r');
            Record::new(Bytes::from(text), origin)
        })
        .collect()
}

fn bench_dir(name: &str) -> std::path::PathBuf {
    let base = std::env::var_os("MLLP_STORE_BENCH_DIR").map_or_else(
        || env!("CARGO_TARGET_TMPDIR").into(),
        std::path::PathBuf::from,
    );
    let dir = base.join(format!("mllp-store-bench-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn backend(c: &mut Criterion) {
    let dir = bench_dir("backend");
    let mut db = SqliteBackend::open(dir.join("b.db"), &SqliteOptions::default()).unwrap();
    let next = AtomicU64::new(0);
    let mut group = c.benchmark_group("backend");
    group.measurement_time(Duration::from_secs(5));
    group.sample_size(20);
    for n in [1usize, 10, 100, 1_000, 4_000] {
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(n.to_string(), |b| {
            b.iter_batched(
                || records(n, &next),
                |batch| db.commit_batch(&batch).unwrap(),
                BatchSize::PerIteration,
            );
        });
    }
    group.finish();
}

fn store(c: &mut Criterion) {
    let dir = bench_dir("store");
    let store = Store::open_sqlite(
        dir.join("s.db"),
        &SqliteOptions::default(),
        StoreConfig::default(),
    )
    .unwrap();
    let next = AtomicU64::new(0);
    let mut group = c.benchmark_group("store");
    group.measurement_time(Duration::from_secs(5));
    group.sample_size(20);
    for n in [64usize, 1_024, 16_384] {
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(n.to_string(), |b| {
            b.iter_batched(
                || records(n, &next),
                |batch| {
                    let (tx, rx) = mpsc::channel();
                    for record in batch {
                        let tx = tx.clone();
                        store
                            .submit(record, Box::new(move |r| tx.send(r).unwrap()))
                            .unwrap();
                    }
                    for _ in 0..n {
                        rx.recv().unwrap().unwrap();
                    }
                },
                BatchSize::PerIteration,
            );
        });
    }
    group.finish();
}

// Spelled out rather than `criterion_group!`, whose generated `pub fn` trips `missing_docs`.
fn main() {
    let mut c = Criterion::default().configure_from_args();
    backend(&mut c);
    store(&mut c);
    c.final_summary();
}
