//! Tests for the PROXY decoder: every valid header at every split point, every malformed one at
//! the exact byte where it becomes impossible, and property round trips through the encoders.

use std::net::{IpAddr, SocketAddr};

use proptest::prelude::*;

use super::*;

/// What follows the header in every test stream: an MLLP frame the decoder must not touch.
const MLLP: &[u8] = b"\x0bMSH|^~\\&|LAB|H|EHR|H|20260101||ORU^R01|MSG1|P|2.5.1\r\x1c\r";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn proxied(source: &str, destination: &str) -> ProxyHeader {
    ProxyHeader::Proxied {
        source: addr(source),
        destination: addr(destination),
    }
}

/// A v2 header builder that can also produce what no honest sender would.
#[derive(Clone, Debug)]
struct V2 {
    ver_cmd: u8,
    family: u8,
    addresses: Vec<u8>,
    tlvs: Vec<u8>,
    /// Replaces the computed length field.
    len: Option<u16>,
}

impl V2 {
    fn new(ver_cmd: u8, family: u8, addresses: Vec<u8>) -> Self {
        Self {
            ver_cmd,
            family,
            addresses,
            tlvs: Vec::new(),
            len: None,
        }
    }

    fn local() -> Self {
        Self::new(0x20, 0x00, Vec::new())
    }

    /// `PROXY` over TCP4 or TCP6 (both addresses must be of one family).
    fn proxy(source: SocketAddr, destination: SocketAddr) -> Self {
        let mut addresses = Vec::new();
        for ip in [source.ip(), destination.ip()] {
            match ip {
                IpAddr::V4(v4) => addresses.extend_from_slice(&v4.octets()),
                IpAddr::V6(v6) => addresses.extend_from_slice(&v6.octets()),
            }
        }
        addresses.extend_from_slice(&source.port().to_be_bytes());
        addresses.extend_from_slice(&destination.port().to_be_bytes());
        let family = if source.is_ipv4() { 0x11 } else { 0x21 };
        Self::new(0x21, family, addresses)
    }

    fn tlv(mut self, kind: u8, value: &[u8]) -> Self {
        self.tlvs.push(kind);
        self.tlvs
            .extend_from_slice(&u16::try_from(value.len()).unwrap().to_be_bytes());
        self.tlvs.extend_from_slice(value);
        self
    }

    fn raw_tail(mut self, bytes: &[u8]) -> Self {
        self.tlvs.extend_from_slice(bytes);
        self
    }

    fn len(mut self, len: u16) -> Self {
        self.len = Some(len);
        self
    }

    fn bytes(&self) -> Vec<u8> {
        let body = self.addresses.len() + self.tlvs.len();
        let len = self.len.unwrap_or_else(|| u16::try_from(body).unwrap());
        let mut out = V2_SIGNATURE.to_vec();
        out.extend_from_slice(&[self.ver_cmd, self.family]);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&self.addresses);
        out.extend_from_slice(&self.tlvs);
        out
    }
}

/// Raw bytes HAProxy 2.6.12 (Debian 12) sent to a backend, captured by the loopback probe in
/// `cli/tests/haproxy.rs` (`HAPROXY_CAPTURE=DIR`; also in `fuzz/corpus/proxy/haproxy_*`): a
/// `check-send-proxy` health check, and `send-proxy-v2` connections from 127.0.0.1:34684 to a
/// frontend on 127.0.0.1:43179 and from [::1]:46672 to [::1]:41719. No TLVs in TCP mode.
const HAPROXY_LOCAL: &[u8] = b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00";
const HAPROXY_TCP4: &[u8] =
    b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c\x7f\x00\x00\x01\x7f\x00\x00\x01\x87\x7c\xa8\xab";
const HAPROXY_TCP6: &[u8] = b"\r\n\r\n\0\r\nQUIT\n\x21\x21\x00\x24\
    \0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\x01\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\x01\xb6\x50\xa2\xf7";

