//! The PostgreSQL backend against a real PostgreSQL 15 that each test starts for itself
//! (`mllp_test_support::pg`): commits and ids, export identical to SQLite's, duplicates across two
//! connections (two nodes), racing nodes, schema creation and versioning, the
//! `synchronous_commit` check, and a database that goes away and comes back.
//!
//! Every test prints a skip line and passes where PostgreSQL cannot be had; `.ci/run`
//! installs it. Every wait is bounded.

use mllp_test_support::pg as cluster;
#[path = "pg/check.rs"]
mod check;
#[path = "pg/cut_proxy.rs"]
mod cut_proxy;
#[path = "pg/ready.rs"]
mod ready;
#[path = "pg/retention.rs"]
mod retention;
#[path = "pg/search.rs"]
mod search;

use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use mllp_store::export::{Format, export_postgres, export_sqlite};
use mllp_store::{
    Backend, DuplicateKey, Origin, PostgresBackend, PostgresOptions, Problem, Record,
    SqliteBackend, SqliteOptions, Store, StoreConfig, StoreError, StoreOutcome,
};

use crate::util::{self, TempDir, WAIT, message, message_from, origin};
use cluster::PgCluster;
use cut_proxy::CutProxy;

fn options() -> PostgresOptions {
    PostgresOptions::default()
}

fn connect(url: &str) -> PostgresBackend {
    PostgresBackend::connect(url, &options()).unwrap()
}

fn export(url: &str, since: i64, format: Format) -> String {
    let mut out = Vec::new();
    export_postgres(url, since, format, &options(), &mut out).unwrap();
    String::from_utf8(out).unwrap()
}

#[track_caller]
fn assert_one_line(e: &StoreError) {
    let text = e.to_string();
    assert!(!text.contains('\n') && !text.contains('\r'), "{text:?}");
}

#[test]
fn commits_get_increasing_ids_and_export_matches_sqlite_byte_for_byte() {
    let Some(pg) = PgCluster::start() else { return };
    let url = pg.create_db("same");
    let mut backend = connect(&url);
    assert_eq!(backend.last_id().unwrap(), 0);
    assert_eq!(backend.synchronous_commit(), "on");
    assert!(
        backend
            .location()
            .starts_with("postgres://postgres@127.0.0.1:")
    );

    // The same records into both stores: every byte of both exports must agree.
    let dir = TempDir::new("pg-same");
    let path = dir.join("s.db");
    let mut sqlite = SqliteBackend::open(&path, &SqliteOptions::default()).unwrap();
    let when = UNIX_EPOCH + Duration::from_micros(1_767_268_800_123_456);
    let at = |c, s| Origin {
        received_at: when,
        ..origin(c, s)
    };
    let batches = vec![
        vec![Record::new(message("42"), at(1, 0))],
        vec![
            Record::new(message("42"), at(2, 0)),
            Record::new(Bytes::from_static(b"\xff\x00binary"), at(2, 1)),
            Record::new(message_from("", "", "43"), at(2, 2)),
            Record::new(
                Bytes::from_static(b"MSH|^~\\&|A\0PP|F\xe9C||||||c\0id|P|2.5\r"),
                at(2, 3),
            ),
            Record::new(message("44"), at(3, u64::MAX)),
        ],
    ];
    let mut last = 0;
    for batch in &batches {
        let pg_out = backend.commit_batch(batch).unwrap();
        let lite_out = sqlite.commit_batch(batch).unwrap();
        assert_eq!(pg_out, lite_out);
        for o in &pg_out {
            assert!(o.id > last, "ids increase: {pg_out:?}");
            last = o.id;
        }
    }
    assert_eq!(backend.last_id().unwrap(), 6);
    drop(sqlite);
    for format in [Format::Jsonl, Format::Hl7] {
        for since in [0, 1, 4, 6] {
            let mut lite = Vec::new();
            export_sqlite(&path, since, format, &SqliteOptions::default(), &mut lite).unwrap();
            let mut pg_out = Vec::new();
            export_postgres(&url, since, format, &options(), &mut pg_out).unwrap();
            if format == Format::Jsonl {
                // NUL in an MSH field: SQLite keeps it, PostgreSQL text cannot (U+FFFD).
                let lite = String::from_utf8(lite)
                    .unwrap()
                    .replace("\\u0000", "\u{FFFD}");
                assert_eq!(String::from_utf8(pg_out).unwrap(), lite, "since {since}");
            } else {
                assert_eq!(pg_out, lite, "{format:?} since {since}");
            }
        }
    }
    let jsonl = export(&url, 0, Format::Jsonl);
    assert_eq!(jsonl.lines().count(), 6);
    assert!(jsonl.contains("\"message_base64\":\"/wBiaW5hcnk=\""));
    assert!(jsonl.contains("\"duplicate_of\":1"));

    // Pages are cut by bytes as the interface asks: at least one record, then stop past the cap.
    let page = backend.read_after(0, 6, 100, 1).unwrap();
    assert_eq!(page.len(), 1);
    let page = backend.read_after(2, 5, 100, usize::MAX).unwrap();
    assert_eq!(page.iter().map(|r| r.id).collect::<Vec<_>>(), [3, 4, 5]);
    assert_eq!(page[0].payload, b"\xff\x00binary");
}

