//! Fuzz entry points. Each `fuzz/fuzz_targets/*.rs` is one line calling a function here, so
//! `cargo test` can replay the corpus through exactly the code the fuzzer runs.

use bytes::BytesMut;

use crate::ack::{self, Ack, AckCode, Severity};
use crate::codec::{CARRIAGE_RETURN, END_BLOCK, FrameDecoder, FrameError, START_BLOCK};
use crate::msh::{Encoding, Msh};

/// Fuzz target `decode`: the incremental decoder against a deliberately simple reference.
///
/// Input layout: bytes 0–1 the payload limit (little-endian `u16`), byte 2 the largest chunk
/// (0 means 1), byte 3 a seed for the chunk sizes, the rest the stream. Checks: the same
/// payloads and the same error as `reference_decode` on the whole stream at once, and after
/// every round the decoder holds at most the limit plus one pending `0x1C`.
pub fn decode(data: &[u8]) {
    let (limit, max_chunk, mut seed, stream) = match data {
        [a, b, c, d, rest @ ..] => (u16::from_le_bytes([*a, *b]) as usize, (*c).max(1), *d, rest),
        _ => return,
    };
    let (expected, expected_err) = reference_decode(stream, limit);

    let mut decoder = FrameDecoder::new(limit);
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut err = None;
    let mut rest = stream;
    'feed: while !rest.is_empty() {
        // xorshift8: cheap, deterministic chunk sizes in 1..=max_chunk.
        seed ^= seed << 3;
        seed ^= seed >> 5;
        seed ^= seed << 1;
        let n = (seed % max_chunk).max(1) as usize;
        let (chunk, tail) = rest.split_at(n.min(rest.len()));
        rest = tail;
        buf.extend_from_slice(chunk);
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(p)) => frames.push(p),
                Ok(None) => {
                    assert!(
                        buf.len() <= limit + 1,
                        "holds {} > limit {limit} + 1",
                        buf.len()
                    );
                    break;
                }
                Err(e) => {
                    err = Some(e);
                    break 'feed;
                }
            }
        }
    }
    assert_eq!(frames.len(), expected.len().min(frames.len()));
    assert!(
        frames.iter().zip(&expected).all(|(a, b)| a[..] == b[..]),
        "payload mismatch"
    );
    match (err, expected_err) {
        (None, None) => assert_eq!(frames.len(), expected.len()),
        (Some(FrameError::TooLarge { limit: l, .. }), Some(_)) => {
            assert_eq!(l, limit);
            assert_eq!(frames.len(), expected.len());
        }
        (got, want) => panic!("error mismatch: got {got:?}, want {want:?}"),
    }
}

/// The obvious decoder, byte by byte over the whole stream: the spec of [`FrameDecoder`].
/// Returns the payloads and whether the stream overflowed the limit (after those payloads).
fn reference_decode(stream: &[u8], limit: usize) -> (Vec<Vec<u8>>, Option<usize>) {
    let mut frames = Vec::new();
    let mut current: Option<Vec<u8>> = None;
    for &b in stream {
        match current.as_mut() {
            None if b == START_BLOCK => current = Some(Vec::new()),
            None => {} // junk
            Some(p) => {
                if b == CARRIAGE_RETURN && p.last() == Some(&END_BLOCK) {
                    p.pop();
                    if p.len() > limit {
                        return (frames, Some(p.len()));
                    }
                    frames.extend(current.take());
                } else {
                    p.push(b);
                    // A trailing 0x1C may still be the terminator: not yet payload.
                    let known = p.len() - usize::from(b == END_BLOCK);
                    if known > limit {
                        return (frames, Some(known));
                    }
                }
            }
        }
    }
    (frames, None)
}

