//! TLS and mutual TLS (feature `tls`): rustls 0.23 driven sans-IO under the reactor.
//!
//! ```text
//!  PEM files ─▶ TlsConfig ─▶ TlsAcceptor ──accept(socket)──▶ TlsStream ◀─▶ reactor
//!                 (checked)    │ Arc<ServerConfig>,            read / write_vectored: plaintext
//!                 reload() ────┘ swapped for new connections   flush: ciphertext to the socket
//! ```
//!
//! - [`TlsConfig`] names the certificate chain, key and (for mTLS) client CA bundle;
//!   [`TlsAcceptor::new`] reads and checks them, and [`TlsAcceptor::reload`] re-reads them
//!   without a restart: new connections get the new configuration, existing ones keep
//!   theirs, and a reload with bad files keeps the old one and returns a one-line
//!   [`TlsError`].
//! - [`TlsSession`] is one server session (each I/O call takes the socket; the server's
//!   crate-private `TlsStream` is the same with its socket): bounded buffers ([`TLS_BUFFER_LIMIT`],
//!   `INCOMING_CHUNK`), `close_notify` on close, socket-byte counts for write-stall
//!   detection, a typed [`TlsFailure`] for a plaintext MLLP frame sent to a TLS port and for
//!   each way a handshake fails, and the client's [`PeerIdentity`] under mTLS.
//! - [`ClientTls`] gives [`Client`](crate::Client) the same, from the other side.
//!
//! # Choices
//!
//! - **rustls 0.23, minor-pinned** (`~0.23.31`): 0.24 moves buffer ownership to the caller, which
//!   changes how this module holds its buffers.
//! - **ring as the crypto provider.** It builds with a C compiler alone, in well under a
//!   minute. aws-lc-rs (rustls' default) also needs no CMake on x86-64 and aarch64 Linux
//!   since 1.7, but it does need CMake on other targets and for FIPS, and compiling AWS-LC
//!   takes several minutes on our 2-core CI.
//! - **PEM** through `rustls-pki-types` (which rustls already depends on); rustls-pemfile is
//!   deprecated in its favour.
//! - **X.509 fields** (CN, SANs, validity) through a ~250-line DER walk of our own, not
//!   x509-parser and its half-dozen dependencies; see `src/tls/x509.rs`.
//! - **Identity** fingerprints with ring's SHA-256 (already in the graph).
//!
//! # Memory
//!
//! A session holds, besides rustls' own state, up to `INCOMING_CHUNK` (32 KiB) of ciphertext while
//! reading, rustls' receive buffer (4 KiB at rest, up to one record while reading), up to
//! 16 KiB of decrypted plaintext, and up to [`TLS_BUFFER_LIMIT`] of ciphertext for the socket.
//! `release_idle_buffers` frees our buffer and shrinks rustls' receive buffer
//! to its minimum; measured figures are in BENCHMARKS.md.
//!
//! The server counts in its memory budget (`Builder::max_memory`) our ciphertext buffer, the
//! client's handshake while it is under way and the replies queued for encryption. Before a
//! client is authenticated, what it can make the server hold is bounded:
//!
//! - it may send at most [`MAX_HANDSHAKE_BYTES`] (32 KiB) before its handshake completes
//!   (more is a [`TlsFailureKind::Handshake`] at once, not a 64 KiB message rustls reassembles
//!   until the handshake deadline);
//! - at most `Builder::max_handshakes` (default 256) handshakes are in progress at once; a
//!   connection over the cap is not read until one ends.
//!
//! So handshakes hold at most `max_handshakes × (INCOMING_CHUNK + 2 × MAX_HANDSHAKE_BYTES +
//! about 16 KiB of rustls state)`, about 36 MiB at the default (rustls' buffer may double past
//! what it holds), whatever the number of connections (`tests/tls_budget.rs` checks it as
//! RSS).
//!
//! Under mTLS the client's chain is bounded too ([`MAX_CLIENT_CHAIN_CERTS`],
//! [`MAX_CLIENT_CHAIN_BYTES`]) before webpki verifies it: each certificate named like the
//! issuer can cost a signature check on the reactor thread.

mod client;
mod config;
mod session;
mod stream;
mod x509;

#[cfg(test)]
mod tests;

pub use crate::identity::SubjectAltName;
pub(crate) use client::ClientStream;
pub use client::{ClientTls, TlsClientStream};
pub use config::{TlsAcceptor, TlsConfig, TlsError};
pub use session::TlsSession;
#[cfg(test)]
pub(crate) use stream::{INCOMING_CHUNK, TlsStream};
pub use stream::{
    MAX_CLIENT_CHAIN_BYTES, MAX_CLIENT_CHAIN_CERTS, MAX_HANDSHAKE_BYTES, PeerIdentity,
    TLS_BUFFER_LIMIT, TlsFailure, TlsFailureKind,
};

/// The server's TLS byte path, for the per-connection memory measurement
/// (`examples/tls_idle_memory.rs`) and the handshake memory test (`tests/tls_budget.rs`) only:
/// not part of the API, no stability promise. The server drives these itself; applications
/// never need them.
#[doc(hidden)]
pub mod __plumbing {
    pub use super::stream::{INCOMING_CHUNK, ShutdownWrite, TlsStream};
}

/// Fuzz target `tls`: arbitrary bytes from a client to a server [`TlsStream`] (and to the
/// certificate reader) never panic, and buffers stay within their caps.
///
/// Input layout: byte 0 picks the configuration (bit 7: mTLS), whether the first chunk is
/// preloaded as if it had followed a PROXY header (bit 6), and the largest chunk (bits 0–5,
/// plus one, times 61 bytes); the rest is what the "client" sends, delivered in chunks, with
/// the stream driven (read, flush) after each.
#[doc(hidden)]
pub fn __fuzz_server_bytes(data: &[u8]) {
    fuzz::server_bytes(data);
}

