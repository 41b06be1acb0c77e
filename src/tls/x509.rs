//! The few X.509 fields we read: subject CN, subject alternative names and validity.
//!
//! A minimal DER walk (X.690 definite lengths only) over RFC 5280 §4.1. We do not verify
//! anything here: webpki has already verified a peer's chain before we look at its leaf, and our
//! own certificate is only checked for its dates. A full parser (x509-parser) would add nom,
//! der-parser, asn1-rs, time and more to the `tls` feature for four fields; this walk is about
//! 250 lines, never allocates more than the strings it returns, and is fuzzed (`tls` target).
//!
//! ```text
//! Certificate  ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signatureValue }
//! TBSCertificate ::= SEQUENCE {
//!     [0] EXPLICIT version OPTIONAL, serialNumber INTEGER, signature AlgorithmIdentifier,
//!     issuer Name, validity SEQUENCE { notBefore Time, notAfter Time }, subject Name,
//!     subjectPublicKeyInfo, [1] issuerUID OPTIONAL, [2] subjectUID OPTIONAL,
//!     [3] EXPLICIT extensions SEQUENCE OF Extension OPTIONAL }
//! Name ::= SEQUENCE OF SET OF SEQUENCE { type OID, value ANY }
//! Extension ::= SEQUENCE { extnID OID, critical BOOLEAN DEFAULT FALSE, extnValue OCTET STRING }
//! ```

use crate::identity::SubjectAltName;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// DER tags used below (X.690 §8, RFC 5280 §4.1 and §4.2.1.6).
const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;
const INTEGER: u8 = 0x02;
const OCTET_STRING: u8 = 0x04;
const BOOLEAN: u8 = 0x01;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;
const VERSION: u8 = 0xA0;
const ISSUER_UID: u8 = 0x81;
const SUBJECT_UID: u8 = 0x82;
const EXTENSIONS: u8 = 0xA3;
/// GeneralName choices (context-specific, primitive, IMPLICIT).
const SAN_EMAIL: u8 = 0x81;
const SAN_DNS: u8 = 0x82;
const SAN_URI: u8 = 0x86;
const SAN_IP: u8 = 0x87;

/// `id-at-commonName` (2.5.4.3), content octets.
const OID_COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];
/// `id-ce-subjectAltName` (2.5.29.17), content octets.
const OID_SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1D, 0x11];

/// A certificate that this walk cannot read (truncated or malformed DER).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DerError;

/// What we read from one certificate.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct CertInfo {
    /// The last CN of the subject (the most specific one, RFC 6125 §6.4.4), if any.
    pub(crate) common_name: Option<String>,
    /// Subject alternative names we understand, in certificate order.
    pub(crate) sans: Vec<SubjectAltName>,
    /// notBefore, seconds since the Unix epoch.
    pub(crate) not_before: i64,
    /// notAfter, seconds since the Unix epoch.
    pub(crate) not_after: i64,
}

/// Reads the subject CN, SANs and validity of a DER certificate.
pub(crate) fn parse(der: &[u8]) -> Result<CertInfo, DerError> {
    let mut input = der;
    let cert = expect(&mut input, SEQUENCE)?;
    let mut cert = cert;
    let mut tbs = expect(&mut cert, SEQUENCE)?;
    if peek_tag(tbs) == Some(VERSION) {
        next(&mut tbs)?;
    }
    expect(&mut tbs, INTEGER)?; // serialNumber
    expect(&mut tbs, SEQUENCE)?; // signature
    expect(&mut tbs, SEQUENCE)?; // issuer
    let mut validity = expect(&mut tbs, SEQUENCE)?;
    let not_before = time(&mut validity)?;
    let not_after = time(&mut validity)?;
    let subject = expect(&mut tbs, SEQUENCE)?;
    expect(&mut tbs, SEQUENCE)?; // subjectPublicKeyInfo
    let mut info = CertInfo {
        common_name: common_name(subject)?,
        sans: Vec::new(),
        not_before,
        not_after,
    };
    while let Some(tag) = peek_tag(tbs) {
        let (_, value) = next(&mut tbs)?;
        match tag {
            ISSUER_UID | SUBJECT_UID => {}
            EXTENSIONS => {
                let mut value = value;
                info.sans = subject_alt_names(expect(&mut value, SEQUENCE)?)?;
            }
            _ => return Err(DerError),
        }
    }
    Ok(info)
}