/// Fuzz target `ack`: see [`crate::ack`] and [`crate::msh`].
///
/// Reads `data` with [`Msh`] and calls every accessor, then builds an accept, a NAK and a fully
/// optioned ACK from it (the last byte picks the code and whether the text is `data` itself)
/// and checks that each one parses back: MSA-2 is the message's MSH-10 (empty and a reject code
/// when it has none), the separators are the message's, the text survives escaping, and no MLLP
/// block byte appears.
pub fn ack(data: &[u8]) {
    let msh = Msh::parse(data).ok();
    if let Some(msh) = &msh {
        exercise_msh(msh);
    }
    let encoding = msh.as_ref().map(Msh::encoding).unwrap_or_default();
    let control_id = msh.as_ref().and_then(Msh::control_id);

    // The last byte chooses, so that the whole input stays the message and a corpus file
    // can be a plain message.
    let selector = data.last().copied().unwrap_or(0);
    let code = AckCode::ALL[usize::from(selector % 6)];
    let lossy = String::from_utf8_lossy(data);
    let text: &str = if selector / 6 % 2 == 1 {
        &lossy
    } else {
        "handler failed"
    };

    let built = [
        (AckCode::AA, "", ack::accept(data)),
        (code, text, ack::nak(data, code, text)),
        (
            code,
            text,
            Ack::new(code)
                .text(text)
                .error(text, text, Severity::Warning)
                .control_id(text)
                .build(data),
        ),
    ];
    // The one-pass field scan reads what the `Msh` accessors read, and so builds the same ACK.
    let scanned = ack::Fields::scan(data);
    let reference = msh.as_ref().map(ack::Fields::from_msh);
    assert_eq!(
        scanned.map(|f| ack::Fields {
            block_bytes: false,
            ..f
        }),
        reference.map(|f| ack::Fields {
            block_bytes: false,
            ..f
        })
    );
    assert!(!scanned.is_some_and(|f| f.block_bytes) || reference.is_some_and(|f| f.block_bytes));
    let fixed = Ack::new(code)
        .text(text)
        .control_id("ID")
        .timestamp(std::time::UNIX_EPOCH);
    assert_eq!(&fixed.build(data)[..], &fixed.build_with_msh(data)[..]);
    for (asked, text, bytes) in &built {
        assert!(
            !bytes.contains(&START_BLOCK) && !bytes.contains(&END_BLOCK),
            "MLLP block byte in ACK"
        );
        let ack_msh = Msh::parse(bytes).expect("the ACK's MSH parses");
        assert_eq!(ack_msh.encoding(), encoding);
        let parsed = ack::parse(bytes).expect("the ACK parses");
        match control_id {
            Some(_) => {
                assert_eq!(parsed.code, *asked);
                assert_eq!(
                    Some(parsed.control_id),
                    ack::echoed_control_id(data).as_deref()
                );
            }
            None => {
                let reject = if matches!(asked, AckCode::CA | AckCode::CE | AckCode::CR) {
                    AckCode::CR
                } else {
                    AckCode::AR
                };
                assert_eq!(parsed.code, reject);
                assert!(parsed.control_id.is_empty());
            }
        }
        let round_trip = unescape(parsed.text.unwrap_or_default(), &encoding);
        assert_eq!(round_trip.as_deref(), Some(text.as_bytes()));
        assert_eq!(
            parsed.code.is_accept(),
            !bytes.windows(4).any(|w| w == b"\rERR")
        );
    }
}

