//! Blocking MLLP client over `std::net`: send a message, get *its* acknowledgment.
//!
//! [`Client::send`] frames one message, waits for one reply frame and checks that the reply's
//! MSA-2 is the message's MSH-10 before returning it as an [`Ack`]. [`Client::send_pipelined`]
//! keeps several messages in flight on the same connection and correlates their ACKs in order.
//!
//! # Guarantees
//!
//! A client that simply waits for "the next frame", with a timeout per read, and keeps the
//! connection after a timeout, will read the late ACK of message 1 as the answer to message 2:
//! a mis-pairing that tells the sender message 2 was accepted when it may not have been. This
//! client rules that out in three ways:
//!
//! - **Correlation.** An ACK is returned only if its MSA-2 names the message sent: its MSH-10
//!   as sent, or as [`ack::echoed_control_id`] gives it (how this crate's ACK builder writes
//!   it: 0x0B/0x1C escaped, cut at 199 bytes); otherwise [`ClientError::Mismatch`]. A message without a readable MSH-10 is refused
//!   ([`ClientError::NoControlId`]) unless [`ClientConfig::allow_missing_control_id`] is set.
//! - **One deadline per message.** [`ClientConfig::response_timeout`] bounds the whole exchange,
//!   writing the message and reading its complete ACK, not each read: a server that dribbles
//!   one byte at a time cannot stretch it.
//! - **A connection is never reused after trouble.** After any error except
//!   [`ClientError::NoControlId`] (which sends nothing) the connection is closed. The next send
//!   opens a new one if [`ClientConfig::reconnect`] is set, and fails with
//!   [`ClientError::Closed`] otherwise. Before each send the client also checks that nothing
//!   unrequested is waiting on the socket ([`ClientError::Desync`]).
//!
//! AE and AR (and the commit codes) are acknowledgments, not errors: they come back as an
//! [`Ack`] whose [`code`](Ack::code) says what the receiver did.
//!
//! Delivery is at least once: when a send fails after the message was written, the receiver
//! may have processed it, and a retry may deliver it twice. Receivers deduplicate on MSH-10.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use mllp_reactor::ack::{self, AckCode};
//! use mllp_reactor::{handler_fn, Client, ClientConfig, Reply, Server};
//!
//! # let server = Server::builder(handler_fn(|m, _| Ok(Reply::Send(ack::accept(m)))))
//! #     .bind("127.0.0.1:0")?
//! #     .spawn()?;
//! # let addr = server.local_addr();
//! let config = ClientConfig::default().response_timeout(Duration::from_secs(5));
//! let mut client = Client::connect(addr, config)?;
//! let ack = client.send(b"MSH|^~\\&|LAB|H|EHR|H|20260101||ORU^R01|MSG1|P|2.5.1\r")?;
//! assert_eq!(ack.code, AckCode::AA);
//! assert_eq!(ack.control_id, "MSG1");
//! # server.shutdown(Duration::from_secs(5))?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::borrow::Cow;
use std::collections::VecDeque;
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::ack::{self, AckCode, AckParseError};
use crate::codec::{self, FrameDecoder, FrameError};
use crate::msh::Msh;

/// Default [`ClientConfig::connect_timeout`]: 10 s. Long enough for a TCP handshake across a
/// WAN or VPN with a retransmitted SYN (the first SYN retry is at 1 s, the second at 3 s), short
/// enough that a dead address is noticed before an operator would.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Default [`ClientConfig::response_timeout`]: 30 s, a common receive timeout among MLLP
/// senders; it must cover the receiver's own processing, and our server's default handler
/// timeout is shorter, so a slow handler yields an AE before this fires.
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);

/// Default [`ClientConfig::max_response_size`]: 10 MiB, the same limit as the server's
/// message size ([`codec::DEFAULT_MAX_MESSAGE_SIZE`]). An ACK is a
/// few hundred bytes; the limit only bounds what a broken or hostile server can make us hold.
pub const DEFAULT_MAX_RESPONSE_SIZE: usize = codec::DEFAULT_MAX_MESSAGE_SIZE;

/// Bytes asked for per `read`. An ACK is typically 100–300 bytes, so one read takes a whole
/// ACK (or, pipelined, dozens); the array lives on the stack for the duration of a receive, and
/// a connection's buffer holds at most `max_response_size` plus one such read.
const READ_CHUNK: usize = 8 * 1024;

