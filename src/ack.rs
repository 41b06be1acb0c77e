//! ACK / NAK builder and ACK parser, on raw bytes.
//!
//! The builder reads the incoming message's MSH with [`Msh`] (no full HL7 parse) and writes an
//! original-mode acknowledgment in the message's own separators:
//!
//! ```text
//! MSH|^~\&|<MSH-5>|<MSH-6>|<MSH-3>|<MSH-4>|<now>||ACK^<MSH-9.2>^ACK|<new id>|<MSH-11>|<MSH-12>[||||||<MSH-18>]\r
//! MSA|<code>|<MSH-10>[|<text>]\r
//! [ERR|||<error code>^<error text>^HL70357|<severity>\r]      (AE, AR, CE, CR only)
//! ```
//!
//! - Sender and receiver swap: MSH-3/4 ← the message's MSH-5/6, MSH-5/6 ← its MSH-3/4.
//! - MSH-7 is the current UTC time as `YYYYMMDDHHMMSS+0000`, or [`Ack::timestamp`].
//! - MSH-9 is `ACK^<trigger>^ACK`, or `ACK` alone when the message has no trigger event.
//! - MSH-10 is a new id, unique within the process and, with high probability, across restarts
//!   (a per-process prefix from the start time and pid, then a counter), or [`Ack::control_id`].
//! - MSH-11 and MSH-12 are copied, defaulting to `P` and `2.5.1`; MSH-18 is copied when
//!   present.
//! - MSA-2 is the message's MSH-10; MSA-3 is the optional text.
//! - Text written by us (MSA-3, ERR-3, an overriding control id) is escaped with the message's
//!   escape character: `\F\ \S\ \R\ \E\ \T\` (and `\P\` for a declared v2.7 truncation
//!   character), and CR/LF as `\X0D\`/`\X0A\`.
//! - Bytes 0x0B and 0x1C (the MLLP block characters) are written as `\X0B\`/`\X1C\` wherever
//!   they come from, so an ACK never contains bytes that would end its own frame early.
//!
//! # Size of an acknowledgment
//!
//! Each field copied from the message is cut to the length HL7 gives it (see the table), counted
//! in bytes *written*, after 0x0B/0x1C are escaped. A cut never ends inside an escape sequence
//! (`\F\`, `\X0D\`, ...) or inside a UTF-8 character. So an ACK's MSH and MSA take at most
//! about 1.5 KiB whatever the message: a 2 MiB MSH-3 of 0x0B bytes gets an ACK of a few hundred
//! bytes, and building it copies at most the capped bytes of each field. Finding the fields
//! is one pass over the MSH that stops at the end of MSH-18, the last field an ACK copies
//! (it accepts and refuses exactly what [`Msh::parse`] does). Only text the caller passes
//! (MSA-3, ERR-3, a given control id) is not cut.
//!
//! [`Ack::build`] and [`Ack::build_coded`] keep, per thread, the last few senders' MSHs and
//! the parts of their ACKs' MSH written from them: a message whose MSH differs from one of
//! them only in MSH-7 and MSH-10 (the next message from the same sender, usually) skips the
//! pass and most of the writing, and gets the same bytes.
//!
//! | ACK field | copied from | at most (bytes) | HL7 length |
//! |---|---|---|---|
//! | MSH-3..6 | MSH-5, 6, 3, 4 | [`MAX_PARTY_LEN`] = 227 | HD, v2.5.1 |
//! | MSH-9.2 | MSH-9.2 | 15 | MSG (all of MSH-9), v2.5.1 |
//! | MSH-11 | MSH-11 | 3 | PT, v2.5.1 |
//! | MSH-12 | MSH-12 | 60 | VID, v2.5.1 |
//! | MSH-18 | MSH-18 | 67 | ID 16 per repetition, four repetitions |
//! | MSA-2 | MSH-10 | [`MAX_CONTROL_ID_LEN`] = 199 | ST, v2.7 |
//!
//! # MSA-2 and correlation
//!
//! MSA-2 is MSH-10 written the way every copied field is: 0x0B and 0x1C escaped, cut at 199
//! bytes. [`echoed_control_id`] returns exactly those bytes, and [`crate::Client`] matches an
//! ACK's MSA-2 against them (or against MSH-10 as sent, for receivers that echo it raw), so a
//! control id holding block bytes, or longer than the cap, still correlates.
//!
//! # When the message has no usable MSH
//!
//! An ACK is built for any input and building never panics. If [`Msh::parse`] fails (no `MSH`,
//! cut off before MSH-2, unusable separators), or MSH-10 is missing (or may be cut short, see
//! [`Msh::control_id`]), the sender cannot be told which message is meant, so the code becomes a reject (AR, or CR for a commit code) whatever
//! was asked for, MSA-2 is empty, and the separators are `|^~\&`.
//!
//! # ERR segment
//!
//! AE, AR, CE and CR always carry an ERR segment in the HL7 v2.5 layout (ERR-3 *HL7 error
//! code*, a CWE from table 0357, and ERR-4 *severity*, table 0516), whatever the message's
//! version, because a v2.5+ receiver expects one on a NAK. Defaults come from table 0357:
//!
//! | Situation | ERR-3 |
//! |---|---|
//! | no readable MSH | `100^Segment sequence error` (0357: "required segments are missing") |
//! | MSH without MSH-10 | `101^Required field missing` |
//! | otherwise | `207^Application internal error` |
//!
//! [`Ack::error`] overrides the code, text and severity (default `E`). Accept codes never carry
//! an ERR.
//!
//! # Examples
//!
//! ```
//! use std::time::{Duration, UNIX_EPOCH};
//! use mllp_reactor::ack::{self, Ack, AckCode};
//!
//! let msg = b"MSH|^~\\&|LAB|HOSP|EHR|WARD|20260101120000||ADT^A01^ADT_A01|42|P|2.5.1\rPID|1\r";
//!
//! // What a server sends: a new id and the current time each call.
//! let reply = ack::accept(msg);
//! assert_eq!(ack::parse(&reply)?.code, AckCode::AA);
//!
//! // Fixed id and time, to show the exact bytes.
//! let nak = Ack::new(AckCode::AE)
//!     .text("no bed free|ward 3")
//!     .control_id("ACK1")
//!     .timestamp(UNIX_EPOCH + Duration::from_secs(1_767_268_800))
//!     .build(msg);
//! assert_eq!(
//!     &nak[..],
//!     &b"MSH|^~\\&|EHR|WARD|LAB|HOSP|20260101120000+0000||ACK^A01^ACK|ACK1|P|2.5.1\r\
//!        MSA|AE|42|no bed free\\F\\ward 3\r\
//!        ERR|||207^Application internal error^HL70357|E\r"[..]
//! );
//!
//! // What a client does with a reply.
//! let parsed = ack::parse(&nak)?;
//! assert_eq!(parsed.code, AckCode::AE);
//! assert_eq!(parsed.control_id, b"42");
//! assert_eq!(parsed.text, Some(&b"no bed free\\F\\ward 3"[..]));
//! # Ok::<(), ack::AckParseError>(())
//! ```

