//! The sans-IO state machine of one MLLP connection: framing, pipelining, deadlines, the NAK
//! policy and the lingering close.
//!
//! It takes bytes, handler outcomes and `Instant`s in, and hands back messages to dispatch,
//! bytes to write, its next deadline, and telemetry [`Event`]s. It never sees a socket or reads
//! a clock (a NAK's timestamp comes from `now` through the server's [`WallClock`]), so tests
//! and the fuzzer drive it byte by byte on a virtual clock.
//!
//! # Calls
//!
//! The reactor calls, for each connection, in any order that the I/O dictates:
//! - `handle_read(bytes, now)` with each chunk read (while [`Connection::wants_read`]), or
//!   `read_with(now, max, read)` to read straight into the connection's buffer (plain TCP: no
//!   copy);
//!   `handle_eof()` when the peer half-closes; `handle_io_error(kind)` when I/O fails;
//! - `poll_dispatch(now)` until it returns `None`, handing each message to the handler;
//! - `handle_completion(seq, outcome, now)` with each handler result (inline, from the pool,
//!   or from a [`ReplyHandle`](crate::ReplyHandle));
//! - `transmit(slices)` for the bytes to write, then `handle_written(n, now)`;
//! - `wants_shutdown_write()` → shut the socket's write side → `handle_write_shutdown(now)`;
//! - `handle_timeout(now)` when the deadline from `poll_timeout()` passes (spurious calls are
//!   harmless: every deadline is re-checked against `now`);
//! - `handle_shutdown()` once when the server drains.
//!
//! Telemetry goes to an [`Event`] buffer the caller owns and drains: keeping no event queue
//! inside keeps an idle connection free of heap memory. Control (what to dispatch, write,
//! close) is only ever read through the `poll_*`/`wants_*`/`transmit` methods.
//!
//! # Messages in flight
//!
//! ```text
//!   read buf ──decode──▶ slots: [ seq 4: Ready(reply, part written) | seq 5: Waiting | seq 6: Ready ]
//!                                 └──────────── written strictly in seq order ──────────────┘
//! ```
//!
//! Each dispatched message gets a slot, in sequence order. A slot waits for its handler's
//! outcome (with the handler deadline), then holds its reply until every earlier reply is
//! written. At most `max_in_flight` slots exist; at most one handler call is in progress
//! (`calling`), so calls for one connection never overlap and run in message order. When no
//! more can be dispatched, bytes stay undecoded in the read buffer, up to `read_ahead`, after
//! which the connection stops asking to read and TCP pushes back on the sender.
//!
//! # Closing
//!
//! A close that follows a reply (`SendAndClose`, the oversize AR, a drain) is a lingering
//! close, as nginx's `lingering_close`: shut our write side once the last reply is out, read
//! and discard input for a bounded time and size, then close. Closing a socket with unread
//! input sends RST, which can destroy a reply the peer has not read yet.

use std::io::{ErrorKind, IoSlice};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};

use crate::ack::{self, AckCode};
use crate::codec::{EncodedFrame, FrameError};
use crate::outcome::{Outcome, Reply};
use crate::reason::{CloseReason, ExceptionReason};

mod busy;
mod event;
mod pool;
mod slots;
use busy::{Busy, Parts};
pub(crate) use event::{Event, Exception, FrameRejection, Handled};
pub(crate) use pool::trim as trim_pools;
use slots::Slots;

/// Whether failures are answered with a NAK.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum NakPolicy {
    /// Handler error, panic, timeout or dropped reply handle → AE NAK quoting the message's
    /// MSH-10 (AR when the message has no readable MSH); oversize frame → AR NAK when its
    /// MSH-10 is readable, then close. The sender need not wait for its own timeout. The
    /// default.
    #[default]
    Send,
    /// Send nothing on failures (the behaviour of libraries that leave the sender to time out).
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
    /// How long a connection may take to start (PROXY header, TLS handshake).
    pub(crate) handshake_timeout: Duration,
    pub(crate) max_message_size: usize,
    /// Undecoded bytes held while no more messages can be dispatched before reading stops.
    pub(crate) read_ahead: usize,
    /// Messages dispatched and not yet answered on the wire, per connection (≥ 1).
    pub(crate) max_in_flight: usize,
    pub(crate) nak_policy: NakPolicy,
    /// Put the handler's error text into NAKs (default: a generic text).
    pub(crate) expose_errors: bool,
    /// Turns the `now` the connection is given into the wall-clock time a NAK carries.
    pub(crate) wall_clock: WallClock,
}

/// The wall-clock time of an `Instant`, from one reading of both clocks taken when the server
/// was built: the connection is handed `now` and never reads a clock itself (so a test's
/// virtual clock decides a NAK's timestamp too). A wall clock stepped later (NTP) is not
/// followed; a NAK's MSH-7 is informative only.
#[derive(Clone, Copy, Debug)]
pub(crate) struct WallClock {
    instant: Instant,
    wall: SystemTime,
}

impl WallClock {
    /// `instant` is the same moment as `wall`.
    pub(crate) fn new(instant: Instant, wall: SystemTime) -> Self {
        Self { instant, wall }
    }

    /// Reads both clocks now.
    pub(crate) fn now() -> Self {
        Self::new(Instant::now(), SystemTime::now())
    }

    /// The wall-clock time of `at`.
    pub(crate) fn at(&self, at: Instant) -> SystemTime {
        if at >= self.instant {
            self.wall + (at - self.instant)
        } else {
            self.wall - (self.instant - at)
        }
    }
}

/// A message to hand to the handler.
#[derive(Debug)]
pub(crate) struct Dispatched {
    pub(crate) seq: u64,
    pub(crate) payload: Bytes,
    pub(crate) received_at: Instant,
    /// The handler's time for it: see [`deadline`](Self::deadline).
    handler_timeout: Duration,
}

impl Dispatched {
    /// When the handler's outcome is no longer awaited (a pool job not started by then is
    /// not run). Summed where it is asked for: an inline call never asks (callgrind, S1:
    /// about 30 instructions per message).
    pub(crate) fn deadline(&self) -> Instant {
        deadline_after(self.received_at, self.handler_timeout)
    }
}

/// What to do once a slot's reply is out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Then {
    Continue,
    Close(CloseReason),
}