/// The framing buffer is kept between sends up to this capacity and released above it, so one
/// large message (or a large pipelined batch) does not pin its size for the client's life.
const KEEP_WRITE_BUFFER: usize = 64 * 1024;

/// How often, and how patiently, a [`Client`] reopens its connection.
///
/// Attempt 1 is made at once; before attempt `n + 1` the client sleeps
/// `min(initial × 2ⁿ⁻¹, max)`, jittered to a uniformly random value between half of that and
/// all of it, so that many clients cut off by the same server restart do not reconnect in
/// lockstep. Each attempt tries every resolved address with the connect timeout.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use mllp_reactor::{Backoff, ClientConfig};
///
/// let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2), 4);
/// assert_eq!(backoff.delay(0), Duration::from_millis(100));
/// assert_eq!(backoff.delay(3), Duration::from_millis(800));
/// assert_eq!(backoff.delay(10), Duration::from_secs(2)); // capped
/// let config = ClientConfig::default().reconnect(Some(backoff));
/// assert_eq!(config.reconnect, Some(backoff));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// Delay before the second attempt (before jitter).
    pub initial: Duration,
    /// Upper bound on any delay (before jitter).
    pub max: Duration,
    /// Connection attempts per reconnect, the first included; 0 counts as 1.
    pub attempts: u32,
}

impl Backoff {
    /// A backoff starting at `initial`, doubling up to `max`, giving up after `attempts`.
    pub const fn new(initial: Duration, max: Duration, attempts: u32) -> Self {
        Self {
            initial,
            max,
            attempts,
        }
    }

    /// The delay after failed attempt `retry + 1`, before jitter: `initial × 2^retry`, capped
    /// at `max`. Never overflows.
    pub fn delay(&self, retry: u32) -> Duration {
        let factor = 1u32 << retry.min(31);
        self.initial.saturating_mul(factor).min(self.max)
    }
}

impl Default for Backoff {
    /// 100 ms doubling up to 5 s, 5 attempts: about 1.5 s of waiting (0.75–1.5 s with jitter)
    /// covers a server restart or a load balancer failover; a server that stays down longer
    /// is reported as [`ClientError::Connect`] rather than hidden behind minutes of retries.
    fn default() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(5), 5)
    }
}

/// Options for a [`Client`]. Start from [`ClientConfig::default`] and chain the setters, or
/// set the public fields.
///
/// | Option | Default |
/// |---|---|
/// | `connect_timeout` | [`DEFAULT_CONNECT_TIMEOUT`] (10 s) |
/// | `response_timeout` | [`DEFAULT_RESPONSE_TIMEOUT`] (30 s) |
/// | `max_response_size` | [`DEFAULT_MAX_RESPONSE_SIZE`] (10 MiB) |
/// | `reconnect` | `None`: after an error every send fails with [`ClientError::Closed`] |
/// | `allow_missing_control_id` | `false` |
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use mllp_reactor::{Backoff, ClientConfig};
///
/// let config = ClientConfig::default()
///     .connect_timeout(Duration::from_secs(2))
///     .response_timeout(Duration::from_secs(10))
///     .max_response_size(64 * 1024)
///     .reconnect(Some(Backoff::default()));
/// assert_eq!(config.response_timeout, Duration::from_secs(10));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClientConfig {
    /// Limit for one TCP connect to one address. Zero makes every connect fail.
    pub connect_timeout: Duration,
    /// Limit for one whole exchange: writing the message and reading its complete ACK. Not
    /// renewed by each read. Connecting (and reconnecting, with its backoff) is bounded
    /// separately, by `connect_timeout` and `reconnect`. Zero makes every send time out.
    pub response_timeout: Duration,
    /// Largest ACK payload accepted, in bytes (framing excluded).
    pub max_response_size: usize,
    /// Whether and how to reopen the connection after it was closed; `None`: never.
    pub reconnect: Option<Backoff>,
    /// Send messages with no readable MSH-10 anyway, and accept any ACK for them (no
    /// correlation). Off by default: such an ACK cannot be told apart from a stale one.
    pub allow_missing_control_id: bool,
    /// Speak TLS (feature `tls`); `None`: plain TCP. The handshake happens at connect, each
    /// of its socket operations bounded by `connect_timeout`.
    #[cfg(feature = "tls")]
    pub tls: Option<crate::tls::ClientTls>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            response_timeout: DEFAULT_RESPONSE_TIMEOUT,
            max_response_size: DEFAULT_MAX_RESPONSE_SIZE,
            reconnect: None,
            allow_missing_control_id: false,
            #[cfg(feature = "tls")]
            tls: None,
        }
    }
}

