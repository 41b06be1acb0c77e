//! Memory per idle TLS connection, server side: opens N sessions in-process over in-memory
//! pipes, completes each handshake and one MLLP round trip, drops the clients, and reports the
//! heap the server sessions keep, before and after `release_idle_buffers`.
//!
//! ```text
//! cargo run --release --features tls --example tls_idle_memory -- 1000
//! cargo run --release --features tls --example tls_idle_memory -- 1000 mtls
//! ```
//!
//! Heap bytes come from a counting global allocator (exact, live bytes); RSS from
//! `/proc/self/statm` (coarser: freed memory is not always returned to the kernel). It also
//! prints the handshake rate, both sides on one thread (an upper bound on the CPU cost).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, Ordering};

use mllp_reactor::tls::__plumbing::{ShutdownWrite, TlsStream};
use mllp_reactor::tls::{TlsAcceptor, TlsConfig, TlsSession};
use rcgen::{CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

/// Live heap bytes.
static LIVE: AtomicIsize = AtomicIsize::new(0);

/// The system allocator, counting live bytes.
struct Counting;

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so
// `System`'s guarantees carry over; the counter is only bookkeeping.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded under the caller's contract for `alloc`.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded under the caller's contract for `dealloc`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded under the caller's contract for `alloc_zeroed`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: forwarded under the caller's contract for `realloc`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

type Queue = Rc<RefCell<VecDeque<u8>>>;

/// One end of an in-memory duplex pipe: reads `rx` (WouldBlock when empty), writes `tx`.
struct End {
    rx: Queue,
    tx: Queue,
}

impl Read for End {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut rx = self.rx.borrow_mut();
        if rx.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        rx.read(buf)
    }
}

impl Write for End {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tx.borrow_mut().extend(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ShutdownWrite for End {
    fn shutdown_write(&self) -> io::Result<()> {
        Ok(())
    }
}

fn pipe() -> (End, End) {
    let (a, b) = (Queue::default(), Queue::default());
    (
        End {
            rx: Rc::clone(&a),
            tx: Rc::clone(&b),
        },
        End { rx: b, tx: a },
    )
}

fn rss_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

/// Drives one client/server pair until the handshake is done and one frame has been answered.
fn converse(server: &mut TlsStream<End>, client: &mut rustls::ClientConnection, end: &mut End) {
    let frame = b"\x0bMSH|^~\\&|LAB|H|EHR|H|20260101||ADT^A01|MSG1|P|2.5.1\r\x1c\x0d";
    let ack = b"\x0bMSH|^~\\&|EHR|H|LAB|H|20260101||ACK^A01|MSG1|P|2.5.1\rMSA|AA|MSG1\r\x1c\x0d";
    client.writer().write_all(frame).unwrap();
    let mut buf = [0u8; 4096];
    let mut received = Vec::new();
    let mut answered = false;
    for _ in 0..100 {
        while client.wants_write() {
            client.write_tls(end).unwrap();
        }
        loop {
            match server.read(&mut buf) {
                Ok(0) => panic!("eof"),
                Ok(n) => received.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("server: {e}"),
            }
        }
        if !answered && received.ends_with(b"\x1c\x0d") {
            server.write_vectored(&[IoSlice::new(ack)]).unwrap();
            answered = true;
        }
        server.flush().unwrap();
        while !end.rx.borrow().is_empty() {
            client.read_tls(end).unwrap();
            client.process_new_packets().unwrap();
        }
        let mut reply = Vec::new();
        let _ = client.reader().read_to_end(&mut reply);
        if answered && !reply.is_empty() {
            return;
        }
    }
    panic!("no round trip");
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1000);
    let mtls = args.next().as_deref() == Some("mtls");

    let mut ca_params = CertificateParams::default();
    ca_params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf = |name: &str| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![name.to_owned()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        (cert, key)
    };
    let (server_cert, server_key) = leaf("localhost");
    let (client_cert, client_key) = leaf("client.example");
    let mut config = TlsConfig::from_pem(server_cert.pem(), server_key.serialize_pem());
    if mtls {
        config = config.client_ca_pem(ca.pem());
    }
    let acceptor = TlsAcceptor::new(config).unwrap();

    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let client_config = Arc::new(if mtls {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(client_key.serialize_der()));
        builder
            .with_client_auth_cert(vec![CertificateDer::from(client_cert.der().to_vec())], key)
            .unwrap()
    } else {
        builder.with_no_client_auth()
    });

    // The cost of the pipes alone, to subtract.
    let before_pipes = live();
    let pipes: Vec<_> = (0..n).map(|_| pipe()).collect();
    let pipe_bytes = live() - before_pipes;
    drop(pipes);

    let (live0, rss0) = (live(), rss_bytes());
    let started = std::time::Instant::now();
    let mut servers = Vec::with_capacity(n);
    for _ in 0..n {
        let (server_end, mut client_end) = pipe();
        let mut server = acceptor.accept(server_end).unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let mut client = rustls::ClientConnection::new(Arc::clone(&client_config), name).unwrap();
        converse(&mut server, &mut client, &mut client_end);
        drop(client);
        drop(client_end);
        let socket = server.socket();
        socket.rx.borrow_mut().shrink_to_fit();
        socket.tx.borrow_mut().clear();
        socket.tx.borrow_mut().shrink_to_fit();
        servers.push(server);
    }
    let elapsed = started.elapsed();
    let vec_bytes = (n * std::mem::size_of::<TlsStream<End>>()) as isize;
    let per = |bytes: isize| (bytes - pipe_bytes - vec_bytes) / n as isize;
    let (live1, rss1) = (live(), rss_bytes());
    for server in &mut servers {
        server.release_idle_buffers();
    }
    let (live2, rss2) = (live(), rss_bytes());

    println!(
        "{n} idle {} sessions after handshake + one MLLP round trip (server side)",
        if mtls { "mTLS" } else { "TLS" }
    );
    println!(
        "size_of::<TlsSession>() = {} bytes, size_of::<TlsStream<mio::net::TcpStream>>() = {} \
         bytes (boxed in the reactor's Transport)",
        std::mem::size_of::<TlsSession>(),
        std::mem::size_of::<TlsStream>()
    );
    println!(
        "heap per session, buffers held:     {:>7} bytes (+ the struct)",
        per(live1 - live0)
    );
    println!(
        "heap per session, buffers released: {:>7} bytes (+ the struct)",
        per(live2 - live0)
    );
    println!(
        "RSS per session, held / released:   {:>7} / {} bytes",
        (rss1.saturating_sub(rss0)) / n,
        (rss2.saturating_sub(rss0)) / n
    );
    println!(
        "{n} handshakes + round trips, client and server on one thread: {:.2} s ({:.0}/s)",
        elapsed.as_secs_f64(),
        n as f64 / elapsed.as_secs_f64()
    );
    drop(servers);
}
