//! Sans-IO PROXY protocol header decoder (v1 text, v2 binary) and encoders.
//!
//! A TCP load balancer such as HAProxy (`send-proxy-v2`) opens each connection to us with one
//! header that names the client it accepted. This module turns the first bytes of a connection
//! into a [`ProxyHeader`]; it never sees a socket. Reference: HAProxy's "The PROXY protocol,
//! versions 1 & 2" (`doc/proxy-protocol.txt`, 2020/03/05), cited below as "spec §n".
//!
//! # Use
//!
//! The caller keeps every byte received since the connection opened in one buffer and calls
//! [`ProxyDecoder::decode`] after each read, until it returns a header or an error:
//!
//! ```text
//!  buf: [ PROXY header ........ | MLLP bytes (0x0B ...) that arrived in the same read ]
//!       └──── consumed ────────┘└─ left for the frame decoder ─────────────────────────┘
//! ```
//!
//! - `Ok(None)`: not enough bytes yet. A header is at most [`MAX_HEADER_LEN`] bytes, so the
//!   caller never needs to hold more than that before a decision.
//! - `Ok(Some((header, consumed)))`: the header is `buf[..consumed]`; everything after it
//!   belongs to the application protocol.
//! - `Err(_)`: close the connection. The spec (§2.1, §2.2) forbids guessing whether a header is
//!   present, so there is no fallback: the first byte that cannot continue a valid header of
//!   the enabled version(s) is an error, at once. A plain MLLP frame (`0x0B`) fails on its
//!   first byte.
//!
//! ```
//! use mllp_reactor::proxy::{ProxyDecoder, ProxyHeader, ProxyMode};
//!
//! let wire = b"PROXY TCP4 192.0.2.7 10.0.0.5 50123 2575\r\n\x0bMSH|^~\\&|...\x1c\r";
//! let mut decoder = ProxyDecoder::new(ProxyMode::Any);
//! assert_eq!(decoder.decode(&wire[..20])?, None); // a read that stopped mid-header
//! let (header, consumed) = decoder.decode(wire)?.expect("complete header");
//! assert_eq!(
//!     header,
//!     ProxyHeader::Proxied {
//!         source: "192.0.2.7:50123".parse()?,    // the sender, as the balancer saw it
//!         destination: "10.0.0.5:2575".parse()?, // the balancer's frontend
//!     }
//! );
//! assert_eq!(wire[consumed], 0x0B); // MLLP starts right after the header
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # What is accepted
//!
//! | Header | Result |
//! |---|---|
//! | v1 `TCP4` / `TCP6` | [`ProxyHeader::Proxied`] |
//! | v1 `UNKNOWN` (anything after it up to CRLF is ignored, spec §2.1) | [`ProxyHeader::Local`] |
//! | v2 `LOCAL` command, any valid family (HAProxy health checks) | [`ProxyHeader::Local`] |
//! | v2 `PROXY` over `TCP4` / `TCP6`; TLVs are checked for bounds and skipped | [`ProxyHeader::Proxied`] |
//! | v2 `PROXY` with family `UNSPEC` or `UNIX` stream | [`ProxyHeader::Local`] |
//! | v2 `PROXY` over a datagram transport (UDP, unix dgram) | [`ProxyError::V2Datagram`] |
//! | v2 longer than [`V2_MAX_LEN`] | [`ProxyError::V2TooLarge`] |
//!
//! `UNSPEC` and `UNIX` carry no IP address, so the only address we have is the socket's own
//! peer, exactly as for `LOCAL` (spec §2.2 lets a receiver accept `UNSPEC` and "use the real
//! endpoint addresses"). A unix source is legitimate: HAProxy frontends may listen on unix
//! sockets. A datagram transport is not: MLLP is a byte stream, so such a header means a
//! misconfigured balancer, and the spec leaves rejection to the receiver.
//!
//! Not checked: the `PP2_TYPE_CRC32C` TLV (it would need a CRC-32C table for a check TCP
//! already makes), and TLVs inside a `LOCAL` header, which the spec says to discard unread.

mod v1;
mod v2;

#[cfg(test)]
mod tests;

