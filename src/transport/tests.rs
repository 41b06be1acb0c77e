//! Reads straight into a connection's buffer (`Transport::read_into` through
//! `Connection::read_with`) over a real loopback socket: every way a frame can be cut between
//! two reads, and the buffer's growth points, give back exactly the bytes sent, and never
//! touch the payloads already handed out.

use std::collections::VecDeque;
use std::io::Write;
use std::net::{TcpListener, TcpStream as StdStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::*;
use crate::connection::{Connection, Event, Limits, NakPolicy, WallClock};
use crate::outcome::{Outcome, Reply};

/// Bound on waiting for bytes written on loopback to become readable.
const WAIT: Duration = Duration::from_secs(10);

fn limits() -> Arc<Limits> {
    limits_with(4 << 20)
}

fn limits_with(max_message_size: usize) -> Arc<Limits> {
    Arc::new(Limits {
        idle_timeout: Duration::from_secs(60),
        frame_timeout: Duration::from_secs(60),
        handler_timeout: Duration::from_secs(60),
        write_timeout: Duration::from_secs(60),
        handshake_timeout: Duration::from_secs(10),
        max_message_size,
        read_ahead: 4096,
        max_in_flight: 1,
        nak_policy: NakPolicy::Send,
        expose_errors: false,
        wall_clock: WallClock::now(),
    })
}

/// A connected pair: the client's blocking socket and the server's plain transport.
fn pair() -> (StdStream, Transport) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = StdStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    server.set_nonblocking(true).unwrap();
    (client, Transport::tcp(TcpStream::from_std(server)))
}

/// A payload of `len` bytes that starts like a message and whose bytes differ along it.
fn payload(id: usize, len: usize) -> Vec<u8> {
    let mut p = format!("MSH|^~\\&|A|B|C|D|20260101||ADT^A01|{id:06}|P|2.5\r").into_bytes();
    let mut i = 0u8;
    while p.len() < len {
        p.push(b'a' + i % 26);
        i = i.wrapping_add(1);
    }
    p
}

fn framed(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x0b];
    f.extend_from_slice(payload);
    f.extend_from_slice(&[0x1c, 0x0d]);
    f
}

struct Server {
    transport: Transport,
    conn: Connection,
    out: Vec<Event>,
    /// The payloads to come, in order: each is checked as it is dispatched.
    expected: VecDeque<Vec<u8>>,
    /// Keep every payload (each shares its allocation with the buffer read into next), or
    /// drop it at once (the buffer then takes its space back, or is kept by the pool).
    keep: bool,
    /// The payloads kept, with what they must still hold.
    kept: Vec<(Bytes, Vec<u8>)>,
    /// The most bytes one read may take (the reactor's read budget left).
    max_read: usize,
    /// The connection's frame limit.
    limit: usize,
}

impl Server {
    /// Reads until `bytes` more bytes have come (or the connection dispatched messages
    /// that account for them), dispatching and answering as the reactor does.
    fn take(&mut self, mut bytes: usize) {
        let deadline = Instant::now() + WAIT;
        while bytes > 0 {
            assert!(Instant::now() < deadline, "{bytes} bytes never came");
            let now = Instant::now();
            let transport = &mut self.transport;
            let before = self.conn.buffered_len();
            match self
                .conn
                .read_with(now, self.max_read, |buf, max| transport.read_into(buf, max))
            {
                Some(Ok(0)) => panic!("unexpected end of stream"),
                Some(Ok(n)) => {
                    assert!(
                        n <= self.max_read,
                        "read {n} bytes, budget {}",
                        self.max_read
                    );
                    // The bounds on the read buffer: a partial frame holds at most the limit
                    // and its framing, or what it held plus one read's worth.
                    let limit = self.limit + crate::codec::FRAMING_OVERHEAD;
                    let held = self.conn.buffered_len();
                    assert!(
                        held <= limit.max(before + crate::connection::READ_CHUNK),
                        "{held} bytes buffered after a read of {n} (had {before})"
                    );
                    bytes -= n;
                }
                Some(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                other => panic!("read failed: {other:?}"),
            }
            self.dispatch(now);
        }
    }

    fn dispatch(&mut self, now: Instant) {
        while let Some(d) = self.conn.poll_dispatch(now, &mut self.out) {
            let expected = self
                .expected
                .pop_front()
                .expect("no more messages were sent");
            assert!(
                d.payload[..] == expected[..],
                "payload of {} bytes",
                expected.len()
            );
            if self.keep {
                self.kept.push((d.payload, expected));
            }
            let outcome = Outcome::Reply(Reply::NoReply);
            self.conn
                .handle_completion(d.seq, outcome, now, &mut self.out);
        }
    }
}

fn server(transport: Transport, keep: bool) -> Server {
    Server {
        transport,
        conn: Connection::new(limits(), Instant::now()),
        out: Vec::new(),
        expected: VecDeque::new(),
        keep,
        kept: Vec::new(),
        max_read: usize::MAX,
        limit: 4 << 20,
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            assert!(
                self.expected.is_empty(),
                "{} messages not dispatched",
                self.expected.len()
            );
            for (got, sent) in &self.kept {
                assert!(
                    got[..] == sent[..],
                    "a kept payload of {} bytes changed",
                    sent.len()
                );
            }
        }
    }
}

