//! `prune`, `search`, `resend` and `check` on a `postgres://` store that `serve` filled: the
//! SQLite tests' checks (`store_admin`), plus the resend audit rows and what `check` reports
//! on PostgreSQL. Each test starts its own PostgreSQL (`mllp_test_support::pg`); where it
//! cannot be had, the test fails under `CI=true` and otherwise prints a skip line.

use mllp_test_support::pg::PgCluster;

use crate::store_admin::{HealthServe, fill, prune_cycle, resend_cycle, search_cycle};
use crate::util::{run, text};

#[test]
fn pg_prune_dry_run_counts_and_prune_removes() {
    let Some(pg) = PgCluster::start() else { return };
    prune_cycle(&pg.create_db("prune"));
}

#[test]
fn pg_search_finds_by_control_id_in_every_format() {
    let Some(pg) = PgCluster::start() else { return };
    search_cycle(&pg.create_db("search"));
}

#[test]
fn pg_resend_checks_every_ack_and_records_each_resend() {
    let Some(pg) = PgCluster::start() else { return };
    resend_cycle(&pg.create_db("resend"));
    let audit = pg.sql(
        "resend",
        "SELECT message_id, result, coalesce(reason, '-'), os_user <> '' \
         FROM mllp_resend_audit ORDER BY id",
    );
    assert_eq!(
        audit,
        "1|AA|EHR lost them|t\n3|AA|EHR lost them|t\n2|AE: not today|-|t"
    );
}

/// `check URL`: the schema and settings, and amcheck once the database has it; `fsync=off`
/// or `synchronous_commit=off` fail it (exit 1, each problem on stdout).
#[test]
fn pg_check_reports_settings_and_runs_amcheck() {
    let Some(pg) = PgCluster::start() else { return };
    let url = pg.create_db("checked");
    let ids: Vec<String> = (0..50).map(|i| format!("c{i}")).collect();
    fill(&url, &ids.iter().map(String::as_str).collect::<Vec<_>>());

    let unchecked = run(&["check", &url], b"");
    assert!(unchecked.status.success(), "{}", text(&unchecked.stderr));
    assert!(
        text(&unchecked.stdout).contains("not checked")
            && text(&unchecked.stdout).contains("amcheck"),
        "{}",
        text(&unchecked.stdout)
    );
    let quick = run(&["check", &url, "--quick"], b"");
    assert_eq!(text(&quick.stdout), "ok\n", "{}", text(&quick.stderr));

    pg.sql("checked", "CREATE EXTENSION amcheck");
    let ok = run(&["check", &url], b"");
    assert!(ok.status.success(), "{}", text(&ok.stderr));
    assert_eq!(text(&ok.stdout), "ok\n");

    pg.sql(
        "checked",
        "ALTER DATABASE checked SET synchronous_commit = off",
    );
    let off = run(&["check", &url], b"");
    assert_eq!(off.status.code(), Some(1), "{}", text(&off.stdout));
    assert!(
        text(&off.stdout).contains("synchronous_commit=off"),
        "{}",
        text(&off.stdout)
    );
    assert_eq!(
        text(&off.stderr).lines().count(),
        1,
        "{}",
        text(&off.stderr)
    );

    let empty = pg.create_db("empty");
    let none = run(&["check", &empty], b"");
    assert_eq!(none.status.code(), Some(1));
    assert!(
        text(&none.stderr).contains("no mllp-reactor tables"),
        "{}",
        text(&none.stderr)
    );
}

/// `/readyz` turns 503 ("not connected") while PostgreSQL is down, with no traffic at all,
/// and 200 again once it is back; `/healthz` stays 200 (the writer is alive).
#[test]
fn pg_readyz_is_503_while_postgres_is_down() {
    let Some(pg) = PgCluster::start() else { return };
    let url = pg.create_db("readyz");
    let serve = HealthServe::start(&url, &["--min-free-disk", "0"]);
    assert_eq!(serve.get("/readyz").0, 200);
    pg.stop();
    let body = serve.await_status("/readyz", 503);
    assert!(
        body.contains(r#""reason":"store""#) && body.contains("not connected"),
        "{body}"
    );
    assert_eq!(serve.get("/healthz").0, 200);
    pg.restart();
    serve.await_status("/readyz", 200);
}
