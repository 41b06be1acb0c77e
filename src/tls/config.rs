//! Server TLS configuration from PEM files, checked at load, and the reloadable acceptor.

use std::fmt;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, InconsistentKeys, OtherError,
    RootCertStore, ServerConfig, SignatureScheme,
};

use super::session::TlsSession;
use super::stream::{MAX_CLIENT_CHAIN_BYTES, MAX_CLIENT_CHAIN_CERTS, TlsStream};
use super::x509;

/// Where a PEM document comes from: a file (re-read on every reload) or memory.
#[derive(Clone)]
pub(crate) enum PemSource {
    File(PathBuf),
    /// `label` names it in error messages.
    Memory {
        label: &'static str,
        pem: Arc<[u8]>,
    },
}

impl PemSource {
    /// How errors name this source: the path, or the label in angle brackets.
    pub(crate) fn name(&self) -> PathBuf {
        match self {
            Self::File(path) => path.clone(),
            Self::Memory { label, .. } => PathBuf::from(format!("<{label}>")),
        }
    }

    fn bytes(&self) -> Result<Arc<[u8]>, TlsError> {
        match self {
            Self::File(path) => {
                std::fs::read(path)
                    .map(Arc::from)
                    .map_err(|error| TlsError::Read {
                        path: path.clone(),
                        error,
                    })
            }
            Self::Memory { pem, .. } => Ok(Arc::clone(pem)),
        }
    }

    /// Every `CERTIFICATE` block, in order; at least one.
    pub(crate) fn certificates(&self) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        let bytes = self.bytes()?;
        let certs = CertificateDer::pem_slice_iter(&bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_error(self.name(), e))?;
        if certs.is_empty() {
            return Err(TlsError::NoCertificate { path: self.name() });
        }
        Ok(certs)
    }

    /// The first private key block (PKCS#8, PKCS#1 or SEC1).
    pub(crate) fn private_key(&self) -> Result<PrivateKeyDer<'static>, TlsError> {
        let bytes = self.bytes()?;
        PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
            pem::Error::NoItemsFound => TlsError::NoPrivateKey { path: self.name() },
            e => pem_error(self.name(), e),
        })
    }

    /// The certificates as a trust store (CA bundle).
    pub(crate) fn roots(&self) -> Result<RootCertStore, TlsError> {
        let mut roots = RootCertStore::empty();
        for cert in self.certificates()? {
            roots.add(cert).map_err(|e| TlsError::BadCa {
                path: self.name(),
                detail: e.to_string(),
            })?;
        }
        Ok(roots)
    }
}

impl fmt::Debug for PemSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.name(), f)
    }
}

fn pem_error(path: PathBuf, error: pem::Error) -> TlsError {
    match error {
        pem::Error::Io(error) => TlsError::Read { path, error },
        other => TlsError::Pem {
            path,
            detail: other.to_string(),
        },
    }
}