/// Longest a lingering close waits for the peer to close after our last reply: long enough
/// for a peer to read a reply and see our FIN over a slow WAN, short enough that a drain is not
/// held up (nginx's `lingering_timeout` is 5 s).
pub(crate) const LINGER_TIME: Duration = Duration::from_secs(2);
/// A frame over this size is "large": the read buffer then grows straight to the size of the
/// connection's last large frame. One read's worth: below it a frame arrives in one or two
/// reads and growth costs nothing worth saving.
pub(crate) const LARGE_FRAME: usize = 64 * 1024;
/// Most bytes one read appends to the read buffer ([`Connection::read_with`]): a full socket
/// buffer's worth in few syscalls, and little enough that the scan for the frame's end, which
/// follows each read, finds the bytes still in the CPU's cache. It is the "one read" of the
/// bounds on the buffer. Reads of the rest of a large frame at once (one `recv` per 1 MiB
/// frame instead of 17) were tried and dropped: the kernel's copy of a whole frame passes
/// through a core's 1 MiB of L2 and the scan then reads the frame back from L3; with 64 KiB
/// reads S4 ran at 1.35× the rate of whole-frame reads and 1.13–1.16× the limit's, on a
/// quiet stretch of the machine (BENCHMARKS.md, "S4 and the budget under load, sixth pass").
/// Their memory cost, more connections part-way through a frame when reading pauses, is met
/// by counting a started large frame in full (`Connection::read_buffer_counted`).
pub(crate) const READ_CHUNK: usize = 64 * 1024;
/// Room a read into the read buffer is offered at least: with less, the buffer first takes
/// back the space of answered frames, or grows.
const MIN_READ_ROOM: usize = 4 * 1024;
/// Most bytes a lingering close reads and discards before giving up and closing: a peer that
/// keeps pipelining into a closing connection is cut off after this much.
pub(crate) const LINGER_BYTES: usize = 1 << 20;
/// NAKs are built from at most this prefix of the message: the MSH segment is what a NAK
/// quotes, and its fields are capped well below this (see [`ack`]), so work on the reactor
/// thread never grows with the message.
pub(crate) const NAK_SOURCE_LIMIT: usize = 16 * 1024;

/// A deadline `d` after `now`, saturating: durations too long to add (`Duration::MAX` as "no
/// timeout") give a deadline decades away, which never fires.
pub(crate) fn deadline_after(now: Instant, d: Duration) -> Instant {
    /// About 31 years: beyond any process's life, small enough that nanoseconds since the
    /// reactor's epoch fit in a u64.
    const FAR: Duration = Duration::from_secs(1_000_000_000);
    // `d.min(FAR)`, by the seconds alone (FAR is whole seconds): a comparison of two
    // integers instead of two pairs (callgrind).
    let d = if d.as_secs() < FAR.as_secs() { d } else { FAR };
    now.checked_add(d).unwrap_or(now)
}

#[derive(Debug)]
enum SlotState {
    /// The handler's outcome is awaited until the slot's handler deadline
    /// ([`Connection::handler_deadline`]: `handler_timeout` after the message was received).
    Waiting {
        /// Kept to build a NAK should the handler fail or time out.
        payload: Bytes,
        /// Heap bytes the payload keeps alive: the whole read buffer it was split from when
        /// that buffer was then released (a large frame's buffer grew by doubling).
        held: usize,
    },
    /// Answered: `frame` (if any) is written when every earlier slot is done.
    Ready {
        frame: Option<EncodedFrame>,
        /// Report a message stop once written (a handler's reply or no-reply; not a NAK).
        stop: bool,
        then: Then,
    },
}

/// One dispatched message (or the oversize NAK) in sequence order. The payload is kept only
/// while waiting (in [`SlotState::Waiting`]): a slot moved into and out of the queue once per
/// message is then 88 bytes instead of 112, and an answered one holds one `Bytes`, its reply.
#[derive(Debug)]
struct Slot {
    seq: u64,
    received_at: Instant,
    state: SlotState,
}

// The queue moves slots in and out by value once per message.
const _: () = assert!(std::mem::size_of::<Slot>() <= 88);

/// A lingering close in progress.
#[derive(Clone, Copy, Debug)]
struct Linger {
    reason: CloseReason,
    deadline: Instant,
    /// Our write side is shut.
    shut: bool,
    /// Bytes read and discarded so far.
    discarded: usize,
}

/// Boxed: rare, and it would double the size of every connection's state.
#[derive(Clone, Debug)]
enum State {
    Open,
    Lingering(Box<Linger>),
    Closed(CloseReason),
}

/// One connection's protocol state. See the module docs for the order of calls.
#[derive(Debug)]
pub(crate) struct Connection {
    limits: Arc<Limits>,
    /// The read buffer and frame decoder. The buffer holds received bytes not yet handed out
    /// as frames: a partial frame (≤ max_message_size + one read) and, while nothing more can
    /// be dispatched, undecoded input (≤ read_ahead + one read). One read is at most
    /// [`READ_CHUNK`], 64 KiB. Both come from the thread's pool (`pool`) and go back to it
    /// once the connection is idle: a large buffer as soon as it empties, a small one at the
    /// reactor's next sweep ([`Connection::release_idle`]), so an idle connection owns
    /// neither (8 bytes instead of 64) and a busy one does not take them per message.
    busy: Busy,
    /// Messages in flight, in sequence order (see the module docs). Given back to the
    /// thread's pool with the read buffer.
    slots: Slots,
    state: State,
    next_seq: u64,
    /// The handler call for the last dispatched message (`next_seq - 1`) is in progress.
    calling: bool,
    /// The last read (or the end of the last message in flight, or the start): the idle
    /// deadline ([`idle_deadline`](Self::idle_deadline)) runs from here and applies only
    /// while no message is in flight. The moment, not the deadline: it is restarted by every
    /// read and every reply, and asked for about once per reactor visit, so the sum (a call
    /// of about 30 instructions, callgrind, S1) is left to the asking.
    idle_from: Instant,
    /// Set while a frame is started but incomplete.
    frame_deadline: Option<Instant>,
    /// The peer half-closed: answer what it sent, then close.
    peer_eof: bool,
    /// The server is draining: finish the messages in flight, then close.
    draining: bool,
    /// A handler call was abandoned at its deadline (for the pool's stuck-worker check).
    abandoned: bool,
    /// The byte path below has started (PROXY header read, TLS handshake done); until then
    /// the idle deadline is the handshake deadline and nothing is dispatched.
    started: bool,
    /// Size to grow the read buffer to when a large frame arrives, in units of
    /// [`LARGE_FRAME`]: the last large frame's size (0: none yet). Senders of large messages
    /// tend to send more of similar size. Two bytes keep the struct at its size.
    large_frame_hint: u16,
}

// Keep the per-connection cost small: an idle connection is this struct plus a socket.
const _: () = assert!(std::mem::size_of::<Connection>() <= 88);

