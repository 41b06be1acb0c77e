//! A TCP proxy in front of PostgreSQL that can lose the reply to a `COMMIT`: armed, it
//! forwards the client's `COMMIT` to the server, waits until the server has answered it
//! (so the transaction did commit), and then closes the client's connection instead of
//! forwarding the answer. The client sees its connection die with `COMMIT` in flight.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;

/// The proxy; it runs until the test process ends (its threads block on sockets).
pub(crate) struct CutProxy {
    pub(crate) addr: SocketAddr,
    state: Arc<State>,
}

#[derive(Default)]
struct State {
    /// Cut the next connection that sends a `COMMIT`.
    armed: AtomicBool,
    /// Refuse new connections (close them at once).
    refuse: AtomicBool,
    /// Replies to `COMMIT` lost so far.
    cuts: AtomicUsize,
}

impl CutProxy {
    pub(crate) fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let state = Arc::new(State::default());
        let shared = Arc::clone(&state);
        thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if shared.refuse.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                pipe(client, server, Arc::clone(&shared));
            }
        });
        Self { addr, state }
    }

    /// The next `COMMIT` sent through the proxy loses its reply.
    pub(crate) fn arm(&self) {
        self.state.armed.store(true, Ordering::SeqCst);
    }

    /// Refuse (`true`) or accept new connections.
    pub(crate) fn refuse(&self, refuse: bool) {
        self.state.refuse.store(refuse, Ordering::SeqCst);
    }

    /// How many `COMMIT` replies were lost.
    pub(crate) fn cuts(&self) -> usize {
        self.state.cuts.load(Ordering::SeqCst)
    }
}

/// Whether `haystack` contains `needle`.
fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn pipe(client: TcpStream, server: TcpStream, state: Arc<State>) {
    // Set (before the COMMIT goes out) when this connection's COMMIT reply is to be lost.
    let cutting = Arc::new(AtomicBool::new(false));
    let (mut c_in, mut s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    let up = Arc::clone(&cutting);
    let up_state = Arc::clone(&state);
    thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        loop {
            let n = match c_in.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            // A simple-protocol "COMMIT" query: 'Q', length, "COMMIT\0".
            if contains(&buf[..n], b"COMMIT\0") && up_state.armed.swap(false, Ordering::SeqCst) {
                up.store(true, Ordering::SeqCst);
            }
            if s_out.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = s_out.shutdown(Shutdown::Write);
    });
    let (mut s_in, mut c_out) = (server, client);
    thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        let mut withheld = Vec::new();
        loop {
            let n = match s_in.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if cutting.load(Ordering::SeqCst) {
                // Nothing more reaches the client; once the server's CommandComplete "COMMIT"
                // is in, the transaction has committed: drop the client's connection.
                withheld.extend_from_slice(&buf[..n]);
                if contains(&withheld, b"COMMIT\0") {
                    state.cuts.fetch_add(1, Ordering::SeqCst);
                    let _ = c_out.shutdown(Shutdown::Both);
                    let _ = s_in.shutdown(Shutdown::Both);
                    break;
                }
                continue;
            }
            if c_out.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = c_out.shutdown(Shutdown::Both);
    });
}
