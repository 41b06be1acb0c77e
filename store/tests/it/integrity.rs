//! Integrity: a store with garbage in its pages (header intact) is found damaged by the check,
//! and a commit that meets the damage marks the store corrupt (readiness 503, counted).

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

use mllp_store::integrity::{CheckDepth, CheckOutcome, check_sqlite};
use mllp_store::readiness::{NotReady, ready};
use mllp_store::{Backend as _, Record, SqliteBackend, SqliteOptions, Store, StoreConfig};
use rusqlite::Connection;

use crate::util::{TempDir, WAIT, channel, done, message, origin, recv};

/// 2 000 messages, checkpointed into the main file; then every page from half-way to the end
/// overwritten with garbage (page 1, the header and schema, stays intact).
pub(crate) fn damaged_store(path: &Path) {
    let mut b = SqliteBackend::open(path, &SqliteOptions::default()).unwrap();
    for chunk in 0..4 {
        let batch: Vec<Record> = (0..500)
            .map(|i| Record::new(message(&format!("c{chunk}-{i}")), origin(1, i)))
            .collect();
        b.commit_batch(&batch).unwrap();
    }
    drop(b);
    Connection::open(path)
        .unwrap()
        .execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
        .unwrap();
    let len = std::fs::metadata(path).unwrap().len();
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let start = (len / 2) / 4096 * 4096;
    f.seek(SeekFrom::Start(start)).unwrap();
    let garbage: Vec<u8> = (0..(len - start)).map(|i| (i * 7919 % 251) as u8).collect();
    f.write_all(&garbage).unwrap();
    f.sync_all().unwrap();
}

#[test]
fn the_check_finds_garbage_in_the_pages() {
    let dir = TempDir::new("check");
    let good = dir.join("good.db");
    drop(SqliteBackend::open(&good, &SqliteOptions::default()).unwrap());
    let opts = SqliteOptions::default();
    assert_eq!(
        check_sqlite(&good, CheckDepth::Full, None, &opts).unwrap(),
        CheckOutcome::Ok
    );
    let bad = dir.join("bad.db");
    damaged_store(&bad);
    for depth in [CheckDepth::Quick, CheckDepth::Full] {
        match check_sqlite(&bad, depth, None, &opts).unwrap() {
            CheckOutcome::Damaged(problems) => assert!(!problems.is_empty()),
            other => panic!("{depth:?}: {other:?}"),
        }
    }
    // Within a budget too (the budget's watchdog must not turn a finished check into an
    // incomplete one).
    let budget = Some(std::time::Duration::from_secs(60));
    assert!(matches!(
        check_sqlite(&bad, CheckDepth::Quick, budget, &opts).unwrap(),
        CheckOutcome::Damaged(_)
    ));
    assert_eq!(
        check_sqlite(&good, CheckDepth::Quick, budget, &opts).unwrap(),
        CheckOutcome::Ok
    );
    // The check opened it read-only: nothing was left beside it.
    assert!(!dir.join("bad.db-wal").exists() && !dir.join("bad.db-shm").exists());
}

#[test]
fn a_commit_that_meets_damage_marks_the_store_corrupt() {
    let dir = TempDir::new("corrupt-at-run-time");
    let path = dir.join("s.db");
    damaged_store(&path);
    let backend = SqliteBackend::open(&path, &SqliteOptions::default()).unwrap();
    let store = Store::start(backend, StoreConfig::default()).unwrap();
    let health = store.pulse();
    let (tx, rx) = channel();
    let mut failed = 0;
    for i in 0..20 {
        store
            .submit(
                Record::new(message(&format!("new{i}")), origin(2, i)),
                done(&tx),
            )
            .unwrap();
        if recv(&rx).is_err() {
            failed += 1;
        }
    }
    assert!(failed > 0, "no commit met the damage");
    assert!(health.is_corrupt());
    assert!(matches!(
        ready(false, Some(&store), None),
        Err(NotReady::Corrupt)
    ));
    store.close(WAIT).unwrap();
}
