//! Issue 11 items 8 and 9 (`--grace`), and 10 (`--help`): `serve`'s own flags.

use std::net::TcpListener;

use crate::util::{Serve, run, text};

/// A usage error: exit 2, one line on stderr naming `flag`, nothing on stdout (so nothing was
/// listening).
#[track_caller]
fn refused(args: &[&str], flag: &str) {
    let out = run(args, b"");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains(flag), "{args:?}: {stderr}");
    assert_eq!(text(&out.stdout), "");
}

#[test]
fn out_of_range_options_name_the_flag_before_listening() {
    refused(&["serve", "--workers", "100000"], "--workers");
    refused(&["serve", "--workers", "0"], "--workers");
    refused(&["serve", "--max-message-size", "0"], "--max-message-size");
    refused(
        &["serve", "--max-message-size", "2000000000"],
        "--max-message-size",
    );
    refused(&["serve", "--max-connections", "0"], "--max-connections");
    refused(&["serve", "--idle-timeout", "0s"], "--idle-timeout");
    refused(&["serve", "--handler-timeout", "10"], "--handler-timeout");
    refused(&["serve", "--log-format", "xml"], "--log-format");
}

#[test]
fn runtime_errors_are_one_line_naming_the_flag() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let out = run(&["serve", "--listen", &addr], b"");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr).trim_end(),
        format!(
            "error: --listen {addr} is already in use: stop the other server or pick another \
             address"
        )
    );
    let out = run(
        &["serve", "--listen", "127.0.0.1:0", "--metrics", "9102"],
        b"",
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).starts_with("error: --metrics \"9102\" is a port"));
    let out = run(&["serve", "--listen", "2575"], b"");
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).starts_with("error: --listen \"2575\" is a port"));
}

/// Issue 18 ("docs and exit codes"): bad values are bad usage, exit 2 with one line naming
/// the flag, as the README documents; `RUST_LOG` likewise names the variable.
#[test]
fn issue_18_bad_values_exit_2_naming_the_flag() {
    refused(&["serve", "--reactors", "0"], "--reactors");
    refused(&["serve", "--max-memory", "0"], "--max-memory");
    refused(
        &["serve", "--max-memory", "9223372036854775808"],
        "--max-memory",
    );
    refused(&["serve", "--max-memory", "1024"], "--max-message-size");
    refused(&["serve", "--log-level", "verbose"], "--log-level");
    refused(&["serve", "--log-level", "loud"], "\"loud\" is not a level");
    refused(&["send", "--pipeline", "0", "127.0.0.1:9"], "--pipeline");
    refused(&["send", "--timeout", "0s", "127.0.0.1:9"], "--timeout");
    refused(&["bench", "--pipeline", "0"], "--pipeline");
    refused(&["bench", "--conns", "0"], "--conns");
    refused(&["bench", "--duration", "0s"], "--duration");
    refused(
        &["serve", "--proxy-source", "10.0.0.0/8"],
        "--proxy-protocol",
    );
    let out = crate::util::bin()
        .args(["serve", "--listen", "127.0.0.1:0", "--no-store"])
        .env("RUST_LOG", "verbose")
        .output()
        .expect("runs");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.starts_with("error: RUST_LOG: "), "{stderr}");
}

#[test]
fn grace_is_printed_as_typed_and_stop_is_clean() {
    let serve = Serve::start(&["--listen", "127.0.0.1:0", "--grace", "0s"], &[]);
    let (out, stdout) = serve.stop();
    assert_eq!(out.status.code(), Some(0));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("grace=0s"), "{stderr}");
    assert!(!stderr.contains("0ns"), "{stderr}");
    assert_eq!(
        stdout.last().map(String::as_str),
        Some("stopped: 0 connections closed, 0 with a message in flight finished, 0 forced")
    );
}

#[test]
fn help_shows_duration_formats_and_every_flag() {
    let out = run(&["serve", "--help"], b"");
    assert_eq!(out.status.code(), Some(0));
    let help = text(&out.stdout);
    assert!(help.contains("500ms, 60s, 5m"), "{help}");
    for flag in [
        "--config",
        "--listen",
        "--idle-timeout",
        "--handler-timeout",
        "--frame-timeout",
        "--max-message-size",
        "--max-connections",
        "--workers",
        "--metrics",
        "--grace",
        "--log-format",
        "--log-level",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
    }
}

/// Issue 18 ("smaller"): the start line names the store, the reactors, TLS, the allow-list
/// and PROXY.
#[test]
fn issue_18_the_start_line_names_store_reactors_tls_allow_and_proxy() {
    let serve = Serve::start(
        &[
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--reactors",
            "2",
            "--allow",
            "127.0.0.0/8",
            "--allow",
            "::1/128",
            "--proxy-protocol",
            "v2",
            "--proxy-source",
            "10.1.0.0/16",
        ],
        &[],
    );
    let (out, _) = serve.stop();
    let started = crate::util::start_line(&text(&out.stderr));
    assert_eq!(started["store"], "none (--no-store)", "{started}");
    assert_eq!(started["reactors"], 2, "{started}");
    assert_eq!(started["tls"], "off", "{started}");
    assert_eq!(started["allow"], "127.0.0.0/8,::1/128", "{started}");
    assert_eq!(started["proxy_protocol"], "v2", "{started}");
    assert_eq!(started["proxy_sources"], "10.1.0.0/16", "{started}");
}

/// Issue 18 ("smaller"): the first SIGTERM drains; a second one stops at once, even while a
/// message is still with the store (here: its commit waits on a lock the test holds, for the
/// store's 5 s busy timeout, with a 60 s grace).
#[test]
fn issue_18_a_second_signal_stops_at_once() {
    use std::process::Command;
    use std::time::Duration;

    let dir = crate::util::scratch("second-signal");
    let store = dir.join("s.db");
    let serve = Serve::start(
        &[
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
            "--grace",
            "60s",
            "--store",
            store.to_str().expect("utf-8"),
        ],
        &[],
    );
    // The store's write lock, held until the server is gone: the commit cannot finish.
    let (holder, peer) = crate::util::send_while_the_store_is_locked(
        serve.addr,
        serve.metrics.expect("--metrics given"),
        &store,
        "S1",
    );
    let pid = serve.pid().to_string();
    let status = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill runs");
    assert!(status.success());
    // Two signals of one kind that arrive before the first is handled are one signal: give
    // the first time to start the drain (the commit still waits seconds on the lock).
    std::thread::sleep(Duration::from_millis(500));
    let (out, _) = serve.stop(); // the second SIGTERM
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(128 + 15), "{stderr}");
    assert!(stderr.contains("SIGTERM: stopping at once"), "{stderr}");
    drop((peer, holder));
    std::fs::remove_dir_all(dir).ok();
}

/// Issue 18 defect 1: a PROXY header from anyone let anyone past `--allow`; the balancers
/// must be named (`0.0.0.0/0` to trust all, on purpose).
#[test]
fn issue_1_proxy_protocol_needs_proxy_source() {
    refused(
        &[
            "serve",
            "--no-store",
            "--proxy-protocol",
            "v1",
            "--allow",
            "10.9.9.9/32",
        ],
        "--proxy-source",
    );
    refused(
        &["serve", "--no-store", "--proxy-source", "127.0.0.0/8"],
        "--proxy-protocol",
    );
}
