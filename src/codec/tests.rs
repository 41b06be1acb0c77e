//! Codec tests: one per row of the framing table in the module docs, every input split at every
//! index and byte by byte (httparse-style), and property tests.

use super::*;
use proptest::prelude::*;

const LIMIT: usize = 1024;

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = BytesMut::new();
    encode_frame(payload, &mut out);
    out.to_vec()
}

/// Decodes `input` delivered in the given chunks; returns the payloads, the error if any, the
/// junk count and the largest buffer held after a `decode` call asked for more bytes.
fn decode_chunks<'a>(
    chunks: impl IntoIterator<Item = &'a [u8]>,
    limit: usize,
) -> (Vec<Vec<u8>>, Option<FrameError>, u64, usize) {
    let mut decoder = FrameDecoder::new(limit);
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut held = 0;
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(p)) => frames.push(p.to_vec()),
                Ok(None) => break,
                Err(e) => return (frames, Some(e), decoder.junk_bytes(), held),
            }
        }
        held = held.max(buf.len());
    }
    (frames, None, decoder.junk_bytes(), held)
}

/// Asserts that every split of `input` into two parts, and byte-by-byte delivery, decode to
/// `expected` frames with `expected_junk` junk and no error.
#[track_caller]
fn assert_all_splits(input: &[u8], expected: &[&[u8]], expected_junk: u64) {
    let expected: Vec<Vec<u8>> = expected.iter().map(|p| p.to_vec()).collect();
    for at in 0..=input.len() {
        let (a, b) = input.split_at(at);
        let (frames, err, junk, _) = decode_chunks([a, b], LIMIT);
        assert_eq!(err, None, "split at {at}");
        assert_eq!(frames, expected, "split at {at}");
        assert_eq!(junk, expected_junk, "split at {at}");
    }
    let (frames, err, junk, _) = decode_chunks(input.chunks(1), LIMIT);
    assert_eq!(
        (frames, err, junk),
        (expected, None, expected_junk),
        "byte by byte"
    );
}

#[test]
fn one_frame() {
    assert_all_splits(&frame(b"MSH|^~\\&|X\rPID|1"), &[b"MSH|^~\\&|X\rPID|1"], 0);
}

#[test]
fn several_frames_in_one_read_in_order() {
    let mut input = frame(b"one");
    input.extend(frame(b"two"));
    input.extend(frame(b"three"));
    assert_all_splits(&input, &[b"one", b"two", b"three"], 0);
}

#[test]
fn two_frames() {
    let mut input = frame(b"A");
    input.extend(frame(b"B"));
    assert_all_splits(&input, &[b"A", b"B"], 0);
}

#[test]
fn partial_frame_waits_for_more() {
    let mut decoder = FrameDecoder::new(LIMIT);
    let mut buf = BytesMut::from(&b"\x0bMSH|partial"[..]);
    assert_eq!(decoder.decode(&mut buf), Ok(None));
    assert!(decoder.in_frame());
    assert_eq!(decoder.partial_frame(&buf), b"MSH|partial");
    buf.extend_from_slice(b" end\x1c\x0d");
    assert_eq!(
        decoder.decode(&mut buf).unwrap().unwrap(),
        &b"MSH|partial end"[..]
    );
    assert!(!decoder.in_frame());
    assert!(buf.is_empty());
}

#[test]
fn junk_before_start_block_is_dropped_and_counted() {
    let mut input = b"garbage\r\n".to_vec();
    input.extend(frame(b"msg"));
    assert_all_splits(&input, &[b"msg"], 9);
}

#[test]
fn junk_between_frames_is_dropped_and_counted() {
    let mut input = frame(b"a");
    input.extend(b"\r\nxx");
    input.extend(frame(b"b"));
    input.extend(b"tail");
    assert_all_splits(&input, &[b"a", b"b"], 8);
}

#[test]
fn junk_is_never_retained() {
    let mut decoder = FrameDecoder::new(LIMIT);
    let mut buf = BytesMut::from(&[b'x'; 5000][..]);
    assert_eq!(decoder.decode(&mut buf), Ok(None));
    assert!(buf.is_empty(), "junk must not occupy the buffer");
    assert_eq!(decoder.junk_bytes(), 5000);
}

