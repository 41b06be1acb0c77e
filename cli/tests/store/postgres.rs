//! Store before ACK with `--store postgres://…` (issue 14), against a real PostgreSQL 15 that
//! each test starts for itself: the SIGKILL crash loop, PostgreSQL stopped under load, and
//! the CLI surface (start-up line, export, one-line errors, `--allow-async-commit`).
//! Where PostgreSQL cannot be had, each test fails under `CI=true` and otherwise prints a
//! skip line.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mllp_reactor::ack::AckCode;
use serde_json::Value;

use super::{
    StoreServe, WAIT, client, crash_loop, export_cmd, export_jsonl, message, one_error_line,
};

use mllp_test_support::pg as cluster;

use cluster::PgCluster;

/// The crash loop's budget against PostgreSQL (the SQLite one has its own 20 s).
const PG_CRASH_BUDGET: Duration = Duration::from_secs(10);

#[test]
fn pg_crash_test_every_acked_message_survives_sigkill() {
    let Some(pg) = PgCluster::start() else { return };
    let url = pg.create_db("crash");
    crash_loop(url.as_ref(), PG_CRASH_BUDGET);
}

/// Phases of the database in [`pg_stopped_under_load_no_aa_while_down_and_service_resumes`].
const UP: u8 = 0;
const DOWN: u8 = 1;
const RESTARTING: u8 = 2;

