//! Unit tests without sockets: configuration, backoff, correlation and errors. The loopback
//! behaviour (timeouts, desync, reconnect, pipelining) is in `tests/it/client.rs`.

use std::borrow::Cow;

use std::error::Error as _;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::*;
use crate::ack::{self, AckCode, AckParseError};
use crate::msh::MshError;

const MSG: &[u8] = b"MSH|^~\\&|LAB|H|EHR|H|20260101||ORU^R01|MSG1|P|2.5.1\rPID|1\r";

#[test]
fn config_defaults() {
    let config = ClientConfig::default();
    assert_eq!(config.connect_timeout, Duration::from_secs(10));
    assert_eq!(config.response_timeout, Duration::from_secs(30));
    assert_eq!(config.max_response_size, 10 * 1024 * 1024);
    assert_eq!(config.reconnect, None);
    assert!(!config.allow_missing_control_id);
}

#[test]
fn config_setters() {
    let backoff = Backoff::new(Duration::from_millis(1), Duration::from_millis(2), 3);
    let config = ClientConfig::default()
        .connect_timeout(Duration::from_secs(1))
        .response_timeout(Duration::from_secs(2))
        .max_response_size(3)
        .reconnect(Some(backoff))
        .allow_missing_control_id(true);
    assert_eq!(config.connect_timeout, Duration::from_secs(1));
    assert_eq!(config.response_timeout, Duration::from_secs(2));
    assert_eq!(config.max_response_size, 3);
    assert_eq!(config.reconnect, Some(backoff));
    assert!(config.allow_missing_control_id);
}

#[test]
fn backoff_doubles_up_to_max_without_overflow() {
    let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5), 5);
    let delays: Vec<_> = (0..8).map(|r| b.delay(r)).collect();
    let ms: Vec<u128> = delays.iter().map(Duration::as_millis).collect();
    assert_eq!(ms, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
    assert_eq!(b.delay(u32::MAX), Duration::from_secs(5));
    let huge = Backoff::new(Duration::MAX, Duration::MAX, 1);
    assert_eq!(huge.delay(40), Duration::MAX);
}

#[test]
fn jitter_stays_within_half_and_full_delay() {
    let mut rng = 0x1234_5678_9abc_def1;
    let delay = Duration::from_millis(200);
    let samples: Vec<Duration> = (0..1000).map(|_| jitter(delay, &mut rng)).collect();
    assert!(samples.iter().all(|d| *d >= delay / 2 && *d <= delay));
    // Spread out, not stuck at one value.
    let low = samples.iter().filter(|d| **d < delay * 3 / 4).count();
    assert!((300..700).contains(&low), "{low} of 1000 in the lower half");
    assert_eq!(jitter(Duration::ZERO, &mut rng), Duration::ZERO);
    assert!(jitter(Duration::MAX, &mut rng) >= Duration::MAX / 2);
    assert_ne!(rng, 0);
}

#[test]
fn control_id_is_msh_10() {
    assert_eq!(control_id(MSG, false).unwrap().unwrap().sent, b"MSG1");
    assert!(matches!(
        control_id(b"PID|1\r", false),
        Err(ClientError::NoControlId)
    ));
    // MSH-10 empty, and MSH-10 cut off at the end of an unterminated MSH (might be truncated).
    let empty = b"MSH|^~\\&|A|B|C|D|20260101||ADT^A01||P|2.5.1\r";
    assert!(matches!(
        control_id(empty, false),
        Err(ClientError::NoControlId)
    ));
    assert!(matches!(
        control_id(b"MSH|^~\\&|A|B|C|D|1||ADT|ID", false),
        Err(ClientError::NoControlId)
    ));
    assert!(control_id(b"garbage", true).unwrap().is_none());
}

/// An expectation for a control id that needs no escaping or cutting.
fn exp(id: &[u8]) -> Expected<'_> {
    Expected {
        sent: id,
        echoed: Cow::Borrowed(id),
    }
}

/// Issue 9, suspected item 5: the server escapes 0x0B/0x1C in MSA-2 and cuts it at 199 bytes;
/// the client used to report a mismatch for such control ids.
#[test]
fn issue_9_control_ids_with_block_bytes_or_over_the_cap_correlate() {
    let long = "7".repeat(300);
    let ids: [&[u8]; 3] = [b"ID\x0b1", b"\x1c", long.as_bytes()];
    for id in ids {
        let msg = [
            &b"MSH|^~\\&|A|B|C|D|20260101||ADT^A01|"[..],
            id,
            b"|P|2.5.1\r",
        ]
        .concat();
        let expected = control_id(&msg, false).unwrap().unwrap();
        // As our server writes it.
        let got = Ack::correlate(ack::accept(&msg), Some(&expected)).unwrap();
        assert!(got.is_accept());
        // As a receiver that echoes MSH-10 raw writes it.
        let raw = [
            &b"MSH|^~\\&|C|D|A|B|20260101||ACK|X|P|2.5.1\rMSA|AA|"[..],
            id,
            b"\r",
        ]
        .concat();
        assert!(Ack::correlate(Bytes::from(raw), Some(&expected)).is_ok());
    }
    // Still a mismatch when the id differs.
    let msg = b"MSH|^~\\&|A|B|C|D|20260101||ADT^A01|ID\x0b2|P|2.5.1\r";
    let other = b"MSH|^~\\&|A|B|C|D|20260101||ADT^A01|ID\x0b1|P|2.5.1\r";
    let expected = control_id(msg, false).unwrap().unwrap();
    assert!(matches!(
        Ack::correlate(ack::accept(other), Some(&expected)),
        Err(ClientError::Mismatch { .. })
    ));
}

