//! The last messages' MSHs (one per sender, for a few senders) and the parts of their
//! acknowledgments that depend only on them, kept per thread, so that the next message from
//! the same sender skips the field scan and most of the writing.
//!
//! Consecutive messages from one sender usually differ in their MSH only in MSH-7 (the time)
//! and MSH-10 (the control id); the ACK's MSH-3..6, MSH-9, MSH-11, MSH-12 and MSH-18 (and
//! the separators everything is written with) are then the same. [`Memo::recall`] recognises
//! such a message with three comparisons against the remembered MSH and two short scans for
//! the ends of MSH-7 and MSH-10, and returns the remembered pieces of the ACK's MSH. Anything
//! else (another sender, another message type, a cut-off MSH, a control byte in MSH-7 or
//! MSH-10, an empty MSH-10) is a miss: the caller scans the message as usual and
//! learns it ([`Memo::place`], [`Entry::learn`]).
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
//! from the message). The pieces are written by the same code that writes a scanned message's
//! MSH ([`Copied`]), so the general writer is the only one. The tests and the
//! `ack_memo` fuzz target hold every ACK built through a memo to the ACK built without one,
//! byte for byte.
//!
//! A reactor thread serves several connections, whose messages interleave: the memo keeps
//! [`SENDERS`] MSHs, tries the one that recalled last first, and replaces them in turn. When
//! more senders than that interleave, every message misses; learning each would add its cost
//! (about 500 instructions) to a scan that gains nothing, so after [`SENDERS`] misses in a row
//! only every [`LEARN_EVERY`]-th miss is learned.

use std::ops::Range;
use std::time::SystemTime;

use super::fields::{Fields, Layout, field_end};
use super::{Copied, Count, Pieces, Second, hl7_second};
use crate::msh::Encoding;

/// Longest MSH remembered, in bytes (up to the end of what its scan read). Comparing costs a
/// pass over it, and a longer MSH is rare: about 100 bytes is usual, and the ACK's copies of
/// the fields are capped at about 600.
const MAX_REMEMBERED: usize = 1024;

/// How many senders' MSHs a memo keeps: a few connections per reactor thread is usual.
const SENDERS: usize = 4;

/// After [`SENDERS`] misses in a row, one miss in this many is learned.
const LEARN_EVERY: u32 = 16;

/// The MSHs of the last few senders and the ACK pieces written from them.
#[derive(Debug)]
pub(crate) struct Memo {
    senders: [Entry; SENDERS],
    /// The entry that recalled or learned last: tried first, and the one
    /// [`pieces`](Self::pieces) reads.
    last: usize,
    /// The entry the next [`place`](Self::place) gives.
    next: usize,
    /// Misses since the last recall.
    misses: u32,
}

impl Memo {
    /// A memo that remembers nothing.
    pub(crate) const fn new() -> Self {
        Self {
            senders: [const { Entry::new() }; SENDERS],
            last: 0,
            next: 0,
            misses: 0,
        }
    }

    /// Where `message`'s MSH-10 lies, when its MSH is a remembered one but for MSH-7 and
    /// MSH-10 (see the [module docs](self)): [`pieces`](Self::pieces) (with MSH-7 `time`) and
    /// [`encoding`](Self::encoding) are then its ACK's. The MSH-10 is not empty and holds no
    /// field separator and no control byte.
    #[inline]
    pub(crate) fn recall(&mut self, message: &[u8], time: SystemTime) -> Option<Range<usize>> {
        // The sender of the last message first, on its own: one sender is the common case,
        // and a loop over all was about 150 instructions dearer per message (callgrind).
        let last = &mut self.senders[self.last % SENDERS];
        let msh10 = match last.recall(message) {
            Some(msh10) => {
                last.stamp(time);
                msh10
            }
            None => self.recall_others(message, time)?,
        };
        self.misses = 0;
        Some(msh10)
    }

    /// [`recall`](Self::recall) from the senders other than the last one.
    #[inline(never)]
    fn recall_others(&mut self, message: &[u8], time: SystemTime) -> Option<Range<usize>> {
        for k in 1..SENDERS {
            let i = (self.last + k) % SENDERS;
            if let Some(msh10) = self.senders[i].recall(message) {
                self.senders[i].stamp(time);
                self.last = i;
                return Some(msh10);
            }
        }
        self.misses = self.misses.saturating_add(1);
        None
    }

    /// Where a message that was not recalled is to be learned ([`Entry::learn`]): the oldest
    /// sender's place. `None` for a miss skipped while more senders interleave than the memo
    /// keeps.
    pub(crate) fn place(&mut self) -> Option<&mut Entry> {
        if self.misses as usize > SENDERS && !self.misses.is_multiple_of(LEARN_EVERY) {
            return None;
        }
        let i = self.next;
        self.next = (i + 1) % SENDERS;
        self.last = i;
        Some(&mut self.senders[i])
    }

    /// The separators of the message recalled or learned last.
    pub(crate) fn encoding(&self) -> Encoding {
        self.senders[self.last].encoding
    }

    /// The pieces of the ACK's MSH written from the message recalled or learned last.
    pub(crate) fn pieces(&self) -> Pieces<'_> {
        self.senders[self.last].pieces()
    }
}

/// One remembered MSH and the ACK pieces written from it. Empty until [`learn`](Self::learn)
/// keeps a message.
#[derive(Debug)]
pub(crate) struct Entry {
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

impl Entry {
    const fn new() -> Self {
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

    /// [`Memo::recall`] for this sender, without the stamp.
    #[inline(always)]
    fn recall(&self, message: &[u8]) -> Option<Range<usize>> {
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
        Some(start10..end10)
    }

    /// Remembers `message`, whose scan gave `fields` (and `copied`, the parts of its ACK's
    /// MSH) and `layout`, and returns the pieces written from it with MSH-7 in `second`.
    /// `None` (and nothing remembered) for an MSH too long to keep.
    pub(crate) fn learn(
        &mut self,
        message: &[u8],
        layout: Layout,
        fields: &Fields<'_>,
        copied: &Copied<'_>,
        second: Second,
    ) -> Option<Pieces<'_>> {
        self.msh.clear();
        if layout.end > MAX_REMEMBERED {
            return None;
        }
        self.msh.extend_from_slice(&message[..layout.end]);
        self.msh7 = layout.msh7;
        self.msh10 = layout.msh10;
        self.encoding = fields.encoding;
        let (enc, escape) = (&fields.encoding, fields.block_bytes);
        let written = &mut self.written;
        written.clear();
        copied.emit_stamped(written, enc, escape);
        self.stamped_len = written.len();
        copied.emit_tail(written, enc, escape);
        // `stamped` is the head, then MSH-7.
        let mut head = Count(0);
        copied.emit_head(&mut head, enc, escape);
        self.time_at = head.0;
        self.second = Some(second);
        Some(self.pieces())
    }

    fn pieces(&self) -> Pieces<'_> {
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
