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

/// The schema of version 1 before `client_cert` (issue 18): what older builds created.
const SCHEMA_BEFORE_CLIENT_CERT: &str = "
CREATE TABLE mllp_store_schema (version INTEGER NOT NULL);
INSERT INTO mllp_store_schema (version) VALUES (1);
CREATE TABLE messages (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at_us      INTEGER NOT NULL,
    peer                TEXT NOT NULL,
    local               TEXT NOT NULL,
    connection_id       INTEGER NOT NULL,
    sequence            INTEGER NOT NULL,
    sending_application TEXT,
    sending_facility    TEXT,
    message_type        TEXT,
    control_id          TEXT,
    size                INTEGER NOT NULL,
    duplicate_of        INTEGER REFERENCES messages (id),
    payload             BLOB NOT NULL
);
INSERT INTO messages (received_at_us, peer, local, connection_id, sequence, size, payload)
    VALUES (0, '10.0.0.7:1', '10.0.0.1:2575', 1, 0, 3, x'414243');
PRAGMA journal_mode = WAL;
";

#[test]
fn a_store_from_before_the_client_cert_column_gets_it_from_its_first_writer() {
    let dir = TempDir::new("client-cert-column");
    let path = dir.join("s.db");
    Connection::open(&path)
        .unwrap()
        .execute_batch(SCHEMA_BEFORE_CLIENT_CERT)
        .unwrap();
    // A reader leaves it as it is and reads NULL.
    let mut reader = SqliteBackend::open_read_only(&path, &options()).unwrap();
    let old = reader.read_after(0, i64::MAX, 10, usize::MAX).unwrap();
    assert_eq!(old.len(), 1);
    assert_eq!(old[0].client_cert, None);
    drop(reader);
    // A writer adds the column; the old row keeps NULL, a new one has the certificate.
    let mut writer = SqliteBackend::open(&path, &options()).unwrap();
    crate::util::commit_with_client_cert_after_an_old_row(&mut writer);
    drop(writer);
    // Opening again finds the column there and changes nothing.
    drop(SqliteBackend::open(&path, &options()).unwrap());
    let version: i64 = Connection::open(&path)
        .unwrap()
        .query_row("SELECT version FROM mllp_store_schema", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, 1, "an added column leaves the version as it is");
}