use std::borrow::Cow;
use std::cell::RefCell;
use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use memchr::memchr2;

// CARRIAGE_RETURN ends every segment (HL7 v2.5 §2.5.2). START_BLOCK and END_BLOCK are never
// written raw: a receiver would take the first as a new frame, and the second followed by our
// CR as the end of this one.
use crate::codec::{CARRIAGE_RETURN, END_BLOCK, START_BLOCK};
use crate::msh::{Encoding, LINE_FEED, Msh, MshError};

mod arena;
mod fields;
mod id;
mod memo;
pub(crate) use fields::Fields;
pub(crate) use memo::Memo;

use id::Ids;

/// ERR-3 for a message without a readable MSH (table 0357, code 100).
const SEGMENT_SEQUENCE_ERROR: (&str, &str) = ("100", "Segment sequence error");
/// ERR-3 for an MSH without MSH-10 (table 0357, code 101).
const REQUIRED_FIELD_MISSING: (&str, &str) = ("101", "Required field missing");
/// ERR-3 for any other NAK (table 0357, code 207).
const APPLICATION_INTERNAL_ERROR: (&str, &str) = ("207", "Application internal error");

/// MSH-11 when the message has none: production.
const DEFAULT_PROCESSING_ID: &[u8] = b"P";
/// MSH-12 when the message has none: 2.5.1, the version most v2 receivers in use accept.
const DEFAULT_VERSION: &[u8] = b"2.5.1";

/// Longest copy of MSH-3, MSH-4, MSH-5 and MSH-6, in bytes written: 227, the length HL7
/// v2.5.1 (chapter 2, MSH segment table) gives the HD data type of these fields.
pub const MAX_PARTY_LEN: usize = 227;
/// Longest copy of the trigger event (MSH-9.2): 15, the length HL7 v2.5.1 gives the whole of
/// MSH-9 (MSG), which the component cannot exceed.
const MAX_TRIGGER_LEN: usize = 15;
/// Longest copy of MSH-10 into MSA-2, in bytes written: 199, the length HL7 v2.7 and later give
/// MSH-10 (ST; v2.5.1 said 20, and longer ids are common in practice, so the larger limit).
pub const MAX_CONTROL_ID_LEN: usize = 199;
/// Longest copy of MSH-11: 3, the length HL7 v2.5.1 gives PT (`P^T`).
const MAX_PROCESSING_ID_LEN: usize = 3;
/// Longest copy of MSH-12: 60, the length HL7 v2.5.1 gives VID.
const MAX_VERSION_LEN: usize = 60;
/// Longest copy of MSH-18: 67, four repetitions of the 16 bytes HL7 v2.5.1 gives each
/// repetition (ID), with their three repetition separators.
const MAX_CHARSET_LEN: usize = 67;

/// Latest time MSH-7 can show with four year digits, 9999-12-31 23:59:59 UTC, in Unix seconds.
/// Later clocks are clamped so the timestamp keeps its shape.
const MAX_TIMESTAMP_SECS: u64 = 253_402_300_799;

/// An acknowledgment code, MSA-1 (HL7 table 0008).
///
/// `A*` codes are original-mode (application) acknowledgments, `C*` codes enhanced-mode commit
/// acknowledgments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AckCode {
    /// Application accept.
    AA,
    /// Application error: the message was understood but processing failed.
    AE,
    /// Application reject: the message was not processed (bad header, or a problem unrelated to
    /// it).
    AR,
    /// Commit accept.
    CA,
    /// Commit error.
    CE,
    /// Commit reject.
    CR,
}

impl AckCode {
    /// Every code, for the tests and the fuzz targets.
    pub(crate) const ALL: [Self; 6] = [Self::AA, Self::AE, Self::AR, Self::CA, Self::CE, Self::CR];

    /// The code as written in MSA-1.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::AA => "AA",
            Self::AE => "AE",
            Self::AR => "AR",
            Self::CA => "CA",
            Self::CE => "CE",
            Self::CR => "CR",
        }
    }

    /// Whether the code accepts the message (AA or CA).
    pub const fn is_accept(self) -> bool {
        matches!(self, Self::AA | Self::CA)
    }

    /// Reads an MSA-1 value; `None` for anything but the six codes.
    pub fn from_bytes(code: &[u8]) -> Option<Self> {
        Some(match code {
            b"AA" => Self::AA,
            b"AE" => Self::AE,
            b"AR" => Self::AR,
            b"CA" => Self::CA,
            b"CE" => Self::CE,
            b"CR" => Self::CR,
            _ => return None,
        })
    }

    /// The reject of the same mode, for a message we cannot identify.
    const fn to_reject(self) -> Self {
        match self {
            Self::AA | Self::AE | Self::AR => Self::AR,
            Self::CA | Self::CE | Self::CR => Self::CR,
        }
    }
}