/// A TLS or mTLS configuration that could not be loaded. `Display` is one line naming the file.
#[derive(Debug)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read.
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        error: io::Error,
    },
    /// A file is not well-formed PEM.
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong, from the PEM parser.
        detail: String,
    },
    /// A certificate file (or CA bundle) holds no `CERTIFICATE` block.
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// A key file holds no unencrypted private key (PKCS#8, PKCS#1 or SEC1).
    NoPrivateKey {
        /// The file.
        path: PathBuf,
    },
    /// The leaf certificate is not DER X.509 that we can read.
    BadCertificate {
        /// The file.
        path: PathBuf,
    },
    /// The leaf certificate's notAfter has passed.
    Expired {
        /// The file.
        path: PathBuf,
        /// notAfter, as `YYYY-MM-DDTHH:MM:SSZ`.
        not_after: String,
    },
    /// The leaf certificate's notBefore is still to come.
    NotYetValid {
        /// The file.
        path: PathBuf,
        /// notBefore, as `YYYY-MM-DDTHH:MM:SSZ`.
        not_before: String,
    },
    /// The private key does not belong to the leaf certificate.
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// The private key is of a type or curve the crypto provider does not support.
    BadKey {
        /// The key file.
        path: PathBuf,
        /// Why, from rustls.
        detail: String,
    },
    /// A CA bundle certificate cannot be used as a trust anchor.
    BadCa {
        /// The bundle.
        path: PathBuf,
        /// Why, from webpki.
        detail: String,
    },
    /// The server name given to a client is neither a DNS name nor an IP address.
    BadServerName {
        /// The name given.
        name: String,
    },
    /// rustls refused the configuration for another reason.
    Setup {
        /// Why, from rustls.
        detail: String,
    },
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Read { path, error } => write!(f, "cannot read {}: {error}", path.display()),
            Self::Pem { path, detail } => {
                write!(f, "{} is not valid PEM: {detail}", path.display())
            }
            Self::NoCertificate { path } => {
                write!(f, "{} holds no CERTIFICATE block", path.display())
            }
            Self::NoPrivateKey { path } => write!(
                f,
                "{} holds no unencrypted private key (PKCS#8, PKCS#1 or SEC1 PEM)",
                path.display()
            ),
            Self::BadCertificate { path } => {
                write!(f, "{}: certificate is not readable X.509", path.display())
            }
            Self::Expired { path, not_after } => {
                write!(
                    f,
                    "certificate in {} expired at {not_after}",
                    path.display()
                )
            }
            Self::NotYetValid { path, not_before } => write!(
                f,
                "certificate in {} is not valid before {not_before}",
                path.display()
            ),
            Self::KeyMismatch { cert, key } => write!(
                f,
                "private key {} does not match certificate {}",
                key.display(),
                cert.display()
            ),
            Self::BadKey { path, detail } => {
                write!(f, "unusable private key in {}: {detail}", path.display())
            }
            Self::BadCa { path, detail } => {
                write!(f, "unusable CA certificate in {}: {detail}", path.display())
            }
            Self::BadServerName { name } => {
                write!(f, "{name:?} is not a valid DNS name or IP address")
            }
            Self::Setup { detail } => write!(f, "tls configuration rejected: {detail}"),
        }
    }
}

impl std::error::Error for TlsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Read { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// Checks that the leaf certificate is readable and inside its validity period `now`.
pub(crate) fn check_leaf(
    source: &PemSource,
    leaf: &CertificateDer<'_>,
    now: SystemTime,
) -> Result<(), TlsError> {
    let info = x509::parse(leaf).map_err(|_| TlsError::BadCertificate {
        path: source.name(),
    })?;
    let now = match now.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(_) => 0,
    };
    if now > info.not_after {
        return Err(TlsError::Expired {
            path: source.name(),
            not_after: x509::format_time(info.not_after),
        });
    }
    if now < info.not_before {
        return Err(TlsError::NotYetValid {
            path: source.name(),
            not_before: x509::format_time(info.not_before),
        });
    }
    Ok(())
}

/// The crypto provider for every config we build: ring (see the module docs for why).
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The protocol versions to offer: TLS 1.3, and TLS 1.2 unless turned off.
pub(crate) fn versions(tls12: bool) -> &'static [&'static rustls::SupportedProtocolVersion] {
    static TLS13_ONLY: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
    if tls12 {
        rustls::ALL_VERSIONS
    } else {
        TLS13_ONLY
    }
}