impl Connection {
    pub(crate) fn new(limits: Arc<Limits>, now: Instant) -> Self {
        Self {
            limits,
            busy: Busy::default(),
            slots: Slots::default(),
            state: State::Open,
            next_seq: 0,
            calling: false,
            idle_from: now,
            frame_deadline: None,
            peer_eof: false,
            draining: false,
            abandoned: false,
            started: true,
            large_frame_hint: 0,
        }
    }

    /// A connection whose byte path must start first (PROXY header, TLS handshake): it is
    /// closed with [`CloseReason::HandshakeTimeout`] unless
    /// [`handle_started`](Self::handle_started) comes within `handshake_timeout`.
    pub(crate) fn new_pending(limits: Arc<Limits>, now: Instant) -> Self {
        let mut conn = Self::new(limits, now);
        conn.started = false;
        conn
    }

    /// The byte path has started: from now on the connection serves MLLP.
    pub(crate) fn handle_started(&mut self, now: Instant) {
        self.started = true;
        self.idle_from = now;
    }

    /// Whether the byte path has started (see [`new_pending`](Self::new_pending)).
    pub(crate) fn is_started(&self) -> bool {
        self.started
    }

    /// The byte path failed to start (bad PROXY header, TLS handshake error): close with
    /// `reason`.
    pub(crate) fn handle_start_failed(&mut self, reason: CloseReason, out: &mut Vec<Event>) {
        self.close(reason, out);
    }

    /// Takes bytes read from the peer. Decoding happens in [`poll_dispatch`](Self::poll_dispatch).
    pub(crate) fn handle_read(&mut self, bytes: &[u8], now: Instant, out: &mut Vec<Event>) {
        if bytes.is_empty() {
            return;
        }
        match &mut self.state {
            State::Open => {
                let buf = &self.busy.parts(self.limits.max_message_size).buf;
                let needed = buf.len() + bytes.len();
                let hint = usize::from(self.large_frame_hint) * LARGE_FRAME;
                if needed > buf.capacity() && needed > LARGE_FRAME && hint > buf.capacity() {
                    // A large frame again: grow once to the last large frame's size instead of
                    // doubling (each doubling copies everything received so far).
                    self.grow_large(hint.max(needed));
                }
                self.read_buf().extend_from_slice(bytes);
                self.idle_from = now;
            }
            State::Lingering(linger) => {
                linger.discarded += bytes.len();
                if linger.discarded > LINGER_BYTES {
                    let reason = linger.reason;
                    self.close(reason, out);
                }
            }
            State::Closed(_) => {}
        }
    }

    /// Reads straight into the read buffer, without a copy: `read` is given the buffer and
    /// the most bytes it may append (at most `max` and [`READ_CHUNK`]), and
    /// returns how many it appended (`Ok(0)`: end of stream). `None`, without calling `read`,
    /// when the connection is not taking MLLP bytes (not started, lingering, closed): the
    /// caller then reads elsewhere and hands the bytes to [`handle_read`](Self::handle_read).
    ///
    /// The buffer comes from the thread's pool and goes back to it when nothing was appended
    /// (an idle connection owns none); before the read it is given room, growing straight to
    /// the last large frame's size when a large frame is under way (as `handle_read` does).
    pub(crate) fn read_with(
        &mut self,
        now: Instant,
        max: usize,
        read: impl FnOnce(&mut BytesMut, usize) -> std::io::Result<usize>,
    ) -> Option<std::io::Result<usize>> {
        if !matches!(self.state, State::Open) || !self.started {
            return None;
        }
        let cap = READ_CHUNK.min(max);
        let buf = self.make_room();
        let before = buf.len();
        let result = read(buf, cap);
        debug_assert!(buf.len() - before <= cap);
        let (grew, empty) = (buf.len() > before, buf.is_empty());
        if grew {
            self.idle_from = now;
        } else if empty {
            self.release_large_read_buf();
        }
        Some(result)
    }

    /// Gives the read buffer at least [`MIN_READ_ROOM`] bytes of room for the next read, and
    /// returns it.
    fn make_room(&mut self) -> &mut BytesMut {
        let hint = usize::from(self.large_frame_hint) * LARGE_FRAME;
        let (len, capacity) = (self.busy.len(), self.busy.capacity());
        if len > 0 && hint > capacity && capacity - len < MIN_READ_ROOM {
            // A frame under way on a connection that sends large ones.
            self.grow_large(hint);
        }
        let buf = self.read_buf();
        let (len, capacity) = (buf.len(), buf.capacity());
        if len == 0 && hint > capacity {
            // Between frames on a connection that sends large ones: the next is likely large
            // too, so it is read into a large buffer the thread kept, if there is one (none is
            // allocated for a guess), instead of a small one that it would outgrow after one
            // read (a copy, and a read more).
            if let Some(large) = pool::take_large(hint) {
                let small = std::mem::replace(buf, large);
                pool::put_buffer(small, 0);
                return buf;
            }
        }
        if capacity - len < MIN_READ_ROOM {
            // Reclaims the space of frames split off and answered, or doubles.
            buf.reserve(MIN_READ_ROOM);
        }
        buf
    }

    /// The read buffer, taken (with a decoder) from the thread's pool if the connection had
    /// none.
    fn read_buf(&mut self) -> &mut BytesMut {
        &mut self.busy.parts(self.limits.max_message_size).buf
    }

    /// Grows the read buffer once to `capacity` for a large frame (instead of doubling, where
    /// each doubling copies everything received so far), with a buffer the thread kept from an
    /// earlier large frame if it has one.
    fn grow_large(&mut self, capacity: usize) {
        let buf = self.read_buf();
        if let Some(mut large) = pool::take_large(capacity) {
            large.extend_from_slice(buf);
            let mut small = std::mem::replace(buf, large);
            small.clear();
            pool::put_buffer(small, 0);
        } else {
            let len = buf.len();
            buf.reserve(capacity - len);
        }
    }

    /// The peer has sent bytes the server is not reading (reads paused at the memory budget):
    /// the peer is neither idle nor slow, so its idle and frame deadlines restart.
    pub(crate) fn handle_unread_input(&mut self, now: Instant) {
        if matches!(self.state, State::Open) && self.started {
            self.idle_from = now;
            if self.frame_deadline.is_some() {
                self.frame_deadline = Some(deadline_after(now, self.limits.frame_timeout));
            }
        }
    }

