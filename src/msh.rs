//! Zero-copy reader for the MSH (message header) segment of an HL7 v2 message.
//!
//! [`Msh::parse`] looks at the raw bytes of a message, finds the end of its first segment, reads
//! the separators from MSH-1 and MSH-2 and indexes the field separators once. Accessors then
//! return slices of the caller's buffer: nothing is copied, unescaped or allocated, and no other
//! segment is parsed. This is all the ACK builder ([`crate::ack`]) and the server need from a
//! message, and it also works on the *prefix* of a message (the start of an oversize frame).
//!
//! Field numbers follow HL7: MSH-1 is the field separator itself, MSH-2 the encoding characters,
//! MSH-3 the first field after them.
//!
//! # Examples
//!
//! ```
//! use mllp_reactor::msh::Msh;
//!
//! let msg = b"MSH|^~\\&|LAB|HOSP|EHR|HOSP|20260101120000||ADT^A01^ADT_A01|42|P|2.5.1\rPID|1\r";
//! let msh = Msh::parse(msg)?;
//! assert_eq!(msh.field_separator(), b'|');
//! assert_eq!(msh.encoding().component, b'^');
//! assert_eq!(msh.field(3), Some(&b"LAB"[..]));
//! assert_eq!(msh.message_type(), Some(&b"ADT"[..]));
//! assert_eq!(msh.trigger_event(), Some(&b"A01"[..]));
//! assert_eq!(msh.control_id(), Some(&b"42"[..]));
//! assert_eq!(msh.version(), Some(&b"2.5.1"[..]));
//! assert_eq!(msh.charset(), None);
//! # Ok::<(), mllp_reactor::msh::MshError>(())
//! ```

use std::fmt;

use memchr::{memchr, memchr2};

// The segment terminator (HL7 v2.5 §2.5.2: every segment ends with a carriage return).
use crate::codec::CARRIAGE_RETURN;

/// Also ends a segment: some senders write LF or CR LF, and a reader that stopped only at CR
/// would run the MSH on into the next segment.
pub(crate) const LINE_FEED: u8 = 0x0A;

/// How many field separators [`Msh::parse`] records, so that fields up to MSH-25 (the last one
/// HL7 v2.8 defines) are found without rescanning. Fields past it are still readable, by a scan
/// from the last recorded separator. 25 × 8 bytes keeps [`Msh`] a small stack value.
const INDEXED_SEPARATORS: usize = 24;

/// Why a message has no readable MSH segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum MshError {
    /// The message does not start with `MSH` (leading bytes are not skipped).
    NoMsh,
    /// The input or the MSH segment ends before its field separator (MSH-1).
    TooShort,
    /// MSH-2, the encoding characters, is empty.
    MissingEncoding,
    /// A separator is not ASCII punctuation, is `.` or `+`, appears twice, or MSH-2 has more
    /// than five characters.
    BadSeparator,
}

impl fmt::Display for MshError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NoMsh => "message does not start with an MSH segment",
            Self::TooShort => "MSH segment ends before its field separator",
            Self::MissingEncoding => "MSH-2 (encoding characters) is empty",
            Self::BadSeparator => "MSH separators are invalid or repeated",
        })
    }
}

impl std::error::Error for MshError {}

/// The separators and escape character a message declares in MSH-1 and MSH-2.
///
/// HL7 v2.5 §2.5.4. A message whose MSH-2 is shorter than four characters gets the defaults for
/// the missing ones, in order (component, repetition, escape, subcomponent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Encoding {
    /// Field separator, MSH-1 (usually `|`).
    pub field: u8,
    /// Component separator, MSH-2 character 1 (usually `^`).
    pub component: u8,
    /// Repetition separator, MSH-2 character 2 (usually `~`).
    pub repetition: u8,
    /// Escape character, MSH-2 character 3 (usually `\`).
    pub escape: u8,
    /// Subcomponent separator, MSH-2 character 4 (usually `&`).
    pub subcomponent: u8,
    /// Truncation character, MSH-2 character 5 (HL7 v2.7 and later, usually `#`), if declared.
    pub truncation: Option<u8>,
}

