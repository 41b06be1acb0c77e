//! Search: each filter, their combination, newest first, the limit, delivery status from the
//! forwarder's tables, and reading while a writer commits. The checks are shared with the
//! PostgreSQL tests (`pg::search`): the same records, filters and expected ids.

use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use mllp_store::search::{DeliveryStatus, SearchFilter, search_sqlite};
use mllp_store::{Backend, Origin, Record, SqliteBackend, SqliteOptions};
use rusqlite::Connection;

use crate::util::{TempDir, origin, time_searches};

pub(crate) fn msg(app: &str, fac: &str, kind: &str, control: &str, patient: &str) -> Bytes {
    Bytes::from(format!(
        "MSH|^~\\&|{app}|{fac}|EHR|H|20260101120000||{kind}|{control}|P|2.5.1\rPID|1||{patient}^^^H^MR~OTHER||DOE\r"
    ))
}

pub(crate) fn at_second(s: u64) -> Origin {
    Origin {
        received_at: UNIX_EPOCH + Duration::from_secs(1_800_000_000 + s),
        ..origin(1, 0)
    }
}

/// Ids 1..=6.
fn store(path: &Path) {
    let mut b = SqliteBackend::open(path, &SqliteOptions::default()).unwrap();
    b.commit_batch(&records()).unwrap();
}

/// The records every search test stores (ids 1..=6 in a new store).
pub(crate) fn records() -> Vec<Record> {
    vec![
        Record::new(msg("LAB", "H1", "ORU^R01", "C1", "P1"), at_second(1)),
        Record::new(
            msg("LAB", "H2", "ADT^A01^ADT_A01", "C2", "P1"),
            at_second(2),
        ),
        Record::new(msg("ADT", "H1", "ADT^A01", "C3", "P2"), at_second(3)),
        Record::new(msg("ADT", "H1", "ADT^A011", "C4", "P\\T\\3"), at_second(4)),
        Record::new(msg("LAB", "H1", "ORU^R01", "C1", "P1"), at_second(5)),
        Record::new(Bytes::from_static(b"not hl7"), at_second(6)),
    ]
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
    every_filter_narrows(&|f| ids(&path, f));
}

/// The ids `search` finds in a store of [`records`], for each filter.
pub(crate) fn every_filter_narrows(ids: &dyn Fn(SearchFilter) -> Vec<i64>) {
    let f = SearchFilter::default;
    assert_eq!(ids(f()), vec![6, 5, 4, 3, 2, 1]);
    assert_eq!(ids(f().limit(2)), vec![6, 5]);
    assert_eq!(ids(f().control_id("C1")), vec![5, 1]);
    assert_eq!(ids(f().sender("LAB")), vec![5, 2, 1]);
    assert_eq!(ids(f().sender("LAB^H1")), vec![5, 1]);
    assert_eq!(ids(f().message_type("ADT^A01")), vec![3, 2], "not ADT^A011");
    assert_eq!(ids(f().patient("P1")), vec![5, 2, 1]);
    assert_eq!(ids(f().patient("P\\T\\3")), vec![4], "raw, not unescaped");
    assert_eq!(ids(f().patient("OTHER")), Vec::<i64>::new());
    let t = |s: u64| 1_800_000_000_000_000 + s as i64 * 1_000_000;
    assert_eq!(ids(f().received(Some(t(2)), Some(t(4)))), vec![3, 2]);
    assert_eq!(ids(f().patient("P1").sender("LAB^H2")), vec![2]);
    assert_eq!(ids(f().ids(vec![1, 3, 99])), vec![3, 1]);
    // No forwarding tables: only `stored` matches.
    assert_eq!(ids(f().status(DeliveryStatus::Stored)).len(), 6);
    assert_eq!(ids(f().status(DeliveryStatus::Queued)), Vec::<i64>::new());
}

#[test]
fn status_follows_the_forwarders_tables() {
    let dir = TempDir::new("search-status");
    let path = dir.join("s.db");
    store(&path);
    Connection::open(&path)
        .unwrap()
        .execute_batch(FORWARD_STATE)
        .unwrap();
    status_follows(&|f| ids(&path, f));
}