    /// The peer closed its sending side. Frames already received are still answered.
    pub(crate) fn handle_eof(&mut self, out: &mut Vec<Event>) {
        self.peer_eof = true;
        match &self.state {
            // The peer has read our FIN or does not care: nothing left to protect.
            State::Lingering(linger) => self.close(linger.reason, out),
            // `poll_dispatch` answers what is buffered, then closes.
            State::Open | State::Closed(_) => {}
        }
    }

    /// A read or write failed: the connection is over.
    pub(crate) fn handle_io_error(&mut self, kind: ErrorKind, out: &mut Vec<Event>) {
        match &self.state {
            // A reset while lingering ends the linger; the reply was already out.
            State::Lingering(linger) => self.close(linger.reason, out),
            _ => self.close(CloseReason::Io(kind), out),
        }
    }

    /// The server is shutting down: finish the messages in flight (their replies are still
    /// written), dispatch nothing new, then close; an idle connection closes now.
    pub(crate) fn handle_shutdown(&mut self, out: &mut Vec<Event>) {
        self.draining = true;
        // Nothing in flight: everything read was answered and nothing unread is protected by
        // a linger, so close at once.
        if self.slots.is_empty() && matches!(self.state, State::Open) {
            self.close(CloseReason::Shutdown, out);
        }
    }

    /// Closes now, whatever the state (the shutdown deadline passed). A lingering close keeps
    /// the reason it was closing for.
    pub(crate) fn force_close(&mut self, reason: CloseReason, out: &mut Vec<Event>) {
        let reason = match &self.state {
            State::Lingering(linger) => linger.reason,
            _ => reason,
        };
        self.close(reason, out);
    }

    /// The next message for the handler, if one can be dispatched now: a complete frame is
    /// buffered, no handler call of this connection is in progress, fewer than `max_in_flight`
    /// messages are in flight, and the server is not draining.
    // Inline: the usual call finds nothing to do (twice per message at S1: a visit starts
    // here before it reads, and asks again after each dispatch), and returns before the call
    // that decodes (about 60 instructions per message, callgrind).
    #[inline]
    pub(crate) fn poll_dispatch(
        &mut self,
        now: Instant,
        out: &mut Vec<Event>,
    ) -> Option<Dispatched> {
        if !matches!(self.state, State::Open)
            || !self.started
            || !self.can_dispatch()
            || self.between_frames()
        {
            return None;
        }
        self.decode_next(now, out)
    }

    /// Whether a dispatch would find what `Ok(None)` in [`decode_next`](Self::decode_next)
    /// finds, with nothing to do about it: nothing buffered and no frame under way, no frame
    /// deadline to clear, no read buffer to give back at once, no end of stream to close on.
    fn between_frames(&self) -> bool {
        !self.peer_eof
            && self.frame_deadline.is_none()
            && self.busy.get().is_none_or(|p| {
                let capacity = p.buf.capacity();
                p.buf.is_empty()
                    && !p.decoder.in_frame()
                    && (capacity == 0 || !self.gives_back_at_once(capacity))
            })
    }

    /// [`poll_dispatch`](Self::poll_dispatch) past its quick checks: decodes the next frame.
    fn decode_next(&mut self, now: Instant, out: &mut Vec<Event>) -> Option<Dispatched> {
        let capacity = self.busy.capacity();
        // An idle connection has nothing to decode (and no buffer or decoder to do it with);
        // nor has one that keeps an empty buffer between frames (not even a call).
        let parts = self
            .busy
            .get_mut()
            .filter(|p| !p.buf.is_empty() || p.decoder.in_frame());
        let result = parts.map_or(Ok(None), |parts| {
            let Parts { buf, decoder } = parts;
            let junk_before = decoder.junk_bytes();
            let result = decoder.decode(buf);
            let junk = decoder.junk_bytes() - junk_before;
            if junk > 0 {
                out.push(Event::Junk(junk));
            }
            result
        });
        match result {
            Ok(Some(payload)) => {
                if payload.len() > LARGE_FRAME {
                    pool::note_large_frame();
                    // Framing bytes and one read of slack, so the next one fits as it arrives.
                    let hint = payload.len() + crate::codec::FRAMING_OVERHEAD + LARGE_FRAME;
                    self.large_frame_hint =
                        u16::try_from(hint.div_ceil(LARGE_FRAME)).unwrap_or(u16::MAX);
                }
                let seq = self.next_seq;
                self.next_seq += 1;
                self.calling = true;
                // A buffer given back once empty leaves the payload holding all of it.
                let held = if self.busy.is_empty() && self.gives_back_at_once(capacity) {
                    capacity
                } else {
                    payload.len()
                };
                self.slots.push_back(Slot {
                    seq,
                    received_at: now,
                    state: SlotState::Waiting {
                        payload: payload.clone(),
                        held,
                    },
                });
                self.update_frame_deadline(now);
                Some(Dispatched {
                    seq,
                    payload,
                    received_at: now,
                    handler_timeout: self.limits.handler_timeout,
                })
            }
            Ok(None) => {
                self.update_frame_deadline(now);
                if self.busy.is_empty() {
                    // A large buffer goes back at once; a small one stays until the
                    // reactor's sweep ([`release_idle`](Self::release_idle)).
                    self.release_large_read_buf();
                }
                self.close_if_done(out);
                None
            }
            Err(FrameError::TooLarge { received, .. }) => {
                self.reject_oversize(received, now, out);
                None
            }
        }
    }

    /// The handler's (or the pool's) result for message `seq`.
    pub(crate) fn handle_completion(
        &mut self,
        seq: u64,
        outcome: Outcome,
        now: Instant,
        out: &mut Vec<Event>,
    ) {
        if self.calling_seq() == Some(seq) {
            self.calling = false;
        }
        match outcome {
            Outcome::Reply(reply) => self.complete_reply(seq, reply, now, out),
            // The call is over; the reply comes later (or has already come).
            Outcome::Deferred => {}
            failed => self.complete_failed(seq, failed, now, out),
        }
    }

