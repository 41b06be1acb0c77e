//! Virtual-time tests of the connection state machine: no sockets, no sleeps (quinn's `Pair`
//! idea). Each test moves a constructed clock and asserts on effects and phase.

use super::*;

const IDLE: Duration = Duration::from_secs(60);
const FRAME: Duration = Duration::from_secs(120);
const HANDLER: Duration = Duration::from_secs(60);
const WRITE: Duration = Duration::from_secs(30);

fn limits(nak_policy: NakPolicy, max: usize) -> Arc<Limits> {
    Arc::new(Limits {
        idle_timeout: IDLE,
        frame_timeout: FRAME,
        handler_timeout: HANDLER,
        write_timeout: WRITE,
        handshake_timeout: Duration::from_secs(10),
        max_message_size: max,
        read_ahead: 4096,
        max_in_flight: 1,
        nak_policy,
        expose_errors: true,
        wall_clock: WallClock::now(),
    })
}

fn msg(id: &str) -> Vec<u8> {
    format!("MSH|^~\\&|SND|FAC|RCV|FAC|20260101||ADT^A01|{id}|P|2.5.1\rPID|1\r").into_bytes()
}

fn framed(id: &str) -> Vec<u8> {
    let mut out = vec![0x0b];
    out.extend(msg(id));
    out.extend([0x1c, 0x0d]);
    out
}

struct Harness {
    conn: Connection,
    t0: Instant,
    out: Vec<Event>,
    /// Dispatched and not yet taken by `dispatched()`.
    seqs: Vec<u64>,
}

impl Harness {
    fn new(policy: NakPolicy) -> Self {
        Self::with_max(policy, 1 << 20)
    }

    fn with_max(policy: NakPolicy, max: usize) -> Self {
        let t0 = Instant::now();
        Self {
            conn: Connection::new(limits(policy, max), t0),
            t0,
            out: Vec::new(),
            seqs: Vec::new(),
        }
    }

    fn at(&self, secs: f64) -> Instant {
        self.t0 + Duration::from_secs_f64(secs)
    }

    fn read(&mut self, bytes: &[u8], secs: f64) {
        let now = self.at(secs);
        self.conn.handle_read(bytes, now, &mut self.out);
        self.poll(secs);
    }

    /// Dispatches what the connection offers, as the reactor does after every input.
    fn poll(&mut self, secs: f64) {
        let now = self.at(secs);
        while let Some(d) = self.conn.poll_dispatch(now, &mut self.out) {
            self.seqs.push(d.seq);
        }
    }

    /// Takes the events so far (and forgets the dispatched seqs).
    fn take(&mut self) -> Vec<Event> {
        self.seqs.clear();
        std::mem::take(&mut self.out)
    }

    /// The seqs dispatched since the last call (and drops the events so far).
    fn dispatched(&mut self) -> Vec<u64> {
        let seqs = std::mem::take(&mut self.seqs);
        self.take();
        seqs
    }

    /// The bytes `transmit` offers now.
    fn offered(&self) -> Vec<u8> {
        let mut slices = [std::io::IoSlice::new(&[]); 30];
        let n = self.conn.transmit(&mut slices);
        slices[..n].iter().flat_map(|s| s.iter().copied()).collect()
    }

    /// Writes everything transmit() offers; returns the bytes.
    fn flush(&mut self, secs: f64) -> Vec<u8> {
        let mut wire = Vec::new();
        loop {
            let bytes = self.offered();
            if bytes.is_empty() {
                break;
            }
            wire.extend_from_slice(&bytes);
            let now = self.at(secs);
            self.conn.handle_written(bytes.len(), now, &mut self.out);
        }
        self.poll(secs);
        wire
    }

    fn complete(&mut self, seq: u64, outcome: Outcome, secs: f64) {
        let now = self.at(secs);
        self.conn
            .handle_completion(seq, outcome, now, &mut self.out);
        self.poll(secs);
    }

    fn timeout(&mut self, secs: f64) {
        let now = self.at(secs);
        self.conn.handle_timeout(now, &mut self.out);
        self.poll(secs);
    }

