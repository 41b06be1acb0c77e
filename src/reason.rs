//! Reasons: what happened to a connection or a message because of a peer or a handler
//! (outcomes, not Rust errors). Plain data shared by the sans-IO connection and the runtime.

use std::fmt;

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
    /// The peer closed (or reset) the connection without sending a byte, or after nothing but
    /// a PROXY header: a balancer's health check or a port scan. Counted in
    /// `mllp_connections_closed_total{reason="probe"}` when it had started (plain TCP, or
    /// after its `LOCAL` header), in `mllp_connections_rejected_total{reason="probe"}` when it
    /// closed before its PROXY header or TLS handshake. Not a fault: log it quietly.
    Probe,
}

impl CloseReason {
    /// Every reason, in label order (for pre-registering metric handles).
    pub const ALL: [Self; 17] = [
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
        Self::Probe,
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
            Self::Probe => "probe",
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
            Self::Probe => 16,
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

/// Why a connection that never started (never served MLLP: no valid PROXY header, not
/// allowed, no completed TLS handshake, over the cap) ended: the `reason` label of
/// `mllp_connections_rejected_total`. Closed: every close of a connection before its start
/// maps to exactly one of these (see [`before_start`](Self::before_start)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RejectReason {
    /// Accepted over `max_connections`.
    MaxConnections,
    /// The peer (or the PROXY header's source) is not on the allow-list.
    NotAllowed,
    /// No valid PROXY header (or the peer closed or failed while it was due).
    ProxyHeader,
    /// The start did not complete within `handshake_timeout`.
    HandshakeTimeout,
    /// A plaintext MLLP frame on a TLS port.
    TlsPlaintext,
    /// Mutual TLS is required and the client sent no certificate.
    TlsNoClientCert,
    /// The client's certificate did not verify.
    TlsBadClientCert,
    /// Any other TLS handshake failure (or the peer closed or failed during the handshake).
    TlsHandshake,
    /// The server shut down before the connection started.
    Shutdown,
    /// The peer closed before its start without sending a byte (a health check).
    Probe,
}

impl RejectReason {
    /// Every reason, in label order (the metric handles are registered in this order).
    pub(crate) const ALL: [Self; 10] = [
        Self::MaxConnections,
        Self::NotAllowed,
        Self::ProxyHeader,
        Self::HandshakeTimeout,
        Self::TlsPlaintext,
        Self::TlsNoClientCert,
        Self::TlsBadClientCert,
        Self::TlsHandshake,
        Self::Shutdown,
        Self::Probe,
    ];

    /// The metric label.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::MaxConnections => "max_connections",
            Self::NotAllowed => "not_allowed",
            Self::ProxyHeader => "proxy_header",
            Self::HandshakeTimeout => "handshake_timeout",
            Self::TlsPlaintext => "tls_plaintext",
            Self::TlsNoClientCert => "tls_no_client_cert",
            Self::TlsBadClientCert => "tls_bad_client_cert",
            Self::TlsHandshake => "tls_handshake",
            Self::Shutdown => "shutdown",
            Self::Probe => "probe",
        }
    }

    /// Position in [`ALL`](Self::ALL).
    pub(crate) fn index(self) -> usize {
        self as usize
    }

    /// The rejection that a close with `reason` of a connection that never started stands
    /// for. `in_preamble`: it was still waiting for its PROXY header (else for its TLS
    /// handshake). A close that names no stage of the start (a reset, EOF, or anything else a
    /// started connection could see) blames the stage the connection was in.
    pub(crate) fn before_start(reason: CloseReason, in_preamble: bool) -> Self {
        match reason {
            CloseReason::Rejected => Self::MaxConnections,
            CloseReason::NotAllowed => Self::NotAllowed,
            CloseReason::ProxyHeader => Self::ProxyHeader,
            CloseReason::HandshakeTimeout | CloseReason::IdleTimeout => Self::HandshakeTimeout,
            CloseReason::TlsPlaintext => Self::TlsPlaintext,
            CloseReason::TlsNoClientCert => Self::TlsNoClientCert,
            CloseReason::TlsBadClientCert => Self::TlsBadClientCert,
            CloseReason::TlsHandshake => Self::TlsHandshake,
            CloseReason::Shutdown => Self::Shutdown,
            CloseReason::Probe => Self::Probe,
            CloseReason::PeerClosed
            | CloseReason::Io(_)
            | CloseReason::FrameTimeout
            | CloseReason::MessageTooLarge
            | CloseReason::WriteStalled
            | CloseReason::ClosedByHandler => {
                if in_preamble {
                    Self::ProxyHeader
                } else {
                    Self::TlsHandshake
                }
            }
        }
    }

    /// The close reason an observer's `connection_stop` reports for this rejection.
    pub(crate) fn close_reason(self) -> CloseReason {
        match self {
            Self::MaxConnections => CloseReason::Rejected,
            Self::NotAllowed => CloseReason::NotAllowed,
            Self::ProxyHeader => CloseReason::ProxyHeader,
            Self::HandshakeTimeout => CloseReason::HandshakeTimeout,
            Self::TlsPlaintext => CloseReason::TlsPlaintext,
            Self::TlsNoClientCert => CloseReason::TlsNoClientCert,
            Self::TlsBadClientCert => CloseReason::TlsBadClientCert,
            Self::TlsHandshake => CloseReason::TlsHandshake,
            Self::Shutdown => CloseReason::Shutdown,
            Self::Probe => CloseReason::Probe,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reject_reasons_are_in_label_order() {
        for (i, r) in RejectReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
            assert_eq!(RejectReason::before_start(r.close_reason(), false), *r);
        }
    }

    /// Issue 17: a connection closed by a shutdown before it started was counted as
    /// `reason="max_connections"` (the lookup fell back to the first label).
    #[test]
    fn shutdown_before_start_is_its_own_rejection() {
        for in_preamble in [false, true] {
            let r = RejectReason::before_start(CloseReason::Shutdown, in_preamble);
            assert_eq!(r.as_str(), "shutdown");
        }
        for reason in CloseReason::ALL {
            let r = RejectReason::before_start(reason, true);
            assert!(reason == CloseReason::Rejected || r != RejectReason::MaxConnections);
        }
    }
}
