//! Decode throughput of the MLLP frame codec, against a `memchr::memmem` search for the
//! terminator over the same bytes, in the same chunks, in the same group (the floor any
//! deframer fed those chunks must pay).
//!
//! Run: `cargo bench --bench frame`. Results and ratios: BENCHMARKS.md.
//!
//! One group per input and chunk size (`frame/<input>/<chunk>`), each with three functions:
//! - `decode`: chunks arrive by `BytesMut::unsplit` of contiguous pieces (no copy), so only
//!   the decoder's own work is timed;
//! - `decode+copy`: each chunk is copied into the buffer first, as a socket read into a
//!   connection buffer would;
//! - `memmem`: `memchr::memmem::find_iter(b"\x1c\x0d")` over each chunk as it would arrive
//!   (starting one byte back, so a terminator split across two chunks is found once),
//!   counting matches. Measured at every chunk size, next to the decoder it is the baseline
//!   of, so each ratio compares two measurements of the same run.

// criterion_group! generates undocumented public functions.
#![allow(missing_docs)]

use bytes::BytesMut;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use mllp_reactor::codec::{DEFAULT_MAX_MESSAGE_SIZE, FrameDecoder, encode_frame};
use std::hint::black_box;

/// One TCP segment on a 1500-byte MTU link.
const SEGMENT: usize = 1460;
const LARGE_READ: usize = 64 * 1024;

fn framed(payload_len: usize, count: usize) -> Vec<u8> {
    // HL7-like bytes: segments of printable text ending in CR, no 0x1C.
    let line = b"OBX|1|ED|PDF^Report||JVBERi0xLjQKJcfsj6IKNSAwIG9iago8PC9MZW5ndGggNiAwIFI+Pg==\r";
    let payload: Vec<u8> = line.iter().copied().cycle().take(payload_len).collect();
    let mut out = BytesMut::new();
    for _ in 0..count {
        encode_frame(&payload, &mut out);
    }
    out.to_vec()
}

/// Splits `input` into contiguous `BytesMut` pieces of one allocation, so that `unsplit`
/// reassembles them in O(1).
fn pieces(input: &[u8], chunk: usize) -> Vec<BytesMut> {
    let mut all = BytesMut::from(input);
    let mut out = Vec::with_capacity(input.len() / chunk + 1);
    while !all.is_empty() {
        out.push(all.split_to(chunk.min(all.len())));
    }
    out
}

fn decode_pieces(pieces: &mut Vec<BytesMut>) -> usize {
    let mut decoder = FrameDecoder::new(DEFAULT_MAX_MESSAGE_SIZE);
    let mut buf = BytesMut::new();
    let mut frames = 0;
    for piece in pieces.drain(..) {
        buf.unsplit(piece);
        while let Some(frame) = decoder.decode(&mut buf).expect("within the limit") {
            black_box(&frame);
            frames += 1;
        }
    }
    frames
}

fn decode_copying(input: &[u8], chunk: usize) -> usize {
    let mut decoder = FrameDecoder::new(DEFAULT_MAX_MESSAGE_SIZE);
    let mut buf = BytesMut::new();
    let mut frames = 0;
    for piece in input.chunks(chunk) {
        buf.extend_from_slice(piece);
        while let Some(frame) = decoder.decode(&mut buf).expect("within the limit") {
            black_box(&frame);
            frames += 1;
        }
    }
    frames
}

/// The floor at this chunk size: `memmem` over each chunk as it arrives, from one byte before
/// it so that a `1C 0D` split across two chunks is found, and found once (a match at `p` is
/// counted in the window that holds `p + 1`).
fn memmem_chunked(finder: &memchr::memmem::Finder<'_>, input: &[u8], chunk: usize) -> usize {
    let mut found = 0;
    let mut start = 0;
    while start < input.len() {
        let end = (start + chunk).min(input.len());
        found += finder
            .find_iter(&input[start.saturating_sub(1)..end])
            .count();
        start = end;
    }
    found
}

/// One group: the decoder, with and without the copy, and its `memmem` floor, all over
/// `input` in `chunk`-byte pieces.
fn bench_group(c: &mut Criterion, input_name: &str, input: &[u8], chunk: usize, frames: usize) {
    let finder = memchr::memmem::Finder::new(b"\x1c\x0d");
    let chunk_name = if chunk == input.len() {
        "whole".to_owned()
    } else {
        chunk.to_string()
    };
    let mut group = c.benchmark_group(format!("{input_name}/{chunk_name}"));
    group.throughput(Throughput::Bytes(input.len() as u64));
    if input.len() > 1 << 20 {
        group.sample_size(20);
    }
    group.bench_function("decode", |b| {
        b.iter_batched_ref(
            || pieces(input, chunk),
            |p| assert_eq!(decode_pieces(p), frames),
            BatchSize::LargeInput,
        )
    });
    group.bench_function("decode+copy", |b| {
        b.iter(|| assert_eq!(decode_copying(black_box(input), chunk), frames))
    });
    group.bench_function("memmem", |b| {
        b.iter(|| assert_eq!(memmem_chunked(&finder, black_box(input), chunk), frames))
    });
    group.finish();
}

fn frames(c: &mut Criterion) {
    for (label, size) in [
        ("1KiB", 1024),
        ("64KiB", 64 << 10),
        ("1MiB", 1 << 20),
        ("10MiB", 10 << 20),
    ] {
        let input = framed(size, 1);
        for chunk in [SEGMENT, LARGE_READ] {
            bench_group(c, &format!("frame/{label}"), &input, chunk, 1);
        }
    }
    // Many small frames in one buffer: the per-frame overhead of the decoder.
    let batch = framed(1024, 1000);
    bench_group(c, "batch/1000x1KiB", &batch, batch.len(), 1000);
}

criterion_group!(benches, frames);
criterion_main!(benches);
