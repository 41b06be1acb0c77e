//! Sans-IO MLLP framing: an incremental [`FrameDecoder`] and [`encode_frame`] (the server
//! writes replies zero-copy, framing bytes and payload as separate slices).
//!
//! A frame is `0x0B` (start block) + payload + `0x1C 0x0D` (end block, carriage return). The
//! payload is opaque: any byte may appear in it, including `0x0B`, `0x00` and `0x80..=0xFF`
//! (see `docs/behaviour.md`, "Framing"). This module knows nothing of sockets: the caller appends whatever bytes it
//! received to a [`BytesMut`] it owns and asks the decoder for complete payloads.
//!
//! # Rules
//!
//! | Input | Result |
//! |---|---|
//! | several frames in one buffer | all of them, in order, one per [`FrameDecoder::decode`] call |
//! | a partial frame | `Ok(None)`; completed by later bytes; scanned bytes are never rescanned |
//! | bytes before `0x0B` or between frames | dropped as they are scanned, counted in [`FrameDecoder::junk_bytes`] |
//! | `0x0B` inside a frame | a payload byte |
//! | `0x1C` not followed by `0x0D` | payload bytes; the frame runs on (strict MLLP) |
//! | `0B 1C 0D` | an empty payload |
//! | `1C 0D` without a start block | junk |
//! | payload longer than the limit | [`FrameError::TooLarge`] as soon as the excess is seen |
//!
//! # Memory
//!
//! The decoder stores offsets, never bytes. After [`FrameDecoder::decode`] returns `Ok(None)` the
//! buffer holds only the payload of the frame being assembled (at most `max_payload` bytes, plus
//! one `0x1C` that may turn out to be the terminator): junk and complete frames are gone from it.
//! So a caller that appends one read and then decodes never holds more than the limit plus one
//! read.
//!
//! # Example
//!
//! ```
//! use bytes::BytesMut;
//! use mllp_reactor::codec::{FrameDecoder, encode_frame};
//!
//! let mut wire = BytesMut::new();
//! encode_frame(b"MSH|^~\\&|A", &mut wire);
//! encode_frame(b"MSH|^~\\&|B", &mut wire);
//!
//! // Feed it in two arbitrary pieces, as TCP might deliver it.
//! let (first, second) = wire.split_at(7);
//! let mut decoder = FrameDecoder::new(1024);
//! let mut buf = BytesMut::from(first);
//! assert_eq!(decoder.decode(&mut buf)?, None);
//! buf.extend_from_slice(second);
//! assert_eq!(&decoder.decode(&mut buf)?.unwrap()[..], b"MSH|^~\\&|A");
//! assert_eq!(&decoder.decode(&mut buf)?.unwrap()[..], b"MSH|^~\\&|B");
//! assert_eq!(decoder.decode(&mut buf)?, None);
//! # Ok::<(), mllp_reactor::codec::FrameError>(())
//! ```

use std::fmt;
use std::io::IoSlice;

use bytes::{Buf, Bytes, BytesMut};

/// Start block: the byte that opens a frame.
pub const START_BLOCK: u8 = 0x0B;
/// End block: the first of the two bytes that close a frame.
pub const END_BLOCK: u8 = 0x1C;
/// Carriage return: the second of the two bytes that close a frame.
pub const CARRIAGE_RETURN: u8 = 0x0D;
/// The bytes that close a frame.
pub const TRAILER: [u8; 2] = [END_BLOCK, CARRIAGE_RETURN];
/// Bytes a frame adds around its payload (`0x0B` before, `0x1C 0x0D` after).
pub const FRAMING_OVERHEAD: usize = 3;

/// Default payload limit: 10 MiB, a common default among MLLP receivers. HL7 v2 messages are typically under 64 KiB; 10 MiB leaves room for embedded documents
/// (base64 PDFs in OBX-5) while bounding what one peer can make us hold.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 10_485_760;

