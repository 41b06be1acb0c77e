//! A real HAProxy (Debian's 2.6) in front of MLLP backends, on loopback only.
//!
//! HAProxy runs the committed template `deploy/haproxy.cfg` unchanged; the tests point it at
//! their own ports through the environment variables the template reads. Every test needs the
//! `haproxy` binary (`apt-get install haproxy`; `.ci/run` installs it): where it is missing,
//! each test fails under `CI=true` and otherwise prints why it is skipped.
//!
//! `HAPROXY_CAPTURE=DIR cargo test -p mllp-reactor-cli --test haproxy` also writes the raw
//! headers HAProxy sent into DIR, in the fuzz corpus format (a mode byte, then the bytes).

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use mllp_reactor::proxy::{ProxyDecoder, ProxyHeader, ProxyMode, encode_v2};

use mllp_test_support::haproxy as support;
use mllp_test_support::tmpfs;

use support::{Haproxy, TIMEOUT, free_port, haproxy_binary};

const FRAME: &[u8] = b"\x0bMSH|^~\\&|LAB|H|EHR|H|20260101||ORU^R01|MSG1|P|2.5.1\r\x1c\r";

/// One connection a throwaway backend accepted, after its PROXY header.
struct Accepted {
    stream: TcpStream,
    header: ProxyHeader,
    /// The header's bytes exactly as HAProxy sent them.
    raw: Vec<u8>,
    /// Bytes that arrived after the header in the same reads.
    rest: Vec<u8>,
}

/// Reads a PROXY v2 header off a fresh connection.
fn read_header(mut stream: TcpStream) -> Result<Accepted, String> {
    stream
        .set_read_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut decoder = ProxyDecoder::new(ProxyMode::V2);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match decoder.decode(&buf) {
            Ok(Some((header, len))) => {
                let rest = buf.split_off(len);
                return Ok(Accepted {
                    stream,
                    header,
                    raw: buf,
                    rest,
                });
            }
            Ok(None) => {}
            Err(e) => return Err(format!("{e}: {buf:02x?}")),
        }
        match stream.read(&mut chunk) {
            Ok(0) => return Err(format!("closed after {buf:02x?}")),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("{e} after {buf:02x?}")),
        }
    }
}

/// Connections the throwaway backends accepted: which backend, and the header decoded (or
/// why not).
type Arrivals = mpsc::Receiver<(usize, Result<Accepted, String>)>;

/// Two loopback listeners standing in for `serve` nodes.
struct Backends {
    addrs: [SocketAddr; 2],
    /// Each backend's `/readyz` stand-in: 200 until the backend is killed, then refused.
    health: [SocketAddr; 2],
    /// Every connection either accepted, in order.
    arrivals: Arrivals,
    stop: [Arc<AtomicBool>; 2],
}

impl Backends {
    /// Binds both listeners; each accept thread decodes the PROXY header of every connection
    /// and sends it on `arrivals`. The threads end with [`Backends::kill`] or the process.
    fn start() -> Self {
        let (tx, arrivals) = mpsc::channel();
        let mut addrs = [free_port("127.0.0.1"); 2];
        let mut health = addrs;
        let stop = [
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        ];
        for (index, addr) in addrs.iter_mut().enumerate() {
            health[index] = health_stub(Arc::clone(&stop[index]));
            let listener = TcpListener::bind("127.0.0.1:0").expect("backend listener");
            *addr = listener.local_addr().expect("backend address");
            let (tx, stop) = (tx.clone(), Arc::clone(&stop[index]));
            std::thread::spawn(move || {
                for stream in listener.incoming().flatten() {
                    if stop.load(Ordering::SeqCst) || tx.send((index, read_header(stream))).is_err()
                    {
                        return; // drops the listener: its port now refuses connections
                    }
                }
            });
        }
        Self {
            addrs,
            health,
            arrivals,
            stop,
        }
    }