#[test]
fn start_block_inside_a_frame_is_payload() {
    assert_all_splits(&frame(b"a\x0bb\x0b"), &[b"a\x0bb\x0b"], 0);
}

#[test]
fn end_block_without_cr_is_payload() {
    // Strict MLLP: 0x1C must be followed by 0x0D to terminate.
    assert_all_splits(b"\x0bab\x1cX\x1c\x1c\x1c\x0d", &[b"ab\x1cX\x1c\x1c"], 0);
}

#[test]
fn end_block_cr_split_across_reads() {
    let (frames, err, _, _) = decode_chunks([&b"\x0babc\x1c"[..], b"\x0d"], LIMIT);
    assert_eq!((frames, err), (vec![b"abc".to_vec()], None));
    // ...and a 0x1C at the end of a read that turns out not to be the terminator.
    let (frames, err, _, _) = decode_chunks([&b"\x0babc\x1c"[..], b"d\x1c\x0d"], LIMIT);
    assert_eq!((frames, err), (vec![b"abc\x1cd".to_vec()], None));
}

#[test]
fn empty_frame() {
    assert_all_splits(b"\x0b\x1c\x0d", &[b""], 0);
}

#[test]
fn lone_trailer_without_start_block_is_junk() {
    let mut input = b"\x1c\x0d".to_vec();
    input.extend(frame(b"m"));
    assert_all_splits(&input, &[b"m"], 2);
}

#[test]
fn binary_payload_bytes_pass_through() {
    // Every byte value except the 0x1C 0x0D pair (which would end the frame).
    let payload: Vec<u8> = (0..=255u8).collect();
    let input = frame(&payload);
    assert_all_splits(&input, &[&payload], 0);
}

#[test]
fn round_trip_encode_decode() {
    for payload in [&b""[..], b"x", b"MSH|^~\\&|APP|FAC\rEVN|A01", &[0u8; 300]] {
        let (frames, err, junk, _) = decode_chunks([frame(payload).as_slice()], LIMIT);
        assert_eq!((frames, err, junk), (vec![payload.to_vec()], None, 0));
    }
}

#[test]
fn payload_of_exactly_the_limit_passes() {
    let payload = vec![b'a'; LIMIT];
    assert_all_splits(&frame(&payload), &[&payload], 0);
}

#[test]
fn payload_one_over_the_limit_fails_whatever_the_chunking() {
    let input = frame(&vec![b'a'; LIMIT + 1]);
    for at in 0..=input.len() {
        let (a, b) = input.split_at(at);
        let (frames, err, _, _) = decode_chunks([a, b], LIMIT);
        assert!(frames.is_empty());
        assert!(
            matches!(err, Some(FrameError::TooLarge { limit: LIMIT, received }) if received > LIMIT),
            "split at {at}: {err:?}"
        );
    }
}

#[test]
fn limit_excess_is_seen_before_the_frame_ends() {
    let mut decoder = FrameDecoder::new(10);
    let mut buf = BytesMut::from(&b"\x0bMSH|^~\\&|0123"[..]); // 13 payload bytes, no end yet
    let err = decoder.decode(&mut buf).unwrap_err();
    assert_eq!(
        err,
        FrameError::TooLarge {
            limit: 10,
            received: 13
        }
    );
    assert_eq!(decoder.partial_frame(&buf), b"MSH|^~\\&|0123");
    // Sticky: the stream cannot be resynchronised.
    buf.extend_from_slice(b"\x1c\x0d\x0bok\x1c\x0d");
    assert_eq!(decoder.decode(&mut buf), Err(err));
}

#[test]
fn a_whole_frame_over_the_limit_leaves_its_payload_for_the_nak() {
    // The frame arrives whole at the buffer's front (the decoder's fast path).
    let mut decoder = FrameDecoder::new(10);
    let mut buf = BytesMut::from(&b"\x0bMSH|^~\\&|0123\x1c\x0d\x0bok\x1c\x0d"[..]);
    let err = decoder.decode(&mut buf).unwrap_err();
    assert_eq!(
        err,
        FrameError::TooLarge {
            limit: 10,
            received: 13
        }
    );
    assert!(decoder.in_frame());
    assert_eq!(&decoder.partial_frame(&buf)[..13], b"MSH|^~\\&|0123");
    assert_eq!(decoder.decode(&mut buf), Err(err));
}

