//! Fuzz entry points. Each `fuzz/fuzz_targets/*.rs` is one line calling a function here, so
//! `cargo test` can replay the corpus through exactly the code the fuzzer runs.

use bytes::BytesMut;

use crate::codec::{CARRIAGE_RETURN, END_BLOCK, FrameDecoder, FrameError, START_BLOCK};

/// Fuzz target `decode`: the incremental decoder against a deliberately simple reference.
///
/// Input layout: bytes 0–1 the payload limit (little-endian `u16`), byte 2 the largest chunk
/// (0 means 1), byte 3 a seed for the chunk sizes, the rest the stream. Checks: the same
/// payloads and the same error as [`reference_decode`] on the whole stream at once, and after
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

/// Fuzz target `ack`: see [`crate::ack`].
pub fn ack(data: &[u8]) {
    let _ = data;
}
