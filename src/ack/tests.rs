use std::time::{Duration, UNIX_EPOCH};

use proptest::prelude::*;

use super::*;
use crate::__fuzz::unescape;

const ADT: &[u8] = b"MSH|^~\\&|SEND_APP|SEND_FAC|RCV_APP|RCV_FAC|20260322120000||ADT^A01^ADT_A01|ORIG123|P|2.5.1\r\
EVN|A01|20260322120000\rPID|1||123456^^^HOSP^MR||DOE^JOHN\r";

/// 2026-03-22 12:34:56 UTC.
const FIXED: u64 = 1_774_182_896;

fn fixed(code: AckCode) -> Ack<'static> {
    Ack::new(code)
        .control_id("ACK001")
        .timestamp(UNIX_EPOCH + Duration::from_secs(FIXED))
}

fn segments(ack: &[u8]) -> Vec<&[u8]> {
    assert_eq!(ack.last(), Some(&b'\r'), "every segment ends with CR");
    ack[..ack.len() - 1].split(|&b| b == b'\r').collect()
}

fn msh(ack: &[u8]) -> Msh<'_> {
    Msh::parse(ack).unwrap()
}

#[test]
fn exact_wire_form_for_fixed_time_and_id() {
    assert_eq!(
        &fixed(AckCode::AA).build(ADT)[..],
        &b"MSH|^~\\&|RCV_APP|RCV_FAC|SEND_APP|SEND_FAC|20260322123456+0000||ACK^A01^ACK|ACK001|P|2.5.1\r\
           MSA|AA|ORIG123\r"[..]
    );
    assert_eq!(
        &fixed(AckCode::AR).text("Rejected").build(ADT)[..],
        &b"MSH|^~\\&|RCV_APP|RCV_FAC|SEND_APP|SEND_FAC|20260322123456+0000||ACK^A01^ACK|ACK001|P|2.5.1\r\
           MSA|AR|ORIG123|Rejected\r\
           ERR|||207^Application internal error^HL70357|E\r"[..]
    );
}

#[test]
fn sender_and_receiver_swap() {
    let ack = accept(ADT);
    let m = msh(&ack);
    let fields: Vec<_> = (3..=6).map(|n| m.field(n).unwrap()).collect();
    assert_eq!(
        fields,
        [&b"RCV_APP"[..], b"RCV_FAC", b"SEND_APP", b"SEND_FAC"]
    );
    // Components and empty fields are copied as they are.
    let ack = accept(b"MSH|^~\\&|A^1^ISO||C|D|||ADT^A01|1|P|2.5\r");
    let m = msh(&ack);
    assert_eq!(m.field(3), Some(&b"C"[..]));
    assert_eq!(m.field(5), Some(&b"A^1^ISO"[..]));
    assert_eq!(m.field(6), Some(&b""[..]));
}

#[test]
fn message_type_carries_the_trigger() {
    let ack = accept(b"MSH|^~\\&|A|B|C|D|||ORM^O01|1|P|2.3\r");
    assert_eq!(msh(&ack).field(9), Some(&b"ACK^O01^ACK"[..]));
    let ack = accept(b"MSH|^~\\&|A|B|C|D|||ACK|1|P|2.3\r");
    assert_eq!(msh(&ack).field(9), Some(&b"ACK"[..]));
    let ack = accept(b"MSH#*~\\&#A#B#C#D###ORM*O01#1#P#2.3\r");
    assert_eq!(msh(&ack).field(9), Some(&b"ACK*O01*ACK"[..]));
}

#[test]
fn control_id_is_new_unique_and_can_be_overridden() {
    let (a, b) = (accept(ADT), accept(ADT));
    let (id_a, id_b) = (msh(&a).control_id().unwrap(), msh(&b).control_id().unwrap());
    assert_ne!(id_a, id_b);
    assert_ne!(id_a, b"ORIG123");
    // Same per-process prefix, then a counter.
    assert_eq!(id_a[..8], id_b[..8]);
    assert!(
        id_a[..8]
            .iter()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_lowercase())
    );
    assert!(id_a[8..].iter().all(u8::is_ascii_digit));
    assert!(id_a.len() <= 20);

    let ack = Ack::new(AckCode::AA).control_id("CUSTOM_ID").build(ADT);
    assert_eq!(msh(&ack).control_id(), Some(&b"CUSTOM_ID"[..]));
    assert_eq!(
        parse(&ack).unwrap().message_control_id,
        Some(&b"CUSTOM_ID"[..])
    );
}