/// PostgreSQL is shut down while 8 connections send: a message sent and answered entirely
/// while it is down gets AE ("message not stored: …"), never AA; after it restarts, every
/// connection gets AA again without restarting `serve`; every AA'd message is stored.
#[test]
fn pg_stopped_under_load_no_aa_while_down_and_service_resumes() {
    let Some(pg) = PgCluster::start() else { return };
    let url = pg.create_db("down");
    let server = StoreServe::start(&url);
    assert!(
        server.stored_to.contains("synchronous_commit=on"),
        "{}",
        server.stored_to
    );
    let addr = server.addr;
    let phase = Arc::new(AtomicU8::new(UP));
    let acked_after_restart = Arc::new(AtomicU64::new(0));
    let acked = Arc::new(AtomicU64::new(0));
    let senders: Vec<_> = (0..8)
        .map(|c| {
            let (phase, acked, after) = (
                Arc::clone(&phase),
                Arc::clone(&acked),
                Arc::clone(&acked_after_restart),
            );
            std::thread::spawn(move || {
                let mut client = client(addr);
                let mut stored = Vec::new();
                let mut refused_while_down = 0u64;
                let mut recovered = false;
                for n in 0.. {
                    let id = format!("c{c}n{n}");
                    let before = phase.load(Ordering::SeqCst);
                    let ack = client.send(&message(&id)).expect("an ACK, AA or AE");
                    let after_ack = phase.load(Ordering::SeqCst);
                    match ack.code {
                        AckCode::AA => {
                            assert!(
                                !(before == DOWN && after_ack == DOWN),
                                "{id} got AA while PostgreSQL was down"
                            );
                            stored.push(id);
                            acked.fetch_add(1, Ordering::SeqCst);
                            if before == RESTARTING {
                                recovered = true;
                                after.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                        AckCode::AE => {
                            assert_eq!(ack.text.as_deref(), Some(super::GENERIC), "{id}");
                            if before == DOWN && after_ack == DOWN {
                                refused_while_down += 1;
                            }
                            // A sender backs off a little before resending.
                            std::thread::sleep(Duration::from_millis(10));
                        }
                        other => panic!("{id}: {other:?}"),
                    }
                    if recovered {
                        break;
                    }
                }
                (stored, refused_while_down)
            })
        })
        .collect();

    let wait_until = |what: &str, done: &dyn Fn() -> bool| {
        let deadline = Instant::now() + WAIT;
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    wait_until("AAs before the stop", &|| {
        acked.load(Ordering::SeqCst) >= 100
    });
    pg.stop();
    phase.store(DOWN, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(500));
    phase.store(RESTARTING, Ordering::SeqCst);
    pg.restart();
    wait_until("every connection to recover", &|| {
        senders.iter().all(|t| t.is_finished())
    });
    let results: Vec<(Vec<String>, u64)> = senders.into_iter().map(|t| t.join().unwrap()).collect();
    let refused: u64 = results.iter().map(|r| r.1).sum();
    assert!(refused > 0, "no message was sent while PostgreSQL was down");

    let exported = export_jsonl(&url);
    let by_id: std::collections::HashMap<&str, &Value> = exported
        .iter()
        .map(|r| (r["control_id"].as_str().unwrap(), r))
        .collect();
    for id in results.iter().flat_map(|r| &r.0) {
        let record = by_id
            .get(id.as_str())
            .unwrap_or_else(|| panic!("{id}: AA but not stored"));
        assert_eq!(
            record["message"].as_str().unwrap().as_bytes(),
            &message(id)[..]
        );
    }
    eprintln!(
        "pg down test: {} AA'd all stored, {refused} AE while down",
        results.iter().map(|r| r.0.len()).sum::<usize>()
    );
    server.kill();
}

#[test]
fn pg_serve_and_export_by_url_with_one_line_errors() {
    let Some(pg) = PgCluster::start() else { return };
    let url = pg.create_db("cli");
    let server = StoreServe::start(&url);
    assert_eq!(server.stored_to, format!("{url} (synchronous_commit=on)"));
    let mut c = client(server.addr);
    for id in ["x1", "x2", "x1"] {
        assert_eq!(c.send(&message(id)).unwrap().code, AckCode::AA);
    }
    let hl7 = export_cmd(&[&url, "--format", "hl7", "--since", "1"]);
    assert!(hl7.status.success());
    let expected = String::from_utf8(message("x2"))
        .unwrap()
        .replace('\r', "\n");
    assert_eq!(
        String::from_utf8(hl7.stdout).unwrap(),
        format!(
            "{expected}\n{}",
            String::from_utf8(message("x1"))
                .unwrap()
                .replace('\r', "\n")
        )
    );
    let records = export_jsonl(&url);
    assert_eq!(records.len(), 3);
    assert_eq!(records[2]["duplicate_of"], records[0]["id"]);
    server.kill();

    // A server that is not there, and a database without a store: one line each.
    let nowhere = "postgres://postgres:secret@127.0.0.1:1/none";
    for out in [
        std::process::Command::new(super::BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--store", nowhere])
            .output()
            .unwrap(),
        export_cmd(&[nowhere]),
    ] {
        let err = one_error_line(&out);
        assert!(
            err.starts_with("error: cannot open store postgres://postgres@127.0.0.1:1/none"),
            "{err}"
        );
        assert!(!err.contains("secret"), "{err}");
    }
    let empty = pg.create_db("empty");
    let err = one_error_line(&export_cmd(&[&empty]));
    assert!(err.contains("has no mllp-reactor tables"), "{err}");

    // synchronous_commit=off: refused at start, unless --allow-async-commit.
    pg.sql("empty", "ALTER DATABASE empty SET synchronous_commit = off");
    let out = std::process::Command::new(super::BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--store", &empty])
        .output()
        .unwrap();
    let err = one_error_line(&out);
    assert!(err.contains("synchronous_commit=off"), "{err}");
    let server = StoreServe::start_with(&empty, &["--allow-async-commit"]);
    assert!(
        server.stored_to.ends_with("(synchronous_commit=off)"),
        "{}",
        server.stored_to
    );
    server.kill();
    let out = std::process::Command::new(super::BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--store",
            "x.db",
            "--allow-async-commit",
        ])
        .output()
        .unwrap();
    assert!(one_error_line(&out).contains("applies only to a PostgreSQL store"));
}