    /// A lingering close: shut our side, then the peer closes too.
    fn peer_closes_after_linger(&mut self) {
        assert!(self.conn.wants_shutdown_write(), "a lingering close");
        self.conn.handle_write_shutdown();
        assert!(self.conn.wants_read(), "lingering reads and discards");
        self.conn.handle_eof(&mut self.out);
    }
}

fn reply(text: &str) -> Outcome {
    Outcome::Reply(Reply::Send(Bytes::copy_from_slice(text.as_bytes())))
}

#[test]
fn message_is_dispatched_replied_and_connection_returns_to_idle() {
    let mut h = Harness::new(NakPolicy::Send);
    h.read(&framed("M1"), 1.0);
    assert_eq!(h.dispatched(), vec![0]);
    assert!(h.conn.in_flight());
    h.complete(0, reply("ACK1"), 1.5);
    assert_eq!(h.flush(1.5), b"\x0bACK1\x1c\x0d");
    let effects = h.take();
    assert!(matches!(effects[0], Event::Handled(Handled::Reply)));
    assert!(matches!(
        effects[1],
        Event::MessageStop {
            seq: 0,
            response_size: Some(4),
            ..
        }
    ));
    assert!(h.conn.is_idle());
    assert!(h.conn.holds_buffers(), "kept for the next message");
    assert!(!h.conn.release_idle(), "idle: all given back");
    assert_eq!(h.conn.buffered(), 0, "an idle connection holds no buffer");
    assert_eq!(h.conn.poll_timeout(), Some(h.at(1.5) + IDLE));
}

#[test]
fn a_connection_answering_one_message_at_a_time_keeps_its_buffers_until_released_idle() {
    super::pool::drain();
    let mut h = Harness::new(NakPolicy::Send);
    for round in 0..2 {
        for seq in round * 3..round * 3 + 3 {
            h.read(&framed(&format!("M{seq}")), 1.0);
            assert_eq!(h.dispatched(), vec![seq]);
            h.complete(seq, reply("ACK"), 1.0);
            assert_eq!(h.flush(1.0), b"\x0bACK\x1c\x0d");
            assert!(h.conn.is_idle());
            assert!(h.conn.holds_buffers(), "kept between messages");
            assert_eq!(
                super::pool::pooled(),
                (0, 0),
                "no round trip through the pool per message"
            );
        }
        // The reactor's sweep, finding it idle.
        assert!(!h.conn.release_idle());
        assert_eq!(h.conn.buffered(), 0, "an idle connection holds no buffer");
        assert_eq!(super::pool::pooled(), (1, 1), "both back in the pool");
    }
}

#[test]
fn a_connection_in_use_keeps_its_buffers_through_the_sweep() {
    super::pool::drain();
    let mut h = Harness::new(NakPolicy::Send);
    h.read(&framed("M0"), 1.0);
    assert_eq!(h.dispatched(), vec![0]);
    assert!(
        h.conn.release_idle(),
        "a message in flight: nothing given back"
    );
    assert_eq!(super::pool::pooled(), (0, 0));
    h.complete(0, reply("ACK"), 1.0);
    assert_eq!(h.flush(1.0), b"\x0bACK\x1c\x0d");
    // Half a frame: the buffer holds it.
    let wire = framed("M1");
    h.read(&wire[..10], 2.0);
    assert!(h.conn.release_idle(), "a partial frame: the buffer stays");
    assert_eq!(super::pool::pooled().0, 0);
    h.read(&wire[10..], 2.0);
    assert_eq!(
        h.dispatched(),
        vec![1],
        "the partial frame survived the sweep"
    );
}

