//! The sans-IO state machine of one MLLP connection (seed-spec §2–§3).
//!
//! It takes bytes, handler outcomes and `Instant`s in, and hands back effects, the bytes to
//! write and its next deadline. It never sees a socket or reads the clock, so tests and the
//! fuzzer drive it byte by byte on a virtual clock.
//!
//! # Calls
//!
//! The reactor calls, for each connection:
//! 1. `handle_read(bytes, now)` with each chunk read (while [`Connection::wants_read`]);
//!    `handle_eof(now)` when the peer half-closes; `handle_io_error(kind)` when I/O fails;
//! 2. `handle_completion(seq, outcome, now)` when the pool finishes the dispatched message;
//! 3. `transmit()` for the reply being written, then `handle_written(n, now)`;
//! 4. `handle_timeout(now)` when the deadline from `poll_timeout()` passes (spurious calls are
//!    harmless: each deadline is re-checked against `now`);
//! 5. `handle_shutdown(now)` once when the server drains.
//!
//! Every `handle_*` call appends what happened to an [`Effect`] buffer the caller owns and
//! drains: keeping no event queue inside keeps an idle connection free of heap memory.
//!
//! # Phases
//!
//! ```text
//!            frame complete                  reply / NAK
//! Receiving ───────────────▶ Handling ───────────────────▶ Writing
//!     ▲  idle + frame            handler deadline             │ write-stall deadline
//!     │  deadlines                 │ no reply                 │
//!     └────────────────────────────┴──────────────────────────┘ written
//!  any phase ──▶ Closed(reason)
//! ```
//!
//! One message is with the handler at a time (serial per connection, replies in order). Bytes
//! that arrive meanwhile stay undecoded in the read buffer, up to `read_ahead` bytes, after
//! which the connection stops asking to read, so TCP pushes back on the sender.

use std::io::ErrorKind;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::ack::{self, AckCode};
use crate::codec::{EncodedFrame, FrameDecoder, FrameError};
use crate::error::{CloseReason, ExceptionReason};
use crate::handler::Reply;
use crate::telemetry::Handled;

/// Whether failures are answered with a NAK (seed-spec §3).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum NakPolicy {
    /// Handler error, panic or timeout → AE NAK quoting the message's MSH-10; oversize frame →
    /// AR NAK when its MSH-10 is readable, then close. The sender need not wait for its own
    /// timeout. The default.
    #[default]
    Send,
    /// Send nothing on failures: the reference library's behaviour.
    Silent,
}

/// The checked limits every connection of a server shares (parse, don't validate: built once
/// by the server builder).
#[derive(Clone, Debug)]
pub(crate) struct Limits {
    pub(crate) idle_timeout: Duration,
    pub(crate) frame_timeout: Duration,
    pub(crate) handler_timeout: Duration,
    pub(crate) write_timeout: Duration,
    pub(crate) max_message_size: usize,
    /// Undecoded bytes held while a message is with the handler before reading stops.
    pub(crate) read_ahead: usize,
    pub(crate) nak_policy: NakPolicy,
}

/// What a worker made of a dispatched message.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// The handler returned a reply.
    Reply(Reply),
    /// The handler returned an error or panicked; `nak` is the AE to send (None if Silent).
    Failed {
        reason: ExceptionReason,
        detail: String,
        nak: Option<Bytes>,
    },
    /// The job's deadline had passed before a worker took it: it was not run.
    Expired,
}

