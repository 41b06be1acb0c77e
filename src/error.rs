//! Errors (what went wrong in *our* process) and reasons (what happened to a connection or a
//! message because of a peer or a handler: outcomes, not Rust errors).

use std::fmt;
use std::io;

/// A server could not be started or stopped.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// The listening socket could not be bound (address in use, permission, bad address).
    Bind(io::Error),
    /// A builder option was out of range.
    Config(ConfigError),
    /// The poll loop hit an I/O error it cannot recover from (creating the poll, the waker,
    /// or a thread).
    Io(io::Error),
    /// The server's threads stopped before answering (a bug, or a panic in an observer).
    Stopped,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Bind(e) => write!(f, "cannot bind the listening socket: {e}"),
            Self::Config(e) => write!(f, "invalid configuration: {e}"),
            Self::Io(e) => write!(f, "reactor i/o error: {e}"),
            Self::Stopped => f.write_str("the server stopped unexpectedly"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Bind(e) | Self::Io(e) => Some(e),
            Self::Config(e) => Some(e),
            Self::Stopped => None,
        }
    }
}

impl From<ConfigError> for Error {
    fn from(e: ConfigError) -> Self {
        Self::Config(e)
    }
}

/// A builder option that cannot work.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// A duration option was zero.
    ZeroDuration(&'static str),
    /// `max_message_size` was zero or above [`MAX_MESSAGE_SIZE_LIMIT`](crate::MAX_MESSAGE_SIZE_LIMIT).
    MaxMessageSize(usize),
    /// `workers` was zero.
    NoWorkers,
    /// `workers` was above [`MAX_WORKERS`](crate::MAX_WORKERS).
    TooManyWorkers(usize),
    /// `max_in_flight` was zero or above [`MAX_IN_FLIGHT_LIMIT`](crate::MAX_IN_FLIGHT_LIMIT).
    MaxInFlight(usize),
    /// `max_memory` was below twice `max_message_size`.
    MaxMemory(usize),
    /// `reactors` was zero or above [`MAX_REACTORS`](crate::MAX_REACTORS).
    Reactors(usize),
    /// `max_connections` was zero or above the token space.
    MaxConnections(usize),
    /// The bind address did not resolve to any socket address.
    NoAddress,
    /// PROXY protocol was required without naming the balancers allowed to send headers
    /// (`proxy_sources`; `0.0.0.0/0` and `::/0` trust every source).
    ProxySourcesRequired,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ZeroDuration(name) => write!(f, "{name} must be greater than zero"),
            Self::MaxMessageSize(n) => write!(
                f,
                "max_message_size {n} must be between 1 and {}",
                crate::MAX_MESSAGE_SIZE_LIMIT
            ),
            Self::NoWorkers => f.write_str("workers must be at least 1"),
            Self::TooManyWorkers(n) => write!(
                f,
                "workers {n} is above the limit of {}",
                crate::MAX_WORKERS
            ),
            Self::MaxInFlight(n) => write!(
                f,
                "max_in_flight {n} must be between 1 and {}",
                crate::MAX_IN_FLIGHT_LIMIT
            ),
            Self::Reactors(n) => write!(
                f,
                "reactors {n} must be between 1 and {}",
                crate::MAX_REACTORS
            ),
            Self::MaxMemory(n) => {
                write!(f, "max_memory {n} must be at least twice max_message_size")
            }
            Self::MaxConnections(n) => write!(f, "max_connections {n} is out of range"),
            Self::NoAddress => f.write_str("the bind address resolved to nothing"),
            Self::ProxySourcesRequired => f.write_str(
                "PROXY protocol needs the balancers' addresses (proxy sources; \
                 0.0.0.0/0 and ::/0 trust every source)",
            ),
        }
    }
}

impl std::error::Error for ConfigError {}

