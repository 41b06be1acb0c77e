//! The byte path under a connection: the one small type through which the reactor reads and
//! writes, so that the PROXY protocol and TLS plug in without `connection.rs` knowing.
//!
//! A transport is the socket plus the layer on it. Plain TCP passes calls straight to the
//! socket. The PROXY layer holds the header's bytes until the header is complete, then gives
//! way (see [`Transport::end_preamble`]). A layer that has bytes of its own to send (TLS
//! handshake records, alerts) reports them through [`Transport::wants_flush`], and the reactor
//! calls [`Transport::flush`] whenever the socket is writable, even with no reply queued.

use std::io::{self, IoSlice, Read};
use std::net::Shutdown;

use bytes::BytesMut;
use mio::net::TcpStream;

use crate::proxy::{ProxyDecoder, ProxyHeader, ProxyMode};
use crate::reason::CloseReason;

/// The layers a server puts on each accepted socket, in order: a PROXY header, then TLS.
#[derive(Clone, Debug, Default)]
pub(crate) struct Acceptors {
    /// Every connection must start with a PROXY protocol header of this version.
    pub(crate) proxy: Option<ProxyMode>,
    /// Serve TLS with sessions from this acceptor (reloadable through a clone of it).
    pub(crate) tls: Option<tls::Acceptor>,
}

/// A connection's byte stream.
#[derive(Debug)]
pub(crate) struct Transport {
    socket: TcpStream,
    /// The layer on the socket; `None` for plain TCP (boxed: 8 bytes per connection, where
    /// most connections have none).
    layer: Option<Box<Layer>>,
}

// Only ever boxed whole (`Transport::layer`): the variants' sizes differ for one allocation
// per connection, and a PROXY header's 1.2 KiB lasts only until the header is read.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Layer {
    /// Waiting for the PROXY protocol header that must start the stream.
    Proxy(Preamble),
    /// TLS (rustls, driven sans-IO: every call is given the socket).
    Tls(tls::Session),
}

/// A connection before its PROXY header is complete.
#[derive(Debug)]
struct Preamble {
    decoder: ProxyDecoder,
    /// Bytes read so far; at most [`MAX_HEADER_LEN`](crate::proxy::MAX_HEADER_LEN) plus one
    /// read (the decoder fails past the cap).
    buf: Vec<u8>,
    /// With TLS behind the header: the session that takes the bytes after it.
    tls: Option<Box<tls::Session>>,
}

/// What reading a PROXY header produced.
#[derive(Debug)]
pub(crate) enum Preambled {
    /// More bytes are needed.
    Partial,
    /// The header, the stream's first bytes after it (for the connection: empty when a TLS
    /// session took them), and whether any bytes followed the header at all.
    Done(ProxyHeader, Vec<u8>, bool),
    /// Not a valid header.
    Failed,
}

impl Transport {
    /// The byte stream of a freshly accepted socket, with the layers `acceptors` name. Fails
    /// (with the reason to count) when the TLS configuration cannot make a session; it was
    /// checked at load, so that does not happen in practice.
    pub(crate) fn accept(socket: TcpStream, acceptors: &Acceptors) -> Result<Self, CloseReason> {
        if let Some(acceptor) = &acceptors.tls {
            let session = acceptor.session().map_err(|_| CloseReason::TlsHandshake)?;
            return Ok(Self::tls(socket, session, acceptors.proxy));
        }
        Ok(match acceptors.proxy {
            Some(mode) => Self::proxied(socket, mode),
            None => Self::tcp(socket),
        })
    }

    /// Plain TCP.
    fn tcp(socket: TcpStream) -> Self {
        Self {
            socket,
            layer: None,
        }
    }

    /// TCP that must start with a PROXY header (read with [`feed_preamble`](Self::feed_preamble)).
    fn proxied(socket: TcpStream, mode: ProxyMode) -> Self {
        Self {
            socket,
            layer: Some(Box::new(Layer::Proxy(Preamble {
                decoder: ProxyDecoder::new(mode),
                buf: Vec::new(),
                tls: None,
            }))),
        }
    }

    /// TLS over TCP, or over TCP after a PROXY header (`proxy`).
    fn tls(socket: TcpStream, session: tls::Session, proxy: Option<ProxyMode>) -> Self {
        let layer = match proxy {
            Some(mode) => Layer::Proxy(Preamble {
                decoder: ProxyDecoder::new(mode),
                buf: Vec::new(),
                tls: Some(Box::new(session)),
            }),
            None => Layer::Tls(session),
        };
        Self {
            socket,
            layer: Some(Box::new(layer)),
        }
    }

    /// Whether the byte path is ready for MLLP: no header awaited, no handshake under way.
    pub(crate) fn ready(&self) -> bool {
        match self.layer.as_deref() {
            None => true,
            Some(Layer::Proxy(_)) => false,
            Some(Layer::Tls(session)) => session.handshake_done(),
        }
    }

