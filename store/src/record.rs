//! What is kept per message: [`Record`] goes in, [`StoredRecord`] comes out.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use memchr::{memchr_iter, memchr2};
use mllp_reactor::msh::Msh;
use mllp_reactor::{Context, PeerIdentity};

/// A record's id: increases in commit order and is never reused (SQLite `AUTOINCREMENT`;
/// PostgreSQL: an identity column, allocated under the store's lock).
///
/// Ids visible to a reader always form a prefix of the ids ever committed (one writer at a
/// time; with PostgreSQL, one batch at a time across all nodes), so "everything after id N"
/// is a safe export cursor.
pub type StoreId = i64;

/// Where and when a message arrived: the metadata stored next to its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Origin {
    /// When its last byte was read (wall clock; stored as UTC microseconds).
    pub received_at: SystemTime,
    /// The sending system's address.
    pub peer: SocketAddr,
    /// The local address the connection was accepted on.
    pub local: SocketAddr,
    /// The server's id of the connection ([`mllp_reactor::ConnectionId::as_u64`]).
    pub connection_id: u64,
    /// The message's sequence number on its connection, from 0.
    pub sequence: u64,
}

impl Origin {
    /// The origin of the message a handler was given.
    pub fn from_context(cx: &Context) -> Self {
        Self {
            received_at: cx.received_time(),
            peer: cx.peer_addr(),
            local: cx.local_addr(),
            connection_id: cx.connection_id().as_u64(),
            sequence: cx.sequence(),
        }
    }
}

/// One message to store: its exact bytes and its [`Origin`].
///
/// Building one copies nothing and parses nothing (it is built on the server's I/O or handler
/// thread); the MSH fields are read by the store's writer thread through [`Record::header`].
///
/// ```
/// use std::time::SystemTime;
/// use bytes::Bytes;
/// use mllp_store::{Origin, Record};
///
/// let origin = Origin {
///     received_at: SystemTime::now(),
///     peer: "10.0.0.7:40000".parse()?,
///     local: "10.0.0.1:2575".parse()?,
///     connection_id: 1,
///     sequence: 0,
/// };
/// let record = Record::new(Bytes::from_static(b"MSH|^~\\&|LAB|HOSP|EHR|HOSP|||ADT^A01|42|P|2.5\r"), origin);
/// let header = record.header();
/// assert_eq!(header.sending_application, Some(&b"LAB"[..]));
/// assert_eq!(header.message_type, Some(&b"ADT^A01"[..]));
/// assert_eq!(header.control_id, Some(&b"42"[..]));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The payload exactly as received (MLLP framing removed).
    pub payload: Bytes,
    /// Where and when it arrived.
    pub origin: Origin,
    /// The sender's verified client certificate, under mutual TLS (`None` otherwise). Stored
    /// as its one-line form (`CN=… DNS:… sha256:…`, see [`PeerIdentity`]): an audit can tell
    /// which system sent what.
    pub client_cert: Option<Arc<PeerIdentity>>,
}

impl Record {
    /// A record of `payload` received as `origin` says.
    pub fn new(payload: Bytes, origin: Origin) -> Self {
        Self {
            payload,
            origin,
            client_cert: None,
        }
    }

    /// The record of a message given to a handler (`payload.clone()` costs a reference count),
    /// with the client certificate under mutual TLS.
    pub fn from_message(payload: Bytes, cx: &Context) -> Self {
        Self {
            client_cert: cx.peer_identity_shared(),
            ..Self::new(payload, Origin::from_context(cx))
        }
    }

    /// The client certificate as stored (see [`client_cert`](Self::client_cert)).
    pub(crate) fn client_cert_text(&self) -> Option<String> {
        self.client_cert.as_ref().map(|id| id.to_string())
    }

    /// Payload size in bytes.
    pub fn size(&self) -> usize {
        self.payload.len()
    }

    /// The MSH fields that are stored in their own columns, read from the payload.
    pub fn header(&self) -> Header<'_> {
        Header::parse(&self.payload)
    }

    /// Received time as microseconds since the Unix epoch, UTC (negative before 1970).
    pub fn received_at_us(&self) -> i64 {
        system_time_to_us(self.origin.received_at)
    }
}

