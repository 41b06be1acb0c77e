//! Wire level of the load generator: the message template, the ACK deframer and the ACK check.
//! Sans-IO except for [`MessageTemplate::write`], which takes any `Write`.

use std::fmt;
use std::io::{self, ErrorKind, IoSlice, Write};
use std::ops::Range;

use super::{CARRIAGE_RETURN, END_BLOCK, START_BLOCK};

/// Width of the zero-padded sequence number in MSH-10 (`<run>-<conn>-<seq>`). A fixed width
/// keeps every message of a connection the same size; 10 digits outlast any run.
const SEQ_WIDTH: usize = 10;
/// Width of the run id in MSH-10: 8 hex digits, so two runs against the same storing server
/// share an id with a chance of about 2^-32 (MSH-3, MSH-4 and MSH-10 are the duplicate key).
const RUN_WIDTH: usize = 8;
/// Connection-index width assumed when sizing the padding (`NN-`); `size` is approximate anyway.
const NOMINAL_CONN_DIGITS: usize = 2;

/// An ADT^A01 message with a hole for MSH-10 (`<run>-<conn>-<seq>`), padded to a target size.
///
/// Sent as three slices with one vectored write, so a 1 MiB message is never copied:
/// `head` (SB + MSH up to MSH-9) ‖ MSH-10 ‖ `tail` (rest of MSH, EVN, PID, PV1, NTE pad, EB CR).
#[derive(Debug)]
pub(super) struct MessageTemplate {
    head: Vec<u8>,
    tail: Vec<u8>,
    /// Payload length (unframed) with a nominal-width MSH-10.
    pub(super) payload_len: usize,
    /// This run's id, the first part of every MSH-10.
    run: u32,
}

impl MessageTemplate {
    const HEAD: &'static [u8] =
        b"MSH|^~\\&|LOADGEN|BENCH|MLLP|REACTOR|20260101120000||ADT^A01^ADT_A01|";
    const BODY: &'static [u8] = b"|P|2.5.1\r\
        EVN|A01|20260101120000\r\
        PID|1||100001^^^BENCH^MR||DOE^JANE^Q||19800101|F|||1 MAIN ST^^SPRINGFIELD^IL^62701\r\
        PV1|1|I|WARD^101^A|||||||MED\r";
    /// Where the six-digit patient id (PID-3.1) sits in [`BODY`](Self::BODY).
    const PATIENT_AT: usize = 39;
    const PAD_SEGMENT: &'static [u8] = b"NTE|1|L|";
    /// Printable filler without separators or MLLP bytes.
    const FILLER: &'static [u8] =
        b"LOREM IPSUM DOLOR SIT AMET CONSECTETUR ADIPISCING ELIT 0123456789 ";

    /// A template whose PID-3.1 is `100001 + patient % 900000` (six digits, so the size does
    /// not change): each load connection sends for its own patient, as separate senders do,
    /// so a receiver that orders or partitions by patient sees several.
    pub(super) fn for_patient(size: usize, patient: usize, run: u32) -> Self {
        let mut template = Self::new(size, run);
        let id = format!("{:06}", 100_001 + patient % 900_000);
        let at = Self::PATIENT_AT;
        template.tail[at..at + 6].copy_from_slice(id.as_bytes());
        template
    }

    pub(super) fn new(size: usize, run: u32) -> Self {
        let nominal_id = RUN_WIDTH + 1 + NOMINAL_CONN_DIGITS + 1 + SEQ_WIDTH;
        let fixed = Self::HEAD.len() + nominal_id + Self::BODY.len();
        let mut head = Vec::with_capacity(Self::HEAD.len() + 1);
        head.push(START_BLOCK);
        head.extend_from_slice(Self::HEAD);
        let mut tail = Vec::with_capacity(size.saturating_sub(fixed) + Self::BODY.len() + 2);
        tail.extend_from_slice(Self::BODY);
        // An NTE segment costs its prefix and CR; only add it when there is room for content.
        let overhead = Self::PAD_SEGMENT.len() + 1;
        if size > fixed + overhead {
            tail.extend_from_slice(Self::PAD_SEGMENT);
            let pad = size - fixed - overhead;
            tail.extend(Self::FILLER.iter().copied().cycle().take(pad));
            tail.push(CARRIAGE_RETURN);
        }
        let payload_len = head.len() - 1 + nominal_id + tail.len();
        tail.extend_from_slice(&[END_BLOCK, CARRIAGE_RETURN]);
        Self {
            head,
            tail,
            payload_len,
            run,
        }
    }

