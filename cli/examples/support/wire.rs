//! What both benchmark baselines (`baseline_server`, `durable_baseline`) share: the MLLP
//! framing of one mio connection, and an ACK builder that does what a real receiver does.
//!
//! Compiled into each example with `#[path]`; not a library.

use std::io::{self, ErrorKind, Read, Write};
use std::time::{SystemTime, UNIX_EPOCH};

use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Poll, Token};
use slab::Slab;

/// MLLP start block.
pub const START_BLOCK: u8 = 0x0B;
/// MLLP end block, followed by [`CARRIAGE_RETURN`].
pub const END_BLOCK: u8 = 0x1C;
/// Carriage return: ends an MLLP frame after [`END_BLOCK`], and ends each HL7 segment.
pub const CARRIAGE_RETURN: u8 = 0x0D;

/// Size of the scratch buffer each `read` fills before the bytes are appended to the
/// connection's buffer. 64 KiB matches the default loopback socket buffer, so one read usually
/// drains what is queued.
pub const READ_CHUNK: usize = 65_536;

/// One accepted connection.
pub struct Conn {
    pub stream: TcpStream,
    /// Received bytes not yet consumed as a complete frame.
    rbuf: Vec<u8>,
    /// Bytes of `rbuf` already searched for the end of the current frame; never rescanned.
    /// INVARIANT: scanned <= rbuf.len().
    scanned: usize,
    /// Framed ACKs not yet written. INVARIANT: wpos <= wbuf.len().
    pub wbuf: Vec<u8>,
    wpos: usize,
    /// Whether WRITABLE interest is registered (only while `wbuf` has unwritten bytes).
    wants_write: bool,
}