    /// [`handle_completion`](Self::handle_completion) with the handler's reply: the common
    /// case, apart from the failures (callgrind, S1: one function for every outcome saved
    /// and restored registers and a stack frame for NAKs on every reply).
    fn complete_reply(&mut self, seq: u64, reply: Reply, now: Instant, out: &mut Vec<Event>) {
        let Some((index, slot)) = self.slots.waiting_mut(seq) else {
            out.push(Event::LateResult);
            return;
        };
        // A NAK the handler built counts like one the server builds: by the code the reply
        // carries, or else by the MSA-1 read back from its bytes. (One match: a second one
        // for the code was a second jump per message, callgrind.)
        let (frame, then, code) = match reply {
            Reply::SendAck(code, bytes) => (Some(bytes), Then::Continue, Some(code)),
            Reply::Send(bytes) => {
                let code = ack::reply_code(&bytes);
                (Some(bytes), Then::Continue, code)
            }
            Reply::SendAndClose(bytes) => {
                let code = ack::reply_code(&bytes);
                (Some(bytes), Then::Close(CloseReason::ClosedByHandler), code)
            }
            Reply::Close => (None, Then::Close(CloseReason::ClosedByHandler), None),
            // `Deferred` never arrives here (the pool and the reply handle map it); treat it
            // like no reply rather than hang the connection.
            Reply::NoReply | Reply::Deferred => (None, Then::Continue, None),
        };
        if let Some(code @ (AckCode::AE | AckCode::AR)) = code {
            out.push(Event::NakQueued(code));
        }
        let writes = frame.is_some();
        // The payload kept for a NAK is dropped with the waiting state.
        slot.state = ready(frame, true, then);
        out.push(Event::Handled(if writes {
            Handled::Reply
        } else {
            Handled::NoReply
        }));
        if index == 0 && writes {
            // The front now holds a reply to write (a new frame is never done): what
            // `front_held` and then `arm_stall` would find, without looking again (about 30
            // instructions per message at S1, callgrind).
            self.slots.stall_from(now);
        } else {
            self.after_completion(now, out);
        }
    }

    /// [`handle_completion`](Self::handle_completion) with a failure or an expiry: the NAK
    /// under the NAK policy.
    #[cold]
    fn complete_failed(&mut self, seq: u64, outcome: Outcome, now: Instant, out: &mut Vec<Event>) {
        let Some((index, slot)) = self.slots.waiting_mut(seq) else {
            out.push(Event::LateResult);
            return;
        };
        let received_at = slot.received_at;
        let payload = slot.state.take_payload();
        // The NAK (built with `&self`) is set by the slot's index.
        let handled = match outcome {
            Outcome::Failed { reason, detail } => {
                let handled = if reason == ExceptionReason::Panic {
                    Handled::Panic
                } else {
                    Handled::Error
                };
                let text = if self.limits.expose_errors {
                    detail.as_str()
                } else {
                    "application error"
                };
                let nak = self.nak(&payload, AckCode::AE, text, now, out);
                out.push(Event::exception(Exception {
                    seq: Some(seq),
                    reason,
                    message_size: payload.len(),
                    detail: Some(detail),
                    received_at: Some(received_at),
                    control_id: control_id_of(&payload),
                }));
                self.slots[index].state = ready(nak, false, Then::Continue);
                handled
            }
            Outcome::Expired => {
                let state = self.timed_out(seq, &payload, received_at, now, out);
                self.slots[index].state = state;
                Handled::Timeout
            }
            Outcome::Reply(_) | Outcome::Deferred => {
                unreachable!("taken by handle_completion")
            }
        };
        out.push(Event::Handled(handled));
        self.after_completion(now, out);
    }

    /// After a slot was answered: pops what is done at the front, or, when the front is
    /// held, arms the stall deadline.
    fn after_completion(&mut self, now: Instant, out: &mut Vec<Event>) {
        if self.front_held() {
            // `settle` would stop at the front at once and only arm the stall deadline.
            self.arm_stall(now);
        } else {
            self.settle(now, out);
        }
    }

    /// Whether the front slot waits for its handler or holds a reply not yet fully written:
    /// where `settle` stops.
    fn front_held(&self) -> bool {
        match self.slots.front().map(|slot| &slot.state) {
            Some(SlotState::Waiting { .. }) => true,
            Some(SlotState::Ready { frame, .. }) => frame.as_ref().is_some_and(|f| !f.is_done()),
            None => false,
        }
    }

    /// Fills `slices` with the bytes to write next: the ready replies at the front, in order
    /// (up to a close). Returns how many slices it used; 0 when nothing is ready.
    pub(crate) fn transmit<'a>(&'a self, slices: &mut [IoSlice<'a>]) -> usize {
        let mut used = 0;
        for slot in self.slots.iter() {
            let SlotState::Ready { frame, then, .. } = &slot.state else {
                break;
            };
            if let Some(frame) = frame {
                if slices.len() - used < 3 {
                    break;
                }
                used += frame.io_slices(&mut slices[used..]);
            }
            if *then != Then::Continue {
                break;
            }
        }
        used
    }

    /// The front reply, when it is all that [`transmit`](Self::transmit) would offer (the
    /// usual case at one message in flight): the caller writes its slices without filling an
    /// array of them slot by slot.
    pub(crate) fn lone_reply(&self) -> Option<&EncodedFrame> {
        let SlotState::Ready {
            frame: Some(frame),
            then,
            ..
        } = &self.slots.front()?.state
        else {
            return None;
        };
        let next_ready = *then == Then::Continue
            && matches!(
                self.slots.get(1),
                Some(Slot {
                    state: SlotState::Ready { .. },
                    ..
                })
            );
        (!next_ready).then_some(frame)
    }

    /// True when [`transmit`](Self::transmit) has bytes to offer.
    pub(crate) fn wants_write(&self) -> bool {
        matches!(
            self.slots.front(),
            Some(Slot {
                state: SlotState::Ready { frame: Some(_), .. },
                ..
            })
        )
    }

    /// `n` bytes of what [`transmit`](Self::transmit) offered were written.
    pub(crate) fn handle_written(&mut self, n: usize, now: Instant, out: &mut Vec<Event>) {
        // The front reply takes the bytes first: all of them at one reply per write (at one
        // message in flight every write), with no iterator over the queue (callgrind, S1).
        let rest = match self.slots.front_mut() {
            Some(Slot {
                state: SlotState::Ready { frame, then, .. },
                ..
            }) => {
                let mut n = n;
                if let Some(frame) = frame {
                    let step = n.min(frame.remaining());
                    frame.advance(step);
                    n -= step;
                }
                if *then == Then::Continue { n } else { 0 }
            }
            _ => 0,
        };
        if rest > 0 {
            self.written_behind_front(rest);
        }
        self.slots.set_stall_since(None);
        self.settle(now, out);
    }

    /// [`handle_written`](Self::handle_written)'s `n` bytes left after the front reply: the
    /// replies behind it, in order.
    fn written_behind_front(&mut self, mut n: usize) {
        for slot in self.slots.iter_mut().skip(1) {
            if n == 0 {
                break;
            }
            let SlotState::Ready { frame, then, .. } = &mut slot.state else {
                break;
            };
            if let Some(frame) = frame {
                let step = n.min(frame.remaining());
                frame.advance(step);
                n -= step;
            }
            if *then != Then::Continue {
                break;
            }
        }
    }

