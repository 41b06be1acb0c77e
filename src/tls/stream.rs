//! The server side of one TLS session over a non-blocking socket, with the transport methods
//! the reactor calls.

use std::fmt;
use std::io::{self, IoSlice, Read, Write};
use std::sync::Arc;

use rustls::{ServerConfig, ServerConnection};

use super::config::TlsError;
use super::x509::{self, SubjectAltName};
use crate::codec::START_BLOCK;

/// Cap on ciphertext rustls queues for the socket (and on plaintext queued before the
/// handshake completes), via `set_buffer_limit`: 64 KiB, rustls' own default. An ACK is a few
/// hundred bytes, so this is many replies; past it [`TlsStream::write_vectored`] returns
/// `WouldBlock` and the reply waits, unencrypted, in the connection's own bounded buffer.
pub const TLS_BUFFER_LIMIT: usize = 64 * 1024;

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

    fn into_io(self) -> io::Error {
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

/// Who the client is, from its verified leaf certificate (mTLS only).
///
/// `Display` writes one line for logs: `CN=lab-gw DNS:lab.example sha256:9f86…`.
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
    /// Reads the identity of a DER certificate. The fingerprint is always there; CN and SANs
    /// are empty if the certificate cannot be read (it was verified by webpki already, so that
    /// only happens with encodings our minimal reader skips).
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

/// The server side of one TLS session over a non-blocking socket: rustls driven sans-IO, with
/// the reactor's transport methods.
///
/// # Driving it
///
/// - **Readable:** call [`read`](Self::read) until it returns `WouldBlock`. It returns
///   plaintext (`Ok(0)` is end of stream, with or without `close_notify`); `Interrupted`
///   means "ciphertext was consumed but produced no plaintext yet, call again". During the
///   handshake it returns `Interrupted`/`WouldBlock` only.
/// - **After every read and every write:** if [`wants_write`](Self::wants_write), call
///   [`flush`](Self::flush) (handshake messages, alerts and encrypted replies are only sent
///   by `flush`). Its result is the number of bytes that reached the socket, for write-stall
///   detection.
/// - **Reply:** [`write_vectored`](Self::write_vectored) takes plaintext (never more than
///   rustls may queue, [`TLS_BUFFER_LIMIT`]) and returns `WouldBlock` only when the socket
///   itself is full, so waiting for writable readiness is always right.
/// - **Close:** [`shutdown_write`](Self::shutdown_write) sends `close_notify`, then FIN.
/// - **Idle:** [`release_idle_buffers`](Self::release_idle_buffers).
///
/// A `read` error carrying a [`TlsFailure`] ends the connection; any alert rustls had for the
/// peer was already written (best effort). Bytes from the peer never panic or grow a buffer
/// past its cap (fuzzed: `fuzz/fuzz_targets/tls.rs`).
///
/// `S` is generic so tests can drive it over `std::net` sockets or in-memory pipes; the
/// reactor uses the default, `mio::net::TcpStream`.
pub struct TlsStream<S = mio::net::TcpStream> {
    conn: ServerConnection,
    socket: S,
    /// Ciphertext read from the socket and not yet handed to rustls.
    ///
    /// ```text
    /// incoming: | handed to rustls | pending ciphertext | free            |
    ///           0                  in_start             in_end            INCOMING_CHUNK
    /// ```
    /// INVARIANT: `incoming` is empty (released) or `INCOMING_CHUNK` long, and
    /// `in_start <= in_end <= incoming.len()`.
    incoming: Vec<u8>,
    in_start: usize,
    in_end: usize,
    /// Set once, when the handshake completes with a client certificate.
    identity: Option<Box<PeerIdentity>>,
    /// Socket bytes written by `write_vectored` (making room) or `shutdown_write`, reported by
    /// the next `flush`.
    unreported: usize,
    /// Total bytes that reached the socket.
    socket_bytes: u64,
    /// Whether the first byte from the peer has been looked at (plaintext detection).
    sniffed: bool,
    /// Whether `close_notify` has been queued.
    closing: bool,
    /// The failure that ended the session, if any.
    failed: Option<TlsFailureKind>,
}

impl<S> fmt::Debug for TlsStream<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsStream")
            .field("handshake_done", &!self.conn.is_handshaking())
            .field("protocol", &self.protocol_version())
            .field("peer", &self.identity)
            .field("socket_bytes", &self.socket_bytes)
            .finish_non_exhaustive()
    }
}

impl<S> TlsStream<S> {
    /// Whether ciphertext is waiting for the socket (handshake, alert, records).
    pub fn wants_write(&self) -> bool {
        self.conn.wants_write()
    }

    /// Whether the handshake has completed.
    pub fn handshake_done(&self) -> bool {
        !self.conn.is_handshaking()
    }

