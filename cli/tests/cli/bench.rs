//! Issue 11 item 1: `bench` calls failure failure.

use std::process::Output;

use mllp_reactor::ack::{self, AckCode};
use mllp_reactor::{Reply, Server, handler_fn};

use crate::util::{run, server, text};

/// `bench --to TO` for 300 ms without warmup, plus `extra`.
fn short_bench(to: &str, extra: &[&str]) -> Output {
    let mut args = vec!["bench", "--to", to, "--duration", "300ms", "--warmup", "0s"];
    args.extend_from_slice(extra);
    run(&args, b"")
}

#[test]
fn bench_exits_non_zero_on_naks_and_counts_only_verified_acks() {
    let naks = server(handler_fn(|msg, _cx| {
        Ok(Reply::Send(ack::nak(msg, AckCode::AE, "no")))
    }));
    let to = naks.local_addr().to_string();
    // 1.2 s: the progress line comes once a second.
    let out = run(
        &[
            "bench",
            "--to",
            &to,
            "--duration",
            "1200ms",
            "--warmup",
            "0s",
        ],
        b"",
    );
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stdout.starts_with("0 msgs in "), "{stdout}");
    assert!(
        stdout.contains("(nak "),
        "the text names the error kinds: {stdout}"
    );
    assert!(
        stderr.contains("] 0 messages acked"),
        "progress counts verified ACKs only: {stderr}"
    );
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: ") && last.contains("errors during the run (nak "),
        "{last}"
    );
    naks.shutdown(crate::util::WAIT).expect("clean stop");
}

#[test]
fn bench_fails_against_a_server_that_rejects_the_size() {
    let small = Server::builder(handler_fn(|msg, _cx| Ok(Reply::Send(ack::accept(msg)))))
        .max_message_size(100)
        .bind("127.0.0.1:0")
        .and_then(Server::spawn)
        .expect("starts");
    let to = small.local_addr().to_string();
    let out = short_bench(&to, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("errors during the run"));
    small.shutdown(crate::util::WAIT).expect("clean stop");
}

#[test]
fn bench_resolves_host_names_and_passes_against_a_good_server() {
    let good = server(handler_fn(|msg, _cx| Ok(Reply::Send(ack::accept(msg)))));
    let to = format!("localhost:{}", good.local_addr().port());
    let out = short_bench(&to, &["--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("one JSON line on stdout");
    assert_eq!(report["errors"], 0);
    good.shutdown(crate::util::WAIT).expect("clean stop");
}

#[test]
fn bench_to_a_bare_port_gets_a_hint() {
    let out = run(&["bench", "--to", "2575", "--duration", "100ms"], b"");
    // Bad usage: exit 2, as documented.
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        text(&out.stderr).trim_end(),
        "error: --to \"2575\" is a port, not an address: give HOST:PORT, e.g. 127.0.0.1:2575"
    );
}

/// Issue 18 ("smaller"): two runs against a storing server store no duplicates: every run
/// has control ids of its own.
#[test]
fn issue_18_control_ids_are_unique_per_run() {
    let dir = crate::util::scratch("bench-ids");
    let store = dir.join("s.db");
    let store = store.to_str().expect("utf-8");
    let serve = crate::util::Serve::start(&["--listen", "127.0.0.1:0", "--store", store], &[]);
    let to = serve.addr.to_string();
    for _ in 0..2 {
        let out = short_bench(&to, &[]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    }
    let (out, _) = serve.stop();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let exported = run(&["export", store], b"");
    let records: Vec<serde_json::Value> = text(&exported.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON"))
        .collect();
    assert!(records.len() > 2, "{} records", records.len());
    let duplicates = records
        .iter()
        .filter(|r| !r["duplicate_of"].is_null())
        .count();
    assert_eq!(duplicates, 0, "of {} records", records.len());
    std::fs::remove_dir_all(dir).ok();
}

/// Issue 18 ("smaller"): Ctrl-C ends a run early and still prints its summary.
#[test]
fn issue_18_ctrl_c_prints_the_summary() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let good = server(handler_fn(|msg, _cx| Ok(Reply::Send(ack::accept(msg)))));
    let mut child = crate::util::bin()
        .args(["bench", "--to", &good.local_addr().to_string()])
        .args(["--duration", "60s", "--warmup", "0s"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starts");
    let mut stderr = BufReader::new(child.stderr.take().expect("piped"));
    // The first progress line (after 1 s) says the run is under way.
    let mut line = String::new();
    stderr.read_line(&mut line).expect("a progress line");
    assert!(line.contains("messages acked"), "{line}");
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
    let out = crate::util::wait_output(child);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    let seconds: f64 = stdout
        .split_once(" msgs in ")
        .and_then(|(_, rest)| rest.split_once('s'))
        .and_then(|(s, _)| s.parse().ok())
        .unwrap_or_else(|| panic!("a summary: {stdout}"));
    assert!(seconds < 30.0, "{stdout}");
    good.shutdown(crate::util::WAIT).expect("clean stop");
}