    /// True once the connection wants its socket's write side shut (a lingering close began
    /// and every reply is out).
    pub(crate) fn wants_shutdown_write(&self) -> bool {
        matches!(&self.state, State::Lingering(l) if !l.shut)
    }

    /// The write side was shut (or could not be: the connection then just waits out the
    /// linger).
    pub(crate) fn handle_write_shutdown(&mut self) {
        if let State::Lingering(linger) = &mut self.state {
            linger.shut = true;
        }
    }

    /// Acts on whichever deadlines have passed at `now`; does nothing if none has.
    pub(crate) fn handle_timeout(&mut self, now: Instant, out: &mut Vec<Event>) {
        match &self.state {
            State::Closed(_) => return,
            State::Lingering(linger) => {
                if linger.deadline <= now {
                    self.close(linger.reason, out);
                }
                return;
            }
            State::Open => {}
        }
        if self.stall_deadline().is_some_and(|d| d <= now) {
            self.close(CloseReason::WriteStalled, out);
            return;
        }
        // Every waiting message whose deadline passed gets its timeout answer.
        let mut changed = false;
        for index in 0..self.slots.len() {
            let slot = &mut self.slots[index];
            if !matches!(slot.state, SlotState::Waiting { .. }) {
                continue;
            }
            if deadline_after(slot.received_at, self.limits.handler_timeout) > now {
                break; // deadlines grow with the sequence
            }
            let (seq, received_at) = (slot.seq, slot.received_at);
            let payload = slot.state.take_payload();
            if self.calling_seq() == Some(seq) {
                // The handler is still running: the connection moves on without it.
                self.calling = false;
                self.abandoned = true;
            }
            out.push(Event::Handled(Handled::Timeout));
            let state = self.timed_out(seq, &payload, received_at, now, out);
            self.slots[index].state = state;
            changed = true;
        }
        if changed {
            self.settle(now, out);
            return;
        }
        // Only while decoding: a frame that waits undecoded behind a busy handler may well be
        // complete.
        if self.can_dispatch() && self.frame_deadline.is_some_and(|d| d <= now) {
            out.push(Event::FrameRejected(FrameRejection::Timeout));
            self.close(CloseReason::FrameTimeout, out);
            return;
        }
        if self.slots.is_empty() && self.idle_deadline() <= now {
            let reason = if self.started {
                CloseReason::IdleTimeout
            } else {
                CloseReason::HandshakeTimeout
            };
            self.close(reason, out);
        }
    }