impl Conn {
    fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            rbuf: Vec::new(),
            scanned: 0,
            wbuf: Vec::new(),
            wpos: 0,
            wants_write: false,
        }
    }

    /// Reads until `WouldBlock`, calling `on_frame` with the payload of every complete frame.
    /// Returns false when the connection should be closed (peer closed or error).
    pub fn read_frames(
        &mut self,
        scratch: &mut [u8],
        mut on_frame: impl FnMut(&[u8], &mut Vec<u8>),
    ) -> bool {
        loop {
            match self.stream.read(scratch) {
                Ok(0) => {
                    // Peer half-closed: best effort to deliver ACKs already built, then close.
                    self.flush();
                    return false;
                }
                Ok(n) => {
                    self.rbuf.extend_from_slice(&scratch[..n]);
                    self.extract_frames(&mut on_frame);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
    }

    /// Extracts every complete frame from `rbuf` and drops the consumed bytes. Bytes before a
    /// start block are discarded.
    fn extract_frames(&mut self, on_frame: &mut impl FnMut(&[u8], &mut Vec<u8>)) {
        let mut consumed = 0;
        loop {
            let buf = &self.rbuf[consumed..];
            // Find the start block; anything before it is junk.
            let Some(sb) = memchr::memchr(START_BLOCK, buf) else {
                consumed = self.rbuf.len();
                self.scanned = 0;
                break;
            };
            let payload_start = sb + 1;
            // Resume the end-block search where the previous read left off.
            let mut from = self.scanned.saturating_sub(consumed).max(payload_start);
            let end = loop {
                match memchr::memchr(END_BLOCK, &buf[from..]) {
                    Some(i) => {
                        let at = from + i;
                        match buf.get(at + 1) {
                            Some(&CARRIAGE_RETURN) => break Some(at),
                            Some(_) => from = at + 1,
                            None => {
                                from = at;
                                break None;
                            }
                        }
                    }
                    None => {
                        from = buf.len();
                        break None;
                    }
                }
            };
            match end {
                Some(eb) => {
                    on_frame(&buf[payload_start..eb], &mut self.wbuf);
                    consumed += eb + 2;
                    self.scanned = consumed;
                }
                None => {
                    // Keep the partial frame from its start block; remember how far we looked.
                    consumed += sb;
                    self.scanned = consumed + (from - sb);
                    break;
                }
            }
        }
        self.rbuf.drain(..consumed);
        self.scanned -= consumed.min(self.scanned);
    }

    /// Writes pending ACK bytes until done or `WouldBlock`. Returns false on a write error.
    pub fn flush(&mut self) -> bool {
        while self.wpos < self.wbuf.len() {
            match self.stream.write(&self.wbuf[self.wpos..]) {
                Ok(0) => return false,
                Ok(n) => self.wpos += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        self.wbuf.clear();
        self.wpos = 0;
        true
    }

    /// Registers WRITABLE interest only while bytes are waiting, so an idle connection costs
    /// no wake-ups.
    pub fn update_interest(&mut self, poll: &Poll, key: usize) -> io::Result<()> {
        let pending = self.wpos < self.wbuf.len();
        if pending != self.wants_write {
            let interest = if pending {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            };
            poll.registry()
                .reregister(&mut self.stream, Token(key), interest)?;
            self.wants_write = pending;
        }
        Ok(())
    }
}

/// Accepts until `WouldBlock`; `extra` makes each connection's companion state. Errors on one
/// accept (EMFILE, a reset before accept) drop that connection attempt only.
pub fn accept_all<T>(
    poll: &Poll,
    listener: &TcpListener,
    connections: &mut Slab<(Conn, T)>,
    mut extra: impl FnMut(&TcpStream) -> T,
) {
    loop {
        match listener.accept() {
            Ok((mut stream, _peer)) => {
                let entry = connections.vacant_entry();
                let token = Token(entry.key());
                // ACKs are small and must not wait for Nagle.
                let _ = stream.set_nodelay(true);
                if poll
                    .registry()
                    .register(&mut stream, token, Interest::READABLE)
                    .is_ok()
                {
                    let companion = extra(&stream);
                    entry.insert((Conn::new(stream), companion));
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                eprintln!("accept: {e}");
                return;
            }
        }
    }
}

/// The MSH fields of one message, split once: `field(n)` is MSH-n (empty when missing).
pub struct Msh<'a> {
    /// The field separator (MSH-1).
    pub sep: u8,
    /// fields[0] = "MSH", fields[1] = encoding characters, fields[n] = MSH-(n+1) for n >= 1.
    fields: [&'a [u8]; 12],
}

impl<'a> Msh<'a> {
    /// Splits the MSH segment of `payload`; `None` when it does not start with one.
    pub fn parse(payload: &'a [u8]) -> Option<Self> {
        if payload.len() <= 8 || !payload.starts_with(b"MSH") {
            return None;
        }
        let sep = payload[3];
        let msh = payload
            .split(|&b| b == CARRIAGE_RETURN || b == b'\n')
            .next()
            .unwrap_or(payload);
        let mut fields: [&[u8]; 12] = [b""; 12];
        for (slot, field) in fields.iter_mut().zip(msh.split(|&b| b == sep)) {
            *slot = field;
        }
        Some(Self { sep, fields })
    }

    /// MSH-n, 3 <= n <= 12 (empty when missing).
    pub fn field(&self, n: usize) -> &'a [u8] {
        self.fields[n - 1]
    }
}

/// Builds ACKs the way a real receiver does: sender and receiver swapped, a fresh timestamp
/// and control id, `MSA|<code>|<MSH-10>`; about 120 bytes for a typical MSH.
pub struct AckWriter {
    /// `YYYYMMDDHHMMSS`, refreshed once per poll wake-up when the second changed.
    timestamp: [u8; 14],
    /// The Unix second `timestamp` shows.
    timestamp_secs: u64,
    next_control_id: u64,
}

impl AckWriter {
    pub fn new() -> Self {
        let mut writer = Self {
            timestamp: [b'0'; 14],
            timestamp_secs: u64::MAX,
            next_control_id: 1,
        };
        writer.refresh_timestamp();
        writer
    }

    pub fn refresh_timestamp(&mut self) {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        // Formatting is ~2 000 instructions (callgrind): once per second, not per wake-up.
        if secs != self.timestamp_secs {
            self.timestamp = format_timestamp(secs);
            self.timestamp_secs = secs;
        }
    }

    /// Appends the framed ACK for `payload` to `out`: `code` (`b"AA"`, `b"AE"`) for a payload
    /// with a readable MSH, an `AR` with an empty MSA-2 otherwise, as a real receiver would.
    /// Returns the offset in `out` of the two code bytes.
    pub fn append_ack(&mut self, payload: &[u8], code: &[u8; 2], out: &mut Vec<u8>) -> usize {
        out.push(START_BLOCK);
        let Some(msh) = Msh::parse(payload) else {
            out.extend_from_slice(b"MSH|^~\\&|||||");
            out.extend_from_slice(&self.timestamp);
            out.extend_from_slice(b"||ACK|");
            self.push_control_id(out);
            out.extend_from_slice(b"|P|2.5.1\rMSA|");
            let at = out.len();
            out.extend_from_slice(b"AR|\r");
            out.extend_from_slice(&[END_BLOCK, CARRIAGE_RETURN]);
            return at;
        };
        let sep = msh.sep;
        out.extend_from_slice(b"MSH");
        out.push(sep);
        out.extend_from_slice(msh.fields[1]);
        for value in [msh.field(5), msh.field(6), msh.field(3), msh.field(4)] {
            out.push(sep);
            out.extend_from_slice(value);
        }
        out.push(sep);
        out.extend_from_slice(&self.timestamp);
        out.push(sep);
        out.push(sep);
        out.extend_from_slice(b"ACK");
        out.push(sep);
        self.push_control_id(out);
        for value in [msh.field(11), msh.field(12)] {
            out.push(sep);
            out.extend_from_slice(value);
        }
        out.push(CARRIAGE_RETURN);
        out.extend_from_slice(b"MSA");
        out.push(sep);
        let at = out.len();
        out.extend_from_slice(code);
        out.push(sep);
        out.extend_from_slice(msh.field(10));
        out.push(CARRIAGE_RETURN);
        out.extend_from_slice(&[END_BLOCK, CARRIAGE_RETURN]);
        at
    }

    fn push_control_id(&mut self, out: &mut Vec<u8>) {
        let mut digits = [0u8; 20];
        let mut n = self.next_control_id;
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        out.extend_from_slice(b"ACK");
        out.extend_from_slice(&digits[i..]);
        self.next_control_id += 1;
    }
}

/// Formats Unix seconds as an HL7 `YYYYMMDDHHMMSS` (UTC) timestamp.
fn format_timestamp(unix_secs: u64) -> [u8; 14] {
    let days = (unix_secs / 86_400) as i64;
    let secs_of_day = unix_secs % 86_400;
    let (year, month, day) = mllp_reactor::date::civil_from_days(days);
    let text = format!(
        "{year:04}{month:02}{day:02}{:02}{:02}{:02}",
        secs_of_day / 3_600,
        secs_of_day / 60 % 60,
        secs_of_day % 60
    );
    let mut out = [b'0'; 14];
    out.copy_from_slice(&text.as_bytes()[..14]);
    out
}