impl ClientConfig {
    /// Sets [`connect_timeout`](Self::connect_timeout).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets [`response_timeout`](Self::response_timeout).
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// Sets [`max_response_size`](Self::max_response_size).
    pub fn max_response_size(mut self, bytes: usize) -> Self {
        self.max_response_size = bytes;
        self
    }

    /// Sets [`reconnect`](Self::reconnect).
    pub fn reconnect(mut self, backoff: Option<Backoff>) -> Self {
        self.reconnect = backoff;
        self
    }

    /// Sets [`allow_missing_control_id`](Self::allow_missing_control_id).
    pub fn allow_missing_control_id(mut self, allow: bool) -> Self {
        self.allow_missing_control_id = allow;
        self
    }

    /// Sets [`tls`](Self::tls).
    #[cfg(feature = "tls")]
    pub fn tls(mut self, tls: crate::tls::ClientTls) -> Self {
        self.tls = Some(tls);
        self
    }
}

/// An acknowledgment received for a message sent, already correlated with it.
///
/// Not to be confused with [`ack::Ack`], the builder a server uses to write one.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Ack {
    /// MSA-1: what the receiver did with the message. AE and AR are answers, not errors.
    pub code: AckCode,
    /// MSA-2, raw (escape sequences not decoded; invalid UTF-8 replaced). Equal to the sent
    /// MSH-10, unless that was missing and [`ClientConfig::allow_missing_control_id`] let the
    /// message go anyway.
    pub control_id: String,
    /// MSA-3, the text message, raw; `None` when absent or empty.
    pub text: Option<String>,
    /// The whole ACK payload as received, framing removed.
    pub raw: Bytes,
}

impl Ack {
    /// Whether the receiver accepted the message (AA or CA).
    pub fn is_accept(&self) -> bool {
        self.code.is_accept()
    }

    /// Parses `frame` and checks its MSA-2 against `expected` (from the sent MSH-10), if known.
    fn correlate(frame: Bytes, expected: Option<&Expected<'_>>) -> Result<Self, ClientError> {
        let parsed = ack::parse(&frame).map_err(ClientError::BadAck)?;
        if let Some(expected) = expected
            && !expected.matches(parsed.control_id)
        {
            return Err(ClientError::Mismatch {
                expected: lossy(expected.sent),
                got: lossy(parsed.control_id),
            });
        }
        let (code, control_id, text) = (
            parsed.code,
            lossy(parsed.control_id),
            parsed.text.map(lossy),
        );
        Ok(Self {
            code,
            control_id,
            text,
            raw: frame,
        })
    }
}

/// Why a [`Client`] could not connect or deliver a message.
///
/// Every variant except [`NoControlId`](Self::NoControlId) leaves the client without a
/// connection; see the [module docs](self).
#[derive(Debug)]
#[non_exhaustive]
pub enum ClientError {
    /// No resolved address accepted a connection (the last address's error), or the address
    /// did not resolve. With reconnect, the error of the last attempt.
    Connect(io::Error),
    /// Reading or writing failed, or the server closed the connection before its ACK. The
    /// message may have been processed.
    Io(io::Error),
    /// No complete ACK within [`ClientConfig::response_timeout`]. The message may have been
    /// processed; its late ACK will never be returned for another message.
    Timeout,
    /// Bytes were waiting from the server before a send: a stale or unsolicited reply. Nothing
    /// was sent.
    Desync,
    /// The ACK's MSA-2 is not the sent message's MSH-10.
    Mismatch {
        /// MSH-10 of the message sent.
        expected: String,
        /// MSA-2 of the ACK received.
        got: String,
    },
    /// The reply exceeded [`ClientConfig::max_response_size`].
    ResponseTooLarge {
        /// The configured limit, in payload bytes.
        limit: usize,
    },
    /// The reply is not a readable acknowledgment.
    BadAck(AckParseError),
    /// The message has no readable MSH-10 to correlate its ACK with. Nothing was sent and the
    /// connection is kept.
    NoControlId,
    /// There is no connection (closed after an earlier error, or by the server while idle)
    /// and [`ClientConfig::reconnect`] is off. Nothing was sent.
    Closed,
    /// The server requires a client certificate (mutual TLS; its `certificate_required`
    /// alert) and this client presented none: give the client an identity
    /// (`ClientTls::client_cert_files`). Under TLS 1.3 this shows at the first send, since
    /// the handshake completes on the client's side before the server refuses.
    ClientCertRequired,
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Connect(e) => write!(f, "cannot connect to the server: {e}"),
            Self::Io(e) => write!(f, "connection i/o error: {e}"),
            Self::Timeout => f.write_str("no complete ack within the response timeout"),
            Self::Desync => f.write_str("unexpected bytes from the server before a send"),
            Self::Mismatch { expected, got } => {
                write!(f, "ack is for message {got:?}, expected {expected:?}")
            }
            Self::ResponseTooLarge { limit } => {
                write!(f, "response exceeds the limit of {limit} bytes")
            }
            Self::BadAck(e) => write!(f, "response is not a readable ack: {e}"),
            Self::NoControlId => f.write_str("message has no readable MSH-10 control id"),
            Self::Closed => f.write_str("connection closed and reconnect is off"),
            Self::ClientCertRequired => f.write_str(
                "the server requires a client certificate (mutual TLS) and none was presented",
            ),
        }
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Connect(e) | Self::Io(e) => Some(e),
            Self::BadAck(e) => Some(e),
            Self::Timeout
            | Self::Desync
            | Self::Mismatch { .. }
            | Self::ResponseTooLarge { .. }
            | Self::NoControlId
            | Self::Closed
            | Self::ClientCertRequired => None,
        }
    }
}