    /// Writes MSH-10 `<run>-<conn>-<seq>` (run in [`RUN_WIDTH`] hex digits, sequence
    /// zero-padded to [`SEQ_WIDTH`]) into `out`.
    pub(super) fn write_id(&self, conn: usize, seq: u64, out: &mut Vec<u8>) {
        out.clear();
        // Writing into a Vec cannot fail.
        let _ = write!(out, "{:0RUN_WIDTH$x}-{conn}-{seq:0SEQ_WIDTH$}", self.run);
    }

    pub(super) fn framed_len(&self, id_len: usize) -> usize {
        self.head.len() + id_len + self.tail.len()
    }

    /// Sends one framed message with MSH-10 = `id`, looping over partial writes.
    pub(super) fn write(&self, stream: &mut impl Write, id: &[u8]) -> io::Result<()> {
        let mut slices = [
            IoSlice::new(&self.head),
            IoSlice::new(id),
            IoSlice::new(&self.tail),
        ];
        let mut remaining = &mut slices[..];
        while !remaining.is_empty() {
            match stream.write_vectored(remaining) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => IoSlice::advance_slices(&mut remaining, n),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Incremental MLLP deframer for ACKs over a fixed buffer.
///
/// Read into [`spare`](Self::spare), report with [`filled`](Self::filled), then take frames
/// with [`next_frame`](Self::next_frame) until `None`. Bytes are scanned once; bytes outside
/// frames are dropped and counted as junk.
///
/// ```text
/// buf: [ consumed | start..scanned: searched | scanned..end: new | end..: spare ]
/// ```
#[derive(Debug)]
pub(super) struct AckDeframer {
    buf: Box<[u8]>,
    /// First byte still needed: the first payload byte while `in_frame`, else the next byte
    /// to search for a start block. INVARIANT: start <= scanned <= end <= buf.len().
    start: usize,
    /// Bytes before this index have been searched and need no rescan.
    scanned: usize,
    end: usize,
    /// A start block was seen; `start` is the first payload byte.
    in_frame: bool,
    /// Bytes dropped outside frames since the last [`take_junk`](Self::take_junk).
    junk: u64,
}

impl AckDeframer {
    /// A deframer whose largest payload is `capacity - 2` bytes (room for the end block and CR).
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            buf: vec![0; capacity].into_boxed_slice(),
            start: 0,
            scanned: 0,
            end: 0,
            in_frame: false,
            junk: 0,
        }
    }

    /// Forgets all buffered bytes (after a reconnect).
    pub(super) fn clear(&mut self) {
        self.start = 0;
        self.scanned = 0;
        self.end = 0;
        self.in_frame = false;
        self.junk = 0;
    }

    /// Space to read into, after moving unconsumed bytes to the front if needed; `None` when a
    /// single frame fills the whole buffer (frame too large). Invalidates ranges returned
    /// earlier by [`next_frame`](Self::next_frame).
    pub(super) fn spare(&mut self) -> Option<&mut [u8]> {
        if self.start == self.end {
            // Nothing buffered (or an empty partial payload): restart at the front for free.
            self.start = 0;
            self.scanned = 0;
            self.end = 0;
        } else if self.end == self.buf.len() && self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.scanned -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            return None;
        }
        Some(&mut self.buf[self.end..])
    }