#[test]
fn a_resend_on_another_node_is_a_duplicate_and_the_key_is_app_facility_control_id() {
    let Some(pg) = PgCluster::start() else { return };
    let url = pg.create_db("dups");
    let mut node1 = connect(&url);
    let mut node2 = connect(&url);
    let first = node1
        .commit_batch(&[Record::new(message("42"), origin(1, 0))])
        .unwrap();
    let out = node2
        .commit_batch(&[
            Record::new(message("42"), origin(2, 0)),
            Record::new(message("43"), origin(2, 1)),
            Record::new(message("43"), origin(2, 2)),
            Record::new(message_from("OTHER", "HOSP", "42"), origin(2, 3)),
            Record::new(message_from("LAB", "ELSEWHERE", "42"), origin(2, 4)),
            Record::new(
                Bytes::from_static(b"MSH|^~\\&|||||||ORU|77|P|2.5\r"),
                origin(2, 5),
            ),
            Record::new(
                Bytes::from_static(b"MSH|^~\\&|||||||ORU|77|P|2.5\r"),
                origin(2, 6),
            ),
            Record::new(Bytes::from_static(b"PID|no msh\r"), origin(2, 7)),
            Record::new(Bytes::from_static(b"PID|no msh\r"), origin(2, 8)),
        ])
        .unwrap();
    let dup: Vec<_> = out.iter().map(|o| o.duplicate_of).collect();
    assert_eq!(
        dup,
        [
            Some(first[0].id),
            None,
            Some(out[1].id),
            None,
            None,
            None,
            Some(out[5].id), // missing MSH-3/4 match missing
            None,
            None, // no MSH-10: never a duplicate
        ]
    );
    let key = DuplicateKey {
        sending_application: Some("LAB"),
        sending_facility: Some("HOSP"),
        control_id: "42",
    };
    assert_eq!(
        node1.find_original(&key, SystemTime::now()).unwrap(),
        Some(first[0].id)
    );
    let unknown = DuplicateKey {
        control_id: "nope",
        ..key
    };
    assert_eq!(
        node2.find_original(&unknown, SystemTime::now()).unwrap(),
        None
    );

    // The window: an original older than it is not matched; the resend becomes an original.
    let mut short =
        PostgresBackend::connect(&url, &options().duplicate_window(Duration::from_secs(60)))
            .unwrap();
    let old = SystemTime::now() - Duration::from_secs(3600);
    let o = short
        .commit_batch(&[Record::new(
            message("w"),
            Origin {
                received_at: old,
                ..origin(4, 0)
            },
        )])
        .unwrap();
    let again = short
        .commit_batch(&[
            Record::new(message("w"), origin(4, 1)),
            Record::new(message("w"), origin(4, 2)),
        ])
        .unwrap();
    assert_eq!(o[0].duplicate_of, None);
    assert_eq!(again[0].duplicate_of, None);
    assert_eq!(again[1].duplicate_of, Some(again[0].id));
}