/// A blocking MLLP client on one TCP connection at a time; see the [module docs](self).
///
/// Not thread-safe by design (`&mut self`): one exchange at a time is what keeps ACKs
/// paired with messages. Use one client per sending thread.
pub struct Client {
    /// Resolved once, at [`Client::connect`]; reconnects try them in the same order.
    addrs: Vec<SocketAddr>,
    config: ClientConfig,
    /// `None` after any error: a connection is put back only when an exchange succeeded.
    conn: Option<Conn>,
    /// Framing buffer, reused between sends (see [`KEEP_WRITE_BUFFER`]).
    out: BytesMut,
    /// xorshift64* state for the backoff jitter. INVARIANT: never 0.
    rng: u64,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("addrs", &self.addrs)
            .field("connected_to", &self.peer_addr())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Resolves `addr` and connects to the first address that accepts, within
    /// [`ClientConfig::connect_timeout`] per address, with `TCP_NODELAY` set (an MLLP message
    /// is one write, and Nagle would hold it back waiting for the previous ACK's TCP ACK).
    ///
    /// The first connect is made once, without backoff, so a wrong address fails fast;
    /// [`ClientConfig::reconnect`] applies to later reconnects.
    ///
    /// # Errors
    ///
    /// [`ClientError::Connect`] if the address does not resolve or no address accepts.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use mllp_reactor::{Client, ClientConfig, ClientError};
    ///
    /// // Nothing listens on a port we just released.
    /// let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    /// let config = ClientConfig::default().connect_timeout(Duration::from_secs(1));
    /// let err = Client::connect(("127.0.0.1", port), config).unwrap_err();
    /// assert!(matches!(err, ClientError::Connect(_)));
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn connect(addr: impl ToSocketAddrs, config: ClientConfig) -> Result<Self, ClientError> {
        let addrs: Vec<SocketAddr> = addr
            .to_socket_addrs()
            .map_err(ClientError::Connect)?
            .collect();
        let conn = Conn::open(&addrs, &config)?;
        Ok(Self {
            addrs,
            config,
            conn: Some(conn),
            out: BytesMut::new(),
            // `| 1` keeps the xorshift state non-zero (a zero state would stay zero).
            rng: RandomState::new().hash_one(Instant::now()) | 1,
        })
    }

