//! The byte path under a connection: the one small type through which the reactor reads and
//! writes, so that the PROXY protocol and TLS plug in without `connection.rs` knowing.
//!
//! A transport is the socket plus the layer on it. Plain TCP passes calls straight to the
//! socket. The PROXY layer holds the header's bytes until the header is complete, then gives
//! way (see [`Transport::end_preamble`]). A layer that has bytes of its own to send (TLS
//! handshake records, alerts) reports them through [`Transport::wants_flush`], and the reactor
//! calls [`Transport::flush`] whenever the socket is writable, even with no reply queued.

use std::io::{self, IoSlice, Read, Write};
use std::net::Shutdown;

use mio::net::TcpStream;

use crate::proxy::{ProxyDecoder, ProxyHeader, ProxyMode};

/// A connection's byte stream.
#[derive(Debug)]
pub(crate) struct Transport {
    socket: TcpStream,
    layer: Layer,
}

#[derive(Debug)]
enum Layer {
    /// Plain TCP.
    Plain,
    /// Waiting for the PROXY protocol header that must start the stream.
    Proxy(Box<Preamble>),
    /// TLS (rustls, driven sans-IO: every call is given the socket).
    #[cfg(feature = "tls")]
    Tls(Box<crate::tls::TlsSession>),
}

/// A connection before its PROXY header is complete.
#[derive(Debug)]
struct Preamble {
    decoder: ProxyDecoder,
    /// Bytes read so far; at most [`MAX_HEADER_LEN`](crate::proxy::MAX_HEADER_LEN) plus one
    /// read (the decoder fails past the cap).
    buf: Vec<u8>,
    /// With TLS behind the header: the session that takes the bytes after it.
    #[cfg(feature = "tls")]
    tls: Option<Box<crate::tls::TlsSession>>,
}

/// What reading a PROXY header produced.
#[derive(Debug)]
pub(crate) enum Preambled {
    /// More bytes are needed.
    Partial,
    /// The header, and the stream's first bytes after it.
    Done(ProxyHeader, Vec<u8>),
    /// Not a valid header.
    Failed,
}

impl Transport {
    /// Plain TCP.
    pub(crate) fn tcp(socket: TcpStream) -> Self {
        Self {
            socket,
            layer: Layer::Plain,
        }
    }

    /// TCP that must start with a PROXY header (read with [`feed_preamble`](Self::feed_preamble)).
    pub(crate) fn proxied(socket: TcpStream, mode: ProxyMode) -> Self {
        Self {
            socket,
            layer: Layer::Proxy(Box::new(Preamble {
                decoder: ProxyDecoder::new(mode),
                buf: Vec::new(),
                #[cfg(feature = "tls")]
                tls: None,
            })),
        }
    }

    /// TLS over TCP, or over TCP after a PROXY header (`proxy`).
    #[cfg(feature = "tls")]
    pub(crate) fn tls(
        socket: TcpStream,
        session: crate::tls::TlsSession,
        proxy: Option<ProxyMode>,
    ) -> Self {
        let session = Box::new(session);
        let layer = match proxy {
            Some(mode) => Layer::Proxy(Box::new(Preamble {
                decoder: ProxyDecoder::new(mode),
                buf: Vec::new(),
                tls: Some(session),
            })),
            None => Layer::Tls(session),
        };
        Self { socket, layer }
    }

    /// Whether the byte path is ready for MLLP: no header awaited, no handshake under way.
    pub(crate) fn ready(&self) -> bool {
        match &self.layer {
            Layer::Plain => true,
            Layer::Proxy(_) => false,
            #[cfg(feature = "tls")]
            Layer::Tls(session) => session.handshake_done(),
        }
    }

    /// The verified client certificate's identity (mutual TLS).
    #[cfg(feature = "tls")]
    pub(crate) fn peer_identity(&self) -> Option<std::sync::Arc<crate::tls::PeerIdentity>> {
        match &self.layer {
            Layer::Tls(session) => session.peer_identity_arc(),
            _ => None,
        }
    }

    /// Whether the connection must complete a TLS handshake (after its PROXY header, if any)
    /// before it starts: it then needs a handshake slot to read.
    pub(crate) fn handshakes(&self) -> bool {
        match &self.layer {
            Layer::Plain => false,
            #[cfg(feature = "tls")]
            Layer::Proxy(preamble) => preamble.tls.is_some(),
            #[cfg(not(feature = "tls"))]
            Layer::Proxy(_) => false,
            #[cfg(feature = "tls")]
            Layer::Tls(session) => !session.handshake_done(),
        }
    }