#[test]
fn processing_and_version_ids_are_copied_or_defaulted() {
    let ack = accept(b"MSH|^~\\&|A|B|C|D|||ADT^A01|1|T^A|2.3.1^DEU\r");
    assert_eq!(msh(&ack).processing_id(), Some(&b"T^A"[..]));
    assert_eq!(msh(&ack).version(), Some(&b"2.3.1^DEU"[..]));
    let ack = accept(b"MSH|^~\\&|A|B|C|D|||ADT^A01|1||\r");
    assert_eq!(msh(&ack).processing_id(), Some(&b"P"[..]));
    assert_eq!(msh(&ack).version(), Some(&b"2.5.1"[..]));
    let ack = accept(b"MSH|^~\\&|A|B|C|D|||ADT^A01|1\r");
    assert_eq!(msh(&ack).processing_id(), Some(&b"P"[..]));
    assert_eq!(msh(&ack).version(), Some(&b"2.5.1"[..]));
}

#[test]
fn charset_is_copied_when_present() {
    let msg = b"MSH|^~\\&|A|B|C|D|||ADT^A01|1|P|2.5|||AL|NE|DEU|UNICODE UTF-8~8859/1\r";
    let ack = fixed(AckCode::AA).build(msg);
    assert_eq!(msh(&ack).charset(), Some(&b"UNICODE UTF-8~8859/1"[..]));
    assert!(ack.starts_with(b"MSH|^~\\&|C|D|A|B|20260322123456+0000||ACK^A01^ACK|ACK001|P|2.5||||||UNICODE UTF-8~8859/1\r"));
    assert_eq!(msh(&accept(ADT)).field(13), None);
}

#[test]
fn timestamp_is_utc_with_offset() {
    let ack = accept(ADT);
    let ts = msh(&ack).field(7).unwrap();
    assert_eq!(ts.len(), 19);
    assert!(ts[..14].iter().all(u8::is_ascii_digit));
    assert_eq!(&ts[14..], b"+0000");
    assert!(&ts[..4] >= b"2025".as_slice());

    let at = |secs| hl7_timestamp(UNIX_EPOCH + Duration::from_secs(secs));
    assert_eq!(&at(0), b"19700101000000+0000");
    assert_eq!(&at(951_782_400), b"20000229000000+0000");
    assert_eq!(&at(FIXED), b"20260322123456+0000");
    assert_eq!(&at(u64::MAX / 2), b"99991231235959+0000");
    assert_eq!(
        &hl7_timestamp(UNIX_EPOCH - Duration::from_secs(1)),
        b"19700101000000+0000"
    );
    // The per-thread text of the last second: every time inside it, none outside it.
    let second = UNIX_EPOCH + Duration::from_secs(FIXED);
    for (offset_ms, text) in [
        (0, b"20260322123456+0000"),
        (999, b"20260322123456+0000"),
        (1000, b"20260322123457+0000"),
        (999, b"20260322123456+0000"),
        (0, b"20260322123456+0000"),
    ] {
        let time = second + Duration::from_millis(offset_ms);
        assert_eq!(&hl7_timestamp(time), text);
    }
    assert_eq!(
        &hl7_timestamp(second - Duration::from_nanos(1)),
        b"20260322123455+0000"
    );
}

#[test]
fn civil_from_days_matches_a_day_by_day_calendar() {
    let (mut year, mut month, mut day) = (1970, 1, 1);
    for days in 0..(MAX_TIMESTAMP_SECS / 86_400 + 1) {
        assert_eq!(
            crate::date::civil_from_days(days as i64),
            (year, month, day),
            "day {days}"
        );
        let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
        let month_len = match month {
            2 if leap => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            _ => 31,
        };
        day += 1;
        if day > month_len {
            (day, month) = (1, month + 1);
            if month > 12 {
                (month, year) = (1, year + 1);
            }
        }
    }
    assert_eq!((year, month, day), (10_000, 1, 1));
}

