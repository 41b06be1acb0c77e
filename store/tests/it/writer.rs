//! The `Store` front: group commit, failure of whole batches, recovery, the bounded queue,
//! close, order, and metrics.

use bytes::Bytes;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use mllp_store::fault::{FaultSwitch, FaultyBackend};
use mllp_store::search_index::LAG_MESSAGES;
use mllp_store::telemetry::*;
use mllp_store::{
    Origin, Record, SqliteBackend, SqliteOptions, Store, StoreConfig, StoreError, SubmitError,
};
use rusqlite::Connection;
use std::sync::Arc;

use crate::util::{TempDir, WAIT, channel, done, gated, message, origin, read_all, record, recv};

fn sqlite(dir: &TempDir) -> SqliteBackend {
    SqliteBackend::open(dir.join("s.db"), &SqliteOptions::default()).unwrap()
}

#[test]
fn records_commit_with_increasing_ids_and_all_fields() {
    let dir = TempDir::new("fields");
    let store = Store::start(sqlite(&dir), StoreConfig::default()).unwrap();
    let (tx, rx) = channel();
    let mut payloads = vec![
        message("c1"),
        Bytes::from_static(b"MSH|^~\\&|||||||\r"),
        Bytes::from_static(b"not hl7 at all \xff\xfe"),
    ];
    payloads.push(Bytes::new());
    for (i, payload) in payloads.iter().enumerate() {
        let r = Record::new(payload.clone(), origin(7, i as u64));
        store.submit(r, done(&tx)).unwrap();
    }
    let ids: Vec<i64> = (0..payloads.len()).map(|_| recv(&rx).unwrap().id).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    store.close(WAIT).unwrap();

    let stored = read_all(&dir.join("s.db"));
    assert_eq!(stored.len(), payloads.len());
    let first = &stored[0];
    assert_eq!(first.payload, payloads[0]);
    assert_eq!(first.peer, "10.0.0.7:40007");
    assert_eq!(first.local, "[::1]:2575");
    assert_eq!((first.connection_id, first.sequence), (7, 0));
    assert_eq!(first.sending_application.as_deref(), Some("LAB"));
    assert_eq!(first.sending_facility.as_deref(), Some("HOSP"));
    assert_eq!(first.message_type.as_deref(), Some("ADT^A01^ADT_A01"));
    assert_eq!(first.control_id.as_deref(), Some("c1"));
    assert_eq!(first.size, payloads[0].len() as u64);
    assert_eq!(first.duplicate_of, None);
    // Missing MSH fields and a payload with no MSH are NULL; bytes are kept exactly.
    for r in &stored[1..] {
        assert_eq!(r.control_id, None);
        assert_eq!(r.sending_application, None);
        assert_eq!(r.message_type, None);
    }
    assert_eq!(stored[2].payload, payloads[2]);
    assert_eq!(stored[3].size, 0);
}

#[test]
fn the_batch_grows_while_a_commit_is_in_progress() {
    let dir = TempDir::new("grow");
    let (backend, gate) = gated(sqlite(&dir));
    let store = Store::start(backend, StoreConfig::default()).unwrap();
    let (tx, rx) = channel();
    store.submit(record("first"), done(&tx)).unwrap();
    assert_eq!(gate.wait_entered(), 1);
    for i in 0..50 {
        store.submit(record(&format!("m{i}")), done(&tx)).unwrap();
    }
    assert_eq!(store.queue_len(), 50);
    assert!(store.queued_bytes() > 50 * 60);
    gate.open_one();
    // Everything queued during the first commit goes in one batch.
    assert_eq!(gate.wait_entered(), 50);
    gate.open_one();
    for _ in 0..51 {
        recv(&rx).unwrap();
    }
    drop(gate);
    store.close(WAIT).unwrap();
}

#[test]
fn batches_respect_the_message_and_byte_caps() {
    let dir = TempDir::new("caps");
    let (backend, gate) = gated(sqlite(&dir));
    let size = record("x").size();
    let config = StoreConfig::default()
        .max_batch_messages(4)
        .max_batch_bytes(3 * size);
    let store = Store::start(backend, config).unwrap();
    let (tx, rx) = channel();
    store.submit(record("first"), done(&tx)).unwrap();
    assert_eq!(gate.wait_entered(), 1);
    for i in 0..10 {
        store.submit(record(&format!("{i}")), done(&tx)).unwrap();
    }
    gate.open_one();
    let mut sizes = Vec::new();
    for _ in 0..4 {
        sizes.push(gate.wait_entered());
        gate.open_one();
    }
    // `record("first")` is as large as the others: byte cap 3 wins over message cap 4.
    assert_eq!(sizes, [3, 3, 3, 1]);
    for _ in 0..11 {
        recv(&rx).unwrap();
    }
    drop(gate);
    store.close(WAIT).unwrap();
}

