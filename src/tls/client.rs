//! Client-side TLS for [`crate::Client`]: trust anchors, an optional client certificate, the
//! server name, and the blocking stream the client reads and writes.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

use super::config::{self, PemSource, TlsError};

/// TLS options for a [`Client`](crate::Client): the CA bundle that must have issued the
/// server's certificate, optionally a client certificate (for servers that require mTLS), and
/// the name to check the server's certificate against.
///
/// Every file is read and checked when it is given, so a bad file is an error at start,
/// not at the first send. Without [`server_name`](Self::server_name), the server's
/// certificate must name the IP address connected to.
///
/// # Examples
///
/// ```no_run
/// use mllp_reactor::tls::ClientTls;
/// use mllp_reactor::{Client, ClientConfig};
///
/// let tls = ClientTls::from_ca_file("partner-ca.pem")?
///     .client_cert_files("our-cert.pem", "our-key.pem")?
///     .server_name("mllp.partner.example")?;
/// let mut client = Client::connect("mllp.partner.example:2575", ClientConfig::default().tls(tls))?;
/// let ack = client.send(b"MSH|^~\\&|LAB|H|EHR|H|20260101||ORU^R01|MSG1|P|2.5.1\r")?;
/// assert!(ack.is_accept());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct ClientTls {
    roots: Arc<RootCertStore>,
    /// The client certificate chain and key, checked (kept to rebuild on a later setter).
    identity: Option<(PemSource, PemSource)>,
    server_name: Option<ServerName<'static>>,
    tls12: bool,
    /// Built from the fields above by every setter.
    config: Arc<ClientConfig>,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("trust_anchors", &self.roots.len())
            .field("client_cert", &self.identity.as_ref().map(|(cert, _)| cert))
            .field("server_name", &self.server_name)
            .field("tls12", &self.tls12)
            .finish()
    }
}

/// Equal when built from the same sources with the same settings (configs are compared by
/// identity, since rustls configs have no equality).
impl PartialEq for ClientTls {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.config, &other.config) && self.server_name == other.server_name
    }
}

impl Eq for ClientTls {}

impl ClientTls {
    /// Trusts the CA certificates in a PEM bundle.
    ///
    /// # Errors
    ///
    /// [`TlsError`] if the file cannot be read, holds no certificate, or holds one that is not
    /// a usable trust anchor.
    pub fn from_ca_file(bundle: impl AsRef<Path>) -> Result<Self, TlsError> {
        Self::from_source(PemSource::File(bundle.as_ref().to_path_buf()))
    }

    /// As [`from_ca_file`](Self::from_ca_file), from PEM text in memory.
    ///
    /// # Errors
    ///
    /// As [`from_ca_file`](Self::from_ca_file).
    pub fn from_ca_pem(bundle: impl Into<Vec<u8>>) -> Result<Self, TlsError> {
        Self::from_source(PemSource::Memory {
            label: "CA PEM",
            pem: Arc::from(bundle.into()),
        })
    }

    fn from_source(bundle: PemSource) -> Result<Self, TlsError> {
        let roots = Arc::new(bundle.roots()?);
        let config = build(&roots, None, true)?;
        Ok(Self {
            roots,
            identity: None,
            server_name: None,
            tls12: true,
            config,
        })
    }