/// Two nodes commit the same control ids at the same time, in opposite orders: every key
/// ends with exactly one original, every other copy points at it, and ids are unique and in
/// commit order (each batch's ids are contiguous: batches never interleave).
#[test]
fn racing_nodes_store_one_original_per_key() {
    let Some(pg) = PgCluster::start() else { return };
    let url = pg.create_db("race");
    const KEYS: usize = 200;
    const BATCH: usize = 20;
    let (tx, rx) = mpsc::channel();
    let threads: Vec<_> = (0..2)
        .map(|node| {
            let (url, tx) = (url.clone(), tx.clone());
            std::thread::spawn(move || {
                let mut backend = connect(&url);
                let mut keys: Vec<usize> = (0..KEYS).collect();
                if node == 1 {
                    keys.reverse();
                }
                for chunk in keys.chunks(BATCH) {
                    let batch: Vec<Record> = chunk
                        .iter()
                        .map(|k| Record::new(message(&format!("k{k}")), origin(node, 0)))
                        .collect();
                    let out = backend.commit_batch(&batch).unwrap();
                    let ids: Vec<i64> = out.iter().map(|o| o.id).collect();
                    assert!(ids.windows(2).all(|w| w[0] + 1 == w[1]), "{ids:?}");
                    tx.send(out).unwrap();
                }
            })
        })
        .collect();
    drop(tx);
    for t in threads {
        t.join().unwrap();
    }
    let outcomes: Vec<StoreOutcome> = rx.iter().flatten().collect();
    assert_eq!(outcomes.len(), 2 * KEYS);
    let originals = outcomes.iter().filter(|o| o.duplicate_of.is_none()).count();
    assert_eq!(originals, KEYS);
    // Every duplicate points at an original of the same key.
    let rows = pg.sql(
        "race",
        "SELECT count(*) FROM mllp_messages d JOIN mllp_messages o ON d.duplicate_of = o.id \
         WHERE d.control_id = o.control_id AND o.duplicate_of IS NULL",
    );
    assert_eq!(rows, KEYS.to_string());
    assert_eq!(
        pg.sql(
            "race",
            "SELECT count(DISTINCT id), max(id) FROM mllp_messages"
        ),
        format!("{}|{}", 2 * KEYS, 2 * KEYS)
    );
}

