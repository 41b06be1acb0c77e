//! IP networks in CIDR notation and allow-lists of them.
//!
//! Used to admit connections by peer address (an IP allow-list checked at accept) and to
//! accept PROXY headers only from known balancers. Both IPv4 and IPv6 are supported; an
//! IPv4-mapped IPv6 peer (`::ffff:10.1.2.3`, what a dual-stack `[::]` listener reports for an
//! IPv4 client) matches IPv4 rules, and an IPv4 peer matches rules written in the mapped range.
//!
//! ```
//! use mllp_reactor::cidr::{AllowList, Cidr};
//!
//! let list: AllowList = ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7"]
//!     .iter()
//!     .map(|s| s.parse::<Cidr>())
//!     .collect::<Result<_, _>>()?;
//! assert!(list.contains("10.200.0.1".parse()?));
//! assert!(list.contains("::ffff:10.200.0.1".parse()?)); // IPv4 client on a dual-stack socket
//! assert!(list.contains("192.0.2.7".parse()?));
//! assert!(!list.contains("192.0.2.8".parse()?));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// An IP network: an address whose host bits are zero, and a prefix length.
///
/// Parsed from `a.b.c.d/n` (n ≤ 32), `v6addr/n` (n ≤ 128), or a bare address, which is a
/// single host (`/32` or `/128`). Host bits must be zero: `10.1.2.3/8` is refused with
/// [`CidrError::HostBits`] rather than silently widened, because in an allow-list such a typo
/// admits far more peers than the operator meant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    /// INVARIANT: the bits past `prefix` are zero.
    network: IpAddr,
    /// INVARIANT: at most 32 for IPv4, 128 for IPv6.
    prefix: u8,
}

impl Cidr {
    /// The network `addr/prefix`.
    ///
    /// # Errors
    ///
    /// [`CidrError::Prefix`] when `prefix` exceeds the address width, [`CidrError::HostBits`]
    /// when `addr` has bits set past the prefix.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::net::Ipv4Addr;
    /// use mllp_reactor::cidr::Cidr;
    ///
    /// let net = Cidr::new(Ipv4Addr::new(10, 0, 0, 0).into(), 8)?;
    /// assert_eq!(net.to_string(), "10.0.0.0/8");
    /// # Ok::<(), mllp_reactor::cidr::CidrError>(())
    /// ```
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Self, CidrError> {
        let width = match addr {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        };
        if prefix > width {
            return Err(CidrError::Prefix);
        }
        if bits(addr) & !mask(prefix, width) != 0 {
            return Err(CidrError::HostBits);
        }
        Ok(Self {
            network: addr,
            prefix,
        })
    }

    /// A network holding only `addr` (`/32` or `/128`).
    pub fn host(addr: IpAddr) -> Self {
        let prefix = if addr.is_ipv4() { 32 } else { 128 };
        Self {
            network: addr,
            prefix,
        }
    }

    /// The network address (host bits zero).
    pub fn network(&self) -> IpAddr {
        self.network
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` lies in this network. IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) and
    /// IPv4 addresses are the same host here, whichever of the two the rule or the peer uses.
    ///
    /// # Examples
    ///
    /// ```
    /// use mllp_reactor::cidr::Cidr;
    ///
    /// let lan: Cidr = "192.168.0.0/16".parse()?;
    /// assert!(lan.contains("192.168.4.2".parse()?));
    /// assert!(lan.contains("::ffff:192.168.4.2".parse()?));
    /// assert!(!lan.contains("192.169.0.1".parse()?));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match (self.network, ip) {
            (IpAddr::V4(_), IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => return false,
            },
            (IpAddr::V6(_), IpAddr::V4(v4)) => IpAddr::V6(v4.to_ipv6_mapped()),
            (_, ip) => ip,
        };
        let width = if ip.is_ipv4() { 32 } else { 128 };
        bits(ip) & mask(self.prefix, width) == bits(self.network)
    }
}