    /// The verified client certificate's identity (mutual TLS).
    pub(crate) fn peer_identity(&self) -> Option<std::sync::Arc<crate::identity::PeerIdentity>> {
        match self.layer.as_deref() {
            Some(Layer::Tls(session)) => session.peer_identity_arc(),
            _ => None,
        }
    }

    /// The close reason for a read or write error that is the layer's own failure (a TLS
    /// alert, a plaintext frame on a TLS port, a refused client certificate), or `None` for
    /// the socket's own errors. A generic TLS failure maps to `Io`, for the caller to blame on
    /// the handshake if the connection had not started.
    pub(crate) fn failure_reason(&self, e: &io::Error) -> Option<CloseReason> {
        tls::failure_reason(e)
    }

    /// Releases what buffers the layer can while the connection is idle; returns whether
    /// it had a layer that may have released some (TLS), so that its count may be stale.
    pub(crate) fn release_idle_buffers(&mut self) -> bool {
        if let Some(Layer::Tls(session)) = self.layer.as_deref_mut() {
            session.release_idle_buffers();
            return true;
        }
        false
    }

    /// Whether the stream has a TLS handshake to complete (after its PROXY header, if any).
    pub(crate) fn handshakes(&self) -> bool {
        match self.layer.as_deref() {
            None => false,
            Some(Layer::Proxy(preamble)) => preamble.tls.is_some(),
            Some(Layer::Tls(session)) => !session.handshake_done(),
        }
    }

    /// Heap bytes the layer holds that vary with traffic, for the memory budget: a PROXY
    /// header being read, the TLS session's buffers (see `TlsSession::buffered`).
    pub(crate) fn buffered(&self) -> usize {
        match self.layer.as_deref() {
            None => 0,
            Some(Layer::Proxy(preamble)) => preamble.buf.capacity(),
            Some(Layer::Tls(session)) => session.buffered(),
        }
    }

    /// True while a PROXY header is awaited.
    pub(crate) fn in_preamble(&self) -> bool {
        matches!(self.layer.as_deref(), Some(Layer::Proxy(_)))
    }

    /// Takes raw bytes read from the socket while the PROXY header is awaited. On `Done` the
    /// transport becomes plain TCP.
    pub(crate) fn feed_preamble(&mut self, bytes: &[u8]) -> Preambled {
        let Some(Layer::Proxy(preamble)) = self.layer.as_deref_mut() else {
            return Preambled::Partial;
        };
        preamble.buf.extend_from_slice(bytes);
        match preamble.decoder.decode(&preamble.buf) {
            Ok(None) => Preambled::Partial,
            Err(_) => Preambled::Failed,
            Ok(Some((header, used))) => {
                let rest = preamble.buf.split_off(used);
                if let Some(mut session) = preamble.tls.take() {
                    // The bytes after the header are the start of the TLS stream.
                    session.preload(&rest);
                    self.layer = Some(Box::new(Layer::Tls(*session)));
                    return Preambled::Done(header, Vec::new(), !rest.is_empty());
                }
                self.layer = None;
                let more = !rest.is_empty();
                Preambled::Done(header, rest, more)
            }
        }
    }