use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// Longest v1 header, CRLF included (spec §2.1: "a receiver ... knows it can safely read at
/// most 107 bytes"). A line without CRLF by then is [`ProxyError::V1TooLong`].
pub const V1_MAX_LEN: usize = 107;

/// The twelve bytes that open every v2 header (spec §2.2). They start with `\r\n`, which no v1
/// header and no MLLP frame can, so one byte tells the versions apart.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Fixed part of a v2 header: signature, version/command, family, 16-bit length (spec §2.2).
pub const V2_FIXED_LEN: usize = 16;

/// Largest v2 header we accept, fixed part included. The spec allows 16 + 65,535 bytes; we cap
/// it so a peer cannot make us buffer 64 KiB before the first message. 4 KiB holds the
/// addresses plus every TLV HAProxy 2.6 sends (ALPN, authority ≤ 255, unique-id ≤ 128, the
/// SSL sub-TLVs with client CN, cipher and algorithms: a few hundred bytes together) and the
/// cloud balancers' TLVs (AWS VPC endpoint id, Azure link id: tens of bytes), with room to
/// spare. Larger headers are [`ProxyError::V2TooLarge`].
pub const V2_MAX_LEN: usize = 4096;

/// Most bytes a caller ever buffers before [`ProxyDecoder::decode`] decides: the larger of
/// [`V1_MAX_LEN`] and [`V2_MAX_LEN`].
pub const MAX_HEADER_LEN: usize = if V1_MAX_LEN > V2_MAX_LEN {
    V1_MAX_LEN
} else {
    V2_MAX_LEN
};

/// Which header versions a listener accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProxyMode {
    /// Only the v1 text header (`PROXY TCP4 ...\r\n`).
    V1,
    /// Only the v2 binary header (HAProxy `send-proxy-v2`).
    V2,
    /// Either; the first byte tells them apart (`P` or `\r`), so this costs no guessing.
    Any,
}

/// What a header says about the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProxyHeader {
    /// No client address: the connection is the balancer's own (v2 `LOCAL`, which HAProxy
    /// health checks send), v1 `UNKNOWN`, or a v2 `PROXY` header from a family without an IP
    /// address (`UNSPEC`, `UNIX`). Use the socket's own peer address. Not an error.
    Local,
    /// The balancer forwarded a TCP connection (v1 `TCP4`/`TCP6`, v2 `PROXY` over `TCP4`/`TCP6`).
    Proxied {
        /// The client's address and port, as the balancer saw it.
        source: SocketAddr,
        /// The address and port the client connected to (the balancer's frontend).
        destination: SocketAddr,
    },
}

impl ProxyHeader {
    /// The client's address, or `None` for [`ProxyHeader::Local`].
    ///
    /// # Examples
    ///
    /// ```
    /// use mllp_reactor::proxy::ProxyHeader;
    /// assert_eq!(ProxyHeader::Local.source(), None);
    /// ```
    pub fn source(&self) -> Option<SocketAddr> {
        match self {
            Self::Local => None,
            Self::Proxied { source, .. } => Some(*source),
        }
    }
}

/// Why the first bytes of a connection are not an acceptable PROXY header. The connection
/// should be closed; [`ProxyError::as_str`] gives a stable label for metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ProxyError {
    /// The bytes cannot start a header of the enabled version(s): no signature (a plain MLLP
    /// client, a port scanner, a balancer without `send-proxy`).
    NotProxy,
    /// v1: no CRLF within [`V1_MAX_LEN`] bytes.
    V1TooLong,
    /// v1: the protocol is not `TCP4`, `TCP6` or `UNKNOWN`.
    V1Protocol,
    /// v1: an address is not in the canonical syntax of the line's protocol (no leading zeros
    /// in IPv4, no IPv4 in a `TCP6` line, no IPv6 in a `TCP4` line).
    V1Address,
    /// v1: a port is not a decimal number 0–65535 without leading zeros.
    V1Port,
    /// v1: fields are missing, empty, or more than four follow the protocol.
    V1Fields,
    /// v1: the line ends with LF without a CR before it.
    V1LineEnd,
    /// v2: the version nibble is not 2 (the value it had).
    V2Version(u8),
    /// v2: the command nibble is neither `LOCAL` (0) nor `PROXY` (1) (the value it had).
    V2Command(u8),
    /// v2: the family/transport byte is none the spec defines (the value it had).
    V2Family(u8),
    /// v2: a `PROXY` header for a datagram transport; MLLP runs over a stream.
    V2Datagram,
    /// v2: the header is longer than [`V2_MAX_LEN`] (its total length, fixed part included).
    V2TooLarge {
        /// Total header length announced by the peer.
        len: usize,
    },
    /// v2: the announced length is shorter than the address block of the family.
    V2AddressLength {
        /// The family/transport byte.
        family: u8,
        /// The announced length of everything after the fixed part.
        len: u16,
    },
    /// v2: a TLV after the addresses runs past the end of the header.
    V2Tlv,
}