/// Why a connection ended. Label values for metrics come from [`as_str`](Self::as_str).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseReason {
    /// The peer closed its side and everything it sent was answered.
    PeerClosed,
    /// Nothing was received for `idle_timeout`.
    IdleTimeout,
    /// A frame was started but not completed within `frame_timeout`.
    FrameTimeout,
    /// A frame's payload exceeded `max_message_size`.
    MessageTooLarge,
    /// A read or write failed (connection reset, broken pipe, ...).
    Io(std::io::ErrorKind),
    /// The peer did not read our reply for `write_timeout`.
    WriteStalled,
    /// The server shut down.
    Shutdown,
    /// Accepted over `max_connections` and closed at once.
    Rejected,
    /// The handler asked for the connection to be closed.
    ClosedByHandler,
    /// The peer's address is not on the allow-list (counted as rejected).
    NotAllowed,
    /// PROXY protocol is on and the connection did not start with a valid header (counted as
    /// rejected).
    ProxyHeader,
    /// The connection did not complete its start (PROXY header, TLS handshake) within
    /// `handshake_timeout` (counted as rejected).
    HandshakeTimeout,
    /// A plaintext MLLP frame arrived on a TLS port (counted as rejected).
    TlsPlaintext,
    /// Mutual TLS is required and the client sent no certificate (counted as rejected).
    TlsNoClientCert,
    /// The client's certificate did not verify (counted as rejected).
    TlsBadClientCert,
    /// Any other TLS handshake failure (counted as rejected).
    TlsHandshake,
}

impl CloseReason {
    /// Every reason, in label order (for pre-registering metric handles).
    pub const ALL: [Self; 16] = [
        Self::PeerClosed,
        Self::IdleTimeout,
        Self::FrameTimeout,
        Self::MessageTooLarge,
        Self::Io(std::io::ErrorKind::Other),
        Self::WriteStalled,
        Self::Shutdown,
        Self::Rejected,
        Self::ClosedByHandler,
        Self::NotAllowed,
        Self::ProxyHeader,
        Self::HandshakeTimeout,
        Self::TlsPlaintext,
        Self::TlsNoClientCert,
        Self::TlsBadClientCert,
        Self::TlsHandshake,
    ];

    /// A stable snake_case name, for metric labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PeerClosed => "peer_closed",
            Self::IdleTimeout => "idle_timeout",
            Self::FrameTimeout => "frame_timeout",
            Self::MessageTooLarge => "message_too_large",
            Self::Io(_) => "io_error",
            Self::WriteStalled => "write_stalled",
            Self::Shutdown => "shutdown",
            Self::Rejected => "rejected",
            Self::ClosedByHandler => "closed_by_handler",
            Self::NotAllowed => "not_allowed",
            Self::ProxyHeader => "proxy_header",
            Self::HandshakeTimeout => "handshake_timeout",
            Self::TlsPlaintext => "tls_plaintext",
            Self::TlsNoClientCert => "tls_no_client_cert",
            Self::TlsBadClientCert => "tls_bad_client_cert",
            Self::TlsHandshake => "tls_handshake",
        }
    }

    /// Position in [`ALL`](Self::ALL).
    pub(crate) fn index(self) -> usize {
        match self {
            Self::PeerClosed => 0,
            Self::IdleTimeout => 1,
            Self::FrameTimeout => 2,
            Self::MessageTooLarge => 3,
            Self::Io(_) => 4,
            Self::WriteStalled => 5,
            Self::Shutdown => 6,
            Self::Rejected => 7,
            Self::ClosedByHandler => 8,
            Self::NotAllowed => 9,
            Self::ProxyHeader => 10,
            Self::HandshakeTimeout => 11,
            Self::TlsPlaintext => 12,
            Self::TlsNoClientCert => 13,
            Self::TlsBadClientCert => 14,
            Self::TlsHandshake => 15,
        }
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io(kind) => write!(f, "i/o error: {kind}"),
            other => f.write_str(other.as_str()),
        }
    }
}

/// Why a message was not handled normally (the kinds of the message-exception event).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExceptionReason {
    /// The handler returned `Err`.
    HandlerError,
    /// The handler panicked (caught; the worker goes on).
    Panic,
    /// The handler did not finish within `handler_timeout`.
    HandlerTimeout,
    /// The frame's payload exceeded `max_message_size`; the handler never saw it.
    MessageTooLarge,
}

impl ExceptionReason {
    /// A stable snake_case name, for metric labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::HandlerError => "handler_error",
            Self::Panic => "panic",
            Self::HandlerTimeout => "handler_timeout",
            Self::MessageTooLarge => "message_too_large",
        }
    }
}

impl fmt::Display for ExceptionReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