/// Where to find the server's certificate, key and (for mTLS) client CA bundle, as PEM.
///
/// Nothing is read until [`TlsAcceptor::new`] (or a reload), which checks everything:
/// readable files, at least one certificate, a private key that matches the leaf certificate,
/// the leaf inside its validity period, and a usable CA bundle. With a client CA bundle every
/// client must present a certificate chaining to it (mTLS is then required, not optional).
///
/// TLS 1.3 and TLS 1.2 are offered (1.2 can be turned off); the cipher suites and key
/// exchanges are rustls' defaults for the ring provider (AES-GCM and ChaCha20-Poly1305 with
/// ECDHE; no CBC, no RSA key exchange).
///
/// # Examples
///
/// ```no_run
/// use mllp_reactor::tls::{TlsAcceptor, TlsConfig};
///
/// let config = TlsConfig::from_files("/etc/mllp/cert.pem", "/etc/mllp/key.pem")
///     .client_ca_file("/etc/mllp/partners-ca.pem"); // mTLS
/// let acceptor = TlsAcceptor::new(config)?; // every file is read and checked here
/// assert!(acceptor.requires_client_cert());
/// # Ok::<(), mllp_reactor::tls::TlsError>(())
/// ```
///
/// Mistakes are typed errors with a one-line message, found at load:
///
/// ```
/// use mllp_reactor::tls::{TlsAcceptor, TlsConfig, TlsError};
///
/// // (rcgen, a dev-dependency, stands in for your PKI.)
/// let ours = rcgen::generate_simple_self_signed(vec!["localhost".into()])?;
/// let other = rcgen::generate_simple_self_signed(vec!["localhost".into()])?;
/// let cert = ours.cert.pem();
///
/// let good = TlsConfig::from_pem(cert.as_str(), ours.signing_key.serialize_pem());
/// assert!(TlsAcceptor::new(good).is_ok());
///
/// let wrong_key = TlsConfig::from_pem(cert.as_str(), other.signing_key.serialize_pem());
/// let err = TlsAcceptor::new(wrong_key).unwrap_err();
/// assert!(matches!(err, TlsError::KeyMismatch { .. }));
/// assert_eq!(err.to_string(), "private key <key PEM> does not match certificate <certificate PEM>");
///
/// let no_cert = TlsConfig::from_pem("not pem", ours.signing_key.serialize_pem());
/// assert!(matches!(TlsAcceptor::new(no_cert), Err(TlsError::NoCertificate { .. })));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug)]
pub struct TlsConfig {
    cert: PemSource,
    key: PemSource,
    client_ca: Option<PemSource>,
    tls12: bool,
}

impl TlsConfig {
    /// Certificate chain (leaf first) and private key from PEM files.
    pub fn from_files(cert_chain: impl AsRef<Path>, key: impl AsRef<Path>) -> Self {
        Self {
            cert: PemSource::File(cert_chain.as_ref().to_path_buf()),
            key: PemSource::File(key.as_ref().to_path_buf()),
            client_ca: None,
            tls12: true,
        }
    }

    /// Certificate chain (leaf first) and private key from PEM text in memory (tests,
    /// secrets managers). A reload rebuilds from the same text.
    pub fn from_pem(cert_chain: impl Into<Vec<u8>>, key: impl Into<Vec<u8>>) -> Self {
        Self {
            cert: memory("certificate PEM", cert_chain),
            key: memory("key PEM", key),
            client_ca: None,
            tls12: true,
        }
    }

    /// Requires client certificates issued by a CA in this PEM bundle (mTLS).
    pub fn client_ca_file(mut self, bundle: impl AsRef<Path>) -> Self {
        self.client_ca = Some(PemSource::File(bundle.as_ref().to_path_buf()));
        self
    }

    /// As [`client_ca_file`](Self::client_ca_file), from PEM text in memory.
    pub fn client_ca_pem(mut self, bundle: impl Into<Vec<u8>>) -> Self {
        self.client_ca = Some(memory("client CA PEM", bundle));
        self
    }

    /// Whether to offer TLS 1.2 besides TLS 1.3 (default `true`: many HL7 engines still
    /// run on Java 8 or .NET Framework stacks that stop at 1.2).
    pub fn tls12(mut self, enabled: bool) -> Self {
        self.tls12 = enabled;
        self
    }

