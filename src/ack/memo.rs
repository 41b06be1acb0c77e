//! The last message's MSH and the parts of its acknowledgment that depend only on it, kept
//! per thread, so that the next message from the same sender skips the field scan and most
//! of the writing.
//!
//! Consecutive messages from one sender usually differ in their MSH only in MSH-7 (the time)
//! and MSH-10 (the control id); the ACK's MSH-3..6, MSH-9, MSH-11, MSH-12 and MSH-18 (and
//! the separators everything is written with) are then the same. [`Memo::recall`] recognises
//! such a message with three comparisons against the remembered MSH and two short scans for
//! the ends of MSH-7 and MSH-10, and returns the remembered pieces of the ACK's MSH. Anything
//! else (another sender, another message type, a cut-off MSH, a control byte in MSH-7 or
//! MSH-10, an empty MSH-10) is a miss: the caller scans the message as usual and
//! [`Memo::learn`]s it.
//!
//! Why a hit gives the same ACK as a scan: the remembered MSH `R` is `P ‖ r7 ‖ B ‖ r10 ‖ C`,
//! where `P` runs from `MSH` up to MSH-7, `B` from the separator closing MSH-7 to the one
//! opening MSH-10, and `C` from the byte closing MSH-10 (a separator or the segment's
//! terminator) to the byte the scan of `R` ended on (its segment terminator, or the separator
//! after MSH-18), all found by that scan. A hit is a message `P ‖ m7 ‖ B ‖ m10 ‖ C ‖ …` whose
//! `m7` and `m10` hold no field separator and no control byte (each ends at the first such
//! byte, which must then be the first of `B` or `C`): every separator and terminator in it up
//! to the end of `C` is where `R` has it, so its scan finds the same fields, ends at the same
//! place, and differs only in MSH-7 (which the ACK does not copy) and MSH-10 (which it takes
//! from the message). The pieces are
//! written by the same code that writes a scanned message's MSH
//! ([`Copied`](super::Copied)), so the general writer is the only one. The tests and the
//! `ack` fuzz target hold every ACK built through a memo to the ACK built without one, byte
//! for byte.

use std::ops::Range;
use std::time::SystemTime;

use super::fields::{Fields, Layout, field_end};
use super::{Copied, Count, Pieces, Second, hl7_second};
use crate::msh::Encoding;

/// Longest MSH remembered, in bytes (up to the end of what its scan read). Comparing costs a
/// pass over it, and a longer MSH is rare: about 100 bytes is usual, and the ACK's copies of
/// the fields are capped at about 600.
const MAX_REMEMBERED: usize = 1024;

/// One remembered MSH and the ACK pieces written from it. Empty until [`learn`](Self::learn)
/// keeps a message.
#[derive(Debug)]
pub(crate) struct Memo {
    /// The message's bytes from `MSH` to the last byte its scan read; empty when none is
    /// remembered.
    msh: Vec<u8>,
    /// MSH-7 and MSH-10 in `msh`.
    msh7: Range<usize>,
    msh10: Range<usize>,
    encoding: Encoding,
    /// [`Pieces::stamped`] then [`Pieces::tail`], written from the message by [`Copied`].
    written: Vec<u8>,
    /// Where `stamped` ends in `written`.
    stamped_len: usize,
    /// Where MSH-7 starts in `written`.
    time_at: usize,
    /// The second MSH-7 in `written` shows.
    second: Option<Second>,
}

impl Memo {
    /// A memo that remembers nothing.
    pub(crate) const fn new() -> Self {
        Self {
            msh: Vec::new(),
            msh7: 0..0,
            msh10: 0..0,
            encoding: Encoding::DEFAULT,
            written: Vec::new(),
            stamped_len: 0,
            time_at: 0,
            second: None,
        }
    }