#[test]
fn err_segment_code_and_severity() {
    let ack = nak(ADT, AckCode::AE, "Bad data");
    let segs = segments(&ack);
    assert_eq!(segs.len(), 3);
    assert_eq!(segs[1], b"MSA|AE|ORIG123|Bad data");
    assert_eq!(segs[2], b"ERR|||207^Application internal error^HL70357|E");

    let ack = Ack::new(AckCode::AE)
        .error("103", "Table value not found", Severity::Warning)
        .build(ADT);
    assert_eq!(
        segments(&ack)[2],
        b"ERR|||103^Table value not found^HL70357|W"
    );
    let ack = Ack::new(AckCode::CE)
        .error("207", "", Severity::Information)
        .build(ADT);
    assert_eq!(segments(&ack)[2], b"ERR|||207^^HL70357|I");

    // Accept codes never carry an ERR, even when one is given.
    let ack = Ack::new(AckCode::AA)
        .error("207", "x", Severity::Error)
        .build(ADT);
    assert_eq!(segments(&ack).len(), 2);
}

#[test]
fn nak_shapes() {
    for code in [AckCode::AE, AckCode::AR, AckCode::CE, AckCode::CR] {
        let ack = nak(ADT, code, "");
        let segs = segments(&ack);
        assert_eq!(segs.len(), 3, "{code}");
        assert_eq!(segs[1], format!("MSA|{code}|ORIG123").as_bytes());
        assert!(segs[2].starts_with(b"ERR|||"));
        assert_eq!(parse(&ack).unwrap().text, None);
    }
    for code in [AckCode::AA, AckCode::CA] {
        let ack = nak(ADT, code, "ok");
        assert_eq!(
            segments(&ack)[1],
            format!("MSA|{code}|ORIG123|ok").as_bytes()
        );
        assert_eq!(segments(&ack).len(), 2);
    }
}

#[test]
fn text_is_escaped_with_the_messages_own_characters() {
    let msg = b"MSH#*%$!#A#B#C#D###ADT*A01#ID1#P#2.5\r";
    let ack = fixed(AckCode::AE)
        .text("a#b*c%d$e!f\rg\nh|^~\\&")
        .error("2*0#7", "x$y", Severity::Error)
        .build(msg);
    assert_eq!(
        &ack[..],
        &b"MSH#*%$!#C#D#A#B#20260322123456+0000##ACK*A01*ACK#ACK001#P#2.5\r\
           MSA#AE#ID1#a$F$b$S$c$R$d$E$e$T$f$X0D$g$X0A$h|^~\\&\r\
           ERR###2$S$0$F$7*x$E$y*HL70357#E\r"[..]
    );
    let ack = Ack::new(AckCode::AA).control_id("A|B^C").build(ADT);
    assert_eq!(msh(&ack).control_id(), Some(&b"A\\F\\B\\S\\C"[..]));
    // A declared v2.7 truncation character is escaped too.
    let ack = nak(
        b"MSH|^~\\&#|A|B|C|D|||ADT^A01|1|P|2.7\r",
        AckCode::AE,
        "a#b",
    );
    assert_eq!(segments(&ack)[1], b"MSA|AE|1|a\\P\\b");
    assert!(ack.starts_with(b"MSH|^~\\&#|"));
}

#[test]
fn mllp_block_bytes_never_reach_the_wire() {
    let msg = b"MSH|^~\\&|A\x0b|B|C|D|||ADT^A01|ID\x1c|P|2.5||||||X\x1c\r";
    let ack = Ack::new(AckCode::AE).text("t\x1c\x0b").build(msg);
    assert!(!ack.contains(&0x0B) && !ack.contains(&0x1C));
    assert_eq!(parse(&ack).unwrap().control_id, b"ID\\X1C\\");
    assert_eq!(msh(&ack).field(5), Some(&b"A\\X0B\\"[..]));
    assert_eq!(msh(&ack).charset(), Some(&b"X\\X1C\\"[..]));
    assert_eq!(parse(&ack).unwrap().text, Some(&b"t\\X1C\\\\X0B\\"[..]));
}

