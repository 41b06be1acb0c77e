//! The patient search index file (`mllp_store::search_index`): the follower indexes committed
//! messages; search covers what it has not indexed yet; a missing, damaged or foreign file
//! is rebuilt while search stays right; pruned messages leave it; a store with the earlier
//! inline index migrates. Every wait is bounded by `util::WAIT`.

use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use mllp_store::retention::{PruneMode, RetentionPolicy, prune_sqlite};
use mllp_store::search::{SearchFilter, search_sqlite};
use mllp_store::search_index::index_path;
use mllp_store::{Backend, Record, SqliteBackend, SqliteOptions, StoreId};
use rusqlite::Connection;

use crate::search::{at_second, msg, records};
use crate::util::{TempDir, WAIT};

/// The ids a search by patient finds, newest first.
fn by_patient(path: &Path, patient: &str) -> Vec<StoreId> {
    search_sqlite(
        path,
        &SearchFilter::default().patient(patient),
        &SqliteOptions::default(),
    )
    .unwrap()
    .iter()
    .map(|r| r.id)
    .collect()
}

/// The index file's `indexed_through` and its entries (id, patient) in id order.
fn index_file(path: &Path) -> (StoreId, Vec<(StoreId, String)>) {
    let conn = Connection::open(index_path(path)).unwrap();
    let through = conn
        .query_row("SELECT indexed_through FROM search_index_state", [], |r| {
            r.get(0)
        })
        .unwrap();
    let rows = conn
        .prepare("SELECT id, patient_id FROM patient_index ORDER BY id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    (through, rows)
}

/// How many `messages_patient` the store has (the earlier inline index).
fn inline_patient_indexes(path: &Path) -> i64 {
    Connection::open(path)
        .unwrap()
        .query_row(
            "SELECT count(*) FROM sqlite_schema WHERE name = 'messages_patient'",
            [],
            |r| r.get(0),
        )
        .unwrap()
}

/// The search test's six records (ids 1..=6), committed and indexed.
fn indexed_store(path: &Path) -> SqliteBackend {
    let mut b = SqliteBackend::open(path, &SqliteOptions::default()).unwrap();
    b.commit_batch(&records()).unwrap();
    assert!(b.search_index().unwrap().wait_for(6, WAIT), "not indexed");
    b
}

fn p1(at: u64) -> Record {
    Record::new(
        msg("LAB", "H1", "ORU^R01", &format!("X{at}"), "P1"),
        at_second(at),
    )
}

#[test]
fn the_follower_indexes_committed_messages() {
    let dir = TempDir::new("pindex-follow");
    let path = dir.join("s.db");
    let b = indexed_store(&path);
    // Record 6 is not HL7 (no patient): covered, not indexed.
    let (through, rows) = index_file(&path);
    assert_eq!(through, 6);
    let ids: Vec<StoreId> = rows.iter().map(|r| r.0).collect();
    assert_eq!(ids, [1, 2, 3, 4, 5]);
    assert_eq!(rows[3].1, "P\\T\\3", "raw, as the column");
    assert_eq!(b.search_index().unwrap().indexed_through(), Some(6));
    drop(b);
    assert_eq!(by_patient(&path, "P1"), [5, 2, 1]);
    // The store itself has no patient index any more.
    let inline = inline_patient_indexes(&path);
    assert_eq!(inline, 0);
}

/// Messages the follower has not indexed yet (held back here) are found by scanning the
/// store after `indexed_through`; while a writer runs, and after.
#[test]
fn search_finds_the_messages_the_follower_has_not_indexed() {
    let dir = TempDir::new("pindex-tail");
    let path = dir.join("s.db");
    let mut b = indexed_store(&path);
    let indexer = b.search_index().unwrap();
    indexer.hold(true);
    b.commit_batch(&[p1(7), p1(8)]).unwrap();
    assert_eq!(index_file(&path).0, 6, "the follower was held");
    assert_eq!(by_patient(&path, "P1"), [8, 7, 5, 2, 1]);
    assert_eq!(
        search_sqlite(
            &path,
            &SearchFilter::default().patient("P1").limit(2),
            &SqliteOptions::default()
        )
        .unwrap()
        .iter()
        .map(|r| r.id)
        .collect::<Vec<_>>(),
        [8, 7]
    );
    assert_eq!(by_patient(&path, "P2"), [3]);
    b.search_index().unwrap().hold(false);
    assert!(b.search_index().unwrap().wait_for(8, WAIT));
    assert_eq!(by_patient(&path, "P1"), [8, 7, 5, 2, 1]);
    drop(b);
    assert_eq!(index_file(&path).0, 8);
}

/// A deleted or garbled index file: search still answers right (by scanning), and the next
/// writer rebuilds the file from id 0.
#[test]
fn a_deleted_or_garbled_index_file_is_rebuilt() {
    for damage in ["delete", "garble header", "garble pages"] {
        let dir = TempDir::new("pindex-rebuild");
        let path = dir.join("s.db");
        drop(indexed_store(&path));
        let side = index_path(&path);
        match damage {
            "delete" => std::fs::remove_file(&side).unwrap(),
            "garble header" => std::fs::write(&side, vec![0x5a; 16 * 1024]).unwrap(),
            _ => {
                // Every page but the first (the header and the schema stay readable).
                let mut bytes = std::fs::read(&side).unwrap();
                assert!(bytes.len() > 4096, "{damage}: {} bytes", bytes.len());
                for b in &mut bytes[4096..] {
                    *b = 0xa5;
                }
                std::fs::write(&side, bytes).unwrap();
            }
        }
        assert_eq!(by_patient(&path, "P1"), [5, 2, 1], "{damage}");
        assert_eq!(by_patient(&path, "P\\T\\3"), [4], "{damage}");
        let mut b = SqliteBackend::open(&path, &SqliteOptions::default()).unwrap();
        b.commit_batch(&[p1(7)]).unwrap();
        assert!(b.search_index().unwrap().wait_for(7, WAIT), "{damage}");
        drop(b);
        let (through, rows) = index_file(&path);
        assert_eq!(through, 7, "{damage}");
        assert_eq!(rows.len(), 6, "{damage}: {rows:?}");
        assert_eq!(by_patient(&path, "P1"), [7, 5, 2, 1], "{damage}");
    }
}

/// Another store's index file put beside a store (its token differs) is not used, and is
/// rebuilt; one ahead of the store (a store restored from an older copy) too.
#[test]
fn another_stores_or_a_newer_index_file_is_rebuilt() {
    let dir = TempDir::new("pindex-foreign");
    let a = dir.join("a.db");
    let b_path = dir.join("b.db");
    drop(indexed_store(&a));
    let mut b = SqliteBackend::open(&b_path, &SqliteOptions::default()).unwrap();
    b.commit_batch(&(1..=7).map(p1).collect::<Vec<_>>())
        .unwrap();
    assert!(b.search_index().unwrap().wait_for(7, WAIT));
    drop(b);
    let all: Vec<StoreId> = (1..=7).rev().collect();
    // a's file says only ids 1, 2 and 5 are P1's, and that it covers ids 1..=6.
    std::fs::copy(index_path(&a), index_path(&b_path)).unwrap();
    assert_eq!(by_patient(&b_path, "P1"), all, "a's file was used");
    let b = SqliteBackend::open(&b_path, &SqliteOptions::default()).unwrap();
    assert!(b.search_index().unwrap().wait_for(7, WAIT));
    drop(b);
    let (through, rows) = index_file(&b_path);
    assert_eq!((through, rows.len()), (7, 7));

    // The same store's file, but ahead of it: it claims ids it cannot have seen.
    Connection::open(index_path(&b_path))
        .unwrap()
        .execute_batch(
            "DELETE FROM patient_index WHERE id > 3; \
             UPDATE search_index_state SET indexed_through = 99",
        )
        .unwrap();
    assert_eq!(by_patient(&b_path, "P1"), all, "a file ahead was used");
    let b = SqliteBackend::open(&b_path, &SqliteOptions::default()).unwrap();
    assert!(b.search_index().unwrap().wait_for(7, WAIT));
    drop(b);
    assert_eq!(index_file(&b_path).0, 7);
    assert_eq!(index_file(&b_path).1.len(), 7);
}

/// Pruned messages are not found, and their entries leave the index file.
#[test]
fn pruned_messages_leave_the_index() {
    let dir = TempDir::new("pindex-prune");
    let path = dir.join("s.db");
    drop(indexed_store(&path));
    // Received at seconds 1..=6: a day's retention, a day and 3.5 s later, removes 1..=3.
    let now = UNIX_EPOCH + Duration::from_millis((1_800_000_000 + 86_400 + 3) * 1000 + 500);
    let policy = RetentionPolicy::default().max_age(Some(Duration::from_secs(86_400)));
    let report = prune_sqlite(
        &path,
        &policy,
        now,
        PruneMode::Delete,
        &SqliteOptions::default(),
    )
    .unwrap();
    assert_eq!(report.deleted, 3);
    assert_eq!(by_patient(&path, "P1"), [5]);
    assert_eq!(by_patient(&path, "P2"), Vec::<StoreId>::new());
    let ids: Vec<StoreId> = index_file(&path).1.iter().map(|r| r.0).collect();
    assert_eq!(ids, [4, 5]);
}

/// Entries left in the index file for messages that are gone (a pruned message indexed at
/// that moment) match nothing: search joins each entry to its message row.
#[test]
fn a_stale_entry_matches_nothing() {
    let dir = TempDir::new("pindex-stale");
    let path = dir.join("s.db");
    drop(indexed_store(&path));
    Connection::open(&path)
        .unwrap()
        .execute_batch("DELETE FROM messages WHERE id = 2")
        .unwrap();
    Connection::open(index_path(&path))
        .unwrap()
        .execute_batch("UPDATE patient_index SET patient_id = 'P1' WHERE id = 3")
        .unwrap();
    assert_eq!(by_patient(&path, "P1"), [5, 1]);
}

/// A store created with the earlier inline `messages_patient`: a writer drops it and the
/// follower indexes every message already there.
#[test]
fn a_store_with_the_inline_patient_index_migrates() {
    let dir = TempDir::new("pindex-migrate");
    let path = dir.join("s.db");
    {
        let mut options = SqliteOptions::default();
        options.bench_without_patient_index = true;
        let mut b = SqliteBackend::open(&path, &options).unwrap();
        b.commit_batch(&records()).unwrap();
    }
    assert!(!index_path(&path).exists(), "no follower, no file");
    Connection::open(&path)
        .unwrap()
        .execute_batch(
            "CREATE INDEX messages_patient ON messages (patient_id) WHERE patient_id IS NOT NULL",
        )
        .unwrap();
    let b = SqliteBackend::open(&path, &SqliteOptions::default()).unwrap();
    assert!(b.search_index().unwrap().wait_for(6, WAIT));
    drop(b);
    let inline = inline_patient_indexes(&path);
    assert_eq!(inline, 0, "dropped at open");
    assert_eq!(index_file(&path).1.len(), 5);
    assert_eq!(by_patient(&path, "P1"), [5, 2, 1]);
}