#[test]
fn correlate_accepts_matching_msa_2() {
    let reply = ack::nak(MSG, AckCode::AE, "no such patient");
    let got = Ack::correlate(reply.clone(), Some(&exp(b"MSG1"))).unwrap();
    assert_eq!(got.code, AckCode::AE);
    assert_eq!(got.control_id, "MSG1");
    assert_eq!(got.text.as_deref(), Some("no such patient"));
    assert_eq!(got.raw, reply);
    assert!(!got.is_accept());
    assert!(
        Ack::correlate(ack::accept(MSG), Some(&exp(b"MSG1")))
            .unwrap()
            .is_accept()
    );
}

#[test]
fn correlate_rejects_other_msa_2() {
    let err = Ack::correlate(ack::accept(MSG), Some(&exp(b"MSG2"))).unwrap_err();
    match err {
        ClientError::Mismatch { expected, got } => {
            assert_eq!(expected, "MSG2");
            assert_eq!(got, "MSG1");
        }
        other => panic!("expected a mismatch, got {other:?}"),
    }
    // Without an expected id (allow_missing_control_id) any MSA-2 goes.
    assert_eq!(
        Ack::correlate(ack::accept(MSG), None).unwrap().control_id,
        "MSG1"
    );
}

#[test]
fn correlate_rejects_unreadable_ack() {
    let cases: [(&[u8], AckParseError); 3] = [
        (b"hello", AckParseError::Msh(MshError::NoMsh)),
        (
            b"MSH|^~\\&|A|B|C|D|1||ACK|9|P|2.5.1\r",
            AckParseError::NoMsa,
        ),
        (
            b"MSH|^~\\&|A|B|C|D|1||ACK|9|P|2.5.1\rMSA|OK|MSG1\r",
            AckParseError::BadCode,
        ),
    ];
    for (reply, want) in cases {
        match Ack::correlate(Bytes::from_static(reply), Some(&exp(b"MSG1"))) {
            Err(ClientError::BadAck(e)) => assert_eq!(e, want),
            other => panic!("expected BadAck({want:?}), got {other:?}"),
        }
    }
}

#[test]
fn remaining_time_before_a_deadline() {
    assert_eq!(remaining(None).unwrap(), None);
    let left = remaining(Some(Instant::now() + Duration::from_secs(60)))
        .unwrap()
        .unwrap();
    assert!(left > Duration::from_secs(59) && left <= Duration::from_secs(60));
    assert!(matches!(
        remaining(Some(Instant::now())),
        Err(ClientError::Timeout)
    ));
    assert_eq!(deadline_after(Duration::MAX), None);
}

#[test]
fn socket_timeouts_become_timeout_and_interrupts_are_retried() {
    use std::io::{Error, ErrorKind};
    assert!(check_io(Error::from(ErrorKind::Interrupted)).is_ok());
    assert!(matches!(
        check_io(Error::from(ErrorKind::WouldBlock)),
        Err(ClientError::Timeout)
    ));
    assert!(matches!(
        check_io(Error::from(ErrorKind::TimedOut)),
        Err(ClientError::Timeout)
    ));
    assert!(matches!(
        check_io(Error::from(ErrorKind::ConnectionReset)),
        Err(ClientError::Io(e)) if e.kind() == ErrorKind::ConnectionReset
    ));
}

#[test]
fn display_is_lowercase_without_trailing_period_and_sources_are_kept() {
    use std::io::{Error, ErrorKind};
    let errors = [
        ClientError::Connect(Error::from(ErrorKind::ConnectionRefused)),
        ClientError::Io(Error::from(ErrorKind::UnexpectedEof)),
        ClientError::Timeout,
        ClientError::Desync,
        ClientError::Mismatch {
            expected: "A".into(),
            got: "B".into(),
        },
        ClientError::ResponseTooLarge { limit: 10 },
        ClientError::BadAck(AckParseError::NoMsa),
        ClientError::NoControlId,
        ClientError::Closed,
    ];
    for e in &errors {
        let text = e.to_string();
        assert!(text.starts_with(|c: char| c.is_ascii_lowercase()), "{text}");
        assert!(!text.ends_with('.'), "{text}");
    }
    assert_eq!(
        errors[4].to_string(),
        "ack is for message \"B\", expected \"A\""
    );
    assert_eq!(
        errors[5].to_string(),
        "response exceeds the limit of 10 bytes"
    );
    let with_source: Vec<bool> = errors.iter().map(|e| e.source().is_some()).collect();
    assert_eq!(
        with_source,
        [true, true, false, false, false, false, true, false, false]
    );
}
