//! Who the peer is, as far as the transport can tell: the verified client certificate's
//! identity under mutual TLS. The types exist in every build, so that the handler's
//! [`Context`](crate::Context), the observer's events and the reactor carry an
//! `Option<Arc<PeerIdentity>>` without feature gates; only the `tls` feature ever fills it
//! (through `PeerIdentity::from_der`).

use std::fmt;
use std::net::IpAddr;

/// Who the client is, from its verified leaf certificate (mTLS only).
///
/// `Display` writes one line for logs: `CN=lab-gw DNS:lab.example sha256:9f86…`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct PeerIdentity {
    /// The subject's common name (the last CN if there are several), if any.
    pub common_name: Option<String>,
    /// The subject alternative names (DNS, IP, e-mail, URI), in certificate order.
    pub sans: Vec<SubjectAltName>,
    /// SHA-256 of the leaf certificate's DER: what `openssl x509 -fingerprint -sha256` shows.
    pub fingerprint_sha256: [u8; 32],
}

impl PeerIdentity {
    /// The fingerprint as 64 lowercase hex digits.
    pub fn fingerprint_hex(&self) -> String {
        self.fingerprint_sha256
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(cn) = &self.common_name {
            write!(f, "CN={cn} ")?;
        }
        for san in &self.sans {
            write!(f, "{san} ")?;
        }
        write!(f, "sha256:{}", self.fingerprint_hex())
    }
}

/// One subject alternative name of a certificate (RFC 5280 §4.2.1.6).
///
/// `Display` writes the OpenSSL-style form: `DNS:lab.example`, `IP:10.0.0.7`,
/// `email:it@example.org`, `URI:urn:oid:1.2.3`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SubjectAltName {
    /// `dNSName`.
    Dns(String),
    /// `iPAddress` (4 or 16 octets).
    Ip(IpAddr),
    /// `rfc822Name`: an e-mail address.
    Email(String),
    /// `uniformResourceIdentifier`.
    Uri(String),
}

impl fmt::Display for SubjectAltName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Dns(name) => write!(f, "DNS:{name}"),
            Self::Ip(ip) => write!(f, "IP:{ip}"),
            Self::Email(addr) => write!(f, "email:{addr}"),
            Self::Uri(uri) => write!(f, "URI:{uri}"),
        }
    }
}

/// The mark the client's TLS layer puts in an `io::Error` for the server's
/// `certificate_required` alert: the server asked for our identity and we had none. Here, in a
/// module every build has, so the client recognises it without TLS types (and neither module
/// imports the other's).
#[derive(Debug)]
pub(crate) struct CertificateRequired;

impl fmt::Display for CertificateRequired {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the server requires a client certificate")
    }
}

impl std::error::Error for CertificateRequired {}