#[test]
fn an_idle_connection_gives_its_decoder_back_but_keeps_it_while_a_frame_is_under_way() {
    super::pool::drain();
    let mut h = Harness::new(NakPolicy::Send);
    assert_eq!(
        std::mem::size_of::<Busy>(),
        8,
        "an idle connection's decoder costs a pointer"
    );
    let wire = framed("M0");
    // The start byte alone, then nothing: the buffer may be empty, the frame is under way.
    h.read(&wire[..1], 1.0);
    assert_eq!(
        super::pool::pooled_parts(),
        0,
        "the decoder stays while in a frame"
    );
    for piece in [1..2, 2..10, 10..wire.len() - 1] {
        h.read(&wire[piece], 1.0);
        assert!(h.dispatched().is_empty());
    }
    h.read(&wire[wire.len() - 1..], 1.0);
    assert_eq!(
        h.dispatched(),
        vec![0],
        "the frame split after its start byte arrives whole"
    );
    h.complete(0, reply("ACK"), 1.0);
    assert_eq!(h.flush(1.0), b"\x0bACK\x1c\x0d");
    assert!(h.conn.is_idle());
    assert!(!h.conn.release_idle(), "the reactor's sweep");
    assert_eq!(
        super::pool::pooled_parts(),
        1,
        "idle: buffer and decoder back in the pool"
    );
    // The pooled decoder starts afresh for the next frame.
    h.read(&framed("M1"), 2.0);
    assert_eq!(h.dispatched(), vec![1]);
    assert_eq!(super::pool::pooled_parts(), 0);
}

#[test]
fn pipelined_frames_are_dispatched_one_at_a_time_in_order() {
    let mut h = Harness::new(NakPolicy::Send);
    let mut wire = Vec::new();
    for i in 0..5 {
        wire.extend(framed(&format!("P{i}")));
    }
    h.read(&wire, 0.0);
    let mut seqs = h.dispatched();
    let mut replies = Vec::new();
    for i in 0..5u64 {
        assert_eq!(seqs, vec![i], "exactly one message in flight");
        h.complete(i, reply(&format!("A{i}")), 0.1);
        replies.extend(h.flush(0.1));
        seqs = h.dispatched();
    }
    assert!(seqs.is_empty());
    let expected: Vec<u8> = (0..5)
        .flat_map(|i| format!("\x0bA{i}\x1c\x0d").into_bytes())
        .collect();
    assert_eq!(replies, expected);
}

#[test]
fn idle_timeout_closes_and_reads_restart_it() {
    let mut h = Harness::new(NakPolicy::Send);
    h.timeout(59.0);
    assert!(!h.conn.is_closed(), "spurious timeouts are harmless");
    h.read(b"junk", 30.0);
    assert!(matches!(h.take()[..], [Event::Junk(4)]));
    h.timeout(61.0);
    assert!(
        !h.conn.is_closed(),
        "the read at 30 s restarted the idle timer"
    );
    h.timeout(90.0);
    assert_eq!(h.conn.close_reason(), Some(CloseReason::IdleTimeout));
}

#[test]
fn idle_timer_does_not_run_while_the_handler_works() {
    let mut h = Harness::new(NakPolicy::Send);
    h.read(&framed("M1"), 0.0);
    h.take();
    h.timeout(59.9); // handler deadline at 60 s; idle must not fire meanwhile
    assert!(h.conn.in_flight());
    h.complete(0, reply("A"), 59.9);
    h.flush(59.9);
    h.timeout(100.0);
    assert!(
        !h.conn.is_closed(),
        "idle restarted when the reply went out"
    );
}

#[test]
fn frame_deadline_closes_a_slow_drip() {
    let mut h = Harness::new(NakPolicy::Send);
    let wire = framed("SLOW");
    for (i, b) in wire[..wire.len() - 1].iter().enumerate() {
        h.read(&[*b], i as f64 * 4.0); // a byte every 4 s keeps the idle timer alive
        h.timeout(i as f64 * 4.0);
        if h.conn.is_closed() {
            break;
        }
    }
    assert_eq!(h.conn.close_reason(), Some(CloseReason::FrameTimeout));
    assert!(
        h.take()
            .iter()
            .any(|e| matches!(e, Event::FrameRejected(FrameRejection::Timeout)))
    );
}