/// Sends `frames` cut at `cut` (an offset into their concatenation), reading each part before
/// the next is sent.
fn send_cut(client: &mut StdStream, server: &mut Server, frames: &[u8], cut: usize) {
    for part in [&frames[..cut], &frames[cut..]] {
        client.write_all(part).unwrap();
        server.take(part.len());
    }
}

#[test]
fn every_cut_between_two_reads_gives_back_the_bytes_sent() {
    for keep in [true, false] {
        let (mut client, transport) = pair();
        let mut server = server(transport, keep);
        // Two frames back to back, cut at every offset: a cut inside either frame, at its
        // start block, at the end block, between 0x1C and 0x0D, and between the frames.
        let len = framed(&payload(0, 60)).len() * 2;
        for cut in 0..=len {
            let (a, b) = (payload(2 * cut, 60), payload(2 * cut + 1, 60));
            let mut frames = framed(&a);
            frames.extend(framed(&b));
            assert_eq!(frames.len(), len);
            server.expected.extend([a, b]);
            send_cut(&mut client, &mut server, &frames, cut);
        }
    }
}

#[test]
fn frames_across_the_buffer_s_growth_points_stay_intact() {
    // Sizes around the pooled buffer's room (8 KiB start, 4 KiB least room), a read's worth
    // (64 KiB), and large frames whose buffer grows once to the last large frame's size and
    // is then kept by the pool when the payloads are dropped (the second and third large
    // ones): each cut at a few places, including the growth points themselves.
    let sizes = [
        4 * 1024 - 3,
        4 * 1024,
        8 * 1024 - 3,
        8 * 1024,
        12 * 1024 + 1,
        64 * 1024 - 3,
        64 * 1024 + 1,
        300 * 1024,
        300 * 1024,
        200 * 1024,
        5,
        300 * 1024,
    ];
    for keep in [true, false] {
        let (mut client, transport) = pair();
        let mut server = server(transport, keep);
        for (id, &size) in sizes.iter().enumerate() {
            let p = payload(id, size);
            let frame = framed(&p);
            for cut in [
                1,
                4 * 1024,
                8 * 1024 - 1,
                8 * 1024,
                64 * 1024,
                frame.len() - 1,
                frame.len(),
            ] {
                if cut <= frame.len() {
                    server.expected.push_back(p.clone());
                    send_cut(&mut client, &mut server, &frame, cut);
                }
            }
        }
    }
}

#[test]
fn reads_into_a_large_frames_buffer_stay_within_the_frame_limit_and_the_budget() {
    // Reads into a buffer with room for more than one read (a large frame's buffer, kept by
    // the pool or grown to the last large frame's size): two frames back to back, the first
    // at or near the limit, cut around one read's worth, the limit's framing and the first
    // frame's end, each read also capped by a budget (none, one byte less than a frame, a
    // read's worth and one byte, 1000 bytes). `take` checks the buffer's bounds after
    // every read.
    const LIMIT: usize = 150 * 1024;
    const CHUNK: usize = crate::connection::READ_CHUNK;
    let sizes = [
        (LIMIT, 5),
        (LIMIT, LIMIT),
        (LIMIT - 1, 70 * 1024),
        (100 * 1024, LIMIT),
        (5, 100 * 1024),
        (LIMIT, 100),
    ];
    for (keep, max_read) in [
        (false, usize::MAX),
        (true, usize::MAX),
        (false, LIMIT + 2),
        (false, CHUNK + 1),
        (true, 1000),
    ] {
        let (mut client, transport) = pair();
        let mut server = server(transport, keep);
        server.conn = Connection::new(limits_with(LIMIT), Instant::now());
        server.max_read = max_read;
        server.limit = LIMIT;
        for (id, &(first, second)) in sizes.iter().enumerate() {
            let (a, b) = (payload(2 * id, first), payload(2 * id + 1, second));
            let mut frames = framed(&a);
            let first_end = frames.len();
            frames.extend(framed(&b));
            for cut in [
                1,
                CHUNK - 1,
                CHUNK,
                CHUNK + 1,
                LIMIT + 3 - CHUNK,
                first_end - 1,
                first_end,
                first_end + 1,
                LIMIT + 3,
                LIMIT + 4,
                frames.len() - 1,
                frames.len(),
            ] {
                if cut <= frames.len() {
                    server.expected.extend([a.clone(), b.clone()]);
                    send_cut(&mut client, &mut server, &frames, cut);
                }
            }
        }
    }
}

#[test]
fn a_layer_that_must_see_the_bytes_is_not_read_into() {
    let (_client, transport) = pair();
    let mut proxied = Transport::proxied(transport.socket, crate::proxy::ProxyMode::V1);
    assert!(!proxied.reads_into());
    let mut buf = BytesMut::with_capacity(64);
    let e = proxied.read_into(&mut buf, 64).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::Unsupported);
    assert!(buf.is_empty());
}