    /// The earliest deadline that matters now.
    // Inline: asked once per reactor visit; the search while messages are in flight is out
    // of line.
    #[inline]
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        match &self.state {
            State::Closed(_) => None,
            State::Lingering(linger) => Some(linger.deadline),
            // Nothing in flight, the usual case after a reply (asked once per reactor visit):
            // the same minimum without the general search (callgrind, S1: about 70
            // instructions per message).
            State::Open if self.slots.is_empty() => {
                let idle = self.idle_deadline();
                let at = match self.frame_deadline {
                    Some(frame) if frame < idle => frame,
                    _ => idle,
                };
                // No stall: with no slot, no reply waits to be written (`settle` disarms it
                // as the queue empties; summing it here made this a call that saves
                // registers on every visit, callgrind).
                debug_assert!(self.slots.stall_since().is_none());
                Some(at)
            }
            State::Open => self.in_flight_timeout(),
        }
    }

    /// [`poll_timeout`](Self::poll_timeout) while messages are in flight: the general search.
    // Out of line: inlined, its registers were saved on every call, the usual one included
    // (about 10 instructions per call, callgrind, S1).
    #[inline(never)]
    fn in_flight_timeout(&self) -> Option<Instant> {
        let waiting = self.slots.iter().find_map(|s| match s.state {
            SlotState::Waiting { .. } => Some(self.handler_deadline(s)),
            SlotState::Ready { .. } => None,
        });
        let idle = self.slots.is_empty().then(|| self.idle_deadline());
        [waiting, idle, self.frame_deadline, self.stall_deadline()]
            .into_iter()
            .flatten()
            .min()
    }

    /// Whether the reactor should read from the socket now.
    pub(crate) fn wants_read(&self) -> bool {
        match self.state {
            State::Closed(_) => false,
            State::Lingering(ref l) => l.shut && !self.peer_eof,
            State::Open if self.peer_eof => false,
            // While dispatching, the decoder bounds the buffer (limit + one read); otherwise
            // read-ahead does.
            State::Open => self.can_dispatch() || self.busy.len() < self.limits.read_ahead,
        }
    }

    /// Whether only new bytes, a completion or a deadline can move the connection on: open
    /// and serving, no end of stream or shutdown to act on, no abandoned call to report, and
    /// no bytes buffered to decode.
    pub(crate) fn is_at_rest(&self) -> bool {
        matches!(self.state, State::Open)
            && self.started
            && !self.peer_eof
            && !self.draining
            && !self.abandoned
            && self.busy.is_empty()
    }

    /// Gives a large read buffer back to the thread's pool when nothing is buffered (as
    /// after a read or a decode that found nothing); a small one stays until
    /// [`release_idle`](Self::release_idle).
    pub(crate) fn release_at_rest(&mut self) {
        if self.busy.is_empty() {
            self.release_large_read_buf();
        }
    }

    /// Whether the connection holds a read buffer, a decoder or a slot queue (all from the
    /// thread's pool). A connection keeps them between messages: at one message in flight
    /// every message would otherwise give them back and take them again (about 350
    /// instructions of some 6 100 per message, callgrind, S1). The reactor lists such a
    /// connection and calls [`release_idle`](Self::release_idle) from its periodic sweep.
    pub(crate) fn holds_buffers(&self) -> bool {
        self.busy.get().is_some() || self.slots.is_held()
    }

    /// Gives back to the thread's pool what an idle connection holds: the slot queue when
    /// nothing is in flight, then the read buffer (and the decoder, unless a frame is under
    /// way) when it is empty too. Returns whether the connection still holds any (it is in
    /// use: called again later).
    pub(crate) fn release_idle(&mut self) -> bool {
        if self.slots.is_empty() {
            self.slots.clear();
            if self.busy.is_empty() {
                self.release_read_buf();
            }
        }
        self.holds_buffers()
    }

    /// Takes the "a handler call was abandoned at its deadline" signal.
    pub(crate) fn take_abandoned(&mut self) -> bool {
        std::mem::take(&mut self.abandoned)
    }

    pub(crate) fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed(_))
    }

    /// True while a message is in flight (dispatched and not fully answered).
    pub(crate) fn in_flight(&self) -> bool {
        !self.slots.is_empty()
    }

    /// The message whose handler call is in progress, if any.
    pub(crate) fn calling_seq(&self) -> Option<u64> {
        self.calling.then(|| self.next_seq - 1)
    }

    /// True when nothing is in flight and no frame is half received.
    #[cfg(test)]
    pub(crate) fn is_idle(&self) -> bool {
        self.slots.is_empty() && self.busy.is_empty() && matches!(self.state, State::Open)
    }

    /// Heap bytes this connection holds, or will hold for a frame it has started: its read
    /// buffer (see [`read_buffer_counted`](Self::read_buffer_counted)), the payloads it keeps
    /// for NAKs and the replies it has not written yet. The server's memory budget sums these.
    // Inline: the usual case, nothing in flight after a reply, is asked once per reactor
    // visit (callgrind, S1: the call was half of its 15 instructions).
    #[inline]
    pub(crate) fn buffered(&self) -> usize {
        if self.slots.is_empty() {
            return self.read_buffer_counted();
        }
        self.buffered_in_flight()
    }

    /// [`buffered`](Self::buffered) while messages are in flight.
    #[inline(never)]
    fn buffered_in_flight(&self) -> usize {
        let slots: usize = self
            .slots
            .iter()
            .map(|s| match &s.state {
                SlotState::Waiting { held, .. } => *held,
                SlotState::Ready {
                    frame: Some(frame), ..
                } => frame.remaining(),
                SlotState::Ready { frame: None, .. } => 0,
            })
            .sum();
        self.read_buffer_counted() + slots
    }

    /// What the read buffer counts against the memory budget: its capacity, and, while a
    /// large frame is under way (more than [`LARGE_FRAME`] of it received, not complete), at
    /// least what the largest frame allowed takes. MLLP has no length prefix, so the rest of
    /// a started frame is unknown, and once reading pauses at the budget a connection may
    /// still finish the frame it is in (see the crate docs, "Bounded memory"): counted at
    /// their received size, a hundred connections part-way through 5 MiB frames at the pause
    /// each finished above the budget (`tests/budget.rs` counted up to 509 MiB for a 64 MiB
    /// budget on a loaded machine; BENCHMARKS.md, sixth pass). Counted at the limit, finishing
    /// them adds nothing, and reading pauses once as many large frames are under way as the
    /// budget holds. A frame of one read or less (every small message) counts its buffer;
    /// above the budget such a frame goes past the mark only as its reactor's one finishing
    /// frame (`Loop::holder`), so these do not each finish a whole frame above it.
    #[inline]
    fn read_buffer_counted(&self) -> usize {
        let capacity = self.busy.capacity();
        if self.frame_counted_in_full() {
            capacity.max(self.limits.max_message_size + crate::codec::FRAMING_OVERHEAD)
        } else {
            capacity
        }
    }

    /// Whether a large frame is under way (more than [`LARGE_FRAME`] of it received, not
    /// complete): the memory budget then counts it as the largest frame allowed, so
    /// finishing it adds nothing to the count but one read past its end.
    pub(crate) fn frame_counted_in_full(&self) -> bool {
        self.busy.len() > LARGE_FRAME && self.busy.in_frame()
    }

    /// Bytes of a frame being received (partial) or read ahead, held in the read buffer.
    pub(crate) fn buffered_len(&self) -> usize {
        self.busy.len()
    }

    /// Why the connection closed, once it has.
    pub(crate) fn close_reason(&self) -> Option<CloseReason> {
        match self.state {
            State::Closed(reason) => Some(reason),
            _ => None,
        }
    }

    /// Whether another message may be handed to the handler now.
    fn can_dispatch(&self) -> bool {
        !self.draining && !self.calling && self.slots.len() < self.limits.max_in_flight
    }

    /// The answer to a message whose handler deadline passed.
    fn timed_out(
        &self,
        seq: u64,
        payload: &[u8],
        received_at: Instant,
        now: Instant,
        out: &mut Vec<Event>,
    ) -> SlotState {
        out.push(Event::exception(Exception {
            seq: Some(seq),
            reason: ExceptionReason::HandlerTimeout,
            message_size: payload.len(),
            detail: None,
            received_at: Some(received_at),
            control_id: control_id_of(payload),
        }));
        ready(
            self.nak(payload, AckCode::AE, "handler timeout", now, out),
            false,
            Then::Continue,
        )
    }

    /// The NAK for `payload` under the NAK policy (every NAK the server sends is built here),
    /// stamped with the wall-clock time of `now`. Without a readable MSH the code is AR: the
    /// message cannot be processed at all.
    fn nak(
        &self,
        payload: &[u8],
        code: AckCode,
        text: &str,
        now: Instant,
        out: &mut Vec<Event>,
    ) -> Option<Bytes> {
        if self.limits.nak_policy == NakPolicy::Silent {
            return None;
        }
        let source = &payload[..payload.len().min(NAK_SOURCE_LIMIT)];
        let code = if crate::msh::Msh::parse(source).is_ok() {
            code
        } else {
            AckCode::AR
        };
        out.push(Event::NakQueued(code));
        Some(
            ack::Ack::new(code)
                .text(text)
                .timestamp(self.limits.wall_clock.at(now))
                .build(source),
        )
    }

    /// Pops finished slots from the front, reporting each, and starts a close a finished slot
    /// asked for; then refreshes the write-stall deadline.
    fn settle(&mut self, now: Instant, out: &mut Vec<Event>) {
        // Whether the last reply popped wrote bytes: only then can a close destroy it.
        let mut wrote = false;
        while let Some(slot) = self.slots.front() {
            let SlotState::Ready { frame, stop, then } = &slot.state else {
                break;
            };
            if frame.as_ref().is_some_and(|f| !f.is_done()) {
                break;
            }
            if *stop {
                out.push(Event::MessageStop {
                    seq: slot.seq,
                    response_size: frame.as_ref().map(|f| f.payload().len()),
                    received_at: slot.received_at,
                });
            }
            let then = *then;
            wrote = frame.is_some();
            self.slots.pop_front();
            if let Then::Close(reason) = then {
                // Later messages were dispatched but will never be answered: the sender
                // resends them.
                self.slots.clear();
                self.finish(reason, wrote, now, out);
                return;
            }
        }
        if self.slots.is_empty() {
            // The empty queue stays for the next message (see `release_idle`).
            self.idle_from = now;
            if self.draining {
                self.finish(CloseReason::Shutdown, wrote, now, out);
                return;
            }
            // What `arm_stall` finds for an empty queue, without looking at its front again.
            self.slots.set_stall_since(None);
            return;
        }
        self.arm_stall(now);
    }

    /// Arms the stall deadline while replies wait to be written (the peer must take some of
    /// them by then), and disarms it once none waits.
    fn arm_stall(&mut self, now: Instant) {
        if !self.wants_write() {
            self.slots.set_stall_since(None);
        } else if self.slots.stall_since().is_none() {
            self.slots.set_stall_since(Some(now));
        }
    }

    /// When the connection is closed as idle (or, before it started, as not started), unless
    /// a message is in flight.
    #[inline]
    fn idle_deadline(&self) -> Instant {
        let timeout = if self.started {
            self.limits.idle_timeout
        } else {
            self.limits.handshake_timeout
        };
        deadline_after(self.idle_from, timeout)
    }

    /// When the handler's outcome for `slot` is no longer awaited.
    fn handler_deadline(&self, slot: &Slot) -> Instant {
        deadline_after(slot.received_at, self.limits.handler_timeout)
    }

    /// When the replies waiting to be written must have been taken (some of them) by.
    fn stall_deadline(&self) -> Option<Instant> {
        let since = self.slots.stall_since()?;
        Some(deadline_after(since, self.limits.write_timeout))
    }

    /// Called when decoding found no complete frame: after EOF, closes once everything the
    /// peer sent has been answered (a partial frame is dropped with the connection).
    fn close_if_done(&mut self, out: &mut Vec<Event>) {
        if self.peer_eof && self.slots.is_empty() && !self.calling {
            self.close(CloseReason::PeerClosed, out);
        }
    }

    fn update_frame_deadline(&mut self, now: Instant) {
        if !self.busy.in_frame() {
            self.frame_deadline = None;
        } else if self.frame_deadline.is_none() {
            self.frame_deadline = Some(deadline_after(now, self.limits.frame_timeout));
        }
    }

    fn reject_oversize(&mut self, received: usize, now: Instant, out: &mut Vec<Event>) {
        out.push(Event::FrameRejected(FrameRejection::TooLarge));
        let partial = self
            .busy
            .get()
            .map_or(&[][..], |p| p.decoder.partial_frame(&p.buf));
        out.push(Event::exception(Exception {
            seq: None,
            reason: ExceptionReason::MessageTooLarge,
            message_size: received,
            detail: None,
            received_at: None,
            control_id: control_id_of(partial),
        }));
        let nak = match self.limits.nak_policy {
            NakPolicy::Send if has_control_id(partial) => {
                self.nak(partial, AckCode::AR, "message too large", now, out)
            }
            _ => None,
        };
        self.busy.discard();
        self.frame_deadline = None;
        self.draining = true; // dispatch nothing more
        // The AR goes after every earlier reply; then the connection closes.
        self.slots.push_back(Slot {
            seq: u64::MAX,
            received_at: now,
            state: ready(nak, false, Then::Close(CloseReason::MessageTooLarge)),
        });
        self.settle(now, out);
    }

    /// Closes for `reason` after the last reply: lingering if that reply wrote bytes (a reset
    /// could destroy them before the peer reads them) and the peer may still send.
    // Cold: once per connection at most, off `settle`'s per-message path.
    #[cold]
    fn finish(&mut self, reason: CloseReason, wrote: bool, now: Instant, out: &mut Vec<Event>) {
        if !wrote || self.peer_eof || !matches!(self.state, State::Open) {
            self.close(reason, out);
            return;
        }
        self.busy.discard();
        self.frame_deadline = None;
        self.state = State::Lingering(Box::new(Linger {
            reason,
            deadline: deadline_after(now, LINGER_TIME),
            shut: false,
            discarded: 0,
        }));
    }

    /// Whether an empty read buffer of `capacity` goes back to the pool as soon as it
    /// empties: a connection that sent a large frame (its buffer is the tail of a large
    /// allocation, or a large one itself) or whose buffer outgrew the small ones. A small
    /// buffer stays until the reactor's sweep (see [`holds_buffers`](Self::holds_buffers)).
    fn gives_back_at_once(&self, capacity: usize) -> bool {
        self.large_frame_hint > 0 || capacity > pool::BUFFER_CAPACITY
    }

    /// [`release_read_buf`](Self::release_read_buf) if the buffer is one that goes back at
    /// once ([`gives_back_at_once`](Self::gives_back_at_once)).
    fn release_large_read_buf(&mut self) {
        if self.gives_back_at_once(self.busy.capacity()) {
            self.release_read_buf();
        }
    }

    /// Gives the (empty) read buffer back to the thread's pool, unless it once held a large
    /// frame: the allocation behind it may then be far larger than its capacity shows.
    fn release_read_buf(&mut self) {
        self.busy
            .release(usize::from(self.large_frame_hint) * LARGE_FRAME);
    }

    fn close(&mut self, reason: CloseReason, out: &mut Vec<Event>) {
        if self.is_closed() {
            return;
        }
        self.state = State::Closed(reason);
        self.busy.discard();
        self.slots.clear();
        self.calling = false;
        out.push(Event::Closed);
    }
}