#[test]
fn handler_timeout_sends_ae_then_discards_the_late_result() {
    let mut h = Harness::new(NakPolicy::Send);
    h.read(&framed("SLOW1"), 0.0);
    h.take();
    h.timeout(60.0);
    let nak = h.flush(60.0);
    assert!(
        nak.windows(13).any(|w| w == b"MSA|AE|SLOW1|"),
        "{}",
        String::from_utf8_lossy(&nak)
    );
    let effects = h.take();
    assert!(
        effects
            .iter()
            .any(|e| matches!(e, Event::Handled(Handled::Timeout)))
    );
    assert!(
        effects
            .iter()
            .any(|e| matches!(e, Event::NakQueued(AckCode::AE)))
    );
    assert!(
        !effects
            .iter()
            .any(|e| matches!(e, Event::MessageStop { .. })),
        "a NAK is not a message stop"
    );
    // The next message is served; the late result of the first is discarded.
    h.read(&framed("M2"), 61.0);
    assert_eq!(h.dispatched(), vec![1]);
    h.complete(0, reply("LATE"), 62.0);
    assert!(matches!(h.take()[..], [Event::LateResult]));
    h.complete(1, reply("A2"), 62.0);
    assert_eq!(h.flush(62.0), b"\x0bA2\x1c\x0d");
}

#[test]
fn silent_policy_sends_nothing_on_failure() {
    let mut h = Harness::new(NakPolicy::Silent);
    h.read(&framed("E1"), 0.0);
    h.take();
    let failed = Outcome::Failed {
        reason: ExceptionReason::HandlerError,
        detail: "boom".into(),
    };
    h.complete(0, failed, 0.1);
    assert!(h.offered().is_empty());
    h.read(&framed("T1"), 0.2);
    h.take();
    h.timeout(61.0);
    assert!(h.offered().is_empty());
    assert!(!h.conn.is_closed());
}

#[test]
fn oversize_frame_gets_an_ar_nak_then_close() {
    let mut h = Harness::with_max(NakPolicy::Send, 64);
    let mut wire = framed("BIG1");
    wire.truncate(wire.len() - 2);
    wire.extend(std::iter::repeat_n(b'x', 100));
    h.read(&wire, 0.0);
    let effects = h.take();
    assert!(
        effects
            .iter()
            .any(|e| matches!(e, Event::FrameRejected(FrameRejection::TooLarge)))
    );
    assert!(effects.iter().any(|e| matches!(
        e,
        Event::MessageException(e)
            if e.seq.is_none() && e.reason == ExceptionReason::MessageTooLarge
    )));
    let nak = h.flush(0.0);
    assert!(
        nak.windows(12).any(|w| w == b"MSA|AR|BIG1|"),
        "{}",
        String::from_utf8_lossy(&nak)
    );
    assert_eq!(
        h.conn.close_reason(),
        None,
        "lingers until the peer has read the AR"
    );
    h.peer_closes_after_linger();
    assert_eq!(h.conn.close_reason(), Some(CloseReason::MessageTooLarge));
}

#[test]
fn oversize_frame_without_readable_msh_closes_without_nak() {
    let mut h = Harness::with_max(NakPolicy::Send, 16);
    h.read(&[&[0x0b][..], &[b'z'; 40]].concat(), 0.0);
    assert!(h.offered().is_empty());
    assert_eq!(h.conn.close_reason(), Some(CloseReason::MessageTooLarge));
}

#[test]
fn read_ahead_stops_reading_while_handling() {
    let mut h = Harness::new(NakPolicy::Send);
    h.read(&framed("M1"), 0.0);
    h.take();
    assert!(h.conn.wants_read());
    h.read(&[b'j'; 5000], 0.1);
    assert!(!h.conn.wants_read(), "read-ahead of 4096 bytes is full");
}