/// Every valid header the tests know, the header it means, and the mode that reads it.
fn valid() -> Vec<(Vec<u8>, ProxyHeader, ProxyMode)> {
    let v4 = proxied("192.0.2.7:50123", "10.0.0.5:2575");
    let v6 = proxied("[2001:db8::7]:50123", "[2001:db8::1]:2575");
    let mut unknown_107 = b"PROXY UNKNOWN ".to_vec();
    unknown_107.resize(V1_MAX_LEN - 2, b'x');
    unknown_107.extend_from_slice(b"\r\n");
    let unix_paths = vec![b'/'; 216];
    let cases = vec![
        (
            b"PROXY TCP4 192.0.2.7 10.0.0.5 50123 2575\r\n".to_vec(),
            v4,
            ProxyMode::V1,
        ),
        (
            b"PROXY TCP6 2001:db8::7 2001:db8::1 50123 2575\r\n".to_vec(),
            v6,
            ProxyMode::V1,
        ),
        (
            b"PROXY TCP6 2001:DB8:0:0:0:0:0:7 2001:db8::1 50123 2575\r\n".to_vec(),
            v6,
            ProxyMode::V1,
        ),
        (
            b"PROXY TCP6 ::ffff:192.0.2.7 ::1 0 65535\r\n".to_vec(),
            proxied("[::ffff:192.0.2.7]:0", "[::1]:65535"),
            ProxyMode::V1,
        ),
        (
            b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n".to_vec(),
            proxied("0.0.0.0:0", "255.255.255.255:65535"),
            ProxyMode::V1,
        ),
        (
            b"PROXY UNKNOWN\r\n".to_vec(),
            ProxyHeader::Local,
            ProxyMode::V1,
        ),
        (
            b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n".to_vec(),
            ProxyHeader::Local,
            ProxyMode::V1,
        ),
        (unknown_107, ProxyHeader::Local, ProxyMode::V1),
        (V2::local().bytes(), ProxyHeader::Local, ProxyMode::V2),
        (
            // LOCAL discards whatever block follows, even a UDP family's.
            V2::new(0x20, 0x12, vec![1; 12]).bytes(),
            ProxyHeader::Local,
            ProxyMode::V2,
        ),
        (
            V2::new(0x20, 0x00, Vec::new()).raw_tail(&[0xFF; 7]).bytes(),
            ProxyHeader::Local,
            ProxyMode::V2,
        ),
        (
            V2::proxy(addr("192.0.2.7:50123"), addr("10.0.0.5:2575")).bytes(),
            v4,
            ProxyMode::V2,
        ),
        (
            V2::proxy(addr("[2001:db8::7]:50123"), addr("[2001:db8::1]:2575")).bytes(),
            v6,
            ProxyMode::V2,
        ),
        (
            // The TLVs HAProxy can send: ALPN, authority, unique id, SSL with a nested CN,
            // NOOP (empty), and an unknown custom type.
            V2::proxy(addr("192.0.2.7:50123"), addr("10.0.0.5:2575"))
                .tlv(0x01, b"h2")
                .tlv(0x02, b"mllp.example.org")
                .tlv(0x05, &[7; 128])
                .tlv(0x20, b"\x07\0\0\0\0\x22\0\x05alice")
                .tlv(0x04, b"")
                .tlv(0xE0, b"custom")
                .bytes(),
            v4,
            ProxyMode::V2,
        ),
        (
            V2::new(0x21, 0x31, unix_paths).bytes(),
            ProxyHeader::Local,
            ProxyMode::V2,
        ),
        (
            V2::new(0x21, 0x00, vec![9; 5]).bytes(),
            ProxyHeader::Local,
            ProxyMode::V2,
        ),
        (
            // Exactly the cap.
            V2::proxy(addr("192.0.2.7:50123"), addr("10.0.0.5:2575"))
                .tlv(0xE1, &vec![0; V2_MAX_LEN - V2_FIXED_LEN - 12 - 3])
                .bytes(),
            v4,
            ProxyMode::V2,
        ),
        (HAPROXY_LOCAL.to_vec(), ProxyHeader::Local, ProxyMode::V2),
        (
            HAPROXY_TCP4.to_vec(),
            proxied("127.0.0.1:34684", "127.0.0.1:43179"),
            ProxyMode::V2,
        ),
        (
            HAPROXY_TCP6.to_vec(),
            proxied("[::1]:46672", "[::1]:41719"),
            ProxyMode::V2,
        ),
    ];
    let longest = cases.iter().map(|c| c.0.len()).max().unwrap();
    assert_eq!(longest, V2_MAX_LEN, "the cap case is in the table");
    cases
}