/// Builds `MSH|^~\&|<msh3>|B|C|D|20260101||ADT^A01|<msh10>|P|<msh12>\rPID|1\r`.
fn message_with(msh3: &[u8], msh10: &[u8], msh12: &[u8]) -> Vec<u8> {
    [
        &b"MSH|^~\\&|"[..],
        msh3,
        b"|B|C|D|20260101||ADT^A01|",
        msh10,
        b"|P|",
        msh12,
        b"\rPID|1\r",
    ]
    .concat()
}

/// Issue 9, defect 2: a 2 MiB MSH-3 of 0x0B bytes used to give a 10 MiB AA.
#[test]
fn issue_9_block_bytes_in_a_huge_msh3_give_a_small_aa() {
    let msg = message_with(&vec![0x0B; 2 << 20], b"ID1", b"2.5.1");
    let ack = accept(&msg);
    assert!(ack.len() < 1024, "ACK of {} bytes", ack.len());
    let parsed = parse(&ack).unwrap();
    assert_eq!((parsed.code, parsed.control_id), (AckCode::AA, &b"ID1"[..]));
    // Copied into MSH-5, cut at whole escape sequences: 45 × `\X0B\` = 225 bytes.
    assert_eq!(msh(&ack).field(5).unwrap(), b"\\X0B\\".repeat(45));
    assert!(!ack.contains(&0x0B) && !ack.contains(&0x1C));
}

/// Issue 9, defect 2: an oversize frame whose MSH-12 is 0x0B bytes used to get a 52 MB AR.
#[test]
fn issue_9_huge_msh12_gives_a_small_nak() {
    let msg = message_with(b"A", b"ID2", &vec![0x0B; 10 << 20]);
    let ar = nak(&msg, AckCode::AR, "message too large");
    assert!(ar.len() < 1024, "NAK of {} bytes", ar.len());
    assert_eq!(msh(&ar).version().unwrap(), b"\\X0B\\".repeat(12));
    // The same with plain bytes: cut at 60.
    let msg = message_with(b"A", b"ID2", &vec![b'9'; 10 << 20]);
    assert_eq!(msh(&accept(&msg)).version().unwrap(), vec![b'9'; 60]);
}

/// Whatever the message, an acknowledgment stays within a fixed size (plus the caller's text).
#[test]
fn every_copied_field_is_capped() {
    let huge = |b: u8| vec![b; 1 << 20];
    let mut msg = b"MSH|^~\\&#".to_vec();
    for n in 3..=20 {
        msg.push(b'|');
        match n {
            9 => msg.extend([&b"ADT^"[..], &huge(b'T')].concat()),
            10 => msg.extend(huge(b'I')),
            _ => msg.extend(huge(if n % 2 == 0 { 0x1C } else { b'x' })),
        }
    }
    msg.push(b'\r');
    let ack = Ack::new(AckCode::AE).build(&msg);
    assert!(ack.len() <= 1600, "ACK of {} bytes", ack.len());
    let m = msh(&ack);
    for n in 3..=6 {
        assert!(m.field(n).unwrap().len() <= MAX_PARTY_LEN, "MSH-{n}");
    }
    assert_eq!(m.trigger_event().unwrap(), vec![b'T'; 15]);
    assert_eq!(m.processing_id().unwrap(), b"xxx");
    assert_eq!(m.charset().unwrap(), b"\\X1C\\".repeat(13));
    assert_eq!(
        parse(&ack).unwrap().control_id,
        vec![b'I'; MAX_CONTROL_ID_LEN]
    );
}