/// The value of the last `commonName` attribute in a Name's content.
fn common_name(mut name: &[u8]) -> Result<Option<String>, DerError> {
    let mut found = None;
    while !name.is_empty() {
        let mut rdn = expect(&mut name, SET)?;
        while !rdn.is_empty() {
            let mut attribute = expect(&mut rdn, SEQUENCE)?;
            let oid = expect(&mut attribute, OID)?;
            let (tag, value) = next(&mut attribute)?;
            if oid == OID_COMMON_NAME {
                found = Some(directory_string(tag, value));
            }
        }
    }
    Ok(found)
}

/// A DirectoryString (RFC 5280 §4.1.2.4) as text. UTF8String, PrintableString, IA5String and
/// TeletexString are read as UTF-8 (invalid bytes replaced); BMPString as UTF-16BE.
fn directory_string(tag: u8, value: &[u8]) -> String {
    const BMP_STRING: u8 = 0x1E;
    if tag == BMP_STRING {
        let units = value
            .chunks_exact(2)
            .map(|pair| u16::from_be_bytes([pair[0], pair[1]]));
        char::decode_utf16(units)
            .map(|c| c.unwrap_or(char::REPLACEMENT_CHARACTER))
            .collect()
    } else {
        String::from_utf8_lossy(value).into_owned()
    }
}

/// The SANs from the content of an `Extensions` SEQUENCE; empty if there is no SAN extension.
fn subject_alt_names(mut extensions: &[u8]) -> Result<Vec<SubjectAltName>, DerError> {
    let mut sans = Vec::new();
    while !extensions.is_empty() {
        let mut extension = expect(&mut extensions, SEQUENCE)?;
        let oid = expect(&mut extension, OID)?;
        if peek_tag(extension) == Some(BOOLEAN) {
            next(&mut extension)?;
        }
        let mut value = expect(&mut extension, OCTET_STRING)?;
        if oid != OID_SUBJECT_ALT_NAME {
            continue;
        }
        let mut names = expect(&mut value, SEQUENCE)?;
        while !names.is_empty() {
            let (tag, name) = next(&mut names)?;
            let text = || String::from_utf8_lossy(name).into_owned();
            let san = match tag {
                SAN_DNS => SubjectAltName::Dns(text()),
                SAN_EMAIL => SubjectAltName::Email(text()),
                SAN_URI => SubjectAltName::Uri(text()),
                SAN_IP => match *name {
                    [a, b, c, d] => SubjectAltName::Ip(IpAddr::V4(Ipv4Addr::new(a, b, c, d))),
                    _ => match <[u8; 16]>::try_from(name) {
                        Ok(octets) => SubjectAltName::Ip(IpAddr::V6(Ipv6Addr::from(octets))),
                        Err(_) => continue, // not an address: skip it, as webpki does
                    },
                },
                // otherName, x400Address, directoryName, ediPartyName, registeredID: skipped.
                _ => continue,
            };
            sans.push(san);
        }
    }
    Ok(sans)
}

/// A `Time` (UTCTime or GeneralizedTime, RFC 5280 §4.1.2.5) as seconds since the Unix epoch.
fn time(input: &mut &[u8]) -> Result<i64, DerError> {
    let (tag, value) = next(input)?;
    let digits = |range: std::ops::Range<usize>| -> Result<i64, DerError> {
        let bytes = value.get(range).ok_or(DerError)?;
        bytes.iter().try_fold(0i64, |acc, &b| {
            if b.is_ascii_digit() {
                Ok(acc * 10 + i64::from(b - b'0'))
            } else {
                Err(DerError)
            }
        })
    };
    // RFC 5280: UTCTime is YYMMDDHHMMSSZ (YY < 50 means 20YY), GeneralizedTime
    // YYYYMMDDHHMMSSZ; both in UTC, with seconds and without fractions.
    let (year, rest) = match (tag, value.len()) {
        (UTC_TIME, 13) => {
            let yy = digits(0..2)?;
            (if yy < 50 { 2000 + yy } else { 1900 + yy }, 2)
        }
        (GENERALIZED_TIME, 15) => (digits(0..4)?, 4),
        _ => return Err(DerError),
    };
    if value.last() != Some(&b'Z') {
        return Err(DerError);
    }
    let month = digits(rest..rest + 2)?;
    let day = digits(rest + 2..rest + 4)?;
    let hour = digits(rest + 4..rest + 6)?;
    let minute = digits(rest + 6..rest + 8)?;
    let second = digits(rest + 8..rest + 10)?;
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return Err(DerError);
    }
    let days = crate::date::days_from_civil(year, month, day);
    Ok(days * 86_400 + hour * 3_600 + minute * 60 + second.min(60))
}

