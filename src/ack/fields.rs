//! The MSH fields an acknowledgment copies, found in one pass over the message.
//!
//! [`Fields::scan`] reads the message once, from MSH-2 to the end of MSH-18 (the last field
//! an ACK copies) or the end of the segment, whichever comes first, 16 bytes at a time (SSE2;
//! 8 in a `u64` on other targets): field separators, the segment terminator (CR or LF) and the MLLP block bytes are found in
//! the same pass. Nothing after MSH-18 is read. It accepts and refuses exactly what
//! [`Msh::parse`] does and reads the same fields, which [`Fields::from_msh`] (the reference,
//! for the tests and the fuzz target) checks.

use std::ops::Range;

use crate::codec::{CARRIAGE_RETURN, END_BLOCK, START_BLOCK};
use crate::msh::{Encoding, LINE_FEED, Msh};

/// The last field an ACK copies: MSH-18, the character set.
const LAST_FIELD: usize = 18;

/// What an ACK copies from a message with a readable MSH, raw (escape sequences as written).
/// An absent field is empty.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Fields<'a> {
    pub(crate) encoding: Encoding,
    /// MSH-3, MSH-4, MSH-5, MSH-6.
    pub(crate) parties: [&'a [u8]; 4],
    /// MSH-9.2, the trigger event.
    pub(crate) trigger: &'a [u8],
    /// MSH-10, empty when absent or possibly cut off (see [`Msh::control_id`]).
    pub(crate) control_id: &'a [u8],
    /// MSH-11.
    pub(crate) processing_id: &'a [u8],
    /// MSH-12.
    pub(crate) version: &'a [u8],
    /// MSH-18.
    pub(crate) charset: &'a [u8],
    /// Whether any of the fields above may hold an MLLP block byte (0x0B, 0x1C): then each
    /// copy is checked and escaped. False means none does.
    pub(crate) block_bytes: bool,
}

/// Where MSH-7 and MSH-10 lie in a message whose scan ended on one of its bytes after MSH-10
/// (a segment terminator, or the separator after MSH-18): the fields an ACK reads from it are
/// then those of any message equal to it in `..end` outside MSH-7 and MSH-10, as long as its
/// own MSH-7 and MSH-10 hold neither a field separator nor a control byte (see
/// [`super::memo`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Layout {
    pub(crate) msh7: Range<usize>,
    pub(crate) msh10: Range<usize>,
    /// Just after the byte the scan ended on.
    pub(crate) end: usize,
}

/// Where the fields an ACK copies lie in the message.
struct Scan {
    /// `ends[k]`: where MSH-(k+2) ends (its closing separator, the segment's terminator or
    /// the end of the input), for `k < found`; MSH-(k+3) starts right after it.
    ends: [usize; LAST_FIELD - 1],
    /// How many fields from MSH-2 on were reached (1 ..= 17).
    found: usize,
    /// The last field reached is complete: a separator or the segment's terminator ends it
    /// (not the end of the input).
    complete: bool,
    block_bytes: bool,
}

impl Scan {
    /// A field separator at `at` ends the current field; returns true to stop (MSH-18 ended).
    #[inline(always)]
    fn separator(&mut self, at: usize) -> bool {
        self.ends[self.found - 1] = at;
        if self.found == self.ends.len() {
            self.complete = true;
            return true;
        }
        self.found += 1;
        false
    }

    /// Handles byte `at`, one that may be special; returns true to stop.
    #[inline(always)]
    fn byte(&mut self, message: &[u8], field: u8, at: usize) -> bool {
        let b = message[at];
        if b == field {
            self.separator(at)
        } else if b == CARRIAGE_RETURN || b == LINE_FEED {
            self.ends[self.found - 1] = at;
            self.complete = true;
            true
        } else {
            self.block_bytes |= b == START_BLOCK || b == END_BLOCK;
            false
        }
    }
}

/// Which bytes of one block of the input may be special, as two masks: the field separators,
/// and the control bytes (below 0x20: CR, LF and the MLLP block bytes among them). Byte `k`
/// of the block is bit `k << SHIFT` of a mask.
#[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
mod block {
    use std::arch::x86_64::{
        _mm_and_si128, _mm_cmpeq_epi8, _mm_movemask_epi8, _mm_set_epi64x, _mm_set1_epi8,
        _mm_setzero_si128,
    };

    /// Bytes per block: one SSE2 register (every x86-64 CPU has SSE2).
    pub(super) const LEN: usize = 16;
    pub(super) const SHIFT: u32 = 0;