    /// Reads from the socket: plaintext once the stream has started, raw header bytes before.
    /// `Ok(0)` is a clean end of stream; `WouldBlock` means nothing (yet).
    pub(crate) fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.layer.as_deref_mut() {
            Some(Layer::Tls(session)) => session.read(&mut self.socket, buf),
            _ => self.socket.read(buf),
        }
    }

    /// Whether [`read_into`](Self::read_into) works: plain TCP, no layer that must see the
    /// bytes first (a PROXY header awaited, TLS).
    pub(crate) fn reads_into(&self) -> bool {
        self.layer.is_none()
    }

    /// Reads up to `max` bytes straight into `buf`'s spare capacity, appending them (no copy
    /// through another buffer). `Ok(0)` is a clean end of stream. Only where
    /// [`reads_into`](Self::reads_into): otherwise `Unsupported`, reading nothing.
    pub(crate) fn read_into(&mut self, buf: &mut BytesMut, max: usize) -> io::Result<usize> {
        if !self.reads_into() {
            return Err(io::ErrorKind::Unsupported.into());
        }
        let spare = buf.spare_capacity_mut();
        let room = spare.len().min(max);
        let result = sys::recv(&self.socket, &mut spare[..room]);
        if let Ok(n) = result {
            let n = n.min(room);
            #[allow(unsafe_code)]
            // SAFETY: `sys::recv` is recv(2) on our socket with the first `room` bytes of the
            // spare capacity: it returns how many bytes the kernel wrote there, from the
            // start, and never writes uninitialised bytes. So the `n` bytes after `len` are
            // initialised, and `len + n <= capacity` (`n <= room <= spare.len()`).
            unsafe {
                buf.set_len(buf.len() + n);
            }
        }
        result
    }

    /// Writes plaintext; returns how much was taken. For TCP that many bytes reached the
    /// socket.
    #[inline]
    pub(crate) fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self.layer.as_deref_mut() {
            None => sys::writev(&self.socket, bufs),
            // Nothing is written before the header: the connection has not started.
            Some(Layer::Proxy(_)) => Ok(0),
            Some(Layer::Tls(session)) => session.write_vectored(&mut self.socket, bufs),
        }
    }

    /// True when the layer holds bytes of its own for the socket.
    pub(crate) fn wants_flush(&self) -> bool {
        match self.layer.as_deref() {
            Some(Layer::Tls(session)) => session.wants_write(),
            _ => false,
        }
    }

    /// Whether the bytes `write_vectored` takes reach the socket directly (plain TCP) or go
    /// through the layer's own queue and are counted by `flush`.
    pub(crate) fn writes_through(&self) -> bool {
        !matches!(self.layer.as_deref(), Some(Layer::Tls(_)))
    }

    /// Pushes the layer's own pending bytes to the socket; returns how many went out.
    pub(crate) fn flush(&mut self) -> io::Result<usize> {
        match self.layer.as_deref_mut() {
            Some(Layer::Tls(session)) => session.flush(&mut self.socket),
            _ => Ok(0),
        }
    }

    /// Ends our sending side (after a TLS `close_notify`, where there is one).
    pub(crate) fn shutdown_write(&mut self) -> io::Result<()> {
        match self.layer.as_deref_mut() {
            Some(Layer::Tls(session)) => session.shutdown_write(&mut self.socket),
            _ => self.socket.shutdown(Shutdown::Write),
        }
    }

    /// The socket, to register with the poll.
    pub(crate) fn socket(&mut self) -> &mut TcpStream {
        &mut self.socket
    }
}

/// The TLS layer: rustls sessions with the `tls` feature.
#[cfg(feature = "tls")]
mod tls {
    use std::io;

    use crate::reason::CloseReason;
    pub(crate) use crate::tls::{TlsAcceptor as Acceptor, TlsSession as Session};
    use crate::tls::{TlsFailure, TlsFailureKind as K};

    /// The close reason of a TLS failure the session reported through `e`.
    pub(super) fn failure_reason(e: &io::Error) -> Option<CloseReason> {
        Some(match TlsFailure::from_io(e)?.kind() {
            K::Plaintext => CloseReason::TlsPlaintext,
            K::NoClientCert => CloseReason::TlsNoClientCert,
            K::BadClientCert => CloseReason::TlsBadClientCert,
            _ => CloseReason::Io(e.kind()),
        })
    }
}

/// The TLS layer without the `tls` feature: types with no values, so the layer's match arms
/// compile in every build and cost nothing in this one.
#[cfg(not(feature = "tls"))]
mod tls {
    use std::convert::Infallible;
    use std::io::{self, IoSlice};
    use std::sync::Arc;

    use mio::net::TcpStream;

    use crate::identity::PeerIdentity;
    use crate::reason::CloseReason;

    // Private fields: outside this module the types look inhabited, so the layer's code
    // compiles without unreachable-code warnings; none of it can run.
    #[derive(Clone, Debug)]
    pub(crate) struct Acceptor {
        never: Infallible,
    }

    #[derive(Debug)]
    pub(crate) struct Session {
        never: Infallible,
    }

    impl Acceptor {
        pub(crate) fn session(&self) -> Result<Session, Infallible> {
            match self.never {}
        }
    }

    impl Session {
        pub(crate) fn handshake_done(&self) -> bool {
            match self.never {}
        }
        pub(crate) fn peer_identity_arc(&self) -> Option<Arc<PeerIdentity>> {
            match self.never {}
        }
        pub(crate) fn release_idle_buffers(&mut self) {
            match self.never {}
        }
        pub(crate) fn buffered(&self) -> usize {
            match self.never {}
        }
        pub(crate) fn preload(&mut self, _: &[u8]) {
            match self.never {}
        }
        pub(crate) fn read(&mut self, _: &mut TcpStream, _: &mut [u8]) -> io::Result<usize> {
            match self.never {}
        }
        pub(crate) fn write_vectored(
            &mut self,
            _: &mut TcpStream,
            _: &[IoSlice<'_>],
        ) -> io::Result<usize> {
            match self.never {}
        }
        pub(crate) fn wants_write(&self) -> bool {
            match self.never {}
        }
        pub(crate) fn flush(&mut self, _: &mut TcpStream) -> io::Result<usize> {
            match self.never {}
        }
        pub(crate) fn shutdown_write(&mut self, _: &mut TcpStream) -> io::Result<()> {
            match self.never {}
        }
    }

    pub(super) fn failure_reason(_: &io::Error) -> Option<CloseReason> {
        None
    }
}

mod sys;

#[cfg(test)]
mod tests;
