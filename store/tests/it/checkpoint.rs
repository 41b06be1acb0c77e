//! WAL checkpoints off the commit path (issue 21): the WAL stays near its limit under a long
//! stream of commits, and the checkpointer copies it back into the database meanwhile.

use mllp_store::{Backend, Record, SqliteBackend, SqliteOptions};

use crate::util::{TempDir, message, origin};

/// 4 MiB of WAL limit against about 24 MiB of commits: without the restarts the WAL would
/// hold all of it (automatic checkpoints are off on the writer's connection).
#[test]
fn the_wal_stays_near_its_limit_and_the_database_grows_meanwhile() {
    let dir = TempDir::new("wal-limit");
    let path = dir.join("store.db");
    let limit: u64 = 4 << 20;
    let options = SqliteOptions::default().wal_limit(limit);
    let mut backend = SqliteBackend::open(&path, &options).unwrap();
    let filler = "X".repeat(4_000);
    let mut largest_wal = 0;
    for batch in 0..120u64 {
        let records: Vec<Record> = (0..50)
            .map(|n| {
                let mut bytes = message(&format!("{batch}-{n}")).to_vec();
                bytes.extend_from_slice(format!("NTE|1||{filler}\r").as_bytes());
                Record::new(bytes.into(), origin(1, batch * 50 + n))
            })
            .collect();
        backend.commit_batch(&records).unwrap();
        let wal = std::fs::metadata(dir.join("store.db-wal")).map_or(0, |m| m.len());
        largest_wal = largest_wal.max(wal);
    }
    // A limit's worth, plus the batch that crossed it and those that came while the
    // checkpointer or a restart was busy: far below the ~24 MiB written.
    assert!(largest_wal <= 3 * limit, "largest WAL {largest_wal} B");
    let db = std::fs::metadata(&path).unwrap().len();
    assert!(
        db > 8 << 20,
        "the database file holds {db} B: nothing was checkpointed"
    );
    assert_eq!(backend.last_id().unwrap(), 6_000);
}