#[test]
fn a_cut_never_splits_an_escape_sequence_or_a_utf8_character() {
    let a = |n: usize| vec![b'A'; n];
    // `\F\` would straddle the cap at 227: the cut moves before it.
    let msg = message_with(&[&a(225)[..], b"\\F\\tail"].concat(), b"1", b"2.5");
    assert_eq!(msh(&accept(&msg)).field(5).unwrap(), a(225));
    // A complete sequence before the cap stays.
    let msg = message_with(&[&a(221)[..], b"\\F\\tail"].concat(), b"1", b"2.5");
    assert_eq!(
        msh(&accept(&msg)).field(5).unwrap(),
        [&a(221)[..], b"\\F\\tai"].concat()
    );
    // `é` (C3 A9) would be cut after its first byte.
    let msg = message_with(&[&a(226)[..], "é".as_bytes()].concat(), b"1", b"2.5");
    assert_eq!(msh(&accept(&msg)).field(5).unwrap(), a(226));
    // Bytes that are not UTF-8 are cut at the cap.
    let msg = message_with(&[&a(226)[..], b"\xA9\xA9"].concat(), b"1", b"2.5");
    assert_eq!(
        msh(&accept(&msg)).field(5).unwrap(),
        [&a(226)[..], b"\xA9"].concat()
    );
}

/// Issue 9, suspected item 5: MSA-2 is what `echoed_control_id` says, for the ids that have to
/// be escaped or cut too.
#[test]
fn msa2_is_the_echoed_control_id() {
    let long = vec![b'7'; 300];
    let ids: [&[u8]; 5] = [b"42", b"ID\x0b", b"\x1c\x0b", &long, b"A\\X0D\\"];
    for id in ids {
        let msg = message_with(b"A", id, b"2.5.1");
        let echoed = echoed_control_id(&msg).unwrap();
        assert_eq!(parse(&accept(&msg)).unwrap().control_id, &echoed[..]);
        assert!(echoed.len() <= MAX_CONTROL_ID_LEN);
    }
    let msg = message_with(b"A", b"ID\x0b", b"2.5.1");
    assert_eq!(&echoed_control_id(&msg).unwrap()[..], b"ID\\X0B\\");
    assert!(matches!(
        echoed_control_id(&message_with(b"A", b"plain", b"2.5.1")),
        Some(Cow::Borrowed(b"plain"))
    ));
    assert_eq!(
        echoed_control_id(b"MSH|^~\\&|A|B|C|D|||ADT^A01||P|2.5\r"),
        None
    );
    assert_eq!(echoed_control_id(b"garbage"), None);
}

#[test]
fn malformed_messages_get_an_ar_with_empty_msa2() {
    let inputs: [&[u8]; 9] = [
        b"",
        b"M",
        b"MSH",
        b"MSH|",
        b"MSH|\r",
        b"\x0bMSH|^~\\&|A|B|C|D|||ADT^A01|1|P|2.5\r",
        b"garbage \xff\x00 bytes",
        b"PID|1||123\r",
        b"MSHA^~\\&A1",
    ];
    for input in inputs {
        for code in [AckCode::AA, AckCode::AE, AckCode::AR] {
            let ack = fixed(code).text("why").build(input);
            assert_eq!(
                &ack[..],
                &b"MSH|^~\\&|||||20260322123456+0000||ACK|ACK001|P|2.5.1\r\
                   MSA|AR||why\r\
                   ERR|||100^Segment sequence error^HL70357|E\r"[..],
                "{input:?}"
            );
        }
        let ack = Ack::new(AckCode::CA).build(input);
        assert_eq!(parse(&ack).unwrap().code, AckCode::CR);
    }
}

#[test]
fn msh_without_control_id_gets_an_ar() {
    for input in [
        &b"MSH|^~\\&"[..],
        b"MSH|^~\\&|A|B|C|D|||ADT^A01||P|2.5\r",
        b"MSH|^~",
    ] {
        let ack = accept(input);
        let parsed = parse(&ack).unwrap();
        assert_eq!(
            (parsed.code, parsed.control_id),
            (AckCode::AR, &b""[..]),
            "{input:?}"
        );
        assert_eq!(
            segments(&ack)[2],
            b"ERR|||101^Required field missing^HL70357|E"
        );
    }
}