impl fmt::Display for AckCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error severity, ERR-4 (HL7 table 0516).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Severity {
    /// `E`: the message was not (fully) processed. The default.
    Error,
    /// `W`: processed, with a warning.
    Warning,
    /// `I`: processed; for information only.
    Information,
}

impl Severity {
    /// The code as written in ERR-4.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Error => "E",
            Self::Warning => "W",
            Self::Information => "I",
        }
    }
}

/// An acknowledgment to build: the code and options, without the message.
///
/// Borrows its text; building writes in one pass straight into a buffer with room made for
/// the longest form the ACK can take.
///
/// # Examples
///
/// ```
/// use mllp_reactor::ack::{Ack, AckCode, Severity};
///
/// let msg = b"MSH|^~\\&|LAB|HOSP|EHR|WARD|20260101120000||ORU^R01|7|P|2.5.1\r";
/// let nak = Ack::new(AckCode::AR)
///     .text("unknown patient")
///     .error("204", "Unknown key identifier", Severity::Error)
///     .build(msg);
/// assert!(nak.ends_with(b"\rERR|||204^Unknown key identifier^HL70357|E\r"));
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Ack<'a> {
    code: AckCode,
    text: &'a str,
    error: Option<ErrorDetail<'a>>,
    control_id: Option<&'a str>,
    timestamp: Option<SystemTime>,
}

/// ERR-3 and ERR-4 as given to [`Ack::error`].
#[derive(Debug, Clone, Copy)]
struct ErrorDetail<'a> {
    code: &'a str,
    text: &'a str,
    severity: Severity,
}

impl<'a> Ack<'a> {
    /// An acknowledgment with `code`, no text, a generated id and the current time.
    pub fn new(code: AckCode) -> Self {
        Self {
            code,
            text: "",
            error: None,
            control_id: None,
            timestamp: None,
        }
    }

    /// Sets MSA-3, the text message (escaped when written). Empty means none.
    pub fn text(self, text: &'a str) -> Self {
        Self { text, ..self }
    }

    /// Sets ERR-3 (`code`, `text`, coding system `HL70357`) and ERR-4 (`severity`) for a NAK,
    /// replacing the defaults described in the [module docs](self). Ignored for AA and CA.
    pub fn error(self, code: &'a str, text: &'a str, severity: Severity) -> Self {
        let error = Some(ErrorDetail {
            code,
            text,
            severity,
        });
        Self { error, ..self }
    }

    /// Uses `id` as the ACK's own MSH-10 (escaped when written) instead of a generated one.
    pub fn control_id(self, id: &'a str) -> Self {
        Self {
            control_id: Some(id),
            ..self
        }
    }

    /// Uses `time` for MSH-7 instead of the current time.
    pub fn timestamp(self, time: SystemTime) -> Self {
        Self {
            timestamp: Some(time),
            ..self
        }
    }

    /// Builds the acknowledgment of `message` (the unframed payload, or any prefix of it).
    ///
    /// Usually allocates nothing: the bytes are cut from a 4 KiB buffer kept per thread,
    /// whose space is reused once every acknowledgment cut from it is dropped. So a
    /// `Bytes` kept for long may keep up to 4 KiB alive; copy it to keep it.
    pub fn build(&self, message: &[u8]) -> Bytes {
        self.build_coded(message).1
    }

    /// Builds the acknowledgment of `message` as [`build`](Self::build) does, and says which
    /// code it carries: the one asked for, or its reject form (AR, CR) when `message` has no
    /// usable MSH-10 (see the [module docs](self)). For a caller that logs or counts what it
    /// sent without reading the bytes back.
    ///
    /// ```
    /// use mllp_reactor::ack::{Ack, AckCode};
    ///
    /// let (code, _) = Ack::new(AckCode::AA).build_coded(b"MSH|^~\\&|A|B|C|D|20260101||ADT^A01|7|P|2.5\r");
    /// assert_eq!(code, AckCode::AA);
    /// let (code, _) = Ack::new(AckCode::AA).build_coded(b"MSH|^~\\&|A|B|C|D|20260101||ADT^A01||P|2.5\r");
    /// assert_eq!(code, AckCode::AR);
    /// ```
    pub fn build_coded(&self, message: &[u8]) -> (AckCode, Bytes) {
        let built = LOCAL.try_with(|local| {
            let Local { memo, ids, arena } = &mut *local.borrow_mut();
            self.with_plan_remembered(message, self.own_id(ids), memo, |plan| {
                (plan.code, arena::build(arena, plan))
            })
        });
        built.unwrap_or_else(|_| {
            // The thread is exiting: without what it kept.
            let mut ids = Ids::new();
            let id = self.own_id(&mut ids);
            self.with_plan(Fields::scan(message), id, |plan| {
                (plan.code, arena::alone(plan))
            })
        })
    }

    /// Appends the acknowledgment of `message` to `out`, reserving the exact space first.
    pub fn build_into(&self, message: &[u8], out: &mut Vec<u8>) {
        self.emit_into(message, out);
    }

    /// What [`build_into`](Self::build_into) appends, with the message's fields read through
    /// [`Msh`]'s accessors instead of [`Fields::scan`] and written without a [`Memo`]: the
    /// reference the fuzz target and the tests hold the scan and the memo to.
    pub(crate) fn build_with_msh(&self, message: &[u8]) -> Vec<u8> {
        let msh = Msh::parse(message).ok();
        let mut ids = Ids::new();
        let id = self.own_id(&mut ids);
        let mut out = Vec::new();
        self.with_plan(msh.as_ref().map(Fields::from_msh), id, |plan| {
            plan.emit_exact(&mut out)
        });
        out
    }

