//! Issue 11 item 9: `serve` logs through the observer, human-readable or JSON, filtered by
//! `--log-level` or `RUST_LOG`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use mllp_reactor::{Client, ClientConfig};

use crate::util::{Serve, WAIT, message, text};

/// One accepted message, one garbage frame (AR), one oversize frame with a readable MSH-10
/// (AR, close); each on its own connection, each connection closed by us or the server.
fn traffic(addr: SocketAddr) {
    let mut client = Client::connect(addr, ClientConfig::default()).expect("connects");
    let ack = client
        .send(message("LOG1").replace('\n', "\r").as_bytes())
        .expect("an ACK");
    assert!(ack.is_accept());
    drop(client);
    for payload in [
        b"PID|1||123\r".to_vec(),
        [message("BIG1").replace('\n', "\r").as_bytes(), &[b'x'; 400]].concat(),
    ] {
        let mut peer = TcpStream::connect(addr).expect("connects");
        peer.set_read_timeout(Some(WAIT)).expect("timeout");
        peer.write_all(&[&b"\x0b"[..], &payload, b"\x1c\r"].concat())
            .expect("written");
        let mut reply = [0u8; 1024];
        let n = peer.read(&mut reply).expect("a NAK");
        assert!(reply[..n].windows(7).any(|w| w == b"MSA|AR|"));
    }
}

#[track_caller]
fn run_logged(args: &[&str], env: &[(&str, &str)]) -> String {
    let mut all = vec![
        "--listen",
        "127.0.0.1:0",
        "--max-message-size",
        "200",
        "--grace",
        "1s",
    ];
    all.extend_from_slice(args);
    let serve = Serve::start(&all, env);
    traffic(serve.addr);
    // The server logs a close when it sees it; give the last one a moment to land before
    // SIGTERM (a drain closes nothing that is already gone, so waiting is not needed for
    // correctness, only to keep the log complete).
    std::thread::sleep(Duration::from_millis(200));
    let (out, _) = serve.stop();
    assert_eq!(out.status.code(), Some(0));
    text(&out.stderr)
}

#[test]
fn human_logs_show_connections_naks_and_failures() {
    let log = run_logged(&[], &[]);
    let line = |needle: &str| {
        log.lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?} in\n{log}"))
    };
    assert!(line("server started").contains(" INFO mllp::server: "));
    let opened = line("connection opened");
    assert!(opened.contains(" INFO mllp::conn: ") && opened.contains("peer=127.0.0.1:"));
    let closed = line("reason=\"peer_closed\"");
    assert!(closed.contains("connection closed") && closed.contains(" duration="));
    let rejected = line("message rejected");
    assert!(rejected.contains(" WARN mllp::msg: ") && rejected.contains("code=\"AR\""));
    let failed = line("message failed");
    assert!(failed.contains("reason=\"message_too_large\""), "{failed}");
    assert!(line("connection closed conn=").contains("peer="));
    assert!(log.contains("reason=\"message_too_large\"") && log.contains("draining"));
    // Per-message logging is off by default.
    assert!(!log.contains("message received"), "{log}");
}