    /// The verified client's identity, once the handshake has completed with a client
    /// certificate (mTLS).
    pub fn peer_identity(&self) -> Option<&PeerIdentity> {
        self.identity.as_deref()
    }

    /// The negotiated protocol, `"TLSv1.3"` or `"TLSv1.2"`, once known.
    pub fn protocol_version(&self) -> Option<&'static str> {
        self.conn.protocol_version().map(|v| match v {
            rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3",
            rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2",
            _ => "other",
        })
    }

    /// Total bytes written to the socket over the session's life.
    pub fn socket_bytes_written(&self) -> u64 {
        self.socket_bytes
    }

    /// The socket, for registration with the poller.
    pub fn socket(&mut self) -> &mut S {
        &mut self.socket
    }
}

impl<S: Read + Write> TlsStream<S> {
    /// A session with `config` over `socket`; prefer [`TlsAcceptor::accept`].
    ///
    /// [`TlsAcceptor::accept`]: super::TlsAcceptor::accept
    pub(crate) fn new(config: Arc<ServerConfig>, socket: S) -> Result<Self, TlsError> {
        let mut conn = ServerConnection::new(config).map_err(|e| TlsError::Setup {
            detail: e.to_string(),
        })?;
        conn.set_buffer_limit(Some(TLS_BUFFER_LIMIT));
        Ok(Self {
            conn,
            socket,
            incoming: Vec::new(),
            in_start: 0,
            in_end: 0,
            identity: None,
            unreported: 0,
            socket_bytes: 0,
            sniffed: false,
            closing: false,
            failed: None,
        })
    }

    /// Reads plaintext into `buf`; see [Driving it](Self#driving-it).
    ///
    /// At most one socket read per call. Fills `buf` from ciphertext already read as far as it
    /// goes. `Ok(0)`: the peer closed (a TCP FIN without `close_notify` counts too, since MLLP
    /// framing shows any truncation by itself).
    ///
    /// # Errors
    ///
    /// `WouldBlock` (the socket has nothing more), `Interrupted` (progress, no plaintext yet:
    /// call again), an error carrying a [`TlsFailure`], or the socket's own error.
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if let Some(kind) = self.failed {
            return Err(TlsFailure { kind, source: None }.into_io());
        }
        let mut filled = 0;
        let mut socket_read = false;
        loop {
            match self.conn.reader().read(&mut buf[filled..]) {
                Ok(0) => return Ok(filled), // close_notify received and everything read
                Ok(n) => {
                    filled += n;
                    if filled == buf.len() {
                        return Ok(filled);
                    }
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // TCP EOF without close_notify.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(filled),
                Err(e) => return Err(e),
            }
            if self.in_start < self.in_end {
                self.feed()?;
                continue;
            }
            if filled > 0 {
                return Ok(filled);
            }
            if socket_read {
                return Err(io::ErrorKind::Interrupted.into());
            }
            socket_read = true;
            self.read_socket()?;
        }
    }

