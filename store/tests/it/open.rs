//! Opening stores: creation, schema checks, and one typed, one-line error per bad path.

use std::time::Duration;

use mllp_store::{Backend, SqliteBackend, SqliteOptions, StoreError};
use rusqlite::Connection;

use crate::util::TempDir;

fn options() -> SqliteOptions {
    SqliteOptions::default().busy_timeout(Duration::from_millis(200))
}

#[track_caller]
fn assert_one_line(e: &StoreError) {
    let text = e.to_string();
    assert!(!text.contains('\n') && !text.is_empty(), "{text:?}");
    assert!(!text.ends_with('.'), "{text:?}");
}

#[test]
fn open_creates_a_wal_store_with_a_schema_version_and_reopens_it() {
    let dir = TempDir::new("create");
    let path = dir.join("s.db");
    let mut store = SqliteBackend::open(&path, &options()).unwrap();
    assert_eq!(store.last_id().unwrap(), 0);
    assert_eq!(store.location(), format!("sqlite:{}", path.display()));
    drop(store);
    let conn = Connection::open(&path).unwrap();
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    let version: i64 = conn
        .query_row("SELECT version FROM mllp_store_schema", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, mllp_store::sqlite::SCHEMA_VERSION);
    drop(conn);
    SqliteBackend::open(&path, &options()).unwrap();
    SqliteBackend::open_read_only(&path, &options()).unwrap();
}

#[test]
fn an_empty_file_becomes_a_store_for_the_writer_but_not_for_a_reader() {
    let dir = TempDir::new("empty");
    let path = dir.join("empty.db");
    std::fs::write(&path, b"").unwrap();
    let err = SqliteBackend::open_read_only(&path, &options()).unwrap_err();
    assert!(matches!(err, StoreError::NotAStore { .. }), "{err}");
    SqliteBackend::open(&path, &options()).unwrap();
}

#[test]
fn missing_file_is_not_found_for_a_reader() {
    let dir = TempDir::new("missing");
    let err = SqliteBackend::open_read_only(dir.join("nope.db"), &options()).unwrap_err();
    assert!(matches!(err, StoreError::NotFound { .. }), "{err}");
    assert!(
        err.to_string().ends_with("nope.db: no such store file"),
        "{err}"
    );
    assert_one_line(&err);
    // Nothing was created.
    assert!(!dir.join("nope.db").exists());
}

#[test]
fn a_text_file_is_not_a_store_and_stays_unchanged() {
    let dir = TempDir::new("text");
    let path = dir.join("notes.txt");
    let content = b"these are my notes, not a database\n".repeat(50);
    std::fs::write(&path, &content).unwrap();
    for err in [
        SqliteBackend::open(&path, &options()).unwrap_err(),
        SqliteBackend::open_read_only(&path, &options()).unwrap_err(),
    ] {
        assert!(matches!(err, StoreError::NotAStore { .. }), "{err}");
        assert!(
            err.to_string().contains("is not an mllp-reactor store"),
            "{err}"
        );
        assert_one_line(&err);
    }
    assert_eq!(std::fs::read(&path).unwrap(), content);
}

#[test]
fn a_foreign_database_is_refused_and_left_untouched() {
    let dir = TempDir::new("foreign");
    let path = dir.join("other.db");
    let conn = Connection::open(&path).unwrap();
    conn.execute_batch("CREATE TABLE patients (id INTEGER PRIMARY KEY, name TEXT)")
        .unwrap();
    drop(conn);
    let err = SqliteBackend::open(&path, &options()).unwrap_err();
    assert!(matches!(err, StoreError::NotAStore { .. }), "{err}");
    assert_one_line(&err);
    let conn = Connection::open(&path).unwrap();
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "delete", "the foreign database was switched to WAL");
}

#[test]
fn a_newer_schema_is_refused() {
    let dir = TempDir::new("newer");
    let path = dir.join("s.db");
    drop(SqliteBackend::open(&path, &options()).unwrap());
    let conn = Connection::open(&path).unwrap();
    conn.execute("UPDATE mllp_store_schema SET version = 99", [])
        .unwrap();
    drop(conn);
    let err = SqliteBackend::open(&path, &options()).unwrap_err();
    assert!(
        matches!(
            &err,
            StoreError::UnsupportedVersion { path: p, found: 99, supported: 1 } if *p == path
        ),
        "{err:?}"
    );
    assert_one_line(&err);
}

#[test]
fn bad_paths_get_open_errors() {
    let dir = TempDir::new("paths");
    let err = SqliteBackend::open(dir.path(), &options()).unwrap_err();
    assert!(err.to_string().ends_with("it is a directory"), "{err}");
    let err = SqliteBackend::open(dir.join("no/such/dir/s.db"), &options()).unwrap_err();
    assert!(matches!(err, StoreError::Open { .. }), "{err}");
    assert!(err.to_string().contains("does not exist"), "{err}");
    assert_one_line(&err);
}

#[test]
fn a_locked_store_is_a_typed_error() {
    let dir = TempDir::new("locked");
    let path = dir.join("s.db");
    drop(SqliteBackend::open(&path, &options()).unwrap());
    // An exclusive-mode connection in the middle of a write transaction keeps every other
    // connection out, readers included.
    let holder = Connection::open(&path).unwrap();
    holder
        .execute_batch("PRAGMA locking_mode = EXCLUSIVE; BEGIN EXCLUSIVE;")
        .unwrap();
    for err in [
        SqliteBackend::open(&path, &options()).unwrap_err(),
        SqliteBackend::open_read_only(&path, &options()).unwrap_err(),
    ] {
        assert!(matches!(err, StoreError::Locked { .. }), "{err}");
        assert!(
            err.to_string().ends_with("is locked by another connection"),
            "{err}"
        );
    }
    holder.execute_batch("COMMIT").unwrap();
    drop(holder);
    SqliteBackend::open_read_only(&path, &options()).unwrap();
}