#[test]
fn half_close_still_answers_then_closes() {
    let mut h = Harness::new(NakPolicy::Send);
    let mut wire = framed("H1");
    wire.extend(framed("H2"));
    h.read(&wire, 0.0);
    h.conn.handle_eof(&mut h.out);
    assert_eq!(h.dispatched(), vec![0]);
    h.complete(0, reply("A1"), 0.1);
    h.flush(0.1);
    assert_eq!(h.dispatched(), vec![1]);
    h.complete(1, reply("A2"), 0.2);
    h.flush(0.2);
    assert_eq!(h.conn.close_reason(), Some(CloseReason::PeerClosed));
}

#[test]
fn shutdown_finishes_the_message_in_flight_then_closes() {
    let mut h = Harness::new(NakPolicy::Send);
    let mut wire = framed("S1");
    wire.extend(framed("S2"));
    h.read(&wire, 0.0);
    h.take();
    h.conn.handle_shutdown(&mut h.out);
    assert!(!h.conn.is_closed());
    h.complete(0, reply("A1"), 0.1);
    assert_eq!(h.flush(0.1), b"\x0bA1\x1c\x0d");
    assert!(h.seqs.is_empty(), "S2 is never dispatched");
    h.peer_closes_after_linger();
    assert_eq!(h.conn.close_reason(), Some(CloseReason::Shutdown));
}

#[test]
fn write_stall_closes() {
    let mut h = Harness::new(NakPolicy::Send);
    h.read(&framed("W1"), 0.0);
    h.take();
    h.complete(0, reply("A"), 0.0);
    assert!(h.conn.wants_write());
    h.conn.handle_written(1, h.at(10.0), &mut h.out); // progress restarts the deadline
    h.timeout(35.0);
    assert!(!h.conn.is_closed());
    h.timeout(40.0);
    assert_eq!(h.conn.close_reason(), Some(CloseReason::WriteStalled));
}

#[test]
fn handler_close_replies() {
    let mut h = Harness::new(NakPolicy::Send);
    h.read(&framed("C1"), 0.0);
    h.take();
    h.complete(
        0,
        Outcome::Reply(Reply::SendAndClose(Bytes::from_static(b"BYE"))),
        0.1,
    );
    assert_eq!(h.flush(0.1), b"\x0bBYE\x1c\x0d");
    h.peer_closes_after_linger();
    assert_eq!(h.conn.close_reason(), Some(CloseReason::ClosedByHandler));

    let mut h = Harness::new(NakPolicy::Send);
    h.read(&framed("C2"), 0.0);
    h.take();
    h.complete(0, Outcome::Reply(Reply::Close), 0.1);
    assert!(h.offered().is_empty());
    assert!(!h.conn.wants_shutdown_write(), "nothing written: no linger");
    assert_eq!(h.conn.close_reason(), Some(CloseReason::ClosedByHandler));
}

// Pipelining on a virtual clock: several messages in flight (deferred replies), answered out
// of order, failed or timed out in the middle; replies always leave in message order.

/// 2026-01-01T00:00:00Z: the wall clock at the harness's `t0`.
const WALL_T0: u64 = 1_767_225_600;

impl Harness {
    /// A connection with up to `in_flight` messages in flight, whose wall clock reads
    /// [`WALL_T0`] at `t0`.
    fn pipelined(in_flight: usize) -> Self {
        let t0 = Instant::now();
        let mut limits = (*limits(NakPolicy::Send, 1 << 20)).clone();
        limits.max_in_flight = in_flight;
        limits.wall_clock =
            WallClock::new(t0, std::time::UNIX_EPOCH + Duration::from_secs(WALL_T0));
        Self {
            conn: Connection::new(Arc::new(limits), t0),
            t0,
            out: Vec::new(),
            seqs: Vec::new(),
        }
    }

    /// Dispatches every message the connection offers now, each handler call returning
    /// `Reply::Deferred` (so the next may be dispatched); returns their seqs.
    fn defer_all(&mut self, secs: f64) -> Vec<u64> {
        let mut all = Vec::new();
        loop {
            let seqs = std::mem::take(&mut self.seqs);
            if seqs.is_empty() {
                return all;
            }
            for seq in seqs {
                self.complete(seq, Outcome::Deferred, secs);
                all.push(seq);
            }
        }
    }