    /// Where `message`'s MSH-10 lies, when its MSH is the remembered one but for MSH-7 and
    /// MSH-10 (see the [module docs](self)): [`pieces`](Self::pieces) (with MSH-7 `time`) and
    /// [`encoding`](Self::encoding) are then its ACK's. The MSH-10 is not empty and holds no
    /// field separator and no control byte.
    #[inline]
    pub(crate) fn recall(&mut self, message: &[u8], time: SystemTime) -> Option<Range<usize>> {
        let msh = &self.msh[..];
        if msh.is_empty() {
            return None;
        }
        let field = self.encoding.field;
        let start7 = self.msh7.start;
        if !same(message.get(..start7)?, &msh[..start7]) {
            return None;
        }
        let end7 = field_end(message, start7, field)?;
        let between = &msh[self.msh7.end..self.msh10.start];
        let start10 = end7 + between.len();
        if !same(message.get(end7..start10)?, between) {
            return None;
        }
        let end10 = field_end(message, start10, field)?;
        // An empty MSH-10 makes the ACK a reject: the general path words it.
        if end10 == start10 {
            return None;
        }
        let after = &msh[self.msh10.end..];
        if !same(message.get(end10..end10 + after.len())?, after) {
            return None;
        }
        self.stamp(time);
        Some(start10..end10)
    }

    /// Remembers `message`, whose scan gave `fields` (and `copied`, the parts of its ACK's
    /// MSH) and `layout`, and returns the pieces written from it with MSH-7 `time`; `None`
    /// (and nothing remembered) for an MSH too long to keep.
    pub(crate) fn learn(
        &mut self,
        message: &[u8],
        layout: Layout,
        fields: &Fields<'_>,
        copied: &Copied<'_>,
        time: SystemTime,
    ) -> Option<Pieces<'_>> {
        self.msh.clear();
        if layout.end > MAX_REMEMBERED {
            return None;
        }
        self.msh.extend_from_slice(&message[..layout.end]);
        self.msh7 = layout.msh7;
        self.msh10 = layout.msh10;
        self.encoding = fields.encoding;
        let second = hl7_second(time);
        let (enc, escape) = (&fields.encoding, fields.block_bytes);
        let written = &mut self.written;
        written.clear();
        copied.emit_stamped(written, enc, escape, &second.text);
        self.stamped_len = written.len();
        copied.emit_tail(written, enc, escape);
        // `stamped` is the head, then MSH-7.
        let mut head = Count(0);
        copied.emit_head(&mut head, enc, escape);
        self.time_at = head.0;
        self.second = Some(second);
        Some(self.pieces())
    }

    /// The separators of the remembered message.
    pub(crate) fn encoding(&self) -> Encoding {
        self.encoding
    }

    /// The pieces of the ACK's MSH written from the remembered message.
    pub(crate) fn pieces(&self) -> Pieces<'_> {
        let (stamped, tail) = self.written.split_at(self.stamped_len);
        Pieces { stamped, tail }
    }

    /// Makes MSH-7 in the pieces show `time`.
    #[inline(always)]
    fn stamp(&mut self, time: SystemTime) {
        if !self.second.is_some_and(|second| second.contains(time)) {
            self.restamp(time);
        }
    }

    /// [`stamp`](Self::stamp) in another second: once a second at most, when busy.
    #[cold]
    fn restamp(&mut self, time: SystemTime) {
        let second = hl7_second(time);
        self.written[self.time_at..self.time_at + second.text.len()].copy_from_slice(&second.text);
        self.second = Some(second);
    }
}

/// `a == b` for the short runs [`Memo::recall`] compares (tens of bytes): 16 bytes per
/// comparison, inline, the last block overlapping the one before (callgrind: a slice
/// comparison, with its `memcmp` call, was about 45 instructions for each of the three, and
/// 8 bytes per step about 30).
#[inline(always)]
fn same(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    // INVARIANT: every slice given to `word` and `block` has their width.
    let word = |s: &[u8]| u64::from_ne_bytes(s.try_into().expect("8 bytes"));
    let block = |s: &[u8]| u128::from_ne_bytes(s.try_into().expect("16 bytes"));
    if n < 8 {
        return a == b;
    }
    if n < 16 {
        return word(&a[..8]) == word(&b[..8]) && word(&a[n - 8..]) == word(&b[n - 8..]);
    }
    let mut i = 0;
    while i + 16 < n {
        if block(&a[i..i + 16]) != block(&b[i..i + 16]) {
            return false;
        }
        i += 16;
    }
    block(&a[n - 16..]) == block(&b[n - 16..])
}

#[cfg(test)]
mod tests;