impl SlotState {
    /// Ends a wait, returning the payload kept for a NAK (empty if the slot was not
    /// waiting): the slot holds nothing to write until the caller sets its answer.
    fn take_payload(&mut self) -> Bytes {
        let answered = Self::Ready {
            frame: None,
            stop: false,
            then: Then::Continue,
        };
        match std::mem::replace(self, answered) {
            Self::Waiting { payload, .. } => payload,
            Self::Ready { .. } => Bytes::new(),
        }
    }
}

fn ready(bytes: Option<Bytes>, stop: bool, then: Then) -> SlotState {
    SlotState::Ready {
        frame: bytes.map(EncodedFrame::new),
        stop,
        then,
    }
}

/// The control id a NAK for `message` quotes (escaped and capped), read from a bounded prefix.
fn control_id_of(message: &[u8]) -> Option<Bytes> {
    let source = &message[..message.len().min(NAK_SOURCE_LIMIT)];
    ack::echoed_control_id(source).map(|id| Bytes::copy_from_slice(&id))
}

/// Whether the MSH-10 of a (possibly truncated) message can be read, so a NAK can quote it.
fn has_control_id(message: &[u8]) -> bool {
    let source = &message[..message.len().min(NAK_SOURCE_LIMIT)];
    crate::msh::Msh::parse(source)
        .ok()
        .and_then(|m| m.control_id())
        .is_some_and(|id| !id.is_empty())
}

#[cfg(test)]
#[path = "connection/tests.rs"]
mod tests;
