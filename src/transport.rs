//! The byte path under a connection: the one small type through which the reactor reads and
//! writes, so that TLS (and later other wrappers) plug in without `connection.rs` knowing.
//!
//! Plain TCP passes calls straight to the socket. A wrapper that has bytes of its own to send
//! (TLS handshake records, alerts) reports them through [`Transport::wants_flush`], and the
//! reactor calls [`Transport::flush`] whenever the socket is writable, even with no reply
//! queued.

use std::io::{self, IoSlice, Read, Write};
use std::net::Shutdown;

use mio::net::TcpStream;

/// A connection's byte stream.
#[derive(Debug)]
pub(crate) enum Transport {
    /// Plain TCP.
    Tcp(TcpStream),
}

impl Transport {
    /// Reads plaintext. `Ok(0)` is a clean end of stream; `WouldBlock` means nothing (yet).
    pub(crate) fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.read(buf),
        }
    }

    /// Writes plaintext; returns how much was taken. For TCP that many bytes reached the
    /// socket.
    pub(crate) fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.write_vectored(bufs),
        }
    }

    /// True when the transport holds bytes of its own for the socket.
    pub(crate) fn wants_flush(&self) -> bool {
        match self {
            Self::Tcp(_) => false,
        }
    }

    /// Pushes the transport's own pending bytes to the socket; returns how many went out.
    pub(crate) fn flush(&mut self) -> io::Result<usize> {
        match self {
            Self::Tcp(_) => Ok(0),
        }
    }

    /// Ends our sending side (after a TLS `close_notify`, where there is one).
    pub(crate) fn shutdown_write(&mut self) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.shutdown(Shutdown::Write),
        }
    }

    /// The socket, to register with the poll.
    pub(crate) fn socket(&mut self) -> &mut TcpStream {
        match self {
            Self::Tcp(s) => s,
        }
    }
}