/// The MSH fields a store keeps in columns, borrowed raw from the payload.
///
/// A field that is missing or empty, or a message without a readable MSH, gives `None`
/// (stored as NULL). Escape sequences are not decoded: the bytes are the sender's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Header<'a> {
    /// MSH-3, sending application (all components).
    pub sending_application: Option<&'a [u8]>,
    /// MSH-4, sending facility (all components).
    pub sending_facility: Option<&'a [u8]>,
    /// MSH-9, message type (all components, e.g. `ADT^A01^ADT_A01`).
    pub message_type: Option<&'a [u8]>,
    /// MSH-10, message control id.
    pub control_id: Option<&'a [u8]>,
    /// PID-3.1: the first component of the first repetition of the first PID segment's
    /// patient identifier list (the medical record number, in practice). Raw, like the other
    /// fields: escape sequences are not decoded.
    pub patient_id: Option<&'a [u8]>,
}

impl<'a> Header<'a> {
    /// Reads the fields from `payload`; all `None` if it has no usable MSH.
    pub fn parse(payload: &'a [u8]) -> Self {
        let Ok(msh) = Msh::parse(payload) else {
            return Self::default();
        };
        let field = |n| msh.field(n).filter(|f| !f.is_empty());
        Self {
            sending_application: field(3),
            sending_facility: field(4),
            message_type: field(9),
            control_id: field(10),
            patient_id: patient_id(payload, msh.encoding()),
        }
    }
}

/// PID-3.1 of the first PID segment (see [`Header::patient_id`]); segments end in CR (LF and
/// CRLF are tolerated, as senders' files have them).
fn patient_id(payload: &[u8], enc: mllp_reactor::msh::Encoding) -> Option<&[u8]> {
    // `memchr` to find segment and field ends: a byte-at-a-time `split` spent ~2 000
    // instructions per message here, on the writer thread (callgrind, BENCHMARKS.md).
    let mut rest = payload;
    let segment = loop {
        let end = memchr2(b'\r', b'\n', rest).unwrap_or(rest.len());
        let segment = &rest[..end];
        if segment.len() > 3 && segment.starts_with(b"PID") && segment[3] == enc.field {
            break segment;
        }
        rest = rest.get(end + 1..)?;
    };
    // PID-3 opens after the third field separator.
    let start = memchr_iter(enc.field, segment).nth(2)? + 1;
    let pid3 = &segment[start..];
    // Its first repetition's first component's first subcomponent: up to the first of any
    // separator (the field's own end included).
    let end = pid3
        .iter()
        .position(|&b| {
            b == enc.field || b == enc.repetition || b == enc.component || b == enc.subcomponent
        })
        .unwrap_or(pid3.len());
    let id = &pid3[..end];
    (!id.is_empty()).then_some(id)
}

/// A field as text for a TEXT column: HL7 v2 header fields are ASCII in practice; anything
/// else is decoded lossily (U+FFFD), which the store documents.
pub(crate) fn text(field: Option<&[u8]>) -> Option<Cow<'_, str>> {
    // `from_utf8` first: its ASCII fast path is several times cheaper than the lossy
    // decoder's chunking on the short fields every row has.
    field.map(|f| std::str::from_utf8(f).map_or_else(|_| String::from_utf8_lossy(f), Cow::Borrowed))
}

/// `time` as microseconds since the Unix epoch; saturates far outside ±292,000 years.
pub(crate) fn system_time_to_us(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_micros()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_micros())
            .map(|us| -us)
            .unwrap_or(i64::MIN),
    }
}

/// A message read back from a store.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoredRecord {
    /// Store id (commit order).
    pub id: StoreId,
    /// When it was received: microseconds since the Unix epoch, UTC.
    pub received_at_us: i64,
    /// Peer address as `IP:PORT` (`[IPv6]:PORT`).
    pub peer: String,
    /// Local address as `IP:PORT` (`[IPv6]:PORT`).
    pub local: String,
    /// The server's connection id.
    pub connection_id: u64,
    /// Sequence number on the connection.
    pub sequence: u64,
    /// MSH-3, if present.
    pub sending_application: Option<String>,
    /// MSH-4, if present.
    pub sending_facility: Option<String>,
    /// MSH-9, if present.
    pub message_type: Option<String>,
    /// MSH-10, if present.
    pub control_id: Option<String>,
    /// Payload size in bytes.
    pub size: u64,
    /// The id of the first message with the same sending application, facility and control id
    /// within the duplicate window, if this one is a resend.
    pub duplicate_of: Option<StoreId>,
    /// The exact bytes received.
    pub payload: Vec<u8>,
    /// The sender's client certificate under mutual TLS (CN, SANs, SHA-256 fingerprint), if
    /// any; `None` for messages stored before the column existed.
    pub client_cert: Option<String>,
}