    /// Records that `n` bytes were read into the slice returned by [`spare`](Self::spare).
    pub(super) fn filled(&mut self, n: usize) {
        self.end += n;
        debug_assert!(self.end <= self.buf.len());
    }

    /// Copies `data` in (tests and other non-socket callers). Returns false if it did not fit.
    #[cfg(test)]
    pub(super) fn push(&mut self, mut data: &[u8]) -> bool {
        while !data.is_empty() {
            let Some(spare) = self.spare() else {
                return false;
            };
            let n = spare.len().min(data.len());
            spare[..n].copy_from_slice(&data[..n]);
            self.filled(n);
            data = &data[n..];
        }
        true
    }

    /// The next complete frame's payload range, valid until the next [`spare`](Self::spare).
    pub(super) fn next_frame(&mut self) -> Option<Range<usize>> {
        loop {
            if !self.in_frame {
                let window = &self.buf[self.scanned..self.end];
                let Some(i) = memchr::memchr(START_BLOCK, window) else {
                    self.junk += (self.end - self.start) as u64;
                    self.start = self.end;
                    self.scanned = self.end;
                    return None;
                };
                let sb = self.scanned + i;
                self.junk += (sb - self.start) as u64;
                self.start = sb + 1;
                self.scanned = self.start;
                self.in_frame = true;
            }
            let window = &self.buf[self.scanned..self.end];
            let Some(i) = memchr::memchr(END_BLOCK, window) else {
                self.scanned = self.end;
                return None;
            };
            let eb = self.scanned + i;
            if eb + 1 == self.end {
                // The byte after EB has not arrived yet; look at EB again next time.
                self.scanned = eb;
                return None;
            }
            if self.buf[eb + 1] == CARRIAGE_RETURN {
                let payload = self.start..eb;
                self.start = eb + 2;
                self.scanned = self.start;
                self.in_frame = false;
                return Some(payload);
            }
            // EB not followed by CR is payload (strict MLLP, as the server frames).
            self.scanned = eb + 1;
        }
    }

    /// The bytes of a range returned by [`next_frame`](Self::next_frame).
    pub(super) fn payload(&self, range: Range<usize>) -> &[u8] {
        &self.buf[range]
    }

    /// Junk bytes seen since the last call.
    pub(super) fn take_junk(&mut self) -> u64 {
        std::mem::take(&mut self.junk)
    }
}

/// Why an ACK was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AckError {
    /// No MSH segment, or no MSA segment.
    Malformed,
    /// MSA-1 is not `AA`.
    Nak,
    /// MSA-2 is not the expected MSH-10.
    Mismatch,
}

impl fmt::Display for AckError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Malformed => "no MSH or MSA segment",
            Self::Nak => "MSA-1 is not AA",
            Self::Mismatch => "MSA-2 does not match the message's MSH-10",
        })
    }
}

/// Checks that `payload` is an ACK accepting the message whose MSH-10 is `expected_id`:
/// MSA-1 is `AA` and MSA-2 equals `expected_id`. A wrong MSA-2 is reported as
/// [`AckError::Mismatch`] even when MSA-1 is also wrong (a desync is the bigger problem).
pub(super) fn verify_ack(payload: &[u8], expected_id: &[u8]) -> Result<(), AckError> {
    if payload.len() < 4 || !payload.starts_with(b"MSH") {
        return Err(AckError::Malformed);
    }
    let separator = payload[3];
    let msa = payload
        .split(|&b| b == CARRIAGE_RETURN || b == b'\n')
        .find(|segment| segment.len() > 3 && segment.starts_with(b"MSA") && segment[3] == separator)
        .ok_or(AckError::Malformed)?;
    let mut fields = msa.split(|&b| b == separator).skip(1);
    let code = fields.next().unwrap_or_default();
    let id = fields.next().unwrap_or_default();
    if id != expected_id {
        return Err(AckError::Mismatch);
    }
    if code != b"AA" {
        return Err(AckError::Nak);
    }
    Ok(())
}
