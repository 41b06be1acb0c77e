//! Baseline MLLP server for the end-to-end benchmark (`benches/e2e.sh`).
//!
//! The smallest server that does the same job as mllp-reactor on the wire: one thread, one mio
//! `Poll`, read until `WouldBlock` into a per-connection `Vec`, find frames, answer each with an
//! `AA` ACK built inline, write until `WouldBlock` (keeping partial writes). No handler pool, no
//! timers, no limits, no metrics. It stands for "the practical limit of this design": whatever
//! mllp-reactor adds (a thread hop per message, deadlines, caps, telemetry) shows up as the ratio
//! between the two in `benches/e2e.sh`.
//!
//! ```text
//! cargo run --release -p mllp-reactor-cli --example baseline_server -- 127.0.0.1:0
//! listening on 127.0.0.1:40123
//! ```
//!
//! It prints exactly one line, `listening on <ADDR>`, to stdout, then serves until killed.
//! Not for production: a peer that never reads grows the write buffer without bound.

use std::io::{self, ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

/// MLLP start block.
const START_BLOCK: u8 = 0x0B;
/// MLLP end block, followed by [`CARRIAGE_RETURN`].
const END_BLOCK: u8 = 0x1C;
/// Carriage return: ends an MLLP frame after [`END_BLOCK`], and ends each HL7 segment.
const CARRIAGE_RETURN: u8 = 0x0D;

/// The listener's token; connections use their slab key, which never reaches this value.
const LISTENER: Token = Token(usize::MAX);
/// Size of the scratch buffer each `read` fills before the bytes are appended to the
/// connection's buffer. 64 KiB matches the default loopback socket buffer, so one read usually
/// drains what is queued.
const READ_CHUNK: usize = 65_536;
/// Events handled per `poll` call; 1024 keeps a 1000-connection burst to one or two calls.
const EVENTS_CAPACITY: usize = 1024;

/// One accepted connection.
struct Connection {
    stream: TcpStream,
    /// Received bytes not yet consumed as a complete frame.
    rbuf: Vec<u8>,
    /// Bytes of `rbuf` already searched for the end of the current frame; never rescanned.
    /// INVARIANT: scanned <= rbuf.len().
    scanned: usize,
    /// Framed ACKs not yet written. INVARIANT: wpos <= wbuf.len().
    wbuf: Vec<u8>,
    wpos: usize,
    /// Whether WRITABLE interest is registered (only while `wbuf` has unwritten bytes).
    wants_write: bool,
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let addr_arg = args.next().unwrap_or_else(|| "127.0.0.1:0".to_owned());
    if args.next().is_some() || addr_arg == "-h" || addr_arg == "--help" {
        eprintln!("usage: baseline_server [LISTEN_ADDR]   (default 127.0.0.1:0)");
        return ExitCode::from(2);
    }
    let addr: SocketAddr = match addr_arg.parse() {
        Ok(addr) => addr,
        Err(_) => {
            eprintln!("error: invalid listen address {addr_arg:?} (expected e.g. 127.0.0.1:0)");
            return ExitCode::from(2);
        }
    };
    match serve(addr) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(addr: SocketAddr) -> io::Result<()> {
    let mut poll = Poll::new()?;
    let mut listener = TcpListener::bind(addr)?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    {
        let mut out = io::stdout().lock();
        writeln!(out, "listening on {}", listener.local_addr()?)?;
        out.flush()?;
    }

    let mut events = Events::with_capacity(EVENTS_CAPACITY);
    let mut connections: Slab<Connection> = Slab::new();
    let mut scratch = vec![0u8; READ_CHUNK];
    let mut acks = AckWriter::new();

    loop {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        acks.refresh_timestamp();
        for event in events.iter() {
            if event.token() == LISTENER {
                accept_all(&poll, &listener, &mut connections);
                continue;
            }
            let key = event.token().0;
            let Some(conn) = connections.get_mut(key) else {
                continue;
            };
            let mut open = true;
            if event.is_readable() || event.is_read_closed() {
                open = read_and_answer(conn, &mut scratch, &mut acks);
            }
            if open {
                open = flush(conn);
            }
            if open {
                open = update_interest(&poll, conn, key).is_ok();
            }
            if !open {
                let mut conn = connections.remove(key);
                // Deregistering a socket that is about to be dropped cannot usefully fail.
                let _ = poll.registry().deregister(&mut conn.stream);
            }
        }
    }
}

/// Accepts until `WouldBlock`. Errors on one accept (EMFILE, a reset before accept) drop that
/// connection attempt only.
fn accept_all(poll: &Poll, listener: &TcpListener, connections: &mut Slab<Connection>) {
    loop {
        match listener.accept() {
            Ok((mut stream, _peer)) => {
                let entry = connections.vacant_entry();
                let token = Token(entry.key());
                // Same as std's default for an accepted socket on loopback; ACKs are small and
                // must not wait for Nagle.
                let _ = stream.set_nodelay(true);
                if poll
                    .registry()
                    .register(&mut stream, token, Interest::READABLE)
                    .is_ok()
                {
                    entry.insert(Connection {
                        stream,
                        rbuf: Vec::new(),
                        scanned: 0,
                        wbuf: Vec::new(),
                        wpos: 0,
                        wants_write: false,
                    });
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

/// Reads until `WouldBlock`, answering every complete frame. Returns false when the connection
/// should be closed (peer closed or error).
fn read_and_answer(conn: &mut Connection, scratch: &mut [u8], acks: &mut AckWriter) -> bool {
    loop {
        match conn.stream.read(scratch) {
            Ok(0) => {
                // Peer half-closed: best effort to deliver ACKs already built, then close.
                flush(conn);
                return false;
            }
            Ok(n) => {
                conn.rbuf.extend_from_slice(&scratch[..n]);
                answer_frames(conn, acks);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
}

/// Extracts every complete frame from `conn.rbuf`, appends one framed ACK per frame to
/// `conn.wbuf`, and drops the consumed bytes. Bytes before a start block are discarded.
fn answer_frames(conn: &mut Connection, acks: &mut AckWriter) {
    let mut consumed = 0;
    loop {
        let buf = &conn.rbuf[consumed..];
        // Find the start block; anything before it is junk.
        let Some(sb) = memchr::memchr(START_BLOCK, buf) else {
            consumed = conn.rbuf.len();
            conn.scanned = 0;
            break;
        };
        let payload_start = sb + 1;
        // Resume the end-block search where the previous read left off.
        let mut from = conn.scanned.saturating_sub(consumed).max(payload_start);
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
                acks.append_ack(&buf[payload_start..eb], &mut conn.wbuf);
                consumed += eb + 2;
                conn.scanned = consumed;
            }
            None => {
                // Keep the partial frame from its start block; remember how far we looked.
                consumed += sb;
                conn.scanned = consumed + (from - sb);
                break;
            }
        }
    }
    conn.rbuf.drain(..consumed);
    conn.scanned -= consumed.min(conn.scanned);
}

/// Writes pending ACK bytes until done or `WouldBlock`. Returns false on a write error.
fn flush(conn: &mut Connection) -> bool {
    while conn.wpos < conn.wbuf.len() {
        match conn.stream.write(&conn.wbuf[conn.wpos..]) {
            Ok(0) => return false,
            Ok(n) => conn.wpos += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    conn.wbuf.clear();
    conn.wpos = 0;
    true
}

/// Registers WRITABLE interest only while bytes are waiting, so an idle connection costs no
/// wake-ups.
fn update_interest(poll: &Poll, conn: &mut Connection, key: usize) -> io::Result<()> {
    let pending = conn.wpos < conn.wbuf.len();
    if pending != conn.wants_write {
        let interest = if pending {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        poll.registry()
            .reregister(&mut conn.stream, Token(key), interest)?;
        conn.wants_write = pending;
    }
    Ok(())
}

/// Builds `AA` ACKs the way a real receiver does: sender and receiver swapped, a fresh timestamp
/// and control id, `MSA|AA|<MSH-10>`; about 120 bytes for a typical MSH.
struct AckWriter {
    /// `YYYYMMDDHHMMSS`, refreshed once per poll wake-up.
    timestamp: [u8; 14],
    next_control_id: u64,
}

impl AckWriter {
    fn new() -> Self {
        let mut writer = Self {
            timestamp: [b'0'; 14],
            next_control_id: 1,
        };
        writer.refresh_timestamp();
        writer
    }

    fn refresh_timestamp(&mut self) {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.timestamp = format_timestamp(secs);
    }

    /// Appends the framed ACK for `payload` to `out`. A payload without a readable MSH gets an
    /// `AR` with an empty MSA-2, as a real receiver would.
    fn append_ack(&mut self, payload: &[u8], out: &mut Vec<u8>) {
        out.push(START_BLOCK);
        let msh_ok = payload.len() > 8 && payload.starts_with(b"MSH");
        if !msh_ok {
            out.extend_from_slice(b"MSH|^~\\&|||||");
            out.extend_from_slice(&self.timestamp);
            out.extend_from_slice(b"||ACK|");
            self.push_control_id(out);
            out.extend_from_slice(b"|P|2.5.1\rMSA|AR|\r");
            out.extend_from_slice(&[END_BLOCK, CARRIAGE_RETURN]);
            return;
        }
        let sep = payload[3];
        let msh = payload
            .split(|&b| b == CARRIAGE_RETURN || b == b'\n')
            .next()
            .unwrap_or(payload);
        // fields[0] = "MSH", fields[1] = encoding characters, fields[n] = MSH-(n+1) for n >= 1.
        let mut fields: [&[u8]; 12] = [b""; 12];
        for (slot, field) in fields.iter_mut().zip(msh.split(|&b| b == sep)) {
            *slot = field;
        }
        let field = |n: usize| fields[n - 1];
        out.extend_from_slice(b"MSH");
        out.push(sep);
        out.extend_from_slice(fields[1]);
        for value in [field(5), field(6), field(3), field(4)] {
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
        for value in [field(11), field(12)] {
            out.push(sep);
            out.extend_from_slice(value);
        }
        out.push(CARRIAGE_RETURN);
        out.extend_from_slice(b"MSA");
        out.push(sep);
        out.extend_from_slice(b"AA");
        out.push(sep);
        out.extend_from_slice(field(10));
        out.push(CARRIAGE_RETURN);
        out.extend_from_slice(&[END_BLOCK, CARRIAGE_RETURN]);
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