#[test]
fn a_failed_commit_fails_every_record_of_the_batch_and_the_store_recovers() {
    let dir = TempDir::new("fault");
    let switch = FaultSwitch::new();
    let store = Store::start(
        FaultyBackend::new(sqlite(&dir), switch.clone()),
        StoreConfig::default(),
    )
    .unwrap();
    let (tx, rx) = channel();
    switch.fail_commits(true);
    for i in 0..20 {
        store
            .submit(record(&format!("lost{i}")), done(&tx))
            .unwrap();
    }
    for _ in 0..20 {
        let err = recv(&rx).unwrap_err();
        assert_eq!(err.to_string(), "commit failed: injected fault");
    }
    switch.fail_commits(false);
    store.submit(record("kept"), done(&tx)).unwrap();
    assert!(recv(&rx).is_ok());
    store.close(WAIT).unwrap();
    let stored = read_all(&dir.join("s.db"));
    let ids: Vec<_> = stored.iter().map(|r| r.control_id.as_deref()).collect();
    assert_eq!(ids, [Some("kept")]);
    assert!(switch.failed() >= 1);
}

/// A real SQLite failure in the middle of a batch (a trigger that aborts on one record):
/// the whole transaction rolls back, the connection is reopened, later batches commit.
#[test]
fn an_sqlite_error_mid_batch_rolls_back_the_whole_batch() {
    let dir = TempDir::new("rollback");
    let path = dir.join("s.db");
    let (backend, gate) = gated(sqlite(&dir));
    let store = Store::start(backend, StoreConfig::default()).unwrap();
    let conn = Connection::open(&path).unwrap();
    conn.execute_batch(
        "CREATE TRIGGER poison BEFORE INSERT ON messages WHEN NEW.control_id = 'poison'
         BEGIN SELECT RAISE(ABORT, 'poisoned record'); END;",
    )
    .unwrap();
    let (tx, rx) = channel();
    store.submit(record("a"), done(&tx)).unwrap();
    assert_eq!(gate.wait_entered(), 1);
    let (tx2, rx2) = channel();
    for id in ["b", "poison", "c"] {
        store.submit(record(id), done(&tx2)).unwrap();
    }
    gate.open_one();
    assert!(recv(&rx).is_ok());
    assert_eq!(gate.wait_entered(), 3);
    gate.open_one();
    for _ in 0..3 {
        let err = recv(&rx2).unwrap_err();
        assert!(matches!(err, StoreError::Commit { .. }), "{err}");
        assert!(err.to_string().contains("poisoned record"), "{err}");
    }
    conn.execute_batch("DROP TRIGGER poison").unwrap();
    store.submit(record("d"), done(&tx)).unwrap();
    gate.wait_entered();
    gate.open_one();
    assert!(recv(&rx).is_ok());
    drop(gate);
    store.close(WAIT).unwrap();
    let ids: Vec<_> = read_all(&path)
        .into_iter()
        .map(|r| r.control_id.unwrap())
        .collect();
    assert_eq!(ids, ["a", "d"]);
}

#[test]
fn a_full_queue_refuses_without_blocking_and_hands_the_record_back() {
    let dir = TempDir::new("full");
    let (backend, gate) = gated(sqlite(&dir));
    let config = StoreConfig::default().max_queue_messages(2);
    let store = Store::start(backend, config).unwrap();
    let (tx, rx) = channel();
    store.submit(record("in-commit"), done(&tx)).unwrap();
    gate.wait_entered();
    store.submit(record("q1"), done(&tx)).unwrap();
    store.submit(record("q2"), done(&tx)).unwrap();
    assert!(store.is_full_for(1));
    let err = store.submit(record("q3"), done(&tx)).unwrap_err();
    assert_eq!(err.to_string(), "the store's queue is full");
    assert!(matches!(err.reason(), StoreError::QueueFull));
    let SubmitError::Full(back) = err else {
        panic!("expected Full")
    };
    assert_eq!(back.record().header().control_id, Some(&b"q3"[..]));
    gate.open_one();
    gate.wait_entered();
    gate.open_one();
    for _ in 0..3 {
        recv(&rx).unwrap();
    }
    // Room again: the handed-back record goes in.
    let (record, callback) = back.into_parts();
    store.submit(record, callback).unwrap();
    gate.wait_entered();
    gate.open_one();
    recv(&rx).unwrap();
    drop(gate);
    store.close(WAIT).unwrap();
}