/// Seconds since the Unix epoch as `YYYY-MM-DDTHH:MM:SSZ` (for error messages; times before
/// 1970 show as 1970-01-01T00:00:00Z).
pub(crate) fn format_time(secs: i64) -> String {
    let secs = u64::try_from(secs).unwrap_or(0);
    let (year, month, day) = crate::date::civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3_600,
        rem / 60 % 60,
        rem % 60
    )
}

/// The tag of the next element, if any.
fn peek_tag(input: &[u8]) -> Option<u8> {
    input.first().copied()
}

/// The content of the next element, which must have tag `tag`.
fn expect<'a>(input: &mut &'a [u8], tag: u8) -> Result<&'a [u8], DerError> {
    match next(input)? {
        (t, value) if t == tag => Ok(value),
        _ => Err(DerError),
    }
}

/// Splits the next TLV off `input`: its tag and content. Single-byte tags and definite lengths
/// of up to four octets (4 GiB, far above any certificate) only, as DER requires for X.509.
fn next<'a>(input: &mut &'a [u8]) -> Result<(u8, &'a [u8]), DerError> {
    let (&tag, rest) = input.split_first().ok_or(DerError)?;
    if tag & 0x1F == 0x1F {
        return Err(DerError); // multi-byte tag: never used in the structures we read
    }
    let (&first, mut rest) = rest.split_first().ok_or(DerError)?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let count = usize::from(first & 0x7F);
        if count == 0 || count > 4 || rest.len() < count {
            return Err(DerError); // indefinite (BER only) or absurd length
        }
        let (octets, tail) = rest.split_at(count);
        rest = tail;
        octets
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b))
    };
    if rest.len() < len {
        return Err(DerError);
    }
    let (value, tail) = rest.split_at(len);
    *input = tail;
    Ok((tag, value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::date::days_from_civil;

    #[test]
    fn civil_dates_round_trip() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        for secs in [0, 951_782_400, 4_102_444_799, 253_402_300_799] {
            let text = format_time(secs);
            let year: i64 = text[0..4].parse().unwrap();
            let month: i64 = text[5..7].parse().unwrap();
            let day: i64 = text[8..10].parse().unwrap();
            assert_eq!(
                days_from_civil(year, month, day),
                secs.div_euclid(86_400),
                "{text}"
            );
        }
        assert_eq!(format_time(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_time(-1), "1970-01-01T00:00:00Z");
    }

    #[test]
    fn lengths_and_truncation() {
        assert_eq!(next(&mut &[0x04, 0x01, 0xAA][..]), Ok((0x04, &[0xAA][..])));
        assert_eq!(
            next(&mut &[0x04, 0x81, 0x01, 0xAA][..]),
            Ok((0x04, &[0xAA][..]))
        );
        assert_eq!(next(&mut &[0x04, 0x02, 0xAA][..]), Err(DerError));
        assert_eq!(next(&mut &[0x04, 0x80][..]), Err(DerError));
        assert_eq!(next(&mut &[0x04, 0x85, 1, 1, 1, 1, 1][..]), Err(DerError));
        assert_eq!(next(&mut &[0x1F, 0x01, 0x00][..]), Err(DerError));
        assert_eq!(next(&mut &[][..]), Err(DerError));
    }

    #[test]
    fn times() {
        assert_eq!(time(&mut &b"\x17\x0d700101000000Z"[..]), Ok(0));
        assert_eq!(time(&mut &b"\x17\x0d491231235959Z"[..]), Ok(2_524_607_999));
        assert_eq!(
            time(&mut &b"\x18\x0f99991231235959Z"[..]),
            Ok(253_402_300_799)
        );
        assert_eq!(time(&mut &b"\x17\x0d7001010000000"[..]), Err(DerError));
        assert_eq!(time(&mut &b"\x17\x0d701301000000Z"[..]), Err(DerError));
        assert_eq!(time(&mut &b"\x18\x0d700101000000Z"[..]), Err(DerError));
    }

    #[test]
    fn bmp_string_common_name() {
        assert_eq!(directory_string(0x1E, &[0x00, b'L', 0x00, b'a']), "La");
        assert_eq!(directory_string(0x0C, "Läb".as_bytes()), "Läb");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for len in 0..64 {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + 0x30) as u8).collect();
            let _ = parse(&bytes);
        }
    }
}
