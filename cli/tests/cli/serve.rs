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
        &["serve", "--listen", "127.0.0.1:0", "--log-level", "loud"],
        b"",
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with("error: --log-level: \"loud\" is not a level"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1);
    let out = run(
        &["serve", "--listen", "127.0.0.1:0", "--metrics", "9102"],
        b"",
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).starts_with("error: --metrics \"9102\" is a port"));
    let out = run(&["serve", "--listen", "2575"], b"");
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).starts_with("error: --listen \"2575\" is a port"));
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