    /// What [`build_into`](Self::build_into) appends, built through `memo` as
    /// [`build_coded`](Self::build_coded) builds through the thread's: for the tests and the
    /// fuzz target, which hold it to [`build_with_msh`](Self::build_with_msh).
    pub(crate) fn build_with_memo(&self, message: &[u8], memo: &mut Memo) -> Vec<u8> {
        let mut ids = Ids::new();
        let mut out = Vec::new();
        self.with_plan_remembered(message, self.own_id(&mut ids), memo, |plan| {
            plan.emit_exact(&mut out)
        });
        out
    }

    /// [`build_into`](Self::build_into), returning the code written.
    fn emit_into(&self, message: &[u8], out: &mut Vec<u8>) -> AckCode {
        let mut ids = Ids::new();
        let id = self.own_id(&mut ids);
        self.with_plan(Fields::scan(message), id, |plan| {
            plan.emit_exact(out);
            plan.code
        })
    }

    /// Calls `f` with the plan of the ACK of `message` built through `memo`: with the pieces
    /// of the ACK's MSH it remembers when it recalls `message`, otherwise from a scan that
    /// `memo` then learns (and the ACK is written from what it learned) when it can.
    ///
    /// (A continuation, so that what the plan borrows can live here: a plan holding its
    /// fields by value was large enough to be moved with a `memcpy` call, about 30
    /// instructions per message.)
    fn with_plan_remembered<R>(
        &self,
        message: &[u8],
        id: ControlId<'_>,
        memo: &mut Memo,
        f: impl FnOnce(&Plan<'_>) -> R,
    ) -> R {
        let time = self.time();
        if let Some(control_id) = memo.recall(message, time) {
            let source = Source {
                encoding: memo.encoding(),
                header: Header::Written(memo.pieces()),
                msa2: &message[control_id],
                // MSH-10 holds no control byte, so no MLLP block byte.
                raw_needs_escape: false,
            };
            return f(&self.plan_with(Some(source), id));
        }
        let Some((fields, layout)) = Fields::scan_laid_out(message) else {
            return self.with_plan(None, id, f);
        };
        let second = hl7_second(time);
        let copied = Copied::of(&fields, second.text);
        let header = match layout.and_then(|layout| {
            memo.place()?
                .learn(message, layout, &fields, &copied, second)
        }) {
            Some(pieces) => Header::Written(pieces),
            None => Header::Copied(&copied),
        };
        let source = Source {
            encoding: fields.encoding,
            header,
            msa2: fields.control_id,
            raw_needs_escape: fields.block_bytes,
        };
        f(&self.plan_with(Some(source), id))
    }

    /// Calls `f` with the plan of the ACK of a message with MSH fields `fields` (`None`: no
    /// readable MSH).
    fn with_plan<R>(
        &self,
        fields: Option<Fields<'_>>,
        id: ControlId<'_>,
        f: impl FnOnce(&Plan<'_>) -> R,
    ) -> R {
        let time = hl7_timestamp(self.time());
        let Some(fields) = fields else {
            return f(&self.plan_with(None, id));
        };
        let copied = Copied::of(&fields, time);
        let source = Source {
            encoding: fields.encoding,
            header: Header::Copied(&copied),
            msa2: fields.control_id,
            raw_needs_escape: fields.block_bytes,
        };
        f(&self.plan_with(Some(source), id))
    }

    /// The ACK's own MSH-10: the one given, or a new one from `ids`.
    fn own_id<'p>(&'p self, ids: &'p mut Ids) -> ControlId<'p> {
        match self.control_id {
            Some(id) => ControlId::Given(id.as_bytes()),
            None => ControlId::Generated(ids.next()),
        }
    }

    /// MSH-7's time: the one given, or now.
    fn time(&self) -> SystemTime {
        self.timestamp.unwrap_or_else(SystemTime::now)
    }

    /// Resolves every part of the ACK from what it takes from the message (`None`: no
    /// readable MSH: then nothing, in the default separators, at MSH-7's time) and the
    /// options.
    #[inline(always)]
    fn plan_with<'p>(&'p self, source: Option<Source<'p>>, id: ControlId<'p>) -> Plan<'p> {
        let msa2 = source.as_ref().map_or(&[][..], |s| s.msa2);
        let (code, (err_code, err_text)) = match source {
            None => (self.code.to_reject(), SEGMENT_SEQUENCE_ERROR),
            Some(_) if msa2.is_empty() => (self.code.to_reject(), REQUIRED_FIELD_MISSING),
            Some(_) => (self.code, APPLICATION_INTERNAL_ERROR),
        };
        let error = (!code.is_accept()).then(|| {
            self.error.unwrap_or(ErrorDetail {
                code: err_code,
                text: err_text,
                severity: Severity::Error,
            })
        });
        let source = source.unwrap_or_else(|| Source {
            encoding: Encoding::DEFAULT,
            header: Header::Unreadable(hl7_timestamp(self.time())),
            msa2: &[],
            raw_needs_escape: false,
        });
        Plan {
            encoding: source.encoding,
            code,
            header: source.header,
            id,
            msa2,
            raw_needs_escape: source.raw_needs_escape,
            text: self.text.as_bytes(),
            error,
        }
    }
}

/// What the builder keeps per thread: the last message's MSH and its ACK's pieces
/// ([`memo`]), the last control id generated ([`id`]), and the buffer ACKs are cut from
/// ([`arena`]). One thread-local for the three: each access and borrow was about 20
/// instructions per message (callgrind).
struct Local {
    memo: Memo,
    ids: Ids,
    arena: BytesMut,
}

thread_local! {
    static LOCAL: RefCell<Local> = RefCell::new(Local {
        memo: Memo::new(),
        ids: Ids::new(),
        arena: BytesMut::new(),
    });
}

