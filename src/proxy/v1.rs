//! PROXY v1: one text line (spec §2.1).
//!
//! ```text
//! PROXY TCP4 192.0.2.7 10.0.0.5 50123 2575\r\n
//! PROXY TCP6 2001:db8::7 2001:db8::1 50123 2575\r\n
//! PROXY UNKNOWN[ anything]\r\n
//! ```
//!
//! Fields are separated by exactly one space. The same walk checks a complete line and a
//! partial one: in a partial line the last field may still grow, so it is checked only as a
//! prefix (charset, length, value so far). Every prefix check is implied by the full check and
//! fails with the same error, and fields are checked left to right, so feeding a line byte by
//! byte fails at the first impossible byte with the error a one-shot parse reports.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::{ProxyError, ProxyHeader, Step, V1_MAX_LEN};

/// What every v1 header starts with.
const SIGNATURE: &[u8] = b"PROXY ";
/// Longest IPv4 text: `255.255.255.255`.
const MAX_V4_TEXT: usize = 15;
/// Longest IPv6 text: `ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255` (8 × 4 + 7 = 39 without
/// an embedded IPv4 address).
const MAX_V6_TEXT: usize = 45;
/// Longest port text: `65535`.
const MAX_PORT_TEXT: usize = 5;

/// Decodes a v1 header from `buf` (whose first byte is `P`).
pub(super) fn decode(buf: &[u8]) -> Result<Step, ProxyError> {
    // Spec §2.1: the receiver reads at most 107 bytes looking for the CRLF.
    let window = &buf[..buf.len().min(V1_MAX_LEN)];
    let seen = window.len().min(SIGNATURE.len());
    if window[..seen] != SIGNATURE[..seen] {
        return Err(ProxyError::NotProxy);
    }
    match memchr::memchr(b'\n', window) {
        Some(lf) => {
            // The signature check above guarantees `lf >= SIGNATURE.len()`: a LF earlier would
            // have mismatched the signature.
            let (body, crlf) = match window[..lf].strip_suffix(b"\r") {
                Some(body) => (body, true),
                None => (&window[..lf], false),
            };
            let header = fields(&body[SIGNATURE.len()..], true)?.ok_or(ProxyError::V1Fields)?;
            if !crlf {
                return Err(ProxyError::V1LineEnd);
            }
            Ok(Step::Done(header, lf + 1))
        }
        None => {
            // A trailing CR may be the first half of the CRLF: check what precedes it.
            let body = window.strip_suffix(b"\r").unwrap_or(window);
            if body.len() >= SIGNATURE.len() {
                fields(&body[SIGNATURE.len()..], false)?;
            }
            if window.len() == V1_MAX_LEN {
                return Err(ProxyError::V1TooLong);
            }
            Ok(Step::Need(buf.len() + 1))
        }
    }
}

/// Which IP version a `TCP4`/`TCP6` line carries.
#[derive(Clone, Copy)]
enum Family {
    V4,
    V6,
}

/// Walks the fields after `PROXY `. With `complete`, `rest` is the whole line before its CRLF
/// and the result is the header; without, `rest` is what has arrived so far and the result is
/// `None` unless the line is already decided (`UNKNOWN` is, once its field ends).
fn fields(rest: &[u8], complete: bool) -> Result<Option<ProxyHeader>, ProxyError> {
    let mut parts = rest.split(|&b| b == b' ').peekable();
    // `split` yields at least one (possibly empty) part; a part is final when another follows
    // it or when the line is complete.
    let mut next = || {
        parts.next().map(|part| {
            let done = complete || parts.peek().is_some();
            (part, done)
        })
    };

    let Some((protocol, done)) = next() else {
        return Ok(None);
    };
    let family = match (protocol, done) {
        (b"TCP4", true) => Family::V4,
        (b"TCP6", true) => Family::V6,
        // Spec §2.1: after UNKNOWN the receiver ignores everything up to the CRLF.
        (b"UNKNOWN", true) => return Ok(Some(ProxyHeader::Local)),
        (p, false)
            if [&b"TCP4"[..], b"TCP6", b"UNKNOWN"]
                .iter()
                .any(|k| k.starts_with(p)) =>
        {
            return Ok(None);
        }
        _ => return Err(ProxyError::V1Protocol),
    };

    let mut ips = [IpAddr::V4(Ipv4Addr::UNSPECIFIED); 2];
    for ip in &mut ips {
        match next() {
            Some((text, true)) => *ip = address(text, family)?,
            Some((text, false)) => return address_prefix(text, family).map(|()| None),
            None if complete => return Err(ProxyError::V1Fields),
            None => return Ok(None),
        }
    }
    let mut ports = [0u16; 2];
    for port_out in &mut ports {
        match next() {
            Some((text, true)) => *port_out = port(text, true)?,
            Some((text, false)) => return port(text, false).map(|_| None),
            None if complete => return Err(ProxyError::V1Fields),
            None => return Ok(None),
        }
    }
    if next().is_some() {
        return Err(ProxyError::V1Fields);
    }
    Ok(Some(ProxyHeader::Proxied {
        source: SocketAddr::new(ips[0], ports[0]),
        destination: SocketAddr::new(ips[1], ports[1]),
    }))
}

/// A complete address field. `std`'s parsers match the spec's canonical forms: dotted quads
/// without leading zeros, and IPv6 groups with at most one `::` (an embedded IPv4 tail, which
/// `inet_pton` also accepts, is allowed).
fn address(text: &[u8], family: Family) -> Result<IpAddr, ProxyError> {
    let text = std::str::from_utf8(text).map_err(|_| ProxyError::V1Address)?;
    match family {
        Family::V4 => text.parse::<Ipv4Addr>().map(IpAddr::V4),
        Family::V6 => text.parse::<Ipv6Addr>().map(IpAddr::V6),
    }
    .map_err(|_| ProxyError::V1Address)
}

/// An address field still arriving: only its charset and length can be judged yet.
fn address_prefix(text: &[u8], family: Family) -> Result<(), ProxyError> {
    let (max, allowed): (usize, fn(&u8) -> bool) = match family {
        Family::V4 => (MAX_V4_TEXT, |b| b.is_ascii_digit() || *b == b'.'),
        Family::V6 => (MAX_V6_TEXT, |b| {
            b.is_ascii_hexdigit() || *b == b':' || *b == b'.'
        }),
    };
    if text.len() <= max && text.iter().all(allowed) {
        Ok(())
    } else {
        Err(ProxyError::V1Address)
    }
}

/// A port field: decimal 0–65535 without leading zeros (spec §2.1). With `complete`, it must
/// also be non-empty.
fn port(text: &[u8], complete: bool) -> Result<u16, ProxyError> {
    let well_formed = text.len() <= MAX_PORT_TEXT
        && text.iter().all(u8::is_ascii_digit)
        && !(text.len() > 1 && text[0] == b'0')
        && !(complete && text.is_empty());
    if !well_formed {
        return Err(ProxyError::V1Port);
    }
    let value = text
        .iter()
        .fold(0u32, |acc, d| acc * 10 + u32::from(d - b'0'));
    u16::try_from(value).map_err(|_| ProxyError::V1Port)
}