    /// Reads and checks every file, and builds the rustls configuration.
    fn build(&self, now: SystemTime) -> Result<Arc<ServerConfig>, TlsError> {
        let chain = self.cert.certificates()?;
        check_leaf(&self.cert, &chain[0], now)?;
        let key = self.key.private_key()?;
        let builder = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(versions(self.tls12))
            .map_err(|e| TlsError::Setup {
                detail: e.to_string(),
            })?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(bundle) => {
                let roots = Arc::new(bundle.roots()?);
                let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
                    .build()
                    .map_err(|e| TlsError::BadCa {
                        path: bundle.name(),
                        detail: e.to_string(),
                    })?;
                builder.with_client_cert_verifier(Arc::new(BoundedChain(verifier)))
            }
        };
        let config = builder.with_single_cert(chain, key).map_err(|e| match e {
            rustls::Error::InconsistentKeys(InconsistentKeys::KeyMismatch) => {
                TlsError::KeyMismatch {
                    cert: self.cert.name(),
                    key: self.key.name(),
                }
            }
            e => TlsError::BadKey {
                path: self.key.name(),
                detail: e.to_string(),
            },
        })?;
        Ok(Arc::new(config))
    }
}

/// The client-certificate verifier with the chain bounded first: at most
/// [`MAX_CLIENT_CHAIN_CERTS`] certificates and [`MAX_CLIENT_CHAIN_BYTES`] in all, refused
/// before webpki looks at any. Path building tries every certificate that names the issuer it
/// looks for, each a signature check on the reactor thread before the client is authenticated:
/// an unbounded chain of certificates named like the CA costs milliseconds per handshake.
///
/// Verification stays on the reactor thread: rustls 0.23 verifies inside
/// `process_new_packets`, and with the bound the worst chain costs a few signature checks, the
/// order of an honest handshake (BENCHMARKS.md, "mTLS chain attack").
#[derive(Debug)]
struct BoundedChain(Arc<dyn ClientCertVerifier>);

/// Why a client chain was refused before verification.
#[derive(Debug)]
struct ChainTooLarge {
    certs: usize,
    bytes: usize,
}

impl fmt::Display for ChainTooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "client certificate chain of {} certificates, {} bytes (at most {MAX_CLIENT_CHAIN_CERTS} and {MAX_CLIENT_CHAIN_BYTES})",
            self.certs, self.bytes
        )
    }
}

impl std::error::Error for ChainTooLarge {}

impl ClientCertVerifier for BoundedChain {
    fn offer_client_auth(&self) -> bool {
        self.0.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.0.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.0.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let certs = 1 + intermediates.len();
        let bytes = end_entity.len() + intermediates.iter().map(|c| c.len()).sum::<usize>();
        if certs > MAX_CLIENT_CHAIN_CERTS || bytes > MAX_CLIENT_CHAIN_BYTES {
            let error = OtherError(Arc::new(ChainTooLarge { certs, bytes }));
            return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                error,
            )));
        }
        self.0.verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

fn memory(label: &'static str, pem: impl Into<Vec<u8>>) -> PemSource {
    PemSource::Memory {
        label,
        pem: Arc::from(pem.into()),
    }
}

/// Hands out server [`TlsStream`]s, and swaps its configuration on [`reload`](Self::reload)
/// without a restart.
///
/// Cheap to clone: clones share one configuration, so a clone kept by a SIGHUP handler reloads
/// the one the server accepts with. A reload affects connections accepted after it; existing
/// connections keep the configuration they started with (each holds its own `Arc`) and go on
/// undisturbed. A reload that fails keeps the old configuration in force.
///
/// # Examples
///
/// ```no_run
/// use mllp_reactor::tls::{TlsAcceptor, TlsConfig};
///
/// let acceptor = TlsAcceptor::new(TlsConfig::from_files("cert.pem", "key.pem"))?;
/// // Later, after the files were replaced on disk (e.g. on SIGHUP):
/// match acceptor.reload() {
///     Ok(()) => eprintln!("tls: reloaded"),
///     Err(e) => eprintln!("tls: reload failed, keeping the old certificate: {e}"),
/// }
/// # Ok::<(), mllp_reactor::tls::TlsError>(())
/// ```
#[derive(Clone)]
pub struct TlsAcceptor {
    shared: Arc<Shared>,
}