impl Encoding {
    /// The HL7 recommended separators, `|^~\&`, with no truncation character.
    pub const DEFAULT: Self = Self {
        field: b'|',
        component: b'^',
        repetition: b'~',
        escape: b'\\',
        subcomponent: b'&',
        truncation: None,
    };

    /// The MSH-2 characters this encoding declares: four, or five with a truncation character.
    pub(crate) fn encoding_characters(&self) -> ([u8; 5], usize) {
        let chars = [
            self.component,
            self.repetition,
            self.escape,
            self.subcomponent,
            self.truncation.unwrap_or(0),
        ];
        (chars, if self.truncation.is_some() { 5 } else { 4 })
    }

    /// Reads MSH-2 on top of the defaults, then checks the whole set.
    pub(crate) fn from_msh2(field: u8, msh2: &[u8]) -> Result<Self, MshError> {
        // The recommended set, which nearly every message uses, is valid: skip the checks.
        if field == b'|' && msh2 == b"^~\\&" {
            return Ok(Self::DEFAULT);
        }
        if msh2.len() > 5 {
            return Err(MshError::BadSeparator);
        }
        let d = Self::DEFAULT;
        let at = |i: usize, default: u8| msh2.get(i).copied().unwrap_or(default);
        let enc = Self {
            field,
            component: at(0, d.component),
            repetition: at(1, d.repetition),
            escape: at(2, d.escape),
            subcomponent: at(3, d.subcomponent),
            truncation: msh2.get(4).copied(),
        };
        let (chars, n) = enc.encoding_characters();
        let all = [field, chars[0], chars[1], chars[2], chars[3], chars[4]];
        let all = &all[..n + 1];
        // Duplicates would make splitting ambiguous. Letters, digits, control bytes and
        // high bytes are refused because the ACK writes fixed alphanumeric text (segment ids,
        // codes) that such a separator would split, and because 0x0B/0x1C would end an MLLP
        // frame early; `.` and `+` because the ACK writes them too (`2.5.1`, `+0000`).
        let valid = |b: u8| b.is_ascii_punctuation() && b != b'.' && b != b'+';
        for (i, &b) in all.iter().enumerate() {
            if !valid(b) || all[i + 1..].contains(&b) {
                return Err(MshError::BadSeparator);
            }
        }
        Ok(enc)
    }
}

impl Default for Encoding {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// A parsed view of a message's MSH segment, borrowing the message's bytes.
///
/// Accessors return raw field contents: escape sequences are not decoded. [`Msh::field`] and
/// [`Msh::component`] return `Some(b"")` for a present but empty field; the named accessors
/// ([`Msh::control_id`] and the like) treat an empty field as absent, as HL7 does.
#[derive(Debug, Clone, Copy)]
pub struct Msh<'a> {
    /// The MSH segment, from `MSH` up to but excluding its terminator (or the end of input).
    segment: &'a [u8],
    encoding: Encoding,
    /// Whether a segment terminator followed the segment. If not, the input may have been cut
    /// off, and the last field may be incomplete.
    terminated: bool,
    /// Number of valid entries in `separators`.
    /// INVARIANT: `1 <= recorded <= INDEXED_SEPARATORS`.
    recorded: usize,
    /// Positions in `segment` of the first field separators, in ascending order.
    /// INVARIANT: `separators[0] == 3` (MSH-1); `separators[k]` opens field MSH-(k+2); all
    /// recorded positions are `< segment.len()`.
    separators: [usize; INDEXED_SEPARATORS],
}

