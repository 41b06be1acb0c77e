//! The server side of one TLS session, sans-IO: rustls plus our incoming buffer, plaintext
//! detection, failure classification, identity and socket-byte counts.

use std::fmt;
use std::io::{self, IoSlice, Read, Write};
use std::sync::Arc;

use rustls::{ServerConfig, ServerConnection};

use super::config::TlsError;
use super::stream::{
    INCOMING_CHUNK, MAX_HANDSHAKE_BYTES, PeerIdentity, ShutdownWrite, TLS_BUFFER_LIMIT, TlsFailure,
    TlsFailureKind,
};
use crate::codec::START_BLOCK;

/// The server side of one TLS session, sans-IO: every method that does I/O takes the socket
/// as an argument, so the session can live next to a socket it does not own (the reactor's
/// `Transport` keeps the socket outside its layers). The crate-private `TlsStream` is the same with the socket
/// inside.
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
/// The socket is any `Read + Write` (mio or std `TcpStream`, an in-memory pipe in tests), and
/// must be the same one on every call.
pub struct TlsSession {
    conn: ServerConnection,
    /// Ciphertext read from the socket and not yet handed to rustls.
    ///
    /// ```text
    /// incoming: | handed to rustls | pending ciphertext | free            |
    ///           0                  in_start             in_end            INCOMING_CHUNK
    /// ```
    /// INVARIANT: `incoming` is empty (released) or `INCOMING_CHUNK` long (longer only after a
    /// large `preload`), and `in_start <= in_end <= incoming.len()`.
    incoming: Vec<u8>,
    in_start: usize,
    in_end: usize,
    /// Set once, when the handshake completes with a client certificate.
    identity: Option<Arc<PeerIdentity>>,
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
    /// Ciphertext handed to rustls while handshaking (at most [`MAX_HANDSHAKE_BYTES`]): an
    /// upper bound on what rustls holds of the client's handshake.
    handshake_input: usize,
    /// Plaintext rustls took for sending and may not have written yet (0 once its queue is
    /// empty).
    queued: usize,
}

impl fmt::Debug for TlsSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSession")
            .field("handshake_done", &!self.conn.is_handshaking())
            .field("protocol", &self.protocol_version())
            .field("peer", &self.identity)
            .field("socket_bytes", &self.socket_bytes)
            .finish_non_exhaustive()
    }
}

impl TlsSession {
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