struct Shared {
    /// Where the files are; replaced only by a successful [`TlsAcceptor::replace`]. Held
    /// during a reload, so reloads are serialised and never interleave their file reads.
    source: Mutex<TlsConfig>,
    /// The configuration new connections get. A read lock is held only to clone the `Arc`.
    current: RwLock<Arc<ServerConfig>>,
}

impl fmt::Debug for TlsAcceptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let source = self
            .shared
            .source
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        f.debug_struct("TlsAcceptor")
            .field("source", &*source)
            .finish_non_exhaustive()
    }
}

impl TlsAcceptor {
    /// Loads and checks `config` (see [`TlsConfig`]).
    ///
    /// # Errors
    ///
    /// A [`TlsError`] naming the file at fault: unreadable, not PEM, no certificate, no key,
    /// key not matching the certificate, certificate expired or not yet valid, bad CA bundle.
    pub fn new(config: TlsConfig) -> Result<Self, TlsError> {
        let built = config.build(SystemTime::now())?;
        Ok(Self {
            shared: Arc::new(Shared {
                source: Mutex::new(config),
                current: RwLock::new(built),
            }),
        })
    }

    /// Re-reads the same files and, if they check out, makes them the configuration for new
    /// connections.
    ///
    /// # Errors
    ///
    /// As [`new`](Self::new); the previous configuration then stays in force.
    pub fn reload(&self) -> Result<(), TlsError> {
        let source = self
            .shared
            .source
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let built = source.build(SystemTime::now())?;
        self.install(built);
        Ok(())
    }

    /// Switches to other files (or PEM text): a reload from a new [`TlsConfig`].
    ///
    /// # Errors
    ///
    /// As [`new`](Self::new); the previous configuration and files then stay in force.
    pub fn replace(&self, config: TlsConfig) -> Result<(), TlsError> {
        let mut source = self
            .shared
            .source
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let built = config.build(SystemTime::now())?;
        *source = config;
        self.install(built);
        Ok(())
    }

    fn install(&self, built: Arc<ServerConfig>) {
        // No code path panics while holding the lock, and an Arc swap cannot be left half done,
        // so a poisoned lock still guards a valid value.
        *self
            .shared
            .current
            .write()
            .unwrap_or_else(PoisonError::into_inner) = built;
    }

    /// Whether clients must present a certificate (a client CA bundle is configured).
    pub fn requires_client_cert(&self) -> bool {
        self.shared
            .source
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .client_ca
            .is_some()
    }

    /// The configuration a connection accepted now would get.
    pub(crate) fn current(&self) -> Arc<ServerConfig> {
        Arc::clone(
            &self
                .shared
                .current
                .read()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    /// Starts the server side of a TLS session on an accepted socket. No I/O happens here: the
    /// handshake advances as the caller drives [`TlsStream::read`] and [`TlsStream::flush`].
    ///
    /// # Errors
    ///
    /// [`TlsError::Setup`] if rustls cannot create a session (not expected with a
    /// configuration that loaded).
    #[doc(hidden)]
    pub fn accept<S: Read + Write>(&self, socket: S) -> Result<TlsStream<S>, TlsError> {
        TlsStream::new(self.current(), socket)
    }

    /// As [`accept`](Self::accept), without taking the socket: for a caller that keeps the
    /// socket itself and passes it to each [`TlsSession`] call.
    ///
    /// # Errors
    ///
    /// As [`accept`](Self::accept).
    pub fn session(&self) -> Result<TlsSession, TlsError> {
        TlsSession::new(self.current())
    }
}