/// Builds an AA for `message`: the usual reply of a handler that took the message.
///
/// An AR (see the [module docs](self)) if `message` has no usable MSH or no MSH-10.
pub fn accept(message: &[u8]) -> Bytes {
    Ack::new(AckCode::AA).build(message)
}

/// Builds a NAK for `message` with `code` (normally AE or AR), MSA-3 `text` and the default ERR.
///
/// The server uses it with AE for a failed handler and with AR for an oversize frame, passing
/// the part of the frame received so far. An accept code gives an ACK with text and no ERR.
pub fn nak(message: &[u8], code: AckCode, text: &str) -> Bytes {
    Ack::new(code).text(text).build(message)
}

/// MSA-1 of a reply a handler returned, if it is an acknowledgment: the first segment that
/// starts `MSA` and the field separator (MSH-1). No MSH parse and no allocation: the server
/// reads it off every reply to count the NAKs handlers send.
pub(crate) fn reply_code(reply: &[u8]) -> Option<AckCode> {
    let sep = *reply.get(3)?;
    let mut rest = reply;
    loop {
        let end = memchr2(CARRIAGE_RETURN, LINE_FEED, rest).unwrap_or(rest.len());
        let segment = &rest[..end];
        if segment.starts_with(b"MSA") && segment.get(3) == Some(&sep) {
            let code = &segment[4..];
            let code = &code[..code.iter().position(|&b| b == sep).unwrap_or(code.len())];
            return AckCode::from_bytes(code);
        }
        rest = rest.get(end + 1..)?;
    }
}

/// The fields of a received acknowledgment that a sender needs, borrowed from its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ParsedAck<'a> {
    /// MSA-1.
    pub code: AckCode,
    /// MSA-2: the MSH-10 of the message acknowledged; empty if absent. Raw (not unescaped).
    pub control_id: &'a [u8],
    /// MSA-3, raw (escape sequences not decoded); `None` if absent or empty.
    pub text: Option<&'a [u8]>,
    /// The acknowledgment's own MSH-10, if present.
    pub message_control_id: Option<&'a [u8]>,
}

/// Why [`parse`] could not read an acknowledgment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AckParseError {
    /// The reply does not start with a readable MSH segment.
    Msh(MshError),
    /// No MSA segment follows the MSH.
    NoMsa,
    /// MSA-1 is not one of AA, AE, AR, CA, CE, CR.
    BadCode,
}

impl fmt::Display for AckParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Msh(_) => "ack has no readable MSH segment",
            Self::NoMsa => "ack has no MSA segment",
            Self::BadCode => "MSA-1 is not an acknowledgment code",
        })
    }
}

impl std::error::Error for AckParseError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Msh(e) => Some(e),
            Self::NoMsa | Self::BadCode => None,
        }
    }
}

/// Reads an acknowledgment: its MSH, then the first MSA segment after it.
///
/// Segments may end with CR, LF or CR LF. Other segments (ERR, ...) are skipped.
///
/// # Errors
///
/// [`AckParseError`] when there is no readable MSH, no MSA, or MSA-1 is not a known code.
pub fn parse(ack: &[u8]) -> Result<ParsedAck<'_>, AckParseError> {
    let msh = Msh::parse(ack).map_err(AckParseError::Msh)?;
    let sep = msh.field_separator();
    let mut rest = &ack[msh.as_bytes().len()..];
    let msa = loop {
        let end = memchr2(CARRIAGE_RETURN, LINE_FEED, rest).unwrap_or(rest.len());
        let segment = &rest[..end];
        if segment.starts_with(b"MSA") && segment.get(3) == Some(&sep) {
            break segment;
        }
        rest = rest.get(end + 1..).ok_or(AckParseError::NoMsa)?;
    };
    let mut fields = msa[4..].split(|&b| b == sep);
    let code = fields
        .next()
        .and_then(AckCode::from_bytes)
        .ok_or(AckParseError::BadCode)?;
    Ok(ParsedAck {
        code,
        control_id: fields.next().unwrap_or_default(),
        text: fields.next().filter(|text| !text.is_empty()),
        message_control_id: msh.control_id(),
    })
}

/// What an ACK takes from a message with a readable MSH.
struct Source<'p> {
    encoding: Encoding,
    header: Header<'p>,
    /// The message's MSH-10; empty when it has none.
    msa2: &'p [u8],
    /// Whether the copied fields may hold MLLP block bytes, which [`put_raw`] must escape.
    raw_needs_escape: bool,
}

/// The ACK's MSH but for MSH-10 (its own id): the fields to copy and MSH-7, the same already
/// written by [`Copied`] for an earlier message with the same fields (see [`memo`]), or,
/// for a message without a readable MSH, only MSH-7 ([`Copied::none`]).
enum Header<'p> {
    Copied(&'p Copied<'p>),
    Written(Pieces<'p>),
    Unreadable([u8; 19]),
}

/// What the ACK's MSH copies from the message's, in the ACK's order, defaults applied, and
/// MSH-7.
pub(crate) struct Copied<'p> {
    /// The message's MSH-5, MSH-6, MSH-3, MSH-4: the ACK's MSH-3..6.
    parties: [&'p [u8]; 4],
    /// MSH-9.2; empty: MSH-9 is `ACK` alone.
    trigger: &'p [u8],
    processing_id: &'p [u8],
    version: &'p [u8],
    /// Empty: MSH-18 is left out.
    charset: &'p [u8],
    /// MSH-7, as [`hl7_timestamp`] writes it.
    time: [u8; 19],
}

/// [`Copied`] written: the ACK's MSH up to MSH-10, and after MSH-10.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Pieces<'p> {
    /// `MSH|^~\&|<MSH-5>|<MSH-6>|<MSH-3>|<MSH-4>|<MSH-7>||ACK^<MSH-9.2>^ACK|`
    stamped: &'p [u8],
    /// `|<MSH-11>|<MSH-12>[||||||<MSH-18>]\rMSA|`
    tail: &'p [u8],
}