#[test]
fn the_schema_is_created_once_versioned_and_checked() {
    let Some(pg) = PgCluster::start() else { return };
    let url = pg.create_db("schema");

    // A reader never creates anything.
    let e = PostgresBackend::connect_read_only(&url, &options()).unwrap_err();
    assert!(matches!(e, StoreError::NotAStore { .. }), "{e}");
    assert!(e.to_string().contains("has no mllp-reactor tables"), "{e}");

    // Nodes starting together create the schema once.
    let opens: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || connect(&url).location())
        })
        .collect();
    for t in opens {
        t.join().unwrap();
    }
    assert_eq!(
        pg.sql("schema", "SELECT version FROM mllp_store_schema"),
        "1"
    );
    // The duplicate lookup is an index probe, on the control id's index (which search uses
    // too: the older partial index of originals is gone).
    pg.sql(
        "schema",
        "INSERT INTO mllp_messages (received_at_us, peer, local, connection_id, sequence, \
         control_id, size, payload) SELECT g, 'p', 'l', 1, g, 'c' || g, 1, '\\x00' \
         FROM generate_series(1, 5000) g; ANALYZE mllp_messages",
    );
    let plan = pg.sql(
        "schema",
        "EXPLAIN SELECT m.id FROM mllp_messages m WHERE m.control_id = 'c7' \
         AND m.received_at_us >= 0 AND m.duplicate_of IS NULL \
         AND m.sending_application IS NOT DISTINCT FROM NULL ORDER BY m.id LIMIT 1",
    );
    assert!(
        plan.contains("Index Scan using mllp_messages_control_id"),
        "{plan}"
    );

    // A cached id sequence would hand out ids out of commit order across nodes: refused.
    pg.sql(
        "schema",
        "ALTER TABLE mllp_messages ALTER COLUMN id SET CACHE 20",
    );
    let e = PostgresBackend::connect(&url, &options()).unwrap_err();
    assert!(e.to_string().contains("CACHE 20"), "{e}");
    pg.sql(
        "schema",
        "ALTER TABLE mllp_messages ALTER COLUMN id SET CACHE 1",
    );

    // A newer schema: refused, also for readers.
    pg.sql("schema", "UPDATE mllp_store_schema SET version = 99");
    for e in [
        PostgresBackend::connect(&url, &options()).unwrap_err(),
        PostgresBackend::connect_read_only(&url, &options()).unwrap_err(),
    ] {
        assert_one_line(&e);
        assert!(
            matches!(
                e,
                StoreError::UnsupportedVersion {
                    found: 99,
                    supported: 1,
                    ..
                }
            ),
            "{e}"
        );
    }

    // Someone else's `mllp_messages`: refused and left alone.
    let alien = pg.create_db("alien");
    pg.sql(
        "alien",
        "CREATE TABLE mllp_messages (x int); INSERT INTO mllp_messages VALUES (7)",
    );
    let e = PostgresBackend::connect(&alien, &options()).unwrap_err();
    assert!(matches!(e, StoreError::NotAStore { .. }), "{e}");
    assert_eq!(pg.sql("alien", "SELECT x FROM mllp_messages"), "7");
    assert!(pg.psql("alien", "SELECT 1 FROM mllp_store_schema").is_err());

    // Bad URLs and unreachable servers: one-line Open errors without the password.
    let e = PostgresBackend::connect("postgres://u:hunter2@127.0.0.1:1/x", &options()).unwrap_err();
    assert!(matches!(e, StoreError::Open { .. }), "{e}");
    assert_one_line(&e);
    assert!(!e.to_string().contains("hunter2"), "{e}");
    let e = PostgresBackend::connect("postgres://u:hunter2@h/x?bogus=1", &options()).unwrap_err();
    assert!(e.to_string().contains("bad URL"), "{e}");
    assert!(!e.to_string().contains("hunter2"), "{e}");
    let e = PostgresBackend::connect(&pg.url("nosuchdb"), &options()).unwrap_err();
    assert!(e.to_string().contains("nosuchdb"), "{e}");
}

#[test]
fn synchronous_commit_off_is_refused_unless_allowed_and_local_is_accepted() {
    let Some(pg) = PgCluster::start() else { return };
    let url = pg.create_db("sync");
    pg.sql("sync", "ALTER DATABASE sync SET synchronous_commit = off");
    let e = PostgresBackend::connect(&url, &options()).unwrap_err();
    assert_one_line(&e);
    assert!(e.to_string().contains("synchronous_commit=off"), "{e}");
    assert!(e.to_string().contains("--allow-async-commit"), "{e}");
    let backend = PostgresBackend::connect(&url, &options().allow_async_commit(true)).unwrap();
    assert_eq!(backend.synchronous_commit(), "off");
    // Export does not care: it commits nothing.
    assert_eq!(export(&url, 0, Format::Jsonl), "");

    pg.sql("sync", "ALTER DATABASE sync SET synchronous_commit = local");
    assert_eq!(connect(&url).synchronous_commit(), "local");
}