    /// Closes backend `index`'s listener, as if its process died: new connections to it are
    /// refused. (The connect wakes its accept thread, which sees the flag and returns.)
    fn kill(&self, index: usize) {
        self.stop[index].store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addrs[index]);
        let _ = TcpStream::connect(self.health[index]);
    }
}

/// A minimal `GET /readyz` responder for a throwaway backend: 200 until `stop`, then its port
/// is closed (as a dead node's would be).
fn health_stub(stop: Arc<AtomicBool>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("health listener");
    let addr = listener.local_addr().expect("health address");
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            let _ = stream.set_read_timeout(Some(TIMEOUT));
            let mut request = [0u8; 1024];
            let _ = stream.read(&mut request);
            let _ = stream.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 18\r\nConnection: close\r\n\r\n{\"status\":\"ready\"}",
            );
        }
    });
    addr
}

/// Next accepted connection whose header satisfies `wanted`; others are dropped.
#[track_caller]
fn next_accepted(rx: &Arrivals, wanted: impl Fn(&ProxyHeader) -> bool) -> (usize, Accepted) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let (index, accepted) = rx.recv_timeout(left).expect("a backend connection in time");
        // Health checks may close before we read; only a decoding error is a failure.
        match accepted {
            Ok(a) if wanted(&a.header) => return (index, a),
            Ok(_) => {}
            Err(e) if e.starts_with("closed") || e.contains("reset") => {}
            Err(e) => panic!("HAProxy sent a header the decoder refused: {e}"),
        }
    }
}

/// Writes `raw` as a proxy fuzz-corpus file (mode byte 1 = v2) when `HAPROXY_CAPTURE` is set.
fn capture(name: &str, raw: &[u8]) {
    eprintln!("HAProxy sent {name}: {raw:02x?}");
    if let Some(dir) = std::env::var_os("HAPROXY_CAPTURE") {
        let mut data = vec![1u8];
        data.extend_from_slice(raw);
        std::fs::write(Path::new(&dir).join(name), data).expect("capture file");
    }
}

/// HAProxy's health checks (`check-send-proxy`) and a proxied client connection
/// (`send-proxy-v2`) both start with headers the decoder accepts: LOCAL for the checks, the
/// client's real address and port for the connection, and the MLLP bytes follow untouched.
#[test]
fn haproxy_sends_proxy_v2_headers_the_decoder_accepts() {
    let Some(binary) = haproxy_binary() else {
        return;
    };
    probe(&binary, "127.0.0.1", "tcp4");
    probe(&binary, "::1", "tcp6");
}

/// One HAProxy with its frontend on `ip`, two throwaway backends, one client.
#[track_caller]
fn probe(binary: &Path, ip: &str, family: &str) {
    let backends = Backends::start();
    let rx = &backends.arrivals;
    let mut haproxy = Haproxy::start(binary, ip, backends.addrs, backends.health);
    // The health checks go to the nodes' --health ports (HTTP GET /readyz), not to the MLLP
    // port: every connection a backend sees is a proxied client's.
    haproxy.wait_status("node1", "UP");
    haproxy.wait_status("node2", "UP");

    let mut client = TcpStream::connect(haproxy.frontend).expect("connect through HAProxy");
    client.set_read_timeout(Some(TIMEOUT)).unwrap();
    client.write_all(FRAME).unwrap();
    let client_addr = client.local_addr().unwrap();
    // The readiness probes of `Haproxy::start` were proxied too: pick this client's connection.
    let (_, mut node) = next_accepted(rx, |h| h.source() == Some(client_addr));
    capture(&format!("haproxy_proxied_{family}"), &node.raw);
    assert_eq!(
        node.header,
        ProxyHeader::Proxied {
            source: client_addr,
            destination: haproxy.frontend
        },
        "the client's real address and port"
    );
    assert_eq!(
        node.raw,
        encode_v2(&node.header),
        "no TLVs from HAProxy 2.6 in TCP mode"
    );

    // The frame follows the header, unconsumed; an answer travels back to the client.
    let mut payload = node.rest;
    let mut chunk = [0u8; 512];
    while payload.len() < FRAME.len() {
        let n = node
            .stream
            .read(&mut chunk)
            .expect("frame after the header");
        assert!(n > 0, "closed before the frame");
        payload.extend_from_slice(&chunk[..n]);
    }
    assert_eq!(payload, FRAME);
    node.stream.write_all(b"\x0bMSA|AA|MSG1\r\x1c\r").unwrap();
    let mut reply = [0u8; 64];
    let n = client.read(&mut reply).expect("reply through HAProxy");
    assert_eq!(&reply[..n], b"\x0bMSA|AA|MSG1\r\x1c\r");
}

