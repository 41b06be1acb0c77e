//! Errors: what went wrong in *our* process. (What happened to a connection or a message
//! because of a peer or a handler is a reason, in `reason.rs`: an outcome, not a Rust error.)

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
                crate::limits::MAX_MESSAGE_SIZE_LIMIT
            ),
            Self::NoWorkers => f.write_str("workers must be at least 1"),
            Self::TooManyWorkers(n) => write!(
                f,
                "workers {n} is above the limit of {}",
                crate::limits::MAX_WORKERS
            ),
            Self::MaxInFlight(n) => write!(
                f,
                "max_in_flight {n} must be between 1 and {}",
                crate::limits::MAX_IN_FLIGHT_LIMIT
            ),
            Self::Reactors(n) => write!(
                f,
                "reactors {n} must be between 1 and {}",
                crate::limits::MAX_REACTORS
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