/// The database goes away under a running store: batches fail (never `Ok`) while it is down,
/// and the store recovers by itself once it is back, with nothing acknowledged lost.
#[test]
fn a_store_fails_while_postgres_is_down_and_resumes_after_restart() {
    let Some(pg) = PgCluster::start() else { return };
    let url = pg.create_db("down");
    let store = Store::open_postgres(&url, &options(), StoreConfig::default()).unwrap();
    let submit = |id: &str| {
        let (tx, rx) = mpsc::channel();
        store
            .submit(
                Record::new(message(id), origin(1, 0)),
                Box::new(move |r| {
                    let _ = tx.send(r);
                }),
            )
            .unwrap();
        rx.recv_timeout(WAIT).expect("a completion in time")
    };
    assert!(submit("before").is_ok());
    pg.stop();
    for n in 0..5 {
        let e = submit(&format!("down{n}")).unwrap_err();
        assert_one_line(&e);
        assert!(matches!(e, StoreError::Commit { .. }), "{e}");
    }
    pg.restart();
    // Within the reconnect backoff (at most 2 s) the store is back.
    let deadline = Instant::now() + WAIT;
    let mut after = 0;
    loop {
        match submit(&format!("after{after}")) {
            Ok(_) => break,
            Err(e) => {
                assert!(Instant::now() < deadline, "no recovery: {e}");
                after += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    // Once connected again, a restart while idle costs no error at all (one retry).
    pg.stop();
    pg.restart();
    assert!(submit("idle-restart").is_ok());
    store.close(WAIT).unwrap();
    let ids: Vec<String> = export(&url, 0, Format::Jsonl)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["control_id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(ids, ["before", &format!("after{after}"), "idle-restart"]);
}

#[test]
fn a_store_from_before_the_client_cert_column_gets_it_from_its_first_writer() {
    let Some(pg) = PgCluster::start() else { return };
    let url = pg.create_db("cert");
    drop(connect(&url));
    // As an older build left it: no column, one row.
    pg.sql(
        "cert",
        "ALTER TABLE mllp_messages DROP COLUMN client_cert; \
         INSERT INTO mllp_messages (received_at_us, peer, local, connection_id, sequence, \
         size, payload) VALUES (0, 'p', 'l', 1, 0, 1, '\\x00')",
    );
    // A reader leaves it as it is and reads NULL.
    let mut reader = PostgresBackend::connect_read_only(&url, &options()).unwrap();
    let old = reader.read_after(0, i64::MAX, 10, usize::MAX).unwrap();
    assert_eq!(old.len(), 1);
    assert_eq!(old[0].client_cert, None);
    drop(reader);
    // A writer adds it back; the old row keeps NULL, a new one has the certificate.
    let mut writer = connect(&url);
    let client = util::commit_with_client_cert_after_an_old_row(&mut writer);
    drop(writer);
    assert!(export(&url, 1, Format::Jsonl).contains(&format!("\"client_cert\":\"{client}\"")));
    assert_eq!(pg.sql("cert", "SELECT version FROM mllp_store_schema"), "1");
}

/// `(control_id, duplicate_of)` of every stored record, in id order.
fn stored(pg: &PgCluster, db: &str) -> Vec<(String, Option<i64>)> {
    pg.sql(
        db,
        "SELECT coalesce(control_id, '-'), coalesce(duplicate_of::text, '') FROM mllp_messages ORDER BY id",
    )
    .lines()
    .map(|l| {
        let (ctl, dup) = l.split_once('|').unwrap();
        (ctl.to_owned(), dup.parse().ok())
    })
    .collect()
}

/// Issue 18 defect 6: the connection dies after `COMMIT` was sent and the server committed
/// (only its reply is lost). The batch used to be taken for "nothing committed" and retried:
/// AA, and every record stored twice, a message without MSH-10 with no duplicate mark. Now
/// the backend looks the batch up after reconnecting: committed, so its outcomes stand and
/// each record is stored once. When it cannot look (the database unreachable), the batch
/// fails (AE) with `OutcomeUnknown`, still stored once, and a resend is flagged.
#[test]
fn issue_6_commit_in_flight_when_the_connection_dies_is_never_stored_twice() {
    let Some(pg) = PgCluster::start() else { return };
    let url = pg.create_db("six");
    // Creates the schema directly; the backend under test goes through the proxy.
    drop(connect(&url));
    let upstream = url
        .trim_start_matches("postgres://postgres@")
        .trim_end_matches("/six")
        .parse()
        .unwrap();
    let proxy = CutProxy::start(upstream);
    let mut backend = connect(&format!("postgres://postgres@{}/six", proxy.addr));
    let batch = |ids: [&str; 2]| -> Vec<Record> {
        ids.iter()
            .enumerate()
            .map(|(i, id)| Record::new(message(id), origin(1, i as u64)))
            .collect()
    };

    // The reply to COMMIT is lost, the lookup finds the batch: Ok, stored once.
    proxy.arm();
    let outcomes = backend.commit_batch(&batch(["a", ""])).unwrap();
    assert_eq!(proxy.cuts(), 1, "the COMMIT reply was not cut");
    assert_eq!(outcomes.len(), 2);
    assert_eq!(
        stored(&pg, "six"),
        [("a".to_owned(), None), ("-".to_owned(), None)]
    );

    // Again, and the database cannot be reached to look: AE (OutcomeUnknown), stored once.
    proxy.arm();
    proxy.refuse(true);
    let e = backend.commit_batch(&batch(["b", ""])).unwrap_err();
    assert_eq!(proxy.cuts(), 2, "the COMMIT reply was not cut");
    assert_eq!(e.problem(), Some(&Problem::OutcomeUnknown), "{e}");
    assert_one_line(&e);
    assert_eq!(stored(&pg, "six").len(), 4);

    // The sender resends "b" once the database is back: stored, flagged as a duplicate.
    proxy.refuse(false);
    let deadline = Instant::now() + WAIT;
    let outcome = loop {
        match backend.commit_batch(&[Record::new(message("b"), origin(2, 0))]) {
            Ok(outcomes) => break outcomes[0],
            Err(e) => {
                assert!(Instant::now() < deadline, "no recovery: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    let rows = stored(&pg, "six");
    assert_eq!(rows.len(), 5, "{rows:?}");
    assert_eq!(rows[2].0, "b");
    assert_eq!(
        rows[4],
        ("b".to_owned(), Some(outcome.duplicate_of.unwrap()))
    );
    assert_eq!(outcome.duplicate_of, Some(outcomes[0].id + 2));
}

/// The detail text of every failed message, from the server's observer.
#[derive(Clone, Default)]
struct Failures(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl mllp_reactor::Observer for Failures {
    fn message_exception(&self, e: &mllp_reactor::MessageException<'_>) {
        let detail = e.detail.unwrap_or_default().to_owned();
        self.0.lock().unwrap().push(detail);
    }
}

/// Issue 18 defect 7: the AE a remote sender got for a message the store could not take
/// named the database's user, host, port and database. Now a store failure is a handler
/// failure (`StoreThenAck`): the sender reads the server's generic text, and the details go
/// to the failure event (the operator's log).
#[test]
fn issue_7_database_details_stay_out_of_the_nak() {
    use mllp_reactor::ack::AckCode;
    use mllp_reactor::{Client, ClientConfig, Dispatch, Server};

    let Some(pg) = PgCluster::start() else { return };
    let url = pg.create_db("seven");
    let store = std::sync::Arc::new(
        Store::open_postgres(&url, &options(), StoreConfig::default()).unwrap(),
    );
    let failures = Failures::default();
    let server = Server::builder(mllp_store::StoreThenAck::new(std::sync::Arc::clone(&store)))
        .dispatch(Dispatch::Inline)
        .observer(failures.clone())
        .bind("127.0.0.1:0")
        .unwrap()
        .spawn()
        .unwrap();
    let mut client = Client::connect(server.local_addr(), ClientConfig::default()).unwrap();
    assert_eq!(client.send(&message("up")).unwrap().code, AckCode::AA);
    pg.stop();
    let port = url.rsplit(':').next().unwrap().trim_end_matches("/seven");
    for n in 0..3 {
        let ack = client.send(&message(&format!("down{n}"))).unwrap();
        assert_eq!(ack.code, AckCode::AE, "{ack:?}");
        let wire = String::from_utf8_lossy(&ack.raw).into_owned();
        for secret in ["postgres", "127.0.0.1", port, "seven"] {
            assert!(!wire.contains(secret), "{secret:?} in the NAK: {wire:?}");
        }
    }
    server.shutdown(WAIT).unwrap();
    // Every event is delivered once the server has shut down.
    let details = failures.0.lock().unwrap().clone();
    assert_eq!(details.len(), 3, "{details:?}");
    for detail in &details {
        assert!(detail.starts_with("message not stored: "), "{detail}");
        assert!(!detail.contains('\n'), "{detail}");
    }
    assert!(
        details
            .iter()
            .any(|d| d.contains(&format!("127.0.0.1:{port}/seven"))),
        "the log names the database: {details:?}"
    );
    let _ = store.close(WAIT);
}