/// Fuzz target `ack_memo`: an ACK built through a memo (`ack::memo`) that remembers
/// one message is the ACK built without one, byte for byte, for a second message that is the
/// first with a few bytes changed (the memo's hits, and its near misses).
///
/// Input layout: byte 0 the change (`% 32`: how many bytes go in; `/ 32 % 6`: the code;
/// `>= 192`: with a text), bytes 1–2 where the change starts (little-endian `u16`, modulo the
/// message's length plus one), byte 3 the byte that goes in, byte 4 how many bytes come out
/// (`% 32`), the rest the first message. The second is the first with bytes `at..at + out`
/// replaced by `in` copies of the byte: a replacement, an insertion or a deletion, which moves
/// MSH-7 and MSH-10 or breaks the MSH around them.
pub fn ack_memo(data: &[u8]) {
    let [change, at_lo, at_hi, byte, out, first @ ..] = data else {
        return;
    };
    let at = usize::from(u16::from_le_bytes([*at_lo, *at_hi])) % (first.len() + 1);
    let end = (at + usize::from(*out % 32)).min(first.len());
    let second = [
        &first[..at],
        &vec![*byte; usize::from(*change % 32)][..],
        &first[end..],
    ]
    .concat();
    let code = AckCode::ALL[usize::from(change / 32 % 6)];
    let text = if *change >= 192 { "a|b^c" } else { "" };
    // Another second and another id for the second message: the memo's MSH-7 follows.
    let ack_at = |secs: u64, id| {
        Ack::new(code)
            .text(text)
            .control_id(id)
            .timestamp(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
    };
    let (a, b) = (ack_at(1_767_268_800, "ID1"), ack_at(1_767_268_801, "ID2"));
    let mut memo = ack::Memo::new();
    for (ack, message) in [(a, first), (b, &second[..]), (a, first), (a, first)] {
        assert_eq!(
            ack.build_with_memo(message, &mut memo),
            ack.build_with_msh(message),
            "through the memo, {:?}",
            String::from_utf8_lossy(message)
        );
    }
}

/// Calls every [`Msh`] accessor and checks what each returns is consistent with the encoding.
fn exercise_msh(msh: &Msh<'_>) {
    let enc = msh.encoding();
    assert_eq!(msh.field_separator(), enc.field);
    assert_eq!(msh.field(1), Some(&[enc.field][..]));
    for n in 2..32 {
        let Some(field) = msh.field(n) else {
            assert!(
                msh.field(n + 1).is_none(),
                "MSH-{} after a missing MSH-{n}",
                n + 1
            );
            continue;
        };
        assert!(
            !field.contains(&enc.field)
                && !field.contains(&CARRIAGE_RETURN)
                && !field.contains(&b'\n')
        );
        for c in 0..4 {
            if let Some(component) = msh.component(n, c) {
                assert!(n <= 2 || !component.contains(&enc.component));
            }
        }
    }
    let _ = (
        msh.as_bytes(),
        msh.is_terminated(),
        msh.control_id(),
        msh.message_type(),
        msh.trigger_event(),
        msh.processing_id(),
        msh.version(),
        msh.charset(),
    );
}

/// Decodes the escape sequences the ACK builder writes; `None` on anything else. An oracle
/// written apart from the builder, for the fuzz target and the tests.
pub(crate) fn unescape(text: &[u8], enc: &Encoding) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len());
    let mut rest = text;
    while let Some((&b, tail)) = rest.split_first() {
        if b != enc.escape {
            out.push(b);
            rest = tail;
            continue;
        }
        let end = tail.iter().position(|&b| b == enc.escape)?;
        out.push(match &tail[..end] {
            b"F" => enc.field,
            b"S" => enc.component,
            b"R" => enc.repetition,
            b"E" => enc.escape,
            b"T" => enc.subcomponent,
            b"P" => enc.truncation?,
            b"X0D" => CARRIAGE_RETURN,
            b"X0A" => b'\n',
            b"X0B" => START_BLOCK,
            b"X1C" => END_BLOCK,
            _ => return None,
        });
        rest = &tail[end + 1..];
    }
    Some(out)
}

