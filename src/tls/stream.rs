//! The server side of one TLS session over a non-blocking socket, with the transport methods
//! the reactor calls.

use std::fmt;
use std::io::{self, IoSlice, Read, Write};
use std::sync::Arc;

use rustls::ServerConfig;

use super::config::TlsError;
use super::session::TlsSession;
use super::x509;
pub use crate::identity::PeerIdentity;

/// Cap on ciphertext rustls queues for the socket (and on plaintext queued before the
/// handshake completes), via `set_buffer_limit`: 64 KiB, rustls' own default. An ACK is a few
/// hundred bytes, so this is many replies; past it [`TlsStream::write_vectored`] returns
/// `WouldBlock` and the reply waits, unencrypted, in the connection's own bounded buffer.
pub const TLS_BUFFER_LIMIT: usize = 64 * 1024;

/// Cap on the ciphertext a client may send before its handshake completes: 32 KiB. A real
/// client sends a ClientHello of a few hundred bytes to a few KiB (a second one after a
/// HelloRetryRequest), and under mTLS its certificate chain (at most
/// [`MAX_CLIENT_CHAIN_BYTES`]) and two short messages. More is refused at once as a
/// [`TlsFailureKind::Handshake`] instead of being buffered until `handshake_timeout`: rustls
/// would reassemble a handshake message of up to 64 KiB.
pub const MAX_HANDSHAKE_BYTES: usize = 32 * 1024;

/// Cap on the certificates in a client's chain under mTLS, the leaf included: 4 (a leaf and
/// up to three intermediates). Each certificate that names the same issuer may cost the
/// verifier a signature check before the client is authenticated, so a longer chain is
/// refused before any is checked ([`TlsFailureKind::BadClientCert`]).
pub const MAX_CLIENT_CHAIN_CERTS: usize = 4;

/// Cap on the total DER size of a client's certificate chain under mTLS: 16 KiB (four
/// RSA-4096 certificates with generous extensions fit). Larger is refused like a longer chain.
pub const MAX_CLIENT_CHAIN_BYTES: usize = 16 * 1024;

/// Ciphertext read from the socket per `read` call: two full TLS records (16 KiB of payload
/// plus at most 256 bytes of expansion and a 5-byte header each, RFC 8446 §5.2), so a stream of
/// full records costs one syscall per 32 KiB. Allocated on the first read, released by
/// [`TlsStream::release_idle_buffers`].
pub const INCOMING_CHUNK: usize = 32 * 1024;

/// What made a TLS connection fail; carried inside the `io::Error` that
/// [`TlsStream::read`] returns (find it with [`TlsFailure::from_io`]).
#[derive(Debug)]
pub struct TlsFailure {
    kind: TlsFailureKind,
    source: Option<rustls::Error>,
}

/// The class of a [`TlsFailure`], for counting: the handshake kinds are rejections
/// (`mllp_connections_rejected_total{reason}`), [`Protocol`](Self::Protocol) is a close.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TlsFailureKind {
    /// The first byte was `0x0B`: a plaintext MLLP frame sent to a TLS port. Nothing is sent
    /// back (the peer would not understand an alert); the connection should just be closed.
    Plaintext,
    /// mTLS is required and the client presented no certificate.
    NoClientCert,
    /// The client's certificate did not verify (unknown CA, expired, wrong usage, ...).
    BadClientCert,
    /// Any other handshake failure: not TLS, no common version or cipher suite, bad messages.
    Handshake,
    /// A failure after the handshake (bad record MAC, unexpected message, ...).
    Protocol,
}

impl TlsFailureKind {
    /// Label value for metrics: `tls_plaintext`, `tls_no_client_cert`,
    /// `tls_bad_client_cert`, `tls_handshake`, `tls_protocol`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Plaintext => "tls_plaintext",
            Self::NoClientCert => "tls_no_client_cert",
            Self::BadClientCert => "tls_bad_client_cert",
            Self::Handshake => "tls_handshake",
            Self::Protocol => "tls_protocol",
        }
    }

    /// Whether the connection failed during its handshake (a rejection, not a close).
    pub fn is_rejection(self) -> bool {
        !matches!(self, Self::Protocol)
    }
}

impl TlsFailure {
    /// The class of failure.
    pub fn kind(&self) -> TlsFailureKind {
        self.kind
    }

    /// The `TlsFailure` inside an error returned by [`TlsStream::read`], if it is one (other
    /// errors are the socket's own).
    pub fn from_io(error: &io::Error) -> Option<&Self> {
        error.get_ref()?.downcast_ref::<Self>()
    }

    pub(crate) fn new(kind: TlsFailureKind, source: Option<rustls::Error>) -> Self {
        Self { kind, source }
    }

    pub(crate) fn into_io(self) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, self)
    }
}

impl fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            TlsFailureKind::Plaintext => "plaintext MLLP sent to a TLS port",
            TlsFailureKind::NoClientCert => "tls client presented no certificate",
            TlsFailureKind::BadClientCert => "tls client certificate rejected",
            TlsFailureKind::Handshake => "tls handshake failed",
            TlsFailureKind::Protocol => "tls protocol error",
        };
        match &self.source {
            Some(e) => write!(f, "{what}: {e}"),
            None => f.write_str(what),
        }
    }
}

