use std::time::{Duration, UNIX_EPOCH};

use super::*;
use crate::ack::{self, Ack, AckCode};

/// What the load generator sends (`mllp-reactor bench`), cut after its PID segment.
const BENCH: &[u8] = b"MSH|^~\\&|LOADGEN|BENCH|MLLP|REACTOR|20260101120000||ADT^A01^ADT_A01|0badcafe-0-0000000001|P|2.5.1\r\
EVN|A01|20260101120000\rPID|1||100001^^^BENCH^MR||DOE^JANE^Q\r";

/// Messages whose MSH ends in each way a scan can end, in odd separators, with block bytes,
/// escapes and a declared truncation character.
const MESSAGES: [&[u8]; 7] = [
    BENCH,
    b"MSH|^~\\&|A|B|C|D|20260101||ADT^A01|7|P|2.5|||AL|NE|DEU|UNICODE UTF-8|en|X\rPID|1\r",
    b"MSH|^~\\&|A|B|C|D|20260101||ORU^R01|ID7\rOBX|1\r",
    b"MSH#*%$!#A#B#C#D#2026##ADT*A01#ID1#P#2.5\nPID#1\n",
    b"MSH|^~\\&#|A\x0b|B\\F\\|C|D|2026||ADT^A01~X|ID\\E\\|P^T|2.7|||||||CS\x1c|19\r\n",
    b"MSH|^~\\&|A|B|C|D|||ACK|ID|P|2.5.1\r",
    b"MSH|^~\\&|A|B|C|D|2026|SEC|ADT|ID|||||||||UTF-8|\r",
];

/// Bytes that end fields, segments and frames, escape, or are plain.
const CHANGES: [u8; 12] = [
    b'|', b'#', b'^', b'~', b'\\', b'&', b'\r', b'\n', 0x0B, 0x1C, b'A', 0xFF,
];

fn at(secs: u64) -> Ack<'static> {
    Ack::new(AckCode::AA)
        .control_id("ID")
        .timestamp(UNIX_EPOCH + Duration::from_secs(1_767_268_800 + secs))
}

/// Every message with one byte replaced, inserted or deleted anywhere, and every prefix.
fn changed(message: &[u8]) -> Vec<Vec<u8>> {
    let mut all = Vec::new();
    for i in 0..=message.len() {
        all.push(message[..i].to_vec());
        for byte in CHANGES {
            all.push([&message[..i], &[byte], &message[i..]].concat());
            if i < message.len() {
                all.push([&message[..i], &[byte], &message[i + 1..]].concat());
            }
        }
        if i < message.len() {
            all.push([&message[..i], &message[i + 1..]].concat());
        }
    }
    all
}

/// The ACK built through a memo that learned one message is the ACK built without a memo,
/// byte for byte, for every change of that message: where the memo recalls (MSH-7 and MSH-10
/// changed) and where it must not (anything else). Both ways round: the changed message
/// learned, the original recalled.
#[test]
fn the_memo_builds_what_the_scan_builds_for_every_change() {
    for message in MESSAGES {
        for other in changed(message) {
            for (first, second) in [(message, &other[..]), (&other[..], message)] {
                let mut memo = Memo::new();
                for (ack, m) in [(at(0), first), (at(1), second), (at(1), first)] {
                    assert_eq!(
                        ack.build_with_memo(m, &mut memo),
                        ack.build_with_msh(m),
                        "{:?} after {:?}",
                        String::from_utf8_lossy(m),
                        String::from_utf8_lossy(first),
                    );
                }
            }
        }
    }
}

/// MSH-10 and MSH-7 of the message at `message`, replaced.
fn with_msh7_and_msh10(message: &[u8], msh7: &[u8], msh10: &[u8]) -> Vec<u8> {
    let (_, layout) = Fields::scan_laid_out(message).unwrap();
    let layout = layout.unwrap();
    [
        &message[..layout.msh7.start],
        msh7,
        &message[layout.msh7.end..layout.msh10.start],
        msh10,
        &message[layout.msh10.end..],
    ]
    .concat()
}

/// The memo recalls a message that differs from the one it learned only in MSH-7 and MSH-10
/// (their lengths too), and nothing else: the recall is what makes the common case cheap, so
/// a change that lost it would fail here rather than only in a benchmark.
#[test]
fn the_memo_recalls_only_a_new_msh7_and_msh10() {
    let time = UNIX_EPOCH;
    for message in MESSAGES {
        let (fields, layout) = Fields::scan_laid_out(message).unwrap();
        let layout = layout.unwrap();
        let mut memo = Memo::new();
        assert_eq!(
            memo.recall(message, time),
            None,
            "an empty memo recalls nothing"
        );
        let second = hl7_second(time);
        let copied = Copied::of(&fields, second.text);
        memo.place()
            .unwrap()
            .learn(message, layout.clone(), &fields, &copied, second);
        assert_eq!(memo.recall(message, time), Some(layout.msh10.clone()));
        for (msh7, msh10) in [
            (&b"2027"[..], &b"X"[..]),
            (b"", b"0123456789ABCDEF0123456789"),
        ] {
            let other = with_msh7_and_msh10(message, msh7, msh10);
            let start = layout.msh7.start + msh7.len() + (layout.msh10.start - layout.msh7.end);
            assert_eq!(memo.recall(&other, time), Some(start..start + msh10.len()));
        }
        // An empty MSH-10 (a reject), and separators or control bytes in MSH-7 or MSH-10.
        let separated = [b'2', b'0', message[3], b'2', b'7'];
        for (msh7, msh10) in [
            (&b"2027"[..], &b""[..]),
            (&separated[..], b"X"),
            (b"2027", &separated[..]),
            (b"2027", b"X\x0bY"),
            (b"2027\t", b"X"),
        ] {
            let other = with_msh7_and_msh10(message, msh7, msh10);
            assert_eq!(memo.recall(&other, time), None, "{other:?}");
        }
        // Any other field.
        for i in (0..layout.end).filter(|i| !layout.msh7.contains(i) && !layout.msh10.contains(i)) {
            let mut other = message.to_vec();
            other[i] = if other[i] == b'Q' { b'R' } else { b'Q' };
            assert_eq!(memo.recall(&other, time), None, "byte {i} changed");
        }
    }
}

/// Through the thread's memo, as a server builds them: no field of one message ever reaches
/// the ACK of the next, whichever sender comes when.
#[test]
fn no_field_of_one_message_reaches_anothers_ack() {
    let sender = |app: &str, id: &str| {
        format!("MSH|^~\\&|{app}|FAC|RCV|RFAC|20260101||ADT^A01|{id}|P|2.5.1\rPID|1\r")
    };
    for (i, app) in ["LAB", "LAB", "RAD", "LAB", "RAD", "RAD", "PHARMACY"]
        .iter()
        .enumerate()
    {
        let id = format!("MSG{i}");
        let ack = ack::accept(sender(app, &id).as_bytes());
        let parsed = ack::parse(&ack).unwrap();
        assert_eq!(
            (parsed.code, parsed.control_id),
            (AckCode::AA, id.as_bytes())
        );
        let msh = crate::msh::Msh::parse(&ack).unwrap();
        assert_eq!(msh.field(5), Some(app.as_bytes()));
    }
}