/// Fuzz target `connection`: drives the connection state machine with operations decoded from
/// the input, on a virtual clock, as the reactor would: after every operation it takes the
/// connection's events, then dispatches whatever the connection offers, taking the events
/// again after each dispatch (so a handler timeout is seen before the next call starts).
///
/// The first byte picks the limits: `max_message_size`, the NAK policy (`Send` or `Silent`)
/// and `max_in_flight` (1 or 4). Each operation is one byte (`op % 8`) plus its argument
/// bytes: read up to 64 bytes, advance time, complete a message (reply, no reply, close, reply
/// and close, error, expired, or defer the call's reply), write part of what is offered, end
/// of input, shutdown, write everything.
///
/// Checks:
/// - messages are dispatched with sequence numbers 0, 1, 2, …, never after `Closed`, at most
///   one handler call at a time and at most `max_in_flight` awaiting their outcome;
/// - every written frame answers a message, in sequence order, among those whose answer is
///   known: its reply (`R<seq>`, or a prefix of it while the write is cut short), its NAK (an
///   error's NAK carries `F<seq>`; a timeout's carries no marker but must come where that
///   message's answer goes), or the oversize NAK last;
/// - with `Silent`, no NAK is queued;
/// - no message gets two terminal events (stop or exception), and the message of every
///   answer written in full has had its terminal event;
/// - after `Closed`, the only event is a late result, and the connection says it is closed;
/// - the bytes buffered stay within `max(max_message_size, read_ahead)` plus one read.
pub fn connection(data: &[u8]) {
    use std::io::IoSlice;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use bytes::Bytes;

    use crate::connection::{Connection, Limits, NakPolicy, WallClock};
    use crate::outcome::{Outcome, Reply};
    use crate::reason::ExceptionReason;

    let Some((&flags, mut ops)) = data.split_first() else {
        return;
    };
    let silent = flags & 0x40 != 0;
    let limits = Arc::new(Limits {
        idle_timeout: Duration::from_secs(60),
        frame_timeout: Duration::from_secs(120),
        handler_timeout: Duration::from_secs(30),
        write_timeout: Duration::from_secs(20),
        handshake_timeout: Duration::from_secs(10),
        max_message_size: 16 + usize::from(flags & 0x3f) * 8,
        read_ahead: 256,
        max_in_flight: if flags & 0x80 == 0 { 1 } else { 4 },
        nak_policy: if silent {
            NakPolicy::Silent
        } else {
            NakPolicy::Send
        },
        expose_errors: true,
        wall_clock: WallClock::now(),
    });
    let mut now = Instant::now();
    let mut conn = Connection::new(Arc::clone(&limits), now);
    let mut out = Vec::new();
    let mut model = ConnectionModel {
        silent,
        ..ConnectionModel::default()
    };
    let mut written: Vec<u8> = Vec::new();
    while let Some((&op, rest)) = ops.split_first() {
        ops = rest;
        let arg = ops.first().copied().unwrap_or(0);
        match op % 8 {
            0 | 1 => {
                let n = usize::from(arg % 64).min(ops.len().saturating_sub(1));
                let bytes = ops.get(1..1 + n).unwrap_or(&[]);
                if conn.wants_read() {
                    conn.handle_read(bytes, now, &mut out);
                }
                ops = &ops[(1 + n).min(ops.len())..];
            }
            2 => {
                now += Duration::from_millis(u64::from(arg) * 500);
                conn.handle_timeout(now, &mut out);
                ops = ops.get(1..).unwrap_or(&[]);
            }
            3 => {
                // Complete the call in progress, or one of the deferred messages.
                let seq = match model.calling {
                    Some(seq) if arg & 1 == 0 || model.waiting.is_empty() => Some(seq),
                    _ => model
                        .waiting
                        .get(usize::from(arg >> 1) % model.waiting.len().max(1))
                        .copied(),
                };
                if let Some(seq) = seq {
                    let outcome = match (arg >> 4) % 8 {
                        0 => Outcome::Reply(Reply::Send(Bytes::from(format!("R{seq}")))),
                        1 => Outcome::Reply(Reply::NoReply),
                        2 => Outcome::Reply(Reply::Close),
                        3 => Outcome::Reply(Reply::SendAndClose(Bytes::from(format!("R{seq}")))),
                        4 => Outcome::Failed {
                            reason: ExceptionReason::HandlerError,
                            detail: format!("F{seq}"),
                        },
                        5 => Outcome::Expired,
                        _ if model.calling == Some(seq) => Outcome::Deferred,
                        _ => Outcome::Reply(Reply::Send(Bytes::from(format!("R{seq}")))),
                    };
                    if model.waiting.contains(&seq) && !matches!(outcome, Outcome::Deferred) {
                        let expect = match &outcome {
                            Outcome::Reply(Reply::Send(_) | Reply::SendAndClose(_)) => {
                                Expect::Reply
                            }
                            Outcome::Reply(_) => Expect::Nothing,
                            _ if silent => Expect::Nothing,
                            Outcome::Failed { .. } => Expect::Nak { marked: true },
                            _ => Expect::Nak { marked: false },
                        };
                        model.expected.insert(seq, expect);
                        model.waiting.retain(|s| *s != seq);
                    }
                    if model.calling == Some(seq) {
                        model.calling = None;
                    }
                    conn.handle_completion(seq, outcome, now, &mut out);
                }
                ops = ops.get(1..).unwrap_or(&[]);
            }
            4 | 7 => {
                let mut slices = [IoSlice::new(&[]); 12];
                let n = conn.transmit(&mut slices);
                let bytes: Vec<u8> = slices[..n].iter().flat_map(|s| s.iter().copied()).collect();
                let take = if op % 8 == 4 {
                    bytes.len().min(usize::from(arg) + 1)
                } else {
                    bytes.len()
                };
                written.extend_from_slice(&bytes[..take]);
                conn.handle_written(take, now, &mut out);
                if op % 8 == 4 {
                    ops = ops.get(1..).unwrap_or(&[]);
                }
            }
            5 => conn.handle_eof(&mut out),
            _ => conn.handle_shutdown(&mut out),
        }
        // The reactor applies the events, then dispatches whatever the connection offers.
        model.apply(out.drain(..));
        while let Some(d) = conn.poll_dispatch(now, &mut out) {
            assert!(d.payload.len() <= limits.max_message_size);
            model.dispatched(d.seq, limits.max_in_flight);
            model.apply(out.drain(..));
        }
        model.apply(out.drain(..));
        if conn.wants_shutdown_write() {
            conn.handle_write_shutdown();
        }
        model.check_written(&written);
        assert_eq!(model.closed, conn.is_closed());
        let bound = limits.max_message_size.max(limits.read_ahead) + 64 + 1;
        assert!(
            conn.buffered_len() <= bound,
            "buffers {} > {bound}",
            conn.buffered_len()
        );
    }
}