/// The template's failover, with throwaway backends: when one backend's port starts refusing
/// connections (its process died), HAProxy's checks mark it DOWN and every new client
/// connection lands on the other, still carrying the client's address.
#[test]
fn a_dead_backend_is_marked_down_and_skipped() {
    let Some(binary) = haproxy_binary() else {
        return;
    };
    let backends = Backends::start();
    let mut haproxy = Haproxy::start(&binary, "127.0.0.1", backends.addrs, backends.health);
    haproxy.wait_status("node1", "UP");
    haproxy.wait_status("node2", "UP");

    backends.kill(0);
    haproxy.wait_status("node1", "DOWN");
    for _ in 0..10 {
        let client = TcpStream::connect(haproxy.frontend).expect("connect through HAProxy");
        let client_addr = client.local_addr().unwrap();
        let (index, _) = next_accepted(&backends.arrivals, |h| h.source() == Some(client_addr));
        assert_eq!(index, 1, "served by the live backend");
    }
    assert_eq!(haproxy.status("node2").as_deref(), Some("UP"));
}

/// A `serve` node, killed on drop.
struct Node {
    child: Child,
    addr: SocketAddr,
    /// Its `--health` address.
    health: SocketAddr,
    /// Everything the node logged on stderr so far.
    log: Arc<std::sync::Mutex<String>>,
}

impl Node {
    /// Starts `mllp-reactor serve --proxy-protocol v2` on a free loopback port and reads the
    /// address from its "listening on ADDR" line.
    #[track_caller]
    fn start() -> Self {
        Self::start_with(&["--no-store"])
    }