/// Something the reactor must act on or report, in the order it happened.
#[derive(Debug)]
pub(crate) enum Effect {
    /// A complete frame for the handler (the message-start event).
    Dispatch {
        seq: u64,
        payload: Bytes,
        received_at: Instant,
        deadline: Instant,
    },
    /// Bytes dropped outside frames.
    Junk(u64),
    /// A message is done: its reply (if any) is fully written (the message-stop event).
    MessageStop {
        seq: u64,
        response_size: Option<usize>,
        received_at: Instant,
    },
    /// A message failed (the message-exception event).
    MessageException {
        seq: Option<u64>,
        reason: ExceptionReason,
        message_size: usize,
        detail: Option<String>,
        received_at: Option<Instant>,
    },
    /// The handler's outcome for a message (or its timeout), for the outcome metric.
    Handled(Handled),
    /// A NAK was queued for writing.
    NakQueued(AckCode),
    /// A handler outcome arrived for a message that is no longer waiting for it.
    LateResult,
    /// A frame was rejected before reaching the handler.
    FrameRejected(FrameRejection),
    /// The connection is finished; the reactor closes the socket.
    Closed(CloseReason),
}

/// Why a frame never reached the handler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FrameRejection {
    TooLarge,
    Timeout,
}

/// What to do once the bytes being written are out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Then {
    Continue,
    Close(CloseReason),
}

#[derive(Debug)]
enum Phase {
    Receiving {
        idle_deadline: Instant,
        /// Set while a frame is started but incomplete.
        frame_deadline: Option<Instant>,
    },
    Handling {
        seq: u64,
        deadline: Instant,
        /// Kept for the AE NAK should the handler time out.
        payload: Bytes,
        received_at: Instant,
    },
    Writing {
        frame: EncodedFrame,
        stall_deadline: Instant,
        /// The message this answers, `None` for a NAK of an oversize frame.
        reply_to: Option<(u64, Instant)>,
        /// A handler reply (reported as message stop), not a NAK.
        is_reply: bool,
        then: Then,
    },
    // The reason is read by tests (`close_reason`) and shown by `Debug`.
    Closed(CloseReason),
}

/// One connection's protocol state. See the module docs for the order of calls.
#[derive(Debug)]
pub(crate) struct Connection {
    limits: Arc<Limits>,
    decoder: FrameDecoder,
    /// Received bytes not yet handed out as frames.
    ///
    /// ```text
    /// Receiving:  [ partial frame payload (≤ max_message_size + 1) ]
    /// otherwise:  [ undecoded bytes: later pipelined frames, junk (≤ read_ahead + one read) ]
    /// ```
    /// Released (capacity 0) whenever it empties, so an idle connection owns no buffer.
    read_buf: BytesMut,
    phase: Phase,
    next_seq: u64,
    /// The peer half-closed: answer what it sent, then close.
    peer_eof: bool,
    /// The server is draining: finish the message in flight, then close.
    draining: bool,
}

// Keep the per-connection cost small: an idle connection is this struct plus a socket.
const _: () = assert!(std::mem::size_of::<Connection>() <= 176);

impl Connection {
    pub(crate) fn new(limits: Arc<Limits>, now: Instant) -> Self {
        let decoder = FrameDecoder::new(limits.max_message_size);
        let phase = Phase::Receiving {
            idle_deadline: now + limits.idle_timeout,
            frame_deadline: None,
        };
        Self {
            limits,
            decoder,
            read_buf: BytesMut::new(),
            phase,
            next_seq: 0,
            peer_eof: false,
            draining: false,
        }
    }

    /// Takes bytes read from the peer.
    pub(crate) fn handle_read(&mut self, bytes: &[u8], now: Instant, out: &mut Vec<Effect>) {
        if bytes.is_empty() || self.is_closed() {
            return;
        }
        self.read_buf.extend_from_slice(bytes);
        if let Phase::Receiving { idle_deadline, .. } = &mut self.phase {
            *idle_deadline = now + self.limits.idle_timeout;
            self.decode_next(now, out);
        }
    }

    /// The peer closed its sending side. Frames already received are still answered.
    pub(crate) fn handle_eof(&mut self, now: Instant, out: &mut Vec<Effect>) {
        self.peer_eof = true;
        if matches!(self.phase, Phase::Receiving { .. }) {
            self.decode_next(now, out);
        }
    }

    /// A read or write failed: the connection is over.
    pub(crate) fn handle_io_error(&mut self, kind: ErrorKind, out: &mut Vec<Effect>) {
        self.close(CloseReason::Io(kind), out);
    }

