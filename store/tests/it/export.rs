//! Export: id order, `since`, both formats, and reading while a writer commits.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use mllp_store::export::{Export, ExportError, Format, export_sqlite};
use mllp_store::{
    Backend, Origin, Record, SqliteBackend, SqliteOptions, Store, StoreConfig, StoreError,
};
use serde_json::Value;

use crate::util::{TempDir, WAIT, channel, done, message, origin, recv};

fn export(path: &std::path::Path, since: i64, format: Format) -> String {
    let mut out = Vec::new();
    export_sqlite(path, since, format, &SqliteOptions::default(), &mut out).unwrap();
    String::from_utf8(out).unwrap()
}

#[test]
fn jsonl_has_exactly_the_documented_fields() {
    let dir = TempDir::new("jsonl");
    let path = dir.join("s.db");
    let mut b = SqliteBackend::open(&path, &SqliteOptions::default()).unwrap();
    let when = UNIX_EPOCH + Duration::from_micros(1_767_268_800_123_456);
    let o = Origin {
        received_at: when,
        ..origin(3, 0)
    };
    let client = std::sync::Arc::new(mllp_reactor::PeerIdentity::from_der(b"not a certificate"));
    let from_client = Record {
        client_cert: Some(std::sync::Arc::clone(&client)),
        ..Record::new(message("42"), o)
    };
    b.commit_batch(&[
        Record::new(message("42"), o),
        from_client,
        Record::new(Bytes::from_static(b"\xff\x00binary"), o),
    ])
    .unwrap();
    drop(b);
    let text = export(&path, 0, Format::Jsonl);
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    let first = lines[0].as_object().unwrap();
    let keys: Vec<&str> = first.keys().map(String::as_str).collect();
    let mut expected = [
        "id",
        "received_at",
        "peer",
        "local",
        "control_id",
        "message_type",
        "sending_application",
        "sending_facility",
        "client_cert",
        "size",
        "duplicate_of",
        "message",
    ];
    let mut sorted = keys.clone();
    sorted.sort_unstable();
    expected.sort_unstable();
    assert_eq!(sorted, expected);
    assert_eq!(first["id"], 1);
    assert_eq!(first["received_at"], "2026-01-01T12:00:00.123456Z");
    assert_eq!(first["peer"], "10.0.0.7:40003");
    assert_eq!(first["local"], "[::1]:2575");
    assert_eq!(first["control_id"], "42");
    assert_eq!(first["message_type"], "ADT^A01^ADT_A01");
    assert_eq!(first["sending_application"], "LAB");
    assert_eq!(first["sending_facility"], "HOSP");
    assert_eq!(first["size"], message("42").len());
    assert_eq!(first["duplicate_of"], Value::Null);
    assert_eq!(
        first["message"].as_str().unwrap().as_bytes(),
        &message("42")[..]
    );
    assert_eq!(lines[1]["duplicate_of"], 1);
    assert_eq!(first["client_cert"], Value::Null);
    assert_eq!(lines[1]["client_cert"], client.to_string().as_str());
    assert!(
        lines[1]["client_cert"]
            .as_str()
            .unwrap()
            .starts_with("sha256:")
    );
    let binary = lines[2].as_object().unwrap();
    assert!(!binary.contains_key("message"));
    assert_eq!(binary["message_base64"], "/wBiaW5hcnk=");
    assert_eq!(binary["control_id"], Value::Null);
}

#[test]
fn hl7_shows_segments_as_lines_with_a_blank_line_between_messages() {
    let dir = TempDir::new("hl7");
    let path = dir.join("s.db");
    let mut b = SqliteBackend::open(&path, &SqliteOptions::default()).unwrap();
    b.commit_batch(&[
        Record::new(Bytes::from_static(b"MSH|^~\\&|A\rPID|1\r"), origin(1, 0)),
        Record::new(Bytes::from_static(b"MSH|^~\\&|B\rPID|2\r"), origin(1, 1)),
    ])
    .unwrap();
    drop(b);
    assert_eq!(
        export(&path, 0, Format::Hl7),
        "MSH|^~\\&|A\nPID|1\n\nMSH|^~\\&|B\nPID|2\n"
    );
    assert_eq!(export(&path, 1, Format::Hl7), "MSH|^~\\&|B\nPID|2\n");
    assert_eq!(export(&path, 2, Format::Hl7), "");
    assert_eq!("hl7".parse::<Format>(), Ok(Format::Hl7));
    assert!(
        "xml"
            .parse::<Format>()
            .unwrap_err()
            .to_string()
            .contains("use jsonl or hl7")
    );
}