    /// Presents this certificate chain (leaf first) and key to servers that ask for one.
    ///
    /// # Errors
    ///
    /// [`TlsError`]: unreadable file, no certificate or key, key not matching the certificate,
    /// certificate expired or not yet valid.
    pub fn client_cert_files(
        self,
        cert_chain: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<Self, TlsError> {
        self.with_identity(
            PemSource::File(cert_chain.as_ref().to_path_buf()),
            PemSource::File(key.as_ref().to_path_buf()),
        )
    }

    /// As [`client_cert_files`](Self::client_cert_files), from PEM text in memory.
    ///
    /// # Errors
    ///
    /// As [`client_cert_files`](Self::client_cert_files).
    pub fn client_cert_pem(
        self,
        cert_chain: impl Into<Vec<u8>>,
        key: impl Into<Vec<u8>>,
    ) -> Result<Self, TlsError> {
        let source = |label, pem: Vec<u8>| PemSource::Memory {
            label,
            pem: Arc::from(pem),
        };
        self.with_identity(
            source("client certificate PEM", cert_chain.into()),
            source("client key PEM", key.into()),
        )
    }

    fn with_identity(mut self, cert: PemSource, key: PemSource) -> Result<Self, TlsError> {
        self.config = build(&self.roots, Some((&cert, &key)), self.tls12)?;
        self.identity = Some((cert, key));
        Ok(self)
    }

    /// The DNS name (or IP address) the server's certificate must carry; by default the IP
    /// address connected to.
    ///
    /// # Errors
    ///
    /// [`TlsError::BadServerName`] if `name` is neither a DNS name nor an IP address.
    pub fn server_name(mut self, name: &str) -> Result<Self, TlsError> {
        let parsed =
            ServerName::try_from(name.to_owned()).map_err(|_| TlsError::BadServerName {
                name: name.to_owned(),
            })?;
        self.server_name = Some(parsed);
        Ok(self)
    }

    /// Whether to offer TLS 1.2 besides TLS 1.3 (default `true`).
    ///
    /// # Errors
    ///
    /// As [`client_cert_files`](Self::client_cert_files), whose files are read again.
    pub fn tls12(mut self, enabled: bool) -> Result<Self, TlsError> {
        let identity = self.identity.as_ref().map(|(c, k)| (c, k));
        self.config = build(&self.roots, identity, enabled)?;
        self.tls12 = enabled;
        Ok(self)
    }

    /// Starts a session to `addr` over `tcp` and completes the handshake, each socket
    /// operation bounded by `timeout`.
    pub(crate) fn connect(
        &self,
        tcp: TcpStream,
        addr: SocketAddr,
        timeout: Duration,
    ) -> io::Result<ClientStream> {
        let name = self
            .server_name
            .clone()
            .unwrap_or_else(|| ServerName::IpAddress(addr.ip().into()));
        let mut conn = ClientConnection::new(Arc::clone(&self.config), name)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let timeout = (!timeout.is_zero()).then_some(timeout);
        tcp.set_read_timeout(timeout)?;
        tcp.set_write_timeout(timeout)?;
        let mut tcp = tcp;
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp)
                .map_err(mark_certificate_required)?;
        }
        Ok(ClientStream::Tls(Box::new(StreamOwned::new(conn, tcp))))
    }
}

impl ClientTls {
    /// Connects `tcp` (already connected) with TLS and completes the handshake, each socket
    /// operation bounded by `timeout`: a blocking stream for tools that drive their own
    /// sockets (the load generator). The server name is the configured one, else the peer's IP.
    ///
    /// # Errors
    ///
    /// The handshake's or the socket's error.
    pub fn connect_stream(&self, tcp: TcpStream, timeout: Duration) -> io::Result<TlsClientStream> {
        let addr = tcp.peer_addr()?;
        match self.connect(tcp, addr, timeout)? {
            ClientStream::Tls(stream) => Ok(TlsClientStream(stream)),
            ClientStream::Plain(_) => Err(io::Error::other("a TLS connect gave plain TCP")),
        }
    }
}

/// A blocking TLS client stream over TCP, from [`ClientTls::connect_stream`].
#[derive(Debug)]
pub struct TlsClientStream(Box<StreamOwned<ClientConnection, TcpStream>>);

impl TlsClientStream {
    /// The TCP socket under the session.
    pub fn tcp(&self) -> &TcpStream {
        &self.0.sock
    }
}

impl io::Read for TlsClientStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl io::Write for TlsClientStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// Builds the rustls client configuration.
fn build(
    roots: &Arc<RootCertStore>,
    identity: Option<(&PemSource, &PemSource)>,
    tls12: bool,
) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(config::provider())
        .with_protocol_versions(config::versions(tls12))
        .map_err(|e| TlsError::Setup {
            detail: e.to_string(),
        })?
        .with_root_certificates(Arc::clone(roots));
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = cert.certificates()?;
            config::check_leaf(cert, &chain[0], SystemTime::now())?;
            builder
                .with_client_auth_cert(chain, key.private_key()?)
                .map_err(|e| match e {
                    rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                        TlsError::KeyMismatch {
                            cert: cert.name(),
                            key: key.name(),
                        }
                    }
                    e => TlsError::BadKey {
                        path: key.name(),
                        detail: e.to_string(),
                    },
                })?
        }
    };
    Ok(Arc::new(config))
}

