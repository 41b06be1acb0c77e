//! `Store::health` and the check that the SQLite file is still the path's (issue 18 defect 10).

use std::sync::{Arc, Mutex};

use mllp_store::fault::{FaultSwitch, FaultyBackend};
use mllp_store::{
    Health, Problem, SqliteBackend, SqliteOptions, Store, StoreConfig, StoreError, StoreOutcome,
};

use crate::util::{TempDir, WAIT, channel, done, record, recv};

/// A health change the store reported, with its error's text.
type Change = (Health, Option<String>);

/// Every health change the store reported.
#[derive(Clone, Default)]
struct Changes(Arc<Mutex<Vec<Change>>>);

impl Changes {
    fn watch(&self, store: &Store) {
        let changes = self.clone();
        store.on_health_change(move |health, error| {
            changes
                .0
                .lock()
                .unwrap()
                .push((health, error.map(ToString::to_string)));
        });
    }

    fn healths(&self) -> Vec<Health> {
        self.0.lock().unwrap().iter().map(|(h, _)| *h).collect()
    }
}

fn submit(store: &Store, id: &str) -> Result<StoreOutcome, StoreError> {
    let (tx, rx) = channel();
    store.submit(record(id), done(&tx)).unwrap();
    recv(&rx)
}

#[track_caller]
fn assert_replaced(result: Result<StoreOutcome, StoreError>) {
    let e = result.expect_err("a commit into a file that is no longer the path's");
    assert_eq!(e.problem(), Some(&Problem::FileReplaced), "{e}");
    assert!(!e.to_string().contains('\n'));
}

/// Issue 18 defect 10: the store file is deleted under a running store. Messages used to be
/// acknowledged into the unlinked file and were gone after the stop; now the first commit
/// after the deletion fails (AE), and so does every later one, and the store reports itself
/// broken (what `/readyz` reads), once, through its watcher (the server's error log line).
#[test]
fn issue_10_a_deleted_store_file_fails_commits_and_turns_health_broken() {
    let dir = TempDir::new("deleted");
    let path = dir.join("s.db");
    let store =
        Store::open_sqlite(&path, &SqliteOptions::default(), StoreConfig::default()).unwrap();
    let changes = Changes::default();
    changes.watch(&store);
    assert_eq!(store.health(), Health::Ok);
    submit(&store, "before").unwrap();

    std::fs::remove_file(&path).unwrap();
    for id in ["gone1", "gone2", "gone3"] {
        assert_replaced(submit(&store, id));
        assert_eq!(store.health(), Health::Broken);
        assert!(!store.health().is_ready());
    }
    store.close(WAIT).unwrap();
    assert_eq!(
        changes.healths(),
        [Health::Broken],
        "one report, not one per batch"
    );
    let (_, error) = &changes.0.lock().unwrap()[0];
    assert!(
        error.as_deref().unwrap().contains("deleted or replaced"),
        "{error:?}"
    );
    // Nothing was recreated at the path behind the operator's back.
    assert!(!path.exists());
}

/// The same when another file is moved over the store's path.
#[test]
fn issue_10_a_replaced_store_file_fails_commits() {
    let dir = TempDir::new("replaced");
    let path = dir.join("s.db");
    let other = dir.join("other.db");
    drop(SqliteBackend::open(&other, &SqliteOptions::default()).unwrap());
    let store =
        Store::open_sqlite(&path, &SqliteOptions::default(), StoreConfig::default()).unwrap();
    submit(&store, "before").unwrap();
    std::fs::rename(&other, &path).unwrap();
    assert_replaced(submit(&store, "lost"));
    assert_eq!(store.health(), Health::Broken);
    submit(&store, "lost2").unwrap_err();
    store.close(WAIT).unwrap();
}

/// A failing store is `Failing` until a batch commits again; each change is reported once.
#[test]
fn health_follows_failing_and_recovering_commits() {
    let dir = TempDir::new("failing");
    let switch = FaultSwitch::new();
    let backend = SqliteBackend::open(dir.join("s.db"), &SqliteOptions::default()).unwrap();
    let store = Store::start(
        FaultyBackend::new(backend, switch.clone()),
        StoreConfig::default(),
    )
    .unwrap();
    let changes = Changes::default();
    changes.watch(&store);
    submit(&store, "ok").unwrap();
    switch.fail_commits(true);
    submit(&store, "f1").unwrap_err();
    assert_eq!(store.health(), Health::Failing);
    submit(&store, "f2").unwrap_err();
    switch.fail_commits(false);
    submit(&store, "ok2").unwrap();
    assert_eq!(store.health(), Health::Ok);
    store.close(WAIT).unwrap();
    assert_eq!(changes.healths(), [Health::Failing, Health::Ok]);
}
