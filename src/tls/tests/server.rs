//! A small mio server that drives `TlsStream` the way the reactor does: edge-triggered, read
//! until `WouldBlock`, flush whenever `wants_write`, `shutdown_write` to close. It answers
//! each frame (an ACK for HL7, else `LEN|n|sum`) and reports each connection's end.

use std::collections::HashMap;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::JoinHandle;

use bytes::{Buf, BytesMut};
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token, Waker};

use super::IO_TIMEOUT;
use crate::ack;
use crate::codec::{FrameDecoder, encode_frame};
use crate::tls::{PeerIdentity, TlsAcceptor, TlsFailure, TlsFailureKind, TlsStream};

/// What the server saw on one connection, sent when it ends.
#[derive(Debug)]
pub(super) struct Report {
    pub(super) handshake_done: bool,
    pub(super) protocol: Option<&'static str>,
    pub(super) identity: Option<PeerIdentity>,
    pub(super) failure: Option<TlsFailureKind>,
    pub(super) frames: usize,
    pub(super) socket_bytes: u64,
}

pub(super) struct TestServer {
    pub(super) addr: SocketAddr,
    reports: Receiver<Report>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
}

const LISTENER: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX - 2);

struct ServerConn {
    tls: TlsStream,
    decoder: FrameDecoder,
    received: BytesMut,
    out: BytesMut,
    frames: usize,
    closing: bool,
}

impl TestServer {
    /// Serves with `acceptor`: answers each frame (an ACK for HL7, else `LEN|n|sum`), and
    /// closes (close_notify + FIN) after `close_after` frames, if given.
    pub(super) fn start(acceptor: TlsAcceptor, close_after: Option<usize>) -> Self {
        let mut listener = TcpListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let poll = Poll::new().unwrap();
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)
            .unwrap();
        let waker = Arc::new(Waker::new(poll.registry(), WAKER).unwrap());
        let (tx, reports) = mpsc::channel();
        let thread = std::thread::spawn(move || serve(poll, listener, acceptor, close_after, tx));
        Self {
            addr,
            reports,
            waker,
            thread: Some(thread),
        }
    }

    #[track_caller]
    pub(super) fn report(&self) -> Report {
        self.reports
            .recv_timeout(IO_TIMEOUT)
            .expect("server reports the connection's end")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.waker.wake();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(
    mut poll: Poll,
    listener: TcpListener,
    acceptor: TlsAcceptor,
    close_after: Option<usize>,
    reports: Sender<Report>,
) {
    let mut events = Events::with_capacity(256);
    let mut conns: HashMap<usize, ServerConn> = HashMap::new();
    let mut next = 0;
    let mut scratch = vec![0u8; 64 * 1024];
    loop {
        match poll.poll(&mut events, None) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => other.unwrap(),
        }
        for event in &events {
            match event.token() {
                WAKER => return,
                LISTENER => loop {
                    let (socket, _) = match listener.accept() {
                        Ok(accepted) => accepted,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => panic!("accept: {e}"),
                    };
                    let mut tls = acceptor.accept(socket).unwrap();
                    let token = Token(next);
                    next += 1;
                    poll.registry()
                        .register(tls.socket(), token, Interest::READABLE | Interest::WRITABLE)
                        .unwrap();
                    let conn = ServerConn {
                        tls,
                        decoder: FrameDecoder::new(crate::codec::DEFAULT_MAX_MESSAGE_SIZE),
                        received: BytesMut::new(),
                        out: BytesMut::new(),
                        frames: 0,
                        closing: false,
                    };
                    conns.insert(token.0, conn);
                },
                Token(key) => {
                    let Some(conn) = conns.get_mut(&key) else {
                        continue;
                    };
                    if let Some(failure) = drive(conn, &mut scratch, close_after) {
                        let mut conn = conns.remove(&key).unwrap();
                        let _ = poll.registry().deregister(conn.tls.socket());
                        let _ = reports.send(Report {
                            handshake_done: conn.tls.handshake_done(),
                            protocol: conn.tls.protocol_version(),
                            identity: conn.tls.peer_identity().cloned(),
                            failure,
                            frames: conn.frames,
                            socket_bytes: conn.tls.socket_bytes_written(),
                        });
                    }
                }
            }
        }
    }
}

/// One readiness event's worth of work. `Some(failure)` when the connection is finished.
fn drive(
    conn: &mut ServerConn,
    scratch: &mut [u8],
    close_after: Option<usize>,
) -> Option<Option<TlsFailureKind>> {
    let mut eof = false;
    loop {
        match conn.tls.read(scratch) {
            Ok(0) => {
                eof = true;
                break;
            }
            Ok(n) => {
                conn.received.extend_from_slice(&scratch[..n]);
                while let Some(frame) = conn.decoder.decode(&mut conn.received).unwrap() {
                    conn.frames += 1;
                    let reply = if frame.starts_with(b"MSH") {
                        ack::accept(&frame).to_vec()
                    } else {
                        let sum = frame.iter().fold(0u32, |s, &b| s.wrapping_add(b.into()));
                        format!("LEN|{}|{sum}", frame.len()).into_bytes()
                    };
                    encode_frame(&reply, &mut conn.out);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Some(Some(TlsFailure::from_io(&e).expect("a TlsFailure").kind())),
        }
        // Handshake messages go out as soon as rustls has them.
        if conn.tls.wants_write() && conn.tls.flush().is_err() {
            break;
        }
    }
    while !conn.out.is_empty() {
        match conn.tls.write_vectored(&[IoSlice::new(&conn.out)]) {
            Ok(n) => conn.out.advance(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(_) => return Some(None),
        }
        if conn.tls.flush().is_err() {
            break;
        }
    }
    match conn.tls.flush() {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Err(_) => return Some(None),
    }
    let done_replying = close_after.is_some_and(|n| conn.frames >= n) && conn.out.is_empty();
    if eof || done_replying || conn.closing {
        conn.closing = true;
        return match conn.tls.shutdown_write() {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            _ => Some(None),
        };
    }
    None
}