impl std::error::Error for TlsFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// Reading an identity needs the certificate parser and SHA-256 of the `tls` feature.
impl PeerIdentity {
    /// Reads the identity of a DER certificate. The fingerprint is always there; CN and SANs
    /// are empty if the certificate cannot be read (it was verified by webpki already, so that
    /// only happens with encodings our minimal reader skips).
    ///
    /// # Examples
    ///
    /// ```
    /// use mllp_reactor::tls::{PeerIdentity, SubjectAltName};
    ///
    /// // (rcgen, a dev-dependency, stands in for the client's certificate.)
    /// let client = rcgen::generate_simple_self_signed(vec!["lab.example".into()])?;
    /// let identity = PeerIdentity::from_der(client.cert.der());
    /// assert_eq!(identity.common_name.as_deref(), Some("rcgen self signed cert"));
    /// assert_eq!(identity.sans, [SubjectAltName::Dns("lab.example".into())]);
    /// assert_eq!(identity.fingerprint_hex().len(), 64);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn from_der(der: &[u8]) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, der);
        let mut fingerprint_sha256 = [0u8; 32];
        fingerprint_sha256.copy_from_slice(digest.as_ref());
        let info = x509::parse(der).unwrap_or_default();
        Self {
            common_name: info.common_name,
            sans: info.sans,
            fingerprint_sha256,
        }
    }
}

/// Half-closes the write side of a socket (TCP `shutdown(Write)`), for
/// [`TlsStream::shutdown_write`].
pub trait ShutdownWrite {
    /// Sends FIN: no more bytes will be written.
    ///
    /// # Errors
    ///
    /// The socket's error.
    fn shutdown_write(&self) -> io::Result<()>;
}

impl ShutdownWrite for mio::net::TcpStream {
    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(std::net::Shutdown::Write)
    }
}

impl ShutdownWrite for std::net::TcpStream {
    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(std::net::Shutdown::Write)
    }
}

/// A [`TlsSession`] with its socket: the server side of one TLS session over a non-blocking
/// socket, with the reactor's transport methods. See [`TlsSession`] for how to drive it; the
/// methods are the same, without the socket argument.
///
/// `S` is generic so tests can drive it over `std::net` sockets or in-memory pipes; the
/// reactor uses the default, `mio::net::TcpStream`.
pub struct TlsStream<S = mio::net::TcpStream> {
    session: TlsSession,
    socket: S,
}

impl<S> fmt::Debug for TlsStream<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.session, f)
    }
}

impl<S> TlsStream<S> {
    /// Whether ciphertext is waiting for the socket (handshake, alert, records).
    pub fn wants_write(&self) -> bool {
        self.session.wants_write()
    }

    /// Whether the handshake has completed.
    pub fn handshake_done(&self) -> bool {
        self.session.handshake_done()
    }

    /// The verified client's identity, once the handshake has completed with a client
    /// certificate (mTLS).
    pub fn peer_identity(&self) -> Option<&PeerIdentity> {
        self.session.peer_identity()
    }

    /// The negotiated protocol, `"TLSv1.3"` or `"TLSv1.2"`, once known.
    pub fn protocol_version(&self) -> Option<&'static str> {
        self.session.protocol_version()
    }

    /// Total bytes written to the socket over the session's life.
    pub fn socket_bytes_written(&self) -> u64 {
        self.session.socket_bytes_written()
    }

    /// The socket, for registration with the poller.
    pub fn socket(&mut self) -> &mut S {
        &mut self.socket
    }

    /// See [`TlsSession::preload`].
    pub fn preload(&mut self, ciphertext: &[u8]) {
        self.session.preload(ciphertext);
    }

    /// See [`TlsSession::release_idle_buffers`].
    pub fn release_idle_buffers(&mut self) {
        self.session.release_idle_buffers();
    }

    /// The session and the socket, apart.
    pub fn into_parts(self) -> (TlsSession, S) {
        (self.session, self.socket)
    }

    /// Bytes held in our own buffer (for tests and the fuzz target's bounds check).
    pub(crate) fn buffered_ciphertext_capacity(&self) -> usize {
        self.session.buffered_ciphertext_capacity()
    }

    /// See `TlsSession::buffered`.
    #[cfg(test)]
    pub(crate) fn buffered(&self) -> usize {
        self.session.buffered()
    }
}

impl<S: Read + Write> TlsStream<S> {
    /// A session with `config` over `socket`; see [`TlsAcceptor::accept`].
    ///
    /// [`TlsAcceptor::accept`]: super::TlsAcceptor::accept
    pub(crate) fn new(config: Arc<ServerConfig>, socket: S) -> Result<Self, TlsError> {
        Ok(Self {
            session: TlsSession::new(config)?,
            socket,
        })
    }

    /// See [`TlsSession::read`].
    ///
    /// # Errors
    ///
    /// As [`TlsSession::read`].
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.session.read(&mut self.socket, buf)
    }

    /// See [`TlsSession::write_vectored`].
    ///
    /// # Errors
    ///
    /// As [`TlsSession::write_vectored`].
    pub fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.session.write_vectored(&mut self.socket, bufs)
    }

    /// See [`TlsSession::flush`].
    ///
    /// # Errors
    ///
    /// As [`TlsSession::flush`].
    pub fn flush(&mut self) -> io::Result<usize> {
        self.session.flush(&mut self.socket)
    }
}

impl<S: Read + Write + ShutdownWrite> TlsStream<S> {
    /// See [`TlsSession::shutdown_write`].
    ///
    /// # Errors
    ///
    /// As [`TlsSession::shutdown_write`].
    pub fn shutdown_write(&mut self) -> io::Result<()> {
        self.session.shutdown_write(&mut self.socket)
    }
}