    /// Sends one message and returns its acknowledgment.
    ///
    /// In order: reads the message's MSH-10; makes sure there is a connection (reconnecting if
    /// configured) and that nothing is waiting on it; frames and writes the message; reads
    /// exactly one reply frame; parses it and checks its MSA-2 against the MSH-10. Writing and
    /// reading together must finish within [`ClientConfig::response_timeout`].
    ///
    /// `message` is the bare HL7 message (segments separated by CR), without MLLP framing. It
    /// must not contain the bytes `0x1C 0x0D`, which MLLP cannot carry: the receiver would
    /// take them for the end of the frame.
    ///
    /// # Errors
    ///
    /// Any [`ClientError`]; every one but [`ClientError::NoControlId`] closes the connection.
    /// An AE or AR is not an error.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use mllp_reactor::ack::{self, AckCode};
    /// use mllp_reactor::{handler_fn, Client, ClientConfig, Reply, Server};
    ///
    /// // A receiver that rejects everything with an AE.
    /// let server = Server::builder(handler_fn(|m, _| {
    ///     Ok(Reply::Send(ack::nak(m, AckCode::AE, "unknown patient")))
    /// }))
    /// .bind("127.0.0.1:0")?
    /// .spawn()?;
    ///
    /// let mut client = Client::connect(server.local_addr(), ClientConfig::default())?;
    /// let ack = client.send(b"MSH|^~\\&|LAB|H|EHR|H|20260101||ADT^A08|7|P|2.5.1\rPID|1\r")?;
    /// assert_eq!(ack.code, AckCode::AE);
    /// assert_eq!(ack.text.as_deref(), Some("unknown patient"));
    /// assert!(!ack.is_accept());
    /// server.shutdown(Duration::from_secs(5))?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn send(&mut self, message: &[u8]) -> Result<Ack, ClientError> {
        let expected = control_id(message, self.config.allow_missing_control_id)?;
        let mut conn = self.checkout()?;
        // The deadline starts before the write: a server that stops reading must not be able
        // to hold us past it either.
        let deadline = deadline_after(self.config.response_timeout);
        self.out.clear();
        codec::encode_frame(message, &mut self.out);
        let result = conn
            .write_all(&self.out, deadline)
            .and_then(|()| conn.read_frame(deadline))
            .and_then(|frame| Ack::correlate(frame, expected.as_ref()));
        self.release_out();
        // The connection goes back only after a clean exchange; on error it is dropped here,
        // which closes the socket, so a late reply can never be read as another's ACK.
        if result.is_ok() {
            self.conn = Some(conn);
        }
        result
    }

    /// Sends `messages` on one connection with up to `window` of them unacknowledged at a time,
    /// and returns their ACKs in order.
    ///
    /// The receiver answers in order (MLLP, and our server, serve one connection serially), so
    /// the i-th ACK must carry the i-th message's MSH-10. Each message's ACK must arrive within
    /// [`ClientConfig::response_timeout`] of its write. A `window` of 0 counts as 1 (plain
    /// request-response). The window also bounds the ACK bytes the server may have to buffer
    /// while we are still writing, which keeps both sides from blocking on full socket buffers.
    ///
    /// # Errors
    ///
    /// As [`send`](Self::send). Every MSH-10 is read before anything is sent, so
    /// [`ClientError::NoControlId`] means nothing was sent. After any other error the ACKs
    /// already received are lost with it; use
    /// [`send_pipelined_into`](Self::send_pipelined_into) to keep them.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use mllp_reactor::{ack, handler_fn, Client, ClientConfig, Reply, Server};
    ///
    /// # let server = Server::builder(handler_fn(|m, _| Ok(Reply::Send(ack::accept(m)))))
    /// #     .bind("127.0.0.1:0")?
    /// #     .spawn()?;
    /// let mut client = Client::connect(server.local_addr(), ClientConfig::default())?;
    /// let messages: Vec<String> = (0..20)
    ///     .map(|i| format!("MSH|^~\\&|A|B|C|D|20260101||ADT^A01|ID{i}|P|2.5.1\r"))
    ///     .collect();
    /// let acks = client.send_pipelined(&messages, 4)?;
    /// assert_eq!(acks.len(), 20);
    /// assert_eq!(acks[19].control_id, "ID19");
    /// # server.shutdown(Duration::from_secs(5))?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn send_pipelined<M: AsRef<[u8]>>(
        &mut self,
        messages: &[M],
        window: usize,
    ) -> Result<Vec<Ack>, ClientError> {
        let mut acks = Vec::with_capacity(messages.len());
        self.send_pipelined_into(messages, window, &mut acks)?;
        Ok(acks)
    }

    /// As [`send_pipelined`](Self::send_pipelined), appending each ACK to `acks` as it is
    /// received, so that after an error `acks` holds those of the messages before the failed
    /// one (the messages after it may or may not have been processed).
    ///
    /// # Errors
    ///
    /// As [`send_pipelined`](Self::send_pipelined).
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use mllp_reactor::{ack, handler_fn, Client, ClientConfig, Reply, Server};
    ///
    /// # let server = Server::builder(handler_fn(|m, _| Ok(Reply::Send(ack::accept(m)))))
    /// #     .bind("127.0.0.1:0")?
    /// #     .spawn()?;
    /// let mut client = Client::connect(server.local_addr(), ClientConfig::default())?;
    /// let batch: [&[u8]; 2] = [
    ///     b"MSH|^~\\&|A|B|C|D|20260101||ADT^A01|1|P|2.5.1\r",
    ///     b"MSH|^~\\&|A|B|C|D|20260101||ADT^A01|2|P|2.5.1\r",
    /// ];
    /// let mut acks = Vec::new();
    /// client.send_pipelined_into(&batch, 2, &mut acks)?;
    /// assert_eq!(acks.len(), 2);
    /// # server.shutdown(Duration::from_secs(5))?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn send_pipelined_into<M: AsRef<[u8]>>(
        &mut self,
        messages: &[M],
        window: usize,
        acks: &mut Vec<Ack>,
    ) -> Result<(), ClientError> {
        let allow_missing = self.config.allow_missing_control_id;
        let ids = messages
            .iter()
            .map(|m| control_id(m.as_ref(), allow_missing))
            .collect::<Result<Vec<_>, _>>()?;
        if messages.is_empty() {
            return Ok(());
        }
        let mut conn = self.checkout()?;
        let result = conn.pipeline(
            messages,
            &ids,
            window.max(1),
            self.config.response_timeout,
            &mut self.out,
            acks,
        );
        self.release_out();
        if result.is_ok() {
            self.conn = Some(conn);
        }
        result
    }

    /// Whether the client holds a connection. It may still turn out to have been closed by
    /// the server; the next send finds out before sending.
    pub fn is_connected(&self) -> bool {
        self.conn.is_some()
    }

    /// The address of the server currently connected to, if any.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.conn.as_ref().map(|conn| conn.peer)
    }

    /// Closes the connection now. The next send reconnects if configured, or fails with
    /// [`ClientError::Closed`].
    pub fn close(&mut self) {
        self.conn = None;
    }

    /// The options this client was created with.
    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// Takes the connection for one exchange: the current one if it is still clean, else a
    /// new one when reconnect is on.
    fn checkout(&mut self) -> Result<Conn, ClientError> {
        if let Some(mut conn) = self.conn.take() {
            match conn.probe_idle()? {
                Idle::Clean => return Ok(conn),
                // Closed or reset by the server while idle. Nothing was sent on it, so a
                // fresh connection is safe.
                Idle::Gone => {}
            }
        }
        let Some(backoff) = self.config.reconnect else {
            return Err(ClientError::Closed);
        };
        let mut last_error = ClientError::Closed;
        for attempt in 0..backoff.attempts.max(1) {
            if attempt > 0 {
                let delay = jitter(backoff.delay(attempt - 1), &mut self.rng);
                std::thread::sleep(delay);
            }
            match Conn::open(&self.addrs, &self.config) {
                Ok(conn) => return Ok(conn),
                Err(e) => last_error = e,
            }
        }
        Err(last_error)
    }

    /// Releases the framing buffer if a large message grew it.
    fn release_out(&mut self) {
        if self.out.capacity() > KEEP_WRITE_BUFFER {
            self.out = BytesMut::new();
        }
    }
}