/// The address as a right-aligned 128-bit number.
fn bits(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// The network mask of `prefix` bits in an address `width` bits wide, right-aligned.
/// Requires `prefix <= width <= 128`.
fn mask(prefix: u8, width: u8) -> u128 {
    let all = u128::MAX >> (128 - u32::from(width));
    // `checked_shr` covers prefix 0, where the shift would be the full width.
    all & !(all.checked_shr(u32::from(prefix)).unwrap_or(0))
}

impl FromStr for Cidr {
    type Err = CidrError;

    /// Parses `addr/prefix` or a bare address. The prefix is plain decimal digits; no
    /// whitespace, sign or zone id (`%eth0`) is accepted.
    fn from_str(s: &str) -> Result<Self, CidrError> {
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let addr = if addr.contains(':') {
            addr.parse::<Ipv6Addr>().map(IpAddr::V6)
        } else {
            addr.parse::<Ipv4Addr>().map(IpAddr::V4)
        }
        .map_err(|_| CidrError::Address)?;
        match prefix {
            None => Ok(Self::host(addr)),
            Some(p) => {
                if p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(CidrError::Prefix);
                }
                // At most three digits, so at most 999, which fits a u16.
                let n: u16 = p.parse().map_err(|_| CidrError::Prefix)?;
                Self::new(addr, u8::try_from(n).map_err(|_| CidrError::Prefix)?)
            }
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// Why a string is not a [`Cidr`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CidrError {
    /// The part before `/` is not an IPv4 or IPv6 address.
    Address,
    /// The part after `/` is not a number up to the address width (32 or 128).
    Prefix,
    /// The address has bits set past the prefix (`10.1.2.3/8`; write `10.0.0.0/8`).
    HostBits,
}

impl fmt::Display for CidrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Address => "not an IPv4 or IPv6 address",
            Self::Prefix => "prefix length is not a number within the address width",
            Self::HostBits => "address has host bits set past the prefix length",
        })
    }
}

impl std::error::Error for CidrError {}

/// A set of networks; an address is allowed when any of them contains it.
///
/// An empty list allows nothing: a server without an allow-list should hold no `AllowList`
/// rather than an empty one. Lookup is a linear scan, which suits the handful of networks an
/// MLLP listener trusts (a few dozen rules cost well under a microsecond per accept).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowList {
    rules: Vec<Cidr>,
}

impl AllowList {
    /// A list of these networks.
    pub fn new(rules: Vec<Cidr>) -> Self {
        Self { rules }
    }

    /// Whether any network in the list contains `ip`.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.rules.iter().any(|rule| rule.contains(ip))
    }

    /// The networks, in the order given.
    pub fn rules(&self) -> &[Cidr] {
        &self.rules
    }

    /// Whether the list has no networks (and so allows nothing).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

