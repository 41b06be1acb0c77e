//! Search and the resend audit on PostgreSQL: the SQLite tests' records, filters and expected
//! ids (`crate::search`), through `search_postgres`; the schema's search column and indexes,
//! also added to a store created before them.

use mllp_store::resend::record_resends_postgres;
use mllp_store::search::{SearchFilter, search_postgres};
use mllp_store::{Backend, Record, StoreError};

use super::{cluster::PgCluster, connect, options};
use crate::search::{
    BENCH_FILTERS, FORWARD_STATE, audits, every_filter_narrows, msg, records, status_follows,
};
use crate::util::{origin, time_searches};

fn ids(url: &str, filter: SearchFilter) -> Vec<i64> {
    search_postgres(url, &filter, &options())
        .unwrap()
        .iter()
        .map(|r| r.id)
        .collect()
}

/// A store holding [`records`] (ids 1..=6).
fn store(pg: &PgCluster, db: &str) -> String {
    let url = pg.create_db(db);
    connect(&url).commit_batch(&records()).unwrap();
    url
}

#[test]
fn every_filter_narrows_newest_first() {
    let Some(pg) = PgCluster::start() else { return };
    let url = store(&pg, "search");
    every_filter_narrows(&|f| ids(&url, f));
    // The payload comes back exactly, as from SQLite.
    let found = search_postgres(&url, &SearchFilter::default().ids(vec![6]), &options()).unwrap();
    assert_eq!(found[0].payload, b"not hl7");

    pg.sql("search", FORWARD_STATE);
    status_follows(&|f| ids(&url, f));
}

/// The two searches the issue times are index probes (PostgreSQL's plan names the index).
#[test]
fn control_id_and_patient_searches_use_their_indexes() {
    let Some(pg) = PgCluster::start() else { return };
    let url = store(&pg, "plan");
    pg.sql(
        "plan",
        "INSERT INTO mllp_messages (received_at_us, peer, local, connection_id, sequence, \
         control_id, patient_id, size, payload) SELECT g, 'p', 'l', 1, g, 'c' || g, 'p' || g, 1, \
         '\\x00' FROM generate_series(1, 20000) g; ANALYZE mllp_messages",
    );
    for (column, index) in [
        ("control_id", "mllp_messages_control_id"),
        ("patient_id", "mllp_messages_patient"),
    ] {
        let plan = pg.sql(
            "plan",
            &format!(
                "EXPLAIN SELECT id FROM mllp_messages WHERE {column} = 'c7' ORDER BY id DESC LIMIT 100"
            ),
        );
        assert!(plan.contains(index), "{plan}");
    }
    assert_eq!(ids(&url, SearchFilter::default().control_id("c7")), [13]);
}

/// A store created before the search column and indexes (and with the foreign key on
/// `duplicate_of` that retention cannot live with): its first writer of this version adds
/// the column and indexes and drops the key; old rows have no patient.
#[test]
fn an_older_store_gets_the_patient_column_and_indexes() {
    let Some(pg) = PgCluster::start() else { return };
    let url = store(&pg, "older");
    pg.sql(
        "older",
        "DROP INDEX mllp_messages_control_id; DROP INDEX mllp_messages_patient; \
         ALTER TABLE mllp_messages DROP COLUMN patient_id; \
         CREATE INDEX mllp_messages_original ON mllp_messages (control_id, received_at_us) \
             WHERE duplicate_of IS NULL AND control_id IS NOT NULL; \
         ALTER TABLE mllp_messages ADD CONSTRAINT mllp_messages_duplicate_of_fkey \
             FOREIGN KEY (duplicate_of) REFERENCES mllp_messages (id)",
    );
    // A reader changes nothing: a search by patient fails, others work.
    let e = search_postgres(&url, &SearchFilter::default().patient("P1"), &options()).unwrap_err();
    assert!(matches!(e, StoreError::Read { .. }), "{e}");
    assert_eq!(ids(&url, SearchFilter::default().control_id("C1")), [5, 1]);

    connect(&url)
        .commit_batch(&[Record::new(
            msg("LAB", "H1", "ORU^R01", "C9", "P1"),
            origin(1, 0),
        )])
        .unwrap();
    assert_eq!(ids(&url, SearchFilter::default().patient("P1")), [7]);
    assert_eq!(
        pg.sql(
            "older",
            "SELECT count(*) FROM pg_indexes WHERE indexname IN \
             ('mllp_messages_control_id', 'mllp_messages_patient'); \
             SELECT count(*) FROM pg_indexes WHERE indexname = 'mllp_messages_original'; \
             SELECT count(*) FROM pg_constraint WHERE contype = 'f' \
             AND conrelid = 'mllp_messages'::regclass"
        ),
        "2\n0\n0"
    );
    assert_eq!(
        pg.sql("older", "SELECT version FROM mllp_store_schema"),
        "1"
    );
}