impl ProxyError {
    /// A short snake_case name for the error, stable for metric labels and logs.
    ///
    /// # Examples
    ///
    /// ```
    /// use mllp_reactor::proxy::ProxyError;
    /// assert_eq!(ProxyError::NotProxy.as_str(), "not_proxy");
    /// ```
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::NotProxy => "not_proxy",
            Self::V1TooLong => "v1_too_long",
            Self::V1Protocol => "v1_protocol",
            Self::V1Address => "v1_address",
            Self::V1Port => "v1_port",
            Self::V1Fields => "v1_fields",
            Self::V1LineEnd => "v1_line_end",
            Self::V2Version(_) => "v2_version",
            Self::V2Command(_) => "v2_command",
            Self::V2Family(_) => "v2_family",
            Self::V2Datagram => "v2_datagram",
            Self::V2TooLarge { .. } => "v2_too_large",
            Self::V2AddressLength { .. } => "v2_address_length",
            Self::V2Tlv => "v2_tlv",
        }
    }
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotProxy => f.write_str("connection does not start with a PROXY header"),
            Self::V1TooLong => write!(f, "PROXY v1 line without CRLF in {V1_MAX_LEN} bytes"),
            Self::V1Protocol => f.write_str("PROXY v1 protocol is not TCP4, TCP6 or UNKNOWN"),
            Self::V1Address => f.write_str("PROXY v1 address is malformed"),
            Self::V1Port => f.write_str("PROXY v1 port is malformed"),
            Self::V1Fields => f.write_str("PROXY v1 line has missing, empty or extra fields"),
            Self::V1LineEnd => f.write_str("PROXY v1 line ends in LF without CR"),
            Self::V2Version(v) => write!(f, "PROXY v2 header has version {v}, expected 2"),
            Self::V2Command(c) => write!(f, "PROXY v2 header has unknown command {c}"),
            Self::V2Family(b) => write!(f, "PROXY v2 header has unknown family 0x{b:02x}"),
            Self::V2Datagram => f.write_str("PROXY v2 header is for a datagram transport"),
            Self::V2TooLarge { len } => {
                write!(f, "PROXY v2 header of {len} bytes exceeds {V2_MAX_LEN}")
            }
            Self::V2AddressLength { family, len } => write!(
                f,
                "PROXY v2 length {len} is too short for family 0x{family:02x}"
            ),
            Self::V2Tlv => f.write_str("PROXY v2 TLV runs past the end of the header"),
        }
    }
}

impl std::error::Error for ProxyError {}

/// What a version's parser made of the buffer so far.
enum Step {
    /// Ask again once the buffer holds at least this many bytes.
    Need(usize),
    /// A complete header of this many bytes.
    Done(ProxyHeader, usize),
}

/// Incremental PROXY header decoder for one connection.
///
/// Call [`decode`](Self::decode) with all bytes received so far (the caller only ever appends
/// to that buffer) until it returns `Ok(Some(_))` or `Err(_)`. The decoder remembers only how
/// many bytes it needs before it can make progress, so calls with too few new bytes cost
/// nothing, and a byte-by-byte sender costs O(header length) in total for v2 and at most
/// `V1_MAX_LEN²` byte checks for v1. Calling again after a decision returns the same decision.
#[derive(Clone, Debug)]
pub struct ProxyDecoder {
    mode: ProxyMode,
    /// INVARIANT: the bytes seen so far cannot be decided with fewer than `need` bytes.
    need: usize,
}