/// Records in `separators[1..]` the positions of `field` in `segment` from byte 4 on, until
/// the index is full; returns how many entries of `separators` are valid (`separators[0]` is
/// the caller's). Eight bytes at a time (SWAR): an MSH is short and dense in separators, so
/// restarting `memchr` at each one costs more, and a byte loop costs about 5 instructions per
/// byte; this one about 1.5 per byte plus 5 per separator (callgrind, `benches/ack.rs`).
fn index_separators(
    segment: &[u8],
    field: u8,
    separators: &mut [usize; INDEXED_SEPARATORS],
) -> usize {
    const LOW7: u64 = 0x7F7F_7F7F_7F7F_7F7F;
    let splat = u64::from_ne_bytes([field; 8]);
    let mut recorded = 1;
    let mut at = 4;
    let mut words = segment.get(at..).unwrap_or_default().chunks_exact(8);
    for word in &mut words {
        // INVARIANT: `chunks_exact(8)` yields 8-byte slices.
        let x = u64::from_le_bytes(word.try_into().expect("8 bytes")) ^ splat;
        // The high bit of each byte that is zero in `x` (a separator), exactly: no carry
        // crosses a byte because the low seven bits are added apart from the high one.
        let mut zeros = !(((x & LOW7) + LOW7) | x | LOW7);
        while zeros != 0 {
            separators[recorded] = at + (zeros.trailing_zeros() / 8) as usize;
            recorded += 1;
            if recorded == INDEXED_SEPARATORS {
                return recorded;
            }
            zeros &= zeros - 1;
        }
        at += 8;
    }
    for (i, &b) in words.remainder().iter().enumerate() {
        if b == field {
            separators[recorded] = at + i;
            recorded += 1;
            if recorded == INDEXED_SEPARATORS {
                break;
            }
        }
    }
    recorded
}

impl<'a> Msh<'a> {
    /// Reads the MSH segment at the start of `message`.
    ///
    /// The segment runs to the first CR or LF, or to the end of `message`, so the prefix of a
    /// message (even one cut off inside the MSH) is fine: fields that are not there read as
    /// `None`. Never panics, whatever the input.
    ///
    /// # Errors
    ///
    /// [`MshError`] when `message` does not start with `MSH`, ends before MSH-1, has an empty
    /// MSH-2, or declares unusable separators.
    pub fn parse(message: &'a [u8]) -> Result<Self, MshError> {
        if !message.starts_with(b"MSH") {
            return Err(if b"MSH".starts_with(message) {
                MshError::TooShort
            } else {
                MshError::NoMsh
            });
        }
        let field = match message.get(3) {
            None | Some(&CARRIAGE_RETURN | &LINE_FEED) => return Err(MshError::TooShort),
            Some(&field) => field,
        };

        let (segment, terminated) = match memchr2(CARRIAGE_RETURN, LINE_FEED, message) {
            Some(end) => (&message[..end], true),
            None => (message, false),
        };
        let mut separators = [0; INDEXED_SEPARATORS];
        separators[0] = 3;
        let recorded = index_separators(segment, field, &mut separators);

        let msh2_end = if recorded > 1 {
            separators[1]
        } else {
            segment.len()
        };
        let msh2 = &segment[4..msh2_end];
        if msh2.is_empty() {
            return Err(MshError::MissingEncoding);
        }
        let encoding = Encoding::from_msh2(field, msh2)?;
        Ok(Self {
            segment,
            encoding,
            terminated,
            recorded,
            separators,
        })
    }

    /// The field separator, MSH-1.
    pub fn field_separator(&self) -> u8 {
        self.encoding.field
    }

    /// The separators and escape character from MSH-1 and MSH-2, defaults filled in.
    pub fn encoding(&self) -> Encoding {
        self.encoding
    }