/// Where the decoder is in the byte stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ScanState {
    /// Outside a frame: every byte up to the next `0x0B` is junk.
    SeekingStart,
    /// After a `0x0B`: the buffer starts with this frame's payload.
    InFrame,
    /// In a frame whose last scanned byte, at `scanned - 1`, is a `0x1C` that may be the
    /// terminator: the next byte decides.
    SawEndBlock,
    /// The payload exceeded the limit; the decoder answers with the same error from now on.
    /// `scanned` then holds the payload bytes seen when the limit was exceeded (kept there,
    /// not in the variant, so the state stays one byte).
    Overflowed,
}

/// Incremental MLLP deframer. Holds scan state only; the caller owns the bytes.
///
/// Call [`decode`](Self::decode) after appending newly received bytes to the buffer, and keep
/// calling it until it returns `Ok(None)` (more bytes needed). Bytes already scanned are never
/// scanned again, so the total work is linear in the bytes received whatever their chunking.
#[derive(Debug)]
pub struct FrameDecoder {
    max_payload: usize,
    state: ScanState,
    /// Bytes at the front of the caller's buffer already examined (all of them payload of the
    /// current frame, the last possibly a pending `0x1C`).
    /// INVARIANT: in `InFrame`/`SawEndBlock`, `scanned <= buf.len()` of the buffer last passed
    /// in; in `SeekingStart` it is 0; in `Overflowed` it is the payload size that overflowed.
    scanned: usize,
    /// Bytes dropped outside frames since the decoder was created.
    junk: u64,
}

/// The codec's one error: a peer sent more than the payload limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    /// The payload of the frame being assembled exceeded `limit` bytes.
    TooLarge {
        /// The configured payload limit.
        limit: usize,
        /// Payload bytes received when the excess was seen (more than `limit`).
        received: usize,
    },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLarge { limit, received } => {
                write!(
                    f,
                    "frame payload of at least {received} bytes exceeds the limit of {limit} bytes"
                )
            }
        }
    }
}

impl std::error::Error for FrameError {}

impl FrameDecoder {
    /// Creates a decoder that accepts payloads of at most `max_payload` bytes.
    pub fn new(max_payload: usize) -> Self {
        Self {
            max_payload,
            state: ScanState::SeekingStart,
            scanned: 0,
            junk: 0,
        }
    }

    /// The payload limit this decoder enforces.
    pub fn max_payload(&self) -> usize {
        self.max_payload
    }