impl ProxyDecoder {
    /// A decoder accepting the header versions of `mode`.
    pub fn new(mode: ProxyMode) -> Self {
        Self { mode, need: 1 }
    }

    /// The versions this decoder accepts.
    pub fn mode(&self) -> ProxyMode {
        self.mode
    }

    /// Decodes a header from the start of `buf`, which holds every byte received so far.
    ///
    /// Returns `Ok(None)` when more bytes are needed, or the header and the number of bytes it
    /// occupies; bytes after it are not looked at.
    ///
    /// # Errors
    ///
    /// A [`ProxyError`] as soon as the bytes cannot be the start of a valid header of the
    /// enabled version(s); the connection should then be closed.
    ///
    /// # Examples
    ///
    /// ```
    /// use mllp_reactor::proxy::{ProxyDecoder, ProxyError, ProxyMode};
    ///
    /// // An MLLP client that does not know about the balancer is refused at its first byte.
    /// let mut decoder = ProxyDecoder::new(ProxyMode::V2);
    /// assert_eq!(decoder.decode(b"\x0bMSH|"), Err(ProxyError::NotProxy));
    /// ```
    pub fn decode(&mut self, buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
        if buf.len() < self.need {
            return Ok(None);
        }
        let step = match (buf[0], self.mode) {
            (b'P', ProxyMode::V1 | ProxyMode::Any) => v1::decode(buf)?,
            (b'\r', ProxyMode::V2 | ProxyMode::Any) => v2::decode(buf)?,
            _ => return Err(ProxyError::NotProxy),
        };
        match step {
            Step::Need(n) => {
                debug_assert!(n > buf.len() && n <= MAX_HEADER_LEN);
                self.need = n;
                Ok(None)
            }
            Step::Done(header, len) => Ok(Some((header, len))),
        }
    }
}

/// Both addresses in one family, mapping an IPv4 one into IPv6 (`::ffff:a.b.c.d`) when the
/// other is IPv6, as HAProxy does; `None` for [`ProxyHeader::Local`].
fn same_family(header: &ProxyHeader) -> Option<(SocketAddr, SocketAddr)> {
    let ProxyHeader::Proxied {
        source,
        destination,
    } = *header
    else {
        return None;
    };
    let to_v6 = |a: SocketAddr| match a.ip() {
        IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), a.port()),
        IpAddr::V6(_) => a,
    };
    Some(if source.is_ipv4() == destination.is_ipv4() {
        (source, destination)
    } else {
        (to_v6(source), to_v6(destination))
    })
}

/// Encodes `header` as a v1 line: `PROXY UNKNOWN\r\n` for [`ProxyHeader::Local`], else
/// `PROXY TCP4|TCP6 src dst sport dport\r\n`.
///
/// A mix of IPv4 and IPv6 addresses is sent as `TCP6` with the IPv4 one mapped
/// (`::ffff:a.b.c.d`). IPv6 flow info and scope ids are not carried (the format has no room).
/// Useful for clients that connect through nothing but must look like a balancer, and tests.
///
/// # Examples
///
/// ```
/// use mllp_reactor::proxy::{ProxyHeader, encode_v1};
///
/// let header = ProxyHeader::Proxied {
///     source: "192.0.2.7:50123".parse()?,
///     destination: "10.0.0.5:2575".parse()?,
/// };
/// assert_eq!(encode_v1(&header), b"PROXY TCP4 192.0.2.7 10.0.0.5 50123 2575\r\n");
/// # Ok::<(), std::net::AddrParseError>(())
/// ```
pub fn encode_v1(header: &ProxyHeader) -> Vec<u8> {
    let line = match same_family(header) {
        None => "PROXY UNKNOWN\r\n".to_owned(),
        Some((s, d)) => format!(
            "PROXY {} {} {} {} {}\r\n",
            if s.is_ipv4() { "TCP4" } else { "TCP6" },
            s.ip(),
            d.ip(),
            s.port(),
            d.port()
        ),
    };
    line.into_bytes()
}