/// What the store did with one record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreOutcome {
    /// The committed record's id.
    pub id: StoreId,
    /// Set when the record is a resend of the message with this id (see the crate docs on
    /// duplicates). Still committed, still to be accepted.
    pub duplicate_of: Option<StoreId>,
}

impl StoreOutcome {
    /// An outcome; for backends outside this crate.
    pub fn new(id: StoreId, duplicate_of: Option<StoreId>) -> Self {
        Self { id, duplicate_of }
    }
}

/// The key that identifies a resend: MSH-3, MSH-4 and MSH-10 as stored (text).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DuplicateKey<'a> {
    /// MSH-3, if present.
    pub sending_application: Option<&'a str>,
    /// MSH-4, if present.
    pub sending_facility: Option<&'a str>,
    /// MSH-10 (a message without one is never a duplicate).
    pub control_id: &'a str,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn header_reads_fields_and_maps_missing_to_none() {
        let h = Header::parse(b"MSH|^~\\&|APP||||20260101||ORU^R01|c1|P|2.5\r");
        assert_eq!(h.sending_application, Some(&b"APP"[..]));
        assert_eq!(h.sending_facility, None);
        assert_eq!(h.message_type, Some(&b"ORU^R01"[..]));
        assert_eq!(h.control_id, Some(&b"c1"[..]));
        assert_eq!(Header::parse(b"PID|1\r"), Header::default());
        assert_eq!(Header::parse(b""), Header::default());
        assert_eq!(Header::parse(b"MSH|^~\\&|A\r").control_id, None);
    }

    #[test]
    fn patient_id_is_pid_3_1_raw() {
        let h = |m: &'static [u8]| Header::parse(m).patient_id;
        assert_eq!(
            h(b"MSH|^~\\&|A\rPID|1||MRN1^^^H^MR~X2||DOE\r"),
            Some(&b"MRN1"[..])
        );
        assert_eq!(
            h(b"MSH|^~\\&|A\nEVN|x\nPID|1||M\\T\\2\n"),
            Some(&b"M\\T\\2"[..])
        );
        assert_eq!(h(b"MSH|^~\\&|A\rPID|1||^^^H\r"), None);
        assert_eq!(h(b"MSH|^~\\&|A\rPIDX|1||M\r"), None);
        assert_eq!(h(b"MSH|^~\\&|A\rPID|1\r"), None);
        assert_eq!(h(b"MSH#*~\\&#A\rPID#1##K*L\r"), Some(&b"K"[..]));
        // The first of any separator ends it; the last segment needs no terminator.
        assert_eq!(h(b"MSH|^~\\&|A\rPID|1||M&S^X~Y\r"), Some(&b"M"[..]));
        assert_eq!(h(b"MSH|^~\\&|A\r\rPID|1||MRN"), Some(&b"MRN"[..]));
        assert_eq!(h(b"MSH|^~\\&|A\rPID|1||"), None);
        assert_eq!(h(b"MSH|^~\\&|A\rPID|1|"), None);
        assert_eq!(h(b"MSH|^~\\&|A\rPID"), None);
        assert_eq!(h(b"MSH|^~\\&|A\rPV1|1||N\rPID|1||P2|x\r"), Some(&b"P2"[..]));
    }

    #[test]
    fn text_is_lossy_only_for_invalid_utf8() {
        assert!(matches!(text(Some(b"APP")), Some(Cow::Borrowed("APP"))));
        assert!(matches!(
            text(Some("Ä".as_bytes())),
            Some(Cow::Borrowed("Ä"))
        ));
        assert_eq!(text(Some(b"A\xffB")).as_deref(), Some("A\u{fffd}B"));
        assert_eq!(text(None), None);
    }

    #[test]
    fn micros_before_and_after_the_epoch() {
        assert_eq!(system_time_to_us(UNIX_EPOCH), 0);
        assert_eq!(
            system_time_to_us(UNIX_EPOCH + Duration::from_micros(1_500_000)),
            1_500_000
        );
        assert_eq!(system_time_to_us(UNIX_EPOCH - Duration::from_micros(7)), -7);
    }
}