/// The forwarder's tables as far as search reads them (SQL both backends take).
pub(crate) const FORWARD_STATE: &str =
    "CREATE TABLE forward_cursor (destination TEXT, lane INTEGER, delivered_through INTEGER);
     INSERT INTO forward_cursor VALUES ('ehr', 0, 4), ('lab', 0, 5);
     CREATE TABLE forward_dead_letter (destination TEXT, message_id INTEGER, status TEXT);
     INSERT INTO forward_dead_letter VALUES ('ehr', 2, 'dead'), ('ehr', 3, 'requeued'),
         ('lab', 1, 'delivered');";

/// What each status finds in a store of [`records`] with [`FORWARD_STATE`].
pub(crate) fn status_follows(ids: &dyn Fn(SearchFilter) -> Vec<i64>) {
    let f = SearchFilter::default;
    assert_eq!(ids(f().status(DeliveryStatus::Delivered)), vec![4, 1]);
    assert_eq!(ids(f().status(DeliveryStatus::Queued)), vec![6, 5, 3]);
    assert_eq!(ids(f().status(DeliveryStatus::Dead)), vec![2]);
}

fn index_names(path: &Path) -> Vec<String> {
    Connection::open(path)
        .unwrap()
        .prepare(
            "SELECT name FROM sqlite_schema WHERE type = 'index' AND sql IS NOT NULL ORDER BY name",
        )
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// The duplicate lookup's index of the builds before search.
const OLD_ORIGINAL_INDEX: &str = "CREATE INDEX messages_original ON messages
    (control_id, sending_application, sending_facility, received_at_us)
    WHERE duplicate_of IS NULL AND control_id IS NOT NULL;";

/// A store created before the patient column: a writer adds it (old rows: none), searches
/// by patient then find the new messages; the duplicate lookup's old index gives way to the
/// one that also serves search by control id.
#[test]
fn an_older_store_gets_the_patient_column() {
    let dir = TempDir::new("search-migrate");
    let path = dir.join("s.db");
    store(&path);
    let conn = Connection::open(&path).unwrap();
    conn.execute_batch(&format!(
        "DROP INDEX messages_by_control_id; {OLD_ORIGINAL_INDEX}
         ALTER TABLE messages DROP COLUMN patient_id;"
    ))
    .unwrap();
    drop(conn);
    assert_eq!(index_names(&path), ["messages_original"]);
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
    // The patient's index is in the index file, not in the store (`search_index`).
    assert_eq!(index_names(&path), ["messages_by_control_id"]);
}

/// A store that a build with the earlier search indexes opened keeps the control id's:
/// rebuilding an index of a large store would delay the start. Its inline patient index is
/// dropped (the index file replaces it: `search_index`). Duplicates and searches still work.
#[test]
fn a_store_with_the_earlier_search_indexes_keeps_them() {
    let dir = TempDir::new("search-keep");
    let path = dir.join("s.db");
    store(&path);
    Connection::open(&path)
        .unwrap()
        .execute_batch(&format!(
            "DROP INDEX messages_by_control_id; {OLD_ORIGINAL_INDEX}
             CREATE INDEX messages_control_id ON messages (control_id) WHERE control_id IS NOT NULL;
             CREATE INDEX messages_patient ON messages (patient_id) WHERE patient_id IS NOT NULL;"
        ))
        .unwrap();
    let mut b = SqliteBackend::open(&path, &SqliteOptions::default()).unwrap();
    let outcomes = b
        .commit_batch(&[Record::new(
            msg("LAB", "H1", "ORU^R01", "C1", "P1"),
            at_second(7),
        )])
        .unwrap();
    drop(b);
    assert_eq!(outcomes[0].duplicate_of, Some(1));
    assert_eq!(
        index_names(&path),
        ["messages_control_id", "messages_original"]
    );
    assert_eq!(
        ids(&path, SearchFilter::default().control_id("C1")),
        vec![7, 5, 1]
    );
}

/// A 1 KiB ADT^A01 with control id `C{n}` and patient `P{n % 100_000}`.
fn kib(n: u64) -> Bytes {
    let filler = "Z".repeat(860);
    Bytes::from(format!(
        "MSH|^~\\&|LAB|H|EHR|H|20260101120000||ADT^A01|C{n}|P|2.5.1\rPID|1||P{}^^^H^MR||DOE\rNTE|1||{filler}\r",
        n % 100_000
    ))
}

/// BENCHMARKS.md "Receive throughput with and without the search indexes": 40 000 messages
/// submitted at once through `Store`, timed to the last callback, into a fresh store with and
/// without the patient index (the one index search adds; the control id's is the duplicate
/// lookup's; without: no follower, `bench_without_patient_index`), same run, alternating. Run:
/// `nice -n 19 cargo test --release -p mllp-store --test it search_bench_receive -- --ignored --nocapture`
#[test]
#[ignore = "a measurement (a minute), not a check"]
fn search_bench_receive() {
    use std::time::Instant;

    use mllp_store::{Store, StoreConfig};

    let dir = TempDir::new("search-bench-receive");
    let rounds: usize = std::env::var("MLLP_SEARCH_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    for round in 0..rounds {
        // Alternate which goes first, so drift cancels.
        let order = if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for indexes in order {
            let path = dir.join(format!("t{round}{indexes}.db"));
            let mut options = SqliteOptions::default();
            options.bench_without_patient_index = !indexes;
            let backend = SqliteBackend::open(&path, &options).unwrap();
            let store =
                Store::start(backend, StoreConfig::default().max_queue_messages(65_536)).unwrap();
            let (tx, rx) = std::sync::mpsc::channel();
            let n = 40_000u64;
            let start = Instant::now();
            for i in 0..n {
                let tx = tx.clone();
                store
                    .submit(
                        Record::new(kib(i), origin(1, i)),
                        Box::new(move |r| {
                            let _ = tx.send(r.is_ok());
                        }),
                    )
                    .unwrap();
            }
            for _ in 0..n {
                assert!(rx.recv().unwrap());
            }
            let secs = start.elapsed().as_secs_f64();
            store.close(Duration::from_secs(60)).unwrap();
            println!(
                "throughput round {round} patient_index={indexes}: {:.0} msg/s",
                n as f64 / secs
            );
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// BENCHMARKS.md "Receive throughput with and without the search indexes", instruction
/// counts: commits 4 000 1 KiB messages in batches of 16 through `SqliteBackend::commit_batch`
/// into a fresh store with the index set `MLLP_INDEX_SET` names:
///
/// - `current` (default): `messages_by_control_id`, and the search index's follower (its
///   work is on its own thread, outside `commit_batch`: only the writer's wake-up counts);
/// - `inline-patient`: `messages_by_control_id` and the earlier inline `messages_patient`
///   (the build before the index file);
/// - `no-patient`: `messages_by_control_id` only, no follower (`bench_without_patient_index`);
/// - `before`: the build before that's three (`messages_original`, `messages_control_id`,
///   `messages_patient`);
/// - `before-search`: `messages_original` only (the build before search).
///
/// Run under callgrind, counting only inside `commit_batch` (the writer thread's work per
/// batch, without the sync, which callgrind does not count; `'*index_chunk*'` instead
/// counts the search index follower's work, on its own thread):
/// `MLLP_INDEX_SET=current valgrind --tool=callgrind --toggle-collect='*commit_batch*' --callgrind-out-file=/tmp/cg.current target/release/deps/it-* index_cost --ignored --exact search::index_cost`
#[test]
#[ignore = "a measurement under callgrind, not a check"]
fn index_cost() {
    let set = std::env::var("MLLP_INDEX_SET").unwrap_or_else(|_| "current".into());
    let dir = TempDir::new("index-cost");
    let path = dir.join("s.db");
    // The writer first (opening adds the current indexes), then the set behind its back.
    let mut options = SqliteOptions::default();
    options.bench_without_patient_index = set != "current";
    let mut b = SqliteBackend::open(&path, &options).unwrap();
    const INLINE: &str =
        "CREATE INDEX messages_patient ON messages (patient_id) WHERE patient_id IS NOT NULL;";
    let before = format!(
        "DROP INDEX messages_by_control_id; {OLD_ORIGINAL_INDEX}
         CREATE INDEX messages_control_id ON messages (control_id) WHERE control_id IS NOT NULL;
         {INLINE}"
    );
    let change = match set.as_str() {
        "current" | "no-patient" => String::new(),
        "inline-patient" => INLINE.into(),
        "before" => before,
        "before-search" => {
            format!("{before} DROP INDEX messages_control_id; DROP INDEX messages_patient;")
        }
        other => panic!(
            "MLLP_INDEX_SET={other}: current, inline-patient, no-patient, before or before-search"
        ),
    };
    Connection::open(&path)
        .unwrap()
        .execute_batch(&change)
        .unwrap();
    println!("{set}: indexes {:?}", index_names(&path));
    let n = 4_000u64;
    for chunk in 0..n / 16 {
        let batch: Vec<Record> = (chunk * 16..(chunk + 1) * 16)
            .map(|i| Record::new(kib(i), origin(1, i)))
            .collect();
        b.commit_batch(&batch).unwrap();
    }
    // The follower's work, for `--toggle-collect='*index_chunk*'`: all of it.
    if let Some(indexer) = b.search_index() {
        assert!(indexer.wait_for(n as i64, Duration::from_secs(60)));
    }
}

/// A benchmark's filter for the message with id `i`.
pub(crate) type BenchFilter = fn(u64) -> SearchFilter;

/// What the search latency benchmarks look for, by the id `i` of a message they wrote:
/// control id `C{i}`, and patient `P{i % 100 000}` (SQLite's and PostgreSQL's alike).
pub(crate) const BENCH_FILTERS: [(&str, BenchFilter); 2] = [
    ("control id", |i| {
        SearchFilter::default().control_id(format!("C{i}"))
    }),
    ("patient", |i| {
        SearchFilter::default().patient(format!("P{}", i % 100_000))
    }),
];

/// BENCHMARKS.md "Search latency": searches by control id and by patient on a store of
/// `MLLP_SEARCH_BENCH_ROWS` (default 1 000 000) 1 KiB messages, in a temporary directory
/// deleted at the end. Run:
/// `MLLP_SEARCH_BENCH_ROWS=10000000 nice -n 19 cargo test --release -p mllp-store --test it search_bench_latency -- --ignored --nocapture`
///
/// The first 10 000 rows go through `SqliteBackend::commit_batch` (the production insert);
/// the rest are written with the same column values directly, in 100 000-row transactions
/// with `synchronous=OFF`, no journal and a 1 GiB page cache (a fill that takes minutes, not
/// hours; it changes how fast rows arrive, not the file's schema, indexes or B-tree depth).
#[test]
#[ignore = "a measurement (minutes, about 1.4 GB of disk per million rows), not a check"]
fn search_bench_latency() {
    use std::time::Instant;

    let rows: u64 = std::env::var("MLLP_SEARCH_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let dir = TempDir::new("search-bench-latency");
    let path = dir.join("big.db");
    let fill = Instant::now();
    let production = rows.min(10_000);
    {
        let mut b = SqliteBackend::open(&path, &SqliteOptions::default()).unwrap();
        let batch: Vec<Record> = (0..production)
            .map(|i| Record::new(kib(i), origin(1, i)))
            .collect();
        b.commit_batch(&batch).unwrap();
    }
    let mut conn = Connection::open(&path).unwrap();
    // The production insert's column values for row 0, to check the direct fill's against.
    let first: (String, String, String, String, String, i64) = conn
        .query_row(
            "SELECT sending_application, sending_facility, message_type, control_id, patient_id, size FROM messages WHERE id = 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)),
        )
        .unwrap();
    assert_eq!(
        first,
        (
            "LAB".into(),
            "H".into(),
            "ADT^A01".into(),
            "C0".into(),
            "P0".into(),
            kib(0).len() as i64
        )
    );
    conn.execute_batch(
        "PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF; PRAGMA cache_size = -1048576;",
    )
    .unwrap();
    let base_us = 1_800_000_000_000_000i64;
    let mut i = production;
    while i < rows {
        let end = (i + 100_000).min(rows);
        let tx = conn.transaction().unwrap();
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO messages (received_at_us, peer, local, connection_id, sequence,
                        sending_application, sending_facility, message_type, control_id, size,
                        duplicate_of, payload, client_cert, patient_id)
                     VALUES (?1, '10.0.0.7:40001', '[::1]:2575', 1, ?2, 'LAB', 'H', 'ADT^A01',
                        ?3, ?4, NULL, ?5, NULL, ?6)",
                )
                .unwrap();
            for n in i..end {
                let payload = kib(n);
                insert
                    .execute(rusqlite::params![
                        base_us + n as i64,
                        n as i64,
                        format!("C{n}"),
                        payload.len() as i64,
                        &payload[..],
                        format!("P{}", n % 100_000),
                    ])
                    .unwrap();
            }
        }
        tx.commit().unwrap();
        let before = i;
        i = end;
        if before / 1_000_000 != i / 1_000_000 {
            println!(
                "filled {i} rows in {:.0} s ({} MB)",
                fill.elapsed().as_secs_f64(),
                std::fs::metadata(&path).unwrap().len() >> 20
            );
        }
    }
    conn.execute_batch("PRAGMA journal_mode = WAL").unwrap();
    drop(conn);
    // The follower builds the index file from id 0, as after a migration.
    let build = Instant::now();
    {
        let b = SqliteBackend::open(&path, &SqliteOptions::default()).unwrap();
        let built = b
            .search_index()
            .unwrap()
            .wait_for(rows as i64, Duration::from_secs(3600));
        assert!(built);
    }
    println!(
        "the follower indexed {rows} rows in {:.1} s",
        build.elapsed().as_secs_f64()
    );
    let depth = |index: &str| -> i64 {
        // dbstat is not in every build: report the depth only where it is.
        Connection::open(&path)
            .unwrap()
            .query_row(
                "SELECT max(length(path) - length(replace(path, '/', ''))) FROM dbstat WHERE name = ?1",
                [index],
                |r| r.get(0),
            )
            .unwrap_or(-1)
    };
    println!(
        "filled {rows} rows in {:.0} s ({} MB); B-tree depth: messages_by_control_id {}",
        fill.elapsed().as_secs_f64(),
        std::fs::metadata(&path).unwrap().len() >> 20,
        depth("messages_by_control_id"),
    );
    let opts = SqliteOptions::default();
    for (name, filter) in BENCH_FILTERS {
        let (median, max) = time_searches(rows, 0, |i| {
            !search_sqlite(&path, &filter(i), &opts).unwrap().is_empty()
        });
        println!(
            "search by {name} on {rows} rows (a fresh connection each, newest 100): median {median:.2} ms, max {max:.2} ms"
        );
    }
    // The follower held back while `MLLP_SEARCH_BENCH_TAIL` (default 20 000) more messages
    // commit: searches by patient then also scan that unindexed tail.
    let tail: u64 = std::env::var("MLLP_SEARCH_BENCH_TAIL")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    {
        let mut b = SqliteBackend::open(&path, &SqliteOptions::default()).unwrap();
        b.search_index().unwrap().hold(true);
        for start in (rows..rows + tail).step_by(1_000) {
            let batch: Vec<Record> = (start..(start + 1_000).min(rows + tail))
                .map(|i| Record::new(kib(i), origin(1, i)))
                .collect();
            b.commit_batch(&batch).unwrap();
        }
    }
    let indexed: i64 = Connection::open(mllp_store::search_index::index_path(&path))
        .unwrap()
        .query_row("SELECT indexed_through FROM search_index_state", [], |r| {
            r.get(0)
        })
        .unwrap();
    let (_, patient) = BENCH_FILTERS[1];
    let (median, max) = time_searches(rows, 0, |i| {
        !search_sqlite(&path, &patient(i), &opts).unwrap().is_empty()
    });
    println!(
        "search by patient with {} messages not indexed: median {median:.2} ms, max {max:.2} ms",
        (rows + tail) as i64 - indexed,
    );
}

#[test]
fn resends_are_audited_in_the_store() {
    use mllp_store::resend::record_resends_sqlite;
    let dir = TempDir::new("resend-audit");
    let path = dir.join("s.db");
    store(&path);
    let audits = audits();
    record_resends_sqlite(&path, &audits, &SqliteOptions::default()).unwrap();
    record_resends_sqlite(&path, &audits[..1], &SqliteOptions::default()).unwrap();
    let rows: Vec<(i64, String, String, Option<String>)> = Connection::open(&path)
        .unwrap()
        .prepare("SELECT message_id, os_user, result, reason FROM resend_audit ORDER BY id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[1], (2, "alice".into(), "AE: no".into(), None));
    // Never creates a store.
    assert!(
        record_resends_sqlite(&dir.join("nope.db"), &audits, &SqliteOptions::default()).is_err()
    );
}

/// Two resends of messages 1 and 2, one accepted and one not.
pub(crate) fn audits() -> [mllp_store::resend::ResendAudit; 2] {
    use mllp_store::resend::ResendAudit;
    [
        ResendAudit::new(
            1,
            "alice".into(),
            "ehr:2575".into(),
            "AA".into(),
            Some("lost".into()),
        ),
        ResendAudit::new(2, "alice".into(), "ehr:2575".into(), "AE: no".into(), None),
    ]
}