/// The other single-version mode, which must refuse the header at its first byte.
fn other(mode: ProxyMode) -> ProxyMode {
    match mode {
        ProxyMode::V1 => ProxyMode::V2,
        _ => ProxyMode::V1,
    }
}

#[test]
fn valid_headers_at_every_split_point() {
    for (wire, header, mode) in valid() {
        let mut stream = wire.clone();
        stream.extend_from_slice(MLLP);
        let expected = Some((header, wire.len()));
        for mode in [mode, ProxyMode::Any] {
            // Two reads, split at every index.
            for split in 0..=stream.len() {
                let mut decoder = ProxyDecoder::new(mode);
                let first = decoder.decode(&stream[..split]);
                if split < wire.len() {
                    assert_eq!(first, Ok(None), "{mode:?} {wire:?} split {split}");
                } else {
                    assert_eq!(first, Ok(expected), "{mode:?} {wire:?} split {split}");
                }
                assert_eq!(decoder.decode(&stream), Ok(expected), "{wire:?} then all");
            }
            // One byte per read, on one decoder.
            let mut decoder = ProxyDecoder::new(mode);
            for end in 0..wire.len() {
                assert_eq!(
                    decoder.decode(&stream[..end]),
                    Ok(None),
                    "{wire:?} at {end}"
                );
            }
            for end in wire.len()..=stream.len() {
                assert_eq!(
                    decoder.decode(&stream[..end]),
                    Ok(expected),
                    "{wire:?} at {end}"
                );
            }
            assert_eq!(
                &stream[wire.len()..],
                MLLP,
                "the MLLP bytes stay unconsumed"
            );
        }
        assert_eq!(
            ProxyDecoder::new(other(mode)).decode(&stream[..1]),
            Err(ProxyError::NotProxy),
            "{wire:?} in the wrong mode"
        );
    }
}

/// Feeds `input` one byte at a time and asserts the first decision is `err` and comes exactly
/// when the `at`-th byte arrives; the whole input at once must give the same error.
#[track_caller]
fn rejects_at(mode: ProxyMode, input: &[u8], err: ProxyError, at: usize) {
    let mut decoder = ProxyDecoder::new(mode);
    let first = (0..=input.len())
        .map(|end| (end, decoder.decode(&input[..end])))
        .find(|(_, r)| *r != Ok(None));
    assert_eq!(first, Some((at, Err(err))), "{mode:?} {input:?}");
    assert_eq!(
        ProxyDecoder::new(mode).decode(input),
        Err(err),
        "{input:?} at once"
    );
}