#[test]
fn truncated_prefix_names_the_message_only_when_msh10_is_complete() {
    let full = ADT;
    let id_end = full.windows(7).position(|w| w == b"ORIG123").unwrap() + 7;
    for cut in 0..=full.len() {
        let ack = nak(&full[..cut], AckCode::AR, "message too large");
        let parsed = parse(&ack).unwrap();
        assert_eq!(parsed.code, AckCode::AR);
        let expected: &[u8] = if cut > id_end { b"ORIG123" } else { b"" };
        assert_eq!(parsed.control_id, expected, "cut at {cut}");
    }
}

#[test]
fn build_into_appends_one_exactly_sized_ack() {
    let mut out = b"prefix".to_vec();
    fixed(AckCode::AA).build_into(ADT, &mut out);
    assert_eq!(&out[6..], &fixed(AckCode::AA).build(ADT)[..]);
    let mut out = Vec::new();
    fixed(AckCode::AE).text("a|b\r").build_into(ADT, &mut out);
    assert_eq!(out.len(), out.capacity());
}

#[test]
fn parse_reads_msa_and_skips_other_segments() {
    let reply =
        b"MSH|^~\\&|R|F|S|F|20260101||ACK^A01^ACK|A9|P|2.5\r\nERR|x\r\nMSA|CE|ORIG|busy\r\n";
    let parsed = parse(reply).unwrap();
    assert_eq!(parsed.code, AckCode::CE);
    assert_eq!(parsed.control_id, b"ORIG");
    assert_eq!(parsed.text, Some(&b"busy"[..]));
    assert_eq!(parsed.message_control_id, Some(&b"A9"[..]));

    let parsed = parse(b"MSH|^~\\&|||||||ACK|\rMSA|AA\r").unwrap();
    assert_eq!(
        (parsed.control_id, parsed.text, parsed.message_control_id),
        (&b""[..], None, None)
    );
    // MSA-3 with more fields after it.
    assert_eq!(
        parse(b"MSH|^~\\&\rMSA|AA|1|t|5\r").unwrap().text,
        Some(&b"t"[..])
    );
}

#[test]
fn parse_errors() {
    assert_eq!(
        parse(b"PID|1").unwrap_err(),
        AckParseError::Msh(MshError::NoMsh)
    );
    assert_eq!(
        parse(b"MSH|^~\\&|A\rPID|1\r").unwrap_err(),
        AckParseError::NoMsa
    );
    assert_eq!(
        parse(b"MSH|^~\\&|A\rMSA^AA\r").unwrap_err(),
        AckParseError::NoMsa
    );
    assert_eq!(
        parse(b"MSH|^~\\&|A\rMSA|XX|1\r").unwrap_err(),
        AckParseError::BadCode
    );
    assert_eq!(
        parse(b"MSH|^~\\&|A\rMSA|\r").unwrap_err(),
        AckParseError::BadCode
    );
    assert_eq!(AckParseError::NoMsa.to_string(), "ack has no MSA segment");
    let err = AckParseError::Msh(MshError::TooShort);
    assert_eq!(
        std::error::Error::source(&err).map(ToString::to_string),
        Some(MshError::TooShort.to_string())
    );
}

#[test]
fn codes_round_trip() {
    for code in AckCode::ALL {
        assert_eq!(AckCode::from_bytes(code.as_str().as_bytes()), Some(code));
        assert_eq!(code.is_accept(), matches!(code, AckCode::AA | AckCode::CA));
    }
    assert_eq!(AckCode::from_bytes(b"aa"), None);
    assert_eq!(Severity::Warning.as_str(), "W");
}

#[test]
fn decimal_formatting() {
    let mut buf = [0; 20];
    let edges = (0..20).flat_map(|e| {
        let p = 10_u64.pow(e);
        [p - 1, p, p + 1]
    });
    for n in (0..100_000).chain(edges).chain([u64::MAX - 1, u64::MAX]) {
        let len = id::put_decimal(n, &mut buf);
        assert_eq!(&buf[..len], n.to_string().as_bytes());
    }
}