    fn naks(&self) -> Vec<AckCode> {
        self.out
            .iter()
            .filter_map(|e| match e {
                Event::NakQueued(code) => Some(*code),
                _ => None,
            })
            .collect()
    }
}

/// The MSA-1 and MSA-2 of each reply on `wire`, in order.
fn answers(wire: &[u8]) -> Vec<(String, String)> {
    wire.split(|&b| b == 0x0b)
        .filter(|f| !f.is_empty())
        .map(|f| {
            let parsed = ack::parse(f).expect("an ACK");
            (
                parsed.code.as_str().to_owned(),
                String::from_utf8_lossy(parsed.control_id).into_owned(),
            )
        })
        .collect()
}

fn ack_for(id: &str) -> Outcome {
    Outcome::Reply(Reply::Send(ack::accept(&msg(id))))
}

#[test]
fn pipeline_deferred_completions_out_of_order_are_answered_in_order() {
    let mut h = Harness::pipelined(4);
    let mut wire = Vec::new();
    for id in ["A", "B", "C", "D", "E"] {
        wire.extend(framed(id));
    }
    h.read(&wire, 0.0);
    // Four in flight at once; the fifth waits undecoded for a free slot.
    assert_eq!(h.defer_all(0.0), [0, 1, 2, 3]);
    assert!(h.conn.in_flight());
    h.complete(2, ack_for("C"), 1.0);
    h.complete(3, ack_for("D"), 1.0);
    assert!(h.offered().is_empty(), "C and D wait behind A");
    h.complete(0, ack_for("A"), 2.0);
    assert_eq!(answers(&h.flush(2.0)), [("AA".into(), "A".into())]);
    // A's slot is free: E is dispatched.
    assert_eq!(h.defer_all(2.0), [4]);
    h.complete(4, ack_for("E"), 3.0);
    h.complete(1, ack_for("B"), 3.0);
    let ids: Vec<String> = answers(&h.flush(3.0))
        .into_iter()
        .map(|(_, id)| id)
        .collect();
    assert_eq!(ids, ["B", "C", "D", "E"]);
    assert!(h.conn.is_idle());
}

#[test]
fn pipeline_dropped_handle_gets_an_ae_between_the_replies_around_it() {
    let mut h = Harness::pipelined(8);
    let mut wire = Vec::new();
    for id in ["A", "B", "C"] {
        wire.extend(framed(id));
    }
    h.read(&wire, 0.0);
    assert_eq!(h.defer_all(0.0), [0, 1, 2]);
    h.take();
    h.complete(2, ack_for("C"), 1.0);
    // What a `ReplyHandle` dropped unanswered sends.
    let dropped = Outcome::Failed {
        reason: ExceptionReason::HandlerError,
        detail: "reply handle dropped without an answer".to_owned(),
    };
    h.complete(1, dropped, 1.0);
    assert_eq!(h.naks(), [AckCode::AE]);
    h.complete(0, ack_for("A"), 1.0);
    assert_eq!(
        answers(&h.flush(1.0)),
        [
            ("AA".into(), "A".into()),
            ("AE".into(), "B".into()),
            ("AA".into(), "C".into())
        ]
    );
    assert!(h.conn.is_idle(), "a failure keeps the connection open");
}