impl<'p> Copied<'p> {
    /// What an ACK of a message without a readable MSH copies: nothing, and the defaults.
    fn none(time: [u8; 19]) -> Self {
        Copied {
            parties: [&[]; 4],
            trigger: &[],
            processing_id: DEFAULT_PROCESSING_ID,
            version: DEFAULT_VERSION,
            charset: &[],
            time,
        }
    }

    fn of(fields: &Fields<'p>, time: [u8; 19]) -> Self {
        let or =
            |field: &'p [u8], default: &'p [u8]| if field.is_empty() { default } else { field };
        let [msh3, msh4, msh5, msh6] = fields.parties;
        Self {
            parties: [msh5, msh6, msh3, msh4],
            trigger: fields.trigger,
            processing_id: or(fields.processing_id, DEFAULT_PROCESSING_ID),
            version: or(fields.version, DEFAULT_VERSION),
            charset: fields.charset,
            time,
        }
    }

    /// At least the length [`emit_stamped`](Self::emit_stamped) and
    /// [`emit_tail`](Self::emit_tail) write, less [`Plan::max_len`]'s fixed part.
    fn max_len(&self) -> usize {
        let parties: usize = self.parties.iter().map(|p| raw_max(p, MAX_PARTY_LEN)).sum();
        parties
            + raw_max(self.trigger, MAX_TRIGGER_LEN)
            + raw_max(self.processing_id, MAX_PROCESSING_ID_LEN)
            + raw_max(self.version, MAX_VERSION_LEN)
            + raw_max(self.charset, MAX_CHARSET_LEN)
    }

    /// Writes [`Pieces::stamped`].
    fn emit_stamped<S: Sink>(&self, s: &mut S, enc: &Encoding, escape: bool) {
        self.emit_head(s, enc, escape);
        s.put(&self.time);
        self.emit_middle(s, enc, escape);
    }

    /// Writes the ACK's MSH up to MSH-7.
    fn emit_head<S: Sink>(&self, s: &mut S, enc: &Encoding, escape: bool) {
        let field = enc.field;
        let (chars, n) = enc.encoding_characters();
        let [c0, c1, c2, c3, c4] = chars;
        // Fixed runs go out as one array each: a constant-length copy is a few moves, while
        // each variable-length `put` is a `memcpy` call (callgrind).
        s.put(&[b'M', b'S', b'H', field, c0, c1, c2, c3]);
        if n == 5 {
            s.put_byte(c4);
        }
        for party in self.parties {
            s.put_byte(field);
            put_raw(s, enc, escape, party, MAX_PARTY_LEN);
        }
        s.put_byte(field);
    }

    /// Writes the ACK's MSH from MSH-7's closing separator (MSH-8, security, empty; MSH-9) to
    /// MSH-10's opening one.
    fn emit_middle<S: Sink>(&self, s: &mut S, enc: &Encoding, escape: bool) {
        let (field, component) = (enc.field, enc.component);
        s.put(&[field, field, b'A', b'C', b'K']);
        if !self.trigger.is_empty() {
            s.put_byte(component);
            put_raw(s, enc, escape, self.trigger, MAX_TRIGGER_LEN);
            s.put(&[component, b'A', b'C', b'K']);
        }
        s.put_byte(field);
    }

    /// Writes [`Pieces::tail`]: the ACK's MSH after MSH-10, and MSA up to MSA-1.
    fn emit_tail<S: Sink>(&self, s: &mut S, enc: &Encoding, escape: bool) {
        let field = enc.field;
        s.put_byte(field);
        put_raw(s, enc, escape, self.processing_id, MAX_PROCESSING_ID_LEN);
        s.put_byte(field);
        put_raw(s, enc, escape, self.version, MAX_VERSION_LEN);
        if !self.charset.is_empty() {
            // MSH-13..17 empty, then MSH-18.
            s.put(&[field; 6]);
            put_raw(s, enc, escape, self.charset, MAX_CHARSET_LEN);
        }
        s.put(&[CARRIAGE_RETURN, b'M', b'S', b'A', field]);
    }
}

/// At most how many bytes [`put_raw`] writes for `field` capped at `cap`: at most 5 bytes
/// per byte (`\X0B\`), and at most the cap.
fn raw_max(field: &[u8], cap: usize) -> usize {
    (field.len() * BLOCK_ESCAPE_LEN).min(cap)
}

/// Every part of one ACK, resolved. [`Plan::emit`] runs twice, into [`Count`] and then into
/// the output, so the output is allocated once at its exact size and the two can never
/// disagree about the layout.
struct Plan<'p> {
    encoding: Encoding,
    code: AckCode,
    header: Header<'p>,
    id: ControlId<'p>,
    msa2: &'p [u8],
    /// Whether the copied fields may hold MLLP block bytes, which [`put_raw`] must escape.
    raw_needs_escape: bool,
    /// Empty: MSA-3 is left out.
    text: &'p [u8],
    error: Option<ErrorDetail<'p>>,
}