/// What a message's answer on the wire must be.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Expect {
    Reply,
    /// An error's NAK (carries `F<seq>`) or a timeout's (no marker).
    Nak {
        marked: bool,
    },
    Nothing,
}

/// What the `connection` fuzz target knows of the messages, from the calls it made and the
/// events it was given.
#[derive(Default)]
struct ConnectionModel {
    silent: bool,
    next_seq: u64,
    /// The message whose handler call is in progress.
    calling: Option<u64>,
    /// Dispatched messages not yet answered by a completion or timeout.
    waiting: Vec<u64>,
    /// The answer each answered message must get on the wire.
    expected: std::collections::BTreeMap<u64, Expect>,
    /// Terminal events (stop or exception) per message.
    terminal: std::collections::BTreeMap<u64, u32>,
    closed: bool,
    oversize: bool,
    oversize_nak: bool,
}

impl ConnectionModel {
    fn dispatched(&mut self, seq: u64, max_in_flight: usize) {
        assert!(!self.closed, "dispatch after close");
        assert_eq!(self.calling, None, "two handler calls at once");
        assert_eq!(seq, self.next_seq, "sequence numbers in order");
        self.next_seq += 1;
        self.calling = Some(seq);
        self.waiting.push(seq);
        assert!(self.waiting.len() <= max_in_flight, "too many in flight");
    }

    fn apply(&mut self, events: impl Iterator<Item = crate::connection::Event>) {
        use crate::connection::{Event, FrameRejection};
        use crate::reason::ExceptionReason;
        for event in events {
            // A completion may still arrive for a closed connection; nothing else may happen.
            assert!(
                !self.closed || matches!(event, Event::LateResult),
                "event after close: {event:?}"
            );
            // A message's one terminal event: its stop, or its exception (a timeout's too).
            let terminal = match &event {
                Event::MessageStop { seq, .. } => Some((*seq, false)),
                Event::MessageException(e) => e
                    .seq
                    .map(|seq| (seq, e.reason == ExceptionReason::HandlerTimeout)),
                _ => None,
            };
            if let Some((seq, timed_out)) = terminal {
                let count = self.terminal.entry(seq).or_default();
                *count += 1;
                assert_eq!(*count, 1, "two terminal events for message {seq}");
                if timed_out {
                    let expect = if self.silent {
                        Expect::Nothing
                    } else {
                        Expect::Nak { marked: false }
                    };
                    self.expected.insert(seq, expect);
                    self.waiting.retain(|s| *s != seq);
                    if self.calling == Some(seq) {
                        self.calling = None; // abandoned
                    }
                }
            }
            match event {
                Event::FrameRejected(FrameRejection::TooLarge) => self.oversize = true,
                Event::NakQueued(_) => {
                    assert!(!self.silent, "a NAK under the Silent policy");
                    self.oversize_nak |= self.oversize;
                }
                Event::Closed => self.closed = true,
                _ => {}
            }
        }
    }

    /// Written frames answer, in order, the messages whose answers are known.
    fn check_written(&self, written: &[u8]) {
        let mut frames = written.split(|b| *b == 0x0b).skip(1).peekable();
        let mut answers = self.expected.iter().filter(|(_, e)| **e != Expect::Nothing);
        while let Some(frame) = frames.next() {
            let complete = frame.ends_with(b"\x1c\x0d");
            // A write may stop anywhere, between the 0x1C and the 0x0D too.
            let body = frame.strip_suffix(b"\x1c\x0d").unwrap_or(frame);
            let body = body.strip_suffix(b"\x1c").unwrap_or(body);
            match answers.next() {
                Some((seq, expect)) => {
                    match expect {
                        Expect::Reply => {
                            let want = format!("R{seq}");
                            assert!(
                                want.as_bytes().starts_with(body),
                                "frame {body:?} is not message {seq}'s reply"
                            );
                        }
                        Expect::Nak { marked } => {
                            if complete && *marked {
                                let mark = format!("F{seq}");
                                assert!(
                                    body.windows(mark.len()).any(|w| w == mark.as_bytes()),
                                    "NAK for message {seq} lacks its marker"
                                );
                            }
                        }
                        Expect::Nothing => unreachable!("filtered"),
                    }
                    if complete {
                        assert_eq!(
                            self.terminal.get(seq),
                            Some(&1),
                            "message {seq}'s answer is written but it has no terminal event"
                        );
                    }
                }
                None => assert!(
                    self.oversize_nak && frames.peek().is_none(),
                    "a frame that answers no message"
                ),
            }
        }
    }
}