mod fuzz {
    use std::collections::VecDeque;
    use std::io::{self, Read, Write};
    use std::sync::OnceLock;

    use super::stream::{INCOMING_CHUNK, ShutdownWrite};
    use super::{TlsAcceptor, TlsConfig, x509};

    /// A self-signed ECDSA P-256 certificate for `fuzz.invalid`, valid until 2126, and its key:
    /// test material only, used by nothing but this fuzz entry point.
    const CERT: &str = "-----BEGIN CERTIFICATE-----
MIIBnjCCAUSgAwIBAgIUVZg5kZe3Cft0u+P5xA5mtN6zv+YwCgYIKoZIzj0EAwIw
FzEVMBMGA1UEAwwMZnV6ei5pbnZhbGlkMCAXDTI2MTIwMTExMjgwOFoYDzIxMjYx
MTA3MTEyODA4WjAXMRUwEwYDVQQDDAxmdXp6LmludmFsaWQwWTATBgcqhkjOPQIB
BggqhkjOPQMBBwNCAATAm/B/AVM4moRZtJIE3bMpfOH8ZBp2bG3AavNNB5NUD6pT
v+EMfpcVth3EWdwewr8OnWZkQxiI0DRXxBh6qEL2o2wwajAdBgNVHQ4EFgQUnn/T
bgXtqNZzTDxzZJoSPw0rexswHwYDVR0jBBgwFoAUnn/TbgXtqNZzTDxzZJoSPw0r
exswDwYDVR0TAQH/BAUwAwEB/zAXBgNVHREEEDAOggxmdXp6LmludmFsaWQwCgYI
KoZIzj0EAwIDSAAwRQIgIUlyJjeyrcYUpztu7NgpWgKJoFDbwqgwe9EsxgodeegC
IQDLs/W/DjcZSb0+utLEWh6URGrvnm9X9IwvYQ2joQsfpQ==
-----END CERTIFICATE-----
";
    const KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg3vikCQJ0RN4vSrpO
HcGTw4Xj6vwvD836oOCJD2ajOzGhRANCAATAm/B/AVM4moRZtJIE3bMpfOH8ZBp2
bG3AavNNB5NUD6pTv+EMfpcVth3EWdwewr8OnWZkQxiI0DRXxBh6qEL2
-----END PRIVATE KEY-----
";

    /// The certificate, for tests that need one without generating it.
    #[cfg(test)]
    pub(super) fn test_identity() -> (&'static str, &'static str) {
        (CERT, KEY)
    }

    fn acceptor(mtls: bool) -> &'static TlsAcceptor {
        static PLAIN: OnceLock<TlsAcceptor> = OnceLock::new();
        static MTLS: OnceLock<TlsAcceptor> = OnceLock::new();
        let (cell, config) = if mtls {
            (&MTLS, TlsConfig::from_pem(CERT, KEY).client_ca_pem(CERT))
        } else {
            (&PLAIN, TlsConfig::from_pem(CERT, KEY))
        };
        // The embedded material is valid until 2126, so this cannot fail before then.
        cell.get_or_init(|| TlsAcceptor::new(config).expect("embedded fuzz certificate loads"))
    }

    /// An in-memory socket: reads what was delivered (then `WouldBlock`, or EOF once closed),
    /// takes writes up to a budget per call (then `WouldBlock`).
    #[derive(Default)]
    struct Pipe {
        inbound: VecDeque<u8>,
        closed: bool,
        sent: usize,
        write_budget: usize,
    }

    impl Read for Pipe {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.inbound.is_empty() {
                return if self.closed {
                    Ok(0)
                } else {
                    Err(io::ErrorKind::WouldBlock.into())
                };
            }
            self.inbound.read(buf)
        }
    }

    impl Write for Pipe {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let n = buf.len().min(self.write_budget);
            if n == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.write_budget -= n;
            self.sent += n;
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl ShutdownWrite for Pipe {
        fn shutdown_write(&self) -> io::Result<()> {
            Ok(())
        }
    }

    pub(super) fn server_bytes(data: &[u8]) {
        let _ = x509::parse(data);
        let _ = super::PeerIdentity::from_der(data);
        let Some((&control, stream)) = data.split_first() else {
            return;
        };
        let chunk = (usize::from(control & 0x3F) + 1) * 61;
        let Ok(mut tls) = acceptor(control & 0x80 != 0).accept(Pipe::default()) else {
            return;
        };
        let mut plaintext = 0;
        let mut buf = [0u8; 4096];
        let mut chunks = stream.chunks(chunk).peekable();
        if control & 0x40 != 0
            && let Some(first) = chunks.next()
        {
            tls.preload(first);
        }
        'deliver: while let Some(piece) = chunks.next() {
            let pipe = tls.socket();
            pipe.inbound.extend(piece);
            pipe.closed = chunks.peek().is_none();
            pipe.write_budget = chunk;
            // Bounded: every round either consumes input, ends the stream, or stops.
            for _ in 0..(2 * piece.len() + 4) {
                match tls.read(&mut buf) {
                    Ok(0) => break 'deliver,
                    Ok(n) => plaintext += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => break 'deliver, // a TlsFailure, or the pipe's own error
                }
                assert!(tls.buffered_ciphertext_capacity() <= INCOMING_CHUNK);
                let _ = tls.flush();
            }
            assert!(plaintext <= data.len(), "more plaintext than input");
        }
        tls.socket().write_budget = usize::MAX;
        let _ = tls.flush();
        let _ = tls.shutdown_write();
        tls.release_idle_buffers();
        assert!(tls.buffered_ciphertext_capacity() <= INCOMING_CHUNK);
    }
}