impl Plan<'_> {
    /// At least the length [`emit`](Self::emit) writes, found without a pass over the text:
    /// a copied field takes at most its cap and at most 5 bytes per byte (`\X0B\`), text
    /// of ours at most 5 bytes per byte (`\X0D\`), and the fixed parts under 128 bytes.
    // Inline: a few additions per ACK, once the header is written (callgrind, S1: the call
    // was about a third of its 30 instructions).
    #[inline]
    fn max_len(&self) -> usize {
        const FIXED: usize = 128;
        let text = |text: &[u8]| text.len() * BLOCK_ESCAPE_LEN;
        let header = match &self.header {
            Header::Copied(copied) => copied.max_len(),
            Header::Written(pieces) => pieces.stamped.len() + pieces.tail.len(),
            Header::Unreadable(_) => Copied::none([0; 19]).max_len(),
        };
        let id = match &self.id {
            ControlId::Given(id) => text(id),
            ControlId::Generated(id) => id.len(),
        };
        let error = self
            .error
            .as_ref()
            .map_or(0, |e| text(e.code.as_bytes()) + text(e.text.as_bytes()));
        FIXED + header + id + raw_max(self.msa2, MAX_CONTROL_ID_LEN) + text(self.text) + error
    }

    /// Appends the ACK to `out`, reserving its exact length first (counted by a first pass).
    fn emit_exact(&self, out: &mut Vec<u8>) {
        let mut len = Count(0);
        self.emit(&mut len);
        out.reserve_exact(len.0);
        let start = out.len();
        self.emit(out);
        debug_assert_eq!(
            out.len() - start,
            len.0,
            "counted and written lengths differ"
        );
    }

    fn emit<S: Sink>(&self, s: &mut S) {
        let enc = &self.encoding;
        let (field, component) = (enc.field, enc.component);
        let escape = self.raw_needs_escape;
        let code = self.code.as_str().as_bytes();
        match &self.header {
            Header::Copied(copied) => copied.emit_stamped(s, enc, escape),
            Header::Written(pieces) => s.put(pieces.stamped),
            Header::Unreadable(time) => Copied::none(*time).emit_stamped(s, enc, escape),
        }
        match &self.id {
            ControlId::Given(id) => put_text(s, enc, id),
            ControlId::Generated(id) => s.put(id),
        }
        match &self.header {
            Header::Copied(copied) => copied.emit_tail(s, enc, escape),
            Header::Written(pieces) => s.put(pieces.tail),
            Header::Unreadable(time) => Copied::none(*time).emit_tail(s, enc, escape),
        }
        s.put(&[code[0], code[1], field]);
        put_raw(s, enc, escape, self.msa2, MAX_CONTROL_ID_LEN);
        if !self.text.is_empty() {
            s.put_byte(field);
            put_text(s, enc, self.text);
        }
        s.put_byte(CARRIAGE_RETURN);

        if let Some(error) = &self.error {
            // ERR-1 (2.4 location) and ERR-2 (location) empty; ERR-3 CWE; ERR-4 severity.
            s.put(b"ERR");
            s.put(&[field; 3]);
            put_text(s, enc, error.code.as_bytes());
            s.put_byte(component);
            put_text(s, enc, error.text.as_bytes());
            s.put_byte(component);
            s.put(b"HL70357");
            s.put_byte(field);
            s.put(error.severity.as_str().as_bytes());
            s.put_byte(CARRIAGE_RETURN);
        }
    }
}

/// Where [`Plan::emit`] writes: a byte counter or the output buffer.
trait Sink {
    fn put(&mut self, bytes: &[u8]);
    fn put_byte(&mut self, byte: u8);
}

/// Counts what would be written.
struct Count(usize);

impl Sink for Count {
    fn put(&mut self, bytes: &[u8]) {
        self.0 += bytes.len();
    }
    fn put_byte(&mut self, _: u8) {
        self.0 += 1;
    }
}

impl Sink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
    fn put_byte(&mut self, byte: u8) {
        self.push(byte);
    }
}

/// Writes a field copied from the message: already in its encoding, so only the MLLP block
/// bytes are escaped (when `escape` says it may hold some), and cut to at most `cap` bytes
/// written (see [`copy_len`]).
#[inline]
fn put_raw<S: Sink>(s: &mut S, enc: &Encoding, escape: bool, field: &[u8], cap: usize) {
    if !escape && field.len() <= cap {
        s.put(field);
    } else {
        put_capped(s, enc, field, cap);
    }
}

/// [`put_raw`] for a field that is too long or may hold block bytes.
#[cold]
fn put_capped<S: Sink>(s: &mut S, enc: &Encoding, field: &[u8], cap: usize) {
    let field = &field[..copy_len(enc, field, cap)];
    put_block_escaped(s, enc, field);
}

/// Writes `field` with each 0x0B and 0x1C as `\X0B\` / `\X1C\`.
fn put_block_escaped<S: Sink>(s: &mut S, enc: &Encoding, mut field: &[u8]) {
    while let Some(i) = memchr2(START_BLOCK, END_BLOCK, field) {
        s.put(&field[..i]);
        put_escape(
            s,
            enc,
            if field[i] == START_BLOCK {
                b"X0B"
            } else {
                b"X1C"
            },
        );
        field = &field[i + 1..];
    }
    s.put(field);
}

/// Bytes an escaped 0x0B or 0x1C takes on the wire: `\X0B\`.
const BLOCK_ESCAPE_LEN: usize = 5;

/// How many leading bytes of `field` to copy so that, with block bytes escaped, at most `cap`
/// bytes are written. Reads at most `cap` bytes of `field`, whatever its length.
///
/// When the field has to be cut, the cut moves back so that it does not end inside an escape
/// sequence (an odd number of escape characters kept means one is open) or inside a UTF-8
/// character (a continuation byte would be the first one dropped).
fn copy_len(enc: &Encoding, field: &[u8], cap: usize) -> usize {
    let mut written = 0;
    let mut end = 0;
    for &b in field.iter().take(cap) {
        let width = if b == START_BLOCK || b == END_BLOCK {
            BLOCK_ESCAPE_LEN
        } else {
            1
        };
        if written + width > cap {
            break;
        }
        written += width;
        end += 1;
    }
    if end == field.len() {
        return end;
    }
    let kept = &field[..end];
    if kept.iter().filter(|&&b| b == enc.escape).count() % 2 == 1 {
        // The escape character opening the unfinished sequence is the last one kept.
        end = kept.iter().rposition(|&b| b == enc.escape).unwrap_or(0);
    }
    // A UTF-8 lead byte is at most 3 bytes before the first byte dropped. If none is there
    // the field is not UTF-8 (e.g. ISO 8859-1), and the cut stays where it is.
    if field[end] & 0xC0 == 0x80
        && let Some(back) = (1..=3.min(end)).find(|&k| field[end - k] & 0xC0 == 0xC0)
    {
        end -= back;
    }
    end
}