#[test]
fn the_byte_cap_refuses_but_an_empty_queue_takes_any_record() {
    let dir = TempDir::new("bytes");
    let (backend, gate) = gated(sqlite(&dir));
    let store = Store::start(backend, StoreConfig::default().max_queue_bytes(100)).unwrap();
    let (tx, rx) = channel();
    store.submit(record("in-commit"), done(&tx)).unwrap();
    gate.wait_entered();
    let big = Record::new(Bytes::from(vec![b'x'; 1_000]), origin(1, 1));
    store.submit(big, done(&tx)).unwrap();
    let err = store
        .submit(
            Record::new(Bytes::from_static(b"y"), origin(1, 2)),
            done(&tx),
        )
        .unwrap_err();
    assert!(matches!(err, SubmitError::Full(_)));
    drop(gate);
    recv(&rx).unwrap();
    recv(&rx).unwrap();
    store.close(WAIT).unwrap();
}

#[test]
fn close_drains_the_queue_then_refuses() {
    let dir = TempDir::new("close");
    let store = Store::start(sqlite(&dir), StoreConfig::default()).unwrap();
    let (tx, rx) = channel();
    for i in 0..500 {
        store.submit(record(&format!("{i}")), done(&tx)).unwrap();
    }
    store.close(WAIT).unwrap();
    for _ in 0..500 {
        assert!(
            rx.try_recv()
                .expect("every callback ran before close returned")
                .is_ok()
        );
    }
    let err = store.submit(record("late"), done(&tx)).unwrap_err();
    assert!(matches!(err, SubmitError::Closed(_)), "{err}");
    assert!(matches!(err.reason(), StoreError::Closed));
    assert_eq!(read_all(&dir.join("s.db")).len(), 500);
    // Closing again is harmless.
    store.close(WAIT).unwrap();
}

#[test]
fn a_panicking_callback_does_not_stop_the_writer() {
    let dir = TempDir::new("panic");
    let store = Store::start(sqlite(&dir), StoreConfig::default()).unwrap();
    store
        .submit(record("boom"), Box::new(|_| panic!("callback panics")))
        .unwrap();
    let (tx, rx) = channel();
    store.submit(record("after"), done(&tx)).unwrap();
    assert!(recv(&rx).is_ok());
    store.close(WAIT).unwrap();
}

