//! The client side of the harness: a blocking socket with timeouts and an incremental
//! deframer, and counts of this process's descriptors.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::{CR, EB, IO_TIMEOUT, SB, frame};

/// A test's end of one connection (usually the client; the fake servers of `client.rs` wrap
/// the streams they accept in one too): a blocking socket whose every read and write times out
/// after [`IO_TIMEOUT`], and an incremental deframer.
#[derive(Debug)]
pub(crate) struct Peer {
    pub(crate) stream: TcpStream,
    /// Received bytes not yet returned as a frame.
    buf: Vec<u8>,
}

/// How reading a frame ended when it did not return one.
#[derive(Debug)]
pub(crate) enum ReadEnd {
    /// The other end closed (FIN) with nothing pending.
    Eof,
    /// The read failed (reset, timeout, ...).
    Err(io::Error),
}

impl Peer {
    /// Connects to `addr` within [`IO_TIMEOUT`].
    #[track_caller]
    pub(crate) fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
            .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        Self::from_stream(stream)
    }

    /// Connects with a socket that resets the connection (RST, not FIN) when dropped
    /// (`SO_LINGER` 0), whether or not it left data unread.
    #[track_caller]
    pub(crate) fn connect_resetting(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
            .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        let socket = socket2::Socket::from(stream);
        socket
            .set_linger(Some(Duration::ZERO))
            .expect("SO_LINGER 0");
        Self::from_stream(socket.into())
    }

    /// Wraps a connected stream, setting its timeouts and `TCP_NODELAY`.
    #[track_caller]
    pub(crate) fn from_stream(stream: TcpStream) -> Self {
        stream
            .set_read_timeout(Some(IO_TIMEOUT))
            .expect("set read timeout");
        stream
            .set_write_timeout(Some(IO_TIMEOUT))
            .expect("set write timeout");
        stream.set_nodelay(true).expect("set nodelay");
        Self {
            stream,
            buf: Vec::new(),
        }
    }

    /// This end's own address: for a client, the `peer` the server reports.
    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.stream.local_addr().expect("local addr")
    }

    /// Writes raw bytes.
    #[track_caller]
    pub(crate) fn send(&mut self, bytes: &[u8]) {
        self.stream
            .write_all(bytes)
            .expect("write to the other end");
    }

    /// Writes `payload` as one frame, in one write.
    #[track_caller]
    pub(crate) fn send_frame(&mut self, payload: &[u8]) {
        self.send(&frame(payload));
    }

    /// Sends `payload` framed and returns the reply's payload.
    #[track_caller]
    pub(crate) fn roundtrip(&mut self, payload: &[u8]) -> Vec<u8> {
        self.send_frame(payload);
        self.read_frame()
    }

    /// Reads one frame's payload, within [`IO_TIMEOUT`].
    #[track_caller]
    pub(crate) fn read_frame(&mut self) -> Vec<u8> {
        match self.try_read_frame() {
            Ok(payload) => payload,
            Err(end) => panic!(
                "expected a frame, got {end:?} (pending bytes: {:?})",
                self.buf
            ),
        }
    }

    /// Reads one frame's payload, or says why none came. The other end must send nothing but
    /// frames: a byte before `0B` fails the test.
    #[track_caller]
    pub(crate) fn try_read_frame(&mut self) -> Result<Vec<u8>, ReadEnd> {
        let deadline = Instant::now() + IO_TIMEOUT;
        let mut scanned = 0;
        loop {
            if let Some(end) = self.frame_end(&mut scanned) {
                let payload = self.buf[1..end].to_vec();
                self.buf.drain(..end + 2);
                return Ok(payload);
            }
            if Instant::now() >= deadline {
                return Err(ReadEnd::Err(ErrorKind::TimedOut.into()));
            }
            match self.read_some() {
                Ok(0) if self.buf.is_empty() => return Err(ReadEnd::Eof),
                Ok(0) => panic!("closed mid-frame: {:?}", self.buf),
                Ok(_) => {}
                Err(e) => return Err(ReadEnd::Err(e)),
            }
        }
    }

    /// The payload of the next frame, waiting (within [`IO_TIMEOUT`]) until all of it is in
    /// the socket's receive buffer, without consuming it: a socket closed now still has unread
    /// data, so the close sends a reset.
    #[track_caller]
    pub(crate) fn peek_frame(&self) -> Vec<u8> {
        assert!(self.buf.is_empty(), "bytes already read: {:?}", self.buf);
        let deadline = Instant::now() + IO_TIMEOUT;
        let mut window = vec![0u8; 64 * 1024];
        loop {
            let n = self.stream.peek(&mut window).expect("peek at the reply");
            assert_ne!(n, 0, "closed instead of replying");
            let got = &window[..n];
            assert_eq!(got[0], SB, "bytes outside a frame: {got:?}");
            if let Some(end) = got.windows(2).position(|w| w == [EB, CR]) {
                return got[1..end].to_vec();
            }
            assert!(
                Instant::now() < deadline,
                "no whole frame within {IO_TIMEOUT:?}: {got:?}"
            );
            // Part of the frame is in: the rest follows at once; no event announces it.
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Reads until the other end closes cleanly (FIN); returns every byte not yet returned as
    /// a frame. A reset or a timeout fails the test.
    #[track_caller]
    pub(crate) fn read_to_eof(&mut self) -> Vec<u8> {
        loop {
            match self.read_some() {
                Ok(0) => return std::mem::take(&mut self.buf),
                Ok(_) => {}
                Err(e) => panic!("read until EOF failed (timeout is {IO_TIMEOUT:?}): {e}"),
            }
        }
    }

    /// Expects the other end to close without sending anything more: EOF, or a reset (a
    /// server that closes with our bytes unread resets the connection).
    #[track_caller]
    pub(crate) fn expect_closed(&mut self) {
        match self.try_read_frame() {
            Err(ReadEnd::Eof) => {}
            Err(ReadEnd::Err(e)) if is_reset(&e) => {}
            other => panic!("expected the other end to close, got {other:?}"),
        }
    }

    /// Reads and discards whatever comes until the other end closes (EOF or reset), within
    /// [`IO_TIMEOUT`] per read.
    #[track_caller]
    pub(crate) fn discard_until_closed(&mut self) {
        loop {
            match self.read_some() {
                Ok(0) => return,
                Ok(_) => self.buf.clear(),
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return,
                Err(e) => panic!("the other end did not close: {e}"),
            }
        }
    }

    /// Half-closes (the server sees EOF), then reads until the server closes: it must close
    /// cleanly and send nothing more.
    #[track_caller]
    pub(crate) fn finish(mut self) {
        self.shutdown_write();
        let rest = self.read_to_eof();
        assert!(rest.is_empty(), "unexpected bytes before EOF: {rest:?}");
    }

    /// Closes the sending side (the other end sees EOF).
    #[track_caller]
    pub(crate) fn shutdown_write(&self) {
        self.stream
            .shutdown(Shutdown::Write)
            .expect("shutdown(Write)");
    }

    /// Bytes read but not yet returned as a frame.
    pub(crate) fn buffered(&self) -> &[u8] {
        &self.buf
    }

    /// Where the frame at the start of `buf` ends (the index of its `1C`), if it is complete.
    /// `scanned` carries how far earlier calls looked, so no byte is scanned twice.
    #[track_caller]
    fn frame_end(&self, scanned: &mut usize) -> Option<usize> {
        let &first = self.buf.first()?;
        assert_eq!(first, SB, "bytes outside a frame: {:?}", self.buf);
        // The payload starts at 1. Resume one byte back for a `1C 0D` split across reads.
        let from = scanned.saturating_sub(1).max(1);
        *scanned = self.buf.len();
        let end = self
            .buf
            .get(from..)?
            .windows(2)
            .position(|w| w == [EB, CR])?;
        Some(from + end)
    }

    /// One read into the buffer: the byte count (0 at EOF), retrying on `Interrupted`.
    fn read_some(&mut self) -> io::Result<usize> {
        let mut chunk = [0u8; 64 * 1024];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(n);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// Whether `e` is what reading or writing a socket the other end closed can give.
pub(crate) fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe
    )
}

/// Open file descriptors of this process.
pub(crate) fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// Descriptors this process holds for the connections of the server on `port` (not its
/// listener): `server` ends (local port `port`) and `client` ends (remote port `port`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Sockets {
    pub(crate) server: usize,
    pub(crate) client: usize,
}