    /// Heap bytes the layer holds that vary with traffic, for the memory budget: a PROXY
    /// header being read, the TLS session's buffers (see `TlsSession::buffered`).
    pub(crate) fn buffered(&self) -> usize {
        match &self.layer {
            Layer::Plain => 0,
            Layer::Proxy(preamble) => preamble.buf.capacity(),
            #[cfg(feature = "tls")]
            Layer::Tls(session) => session.buffered(),
        }
    }

    /// Releases what buffers the layer can while the connection is idle.
    pub(crate) fn release_idle_buffers(&mut self) {
        #[cfg(feature = "tls")]
        if let Layer::Tls(session) = &mut self.layer {
            session.release_idle_buffers();
        }
    }

    /// True while a PROXY header is awaited.
    pub(crate) fn in_preamble(&self) -> bool {
        matches!(self.layer, Layer::Proxy(_))
    }

    /// Takes raw bytes read from the socket while the PROXY header is awaited. On `Done` the
    /// transport becomes plain TCP.
    pub(crate) fn feed_preamble(&mut self, bytes: &[u8]) -> Preambled {
        let Layer::Proxy(preamble) = &mut self.layer else {
            return Preambled::Partial;
        };
        preamble.buf.extend_from_slice(bytes);
        match preamble.decoder.decode(&preamble.buf) {
            Ok(None) => Preambled::Partial,
            Err(_) => Preambled::Failed,
            Ok(Some((header, used))) => {
                let rest = preamble.buf.split_off(used);
                #[cfg(feature = "tls")]
                if let Some(mut session) = preamble.tls.take() {
                    // The bytes after the header are the start of the TLS stream.
                    session.preload(&rest);
                    self.layer = Layer::Tls(session);
                    return Preambled::Done(header, Vec::new());
                }
                self.layer = Layer::Plain;
                Preambled::Done(header, rest)
            }
        }
    }

    /// Reads from the socket: plaintext once the stream has started, raw header bytes before.
    /// `Ok(0)` is a clean end of stream; `WouldBlock` means nothing (yet).
    pub(crate) fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.layer {
            #[cfg(feature = "tls")]
            Layer::Tls(session) => session.read(&mut self.socket, buf),
            _ => self.socket.read(buf),
        }
    }

    /// Writes plaintext; returns how much was taken. For TCP that many bytes reached the
    /// socket.
    pub(crate) fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match &mut self.layer {
            Layer::Plain => self.socket.write_vectored(bufs),
            // Nothing is written before the header: the connection has not started.
            Layer::Proxy(_) => Ok(0),
            #[cfg(feature = "tls")]
            Layer::Tls(session) => session.write_vectored(&mut self.socket, bufs),
        }
    }

    /// True when the layer holds bytes of its own for the socket.
    pub(crate) fn wants_flush(&self) -> bool {
        match &self.layer {
            #[cfg(feature = "tls")]
            Layer::Tls(session) => session.wants_write(),
            _ => false,
        }
    }

    /// Whether the bytes `write_vectored` takes reach the socket directly (plain TCP) or go
    /// through the layer's own queue and are counted by `flush`.
    pub(crate) fn writes_through(&self) -> bool {
        matches!(self.layer, Layer::Plain | Layer::Proxy(_))
    }

    /// Pushes the layer's own pending bytes to the socket; returns how many went out.
    pub(crate) fn flush(&mut self) -> io::Result<usize> {
        match &mut self.layer {
            #[cfg(feature = "tls")]
            Layer::Tls(session) => session.flush(&mut self.socket),
            _ => Ok(0),
        }
    }

    /// Ends our sending side (after a TLS `close_notify`, where there is one).
    pub(crate) fn shutdown_write(&mut self) -> io::Result<()> {
        match &mut self.layer {
            #[cfg(feature = "tls")]
            Layer::Tls(session) => session.shutdown_write(&mut self.socket),
            _ => self.socket.shutdown(Shutdown::Write),
        }
    }

    /// The socket, to register with the poll.
    pub(crate) fn socket(&mut self) -> &mut TcpStream {
        &mut self.socket
    }
}
