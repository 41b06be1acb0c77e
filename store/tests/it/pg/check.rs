//! `check` on PostgreSQL (`check_postgres`): the durability settings a writer refuses are
//! reported (and `fsync=off` refused at connect), and `amcheck` finds a damaged heap page.

use mllp_store::integrity::{CheckDepth, CheckOutcome, check_postgres};
use mllp_store::{Backend, PostgresBackend, Problem, Record};

use super::{cluster::PgCluster, connect, options};
use crate::util::{message, origin};

fn check(url: &str) -> CheckOutcome {
    check_postgres(url, CheckDepth::Full, &options()).unwrap()
}

#[test]
fn fsync_off_is_refused_at_connect_and_reported_by_check() {
    let Some(pg) = PgCluster::start() else { return };
    let url = pg.create_db("fsync");
    drop(connect(&url));
    pg.sql("postgres", "ALTER SYSTEM SET fsync = off");
    pg.sql("postgres", "SELECT pg_reload_conf()");
    let e = PostgresBackend::connect(&url, &options()).unwrap_err();
    assert_eq!(e.problem(), Some(&Problem::FsyncOff), "{e}");
    match check(&url) {
        CheckOutcome::Unsafe(problems) => {
            assert_eq!(problems.len(), 1, "{problems:?}");
            assert!(problems[0].starts_with("fsync=off"), "{problems:?}");
        }
        other => panic!("{other:?}"),
    }
    pg.sql("postgres", "ALTER SYSTEM RESET fsync");
    pg.sql("postgres", "SELECT pg_reload_conf()");
    assert!(matches!(check(&url), CheckOutcome::Unchecked(_)));
}

/// Line pointers of the table's first page overwritten (with the server stopped): `verify_heapam` reports it, and `check` calls the store damaged.
#[test]
fn amcheck_finds_a_damaged_heap_page() {
    let Some(pg) = PgCluster::start() else { return };
    let url = pg.create_db("damaged");
    let batch: Vec<Record> = (0..20)
        .map(|i| Record::new(message(&format!("d{i}")), origin(1, i)))
        .collect();
    connect(&url).commit_batch(&batch).unwrap();
    pg.sql("damaged", "CREATE EXTENSION amcheck; CHECKPOINT");
    assert_eq!(check(&url), CheckOutcome::Ok);

    let file = std::path::Path::new(&pg.sql("damaged", "SHOW data_directory"))
        .join(pg.sql("damaged", "SELECT pg_relation_filepath('mllp_messages')"));
    pg.stop();
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
        // Past the 24-byte page header: the line pointers, each now "normal, at offset
        // 32767, length 0" (outside the page).
        f.seek(SeekFrom::Start(24)).unwrap();
        f.write_all(&[0xff, 0xff, 0x00, 0x00].repeat(16)).unwrap();
    }
    pg.restart();
    match check(&url) {
        CheckOutcome::Damaged(problems) => {
            assert!(
                problems.iter().all(|p| p.starts_with("mllp_messages")),
                "{problems:?}"
            );
        }
        other => panic!("{other:?}"),
    }
}