#[test]
fn json_logs_are_one_object_per_line() {
    let log = run_logged(&["--log-format", "json", "--log-level", "debug"], &[]);
    let events: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect();
    let find = |message: &str| {
        events
            .iter()
            .find(|e| e["message"] == message)
            .unwrap_or_else(|| panic!("no {message:?} in {log}"))
    };
    let opened = find("connection opened");
    assert_eq!(opened["level"], "INFO");
    assert_eq!(opened["target"], "mllp::conn");
    assert!(
        opened["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("127.0.0.1:"))
    );
    let closed = find("connection closed");
    assert!(closed["duration"].is_string() && closed["reason"].is_string());
    assert_eq!(find("message rejected")["level"], "WARN");
    assert_eq!(find("message failed")["reason"], "message_too_large");
    // debug: every message.
    assert_eq!(find("message received")["level"], "DEBUG");
    assert!(find("message answered")["response_size"].is_u64());
    assert!(find("server started")["grace"] == "1s");
}

#[test]
fn rust_log_sets_the_level_and_the_flag_wins_over_it() {
    let log = run_logged(&[], &[("RUST_LOG", "warn")]);
    assert!(!log.contains("connection opened"), "{log}");
    assert!(log.contains("message rejected"), "{log}");
    let log = run_logged(&["--log-level", "info"], &[("RUST_LOG", "warn")]);
    assert!(log.contains("connection opened"), "{log}");
    let log = run_logged(&[], &[("RUST_LOG", "warn,mllp::conn=info")]);
    assert!(
        log.contains("connection opened") && !log.contains("server started"),
        "{log}"
    );
}

/// Issue 18: in the default (storing) mode, an AR for a message without MSH-10 is logged as
/// `--no-store`'s ARs are (`message rejected`, code, reason), and the AE for a failed commit
/// as a failed message with the store's error.
#[test]
fn issue_18_naks_are_logged_in_the_storing_mode() {
    let dir = crate::util::scratch("storing-naks");
    let store = dir.join("s.db");
    let serve = Serve::start(
        &[
            "--listen",
            "127.0.0.1:0",
            "--store",
            store.to_str().expect("utf-8"),
            "--log-format",
            "json",
        ],
        &[],
    );
    // No MSH-10: stored, then AR (raw: the library's client refuses to send it).
    let mut peer = TcpStream::connect(serve.addr).expect("connects");
    peer.set_read_timeout(Some(WAIT)).expect("timeout");
    peer.write_all(b"\x0bMSH|^~\\&|LAB|H|EHR|H|20260101||ADT^A01||P|2.5.1\rPID|1\r\x1c\r")
        .expect("written");
    let mut reply = [0u8; 1024];
    let n = peer.read(&mut reply).expect("a NAK");
    assert!(reply[..n].windows(7).any(|w| w == b"MSA|AR|"));
    drop(peer);
    let mut client = Client::connect(serve.addr, ClientConfig::default()).expect("connects");
    // A commit that fails: the store file may not grow (RLIMIT_FSIZE; root ignores
    // permissions, so they cannot be used).
    let limited = std::process::Command::new("prlimit")
        .args(["--pid", &serve.pid().to_string(), "--fsize=1:unlimited"])
        .status()
        .is_ok_and(|s| s.success());
    if limited {
        let ack = client
            .send(message("FAIL1").replace('\n', "\r").as_bytes())
            .expect("an ACK");
        assert_eq!(ack.code.as_str(), "AE");
    } else {
        mllp_test_support::unavailable(
            "prlimit (util-linux)",
            "the commit failure part is skipped",
        );
    }
    drop(client);
    let (out, _) = serve.stop();
    let log = text(&out.stderr);
    let rejected: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| l.contains("message rejected"))
        .map(|l| serde_json::from_str(l).expect("JSON"))
        .collect();
    assert_eq!(rejected[0]["code"], "AR", "{log}");
    assert_eq!(rejected[0]["reason"], "no MSH-10", "{log}");
    assert_eq!(rejected[0]["level"], "WARN", "{log}");
    assert_eq!(rejected.len(), 1, "{log}");
    if limited {
        // The failed commit reaches the server as a handler failure: its observer logs it.
        let failed: serde_json::Value = log
            .lines()
            .find(|l| l.contains("message failed"))
            .map(|l| serde_json::from_str(l).expect("JSON"))
            .unwrap_or_else(|| panic!("no failed message in {log}"));
        assert_eq!(failed["level"], "WARN", "{log}");
        assert_eq!(failed["control_id"], "FAIL1", "{log}");
        assert!(
            failed["detail"]
                .as_str()
                .is_some_and(|d| d.starts_with("message not stored: ")),
            "{log}"
        );
    }
    std::fs::remove_dir_all(dir).ok();
}

/// Issue 18: health probes (connect, then close or reset, no bytes; or only a PROXY LOCAL
/// header) are logged at debug level, never as a warning per probe; a connection that sends
/// a message is still logged at info.
#[test]
fn issue_18_health_probes_are_logged_at_debug_only() {
    let serve = Serve::start(
        &[
            "--listen",
            "127.0.0.1:0",
            "--proxy-protocol",
            "v2",
            "--proxy-source",
            "127.0.0.0/8",
        ],
        &[],
    );
    // A close (FIN).
    drop(TcpStream::connect(serve.addr).expect("connects"));
    // A reset, as HAProxy ends its checks.
    let reset = TcpStream::connect(serve.addr).expect("connects");
    socket2::SockRef::from(&reset)
        .set_linger(Some(Duration::ZERO))
        .expect("SO_LINGER");
    drop(reset);
    // A PROXY v2 LOCAL header and nothing after it (HAProxy's check-send-proxy).
    let mut local = TcpStream::connect(serve.addr).expect("connects");
    local
        .write_all(b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00")
        .expect("written");
    drop(local);
    // And one real client, which is logged (its close, too, must have been seen by the end).
    let mut client = TcpStream::connect(serve.addr).expect("connects");
    let me = client.local_addr().expect("addr");
    let header = [
        &b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c"[..],
        &[127, 0, 0, 1, 127, 0, 0, 1],
        &me.port().to_be_bytes(),
        &serve.addr.port().to_be_bytes(),
    ]
    .concat();
    client.write_all(&header).expect("header");
    client
        .write_all(format!("\x0b{}\x1c\r", message("PROBE1").replace('\n', "\r")).as_bytes())
        .expect("message");
    client.set_read_timeout(Some(WAIT)).expect("timeout");
    let mut reply = [0u8; 512];
    assert!(client.read(&mut reply).expect("an ACK") > 0);
    drop(client);
    let (out, _) = serve.stop();
    let log = text(&out.stderr);
    assert!(!log.contains(" WARN "), "{log}");
    let opened: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("connection opened"))
        .collect();
    assert_eq!(opened.len(), 1, "{log}");
    assert!(opened[0].contains(&format!("peer={me}")), "{log}");
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("connection closed"))
            .count(),
        1,
        "only the client's close is above debug: {log}"
    );
}