/// The client's connection: plain TCP or TLS over it, blocking with socket timeouts.
pub(crate) enum ClientStream {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl From<TcpStream> for ClientStream {
    fn from(tcp: TcpStream) -> Self {
        Self::Plain(tcp)
    }
}

impl ClientStream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Self::Plain(tcp) => tcp,
            Self::Tls(tls) => &tls.sock,
        }
    }

    pub(crate) fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        self.tcp().set_nonblocking(nonblocking)
    }

    pub(crate) fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.tcp().set_read_timeout(timeout)
    }

    pub(crate) fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.tcp().set_write_timeout(timeout)
    }

    /// What `TcpStream::peek` tells on a non-blocking socket, one layer up: `Ok(n > 0)` if
    /// application data is waiting, `Ok(0)` if the server closed, `WouldBlock` if neither.
    ///
    /// For TLS, records that carry no data (TLS 1.3 session tickets, key updates) are
    /// processed here, so they are not mistaken for an unsolicited reply.
    pub(crate) fn peek(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let tls = match self {
            Self::Plain(tcp) => return tcp.peek(buf),
            Self::Tls(tls) => tls,
        };
        let StreamOwned { conn, sock } = &mut **tls;
        let mut eof = false;
        while !eof && conn.wants_read() {
            match conn.read_tls(sock) {
                Ok(0) => eof = true,
                Ok(_) => {
                    let state = conn.process_new_packets().map_err(tls_error)?;
                    if state.plaintext_bytes_to_read() > 0 {
                        return Ok(state.plaintext_bytes_to_read());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        let state = conn.process_new_packets().map_err(tls_error)?;
        if state.plaintext_bytes_to_read() > 0 {
            Ok(state.plaintext_bytes_to_read())
        } else if eof || state.peer_has_closed() {
            Ok(0)
        } else {
            Err(io::ErrorKind::WouldBlock.into())
        }
    }
}

impl Read for ClientStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Plain(tcp) => tcp.read(buf),
            Self::Tls(tls) => match tls.read(buf) {
                // A TCP FIN without close_notify: reported as the plain EOF it is for MLLP,
                // whose framing shows any truncation by itself.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(0),
                other => other.map_err(mark_certificate_required),
            },
        }
    }
}

impl Write for ClientStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Plain(tcp) => tcp.write(buf),
            Self::Tls(tls) => {
                let n = tls.write(buf).map_err(mark_certificate_required)?;
                // rustls' `write` pushes ciphertext out but ignores a socket timeout there;
                // pushing here makes the write timeout apply to every byte written.
                while tls.conn.wants_write() {
                    if tls.conn.write_tls(&mut tls.sock)? == 0 {
                        return Err(io::ErrorKind::WriteZero.into());
                    }
                }
                Ok(n)
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Plain(tcp) => tcp.flush(),
            Self::Tls(tls) => tls.flush(),
        }
    }
}

/// A rustls error as the `io::Error` the client reports, with the server's
/// `certificate_required` alert marked (see [`mark_certificate_required`]).
fn tls_error(e: rustls::Error) -> io::Error {
    mark_certificate_required(io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Marks the server's `certificate_required` alert (mTLS, and we presented no certificate) so
/// the client can say so ([`ClientError::ClientCertRequired`](crate::ClientError)); other
/// errors pass unchanged.
fn mark_certificate_required(e: io::Error) -> io::Error {
    let required = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|tls| {
            matches!(
                tls,
                rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired)
            )
        });
    if required {
        io::Error::new(
            io::ErrorKind::PermissionDenied,
            crate::identity::CertificateRequired,
        )
    } else {
        e
    }
}
