//! A downstream MLLP system written for the forwarding tests (feature `downstream`): it
//! records every message it receives (its MSH-10, in arrival order) and answers as a script
//! says, per control id and per time that id was seen. Loopback only; every wait is bounded.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use mllp_reactor::ack::{self, AckCode};
use mllp_reactor::msh::Msh;

/// Default bound on [`Downstream::wait_until`]: far above what a passing test needs.
pub const WAIT: Duration = Duration::from_secs(20);

/// How the downstream answers one message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// An ACK with this code and the right MSA-2.
    Ack(AckCode),
    /// Bytes that are not an ACK.
    Garbage,
    /// An AA for another control id.
    WrongId,
    /// An AA after this long (longer than the client's timeout: a timeout).
    Slow(Duration),
    /// Close the connection without answering.
    Close,
}

/// The script: (control id, how many times seen before this one) → answer.
pub type Script = Arc<dyn Fn(&str, usize) -> Answer + Send + Sync>;

/// Answers every message with an AA.
pub fn always_accept() -> Script {
    Arc::new(|_, _| Answer::Ack(AckCode::AA))
}

/// A loopback port held for a downstream that is not there yet: the socket is bound but does
/// not listen, so every connection to it is refused, and no other socket (another test's
/// server on `127.0.0.1:0`) can be given the port meanwhile. Binding a port and dropping it
/// instead leaves a window in which a concurrent test's server takes it, and the "down"
/// destination then delivers to that server.
#[derive(Debug)]
pub struct RefusingPort {
    socket: socket2::Socket,
    /// The held address.
    pub addr: SocketAddr,
}

impl RefusingPort {
    /// Binds a free port on 127.0.0.1 without listening.
    ///
    /// # Panics
    ///
    /// If the socket cannot be created or bound.
    #[must_use]
    pub fn new() -> Self {
        use socket2::{Domain, Protocol, Socket, Type};
        let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        socket.bind(&any.into()).unwrap();
        let addr = socket.local_addr().unwrap().as_socket().unwrap();
        Self { socket, addr }
    }

    /// Starts listening on the held port (the downstream comes up) without ever releasing it.
    ///
    /// # Panics
    ///
    /// If `listen` fails.
    #[must_use]
    pub fn listen(self) -> TcpListener {
        self.socket.listen(128).unwrap();
        self.socket.into()
    }
}

impl Default for RefusingPort {
    fn default() -> Self {
        Self::new()
    }
}

/// The downstream: a thread per connection; stops accepting and answering on drop.
pub struct Downstream {
    /// Where it listens.
    pub addr: SocketAddr,
    log: Arc<(Mutex<Vec<String>>, Condvar)>,
    stop: Arc<AtomicBool>,
    wait: Duration,
}

impl std::fmt::Debug for Downstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Downstream")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Downstream {
    /// Starts on a free loopback port.
    ///
    /// # Panics
    ///
    /// If it cannot bind.
    pub fn start(script: Script) -> Self {
        Self::start_on(TcpListener::bind("127.0.0.1:0").unwrap(), script)
    }

    /// Starts on `listener` (for a downstream that comes back on the same port).
    ///
    /// # Panics
    ///
    /// If the listener cannot be made non-blocking.
    pub fn start_on(listener: TcpListener, script: Script) -> Self {
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let log: Arc<(Mutex<Vec<String>>, Condvar)> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (log2, stop2) = (Arc::clone(&log), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (log, script, stop) =
                            (Arc::clone(&log2), Arc::clone(&script), Arc::clone(&stop2));
                        std::thread::spawn(move || serve(stream, &log, &script, &stop));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Self {
            addr,
            log,
            stop,
            wait: WAIT,
        }
    }

    /// Bounds [`wait_until`](Self::wait_until) by `wait` instead of [`WAIT`].
    #[must_use]
    pub fn bounded_by(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    /// Everything received so far (control ids, arrival order).
    pub fn received(&self) -> Vec<String> {
        self.log.0.lock().unwrap().clone()
    }

    /// Waits (bounded by [`WAIT`] or [`bounded_by`](Self::bounded_by)) until `done` holds
    /// for the log; returns the log.
    ///
    /// # Panics
    ///
    /// If `done` does not hold in time.
    #[track_caller]
    pub fn wait_until(&self, what: &str, done: impl Fn(&[String]) -> bool) -> Vec<String> {
        let deadline = Instant::now() + self.wait;
        let mut log = self.log.0.lock().unwrap();
        while !done(&log) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "timed out waiting for {what}; got {} messages: {log:?}",
                log.len()
            );
            log = self.log.1.wait_timeout(log, left).unwrap().0;
        }
        log.clone()
    }

    /// Waits until `id` arrived `n` times.
    ///
    /// # Panics
    ///
    /// If it does not in time.
    #[track_caller]
    pub fn wait_count(&self, id: &str, n: usize) -> Vec<String> {
        self.wait_until(&format!("{id} x{n}"), |log| {
            log.iter().filter(|x| *x == id).count() >= n
        })
    }
}

impl Drop for Downstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn serve(
    mut stream: TcpStream,
    log: &(Mutex<Vec<String>>, Condvar),
    script: &Script,
    stop: &AtomicBool,
) {
    stream
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    while !stop.load(Ordering::SeqCst) {
        let n = match stream.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(_) => return,
        };
        buf.extend_from_slice(&chunk[..n]);
        while let Some(end) = buf.windows(2).position(|w| w == [0x1c, 0x0d]) {
            let frame: Vec<u8> = buf.drain(..end + 2).collect();
            let message = frame[1..frame.len() - 2].to_vec();
            let id = Msh::parse(&message)
                .ok()
                .and_then(|m| {
                    m.control_id()
                        .map(|c| String::from_utf8_lossy(c).into_owned())
                })
                .unwrap_or_default();
            let seen = {
                let mut received = log.0.lock().unwrap();
                let seen = received.iter().filter(|x| **x == id).count();
                received.push(id.clone());
                seen
            };
            log.1.notify_all();
            let reply: Vec<u8> = match script(&id, seen) {
                Answer::Ack(AckCode::AA) => ack::accept(&message).to_vec(),
                Answer::Ack(code) => ack::nak(&message, code, "scripted").to_vec(),
                Answer::Garbage => b"this is not an ack".to_vec(),
                Answer::WrongId => {
                    b"MSH|^~\\&|DS|DS|A|B|20260101||ACK|X|P|2.5\rMSA|AA|SOMEONE-ELSE\r".to_vec()
                }
                Answer::Slow(pause) => {
                    std::thread::sleep(pause);
                    ack::accept(&message).to_vec()
                }
                Answer::Close => return,
            };
            let mut framed = vec![0x0b];
            framed.extend_from_slice(&reply);
            framed.extend_from_slice(&[0x1c, 0x0d]);
            if stream.write_all(&framed).is_err() {
                return;
            }
        }
    }
}