/// Counts [`Sockets`] by matching the socket inodes of `/proc/self/fd` against
/// `/proc/net/tcp{,6}`: exact, whatever other tests running beside this one hold.
pub(crate) fn connection_sockets(port: u16) -> Sockets {
    let mut ours = std::collections::HashSet::new();
    for entry in std::fs::read_dir("/proc/self/fd")
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Ok(target) = std::fs::read_link(entry.path()) {
            let target = target.to_string_lossy().into_owned();
            if let Some(inode) = target
                .strip_prefix("socket:[")
                .and_then(|s| s.strip_suffix(']'))
            {
                ours.insert(inode.to_owned());
            }
        }
    }
    let port_of = |addr: &str| {
        addr.rsplit(':')
            .next()
            .and_then(|p| u16::from_str_radix(p, 16).ok())
    };
    // The kernel lists sockets hash bucket by hash bucket across several reads, so a table
    // read while other tests open and close sockets can show one twice (or miss one): count
    // distinct inodes, and let callers retry until the count is what they expect.
    let mut server = std::collections::HashSet::new();
    let mut client = std::collections::HashSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(remote), Some(state), Some(inode)) =
                (fields.get(1), fields.get(2), fields.get(3), fields.get(9))
            else {
                continue;
            };
            // State 0A is LISTEN.
            if *state == "0A" || !ours.contains(*inode) {
                continue;
            }
            if port_of(local) == Some(port) {
                server.insert(inode.to_string());
            } else if port_of(remote) == Some(port) {
                client.insert(inode.to_string());
            }
        }
    }
    Sockets {
        server: server.len(),
        client: client.len(),
    }
}