    /// Scans the bytes of `buf` not yet scanned and returns the next complete payload, split
    /// off the front of `buf` without copying.
    ///
    /// Returns `Ok(None)` when more bytes are needed; by then junk has been removed from `buf`
    /// and it holds only the partial frame's payload.
    ///
    /// # Errors
    ///
    /// [`FrameError::TooLarge`] as soon as the current frame's payload exceeds the limit. The
    /// partial payload stays in `buf` (see [`partial_frame`](Self::partial_frame)) and every
    /// later call returns the same error: the stream cannot be resynchronised safely, so the
    /// caller should close the connection.
    #[inline]
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
        // A frame at the front of the buffer (every frame of a peer that sends no junk) is
        // scanned with its start block still in place, and, when it is complete, split off
        // with it in one step (callgrind, S1: a `memchr` call and a `BytesMut::advance` less
        // per message, and no call of the general loop).
        if self.state == ScanState::SeekingStart && buf.first() == Some(&START_BLOCK) {
            return self.decode_front(buf);
        }
        self.decode_scan(buf)
    }

    /// [`decode`](Self::decode) in every other case: junk, a frame under way, an overflow.
    fn decode_scan(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
        loop {
            match self.state {
                ScanState::Overflowed => {
                    return Err(FrameError::TooLarge {
                        limit: self.max_payload,
                        received: self.scanned,
                    });
                }
                // Between frames with nothing buffered (after every message of a peer that
                // waits for its answer): no search to start.
                ScanState::SeekingStart if buf.is_empty() => return Ok(None),
                ScanState::SeekingStart => match memchr::memchr(START_BLOCK, buf) {
                    Some(at) => {
                        // `at` junk bytes, then the start block: drop both.
                        self.junk += at as u64;
                        buf.advance(at + 1);
                        self.state = ScanState::InFrame;
                        self.scanned = 0;
                    }
                    None => {
                        self.junk += buf.len() as u64;
                        buf.clear();
                        return Ok(None);
                    }
                },
                ScanState::SawEndBlock => {
                    // The previous call ended on a 0x1C at `scanned - 1`.
                    let Some(&next) = buf.get(self.scanned) else {
                        return Ok(None);
                    };
                    if next == CARRIAGE_RETURN {
                        return self.complete(buf, self.scanned - 1).map(Some);
                    }
                    // Not a terminator: that 0x1C was payload; go on from `next`.
                    self.state = ScanState::InFrame;
                }
                ScanState::InFrame => {
                    // Buffer layout while in a frame (start block already dropped):
                    //
                    //   [ payload scanned ........ | new bytes ......... ]
                    //   0                       scanned               len
                    return match find_end(buf, self.scanned) {
                        End::Complete(at) => self.complete(buf, at).map(Some),
                        End::Pending(at) => self.pend(at),
                        End::Missing => {
                            self.scanned = buf.len();
                            self.check_partial(buf.len())
                        }
                    };
                }
            }
        }
    }

    /// [`decode`](Self::decode) between frames with a start block at `buf[0]`.
    fn decode_front(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
        //   [ 0x0B | payload ........ 0x1C 0x0D | next frames ... ]
        //   0      1               at
        let end = find_end(buf, 1);
        if let End::Complete(at) = end
            && at - 1 <= self.max_payload
        {
            // The frame, start block and trailer included, in one split; then its payload.
            let mut frame = buf.split_to(at + TRAILER.len()).freeze();
            frame.advance(1);
            frame.truncate(at - 1);
            return Ok(Some(frame));
        }
        // Incomplete (or too large): as if the start block had been dropped alone.
        buf.advance(1);
        self.state = ScanState::InFrame;
        match end {
            End::Complete(at) => Err(self.overflow(at - 1)),
            End::Pending(at) => self.pend(at - 1),
            End::Missing => {
                self.scanned = buf.len();
                self.check_partial(buf.len())
            }
        }
    }

    /// A `0x1C` at `buf[at]` ends the buffer: the next byte decides.
    fn pend(&mut self, at: usize) -> Result<Option<Bytes>, FrameError> {
        self.scanned = at + 1;
        self.state = ScanState::SawEndBlock;
        self.check_partial(at)
    }

    /// Splits the payload `buf[..end]` off and drops its `0x1C 0x0D` trailer.
    fn complete(&mut self, buf: &mut BytesMut, end: usize) -> Result<Bytes, FrameError> {
        if end > self.max_payload {
            return Err(self.overflow(end));
        }
        let payload = buf.split_to(end).freeze();
        buf.advance(TRAILER.len());
        self.state = ScanState::SeekingStart;
        self.scanned = 0;
        Ok(payload)
    }

    /// Checks the limit for an incomplete frame with `payload` bytes known to be payload.
    fn check_partial(&mut self, payload: usize) -> Result<Option<Bytes>, FrameError> {
        if payload > self.max_payload {
            Err(self.overflow(payload))
        } else {
            Ok(None)
        }
    }

    fn overflow(&mut self, received: usize) -> FrameError {
        self.state = ScanState::Overflowed;
        self.scanned = received;
        FrameError::TooLarge {
            limit: self.max_payload,
            received,
        }
    }

    /// Total bytes dropped outside frames since this decoder was created.
    pub fn junk_bytes(&self) -> u64 {
        self.junk
    }

    /// True while a frame has been started (its `0x0B` seen) but not completed, including
    /// after an overflow. Used for the frame deadline.
    pub fn in_frame(&self) -> bool {
        self.state != ScanState::SeekingStart
    }

    /// The payload bytes received so far of the frame being assembled (or of the frame that
    /// overflowed), given the buffer last passed to [`decode`](Self::decode). Lets the caller
    /// quote the MSH-10 of a message it rejects. Empty outside a frame.
    pub fn partial_frame<'b>(&self, buf: &'b [u8]) -> &'b [u8] {
        if self.in_frame() { buf } else { &[] }
    }
}