/// The MSA-2 that an acknowledgment built by this module carries for `message`: its MSH-10,
/// cut at [`MAX_CONTROL_ID_LEN`] bytes and with 0x0B/0x1C escaped, as described in the
/// [module docs](self#msa-2-and-correlation). Borrowed from `message` unless something had to
/// be escaped.
///
/// `None` when the message has no readable MSH-10: its acknowledgment is then a reject with an
/// empty MSA-2.
///
/// # Examples
///
/// ```
/// use mllp_reactor::ack;
///
/// let msg = b"MSH|^~\\&|A|B|C|D|20260101||ADT^A01|ID\x0b7|P|2.5.1\r";
/// let echoed = ack::echoed_control_id(msg).unwrap();
/// assert_eq!(&echoed[..], b"ID\\X0B\\7");
/// assert_eq!(ack::parse(&ack::accept(msg))?.control_id, &echoed[..]);
/// assert_eq!(ack::echoed_control_id(b"PID|1\r"), None);
/// # Ok::<(), ack::AckParseError>(())
/// ```
pub fn echoed_control_id(message: &[u8]) -> Option<Cow<'_, [u8]>> {
    let msh = Msh::parse(message).ok()?;
    let id = msh.control_id()?;
    let enc = msh.encoding();
    let id = &id[..copy_len(&enc, id, MAX_CONTROL_ID_LEN)];
    if memchr2(START_BLOCK, END_BLOCK, id).is_none() {
        return Some(Cow::Borrowed(id));
    }
    let mut out = Vec::with_capacity(MAX_CONTROL_ID_LEN);
    put_block_escaped(&mut out, &enc, id);
    Some(Cow::Owned(out))
}

/// Writes our own text as field content, escaping whatever would be read as structure.
fn put_text<S: Sink>(s: &mut S, enc: &Encoding, text: &[u8]) {
    let mut clean = 0;
    for (i, &b) in text.iter().enumerate() {
        // Separators are punctuation (checked by `Msh::parse`), so letters, digits and
        // spaces, most of any text, skip the comparisons below.
        if b.is_ascii_alphanumeric() || b == b' ' {
            continue;
        }
        let sequence: &[u8] = match b {
            _ if b == enc.field => b"F",
            _ if b == enc.component => b"S",
            _ if b == enc.repetition => b"R",
            _ if b == enc.escape => b"E",
            _ if b == enc.subcomponent => b"T",
            _ if Some(b) == enc.truncation => b"P",
            CARRIAGE_RETURN => b"X0D",
            LINE_FEED => b"X0A",
            START_BLOCK => b"X0B",
            END_BLOCK => b"X1C",
            _ => continue,
        };
        s.put(&text[clean..i]);
        put_escape(s, enc, sequence);
        clean = i + 1;
    }
    s.put(&text[clean..]);
}

/// Writes `\<sequence>\` with the message's escape character.
fn put_escape<S: Sink>(s: &mut S, enc: &Encoding, sequence: &[u8]) {
    s.put_byte(enc.escape);
    s.put(sequence);
    s.put_byte(enc.escape);
}

/// The ACK's MSH-10: given by the caller (escaped on output) or generated (never needs it).
enum ControlId<'p> {
    Given(&'p [u8]),
    Generated(&'p [u8]),
}

/// `time` as an HL7 DTM in UTC, `YYYYMMDDHHMMSS+0000`, clamped to 1970..=9999.
fn hl7_timestamp(time: SystemTime) -> [u8; 19] {
    hl7_second(time).text
}

/// The second an HL7 timestamp shows, as the span of times that show it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Second {
    from: SystemTime,
    until: SystemTime,
    text: [u8; 19],
}

impl Second {
    fn contains(&self, time: SystemTime) -> bool {
        // Two comparisons instead of a conversion to seconds (callgrind: 56 instructions).
        self.from <= time && time < self.until
    }
}

/// The second `time` falls in, with its text as [`hl7_timestamp`] gives it.
///
/// The last second formatted is kept per thread: an ACK-only server answers many messages
/// per second, and formatting cost about 200 instructions per message (callgrind).
fn hl7_second(time: SystemTime) -> Second {
    thread_local! {
        static LAST: RefCell<Option<Second>> = const { RefCell::new(None) };
    }
    // On a borrow instead of a copy of the whole entry.
    let cached = LAST.with_borrow(|last| last.filter(|second| second.contains(time)));
    if let Some(second) = cached {
        return second;
    }
    let secs = time
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        .min(MAX_TIMESTAMP_SECS);
    let from = UNIX_EPOCH + std::time::Duration::from_secs(secs);
    let second = Second {
        from,
        until: from + std::time::Duration::from_secs(1),
        text: format_timestamp(secs),
    };
    LAST.set(Some(second));
    second
}

/// `secs` since 1970 as `YYYYMMDDHHMMSS+0000`.
fn format_timestamp(secs: u64) -> [u8; 19] {
    // `secs` is at most MAX_TIMESTAMP_SECS: the days fit an i64 and the year is 1970..=9999.
    let (year, month, day) = crate::date::civil_from_days((secs / 86_400) as i64);
    let second_of_day = secs % 86_400;
    let mut out = *b"00000000000000+0000";
    let mut put = |at: usize, width: usize, mut value: u64| {
        for digit in out[at..at + width].iter_mut().rev() {
            *digit = b'0' + (value % 10) as u8;
            value /= 10;
        }
    };
    put(0, 4, year as u64);
    put(4, 2, u64::from(month));
    put(6, 2, u64::from(day));
    put(8, 2, second_of_day / 3600);
    put(10, 2, second_of_day / 60 % 60);
    put(12, 2, second_of_day % 60);
    out
}

#[cfg(test)]
mod tests;
