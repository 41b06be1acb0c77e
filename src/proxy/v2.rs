//! PROXY v2: a binary header (spec §2.2).
//!
//! ```text
//!  0          12        13        14      16                 16 + len
//!  ├ signature ┼ ver|cmd ┼ fam|trn ┼ len BE ┼ addresses ┬ TLVs ┤
//!  │ 12 bytes  │ 0x20 LOCAL        │        │ 12 TCP4, 36 TCP6, 216 UNIX │
//!  │           │ 0x21 PROXY        │        │ (type u8, len u16 BE, value)* │
//! ```
//!
//! Each byte of the fixed part is checked as soon as it arrives, so a bad signature, version,
//! command or family fails on that byte; the length is checked once both of its bytes are in.

use std::net::{IpAddr, SocketAddr};

use super::{ProxyError, ProxyHeader, Step, V2_FIXED_LEN, V2_MAX_LEN, V2_SIGNATURE};

/// Version nibble (high half of byte 12): always 2.
pub(super) const VERSION: u8 = 0x20;
/// Command `LOCAL`: the balancer's own connection (health check); addresses are discarded.
pub(super) const CMD_LOCAL: u8 = 0x0;
/// Command `PROXY`: a relayed connection; the address block is meaningful.
pub(super) const CMD_PROXY: u8 = 0x1;
/// Family `UNSPEC`, transport `UNSPEC`.
pub(super) const FAM_UNSPEC: u8 = 0x00;
/// Family `INET` (IPv4), transport `STREAM` (TCP).
pub(super) const FAM_TCP4: u8 = 0x11;
/// Family `INET6`, transport `STREAM`.
pub(super) const FAM_TCP6: u8 = 0x21;
/// Family `UNIX`, transport `STREAM`.
const FAM_UNIX_STREAM: u8 = 0x31;
/// Transport nibble `DGRAM`.
const TRANSPORT_DGRAM: u8 = 0x2;
/// Address block of `INET`: two IPv4 addresses and two ports.
pub(super) const ADDR_LEN_INET: usize = 4 + 4 + 2 + 2;
/// Address block of `INET6`: two IPv6 addresses and two ports.
pub(super) const ADDR_LEN_INET6: usize = 16 + 16 + 2 + 2;
/// Address block of `UNIX`: two 108-byte paths.
const ADDR_LEN_UNIX: usize = 108 + 108;
/// TLV header: type (1 byte) and length (2 bytes, big-endian).
const TLV_HEADER_LEN: usize = 3;

/// Decodes a v2 header from `buf` (whose first byte is `\r`).
pub(super) fn decode(buf: &[u8]) -> Result<Step, ProxyError> {
    let seen = buf.len().min(V2_SIGNATURE.len());
    if buf[..seen] != V2_SIGNATURE[..seen] {
        return Err(ProxyError::NotProxy);
    }
    let Some(&ver_cmd) = buf.get(12) else {
        return Ok(Step::Need(buf.len() + 1));
    };
    if ver_cmd & 0xF0 != VERSION {
        return Err(ProxyError::V2Version(ver_cmd >> 4));
    }
    let command = ver_cmd & 0x0F;
    if command != CMD_LOCAL && command != CMD_PROXY {
        return Err(ProxyError::V2Command(command));
    }
    let Some(&family) = buf.get(13) else {
        return Ok(Step::Need(14));
    };
    // Spec §2.2: values other than these "must be rejected as invalid by receivers", whatever
    // the command.
    if !matches!(family, 0x00 | 0x11 | 0x12 | 0x21 | 0x22 | 0x31 | 0x32) {
        return Err(ProxyError::V2Family(family));
    }
    if command == CMD_PROXY && family & 0x0F == TRANSPORT_DGRAM {
        return Err(ProxyError::V2Datagram);
    }
    let [Some(&hi), Some(&lo)] = [buf.get(14), buf.get(15)] else {
        return Ok(Step::Need(buf.len() + 1));
    };
    let len = u16::from_be_bytes([hi, lo]);
    let total = V2_FIXED_LEN + usize::from(len);
    if total > V2_MAX_LEN {
        return Err(ProxyError::V2TooLarge { len: total });
    }
    let addr_len = match (command, family >> 4) {
        (CMD_PROXY, 0x1) => ADDR_LEN_INET,
        (CMD_PROXY, 0x2) => ADDR_LEN_INET6,
        (CMD_PROXY, 0x3) => ADDR_LEN_UNIX,
        // LOCAL, and UNSPEC: no address block we read.
        _ => 0,
    };
    if usize::from(len) < addr_len {
        return Err(ProxyError::V2AddressLength { family, len });
    }
    let Some(block) = buf.get(V2_FIXED_LEN..total) else {
        return Ok(Step::Need(total));
    };
    if command == CMD_LOCAL || family == FAM_UNSPEC {
        // Spec §2.2: for LOCAL the receiver "must discard the protocol block including the
        // family"; for UNSPEC it "should ignore address information". TLV bounds are unknown
        // without an address length, so the block is skipped whole.
        return Ok(Step::Done(ProxyHeader::Local, total));
    }
    let (addresses, tlvs) = block.split_at(addr_len);
    skip_tlvs(tlvs)?;
    // `addresses` holds exactly `addr_len` bytes, so the fixed offsets below are in bounds.
    let header = match family {
        FAM_TCP4 => proxied(
            IpAddr::from(octets::<4>(addresses)),
            IpAddr::from(octets::<4>(&addresses[4..])),
            &addresses[8..12],
        ),
        FAM_TCP6 => proxied(
            IpAddr::from(octets::<16>(addresses)),
            IpAddr::from(octets::<16>(&addresses[16..])),
            &addresses[32..36],
        ),
        // The one stream family left (UNSPEC returned early, datagrams were refused): a unix
        // socket client has no IP address, so use the socket's peer, as for LOCAL.
        _ => {
            debug_assert_eq!(family, FAM_UNIX_STREAM);
            ProxyHeader::Local
        }
    };
    Ok(Step::Done(header, total))
}

/// The first `N` bytes of `bytes` (which holds at least `N`) as an array.
fn octets<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&bytes[..N]);
    out
}

/// The header for two addresses and the 4-byte big-endian port pair that follows them.
fn proxied(source: IpAddr, destination: IpAddr, ports: &[u8]) -> ProxyHeader {
    ProxyHeader::Proxied {
        source: SocketAddr::new(source, u16::from_be_bytes([ports[0], ports[1]])),
        destination: SocketAddr::new(destination, u16::from_be_bytes([ports[2], ports[3]])),
    }
}

/// Checks that the TLVs after the addresses tile them exactly (spec §2.2.1–2.2.8), without
/// interpreting any: the header's peer comes from the address block alone. Bounded by
/// [`V2_MAX_LEN`] / [`TLV_HEADER_LEN`] iterations.
fn skip_tlvs(mut tlvs: &[u8]) -> Result<(), ProxyError> {
    while !tlvs.is_empty() {
        let [_kind, hi, lo, ..] = *tlvs else {
            return Err(ProxyError::V2Tlv);
        };
        let end = TLV_HEADER_LEN + usize::from(u16::from_be_bytes([hi, lo]));
        tlvs = tlvs.get(end..).ok_or(ProxyError::V2Tlv)?;
    }
    Ok(())
}
