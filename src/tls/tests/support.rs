//! Support for the TLS tests: certificates (generated with rcgen once per test binary), a
//! rustls client configuration, `openssl s_client`, temporary directories. Shared by the unit
//! tests (`src/tls/tests.rs`) and the server-level tests (`tests/it/tls.rs`, which includes
//! this file by path).

// Each includer uses a different subset of these helpers.
#![allow(dead_code)]

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A certificate and its key, as PEM, and the certificate's DER.
#[derive(Clone)]
pub(crate) struct Leaf {
    pub(crate) cert: String,
    pub(crate) key: String,
    pub(crate) der: Vec<u8>,
}

/// A test CA with server and client certificates, and a second CA nobody trusts.
pub(crate) struct Pki {
    pub(crate) ca: String,
    pub(crate) server: Leaf,
    /// Same CA, other subject: for reload tests.
    pub(crate) server_b: Leaf,
    pub(crate) client: Leaf,
    pub(crate) other_ca: String,
    pub(crate) other_client: Leaf,
    pub(crate) expired: Leaf,
    pub(crate) not_yet_valid: Leaf,
}

/// The certificates, generated on first use.
pub(crate) fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        let test_ca = ca("Test CA");
        let other = ca("Other CA");
        let server_sans = || {
            vec![
                SanType::DnsName("localhost".try_into().unwrap()),
                SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
                SanType::IpAddress(IpAddr::V6(Ipv6Addr::LOCALHOST)),
            ]
        };
        let client_sans = vec![
            SanType::DnsName("lab.example".try_into().unwrap()),
            SanType::IpAddress("10.1.2.3".parse().unwrap()),
            SanType::Rfc822Name("it@lab.example".try_into().unwrap()),
        ];
        let mut expired = params("expired", server_sans(), false);
        expired.not_before = rcgen::date_time_ymd(2000, 1, 1);
        expired.not_after = rcgen::date_time_ymd(2001, 1, 1);
        let mut future = params("future", server_sans(), false);
        future.not_before = rcgen::date_time_ymd(2200, 1, 1);
        future.not_after = rcgen::date_time_ymd(2201, 1, 1);
        Pki {
            ca: test_ca.pem(),
            server: sign(params("server-a", server_sans(), false), &test_ca),
            server_b: sign(params("server-b", server_sans(), false), &test_ca),
            client: sign(params("lab-gw", client_sans.clone(), true), &test_ca),
            other_ca: other.pem(),
            other_client: sign(params("intruder", client_sans, true), &other),
            expired: sign(expired, &test_ca),
            not_yet_valid: sign(future, &test_ca),
        }
    })
}

pub(crate) fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

pub(crate) fn params(cn: &str, sans: Vec<SanType>, client: bool) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.subject_alt_names = sans;
    params.extended_key_usages = vec![if client {
        ExtendedKeyUsagePurpose::ClientAuth
    } else {
        ExtendedKeyUsagePurpose::ServerAuth
    }];
    params
}

pub(crate) fn sign(params: CertificateParams, issuer: &CertifiedIssuer<'static, KeyPair>) -> Leaf {
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, issuer).unwrap();
    Leaf {
        cert: cert.pem(),
        key: key.serialize_pem(),
        der: cert.der().to_vec(),
    }
}

/// A rustls client configuration (ring) trusting the test CA, offering `versions`, presenting
/// `identity` if given.
pub(crate) fn rustls_client(
    versions: &[&'static rustls::SupportedProtocolVersion],
    identity: Option<&Leaf>,
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pki().ca.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots);
    Arc::new(match identity {
        None => builder.with_no_client_auth(),
        Some(leaf) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from(leaf.der.clone())],
                PrivateKeyDer::from_pem_slice(leaf.key.as_bytes()).unwrap(),
            )
            .unwrap(),
    })
}

/// Runs `openssl s_client` against `addr` (verifying the server against the test CA, name
/// `localhost`, presenting `identity` if given, plus `extra` arguments), sends `input` and
/// reads until the server closes. `None`, with a message, where openssl is not installed.
///
/// # Panics
///
/// If s_client has not finished within `timeout` (it is killed first).
pub(crate) fn s_client(
    addr: SocketAddr,
    identity: Option<&Leaf>,
    extra: &[&str],
    input: &[u8],
    timeout: Duration,
) -> Option<Output> {
    if Command::new("openssl").arg("version").output().is_err() {
        eprintln!("skipped: openssl not found on PATH");
        return None;
    }
    let dir = TempDir::new("s_client");
    let ca = dir.path("ca.pem");
    std::fs::write(&ca, &pki().ca).unwrap();
    let mut command = Command::new("openssl");
    command
        .args([
            "s_client",
            "-connect",
            &addr.to_string(),
            "-servername",
            "localhost",
        ])
        .args(["-verify_return_error", "-ign_eof", "-quiet", "-CAfile"])
        .arg(&ca)
        .args(extra);
    if let Some(leaf) = identity {
        let (cert, key) = (dir.path("client.pem"), dir.path("client.key"));
        std::fs::write(&cert, &leaf.cert).unwrap();
        std::fs::write(&key, &leaf.key).unwrap();
        command.arg("-cert").arg(cert).arg("-key").arg(key);
    }
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(output) => Some(output.unwrap()),
        Err(_) => {
            let _ = Command::new("kill").arg(pid.to_string()).status();
            panic!("openssl s_client did not finish within {timeout:?}");
        }
    }
}

/// A directory removed on drop.
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    pub(crate) fn new(tag: &str) -> Self {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("mllp-tls-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