#[test]
fn malformed_v1_fails_at_the_first_impossible_byte() {
    use ProxyError::*;
    let prefix = b"PROXY TCP4 1.2.3.4 5.6.7.8 ".len();
    let mut too_long = b"PROXY UNKNOWN ".to_vec();
    too_long.resize(V1_MAX_LEN + 20, b'x');
    let cases: &[(&[u8], ProxyError, usize)] = &[
        (b"GET / HTTP/1.1\r\n", NotProxy, 1),
        (b"\x0bMSH|^~\\&|", NotProxy, 1),
        (b"proxy TCP4", NotProxy, 1),
        (b"PROXZ TCP4", NotProxy, 5),
        (b"PROXY\r\n", NotProxy, 6),
        (b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n", V1Protocol, 7),
        (b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n", V1Protocol, 7),
        (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", V1Protocol, 10),
        (b"PROXY TCP 1.2.3.4 5.6.7.8 1 2\r\n", V1Protocol, 10),
        (b"PROXY UNKNOWNX\r\n", V1Protocol, 14),
        (b"PROXY \r\n", V1Protocol, 8),
        (b"PROXY TCP4\r\n", V1Fields, 12),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", V1Fields, prefix + 3),
        (
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
            V1Fields,
            prefix + 4,
        ),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \r\n", V1Port, prefix + 4),
        (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", V1Address, 20),
        (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", V1Address, 20),
        (b"PROXY TCP4 1.2.3.4.5 5.6.7.8 1 2\r\n", V1Address, 21),
        (b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", V1Address, 17),
        (b"PROXY TCP4 256.2.3.4 5.6.7.8 1 2\r\n", V1Address, 21),
        (b"PROXY TCP4 ::1 ::1 1 2\r\n", V1Address, 12),
        (b"PROXY TCP4 1.2.3.4\t5.6.7.8 1 2\r\n", V1Address, 19),
        (b"PROXY TCP4 1111.2.3.4.5.6.7.8 ::1 1 2\r\n", V1Address, 27),
        (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", V1Address, 19),
        (b"PROXY TCP6 ::1 ::g 1 2\r\n", V1Address, 18),
        (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", V1Address, 19),
        (b"PROXY TCP6 :::1 ::1 1 2\r\n", V1Address, 16),
        (
            b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
            V1Port,
            prefix + 5,
        ),
        (
            b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 2\r\n",
            V1Port,
            prefix + 5,
        ),
        (
            b"PROXY TCP4 1.2.3.4 5.6.7.8 123456 2\r\n",
            V1Port,
            prefix + 6,
        ),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 0123 2\r\n", V1Port, prefix + 2),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 00 2\r\n", V1Port, prefix + 2),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", V1Port, prefix + 1),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 -2\r\n", V1Port, prefix + 3),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n", V1Port, prefix + 5),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX", V1Port, prefix + 5),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", V1LineEnd, prefix + 4),
        (b"PROXY UNKNOWN\n", V1LineEnd, 14),
        (&too_long, V1TooLong, V1_MAX_LEN),
    ];
    for &(input, err, at) in cases {
        rejects_at(ProxyMode::V1, input, err, at);
        rejects_at(ProxyMode::Any, input, err, at);
    }
    // A v1 header on a v2-only listener is refused at its first byte.
    rejects_at(ProxyMode::V2, b"PROXY UNKNOWN\r\n", NotProxy, 1);
}

#[test]
fn malformed_v2_fails_at_the_first_impossible_byte() {
    use ProxyError::*;
    let tcp4 = || V2::proxy(addr("192.0.2.7:1"), addr("10.0.0.5:2"));
    let mut bad_sig = V2::local().bytes();
    bad_sig[6] = b'X';
    let cases: Vec<(Vec<u8>, ProxyError, usize)> = vec![
        (bad_sig, NotProxy, 7),
        (b"\r\n\r\n\0\r\nQUIT\r".to_vec(), NotProxy, 12),
        (b"\r\r".to_vec(), NotProxy, 2),
        (V2::new(0x11, 0x11, vec![0; 12]).bytes(), V2Version(1), 13),
        (V2::new(0x31, 0x11, vec![0; 12]).bytes(), V2Version(3), 13),
        (V2::new(0x01, 0x00, vec![]).bytes(), V2Version(0), 13),
        (V2::new(0x22, 0x11, vec![0; 12]).bytes(), V2Command(2), 13),
        (V2::new(0x2F, 0x11, vec![0; 12]).bytes(), V2Command(15), 13),
        (V2::new(0x21, 0x13, vec![0; 12]).bytes(), V2Family(0x13), 14),
        (V2::new(0x21, 0x10, vec![0; 12]).bytes(), V2Family(0x10), 14),
        (V2::new(0x21, 0x01, vec![0; 12]).bytes(), V2Family(0x01), 14),
        (V2::new(0x21, 0x41, vec![0; 12]).bytes(), V2Family(0x41), 14),
        (V2::new(0x20, 0x40, vec![]).bytes(), V2Family(0x40), 14),
        (V2::new(0x21, 0x12, vec![0; 12]).bytes(), V2Datagram, 14),
        (V2::new(0x21, 0x22, vec![0; 36]).bytes(), V2Datagram, 14),
        (V2::new(0x21, 0x32, vec![0; 216]).bytes(), V2Datagram, 14),
        (tcp4().len(0xFFFF).bytes(), V2TooLarge { len: 65551 }, 16),
        (
            tcp4().len((V2_MAX_LEN - V2_FIXED_LEN + 1) as u16).bytes(),
            V2TooLarge {
                len: V2_MAX_LEN + 1,
            },
            16,
        ),
        (
            V2::local()
                .len((V2_MAX_LEN - V2_FIXED_LEN + 1) as u16)
                .bytes(),
            V2TooLarge {
                len: V2_MAX_LEN + 1,
            },
            16,
        ),
        (
            tcp4().len(11).bytes(),
            V2AddressLength {
                family: 0x11,
                len: 11,
            },
            16,
        ),
        (
            V2::new(0x21, 0x21, vec![0; 36]).len(35).bytes(),
            V2AddressLength {
                family: 0x21,
                len: 35,
            },
            16,
        ),
        (
            V2::new(0x21, 0x31, vec![0; 216]).len(36).bytes(),
            V2AddressLength {
                family: 0x31,
                len: 36,
            },
            16,
        ),
        (tcp4().raw_tail(&[0x01, 0x00]).bytes(), V2Tlv, 30),
        (
            tcp4().raw_tail(&[0x01, 0x00, 0x05, 1, 2, 3, 4]).bytes(),
            V2Tlv,
            35,
        ),
        (tcp4().tlv(0x01, b"h2").raw_tail(&[0x04]).bytes(), V2Tlv, 34),
    ];
    for (input, err, at) in cases {
        rejects_at(ProxyMode::V2, &input, err, at);
        rejects_at(ProxyMode::Any, &input, err, at);
    }
    rejects_at(ProxyMode::V1, &V2::local().bytes(), NotProxy, 1);
}

#[test]
fn truncated_headers_wait_and_never_claim_bytes() {
    for (wire, _, mode) in valid() {
        for end in 0..wire.len() {
            assert_eq!(ProxyDecoder::new(mode).decode(&wire[..end]), Ok(None));
        }
    }
}

#[test]
fn a_decided_decoder_repeats_its_decision() {
    let wire = encode_v2(&proxied("192.0.2.7:1", "10.0.0.5:2"));
    let mut decoder = ProxyDecoder::new(ProxyMode::Any);
    let first = decoder.decode(&wire);
    assert!(matches!(first, Ok(Some(_))));
    assert_eq!(decoder.decode(&wire), first);
    let mut decoder = ProxyDecoder::new(ProxyMode::Any);
    assert_eq!(decoder.decode(b"\x0b"), Err(ProxyError::NotProxy));
    assert_eq!(decoder.decode(b"\x0bMSH"), Err(ProxyError::NotProxy));
}

#[test]
fn encoders_write_the_spec_forms() {
    let v4 = proxied("192.0.2.7:50123", "10.0.0.5:2575");
    assert_eq!(
        encode_v1(&v4),
        b"PROXY TCP4 192.0.2.7 10.0.0.5 50123 2575\r\n"
    );
    assert_eq!(encode_v1(&ProxyHeader::Local), b"PROXY UNKNOWN\r\n");
    assert_eq!(encode_v2(&ProxyHeader::Local), HAPROXY_LOCAL);
    assert_eq!(
        encode_v2(&proxied("127.0.0.1:34684", "127.0.0.1:43179")),
        HAPROXY_TCP4,
        "byte for byte what HAProxy sends"
    );
    assert_eq!(
        encode_v2(&proxied("[::1]:46672", "[::1]:41719")),
        HAPROXY_TCP6
    );
    // Mixed families become TCP6 with the IPv4 side mapped, as HAProxy does.
    let mixed = proxied("192.0.2.7:1", "[2001:db8::1]:2");
    assert_eq!(
        encode_v1(&mixed),
        b"PROXY TCP6 ::ffff:192.0.2.7 2001:db8::1 1 2\r\n"
    );
    let mapped = proxied("[::ffff:192.0.2.7]:1", "[2001:db8::1]:2");
    for wire in [encode_v1(&mixed), encode_v2(&mixed)] {
        let decoded = ProxyDecoder::new(ProxyMode::Any).decode(&wire);
        assert_eq!(decoded, Ok(Some((mapped, wire.len()))));
    }
}

#[test]
fn errors_display_and_label() {
    let all = [
        ProxyError::NotProxy,
        ProxyError::V1TooLong,
        ProxyError::V1Protocol,
        ProxyError::V1Address,
        ProxyError::V1Port,
        ProxyError::V1Fields,
        ProxyError::V1LineEnd,
        ProxyError::V2Version(1),
        ProxyError::V2Command(2),
        ProxyError::V2Family(0x13),
        ProxyError::V2Datagram,
        ProxyError::V2TooLarge { len: 5000 },
        ProxyError::V2AddressLength {
            family: 0x11,
            len: 3,
        },
        ProxyError::V2Tlv,
    ];
    let mut labels = std::collections::HashSet::new();
    for e in all {
        let text = e.to_string();
        assert!(!text.ends_with('.'), "{text}");
        assert!(labels.insert(e.as_str()), "duplicate label {}", e.as_str());
    }
    assert_eq!(
        ProxyError::V2TooLarge { len: 5000 }.to_string(),
        "PROXY v2 header of 5000 bytes exceeds 4096"
    );
}

#[test]
fn fuzz_entry_point_on_hand_picked_inputs() {
    __fuzz_decode(b"");
    for (wire, _, _) in valid() {
        for selector in 0..3u8 {
            let mut data = vec![selector];
            data.extend_from_slice(&wire);
            data.extend_from_slice(MLLP);
            __fuzz_decode(&data);
            __fuzz_decode(&data[..data.len() / 2]);
        }
    }
    __fuzz_decode(b"\x02PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n");
    __fuzz_decode(b"\x01\r\n\r\n\0\r\nQUIT\n\x21\x11\xff\xff");
}

fn arb_ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<[u8; 4]>().prop_map(IpAddr::from),
        any::<[u8; 16]>().prop_map(IpAddr::from),
        any::<[u8; 4]>().prop_map(|o| IpAddr::V6(std::net::Ipv4Addr::from(o).to_ipv6_mapped())),
    ]
}

fn arb_header() -> impl Strategy<Value = ProxyHeader> {
    prop_oneof![
        1 => Just(ProxyHeader::Local),
        6 => (arb_ip(), any::<u16>(), arb_ip(), any::<u16>()).prop_map(|(s, sp, d, dp)| {
            ProxyHeader::Proxied {
                source: SocketAddr::new(s, sp),
                destination: SocketAddr::new(d, dp),
            }
        }),
    ]
}

/// What a header reads back as after encoding: mixed families become IPv6.
fn normalized(header: ProxyHeader) -> ProxyHeader {
    match same_family(&header) {
        None => ProxyHeader::Local,
        Some((source, destination)) => ProxyHeader::Proxied {
            source,
            destination,
        },
    }
}

proptest! {
    #[test]
    fn encode_decode_round_trip(
        header in arb_header(),
        tail in proptest::collection::vec(any::<u8>(), 0..64),
        split in any::<prop::sample::Index>(),
    ) {
        for (wire, mode) in [(encode_v1(&header), ProxyMode::V1), (encode_v2(&header), ProxyMode::V2)] {
            prop_assert!(wire.len() <= MAX_HEADER_LEN);
            let mut stream = wire.clone();
            stream.extend_from_slice(&tail);
            let expected = Ok(Some((normalized(header), wire.len())));
            for mode in [mode, ProxyMode::Any] {
                let mut decoder = ProxyDecoder::new(mode);
                let at = split.index(stream.len() + 1);
                let first = decoder.decode(&stream[..at]);
                if at < wire.len() {
                    prop_assert_eq!(first, Ok(None));
                } else {
                    prop_assert_eq!(first, expected);
                }
                prop_assert_eq!(decoder.decode(&stream), expected);
            }
        }
    }

    #[test]
    fn v2_tlvs_are_skipped(
        header in arb_header(),
        tlvs in proptest::collection::vec(
            (any::<u8>(), proptest::collection::vec(any::<u8>(), 0..300)),
            0..8,
        ),
    ) {
        let Some((source, destination)) = same_family(&header) else {
            return Ok(());
        };
        let mut builder = V2::proxy(source, destination);
        for (kind, value) in &tlvs {
            builder = builder.tlv(*kind, value);
        }
        let wire = builder.bytes();
        let mut stream = wire.clone();
        stream.extend_from_slice(MLLP);
        prop_assert_eq!(
            ProxyDecoder::new(ProxyMode::V2).decode(&stream),
            Ok(Some((normalized(header), wire.len())))
        );
        __fuzz_decode(&[&[1u8][..], &stream].concat());
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_agree(
        selector in 0..3u8,
        bytes in proptest::collection::vec(any::<u8>(), 0..200),
    ) {
        let mut data = vec![selector];
        data.extend_from_slice(&bytes);
        __fuzz_decode(&data);
    }

    #[test]
    fn one_corrupted_byte_never_panics_and_agrees(
        index in 0..3usize,
        at in any::<prop::sample::Index>(),
        value in any::<u8>(),
    ) {
        let (wire, _, _) = valid().swap_remove(index * 5);
        let mut data = vec![2u8];
        data.extend_from_slice(&wire);
        let i = 1 + at.index(wire.len());
        data[i] = value;
        __fuzz_decode(&data);
    }
}