#[test]
fn per_connection_order_is_submit_order() {
    let dir = TempDir::new("order");
    let store = Arc::new(Store::start(sqlite(&dir), StoreConfig::default()).unwrap());
    let threads: Vec<_> = (0..4u64)
        .map(|conn| {
            let store = Arc::clone(&store);
            std::thread::spawn(move || {
                let (tx, rx) = channel();
                for seq in 0..300u64 {
                    let r = Record::new(message(&format!("{conn}-{seq}")), origin(conn, seq));
                    store.submit(r, done(&tx)).unwrap();
                }
                for _ in 0..300 {
                    recv(&rx).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    store.close(WAIT).unwrap();
    let stored = read_all(&dir.join("s.db"));
    assert_eq!(stored.len(), 1_200);
    for conn in 0..4u64 {
        let seqs: Vec<u64> = stored
            .iter()
            .filter(|r| r.connection_id == conn)
            .map(|r| r.sequence)
            .collect();
        assert_eq!(seqs, (0..300).collect::<Vec<_>>(), "connection {conn}");
    }
}

#[test]
fn metrics_count_messages_duplicates_errors_and_batches() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let dir = TempDir::new("metrics");
    let switch = FaultSwitch::new();
    let store = metrics::with_local_recorder(&recorder, || {
        Store::start(
            FaultyBackend::new(sqlite(&dir), switch.clone()),
            StoreConfig::default(),
        )
        .unwrap()
    });
    let (tx, rx) = channel();
    for id in ["a", "b", "a"] {
        store.submit(record(id), done(&tx)).unwrap();
        recv(&rx).unwrap();
    }
    switch.fail_next(1);
    store.submit(record("lost"), done(&tx)).unwrap();
    recv(&rx).unwrap_err();
    store.close(WAIT).unwrap();

    let mut seen = Vec::new();
    for (key, unit, description, value) in snapshotter.snapshot().into_vec() {
        let name = key.key().name().to_owned();
        assert!(description.is_some(), "{name} has no description");
        match (name.as_str(), value) {
            (MESSAGES_TOTAL, DebugValue::Counter(n)) => assert_eq!(n, 3),
            (DUPLICATES_TOTAL, DebugValue::Counter(n)) => assert_eq!(n, 1),
            (ERRORS_TOTAL, DebugValue::Counter(n)) => assert_eq!(n, 1),
            (CORRUPTIONS_TOTAL, DebugValue::Counter(n)) => assert_eq!(n, 0),
            (QUEUE_MESSAGES, DebugValue::Gauge(g)) => assert_eq!(g.into_inner(), 0.0),
            // The search index follower's (registered when the SQLite writer opened).
            (LAG_MESSAGES, DebugValue::Gauge(g)) => assert!(g.into_inner() >= 0.0),
            (BATCH_MESSAGES, DebugValue::Histogram(h)) => {
                assert_eq!(h.len(), 4);
                assert!(h.iter().all(|v| v.into_inner() == 1.0));
            }
            (COMMIT_SECONDS, DebugValue::Histogram(h)) => {
                assert_eq!(h.len(), 4);
                assert_eq!(unit, Some(metrics::Unit::Seconds));
            }
            (other, value) => panic!("unexpected metric {other}: {value:?}"),
        }
        seen.push(name);
    }
    seen.sort();
    assert_eq!(seen.len(), 8, "{seen:?}");
}

#[test]
fn zero_caps_are_refused() {
    let dir = TempDir::new("zero");
    let err = Store::start(sqlite(&dir), StoreConfig::default().max_batch_messages(0)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "store option max_batch_messages must be at least 1"
    );
}

/// The writer binds a row's addresses only when they differ from the previous row's: every
/// row still gets its own, in a batch that interleaves connections and listeners and in the
/// batch after it.
#[test]
fn every_row_keeps_its_own_addresses_across_and_within_batches() {
    use mllp_store::Backend;
    let dir = TempDir::new("addresses");
    let mut backend = sqlite(&dir);
    let with_local = |conn: u64, seq: u64, local: &str| {
        Record::new(
            message(&format!("a{conn}-{seq}")),
            Origin {
                local: local.parse().unwrap(),
                ..origin(conn, seq)
            },
        )
    };
    let first = [
        with_local(1, 0, "[::1]:2575"),
        with_local(1, 1, "[::1]:2575"),
        with_local(2, 0, "[::1]:2575"),
        with_local(1, 2, "127.0.0.1:2576"),
        with_local(1, 3, "127.0.0.1:2576"),
    ];
    let second = [
        with_local(1, 4, "127.0.0.1:2576"),
        with_local(3, 0, "[::1]:2575"),
    ];
    backend.commit_batch(&first).unwrap();
    backend.commit_batch(&second).unwrap();
    drop(backend);
    let stored: Vec<(String, String)> = read_all(&dir.join("s.db"))
        .into_iter()
        .map(|r| (r.peer, r.local))
        .collect();
    let want: Vec<(String, String)> = first
        .iter()
        .chain(&second)
        .map(|r| (r.origin.peer.to_string(), r.origin.local.to_string()))
        .collect();
    assert_eq!(stored, want);
    assert_eq!(stored[2].0, "10.0.0.7:40002");
    assert_eq!(stored[3].1, "127.0.0.1:2576");
}

/// A real full disk (a 16 MiB tmpfs): the commit whose WAL frames do not fit fails every
/// record of its batch (the writer gathers a commit's WAL writes and makes them before the
/// WAL's sync, so the failure comes from there now), no record is reported stored that is
/// not, and once space is freed the store commits again.
#[test]
fn a_full_disk_fails_the_commit_and_the_store_commits_again_once_space_is_freed() {
    let Some(fs) = mllp_test_support::tmpfs::Tmpfs::mount("store-full", "16m") else {
        return;
    };
    let path = fs.path().join("s.db");
    let store = Store::start(
        SqliteBackend::open(&path, &SqliteOptions::default()).unwrap(),
        StoreConfig::default(),
    )
    .unwrap();
    let (tx, rx) = channel();
    store.submit(record("first"), done(&tx)).unwrap();
    recv(&rx).unwrap();
    let filler = fs.path().join("filler");
    std::fs::write(&filler, vec![0u8; 12 << 20]).unwrap();
    // 64 KiB records, one at a time, until one fails: ~4 MiB are left.
    let big = |i: usize| {
        let mut bytes = message(&format!("big{i}")).to_vec();
        bytes.extend(std::iter::repeat_n(b'x', 64 << 10));
        Record::new(Bytes::from(bytes), origin(1, i as u64))
    };
    let mut stored = vec!["first".to_owned()];
    let failure = (0..200).find_map(|i| {
        store.submit(big(i), done(&tx)).unwrap();
        match recv(&rx) {
            Ok(_) => {
                stored.push(format!("big{i}"));
                None
            }
            Err(e) => Some(e),
        }
    });
    let failure = failure.expect("a 16 MiB file system took 200 records of 64 KiB");
    assert!(matches!(failure, StoreError::Commit { .. }), "{failure}");
    assert!(failure.to_string().contains("full"), "{failure}");
    std::fs::remove_file(&filler).unwrap();
    store.submit(record("after"), done(&tx)).unwrap();
    recv(&rx).unwrap();
    stored.push("after".to_owned());
    store.close(WAIT).unwrap();
    let ids: Vec<String> = read_all(&path)
        .into_iter()
        .filter_map(|r| r.control_id)
        .collect();
    assert_eq!(ids, stored);
}