/// Where a frame's payload ends, from a search of `buf[from..]`.
enum End {
    /// `buf[at..at + 2]` is the first `0x1C 0x0D`.
    Complete(usize),
    /// No `0x1C 0x0D`; the last byte, `buf[at]`, is a `0x1C`.
    Pending(usize),
    /// No `0x1C 0x0D`, and the last byte is no `0x1C`.
    Missing,
}

/// Finds the first `0x1C 0x0D` in `buf` starting at `from`, scanning each byte once.
fn find_end(buf: &[u8], mut from: usize) -> End {
    while let Some(i) = memchr::memchr(END_BLOCK, &buf[from..]) {
        let at = from + i;
        match buf.get(at + 1) {
            Some(&CARRIAGE_RETURN) => return End::Complete(at),
            Some(_) => from = at + 1,
            None => return End::Pending(at),
        }
    }
    End::Missing
}

/// Appends `payload` framed as `0x0B payload 0x1C 0x0D` to `out`, copying it.
///
pub fn encode_frame(payload: &[u8], out: &mut BytesMut) {
    out.reserve(payload.len() + FRAMING_OVERHEAD);
    out.extend_from_slice(&[START_BLOCK]);
    out.extend_from_slice(payload);
    out.extend_from_slice(&TRAILER);
}

/// A framed payload being written: the payload is shared, never copied, and written with the
/// framing bytes through vectored I/O ([`io_slices`](Self::io_slices)). Crate-private: the
/// connection's reply slots and the TLS layer use it.
#[derive(Debug, Clone)]
pub(crate) struct EncodedFrame {
    payload: Bytes,
    /// Bytes of the framed form (`1 + payload.len() + 2`) already written.
    /// INVARIANT: `written <= payload.len() + FRAMING_OVERHEAD`.
    written: usize,
}

impl EncodedFrame {
    /// Frames `payload` for writing.
    pub(crate) fn new(payload: Bytes) -> Self {
        Self {
            payload,
            written: 0,
        }
    }

    /// The unframed payload.
    pub(crate) fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// Framed bytes not yet written.
    pub(crate) fn remaining(&self) -> usize {
        self.payload.len() + FRAMING_OVERHEAD - self.written
    }

    /// True once every framed byte has been written.
    pub(crate) fn is_done(&self) -> bool {
        self.remaining() == 0
    }

    /// Records that `n` more framed bytes were written. `n` is clamped to what remains.
    pub(crate) fn advance(&mut self, n: usize) {
        self.written += n.min(self.remaining());
    }

    /// Fills the front of `out` (at least 3 slices) with the unwritten parts (start block,
    /// payload, trailer; empty parts left out) and returns how many slices it used, for
    /// `write_vectored`.
    pub(crate) fn io_slices<'a>(&'a self, out: &mut [IoSlice<'a>]) -> usize {
        const START: [u8; 1] = [START_BLOCK];
        if self.written == 0 && !self.payload.is_empty() {
            // Nothing written yet (every reply but one a write cut short): all three.
            out[0] = IoSlice::new(&START);
            out[1] = IoSlice::new(&self.payload);
            out[2] = IoSlice::new(&TRAILER);
            return 3;
        }
        let payload_end = 1 + self.payload.len();
        let mut n = 0;
        let mut push = |part: &'a [u8]| {
            if !part.is_empty() {
                out[n] = IoSlice::new(part);
                n += 1;
            }
        };
        let w = self.written;
        push(&START[w.min(1)..]);
        push(&self.payload[w.clamp(1, payload_end) - 1..]);
        push(&TRAILER[w.clamp(payload_end, payload_end + 2) - payload_end..]);
        n
    }
}

#[cfg(test)]
#[path = "codec/tests.rs"]
mod tests;