#[test]
fn export_pages_through_many_records_while_a_writer_commits() {
    let dir = TempDir::new("live");
    let path = dir.join("s.db");
    let store =
        Store::open_sqlite(&path, &SqliteOptions::default(), StoreConfig::default()).unwrap();
    let (tx, rx) = channel();
    for i in 0..1_500 {
        store
            .submit(
                Record::new(message(&i.to_string()), origin(1, i)),
                done(&tx),
            )
            .unwrap();
    }
    for _ in 0..1_500 {
        recv(&rx).unwrap();
    }
    // The writer is still open (and keeps committing) while the export reads.
    let reader = SqliteBackend::open_read_only(&path, &SqliteOptions::default()).unwrap();
    let mut export = Export::new(reader, 100).unwrap();
    for i in 1_500..1_600 {
        store
            .submit(
                Record::new(message(&i.to_string()), origin(1, i)),
                done(&tx),
            )
            .unwrap();
    }
    let first = export.next().unwrap().unwrap();
    assert_eq!(first.id, 101);
    let rest: Vec<_> = export.map(Result::unwrap).collect();
    // Stops at the last id committed when it started; ids without gaps, in order.
    assert_eq!(rest.len(), 1_399);
    assert!(rest.windows(2).all(|w| w[1].id == w[0].id + 1));
    for _ in 0..100 {
        recv(&rx).unwrap();
    }
    store.close(WAIT).unwrap();
}

#[test]
fn export_errors_are_typed() {
    let dir = TempDir::new("errors");
    let err = export_sqlite(
        &dir.join("missing.db"),
        0,
        Format::Jsonl,
        &SqliteOptions::default(),
        Vec::new(),
    )
    .unwrap_err();
    assert!(
        matches!(err, ExportError::Store(StoreError::NotFound { .. })),
        "{err}"
    );
    let mut reader = SqliteBackend::open(dir.join("s.db"), &SqliteOptions::default()).unwrap();
    assert_eq!(reader.last_id().unwrap(), 0);
    let _ = SystemTime::now();
}

/// Garbage over half of a store's pages: the export writes every record it can read, in id
/// order, skips the rest in ranges it names, and fails at the end; every id is either
/// exported or inside a range, never both.
#[test]
fn export_goes_on_past_damage_and_names_what_it_skipped() {
    let dir = TempDir::new("export-damaged");
    let path = dir.join("s.db");
    crate::integrity::damaged_store(&path);
    let mut out = Vec::new();
    let err =
        export_sqlite(&path, 0, Format::Jsonl, &SqliteOptions::default(), &mut out).unwrap_err();
    let ExportError::Damaged {
        written,
        unreadable,
    } = err
    else {
        panic!("not Damaged: {err}");
    };
    let ids: Vec<i64> = String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| {
            let rest = l.strip_prefix("{\"id\":").unwrap();
            rest[..rest.find(',').unwrap()].parse().unwrap()
        })
        .collect();
    assert_eq!(ids.len() as u64, written);
    assert!(written > 0, "nothing exported");
    assert!(!unreadable.is_empty());
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "in id order");
    for id in 1..=2000 {
        let exported = ids.binary_search(&id).is_ok();
        let skipped = unreadable.iter().any(|u| u.first <= id && id <= u.last);
        assert!(
            exported != skipped,
            "id {id}: exported {exported}, skipped {skipped}; ranges {:?}",
            unreadable
                .iter()
                .map(|u| (u.first, u.last))
                .collect::<Vec<_>>()
        );
    }
    assert!(unreadable[0].to_string().contains("could not be read"));
}
