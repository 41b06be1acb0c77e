//! Issue 11 item 6: `send` names the file and the message, reads framed captures, resolves host
//! names, and prints every ACK it got before an error.

use std::path::Path;

use mllp_reactor::ack::{self, AckCode};
use mllp_reactor::{Reply, handler_fn};

use crate::util::{message, run, scratch, server, text};

/// An AA server that closes the connection instead of answering its second message.
fn closes_on_second() -> mllp_reactor::ServerHandle {
    server(handler_fn(|msg, cx| {
        Ok(if cx.sequence() == 1 {
            Reply::Close
        } else {
            Reply::Send(ack::accept(msg))
        })
    }))
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("writable");
    path.to_str().expect("utf-8 path").to_owned()
}

#[test]
fn framed_captures_are_sent_as_they_are() {
    let good = server(handler_fn(|msg, _cx| Ok(Reply::Send(ack::accept(msg)))));
    let dir = scratch("framed");
    let capture: Vec<u8> = ["A1", "A2"]
        .iter()
        .flat_map(|id| {
            let payload = message(id).replace('\n', "\r");
            [&b"\x0b"[..], payload.as_bytes(), b"\x1c\r\n"].concat()
        })
        .collect();
    let file = write(&dir, "capture.mllp", &capture);
    let out = run(&["send", &good.local_addr().to_string(), &file], b"");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "AA A1\nAA A2\n");
    good.shutdown(crate::util::WAIT).expect("clean stop");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn acks_before_an_error_are_printed_and_the_error_names_the_failed_message() {
    let server = closes_on_second();
    let dir = scratch("midbatch");
    let file = write(
        &dir,
        "three.hl7",
        [message("M1"), message("M2"), message("M3")]
            .concat()
            .as_bytes(),
    );
    let out = run(
        &[
            "send",
            &server.local_addr().to_string(),
            &file,
            "--pipeline",
            "1",
        ],
        b"",
    );
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stdout), "AA M1\n");
    let stderr = text(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with(&format!("error: {file}: message 2: ")),
        "{stderr}"
    );
    server.shutdown(crate::util::WAIT).expect("clean stop");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn unreadable_messages_are_refused_before_sending_with_file_and_position() {
    let dir = scratch("refused");
    let no_id = write(
        &dir,
        "no-id.hl7",
        [message("OK1"), message("")].concat().as_bytes(),
    );
    // Nothing listens there: the check comes before connecting.
    let out = run(&["send", "127.0.0.1:9", &no_id], b"");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr).trim_end(),
        format!(
            "error: {no_id}: message 2: MSH-10 (message control id) is empty or missing; \
             its ACK could not be matched to it"
        )
    );
    let pid = write(&dir, "pid.hl7", b"PID|1||123\nMSH|^~\\&|A\n");
    let out = run(&["send", "127.0.0.1:9", &pid], b"");
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with(&format!(
            "error: {pid}: message 1: message does not start with an MSH segment"
        )),
        "{stderr}"
    );
    let out = run(&["send", "127.0.0.1:9"], b"PID|1\n");
    assert!(text(&out.stderr).starts_with("error: <stdin>: message 1: "));
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn addresses_resolve_and_a_bare_port_gets_a_hint() {
    let good = server(handler_fn(|msg, _cx| Ok(Reply::Send(ack::accept(msg)))));
    let port = good.local_addr().port().to_string();
    let out = run(&["send", &port], message("P1").as_bytes());
    // Bad usage: exit 2, as documented.
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        text(&out.stderr).trim_end(),
        format!(
            "error: \"{port}\" is a port, not an address: give HOST:PORT, e.g. 127.0.0.1:{port}"
        )
    );
    let out = run(
        &["send", &format!("localhost:{port}")],
        message("P1").as_bytes(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "AA P1\n");
    good.shutdown(crate::util::WAIT).expect("clean stop");
}

#[test]
fn a_nak_is_printed_and_exits_1() {
    let naks = server(handler_fn(|msg, _cx| {
        Ok(Reply::Send(ack::nak(msg, AckCode::AE, "no bed")))
    }));
    let out = run(
        &["send", &naks.local_addr().to_string()],
        message("N1").as_bytes(),
    );
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stdout), "AE N1 no bed\n");
    assert_eq!(text(&out.stderr), "");
    naks.shutdown(crate::util::WAIT).expect("clean stop");
}