/// Encodes `header` as a v2 header without TLVs: command `LOCAL` with family `UNSPEC` and no
/// address block for [`ProxyHeader::Local`] (what HAProxy's `check-send-proxy` sends), else
/// command `PROXY` over `TCP4` or `TCP6` (mixed families as in [`encode_v1`]).
///
/// # Examples
///
/// ```
/// use mllp_reactor::proxy::{ProxyDecoder, ProxyHeader, ProxyMode, encode_v2};
///
/// let header = ProxyHeader::Proxied {
///     source: "[2001:db8::7]:50123".parse()?,
///     destination: "[2001:db8::1]:2575".parse()?,
/// };
/// let wire = encode_v2(&header);
/// assert_eq!(wire.len(), 16 + 36);
/// assert_eq!(ProxyDecoder::new(ProxyMode::V2).decode(&wire)?, Some((header, wire.len())));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn encode_v2(header: &ProxyHeader) -> Vec<u8> {
    let mut out = Vec::with_capacity(V2_FIXED_LEN + 36);
    out.extend_from_slice(&V2_SIGNATURE);
    match same_family(header) {
        None => out.extend_from_slice(&[v2::VERSION | v2::CMD_LOCAL, v2::FAM_UNSPEC, 0, 0]),
        Some((s, d)) => {
            let (family, len) = if s.is_ipv4() {
                (v2::FAM_TCP4, v2::ADDR_LEN_INET)
            } else {
                (v2::FAM_TCP6, v2::ADDR_LEN_INET6)
            };
            out.extend_from_slice(&[v2::VERSION | v2::CMD_PROXY, family]);
            out.extend_from_slice(&(len as u16).to_be_bytes());
            for ip in [s.ip(), d.ip()] {
                match ip {
                    IpAddr::V4(v4) => out.extend_from_slice(&v4.octets()),
                    IpAddr::V6(v6) => out.extend_from_slice(&v6.octets()),
                }
            }
            out.extend_from_slice(&s.port().to_be_bytes());
            out.extend_from_slice(&d.port().to_be_bytes());
        }
    }
    out
}

/// Fuzz entry point (`fuzz/fuzz_targets/proxy.rs`); `cargo test` replays `fuzz/corpus/proxy`
/// through it too. Byte 0 picks the mode, the rest is the connection's first bytes.
///
/// Checks: no panic; feeding the bytes one at a time reaches the same decision as feeding them
/// at once; a header never claims more bytes than it was given or than [`MAX_HEADER_LEN`];
/// `Ok(None)` only below that bound; and a decoded header encodes back to one that decodes to
/// the same value, in both versions.
#[doc(hidden)]
pub fn __fuzz_decode(data: &[u8]) {
    let Some((&selector, stream)) = data.split_first() else {
        return;
    };
    let mode = [ProxyMode::V1, ProxyMode::V2, ProxyMode::Any][usize::from(selector % 3)];
    let whole = ProxyDecoder::new(mode).decode(stream);

    let mut decoder = ProxyDecoder::new(mode);
    let mut stepwise = Ok(None);
    for end in 1..=stream.len() {
        stepwise = decoder.decode(&stream[..end]);
        if !matches!(stepwise, Ok(None)) {
            break;
        }
    }
    assert_eq!(whole, stepwise, "one-shot and byte-by-byte disagree");

    match whole {
        Ok(Some((header, consumed))) => {
            assert!(consumed <= stream.len() && consumed <= MAX_HEADER_LEN);
            for (wire, mode) in [
                (encode_v1(&header), ProxyMode::V1),
                (encode_v2(&header), ProxyMode::V2),
            ] {
                let again = ProxyDecoder::new(mode).decode(&wire);
                // A TCP6 line with an IPv4-mapped address in long form can outgrow 107 bytes;
                // the encoder writes the short form, so every re-encoding must fit.
                assert_eq!(again, Ok(Some((header, wire.len()))), "round trip");
            }
        }
        Ok(None) => assert!(stream.len() < MAX_HEADER_LEN, "undecided past the cap"),
        Err(_) => {}
    }
}