    /// The server is shutting down: finish the message in flight (its reply is still written),
    /// then close; an idle or receiving connection closes now.
    pub(crate) fn handle_shutdown(&mut self, out: &mut Vec<Effect>) {
        self.draining = true;
        if matches!(self.phase, Phase::Receiving { .. }) {
            self.close(CloseReason::Shutdown, out);
        }
    }

    /// Closes now, whatever the phase (the shutdown deadline passed).
    pub(crate) fn force_close(&mut self, reason: CloseReason, out: &mut Vec<Effect>) {
        self.close(reason, out);
    }

    /// The pool's result for message `seq`.
    pub(crate) fn handle_completion(
        &mut self,
        seq: u64,
        outcome: Outcome,
        now: Instant,
        out: &mut Vec<Effect>,
    ) {
        let (payload_len, received_at) = match &self.phase {
            Phase::Handling {
                seq: s,
                payload,
                received_at,
                ..
            } if *s == seq => (payload.len(), *received_at),
            _ => {
                out.push(Effect::LateResult);
                return;
            }
        };
        let handled = match &outcome {
            Outcome::Reply(Reply::Send(_) | Reply::SendAndClose(_)) => Some(Handled::Reply),
            Outcome::Reply(_) => Some(Handled::NoReply),
            Outcome::Failed {
                reason: ExceptionReason::Panic,
                ..
            } => Some(Handled::Panic),
            Outcome::Failed { .. } => Some(Handled::Error),
            Outcome::Expired => None, // counted as a timeout below
        };
        out.extend(handled.map(Effect::Handled));
        match outcome {
            Outcome::Reply(Reply::Send(bytes)) => {
                self.write(bytes, Some((seq, received_at)), true, Then::Continue, now)
            }
            Outcome::Reply(Reply::SendAndClose(bytes)) => {
                self.write(
                    bytes,
                    Some((seq, received_at)),
                    true,
                    Then::Close(CloseReason::ClosedByHandler),
                    now,
                );
            }
            Outcome::Reply(Reply::NoReply) => {
                out.push(Effect::MessageStop {
                    seq,
                    response_size: None,
                    received_at,
                });
                self.receive(now, out);
            }
            Outcome::Reply(Reply::Close) => {
                out.push(Effect::MessageStop {
                    seq,
                    response_size: None,
                    received_at,
                });
                self.close(CloseReason::ClosedByHandler, out);
            }
            Outcome::Failed {
                reason,
                detail,
                nak,
            } => {
                out.push(Effect::MessageException {
                    seq: Some(seq),
                    reason,
                    message_size: payload_len,
                    detail: Some(detail),
                    received_at: Some(received_at),
                });
                match nak {
                    Some(nak) => {
                        out.push(Effect::NakQueued(AckCode::AE));
                        self.write(nak, Some((seq, received_at)), false, Then::Continue, now);
                    }
                    None => self.receive(now, out),
                }
            }
            // The wheel may fire a tick after the worker saw the deadline pass.
            Outcome::Expired => self.handler_timed_out(now, out),
        }
    }

    /// The reply being written, if any.
    pub(crate) fn transmit(&self) -> Option<&EncodedFrame> {
        match &self.phase {
            Phase::Writing { frame, .. } => Some(frame),
            _ => None,
        }
    }

    /// `n` bytes of [`transmit`](Self::transmit) were written.
    pub(crate) fn handle_written(&mut self, n: usize, now: Instant, out: &mut Vec<Effect>) {
        let Phase::Writing {
            frame,
            stall_deadline,
            reply_to,
            is_reply,
            then,
        } = &mut self.phase
        else {
            return;
        };
        frame.advance(n);
        *stall_deadline = now + self.limits.write_timeout;
        if !frame.is_done() {
            return;
        }
        if let (true, Some((seq, received_at))) = (*is_reply, *reply_to) {
            out.push(Effect::MessageStop {
                seq,
                response_size: Some(frame.payload().len()),
                received_at,
            });
        }
        match *then {
            Then::Continue => self.receive(now, out),
            Then::Close(reason) => self.close(reason, out),
        }
    }