#[test]
fn pipeline_deadline_passing_in_the_middle_answers_that_message_alone() {
    let mut h = Harness::pipelined(8);
    let mut seqs = Vec::new();
    for (id, at) in [("A", 0.0), ("B", 30.0), ("C", 40.0)] {
        h.read(&framed(id), at);
        seqs.extend(h.defer_all(at));
    }
    assert_eq!(seqs, [0, 1, 2]);
    h.complete(0, ack_for("A"), 1.0);
    assert_eq!(answers(&h.flush(1.0)).len(), 1);
    h.complete(2, ack_for("C"), 50.0);
    assert!(h.offered().is_empty(), "C waits behind B");
    // A's deadline was 60 s but A is answered; B's is 90 s.
    assert_eq!(
        h.conn.poll_timeout(),
        Some(h.at(30.0 + HANDLER.as_secs_f64()))
    );
    h.timeout(89.0);
    assert!(h.offered().is_empty());
    h.take();
    h.timeout(90.0);
    assert_eq!(h.naks(), [AckCode::AE]);
    let wire = h.flush(90.0);
    assert_eq!(
        answers(&wire),
        [("AE".into(), "B".into()), ("AA".into(), "C".into())]
    );
    // The NAK's timestamp is the wall-clock time of the `now` it was built at (t0 + 90 s):
    // the connection reads no clock.
    let nak = &wire[1..wire.iter().position(|&b| b == 0x1c).unwrap()];
    let msh = crate::msh::Msh::parse(nak).unwrap();
    assert_eq!(msh.field(7), Some(&b"20260101000130+0000"[..]));
    // B's handler answers late: discarded, counted, never written.
    h.take();
    h.complete(1, ack_for("B"), 95.0);
    assert!(matches!(h.out.as_slice(), [Event::LateResult]));
    assert!(h.offered().is_empty());
}

/// A NAK a handler returns is counted once: by the code a `SendAck` carries (its bytes are
/// not read back), or by the MSA-1 read from a plain `Send`'s bytes.
#[test]
fn handler_naks_count_by_the_code_the_reply_carries_or_else_by_its_msa1() {
    let mut h = Harness::new(NakPolicy::Send);
    let ae = || ack::nak(&msg("A"), AckCode::AE, "no");
    let replies = [
        Reply::SendAck(AckCode::AE, ae()),
        Reply::Send(ae()),
        // The carried code is what counts, whatever the bytes say.
        Reply::SendAck(AckCode::AA, ae()),
        Reply::SendAck(AckCode::AA, ack::accept(&msg("A"))),
        Reply::Send(ack::accept(&msg("A"))),
    ];
    let mut naks = Vec::new();
    for (seq, reply) in replies.into_iter().enumerate() {
        h.read(&framed("A"), 0.0);
        assert_eq!(h.dispatched(), vec![seq as u64]);
        h.take();
        h.complete(seq as u64, Outcome::Reply(reply), 0.0);
        naks.extend(h.naks());
        assert_eq!(answers(&h.flush(0.0)).len(), 1);
    }
    assert_eq!(naks, [AckCode::AE, AckCode::AE]);
}

/// A reply that is not written arms the stall deadline when it completes (where `settle`
/// would stop at once, `handle_completion` only arms it); a reply behind a message still with
/// its handler arms nothing, and a no-reply at the front still settles at once: the reply
/// behind it goes out, in order.
#[test]
fn completions_arm_the_stall_deadline_only_for_a_reply_at_the_front() {
    let write = WRITE.as_secs_f64();
    let mut h = Harness::new(NakPolicy::Send);
    h.read(&framed("S1"), 0.0);
    h.take();
    h.complete(0, reply("A"), 0.0);
    h.timeout(write - 1.0);
    assert!(!h.conn.is_closed());
    h.timeout(write + 1.0);
    assert_eq!(h.conn.close_reason(), Some(CloseReason::WriteStalled));

    let mut h = Harness::pipelined(4);
    h.read(&[framed("A"), framed("B"), framed("C")].concat(), 0.0);
    assert_eq!(h.defer_all(0.0), [0, 1, 2]);
    h.complete(1, ack_for("B"), 0.0);
    assert!(h.offered().is_empty(), "B waits behind A");
    h.timeout(write + 1.0);
    assert!(!h.conn.is_closed(), "nothing could be written: no stall");
    h.complete(0, Outcome::Reply(Reply::NoReply), write + 2.0);
    assert_eq!(answers(&h.flush(write + 2.0)), [("AA".into(), "B".into())]);
    h.complete(2, ack_for("C"), write + 3.0);
    assert_eq!(answers(&h.flush(write + 3.0)), [("AA".into(), "C".into())]);
    assert!(h.conn.is_idle());
}
