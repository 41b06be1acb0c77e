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
    assert_eq!(h.conn.buffered(), 0, "an idle connection holds no buffer");
    assert_eq!(h.conn.poll_timeout(), Some(h.at(1.5) + IDLE));
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
        Event::MessageException {
            seq: None,
            reason: ExceptionReason::MessageTooLarge,
            ..
        }
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
