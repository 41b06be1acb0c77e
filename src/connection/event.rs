//! What a connection reports: telemetry [`Event`]s, in the order things happened. The
//! reactor hands them to the telemetry; it never decides anything from them.

use std::time::Instant;

use bytes::Bytes;

use crate::ack::AckCode;
use crate::reason::ExceptionReason;

/// Something to report, in the order it happened (telemetry only: the reactor never decides
/// anything from these).
#[derive(Debug)]
pub(crate) enum Event {
    /// Bytes dropped outside frames.
    Junk(u64),
    /// A message is done: its reply (if any) is fully written (the message-stop event).
    MessageStop {
        seq: u64,
        response_size: Option<usize>,
        received_at: Instant,
    },
    /// A message failed (the message-exception event). Boxed: rare, and as large as every
    /// other event together, it would make each of the two events of every message (a
    /// `Handled`, a `MessageStop`) a copy of 104 bytes instead of 48 (callgrind, S1).
    MessageException(Box<Exception>),
    /// The handler's outcome for a message (or its timeout), for the outcome metric.
    Handled(Handled),
    /// A NAK was queued for writing: one the server built, or a handler's reply whose MSA-1
    /// is AE or AR.
    NakQueued(AckCode),
    /// A handler outcome arrived for a message that is no longer waiting for it.
    LateResult,
    /// A frame was rejected before reaching the handler.
    FrameRejected(FrameRejection),
    /// The connection is finished (its reason is [`Connection::close_reason`]).
    Closed,
}

/// What [`Event::MessageException`] says.
#[derive(Debug)]
pub(crate) struct Exception {
    pub(crate) seq: Option<u64>,
    pub(crate) reason: ExceptionReason,
    pub(crate) message_size: usize,
    pub(crate) detail: Option<String>,
    pub(crate) received_at: Option<Instant>,
    /// The message's control id as a NAK quotes it (bounded), for logs.
    pub(crate) control_id: Option<Bytes>,
}

impl Event {
    /// The message-exception event.
    pub(crate) fn exception(exception: Exception) -> Self {
        Self::MessageException(Box::new(exception))
    }
}

// Two events per message are written and reported: keep them small.
const _: () = assert!(std::mem::size_of::<Event>() <= 48);

/// Why a frame never reached the handler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FrameRejection {
    TooLarge,
    Timeout,
}

/// Handler outcomes, in the order of the `outcome` label handles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Handled {
    Reply,
    NoReply,
    Error,
    Panic,
    Timeout,
}

impl Handled {
    pub(crate) const LABELS: [&'static str; 5] = ["reply", "no_reply", "error", "panic", "timeout"];
}
