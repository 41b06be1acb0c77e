//! Search: each filter, their combination, newest first, the limit, delivery status from the
//! forwarder's tables, and reading while a writer commits.

use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use mllp_store::search::{DeliveryStatus, SearchFilter, search_sqlite};
use mllp_store::{Backend, Origin, Record, SqliteBackend, SqliteOptions};
use rusqlite::Connection;

use crate::util::{TempDir, origin};

fn msg(app: &str, fac: &str, kind: &str, control: &str, patient: &str) -> Bytes {
    Bytes::from(format!(
        "MSH|^~\\&|{app}|{fac}|EHR|H|20260101120000||{kind}|{control}|P|2.5.1\rPID|1||{patient}^^^H^MR~OTHER||DOE\r"
    ))
}

fn at_second(s: u64) -> Origin {
    Origin {
        received_at: UNIX_EPOCH + Duration::from_secs(1_800_000_000 + s),
        ..origin(1, 0)
    }
}

/// Ids 1..=6.
fn store(path: &Path) {
    let mut b = SqliteBackend::open(path, &SqliteOptions::default()).unwrap();
    b.commit_batch(&[
        Record::new(msg("LAB", "H1", "ORU^R01", "C1", "P1"), at_second(1)),
        Record::new(
            msg("LAB", "H2", "ADT^A01^ADT_A01", "C2", "P1"),
            at_second(2),
        ),
        Record::new(msg("ADT", "H1", "ADT^A01", "C3", "P2"), at_second(3)),
        Record::new(msg("ADT", "H1", "ADT^A011", "C4", "P\\T\\3"), at_second(4)),
        Record::new(msg("LAB", "H1", "ORU^R01", "C1", "P1"), at_second(5)),
        Record::new(Bytes::from_static(b"not hl7"), at_second(6)),
    ])
    .unwrap();
}

fn ids(path: &Path, filter: SearchFilter) -> Vec<i64> {
    search_sqlite(path, &filter, &SqliteOptions::default())
        .unwrap()
        .iter()
        .map(|r| r.id)
        .collect()
}

#[test]
fn every_filter_narrows_newest_first() {
    let dir = TempDir::new("search");
    let path = dir.join("s.db");
    store(&path);
    let f = SearchFilter::default;
    assert_eq!(ids(&path, f()), vec![6, 5, 4, 3, 2, 1]);
    assert_eq!(ids(&path, f().limit(2)), vec![6, 5]);
    assert_eq!(ids(&path, f().control_id("C1")), vec![5, 1]);
    assert_eq!(ids(&path, f().sender("LAB")), vec![5, 2, 1]);
    assert_eq!(ids(&path, f().sender("LAB^H1")), vec![5, 1]);
    assert_eq!(
        ids(&path, f().message_type("ADT^A01")),
        vec![3, 2],
        "not ADT^A011"
    );
    assert_eq!(ids(&path, f().patient("P1")), vec![5, 2, 1]);
    assert_eq!(
        ids(&path, f().patient("P\\T\\3")),
        vec![4],
        "raw, not unescaped"
    );
    assert_eq!(ids(&path, f().patient("OTHER")), Vec::<i64>::new());
    let t = |s: u64| 1_800_000_000_000_000 + s as i64 * 1_000_000;
    assert_eq!(ids(&path, f().received(Some(t(2)), Some(t(4)))), vec![3, 2]);
    assert_eq!(ids(&path, f().patient("P1").sender("LAB^H2")), vec![2]);
    assert_eq!(ids(&path, f().ids(vec![1, 3, 99])), vec![3, 1]);
    // No forwarding tables: only `stored` matches.
    assert_eq!(ids(&path, f().status(DeliveryStatus::Stored)).len(), 6);
    assert_eq!(
        ids(&path, f().status(DeliveryStatus::Queued)),
        Vec::<i64>::new()
    );
}

#[test]
fn status_follows_the_forwarders_tables() {
    let dir = TempDir::new("search-status");
    let path = dir.join("s.db");
    store(&path);
    Connection::open(&path)
        .unwrap()
        .execute_batch(
            "CREATE TABLE forward_cursor (destination TEXT, lane INTEGER, delivered_through INTEGER);
             INSERT INTO forward_cursor VALUES ('ehr', 0, 4), ('lab', 0, 5);
             CREATE TABLE forward_dead_letter (destination TEXT, message_id INTEGER, status TEXT);
             INSERT INTO forward_dead_letter VALUES ('ehr', 2, 'dead'), ('ehr', 3, 'requeued'),
                 ('lab', 1, 'delivered');",
        )
        .unwrap();
    let f = SearchFilter::default;
    assert_eq!(
        ids(&path, f().status(DeliveryStatus::Delivered)),
        vec![4, 1]
    );
    assert_eq!(
        ids(&path, f().status(DeliveryStatus::Queued)),
        vec![6, 5, 3]
    );
    assert_eq!(ids(&path, f().status(DeliveryStatus::Dead)), vec![2]);
}

/// A store created before the patient column: a writer adds it (old rows: none), searches
/// by patient then find the new messages.
#[test]
fn an_older_store_gets_the_patient_column() {
    let dir = TempDir::new("search-migrate");
    let path = dir.join("s.db");
    store(&path);
    let conn = Connection::open(&path).unwrap();
    conn.execute_batch(
        "DROP INDEX messages_patient; DROP INDEX messages_control_id;
         ALTER TABLE messages DROP COLUMN patient_id;",
    )
    .unwrap();
    drop(conn);
    let mut b = SqliteBackend::open(&path, &SqliteOptions::default()).unwrap();
    b.commit_batch(&[Record::new(
        msg("LAB", "H1", "ORU^R01", "C9", "P1"),
        origin(1, 0),
    )])
    .unwrap();
    drop(b);
    assert_eq!(ids(&path, SearchFilter::default().patient("P1")), vec![7]);
    assert_eq!(
        ids(&path, SearchFilter::default().control_id("C1")),
        vec![5, 1]
    );
}
