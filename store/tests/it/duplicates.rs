//! Resends after a lost ACK: same (MSH-3, MSH-4, MSH-10) within the window is stored and
//! flagged with the original's id.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use mllp_store::{
    Backend, DuplicateKey, Origin, Record, SqliteBackend, SqliteOptions, StoreOutcome,
};

use crate::util::{TempDir, message, message_from, origin};

fn commit(backend: &mut SqliteBackend, records: &[Record]) -> Vec<StoreOutcome> {
    backend.commit_batch(records).unwrap()
}

fn at(payload: Bytes, received_at: SystemTime) -> Record {
    Record::new(
        payload,
        Origin {
            received_at,
            ..origin(1, 0)
        },
    )
}

#[test]
fn a_resend_points_at_the_first_original_also_within_one_batch() {
    let dir = TempDir::new("dups");
    let mut b = SqliteBackend::open(dir.join("s.db"), &SqliteOptions::default()).unwrap();
    let first = commit(&mut b, &[Record::new(message("42"), origin(1, 0))]);
    assert_eq!(first[0].duplicate_of, None);
    let out = commit(
        &mut b,
        &[
            Record::new(message("42"), origin(2, 0)),
            Record::new(message("43"), origin(2, 1)),
            Record::new(message("43"), origin(2, 2)),
            Record::new(message("42"), origin(2, 3)),
        ],
    );
    let dup: Vec<_> = out.iter().map(|o| o.duplicate_of).collect();
    assert_eq!(
        dup,
        [Some(first[0].id), None, Some(out[1].id), Some(first[0].id)]
    );
    let key = DuplicateKey {
        sending_application: Some("LAB"),
        sending_facility: Some("HOSP"),
        control_id: "42",
    };
    assert_eq!(
        b.find_original(&key, SystemTime::now()).unwrap(),
        Some(first[0].id)
    );
}

#[test]
fn the_key_is_application_facility_and_control_id() {
    let dir = TempDir::new("key");
    let mut b = SqliteBackend::open(dir.join("s.db"), &SqliteOptions::default()).unwrap();
    let r = |p: Bytes| Record::new(p, origin(1, 0));
    let out = commit(
        &mut b,
        &[
            r(message_from("LAB", "HOSP", "7")),
            r(message_from("LAB", "OTHER", "7")),
            r(message_from("RAD", "HOSP", "7")),
            r(message_from("", "", "7")),
            r(message_from("", "", "7")),
            // No MSH-10: never a duplicate.
            r(Bytes::from_static(b"MSH|^~\\&|LAB|HOSP\r")),
            r(Bytes::from_static(b"MSH|^~\\&|LAB|HOSP\r")),
            r(Bytes::from_static(b"garbage")),
            r(Bytes::from_static(b"garbage")),
        ],
    );
    let dup: Vec<_> = out.iter().map(|o| o.duplicate_of).collect();
    assert_eq!(
        dup,
        [
            None,
            None,
            None,
            None,
            Some(out[3].id),
            None,
            None,
            None,
            None
        ]
    );
}

#[test]
fn only_originals_within_the_window_count() {
    let dir = TempDir::new("window");
    let options = SqliteOptions::default().duplicate_window(Duration::from_secs(3_600));
    let mut b = SqliteBackend::open(dir.join("s.db"), &options).unwrap();
    let now = SystemTime::now();
    let old = commit(
        &mut b,
        &[at(message("9"), now - Duration::from_secs(7_200))],
    );
    // Two hours later: outside the one-hour window, so a new original.
    let fresh = commit(&mut b, &[at(message("9"), now)]);
    assert_eq!(fresh[0].duplicate_of, None);
    let resend = commit(&mut b, &[at(message("9"), now + Duration::from_secs(60))]);
    assert_eq!(resend[0].duplicate_of, Some(fresh[0].id));
    assert_ne!(fresh[0].id, old[0].id);
}

#[test]
fn the_default_window_is_seven_days() {
    assert_eq!(
        SqliteOptions::default().duplicate_window,
        Duration::from_secs(7 * 24 * 3600)
    );
}