    /// The identity, shared (cheap to hand to every message's context).
    pub(crate) fn peer_identity_arc(&self) -> Option<Arc<PeerIdentity>> {
        self.identity.clone()
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

    /// A session with `config`; see [`TlsAcceptor::session`].
    ///
    /// [`TlsAcceptor::session`]: super::TlsAcceptor::session
    pub(crate) fn new(config: Arc<ServerConfig>) -> Result<Self, TlsError> {
        let mut conn = ServerConnection::new(config).map_err(|e| TlsError::Setup {
            detail: e.to_string(),
        })?;
        conn.set_buffer_limit(Some(TLS_BUFFER_LIMIT));
        Ok(Self {
            conn,
            incoming: Vec::new(),
            in_start: 0,
            in_end: 0,
            identity: None,
            unreported: 0,
            socket_bytes: 0,
            sniffed: false,
            closing: false,
            failed: None,
            handshake_input: 0,
            queued: 0,
        })
    }

    /// Takes bytes already read from the socket for this session (what followed a PROXY
    /// protocol header in the same read), to be processed before anything read later. Call
    /// before the first [`read`](Self::read); the buffer grows to hold them if they exceed
    /// [`INCOMING_CHUNK`].
    pub fn preload(&mut self, ciphertext: &[u8]) {
        if ciphertext.is_empty() {
            return;
        }
        let pending = self.in_end - self.in_start;
        let mut incoming = vec![0; INCOMING_CHUNK.max(pending + ciphertext.len())];
        incoming[..pending].copy_from_slice(&self.incoming[self.in_start..self.in_end]);
        incoming[pending..pending + ciphertext.len()].copy_from_slice(ciphertext);
        self.incoming = incoming;
        self.in_start = 0;
        self.in_end = pending + ciphertext.len();
        if !self.sniffed {
            self.sniffed = true;
            if self.incoming[0] == START_BLOCK {
                // Reported by the next read, which sees `failed`.
                self.failed = Some(TlsFailureKind::Plaintext);
            }
        }
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
    pub fn read<S: Read + Write>(&mut self, socket: &mut S, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if let Some(kind) = self.failed {
            return Err(TlsFailure::new(kind, None).into_io());
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
                self.feed(socket)?;
                continue;
            }
            if filled > 0 {
                return Ok(filled);
            }
            if socket_read {
                return Err(io::ErrorKind::Interrupted.into());
            }
            socket_read = true;
            self.read_socket(socket)?;
        }
    }

    /// One socket read into `incoming`. At EOF, tells rustls (the reader then reports it).
    fn read_socket<S: Read + Write>(&mut self, socket: &mut S) -> io::Result<()> {
        if self.incoming.len() != INCOMING_CHUNK {
            // Empty (released), or grown by a preload and now drained.
            self.incoming = vec![0; INCOMING_CHUNK];
        }
        // `feed` consumed everything before we get here.
        self.in_start = 0;
        self.in_end = 0;
        let n = loop {
            match socket.read(&mut self.incoming) {
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
                return Err(self.fail(socket, TlsFailureKind::Plaintext, None));
            }
        }
        self.in_end = n;
        Ok(())
    }

    /// Hands pending ciphertext to rustls (as much as its buffer takes) and processes it.
    fn feed<S: Write>(&mut self, socket: &mut S) -> io::Result<()> {
        let mut pending = &self.incoming[self.in_start..self.in_end];
        let handshaking = self.conn.is_handshaking();
        if handshaking {
            // Refuse an over-large handshake as soon as it passes the cap, before rustls
            // buffers it.
            let allowed = MAX_HANDSHAKE_BYTES - self.handshake_input;
            if allowed == 0 {
                let source = rustls::Error::General(format!(
                    "client sent more than {MAX_HANDSHAKE_BYTES} bytes before its handshake completed"
                ));
                return Err(self.fail(socket, TlsFailureKind::Handshake, Some(source)));
            }
            pending = &pending[..pending.len().min(allowed)];
        }
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
                return Err(self.fail(socket, kind, Some(source)));
            }
        };
        self.in_start += taken;
        if handshaking {
            self.handshake_input += taken;
        }
        if let Err(e) = self.conn.process_new_packets() {
            let kind = match &e {
                rustls::Error::NoCertificatesPresented => TlsFailureKind::NoClientCert,
                rustls::Error::InvalidCertificate(_) if handshaking => {
                    TlsFailureKind::BadClientCert
                }
                _ if handshaking => TlsFailureKind::Handshake,
                _ => TlsFailureKind::Protocol,
            };
            return Err(self.fail(socket, kind, Some(e)));
        }
        if handshaking && !self.conn.is_handshaking() {
            self.handshake_input = 0;
            self.identity = self
                .conn
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(|leaf| Arc::new(PeerIdentity::from_der(leaf)));
        }
        Ok(())
    }

    /// Records the failure and makes one best-effort attempt to send rustls' alert (never for
    /// a plaintext peer, who would not understand it).
    fn fail<S: Write>(
        &mut self,
        socket: &mut S,
        kind: TlsFailureKind,
        source: Option<rustls::Error>,
    ) -> io::Error {
        self.failed = Some(kind);
        if kind != TlsFailureKind::Plaintext
            && self.conn.wants_write()
            && let Ok(n) = self.conn.write_tls(socket)
        {
            self.count_written(n);
        }
        self.release_idle_buffers();
        TlsFailure::new(kind, source).into_io()
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
    pub fn write_vectored<S: Write>(
        &mut self,
        socket: &mut S,
        bufs: &[IoSlice<'_>],
    ) -> io::Result<usize> {
        if bufs.iter().all(|b| b.is_empty()) {
            return Ok(0);
        }
        loop {
            let accepted = self.conn.writer().write_vectored(bufs)?;
            if accepted > 0 {
                self.queued += accepted;
                return Ok(accepted);
            }
            let written = self.push(socket)?;
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
    pub fn flush<S: Write>(&mut self, socket: &mut S) -> io::Result<usize> {
        let written = match self.push(socket) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && self.unreported > 0 => 0,
            Err(e) => return Err(e),
        };
        Ok(written + std::mem::take(&mut self.unreported))
    }

    /// The loop behind `flush`: bytes written this call, `WouldBlock` if none could be.
    fn push<S: Write>(&mut self, socket: &mut S) -> io::Result<usize> {
        let mut written = 0;
        while self.conn.wants_write() {
            match self.conn.write_tls(socket) {
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
        self.queued = if self.conn.wants_write() {
            self.queued.saturating_sub(written)
        } else {
            0
        };
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

    /// The session's buffers that vary with what the peer sends or the server answers, for
    /// the memory budget: our ciphertext buffer, the client's handshake handed to rustls
    /// (until the handshake completes; at most [`MAX_HANDSHAKE_BYTES`]) and the plaintext
    /// queued for sending and not yet written. rustls' fixed per-session state (a few KiB, its
    /// 4 KiB receive buffer at rest) and the server's own handshake flight are per-connection
    /// constants, not counted here.
    pub(crate) fn buffered(&self) -> usize {
        self.incoming.capacity() + self.handshake_input + self.queued
    }

    /// Sends `close_notify` (unless the peer never spoke TLS), flushes it, then half-closes the
    /// socket. Call again after `WouldBlock`.
    ///
    /// # Errors
    ///
    /// `WouldBlock` while the alert (or earlier records) cannot all be written yet; the
    /// socket's error.
    pub fn shutdown_write<S: Write + ShutdownWrite>(&mut self, socket: &mut S) -> io::Result<()> {
        if self.failed != Some(TlsFailureKind::Plaintext) {
            if !self.closing {
                self.closing = true;
                self.conn.send_close_notify();
            }
            let written = self.push(socket)?;
            self.unreported += written;
            if self.conn.wants_write() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
        }
        socket.shutdown_write()
    }
}

/// A reader with nothing to give yet.
struct WouldBlockReader;

impl Read for WouldBlockReader {
    fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
        Err(io::ErrorKind::WouldBlock.into())
    }
}