    /// One socket read into `incoming`. At EOF, tells rustls (the reader then reports it).
    fn read_socket(&mut self) -> io::Result<()> {
        if self.incoming.is_empty() {
            self.incoming = vec![0; INCOMING_CHUNK];
        }
        // `feed` consumed everything before we get here.
        self.in_start = 0;
        self.in_end = 0;
        let n = loop {
            match self.socket.read(&mut self.incoming) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => break other?,
            }
        };
        if n == 0 {
            // An empty reader makes rustls record the EOF.
            self.conn.read_tls(&mut io::empty())?;
            return Ok(());
        }
        if !self.sniffed {
            self.sniffed = true;
            if self.incoming[0] == START_BLOCK {
                return Err(self.fail(TlsFailureKind::Plaintext, None));
            }
        }
        self.in_end = n;
        Ok(())
    }

    /// Hands pending ciphertext to rustls (as much as its buffer takes) and processes it.
    fn feed(&mut self) -> io::Result<()> {
        let mut pending = &self.incoming[self.in_start..self.in_end];
        let handshaking = self.conn.is_handshaking();
        let taken = match self.conn.read_tls(&mut pending) {
            Ok(n) => n,
            // The deframer is full: a handshake message over 64 KiB or a record over 16 KiB.
            Err(e) => {
                let kind = if handshaking {
                    TlsFailureKind::Handshake
                } else {
                    TlsFailureKind::Protocol
                };
                let source = rustls::Error::General(e.to_string());
                return Err(self.fail(kind, Some(source)));
            }
        };
        self.in_start += taken;
        if let Err(e) = self.conn.process_new_packets() {
            let kind = match &e {
                rustls::Error::NoCertificatesPresented => TlsFailureKind::NoClientCert,
                rustls::Error::InvalidCertificate(_) if handshaking => {
                    TlsFailureKind::BadClientCert
                }
                _ if handshaking => TlsFailureKind::Handshake,
                _ => TlsFailureKind::Protocol,
            };
            return Err(self.fail(kind, Some(e)));
        }
        if handshaking && !self.conn.is_handshaking() {
            self.identity = self
                .conn
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(|leaf| Box::new(PeerIdentity::from_der(leaf)));
        }
        Ok(())
    }

    /// Records the failure and makes one best-effort attempt to send rustls' alert (never for
    /// a plaintext peer, who would not understand it).
    fn fail(&mut self, kind: TlsFailureKind, source: Option<rustls::Error>) -> io::Error {
        self.failed = Some(kind);
        if kind != TlsFailureKind::Plaintext
            && self.conn.wants_write()
            && let Ok(n) = self.conn.write_tls(&mut self.socket)
        {
            self.count_written(n);
        }
        self.release_idle_buffers();
        TlsFailure { kind, source }.into_io()
    }

    fn count_written(&mut self, n: usize) {
        self.unreported += n;
        self.socket_bytes += n as u64;
    }

    /// Takes plaintext to send, encrypting it into rustls' queue; see
    /// [Driving it](Self#driving-it). Call [`flush`](Self::flush) afterwards.
    ///
    /// When the queue is full it first pushes ciphertext to the socket to make room (those
    /// bytes are reported by the next `flush`).
    ///
    /// # Errors
    ///
    /// `WouldBlock` when the queue is full and the socket takes no more; the socket's error.
    pub fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        if bufs.iter().all(|b| b.is_empty()) {
            return Ok(0);
        }
        loop {
            let accepted = self.conn.writer().write_vectored(bufs)?;
            if accepted > 0 {
                return Ok(accepted);
            }
            let written = self.push()?;
            if written == 0 {
                // Nothing queued for the socket, yet rustls takes no plaintext: the handshake
                // is not done and the pre-handshake queue is full. The reactor never writes
                // before it has read a message, so this is not expected in practice.
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.unreported += written;
        }
    }

    /// Writes queued ciphertext to the socket until it is all out or the socket is full.
    ///
    /// Returns the bytes that reached the socket since the last `flush` (including those
    /// written by `write_vectored` and `shutdown_write`): the measure of progress for
    /// write-stall detection, unlike the plaintext count `write_vectored` returns.
    ///
    /// # Errors
    ///
    /// `WouldBlock` if the socket took nothing and something is pending; the socket's error.
    pub fn flush(&mut self) -> io::Result<usize> {
        let written = match self.push() {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && self.unreported > 0 => 0,
            Err(e) => return Err(e),
        };
        Ok(written + std::mem::take(&mut self.unreported))
    }

    /// The loop behind `flush`: bytes written this call, `WouldBlock` if none could be.
    fn push(&mut self) -> io::Result<usize> {
        let mut written = 0;
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut self.socket) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    written += n;
                    self.socket_bytes += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && written > 0 => break,
                Err(e) => return Err(e),
            }
        }
        Ok(written)
    }

    /// Releases what can be released while the connection is idle: our ciphertext buffer (if
    /// empty), and rustls' receive buffer shrinks to its 4 KiB minimum (if empty).
    pub fn release_idle_buffers(&mut self) {
        if self.in_start == self.in_end {
            self.incoming = Vec::new();
            self.in_start = 0;
            self.in_end = 0;
            // rustls resizes its deframer buffer at the start of `read_tls`, shrinking it to
            // 4 KiB when it holds nothing; a reader that reports WouldBlock changes no state.
            let _ = self.conn.read_tls(&mut WouldBlockReader);
        }
    }

    /// Bytes held in our own buffer (for tests and the fuzz target's bounds check).
    pub(crate) fn buffered_ciphertext_capacity(&self) -> usize {
        self.incoming.capacity()
    }
}

impl<S: Read + Write + ShutdownWrite> TlsStream<S> {
    /// Sends `close_notify` (unless the peer never spoke TLS), flushes it, then half-closes the
    /// socket. Call again after `WouldBlock`.
    ///
    /// # Errors
    ///
    /// `WouldBlock` while the alert (or earlier records) cannot all be written yet; the
    /// socket's error.
    pub fn shutdown_write(&mut self) -> io::Result<()> {
        if self.failed != Some(TlsFailureKind::Plaintext) {
            if !self.closing {
                self.closing = true;
                self.conn.send_close_notify();
            }
            let written = self.push()?;
            self.unreported += written;
            if self.conn.wants_write() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
        }
        self.socket.shutdown_write()
    }
}

/// A reader with nothing to give yet.
struct WouldBlockReader;

impl Read for WouldBlockReader {
    fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
        Err(io::ErrorKind::WouldBlock.into())
    }
}