/// What [`Conn::probe_idle`] found on an idle connection.
enum Idle {
    /// Nothing waiting: ready to send.
    Clean,
    /// The server closed or reset the connection.
    Gone,
}

/// The connection's byte stream: TLS-capable with the `tls` feature.
#[cfg(feature = "tls")]
type Stream = crate::tls::ClientStream;
#[cfg(not(feature = "tls"))]
type Stream = TcpStream;

/// One open connection and its receive state.
struct Conn {
    stream: Stream,
    peer: SocketAddr,
    /// Received bytes not yet returned as a frame.
    /// INVARIANT: empty between exchanges, unless the server sent more than was asked for
    /// (then the next [`Conn::probe_idle`] reports a desync).
    buf: BytesMut,
    decoder: FrameDecoder,
}

impl Conn {
    /// Connects to the first of `addrs` that accepts.
    fn open(addrs: &[SocketAddr], config: &ClientConfig) -> Result<Self, ClientError> {
        let mut last_error = None;
        for addr in addrs {
            match TcpStream::connect_timeout(addr, config.connect_timeout) {
                Ok(stream) => {
                    stream.set_nodelay(true).map_err(ClientError::Connect)?;
                    #[cfg(feature = "tls")]
                    let stream = match &config.tls {
                        Some(tls) => tls.connect(stream, *addr, config.connect_timeout),
                        None => Ok(Stream::from(stream)),
                    }
                    .map_err(|e| cert_required(e).unwrap_or_else(ClientError::Connect))?;
                    return Ok(Self {
                        stream,
                        peer: *addr,
                        buf: BytesMut::new(),
                        decoder: FrameDecoder::new(config.max_response_size),
                    });
                }
                Err(e) => last_error = Some(e),
            }
        }
        Err(ClientError::Connect(last_error.unwrap_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "address resolved to nothing")
        })))
    }

    /// Checks, without blocking, that the server has sent nothing since the last exchange.
    ///
    /// A byte waiting here answers no message of ours: a late ACK from before, a duplicate, or
    /// a server speaking out of turn. Reading it as the next message's ACK would pair it with the
    /// wrong message (see the module docs), so it is a desync.
    fn probe_idle(&mut self) -> Result<Idle, ClientError> {
        if !self.buf.is_empty() || self.decoder.in_frame() {
            return Err(ClientError::Desync);
        }
        // A non-blocking peek: std has no MSG_DONTWAIT, and a read timeout cannot be zero.
        self.stream.set_nonblocking(true).map_err(ClientError::Io)?;
        let mut probe = [0u8; 1];
        let peeked = loop {
            match self.stream.peek(&mut probe) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => break other,
            }
        };
        self.stream
            .set_nonblocking(false)
            .map_err(ClientError::Io)?;
        match peeked {
            Ok(0) => Ok(Idle::Gone),
            Ok(_) => Err(ClientError::Desync),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Idle::Clean),
            // The server refused us for want of a certificate: reconnecting will not help.
            Err(e) => cert_required(e).map_or(Ok(Idle::Gone), Err),
        }
    }

    /// Writes all of `bytes` before `deadline`, renewing the socket timeout before each write
    /// to what is left of the deadline.
    fn write_all(&mut self, bytes: &[u8], deadline: Option<Instant>) -> Result<(), ClientError> {
        let mut written = 0;
        while written < bytes.len() {
            self.stream
                .set_write_timeout(remaining(deadline)?)
                .map_err(ClientError::Io)?;
            match self.stream.write(&bytes[written..]) {
                Ok(0) => return Err(ClientError::Io(io::ErrorKind::WriteZero.into())),
                Ok(n) => written += n,
                Err(e) => check_io(e)?,
            }
        }
        Ok(())
    }

    /// Reads until one complete frame is buffered, before `deadline`, and returns its payload.
    /// Bytes after it stay in `buf`.
    fn read_frame(&mut self, deadline: Option<Instant>) -> Result<Bytes, ClientError> {
        let mut chunk = [0u8; READ_CHUNK];
        loop {
            match self.decoder.decode(&mut self.buf) {
                Ok(Some(frame)) => return Ok(frame),
                Ok(None) => {}
                Err(FrameError::TooLarge { limit, .. }) => {
                    return Err(ClientError::ResponseTooLarge { limit });
                }
            }
            // Renewed before every read from the one deadline: a per-read timeout would let a
            // server that sends a byte just inside it hold us forever.
            self.stream
                .set_read_timeout(remaining(deadline)?)
                .map_err(ClientError::Io)?;
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    return Err(ClientError::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the server closed the connection before sending an ack",
                    )));
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) => check_io(e)?,
            }
        }
    }

    /// The pipelined exchange: keeps up to `window` messages written but unacknowledged, and
    /// correlates each ACK with the oldest of them.
    fn pipeline<M: AsRef<[u8]>>(
        &mut self,
        messages: &[M],
        ids: &[Option<Expected<'_>>],
        window: usize,
        timeout: Duration,
        out: &mut BytesMut,
        acks: &mut Vec<Ack>,
    ) -> Result<(), ClientError> {
        // Deadlines of the messages written and not yet acknowledged, oldest first.
        // INVARIANT: `in_flight.len() == next - i` at the top of each iteration.
        let mut in_flight: VecDeque<Option<Instant>> = VecDeque::with_capacity(window);
        let mut next = 0;
        for expected in ids {
            if next < messages.len() && in_flight.len() < window {
                // Top the window up in one write: at the start that is `window` frames in
                // one segment, afterwards usually one frame per ACK read.
                out.clear();
                let deadline = deadline_after(timeout);
                while next < messages.len() && in_flight.len() < window {
                    codec::encode_frame(messages[next].as_ref(), out);
                    in_flight.push_back(deadline);
                    next += 1;
                }
                self.write_all(out, deadline)?;
            }
            // The window was just topped up and is at least 1, so the message this ACK
            // answers has been written.
            let deadline = in_flight
                .pop_front()
                .expect("window >= 1 keeps the current message in flight");
            let frame = self.read_frame(deadline)?;
            acks.push(Ack::correlate(frame, expected.as_ref())?);
        }
        Ok(())
    }
}