impl FromIterator<Cidr> for AllowList {
    fn from_iter<I: IntoIterator<Item = Cidr>>(iter: I) -> Self {
        Self::new(iter.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn parses_networks_and_hosts() {
        assert_eq!(cidr("10.0.0.0/8"), Cidr::new(ip("10.0.0.0"), 8).unwrap());
        assert_eq!(cidr("::1/128"), Cidr::host(ip("::1")));
        assert_eq!(cidr("::1"), Cidr::host(ip("::1")));
        assert_eq!(cidr("192.0.2.7").prefix(), 32);
        assert_eq!(cidr("0.0.0.0/0").prefix(), 0);
        assert_eq!(cidr("::/0").prefix(), 0);
        assert_eq!(cidr("2001:db8::/32").to_string(), "2001:db8::/32");
        assert_eq!(cidr("10.0.0.0/08").prefix(), 8);
        assert_eq!(
            cidr("::ffff:10.0.0.0/104").to_string(),
            "::ffff:10.0.0.0/104"
        );
    }

    #[test]
    fn rejects_malformed() {
        for (text, err) in [
            ("", CidrError::Address),
            ("/8", CidrError::Address),
            ("10.0.0/8", CidrError::Address),
            ("010.0.0.0/8", CidrError::Address),
            ("10.0.0.0 /8", CidrError::Address),
            ("fe80::1%eth0", CidrError::Address),
            ("example.org/8", CidrError::Address),
            ("10.0.0.0/", CidrError::Prefix),
            ("10.0.0.0/33", CidrError::Prefix),
            ("::/129", CidrError::Prefix),
            ("::/256", CidrError::Prefix),
            ("10.0.0.0/+8", CidrError::Prefix),
            ("10.0.0.0/-1", CidrError::Prefix),
            ("10.0.0.0/8 ", CidrError::Prefix),
            ("10.0.0.0/0008", CidrError::Prefix),
            ("10.0.0.0/8/8", CidrError::Prefix),
            ("10.1.2.3/8", CidrError::HostBits),
            ("0.0.0.1/0", CidrError::HostBits),
            ("2001:db8::1/64", CidrError::HostBits),
        ] {
            assert_eq!(text.parse::<Cidr>(), Err(err), "{text:?}");
        }
        assert_eq!(
            Cidr::new(ip("10.0.0.0"), 33),
            Err(CidrError::Prefix),
            "new checks the width too"
        );
    }

    #[test]
    fn contains_ipv4() {
        let net = cidr("10.0.0.0/8");
        assert!(net.contains(ip("10.0.0.0")));
        assert!(net.contains(ip("10.255.255.255")));
        assert!(!net.contains(ip("11.0.0.0")));
        assert!(!net.contains(ip("9.255.255.255")));
        assert!(cidr("0.0.0.0/0").contains(ip("203.0.113.9")));
        assert!(
            !cidr("0.0.0.0/0").contains(ip("2001:db8::1")),
            "v4 rules miss real v6"
        );
        assert!(cidr("192.0.2.7").contains(ip("192.0.2.7")));
        assert!(!cidr("192.0.2.7").contains(ip("192.0.2.6")));
        assert!(cidr("192.0.2.0/31").contains(ip("192.0.2.1")));
        assert!(!cidr("192.0.2.0/31").contains(ip("192.0.2.2")));
    }

    #[test]
    fn contains_ipv6() {
        let net = cidr("2001:db8::/32");
        assert!(net.contains(ip("2001:db8::1")));
        assert!(net.contains(ip("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff")));
        assert!(!net.contains(ip("2001:db9::")));
        assert!(cidr("::1/128").contains(ip("::1")));
        assert!(!cidr("::1/128").contains(ip("::2")));
        assert!(cidr("::/0").contains(ip("fe80::1")));
        assert!(
            !cidr("::1").contains(ip("127.0.0.1")),
            "v6 loopback is not v4 loopback"
        );
        assert!(cidr("fe80::/10").contains(ip("febf::1")));
        assert!(!cidr("fe80::/10").contains(ip("fec0::1")));
    }

    #[test]
    fn mapped_ipv4_matches_both_ways() {
        assert!(cidr("10.0.0.0/8").contains(ip("::ffff:10.1.2.3")));
        assert!(!cidr("10.0.0.0/8").contains(ip("::ffff:11.1.2.3")));
        // `::a.b.c.d` (IPv4-compatible, deprecated) is not a mapped address.
        assert!(!cidr("10.0.0.0/8").contains(ip("::10.1.2.3")));
        assert!(cidr("::ffff:10.0.0.0/104").contains(ip("10.9.9.9")));
        assert!(cidr("::ffff:0:0/96").contains(ip("127.0.0.1")));
        assert!(!cidr("::ffff:10.0.0.0/104").contains(ip("11.9.9.9")));
        assert!(cidr("127.0.0.1").contains(ip("::ffff:127.0.0.1")));
    }

    #[test]
    fn allow_list() {
        let list: AllowList = ["10.0.0.0/8", "::1", "192.0.2.0/24"]
            .iter()
            .map(|s| cidr(s))
            .collect();
        assert_eq!(list.rules().len(), 3);
        assert!(list.contains(ip("10.2.3.4")));
        assert!(list.contains(ip("::1")));
        assert!(list.contains(ip("::ffff:192.0.2.200")));
        assert!(!list.contains(ip("127.0.0.1")));
        assert!(!list.contains(ip("2001:db8::1")));
        let empty = AllowList::default();
        assert!(empty.is_empty());
        assert!(
            !empty.contains(ip("10.0.0.1")),
            "an empty list allows nothing"
        );
    }

    #[test]
    fn display_round_trips() {
        for text in [
            "10.0.0.0/8",
            "0.0.0.0/0",
            "::/0",
            "2001:db8::/32",
            "192.0.2.7/32",
        ] {
            assert_eq!(cidr(text).to_string(), text);
            assert_eq!(cidr(&cidr(text).to_string()), cidr(text));
        }
    }

    #[test]
    fn every_prefix_length_splits_correctly() {
        // For each prefix, the network's first and last address are in, the neighbours out.
        for prefix in 0..=32u8 {
            let base = 0xC000_0000u32 & !(u32::MAX.checked_shr(u32::from(prefix)).unwrap_or(0));
            let net = Cidr::new(IpAddr::V4(Ipv4Addr::from(base)), prefix).unwrap();
            let size = 1u64 << (32 - u32::from(prefix));
            let last = (u64::from(base) + size - 1) as u32;
            assert!(
                net.contains(IpAddr::V4(Ipv4Addr::from(base))),
                "/{prefix} first"
            );
            assert!(
                net.contains(IpAddr::V4(Ipv4Addr::from(last))),
                "/{prefix} last"
            );
            if let Some(after) = last.checked_add(1) {
                assert!(!net.contains(IpAddr::V4(after.into())), "/{prefix} after");
            }
            if let Some(before) = base.checked_sub(1) {
                assert!(!net.contains(IpAddr::V4(before.into())), "/{prefix} before");
            }
        }
        for prefix in 0..=128u8 {
            let base =
                (0x2001_0db8u128 << 96) & !(u128::MAX.checked_shr(u32::from(prefix)).unwrap_or(0));
            let net = Cidr::new(IpAddr::V6(Ipv6Addr::from(base)), prefix).unwrap();
            let last = base | u128::MAX.checked_shr(u32::from(prefix)).unwrap_or(0);
            assert!(net.contains(IpAddr::V6(base.into())), "/{prefix} first");
            assert!(net.contains(IpAddr::V6(last.into())), "/{prefix} last");
            if let Some(after) = last.checked_add(1) {
                assert!(!net.contains(IpAddr::V6(after.into())), "/{prefix} after");
            }
        }
    }
}