#[test]
fn fuzz_entry_point_on_hand_picked_inputs() {
    let inputs: [&[u8]; 10] = [
        b"",
        b"\x80",
        ADT,
        b"MSH#*%$!#A#B#C#D###ADT*A01#ID1#P#2.5\rPID#1\n",
        b"MSH|^~\\&|A|B|C|D|||ADT^A01|12",
        b"MSH|^~\\&|A\x1c|B|C|D|||ADT^A01|1\x0b|P|2.5\r\x0b",
        b"MSH|^~\\&#|A|B|C|D|||ADT^A01|1|P|2.7|||||||UTF-8\r#",
        b"garbage\r\n\x00\xff",
        b"MSH|^~\\&\rMSA|AA|1\r\x1c",
        b"MSH|^~\\&|\xe9\xff|B|C|D|||ADT^A01|\\F\\|P|2.5\r\xff",
    ];
    for input in inputs {
        crate::__fuzz::ack(input);
    }
}

/// The one-pass field scan (`Fields::scan`) agrees with the `Msh` accessors, and builds the
/// same ACK, on every prefix of messages that put the separators, terminators and block
/// bytes at every offset of an 8-byte word: before, inside and after MSH-18, where the scan
/// stops.
#[test]
fn the_field_scan_reads_what_msh_reads_on_every_prefix() {
    let messages: [&[u8]; 6] = [
        ADT,
        b"MSH|^~\\&|A|B|C|D|E||ADT^A01~X^Y|ID|P^T|2.5.1|1|2|AL|NE|US|UNICODE UTF-8~8859/1|en|19|20\rPID|1\r",
        b"MSH|^~\\&|A\x0b|B|C|D|E||ADT^A01|ID|P|2.5|||||||CS\x1c|19\x0b\n\x1c",
        b"MSH|^~\\&|A|B|C|D|E||^A01^X|ID|P|2.5||||||||19|20|21|22|23|24|25|26|27\x0b",
        b"MSH^|~\\&^A^B^^^^^ADT|A01^\t\x00ID^P^2.5\r\n",
        b"MSH|^~\\&#|A|B|C|D||||ID\r",
    ];
    for message in messages {
        for end in 0..=message.len() {
            for last in [b'A', b'G', b'M'] {
                let mut input = message[..end].to_vec();
                input.push(last);
                crate::__fuzz::ack(&input);
            }
            crate::__fuzz::ack(&message[..end]);
        }
    }
}

/// Separator sets: five distinct characters `Msh::parse` accepts.
fn separators() -> impl Strategy<Value = Vec<u8>> {
    let pool = b"|^~\\&#*%$!@:;/?=,_-'\"<>[]{}`()".to_vec();
    proptest::sample::subsequence(pool, 5).prop_shuffle()
}

/// Field contents that contain no separator: letters, digits, space, `.`, `+` and high bytes.
fn content(max: usize) -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![
        proptest::sample::select(b"ABCXYZabcxyz0123456789 .+".to_vec()),
        0x80u8..=0xFF,
    ];
    proptest::collection::vec(byte, 0..max)
}