    /// As [`start`](Self::start), with `args` (a store, say) instead of `--no-store`.
    #[track_caller]
    fn start_with(args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_mllp-reactor"))
            .args(["serve", "--listen", "127.0.0.1:0", "--proxy-protocol", "v2"])
            .args(["--proxy-source", "127.0.0.0/8"])
            .args(["--health", "127.0.0.1:0"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("serve starts");
        let log = Arc::new(std::sync::Mutex::new(String::new()));
        let mut stderr = child.stderr.take().expect("piped stderr");
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let mut stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            // Line by line until the health address, then keep draining so the node never
            // blocks on a full pipe.
            let mut line = Vec::new();
            let mut byte = [0u8; 1];
            while stdout.read(&mut byte).is_ok_and(|n| n == 1) {
                if byte[0] != b'\n' {
                    line.push(byte[0]);
                    continue;
                }
                let text = String::from_utf8_lossy(&line).into_owned();
                line.clear();
                let last = text.starts_with("health on ");
                if tx.send(text).is_err() || last {
                    break;
                }
            }
            let _ = std::io::copy(&mut stdout, &mut std::io::sink());
        });
        let mut addr = None;
        let mut health = None;
        while health.is_none() {
            let line = rx
                .recv_timeout(TIMEOUT)
                .expect("serve prints its addresses");
            if let Some(a) = line.strip_prefix("listening on ") {
                addr = a.parse().ok();
            }
            if let Some(h) = line.strip_prefix("health on http://") {
                health = h.split('/').next().and_then(|h| h.parse().ok());
            }
        }
        Self {
            child,
            addr: addr.expect("a listening line first"),
            health: health.expect("a health line"),
            log,
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends one message on a fresh connection through HAProxy and checks its AA.
#[track_caller]
fn send_one(frontend: SocketAddr, id: usize) {
    use mllp_reactor::{Client, ClientConfig};
    let config = ClientConfig::default()
        .connect_timeout(TIMEOUT)
        .response_timeout(TIMEOUT);
    let mut client = Client::connect(frontend, config).expect("connect through HAProxy");
    let message = format!("MSH|^~\\&|LAB|H|EHR|H|20260101||ORU^R01|M{id}|P|2.5.1\r");
    let ack = client
        .send(message.as_bytes())
        .expect("an ACK through HAProxy");
    assert!(ack.is_accept(), "message {id}: {ack:?}");
}

/// The issue's end to end check: two `serve --proxy-protocol v2` nodes behind HAProxy; both
/// health checks pass, messages are ACKed, and after SIGKILL of one node HAProxy marks it down
/// and every new connection is served by the other.
///
/// Each node logs the connection's peer: it must be the client's own address and port, which
/// only the PROXY header carries (the node's socket peer is HAProxy).
#[test]
fn two_nodes_behind_haproxy_fail_over() {
    let Some(binary) = haproxy_binary() else {
        return;
    };
    let mut node1 = Node::start();
    let node2 = Node::start();
    let mut haproxy = Haproxy::start(
        &binary,
        "127.0.0.1",
        [node1.addr, node2.addr],
        [node1.health, node2.health],
    );
    haproxy.wait_status("node1", "UP");
    haproxy.wait_status("node2", "UP");
    // Issue 18: HAProxy's health checks (a LOCAL header, then a close or a reset) are logged
    // at debug only: nothing at the default level, never a warning per probe.
    for node in [&node1, &node2] {
        let log = node.log.lock().unwrap();
        assert!(
            !log.contains(" WARN ") && !log.contains("connection opened"),
            "a health check was logged above debug: {log}"
        );
    }

    for id in 0..20 {
        send_one(haproxy.frontend, id);
    }
    // One more from a client whose port we know: a node must log it as the peer.
    let client = TcpStream::connect(haproxy.frontend).expect("connect through HAProxy");
    client.set_read_timeout(Some(TIMEOUT)).unwrap();
    let me = client.local_addr().unwrap();
    let mut client_w = client.try_clone().unwrap();
    client_w
        .write_all(b"\x0bMSH|^~\\&|LAB|H|EHR|H|20260101||ORU^R01|PEER|P|2.5.1\r\x1c\x0d")
        .unwrap();
    let mut reply = Vec::new();
    let mut buf = [0u8; 512];
    let mut reader = &client;
    while !reply.ends_with(b"\x1c\x0d") {
        let n = reader.read(&mut buf).expect("the ACK through HAProxy");
        assert!(n > 0, "closed before the ACK");
        reply.extend_from_slice(&buf[..n]);
    }
    let needle = format!("peer={me}");
    let deadline = Instant::now() + TIMEOUT;
    while ![&node1, &node2]
        .iter()
        .any(|n| n.log.lock().unwrap().contains(&needle))
    {
        assert!(
            Instant::now() < deadline,
            "no node logged {needle}; node1: {} node2: {}",
            node1.log.lock().unwrap(),
            node2.log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(client);

    node1.child.kill().expect("SIGKILL node1");
    node1.child.wait().expect("node1 reaped");
    haproxy.wait_status("node1", "DOWN");
    for id in 20..40 {
        send_one(haproxy.frontend, id);
    }
    assert_eq!(haproxy.status("node2").as_deref(), Some("UP"));
}

/// Issue 20: a node whose store cannot take messages (here: its disk is below
/// `--min-free-disk`, on a 16 MiB tmpfs the test mounts) answers 503 on /readyz, HAProxy marks
/// it DOWN although its MLLP port still accepts, and every new connection goes to the other
/// node; once space is freed it is UP again.
#[test]
fn a_node_whose_store_cannot_commit_stops_getting_connections() {
    let Some(binary) = haproxy_binary() else {
        assert!(
            std::env::var("CI").is_err(),
            "haproxy is missing under CI=true"
        );
        return;
    };
    let Some(fs) = tmpfs::Tmpfs::mount("haproxy-store", "16m") else {
        return;
    };
    let mnt = fs.path().to_owned();
    let dir = fs.outside().to_owned();
    let store1 = mnt.join("node1.db");
    let store2 = dir.join("node2.db");
    let node1 = Node::start_with(&[
        "--store",
        store1.to_str().unwrap(),
        "--min-free-disk",
        "6MiB",
    ]);
    let node2 = Node::start_with(&["--store", store2.to_str().unwrap()]);
    let mut haproxy = Haproxy::start(
        &binary,
        "127.0.0.1",
        [node1.addr, node2.addr],
        [node1.health, node2.health],
    );
    haproxy.wait_status("node1", "UP");
    haproxy.wait_status("node2", "UP");

    let filler = mnt.join("filler");
    std::fs::write(&filler, vec![0u8; 12 << 20]).unwrap();
    haproxy.wait_status("node1", "DOWN");
    for id in 0..20 {
        send_one(haproxy.frontend, id);
    }
    assert_eq!(haproxy.status("node2").as_deref(), Some("UP"));
    std::fs::remove_file(&filler).unwrap();
    haproxy.wait_status("node1", "UP");
    drop((node1, node2));
}

/// Issue 18 defect 2: TLS behind `send-proxy-v2`. HAProxy often sends the header and the
/// client's first bytes (the ClientHello) in one segment; the node used to take both in one
/// read and never send its ServerHello, so the handshake hung until its deadline. Every one of
/// a series of fresh TLS connections through HAProxy now gets its AA (the client's 10 s timeout
/// is the node's handshake deadline, so a stall fails the test).
#[test]
fn issue_2_tls_behind_haproxy_send_proxy_v2() {
    use mllp_reactor::tls::ClientTls;
    use mllp_reactor::{Client, ClientConfig};
    let Some(binary) = haproxy_binary() else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("mllp-haproxy-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
        .expect("a self-signed certificate");
    let cert_pem = certified.cert.pem();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, &cert_pem).expect("write the certificate");
    std::fs::write(&key, certified.signing_key.serialize_pem()).expect("write the key");
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let tls_args = ["--no-store", "--tls-cert", cert, "--tls-key", key];
    let node1 = Node::start_with(&tls_args);
    let node2 = Node::start_with(&tls_args);
    let haproxy = Haproxy::start(
        &binary,
        "127.0.0.1",
        [node1.addr, node2.addr],
        [node1.health, node2.health],
    );
    let tls = ClientTls::from_ca_pem(cert_pem.as_str())
        .expect("the CA")
        .server_name("localhost")
        .expect("a server name");
    for id in 0..20 {
        let config = ClientConfig::default()
            .connect_timeout(TIMEOUT)
            .response_timeout(TIMEOUT)
            .tls(tls.clone());
        let mut client =
            Client::connect(haproxy.frontend, config).expect("connect through HAProxy");
        let message = format!("MSH|^~\\&|LAB|H|EHR|H|20260101||ORU^R01|T{id}|P|2.5.1\r");
        let ack = client
            .send(message.as_bytes())
            .unwrap_or_else(|e| panic!("message {id} over TLS through HAProxy: {e}"));
        assert!(ack.is_accept(), "message {id}: {ack:?}");
    }
    // HAProxy's health checks (every 100 ms here: a LOCAL header, then close) are probes,
    // logged at debug level: no warning per check.
    for node in [&node1, &node2] {
        let log = node.log.lock().unwrap();
        assert!(!log.contains("WARN"), "a node warned:\n{log}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