    // Measured: the scan per message at S1 fell from 912 to 711 instructions (callgrind,
    // BENCHMARKS.md "ACK-only: instructions per message, fourth pass").
    #[allow(unsafe_code)]
    #[inline(always)]
    pub(super) fn masks(block: &[u8; LEN], field: u8) -> (u64, u64) {
        let (lo, hi) = block.split_at(8);
        // INVARIANT: `split_at(8)` of 16 bytes gives two 8-byte halves.
        let lo = u64::from_le_bytes(lo.try_into().expect("8 bytes"));
        let hi = u64::from_le_bytes(hi.try_into().expect("8 bytes"));
        // SAFETY: these intrinsics only compute on registers (no memory access), and need
        // SSE2, which this module is compiled for only where the target has it (every x86-64
        // CPU does).
        let (separators, control) = unsafe {
            let x = _mm_set_epi64x(hi as i64, lo as i64);
            let separators = _mm_cmpeq_epi8(x, _mm_set1_epi8(field as i8));
            // Bytes below 0x20 have their top three bits clear.
            let top3 = _mm_and_si128(x, _mm_set1_epi8(0xE0_u8 as i8));
            let control = _mm_cmpeq_epi8(top3, _mm_setzero_si128());
            (_mm_movemask_epi8(separators), _mm_movemask_epi8(control))
        };
        let bits = |mask: i32| u64::from(mask as u16);
        (bits(separators), bits(control))
    }
}

/// [`block`] eight bytes at a time in a `u64`, for other targets.
#[cfg(not(all(target_arch = "x86_64", target_feature = "sse2")))]
mod block {
    pub(super) const LEN: usize = 8;
    pub(super) const SHIFT: u32 = 3;

    /// Sets the high bit of each byte of `x` that is zero, and only those (no carry crosses a
    /// byte: the low seven bits are added apart from the high one).
    #[inline(always)]
    fn zero_bytes(x: u64) -> u64 {
        const LOW7: u64 = 0x7F7F_7F7F_7F7F_7F7F;
        !(((x & LOW7) + LOW7) | x | LOW7)
    }

    #[inline(always)]
    pub(super) fn masks(block: &[u8; LEN], field: u8) -> (u64, u64) {
        /// Bytes below 0x20 have their top three bits clear.
        const TOP3: u64 = 0xE0E0_E0E0_E0E0_E0E0;
        let x = u64::from_le_bytes(*block);
        let splat = u64::from_ne_bytes([field; 8]);
        (zero_bytes(x ^ splat), zero_bytes(x & TOP3))
    }
}

/// Handles one block starting at byte `at` of `message`; returns true to stop. A block
/// without control bytes (nearly all of them) only ends fields.
#[inline(always)]
fn scan_block(
    s: &mut Scan,
    message: &[u8],
    field: u8,
    at: usize,
    block: &[u8; block::LEN],
) -> bool {
    let (mut separators, control) = block::masks(block, field);
    if control == 0 {
        while separators != 0 {
            if s.separator(at + (separators.trailing_zeros() >> block::SHIFT) as usize) {
                return true;
            }
            separators &= separators - 1;
        }
    } else {
        let mut hits = separators | control;
        while hits != 0 {
            if s.byte(
                message,
                field,
                at + (hits.trailing_zeros() >> block::SHIFT) as usize,
            ) {
                return true;
            }
            hits &= hits - 1;
        }
    }
    false
}

/// Scans `message` from byte 4 (MSH-2) for separators `field`, stopping at the end of
/// MSH-18 or of the segment, a block of bytes at a time. The last, partial block is padded
/// with a byte that is neither `field` nor a control byte, so it is read the same way and
/// its padding never stops or ends anything.
#[inline(always)]
fn scan(message: &[u8], field: u8) -> Scan {
    let mut s = Scan {
        ends: [0; LAST_FIELD - 1],
        found: 1,
        complete: false,
        block_bytes: false,
    };
    let mut at = 4;
    let rest = message.get(at..).unwrap_or_default();
    let mut blocks = rest.chunks_exact(block::LEN);
    for block in &mut blocks {
        // INVARIANT: `chunks_exact(LEN)` yields LEN-byte slices.
        let block = block.try_into().expect("a whole block");
        if scan_block(&mut s, message, field, at, block) {
            return s;
        }
        at += block::LEN;
    }
    let tail = blocks.remainder();
    if !tail.is_empty() {
        let mut padded = [if field == b'A' { b'B' } else { b'A' }; block::LEN];
        padded[..tail.len()].copy_from_slice(tail);
        if scan_block(&mut s, message, field, at, &padded) {
            return s;
        }
    }
    s.ends[s.found - 1] = message.len();
    s
}