#[test]
fn a_payload_split_off_the_front_is_only_the_payload() {
    let mut decoder = FrameDecoder::new(LIMIT);
    let mut buf = BytesMut::from(&b"\x0bone\x1c\x0d\x0btwo\x1c"[..]);
    let one = decoder.decode(&mut buf).unwrap().unwrap();
    assert_eq!((&one[..], one.len()), (&b"one"[..], 3));
    // The next frame is incomplete: its start block is gone, its payload and 0x1C remain.
    assert_eq!(decoder.decode(&mut buf), Ok(None));
    assert_eq!(&buf[..], b"two\x1c");
    buf.extend_from_slice(b"\x0d");
    assert_eq!(decoder.decode(&mut buf).unwrap().unwrap(), &b"two"[..]);
    assert!(buf.is_empty() && !decoder.in_frame());
    assert_eq!(
        &one[..],
        b"one",
        "the first payload is untouched by the second split"
    );
}

#[test]
fn pending_end_block_does_not_count_toward_the_limit() {
    // 10 payload bytes and a 0x1C that may be the terminator: not over a limit of 10.
    let mut decoder = FrameDecoder::new(10);
    let mut buf = BytesMut::from(&b"\x0b0123456789\x1c"[..]);
    assert_eq!(decoder.decode(&mut buf), Ok(None));
    buf.extend_from_slice(b"\x0d");
    assert_eq!(
        decoder.decode(&mut buf).unwrap().unwrap(),
        &b"0123456789"[..]
    );
}

#[test]
fn complete_frames_in_one_read_are_not_counted_against_each_other() {
    // The limit applies to each frame alone, not to everything one read delivered.
    let mut input = Vec::new();
    for _ in 0..100 {
        input.extend(frame(&[b'x'; 100]));
    }
    let (frames, err, _, _) = decode_chunks([input.as_slice()], 100);
    assert_eq!((frames.len(), err), (100, None));
}

#[test]
fn large_frame_in_small_reads_is_linear() {
    // A 1 MiB frame in 1-byte... 64-byte reads: each decode call scans only new bytes, so the
    // decoder's cumulative position never exceeds the payload length.
    let payload = vec![b'p'; 1 << 20];
    let input = frame(&payload);
    let mut decoder = FrameDecoder::new(DEFAULT_MAX_MESSAGE_SIZE);
    let mut buf = BytesMut::new();
    let mut out = None;
    for chunk in input.chunks(64) {
        buf.extend_from_slice(chunk);
        if let Some(p) = decoder.decode(&mut buf).unwrap() {
            out = Some(p);
        }
        assert!(decoder.scanned <= buf.len());
    }
    assert_eq!(out.unwrap().len(), payload.len());
}

#[test]
fn decoded_payload_shares_the_buffer() {
    let mut buf = BytesMut::from(&frame(b"zero-copy")[..]);
    let base = buf.as_ptr() as usize;
    let payload = FrameDecoder::new(LIMIT).decode(&mut buf).unwrap().unwrap();
    assert_eq!(
        payload.as_ptr() as usize,
        base + 1,
        "payload must be split, not copied"
    );
}

#[test]
fn encoded_frame_writes_every_byte_whatever_the_partial_writes() {
    let payload = Bytes::from_static(b"MSA|AA|42");
    let expected = frame(&payload);
    for step in 1..=expected.len() {
        let mut f = EncodedFrame::new(payload.clone());
        let mut written = Vec::new();
        while !f.is_done() {
            let mut slices = [IoSlice::new(&[]); 3];
            let n = f.io_slices(&mut slices);
            let all: Vec<u8> = slices[..n].iter().flat_map(|s| s.iter().copied()).collect();
            let take = step.min(all.len());
            written.extend_from_slice(&all[..take]);
            f.advance(take);
        }
        assert_eq!(written, expected, "step {step}");
    }
    let mut f = EncodedFrame::new(payload);
    f.advance(usize::MAX);
    assert!(f.is_done());
}

#[test]
fn encoded_empty_frame() {
    let f = EncodedFrame::new(Bytes::new());
    let mut slices = [IoSlice::new(&[]); 3];
    let n = f.io_slices(&mut slices);
    let all: Vec<u8> = slices[..n].iter().flat_map(|s| s.iter().copied()).collect();
    assert_eq!(all, b"\x0b\x1c\x0d");
}