/// What an ACK's MSA-2 must be to answer a message.
#[derive(Debug)]
struct Expected<'m> {
    /// MSH-10 as sent.
    sent: &'m [u8],
    /// MSH-10 as [`ack::echoed_control_id`] writes it: block bytes escaped, cut at
    /// [`ack::MAX_CONTROL_ID_LEN`]. Usually the same bytes as `sent`, borrowed.
    echoed: Cow<'m, [u8]>,
}

impl Expected<'_> {
    /// Whether `msa2` names the message: as our ACK builder writes it, or echoed raw as some
    /// other receivers do.
    fn matches(&self, msa2: &[u8]) -> bool {
        msa2 == &self.echoed[..] || msa2 == self.sent
    }
}

/// MSH-10 of `message`, which its ACK must echo in MSA-2. `None` only when allowed.
fn control_id(message: &[u8], allow_missing: bool) -> Result<Option<Expected<'_>>, ClientError> {
    let sent = Msh::parse(message).ok().and_then(|msh| msh.control_id());
    match (sent, ack::echoed_control_id(message)) {
        (Some(sent), Some(echoed)) => Ok(Some(Expected { sent, echoed })),
        _ if allow_missing => Ok(None),
        _ => Err(ClientError::NoControlId),
    }
}

/// The deadline `timeout` from now; `None` (no deadline) if it is too far to represent.
fn deadline_after(timeout: Duration) -> Option<Instant> {
    Instant::now().checked_add(timeout)
}