/// The first byte at or after `from` in `message` that is a field separator `field` or a
/// control byte (below 0x20: CR, LF and the MLLP block bytes among them), or `None` when there
/// is none: where the field that starts at `from` ends if it holds no other control byte. A
/// block of bytes at a time, as [`scan`].
#[inline(always)]
pub(crate) fn field_end(message: &[u8], from: usize, field: u8) -> Option<usize> {
    let mut at = from;
    loop {
        let rest = message.get(at..)?;
        let (separators, control) = if let Some(block) = rest.first_chunk::<{ block::LEN }>() {
            block::masks(block, field)
        } else {
            if rest.is_empty() {
                return None;
            }
            let mut padded = [if field == b'A' { b'B' } else { b'A' }; block::LEN];
            padded[..rest.len()].copy_from_slice(rest);
            block::masks(&padded, field)
        };
        let hits = separators | control;
        if hits != 0 {
            return Some(at + (hits.trailing_zeros() >> block::SHIFT) as usize);
        }
        at += block::LEN;
    }
}

impl<'a> Fields<'a> {
    /// The fields of `message`'s MSH, or `None` when [`Msh::parse`] would fail.
    pub(crate) fn scan(message: &'a [u8]) -> Option<Self> {
        Self::scan_laid_out(message).map(|(fields, _)| fields)
    }

    /// [`scan`](Self::scan), with where the fields lie when the scan ended on a byte of the
    /// message after MSH-10 (see [`Layout`]).
    pub(crate) fn scan_laid_out(message: &'a [u8]) -> Option<(Self, Option<Layout>)> {
        if !message.starts_with(b"MSH") {
            return None;
        }
        let field = match message.get(3) {
            None | Some(&CARRIAGE_RETURN | &LINE_FEED) => return None,
            Some(&field) => field,
        };
        let s = scan(message, field);
        let msh2 = &message[4..s.ends[0]];
        if msh2.is_empty() {
            return None;
        }
        let encoding = Encoding::from_msh2(field, msh2).ok()?;
        // MSH-n for 3 <= n <= 18: after the end of MSH-(n-1), up to its own end.
        let get = |n: usize| -> &'a [u8] {
            if n - 2 < s.found {
                &message[s.ends[n - 3] + 1..s.ends[n - 2]]
            } else {
                &[]
            }
        };
        // As `Msh::control_id`: MSH-10 as the last field of a cut-off input may be cut short.
        let control_id = if s.found > 9 || (s.found == 9 && s.complete) {
            get(10)
        } else {
            &[]
        };
        let fields = Self {
            encoding,
            parties: [get(3), get(4), get(5), get(6)],
            trigger: trigger(get(9), &encoding),
            control_id,
            processing_id: get(11),
            version: get(12),
            charset: get(LAST_FIELD),
            block_bytes: s.block_bytes,
        };
        // MSH-n spans `ends[n - 3] + 1 .. ends[n - 2]`; MSH-10 is closed when a field after it
        // was reached or the segment ended right after it.
        let layout = (s.complete && s.found >= 9).then(|| Layout {
            msh7: s.ends[4] + 1..s.ends[5],
            msh10: s.ends[7] + 1..s.ends[8],
            end: s.ends[s.found - 1] + 1,
        });
        Some((fields, layout))
    }

    /// The same fields read through [`Msh`]'s accessors: the reference [`scan`](Self::scan)
    /// must agree with (tests, fuzz target). `block_bytes` covers the whole segment.
    pub(crate) fn from_msh(msh: &Msh<'a>) -> Self {
        let field = |n| msh.field(n).unwrap_or_default();
        Self {
            encoding: msh.encoding(),
            parties: [field(3), field(4), field(5), field(6)],
            trigger: msh.trigger_event().unwrap_or_default(),
            control_id: msh.control_id().unwrap_or_default(),
            processing_id: field(11),
            version: field(12),
            charset: field(LAST_FIELD),
            block_bytes: memchr::memchr2(START_BLOCK, END_BLOCK, msh.as_bytes()).is_some(),
        }
    }
}

/// MSH-9.2: the second component of the first repetition of MSH-9.
fn trigger<'a>(msh9: &'a [u8], enc: &Encoding) -> &'a [u8] {
    let mut start = None;
    for (i, &b) in msh9.iter().enumerate() {
        if b == enc.repetition {
            return start.map_or(&[], |s| &msh9[s..i]);
        }
        if b == enc.component {
            match start {
                None => start = Some(i + 1),
                Some(s) => return &msh9[s..i],
            }
        }
    }
    start.map_or(&[], |s| &msh9[s..])
}
