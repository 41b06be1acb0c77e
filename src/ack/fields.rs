//! The MSH fields an acknowledgment copies, found in one pass over the message.
//!
//! [`Fields::scan`] reads the message once, from MSH-2 to the end of MSH-18 (the last field
//! an ACK copies) or the end of the segment, whichever comes first, eight bytes at a time:
//! field separators, the segment terminator (CR or LF) and the MLLP block bytes are found in
//! the same pass. Nothing after MSH-18 is read. It accepts and refuses exactly what
//! [`Msh::parse`] does and reads the same fields, which [`Fields::from_msh`] (the reference,
//! for the tests and the fuzz target) checks.

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
    /// Handles byte `at`, one that may be special; returns true to stop.
    #[inline(always)]
    fn byte(&mut self, message: &[u8], field: u8, at: usize) -> bool {
        let b = message[at];
        if b == field {
            self.ends[self.found - 1] = at;
            if self.found == self.ends.len() {
                self.complete = true;
                return true;
            }
            self.found += 1;
            false
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

/// Sets the high bit of each byte of `x` that is zero, and only those (no carry crosses a
/// byte: the low seven bits are added apart from the high one).
#[inline(always)]
fn zero_bytes(x: u64) -> u64 {
    const LOW7: u64 = 0x7F7F_7F7F_7F7F_7F7F;
    !(((x & LOW7) + LOW7) | x | LOW7)
}

/// Scans `message` from byte 4 (MSH-2) for separators `field`, stopping at the end of
/// MSH-18 or of the segment.
#[inline(always)]
fn scan(message: &[u8], field: u8) -> Scan {
    /// Bytes below 0x20 have their top three bits clear: one zero test finds every control
    /// byte (CR, LF and the block bytes among them).
    const TOP3: u64 = 0xE0E0_E0E0_E0E0_E0E0;
    let splat = u64::from_ne_bytes([field; 8]);
    let mut s = Scan {
        ends: [0; LAST_FIELD - 1],
        found: 1,
        complete: false,
        block_bytes: false,
    };
    let mut at = 4;
    let rest = message.get(at..).unwrap_or_default();
    let mut words = rest.chunks_exact(8);
    for word in &mut words {
        // INVARIANT: `chunks_exact(8)` yields 8-byte slices.
        let x = u64::from_le_bytes(word.try_into().expect("8 bytes"));
        let mut hits = zero_bytes(x ^ splat) | zero_bytes(x & TOP3);
        while hits != 0 {
            if s.byte(message, field, at + (hits.trailing_zeros() / 8) as usize) {
                return s;
            }
            hits &= hits - 1;
        }
        at += 8;
    }
    for i in at..message.len() {
        if s.byte(message, field, i) {
            return s;
        }
    }
    s.ends[s.found - 1] = message.len();
    s
}

impl<'a> Fields<'a> {
    /// No fields: what an ACK of a message without a readable MSH copies (nothing, in the
    /// default encoding).
    pub(crate) const NONE: Fields<'static> = Fields {
        encoding: Encoding::DEFAULT,
        parties: [&[]; 4],
        trigger: &[],
        control_id: &[],
        processing_id: &[],
        version: &[],
        charset: &[],
        block_bytes: false,
    };

    /// The fields of `message`'s MSH, or `None` when [`Msh::parse`] would fail.
    pub(crate) fn scan(message: &'a [u8]) -> Option<Self> {
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
        Some(Self {
            encoding,
            parties: [get(3), get(4), get(5), get(6)],
            trigger: trigger(get(9), &encoding),
            control_id,
            processing_id: get(11),
            version: get(12),
            charset: get(LAST_FIELD),
            block_bytes: s.block_bytes,
        })
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