    /// The raw MSH segment, without its terminator.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.segment
    }

    /// Whether a segment terminator (CR or LF) ended the MSH.
    ///
    /// When it is `false` the input ended inside the MSH. That is normal for a one-segment
    /// message written without its final CR, but on the prefix of a longer message the last
    /// field read may have been cut short.
    pub fn is_terminated(&self) -> bool {
        self.terminated
    }

    /// Field MSH-`n`, raw, or `None` if the segment has fewer fields (or `n` is 0).
    ///
    /// MSH-1 is the one-byte field separator and MSH-2 the encoding characters as written.
    pub fn field(&self, n: usize) -> Option<&'a [u8]> {
        match n {
            0 => None,
            1 => Some(&self.segment[3..4]),
            _ => {
                let (start, end) = self.field_bounds(n - 2)?;
                Some(&self.segment[start..end])
            }
        }
    }

    /// Start and end in `segment` of the field opened by the `k`-th separator, if there is one.
    fn field_bounds(&self, k: usize) -> Option<(usize, usize)> {
        // When the index is not full it holds every separator of the segment.
        let complete = self.recorded < INDEXED_SEPARATORS;
        let start = if k < self.recorded {
            self.separators[k] + 1
        } else if complete {
            return None;
        } else {
            // Past the index: keep counting separators from the last recorded one.
            let mut pos = self.separators[INDEXED_SEPARATORS - 1];
            for _ in INDEXED_SEPARATORS - 1..k {
                pos += 1 + memchr(self.encoding.field, &self.segment[pos + 1..])?;
            }
            pos + 1
        };
        let end = if k + 1 < self.recorded {
            self.separators[k + 1]
        } else if complete {
            self.segment.len()
        } else {
            let rest = &self.segment[start..];
            start + memchr(self.encoding.field, rest).unwrap_or(rest.len())
        };
        Some((start, end))
    }

    /// Component `c` (1-based) of the first repetition of field MSH-`n`, raw.
    ///
    /// A field without component separators has one component. MSH-1 and MSH-2 are never
    /// split: their only component is the whole field.
    pub fn component(&self, n: usize, c: usize) -> Option<&'a [u8]> {
        let field = self.field(n)?;
        if n <= 2 {
            return (c == 1).then_some(field);
        }
        let first = match memchr(self.encoding.repetition, field) {
            Some(end) => &field[..end],
            None => field,
        };
        first
            .split(|&b| b == self.encoding.component)
            .nth(c.checked_sub(1)?)
    }

    /// MSH-10, the message control id, which an ACK echoes in MSA-2.
    ///
    /// `None` when absent or empty, and also when MSH-10 is the last field of an unterminated
    /// segment: then the input may have been cut inside it (a valid MSH always has MSH-11 and
    /// MSH-12 after it), and a NAK that named a truncated id could be matched to the wrong
    /// message by the sender.
    pub fn control_id(&self) -> Option<&'a [u8]> {
        let id = non_empty(self.field(10))?;
        if !self.terminated && self.field(11).is_none() {
            return None;
        }
        Some(id)
    }

    /// MSH-9.1, the message code (`ADT`, `ORU`, ...).
    pub fn message_type(&self) -> Option<&'a [u8]> {
        non_empty(self.component(9, 1))
    }

    /// MSH-9.2, the trigger event (`A01`, `R01`, ...).
    pub fn trigger_event(&self) -> Option<&'a [u8]> {
        non_empty(self.component(9, 2))
    }

    /// MSH-11, the processing id (`P`, `T`, `D`, possibly with a mode component), raw.
    pub fn processing_id(&self) -> Option<&'a [u8]> {
        non_empty(self.field(11))
    }

    /// MSH-12, the version id (`2.5.1`, ...), raw.
    pub fn version(&self) -> Option<&'a [u8]> {
        non_empty(self.field(12))
    }

    /// MSH-18, the character set (`UNICODE UTF-8`, `8859/1`, ...), raw, repetitions included.
    pub fn charset(&self) -> Option<&'a [u8]> {
        non_empty(self.field(18))
    }
}