/// Time left before `deadline`, as a socket timeout (`None`: block without limit).
fn remaining(deadline: Option<Instant>) -> Result<Option<Duration>, ClientError> {
    let Some(deadline) = deadline else {
        return Ok(None);
    };
    // A zero socket timeout is an error in std, and means we are out of time anyway.
    match deadline.checked_duration_since(Instant::now()) {
        Some(left) if !left.is_zero() => Ok(Some(left)),
        _ => Err(ClientError::Timeout),
    }
}

/// Sorts an error from `read`/`write`: interrupted calls are retried (`Ok`), an expired socket
/// timeout is our deadline (Unix reports it as `WouldBlock`, Windows as `TimedOut`).
fn check_io(e: io::Error) -> Result<(), ClientError> {
    match e.kind() {
        io::ErrorKind::Interrupted => Ok(()),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Err(ClientError::Timeout),
        _ => Err(cert_required(e).unwrap_or_else(ClientError::Io)),
    }
}

/// [`ClientError::ClientCertRequired`] if `e` carries the TLS layer's mark, else `e` back.
fn cert_required(e: io::Error) -> Result<ClientError, io::Error> {
    if e.get_ref()
        .is_some_and(|inner| inner.is::<crate::identity::CertificateRequired>())
    {
        Ok(ClientError::ClientCertRequired)
    } else {
        Err(e)
    }
}

/// A uniformly random duration in `[delay / 2, delay]` ("equal jitter": spreads reconnects out
/// while keeping at least half the backoff).
fn jitter(delay: Duration, rng: &mut u64) -> Duration {
    let half = delay / 2;
    let span = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
    let offset = next_random(rng) % span.saturating_add(1);
    half + Duration::from_nanos(offset)
}

/// xorshift64* (Vigna 2016): ample for jitter, and keeps `rand` out of the dependencies.
fn next_random(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    x.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

/// MSA/MSH field bytes as a `String` for display and matching by callers.
fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[cfg(test)]
#[path = "client/tests.rs"]
mod tests;
