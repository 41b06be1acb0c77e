//! The per-thread buffer acknowledgments are built in (see [`super::Ack::build`]).
//!
//! An ACK-only server answers one message at a time per connection; a `Vec` per ACK was one
//! of the heap allocations per message (callgrind, S1). Here an ACK is written in one pass
//! straight into the free end of a buffer kept per thread (room for its longest possible
//! form is made first, so it never grows there), then split off its front (a reference
//! count, no allocation, no copy). Once every ACK cut from that buffer has been written and
//! dropped, the buffer is unique again and its space is reclaimed in place. While some are
//! still held, a new buffer is started and the old one is freed with its last ACK, so the
//! buffer never waits for a slow peer.

use bytes::{Bytes, BytesMut};

use super::Plan;

/// Bytes per shared buffer: about twenty ACKs of the usual size.
const SIZE: usize = 4 * 1024;

/// What a shared buffer's room is initialised with, a piece at a time.
static ZEROS: [u8; 1024] = [0; 1024];

/// The bytes `plan` writes, cut from `shared`, this thread's buffer (or on their own
/// when they may be large).
pub(super) fn build(shared: &mut BytesMut, plan: &Plan<'_>) -> Bytes {
    let max_len = plan.max_len();
    if max_len > SIZE / 2 {
        return alone(plan);
    }
    // The buffer's initialised length is the room to write in: zeroing it costs less
    // than a capacity check per write, and it is zeroed 1 KiB at a time, once per
    // several ACKs (callgrind, S1: a `resize` per ACK was about 70 instructions).
    if shared.len() < max_len {
        if shared.capacity() < max_len {
            shared.clear();
            if !shared.try_reclaim(max_len) {
                *shared = BytesMut::with_capacity(SIZE);
            }
        }
        // In copies of at most 1 KiB from zeros: `resize` writes byte by byte, and
        // larger copies are `rep movsb`, as slow under callgrind.
        while shared.len() < max_len {
            let room = shared.capacity() - shared.len();
            shared.extend_from_slice(&ZEROS[..room.min(ZEROS.len())]);
        }
    }
    let mut cursor = Cursor {
        buf: &mut shared[..max_len],
        at: 0,
    };
    plan.emit(&mut cursor);
    let len = cursor.at;
    if len > max_len {
        debug_assert!(false, "an ACK longer than its bound");
        shared.clear();
        return alone(plan);
    }
    shared.split_to(len).freeze()
}

/// The bytes `plan` writes, exactly sized on their own: large text, a thread exiting,
/// or a bound that was short.
pub(super) fn alone(plan: &Plan<'_>) -> Bytes {
    let mut out = Vec::new();
    plan.emit_exact(&mut out);
    Bytes::from(out)
}

/// Writes into a buffer sized to the ACK's bound. Past the end (a bound too short, a bug)
/// bytes are counted but not written, and `build` starts again exactly sized: never a
/// panic on the reactor thread, never a cut ACK.
pub(super) struct Cursor<'b> {
    pub(super) buf: &'b mut [u8],
    pub(super) at: usize,
}

/// `dst.copy_from_slice(src)` (same lengths), without a `memcpy` call for the short
/// fields and pieces an ACK is made of: up to 16 bytes go as two overlapping fixed-size
/// copies, up to 64 as two or four 16-byte ones (callgrind, S1: a `memcpy` call per field
/// was about 14 instructions each, and the remembered MSH piece of some 60 bytes took one).
#[inline(always)]
pub(super) fn copy(dst: &mut [u8], src: &[u8]) {
    let n = src.len();
    if n > 64 || dst.len() != n {
        dst.copy_from_slice(src);
    } else if n > 16 {
        // Each copy is 16 bytes, the last ones overlapping those before: the first 32 and
        // the last 32 (the same for n <= 32).
        let block = |d: &mut [u8], s: &[u8], at: usize| {
            d[at..at + 16].copy_from_slice(&s[at..at + 16]);
        };
        block(dst, src, 0);
        if n > 32 {
            block(dst, src, 16);
            block(dst, src, n - 32);
        }
        block(dst, src, n - 16);
    } else if n >= 8 {
        dst[..8].copy_from_slice(&src[..8]);
        dst[n - 8..].copy_from_slice(&src[n - 8..]);
    } else if n >= 4 {
        dst[..4].copy_from_slice(&src[..4]);
        dst[n - 4..].copy_from_slice(&src[n - 4..]);
    } else if n > 0 {
        dst[0] = src[0];
        dst[n / 2] = src[n / 2];
        dst[n - 1] = src[n - 1];
    }
}

impl super::Sink for Cursor<'_> {
    #[inline]
    fn put(&mut self, bytes: &[u8]) {
        let end = self.at + bytes.len();
        if let Some(room) = self.buf.get_mut(self.at..end) {
            copy(room, bytes);
        }
        self.at = end;
    }
    #[inline]
    fn put_byte(&mut self, byte: u8) {
        if let Some(room) = self.buf.get_mut(self.at) {
            *room = byte;
        }
        self.at += 1;
    }
}