/// HL7 treats an empty field as not present.
fn non_empty(field: Option<&[u8]>) -> Option<&[u8]> {
    field.filter(|f| !f.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADT: &[u8] = b"MSH|^~\\&|LAB|HOSP|EHR|WARD|20260101120000||ADT^A01^ADT_A01|MSG00042|P^T|2.5.1|||AL|NE||UNICODE UTF-8\rEVN|A01\rPID|1||123\r";

    /// The word-at-a-time separator index agrees with a plain byte loop on every length and
    /// alignment, separators at every position (including every byte of an 8-byte word and
    /// high bytes that could carry into a neighbour), and an index that fills up.
    #[test]
    fn the_separator_index_matches_a_byte_loop() {
        let mut state = 0x9E37_79B9_7F4A_7C15_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for len in 0..80 {
            for _ in 0..200 {
                let segment: Vec<u8> = (0..len)
                    .map(|_| match next() % 4 {
                        0 => b'|',
                        1 => 0x80 | (next() as u8),
                        2 => b'|' ^ 1,
                        _ => next() as u8,
                    })
                    .collect();
                let mut expected = vec![3];
                for (i, &b) in segment.iter().enumerate().skip(4) {
                    if b == b'|' && expected.len() < INDEXED_SEPARATORS {
                        expected.push(i);
                    }
                }
                let mut separators = [0; INDEXED_SEPARATORS];
                separators[0] = 3;
                let recorded = index_separators(&segment, b'|', &mut separators);
                assert_eq!(&separators[..recorded], &expected[..], "{segment:?}");
            }
        }
    }

    #[test]
    fn reads_standard_fields() {
        let msh = Msh::parse(ADT).unwrap();
        assert!(msh.is_terminated());
        assert_eq!(msh.encoding(), Encoding::DEFAULT);
        assert_eq!(msh.field(1), Some(&b"|"[..]));
        assert_eq!(msh.field(2), Some(&b"^~\\&"[..]));
        assert_eq!(msh.field(3), Some(&b"LAB"[..]));
        assert_eq!(msh.field(6), Some(&b"WARD"[..]));
        assert_eq!(msh.field(8), Some(&b""[..]));
        assert_eq!(msh.field(9), Some(&b"ADT^A01^ADT_A01"[..]));
        assert_eq!(msh.component(9, 3), Some(&b"ADT_A01"[..]));
        assert_eq!(msh.component(9, 4), None);
        assert_eq!(msh.component(9, 0), None);
        assert_eq!(msh.control_id(), Some(&b"MSG00042"[..]));
        assert_eq!(msh.processing_id(), Some(&b"P^T"[..]));
        assert_eq!(msh.version(), Some(&b"2.5.1"[..]));
        assert_eq!(msh.charset(), Some(&b"UNICODE UTF-8"[..]));
        assert_eq!(msh.field(19), None);
        assert_eq!(msh.field(0), None);
        assert_eq!(
            msh.as_bytes(),
            &ADT[..ADT.iter().position(|&b| b == b'\r').unwrap()]
        );
    }

    #[test]
    fn named_accessors_treat_empty_as_absent() {
        let msh = Msh::parse(b"MSH|^~\\&|||||||^|||\r").unwrap();
        assert_eq!(msh.field(10), Some(&b""[..]));
        assert_eq!(msh.control_id(), None);
        assert_eq!(msh.message_type(), None);
        assert_eq!(msh.trigger_event(), None);
        assert_eq!(msh.processing_id(), None);
        assert_eq!(msh.version(), None);
        assert_eq!(msh.charset(), None);
    }

    #[test]
    fn components_come_from_the_first_repetition() {
        let msh = Msh::parse(b"MSH|^~\\&|A^B~C^D|X\r").unwrap();
        assert_eq!(msh.component(3, 2), Some(&b"B"[..]));
        assert_eq!(msh.component(3, 3), None);
        assert_eq!(msh.component(2, 1), Some(&b"^~\\&"[..]));
        assert_eq!(msh.component(2, 2), None);
        assert_eq!(msh.component(1, 1), Some(&b"|"[..]));
    }

    #[test]
    fn honours_unusual_separators() {
        let msh = Msh::parse(b"MSH#*%$!#APP*X#FAC#R#F#1##ORU*R01#ID#P#2.3\n").unwrap();
        let enc = msh.encoding();
        assert_eq!(
            (
                enc.field,
                enc.component,
                enc.repetition,
                enc.escape,
                enc.subcomponent
            ),
            (b'#', b'*', b'%', b'$', b'!')
        );
        assert_eq!(msh.component(3, 2), Some(&b"X"[..]));
        assert_eq!(msh.trigger_event(), Some(&b"R01"[..]));
        assert_eq!(msh.control_id(), Some(&b"ID"[..]));
        assert_eq!(msh.version(), Some(&b"2.3"[..]));
    }

    #[test]
    fn short_msh2_falls_back_to_defaults_and_five_chars_declare_truncation() {
        let enc = Msh::parse(b"MSH|^~|A\r").unwrap().encoding();
        assert_eq!(
            (enc.escape, enc.subcomponent, enc.truncation),
            (b'\\', b'&', None)
        );
        let enc = Msh::parse(b"MSH|^~\\&#|A\r").unwrap().encoding();
        assert_eq!(enc.truncation, Some(b'#'));
        assert_eq!(enc.encoding_characters(), (*b"^~\\&#", 5));
    }

    #[test]
    fn errors() {
        assert_eq!(Msh::parse(b"").unwrap_err(), MshError::TooShort);
        assert_eq!(Msh::parse(b"MS").unwrap_err(), MshError::TooShort);
        assert_eq!(Msh::parse(b"MSH").unwrap_err(), MshError::TooShort);
        assert_eq!(Msh::parse(b"MSH\r|^~").unwrap_err(), MshError::TooShort);
        assert_eq!(Msh::parse(b"PID|1").unwrap_err(), MshError::NoMsh);
        assert_eq!(Msh::parse(b" MSH|^~\\&|").unwrap_err(), MshError::NoMsh);
        assert_eq!(Msh::parse(b"MSH|").unwrap_err(), MshError::MissingEncoding);
        assert_eq!(
            Msh::parse(b"MSH||A|B").unwrap_err(),
            MshError::MissingEncoding
        );
        assert_eq!(
            Msh::parse(b"MSH|^~\\&#X|").unwrap_err(),
            MshError::BadSeparator
        );
        assert_eq!(
            Msh::parse(b"MSH|^^\\&|").unwrap_err(),
            MshError::BadSeparator
        );
        // `&` as field separator collides with the default-filled subcomponent separator.
        assert_eq!(
            Msh::parse(b"MSH&^~\\&X").unwrap_err(),
            MshError::BadSeparator
        );
        assert_eq!(
            Msh::parse(b"MSHA^~\\&A").unwrap_err(),
            MshError::BadSeparator
        );
        assert_eq!(
            Msh::parse(b"MSH\x1c^~\\&\x1c").unwrap_err(),
            MshError::BadSeparator
        );
        assert_eq!(
            Msh::parse(b"MSH.^~\\&.").unwrap_err(),
            MshError::BadSeparator
        );
        assert_eq!(
            MshError::NoMsh.to_string(),
            "message does not start with an MSH segment"
        );
    }

    #[test]
    fn prefix_cut_inside_msh10_hides_the_control_id() {
        let cut = b"MSH|^~\\&|A|B|C|D|20260101||ADT^A01|12";
        let msh = Msh::parse(cut).unwrap();
        assert!(!msh.is_terminated());
        assert_eq!(msh.field(10), Some(&b"12"[..]));
        assert_eq!(msh.control_id(), None);
        // One more byte shows MSH-10 ended; a terminated segment is complete as it is.
        assert_eq!(
            Msh::parse(b"MSH|^~\\&|A|B|C|D|20260101||ADT^A01|12|")
                .unwrap()
                .control_id(),
            Some(&b"12"[..])
        );
        assert_eq!(
            Msh::parse(b"MSH|^~\\&|A|B|C|D|20260101||ADT^A01|12\r")
                .unwrap()
                .control_id(),
            Some(&b"12"[..])
        );
        // A one-segment message without its final CR still has MSH-10 (followed by MSH-11).
        let one = Msh::parse(b"MSH|^~\\&|A|B|C|D|20260101||ADT^A01|12|P|2.5").unwrap();
        assert_eq!(
            (one.control_id(), one.version()),
            (Some(&b"12"[..]), Some(&b"2.5"[..]))
        );
    }

    #[test]
    fn fields_past_the_index_are_found_by_scanning() {
        let mut msg = b"MSH|^~\\&".to_vec();
        for i in 3..=40 {
            msg.push(b'|');
            msg.extend_from_slice(i.to_string().as_bytes());
        }
        let msh = Msh::parse(&msg).unwrap();
        for i in 3..=40 {
            assert_eq!(msh.field(i), Some(i.to_string().as_bytes()), "MSH-{i}");
        }
        assert_eq!(msh.field(41), None);
        assert_eq!(msh.field(usize::MAX), None);
        assert_eq!(msh.component(usize::MAX, usize::MAX), None);
    }
}