#[test]
fn resends_are_audited_in_the_store() {
    let Some(pg) = PgCluster::start() else { return };
    let url = store(&pg, "audit");
    let audits = audits();
    // Two at once: the table is created once.
    let racers: Vec<_> = (0..2)
        .map(|_| {
            let (url, audits) = (url.clone(), audits.clone());
            std::thread::spawn(move || record_resends_postgres(&url, &audits, &options()))
        })
        .collect();
    for r in racers {
        r.join().unwrap().unwrap();
    }
    record_resends_postgres(&url, &audits[..1], &options()).unwrap();
    let rows = pg.sql(
        "audit",
        "SELECT message_id, os_user, target, result, coalesce(reason, '-'), \
         resent_at_us > 0 FROM mllp_resend_audit ORDER BY id",
    );
    let rows: Vec<&str> = rows.lines().collect();
    assert_eq!(rows.len(), 5, "{rows:?}");
    assert!(rows.contains(&"1|alice|ehr:2575|AA|lost|t"), "{rows:?}");
    assert!(rows.contains(&"2|alice|ehr:2575|AE: no|-|t"), "{rows:?}");
    // Never creates a store.
    let empty = pg.create_db("empty");
    let e = record_resends_postgres(&empty, &audits, &options()).unwrap_err();
    assert!(matches!(e, StoreError::NotAStore { .. }), "{e}");
    assert!(pg.psql("empty", "SELECT 1 FROM mllp_messages").is_err());
}

/// BENCHMARKS.md "PostgreSQL: search latency": `MLLP_PG_SEARCH_BENCH_ROWS` (default 1 000 000)
/// 1 KiB rows with unique control ids and 100 000 patients, written server-side
/// (`generate_series`, then `ANALYZE`); 50 searches each by control id and by patient through
/// `search_postgres` with a fresh connection each (what `mllp-reactor search` does). Run:
/// `cargo test -p mllp-store --features postgres --test it pg::search::search_bench --
/// --ignored --nocapture`.
#[test]
#[ignore = "a measurement (about a minute, about 1.5 GB of disk), not a check"]
fn search_bench() {
    use std::time::Instant;
    let Some(pg) = PgCluster::start() else { return };
    let url = pg.create_db("big");
    drop(connect(&url));
    let rows: u64 = std::env::var("MLLP_PG_SEARCH_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let fill = Instant::now();
    for chunk in 0..rows.div_ceil(100_000) {
        let (from, to) = (chunk * 100_000 + 1, ((chunk + 1) * 100_000).min(rows));
        pg.sql(
            "big",
            &format!(
                "INSERT INTO mllp_messages (received_at_us, peer, local, connection_id, sequence, \
                 sending_application, sending_facility, message_type, control_id, patient_id, \
                 size, payload) \
                 SELECT g, '10.0.0.1:4000', '10.0.0.2:2575', 1, g, 'LAB', 'H', 'ADT^A01', \
                 'C' || g, 'P' || (g % 100000), 1024, convert_to(repeat(md5(g::text), 32), 'UTF8') \
                 FROM generate_series({from}, {to}) g"
            ),
        );
    }
    pg.sql("big", "VACUUM ANALYZE mllp_messages");
    println!(
        "filled {rows} rows in {:.0} s ({} MB)",
        fill.elapsed().as_secs_f64(),
        pg.sql(
            "big",
            "SELECT pg_total_relation_size('mllp_messages') >> 20"
        )
    );
    for (name, filter) in BENCH_FILTERS {
        let (median, max) = time_searches(rows, 1, |i| {
            !search_postgres(&url, &filter(i), &options())
                .unwrap()
                .is_empty()
        });
        println!(
            "search by {name} on {rows} rows (a fresh connection each, newest 100): median {median:.2} ms, max {max:.2} ms"
        );
    }
}