    /// Acts on whichever deadlines have passed at `now`; does nothing if none has.
    pub(crate) fn handle_timeout(&mut self, now: Instant, out: &mut Vec<Effect>) {
        match self.phase {
            Phase::Receiving {
                frame_deadline: Some(d),
                ..
            } if d <= now => {
                out.push(Effect::FrameRejected(FrameRejection::Timeout));
                self.close(CloseReason::FrameTimeout, out);
            }
            Phase::Receiving { idle_deadline, .. } if idle_deadline <= now => {
                self.close(CloseReason::IdleTimeout, out);
            }
            Phase::Handling { deadline, .. } if deadline <= now => self.handler_timed_out(now, out),
            Phase::Writing { stall_deadline, .. } if stall_deadline <= now => {
                self.close(CloseReason::WriteStalled, out);
            }
            _ => {}
        }
    }

    /// The earliest deadline of the current phase.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::Receiving {
                idle_deadline,
                frame_deadline,
            } => Some(frame_deadline.map_or(idle_deadline, |f| f.min(idle_deadline))),
            Phase::Handling { deadline, .. } => Some(deadline),
            Phase::Writing { stall_deadline, .. } => Some(stall_deadline),
            Phase::Closed(_) => None,
        }
    }

    /// Whether the reactor should read from the socket now.
    pub(crate) fn wants_read(&self) -> bool {
        if self.peer_eof {
            return false;
        }
        match self.phase {
            // The decoder bounds the buffer while receiving (limit + one read).
            Phase::Receiving { .. } => true,
            Phase::Handling { .. } | Phase::Writing { .. } => {
                self.read_buf.len() < self.limits.read_ahead
            }
            Phase::Closed(_) => false,
        }
    }

    pub(crate) fn is_closed(&self) -> bool {
        matches!(self.phase, Phase::Closed(_))
    }

    /// True while a message is with the handler or its reply is being written.
    pub(crate) fn in_flight(&self) -> bool {
        matches!(self.phase, Phase::Handling { .. } | Phase::Writing { .. })
    }

    /// True when no message is in flight or being written and no frame is half received: the
    /// connection can be closed without losing anything it was told.
    #[cfg(test)]
    pub(crate) fn is_idle(&self) -> bool {
        matches!(
            self.phase,
            Phase::Receiving {
                frame_deadline: None,
                ..
            }
        ) && self.read_buf.is_empty()
    }

    /// Heap bytes this connection holds (its read buffer's capacity).
    #[cfg(test)]
    pub(crate) fn buffered(&self) -> usize {
        self.read_buf.capacity()
    }

    /// Bytes received and not yet handed out (for the fuzz target's memory bound).
    pub(crate) fn buffered_len(&self) -> usize {
        self.read_buf.len()
    }

    /// Why the connection closed, once it has.
    pub(crate) fn close_reason(&self) -> Option<CloseReason> {
        match self.phase {
            Phase::Closed(reason) => Some(reason),
            _ => None,
        }
    }

    fn handler_timed_out(&mut self, now: Instant, out: &mut Vec<Effect>) {
        let Phase::Handling {
            seq,
            ref payload,
            received_at,
            ..
        } = self.phase
        else {
            return;
        };
        let payload = payload.clone();
        out.push(Effect::Handled(Handled::Timeout));
        out.push(Effect::MessageException {
            seq: Some(seq),
            reason: ExceptionReason::HandlerTimeout,
            message_size: payload.len(),
            detail: None,
            received_at: Some(received_at),
        });
        match self.limits.nak_policy {
            NakPolicy::Send => {
                out.push(Effect::NakQueued(AckCode::AE));
                let nak = ack::nak(&payload, AckCode::AE, "handler timeout");
                self.write(nak, Some((seq, received_at)), false, Then::Continue, now);
            }
            NakPolicy::Silent => self.receive(now, out),
        }
    }

    /// Back to receiving: restart the idle deadline and dispatch the next buffered frame.
    fn receive(&mut self, now: Instant, out: &mut Vec<Effect>) {
        if self.draining {
            self.close(CloseReason::Shutdown, out);
            return;
        }
        self.phase = Phase::Receiving {
            idle_deadline: now + self.limits.idle_timeout,
            frame_deadline: None,
        };
        self.decode_next(now, out);
    }

    /// In `Receiving`: hands the next complete frame to the handler, or updates the frame
    /// deadline, or rejects an oversize frame.
    fn decode_next(&mut self, now: Instant, out: &mut Vec<Effect>) {
        let junk_before = self.decoder.junk_bytes();
        let result = self.decoder.decode(&mut self.read_buf);
        let junk = self.decoder.junk_bytes() - junk_before;
        if junk > 0 {
            out.push(Effect::Junk(junk));
        }
        match result {
            Ok(Some(payload)) => {
                let seq = self.next_seq;
                self.next_seq += 1;
                let deadline = now + self.limits.handler_timeout;
                out.push(Effect::Dispatch {
                    seq,
                    payload: payload.clone(),
                    received_at: now,
                    deadline,
                });
                self.phase = Phase::Handling {
                    seq,
                    deadline,
                    payload,
                    received_at: now,
                };
            }
            Ok(None) => {
                if let Phase::Receiving { frame_deadline, .. } = &mut self.phase {
                    if !self.decoder.in_frame() {
                        *frame_deadline = None;
                    } else if frame_deadline.is_none() {
                        *frame_deadline = Some(now + self.limits.frame_timeout);
                    }
                }
                if self.read_buf.is_empty() {
                    // Release the allocation: an idle connection owns no buffer.
                    self.read_buf = BytesMut::new();
                }
                if self.peer_eof {
                    self.close(CloseReason::PeerClosed, out);
                }
            }
            Err(FrameError::TooLarge { received, .. }) => self.reject_oversize(received, now, out),
        }
    }

    fn reject_oversize(&mut self, received: usize, now: Instant, out: &mut Vec<Effect>) {
        out.push(Effect::FrameRejected(FrameRejection::TooLarge));
        out.push(Effect::MessageException {
            seq: None,
            reason: ExceptionReason::MessageTooLarge,
            message_size: received,
            detail: None,
            received_at: None,
        });
        let partial = self.decoder.partial_frame(&self.read_buf);
        let nak = match self.limits.nak_policy {
            NakPolicy::Send if has_control_id(partial) => {
                Some(ack::nak(partial, AckCode::AR, "message too large"))
            }
            _ => None,
        };
        self.read_buf = BytesMut::new();
        match nak {
            Some(nak) => {
                out.push(Effect::NakQueued(AckCode::AR));
                self.write(
                    nak,
                    None,
                    false,
                    Then::Close(CloseReason::MessageTooLarge),
                    now,
                );
            }
            None => self.close(CloseReason::MessageTooLarge, out),
        }
    }

    fn write(
        &mut self,
        bytes: Bytes,
        reply_to: Option<(u64, Instant)>,
        is_reply: bool,
        then: Then,
        now: Instant,
    ) {
        self.phase = Phase::Writing {
            frame: EncodedFrame::new(bytes),
            stall_deadline: now + self.limits.write_timeout,
            reply_to,
            is_reply,
            then,
        };
    }

    fn close(&mut self, reason: CloseReason, out: &mut Vec<Effect>) {
        if self.is_closed() {
            return;
        }
        self.phase = Phase::Closed(reason);
        self.read_buf = BytesMut::new();
        out.push(Effect::Closed(reason));
    }
}

/// Whether the MSH-10 of a (possibly truncated) message can be read, so a NAK can quote it.
fn has_control_id(message: &[u8]) -> bool {
    crate::msh::Msh::parse(message)
        .ok()
        .and_then(|m| m.control_id())
        .is_some_and(|id| !id.is_empty())
}

#[cfg(test)]
#[path = "connection/tests.rs"]
mod tests;