#[test]
fn error_display_is_lowercase_without_period() {
    let s = FrameError::TooLarge {
        limit: 3,
        received: 4,
    }
    .to_string();
    assert!(s.starts_with("frame payload"));
    assert!(!s.ends_with('.'));
}

/// A payload that cannot contain the terminator pair.
fn payload() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..300).prop_map(|mut v| {
        for i in 1..v.len() {
            if v[i - 1] == END_BLOCK && v[i] == CARRIAGE_RETURN {
                v[i] = b'x';
            }
        }
        // A trailing 0x1C is fine: "…1C 1C 0D" ends at the only 1C 0D pair.
        v
    })
}

/// Junk between frames: anything without a start block.
fn junk() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(
        any::<u8>().prop_filter("no SB", |b| *b != START_BLOCK),
        0..20,
    )
}

proptest! {
    #[test]
    fn any_chunking_yields_exactly_the_payloads(
        items in proptest::collection::vec((junk(), payload()), 0..12),
        cuts in proptest::collection::vec(1usize..200, 0..60),
    ) {
        let mut input = Vec::new();
        let mut junk_total = 0u64;
        for (j, p) in &items {
            input.extend_from_slice(j);
            junk_total += j.len() as u64;
            input.extend(frame(p));
        }
        let mut chunks = Vec::new();
        let mut rest = input.as_slice();
        for c in cuts.iter().cycle().take(input.len()) {
            if rest.is_empty() { break; }
            let (a, b) = rest.split_at((*c).min(rest.len()));
            chunks.push(a);
            rest = b;
        }
        if !rest.is_empty() { chunks.push(rest); }
        let (frames, err, junk, held) = decode_chunks(chunks.iter().copied(), LIMIT);
        let expected: Vec<Vec<u8>> = items.iter().map(|(_, p)| p.clone()).collect();
        prop_assert_eq!(err, None);
        prop_assert_eq!(frames, expected);
        prop_assert_eq!(junk, junk_total);
        // After each decode round only a partial payload (+ a pending 0x1C) is held.
        prop_assert!(held <= LIMIT + 1);
    }

    #[test]
    fn memory_never_exceeds_limit_plus_one_chunk(
        data in proptest::collection::vec(any::<u8>(), 0..4000),
        chunk in 1usize..300,
        limit in 0usize..500,
    ) {
        let mut decoder = FrameDecoder::new(limit);
        let mut buf = BytesMut::new();
        'outer: for c in data.chunks(chunk) {
            buf.extend_from_slice(c);
            prop_assert!(buf.len() <= limit + 1 + chunk);
            loop {
                match decoder.decode(&mut buf) {
                    Ok(Some(p)) => prop_assert!(p.len() <= limit),
                    Ok(None) => { prop_assert!(buf.len() <= limit + 1); break }
                    Err(_) => break 'outer,
                }
            }
        }
    }

    #[test]
    fn fuzz_entry_accepts_anything(data in proptest::collection::vec(any::<u8>(), 0..2000)) {
        crate::__fuzz::decode(&data);
    }
}

#[test]
fn fuzz_entry_hand_picked_inputs() {
    for input in [
        &b""[..],
        b"\x00\x00\x00\x00",
        b"\x00\x10\x03\x05\x0bMSH|a\x1c\x0d\x0b\x1c\x0d",
        b"\x00\x02\x01\x01\x0baaaaaaaa\x1c\x0d",
        b"\xff\xff\xff\xff\x1c\x0d\x0b\x1c\x1c\x0d\x0b",
    ] {
        crate::__fuzz::decode(input);
    }
}

/// `EncodedFrame` after a partial write offers the rest: payload tail and trailer.
#[test]
fn encoded_frame_after_a_partial_write() {
    let mut frame = EncodedFrame::new(Bytes::from_static(b"MSA|AA|1"));
    assert_eq!(frame.remaining(), 11);
    frame.advance(4); // a partial write took the start block and 3 payload bytes
    let mut slices = [std::io::IoSlice::new(&[]); 3];
    let n = frame.io_slices(&mut slices);
    let bytes: Vec<u8> = slices[..n].iter().flat_map(|s| s.iter().copied()).collect();
    assert_eq!(bytes, b"|AA|1\x1c\x0d");
}