proptest! {
    #[test]
    fn ack_round_trips(
        seps in separators(),
        parties in proptest::collection::vec(content(8), 4),
        trigger in content(4),
        id in content(12),
        version in content(6),
        charset in content(10),
        text in any::<String>(),
        code_index in 0usize..6,
    ) {
        let [f, c, r, e, s] = [seps[0], seps[1], seps[2], seps[3], seps[4]];
        let mut msg = vec![b'M', b'S', b'H', f, c, r, e, s];
        for party in &parties {
            msg.push(f);
            msg.extend_from_slice(party);
        }
        msg.extend_from_slice(&[f, b'2', b'0', b'2', b'6', f, f, b'A', b'D', b'T', c]);
        msg.extend_from_slice(&trigger);
        for value in [&id[..], b"P", &version] {
            msg.push(f);
            msg.extend_from_slice(value);
        }
        if !charset.is_empty() {
            msg.extend_from_slice(&[f; 6]);
            msg.extend_from_slice(&charset);
        }
        msg.extend_from_slice(&[b'\r', b'P', b'I', b'D', f, b'1', b'\r']);

        let codes = [AckCode::AA, AckCode::AE, AckCode::AR, AckCode::CA, AckCode::CE, AckCode::CR];
        let code = codes[code_index];
        let ack = nak(&msg, code, &text);
        let parsed = parse(&ack).unwrap();

        prop_assert_eq!(parsed.control_id, &id[..]);
        let expected_code = if id.is_empty() { code.to_reject() } else { code };
        prop_assert_eq!(parsed.code, expected_code);
        let enc = Msh::parse(&msg).unwrap().encoding();
        let text_back = unescape(parsed.text.unwrap_or_default(), &enc);
        prop_assert_eq!(text_back.as_deref(), Some(text.as_bytes()));

        let m = Msh::parse(&ack).unwrap();
        prop_assert_eq!(m.encoding(), enc);
        let swapped: Vec<&[u8]> = (3..=6).map(|n| m.field(n).unwrap()).collect();
        prop_assert_eq!(swapped, [&parties[2][..], &parties[3], &parties[0], &parties[1]]);
        prop_assert_eq!(m.trigger_event().unwrap_or_default(), &trigger[..]);
        let version_back = if version.is_empty() { &b"2.5.1"[..] } else { &version };
        prop_assert_eq!(m.version(), Some(version_back));
        prop_assert_eq!(m.charset().unwrap_or_default(), &charset[..]);
    }
}

/// Inputs shaped like headers, so random bytes get past `Msh::parse`: an MSH start (usual,
/// odd or random separators), then bytes drawn mostly from separators, with some terminators
/// and MLLP block bytes.
fn header_like() -> impl Strategy<Value = Vec<u8>> {
    let start = prop_oneof![
        Just(b"MSH|^~\\&|".to_vec()),
        Just(b"MSH#*%$!#".to_vec()),
        Just(b"MSH|^~\\&#|".to_vec()),
        proptest::collection::vec(any::<u8>(), 0..7).prop_map(|v| [&b"MSH"[..], &v].concat()),
    ];
    // Weighted so that an MSH often reaches MSH-10 and beyond before a terminator.
    let byte = prop_oneof![
        6 => Just(b'|'),
        1 => proptest::sample::select(b"\r\n\x0b\x1c".to_vec()),
        12 => proptest::sample::select(b"^~\\&#*%$!AZ09 ".to_vec()),
        2 => any::<u8>(),
    ];
    (start, proptest::collection::vec(byte, 0..120))
        .prop_map(|(start, tail)| [start, tail].concat())
}

proptest! {
    #[test]
    fn fuzz_entry_point_on_generated_inputs(
        input in prop_oneof![header_like(), proptest::collection::vec(any::<u8>(), 0..64)],
    ) {
        crate::__fuzz::ack(&input);
    }
}

#[test]
fn acks_cut_from_the_thread_buffer_stay_intact_while_held() {
    // More than one shared buffer's worth, all held at once: none may change when later
    // ones are built, and each equals the ACK built into a Vec.
    let ack = fixed(AckCode::AA);
    let messages: Vec<Vec<u8>> = (0..200)
        .map(|i| format!("MSH|^~\\&|A|B|C|D|20260101||ADT^A01|id{i}|P|2.5\r").into_bytes())
        .collect();
    let built: Vec<Bytes> = messages.iter().map(|m| ack.build(m)).collect();
    for (message, bytes) in messages.iter().zip(&built) {
        let mut expected = Vec::new();
        ack.build_into(message, &mut expected);
        assert_eq!(bytes.as_ref(), expected.as_slice());
    }
    // Once dropped, their space is reused; the next ACKs are still right.
    drop(built);
    for message in &messages {
        let mut expected = Vec::new();
        ack.build_into(message, &mut expected);
        assert_eq!(ack.build(message).as_ref(), expected.as_slice());
    }
}

#[test]
fn the_short_copy_copies_every_length_exactly() {
    let src: Vec<u8> = (1..=80).collect();
    for n in 0..=src.len() {
        let mut dst = vec![0; n];
        super::arena::copy(&mut dst, &src[..n]);
        assert_eq!(dst, &src[..n], "{n} bytes");
    }
}
