//! Two `serve` nodes behind a real HAProxy, writing one PostgreSQL store (issue 14):
//! SIGKILL one node under load, and nothing ACKed is lost; a message whose ACK was lost with
//! the dead node is resent through HAProxy to the other node, answered AA, and stored flagged
//! as a duplicate of the first copy; each node records the sender's real address (PROXY v2).
//!
//! Needs `haproxy`, PostgreSQL (`mllp_test_support::pg` starts a private one), the template
//! `deploy/haproxy.cfg` and `serve --proxy-protocol`; where one is missing the test prints
//! why and passes. Loopback only; every wait is bounded.

use mllp_test_support::{haproxy, pg};

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use mllp_reactor::ack::AckCode;
use mllp_reactor::{Client, ClientConfig};
use serde_json::Value;

use haproxy::{Haproxy, TEMPLATE, haproxy_binary};
use pg::PgCluster;

const BIN: &str = env!("CARGO_BIN_EXE_mllp-reactor");
/// Bound on every wait for a node, a resend, or the whole load phase.
const WAIT: Duration = Duration::from_secs(30);
const SENDERS: usize = 8;

/// A `serve --proxy-protocol v2 --store URL` node, killed on drop.
struct Node {
    child: Child,
    addr: SocketAddr,
    /// Its `--health` address.
    health: SocketAddr,
}

impl Node {
    #[track_caller]
    fn start(store: &str) -> Self {
        let mut child = Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--proxy-protocol", "v2"])
            .args(["--proxy-source", "127.0.0.0/8"])
            .args(["--store", store, "--health", "127.0.0.1:0"])
            // Main's serve logs every connection at info: only warnings and errors here.
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("serve starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let line = rx.recv_timeout(WAIT).expect("serve prints its address");
        let addr = line
            .strip_prefix("listening on ")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line from serve: {line:?}"));
        let stored = rx.recv_timeout(WAIT).expect("serve prints its store");
        assert!(stored.starts_with("storing to postgres://"), "{stored}");
        let line = rx
            .recv_timeout(WAIT)
            .expect("serve prints its health address");
        let health = line
            .strip_prefix("health on http://")
            .and_then(|h| h.split('/').next())
            .and_then(|h| h.parse().ok())
            .unwrap_or_else(|| panic!("unexpected health line from serve: {line:?}"));
        // The reader thread keeps draining stdout, so the node never blocks on a full pipe.
        Self {
            child,
            addr,
            health,
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether this build's `serve` takes `--proxy-protocol` (the reactor work on main).
fn serve_has_proxy_protocol() -> bool {
    Command::new(BIN)
        .args(["serve", "--help"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("--proxy-protocol"))
}

fn message(control_id: &str) -> Vec<u8> {
    format!(
        "MSH|^~\\&|ADT1|GOOD HEALTH HOSPITAL|GHH LAB|GHH|20260101120000||ADT^A01^ADT_A01|{control_id}|P|2.5.1\r\
         PID|1||PATID1234^^^GOOD HEALTH HOSPITAL^MR||EVERYMAN^ADAM^A^III||19610615|M\r"
    )
    .into_bytes()
}

/// Sends one message on a fresh raw connection through `frontend`; returns the ACK's text
/// and the connection's local address (what the node should record as the peer).
fn send_raw(frontend: SocketAddr, msg: &[u8]) -> (String, SocketAddr) {
    let mut stream = TcpStream::connect(frontend).expect("connect through HAProxy");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let local = stream.local_addr().unwrap();
    let mut frame = vec![0x0b];
    frame.extend_from_slice(msg);
    frame.extend_from_slice(b"\x1c\r");
    stream.write_all(&frame).unwrap();
    let mut reply = Vec::new();
    let mut chunk = [0u8; 1024];
    while !reply.ends_with(b"\x1c\r") {
        let n = stream.read(&mut chunk).expect("an ACK");
        assert!(n > 0, "closed before the ACK: {reply:?}");
        reply.extend_from_slice(&chunk[..n]);
    }
    (String::from_utf8_lossy(&reply).into_owned(), local)
}

/// Connects through HAProxy, retrying while it still routes to the dead node.
fn connect(frontend: SocketAddr) -> Client {
    let config = ClientConfig::default()
        .connect_timeout(WAIT)
        .response_timeout(WAIT);
    let deadline = Instant::now() + WAIT;
    loop {
        match Client::connect(frontend, config.clone()) {
            Ok(client) => return client,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "cannot connect through HAProxy: {e}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// What one sender saw: the ids that got AA, and those whose first copy went out on a
/// connection that broke before the ACK came back (resent until AA).
#[derive(Default)]
struct Sent {
    acked: Vec<String>,
    resent: Vec<String>,
}

/// Sends unique control ids until `stop`; on a broken connection reconnects through HAProxy
/// and resends the unanswered message, as a real sender does after a lost ACK.
fn sender(frontend: SocketAddr, c: usize, stop: Arc<AtomicBool>, acked: Arc<AtomicU64>) -> Sent {
    let mut sent = Sent::default();
    let mut client = connect(frontend);
    let mut pending: Option<String> = None;
    let mut resend_deadline = None;
    for n in 0.. {
        if stop.load(Ordering::SeqCst) && pending.is_none() {
            break;
        }
        let id = pending.take().unwrap_or_else(|| format!("c{c}n{n}"));
        match client.send(&message(&id)) {
            Ok(ack) => {
                assert_eq!(ack.code, AckCode::AA, "{id}: {:?}", ack.text);
                sent.acked.push(id);
                acked.fetch_add(1, Ordering::SeqCst);
                resend_deadline = None;
            }
            Err(_) => {
                let deadline = *resend_deadline.get_or_insert_with(|| Instant::now() + WAIT);
                assert!(
                    Instant::now() < deadline,
                    "{id}: no AA after resending for {WAIT:?}"
                );
                if sent.resent.last() != Some(&id) {
                    sent.resent.push(id.clone());
                }
                pending = Some(id);
                std::thread::sleep(Duration::from_millis(20));
                client = connect(frontend);
            }
        }
    }
    sent
}

/// The store's records by control id (all copies, in id order).
fn export(url: &str) -> HashMap<String, Vec<Value>> {
    let out = Command::new(BIN).args(["export", url]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut by_id: HashMap<String, Vec<Value>> = HashMap::new();
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        let record: Value = serde_json::from_str(line).unwrap();
        let id = record["control_id"].as_str().unwrap().to_owned();
        by_id.entry(id).or_default().push(record);
    }
    by_id
}

#[test]
fn two_nodes_behind_haproxy_share_one_postgres_store_and_lose_nothing() {
    let Some(binary) = haproxy_binary() else {
        return;
    };
    if !Path::new(TEMPLATE).is_file() || !serve_has_proxy_protocol() {
        mllp_test_support::unavailable(
            "deploy/haproxy.cfg and `serve --proxy-protocol`",
            "the template or the option is missing",
        );
        return;
    }
    let Some(db) = PgCluster::start() else { return };
    let url = db.create_db("nodes");
    let mut node1 = Node::start(&url);
    let node2 = Node::start(&url);
    let mut proxy = Haproxy::start(
        &binary,
        "127.0.0.1",
        [node1.addr, node2.addr],
        [node1.health, node2.health],
    );
    proxy.wait_status("node1", "UP");
    proxy.wait_status("node2", "UP");
    let frontend = proxy.frontend;

    // Probes on fresh connections (leastconn spreads them): find one that node1 stored, with
    // the sender's own address as its peer.
    let mut probes = Vec::new();
    for k in 0..6 {
        let id = format!("probe{k}");
        let (ack, local) = send_raw(frontend, &message(&id));
        assert!(ack.contains("MSA|AA|"), "{ack:?}");
        probes.push((id, local));
    }
    let stored = export(&url);
    let mut on_node1 = None;
    for (id, local) in &probes {
        let record = &stored[id][0];
        assert_eq!(
            record["peer"],
            local.to_string(),
            "the sender's address, via PROXY v2"
        );
        if record["local"] == node1.addr.to_string() {
            on_node1 = Some((id.clone(), record["id"].as_i64().unwrap()));
        }
    }
    let (probe_id, probe_store_id) = on_node1.expect("leastconn sent a probe to node1");

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let senders: Vec<_> = (0..SENDERS)
        .map(|c| {
            let (stop, acked) = (Arc::clone(&stop), Arc::clone(&acked));
            std::thread::spawn(move || sender(frontend, c, stop, acked))
        })
        .collect();
    let wait_acked = |at_least: u64| {
        let deadline = Instant::now() + WAIT;
        while acked.load(Ordering::SeqCst) < at_least {
            assert!(Instant::now() < deadline, "too few AAs");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    wait_acked(200);
    node1.child.kill().expect("SIGKILL node1");
    node1.child.wait().expect("node1 reaped");
    proxy.wait_status("node1", "DOWN");
    let at_kill = acked.load(Ordering::SeqCst);
    wait_acked(at_kill + 200);
    stop.store(true, Ordering::SeqCst);
    let sent: Vec<Sent> = senders.into_iter().map(|t| t.join().unwrap()).collect();

    // The resend of a message node1 stored, now through node2: AA, stored as a duplicate.
    let (ack, _) = send_raw(frontend, &message(&probe_id));
    assert!(ack.contains("MSA|AA|"), "{ack:?}");

    let stored = export(&url);
    let copies = &stored[&probe_id];
    assert_eq!(copies.len(), 2);
    assert_eq!(copies[1]["local"], node2.addr.to_string());
    assert_eq!(copies[1]["duplicate_of"], probe_store_id);
    let mut acked_total = 0;
    for s in &sent {
        for id in &s.acked {
            let copies = stored
                .get(id)
                .unwrap_or_else(|| panic!("{id} got AA but is not stored"));
            assert_eq!(
                copies[0]["message"].as_str().unwrap().as_bytes(),
                &message(id)[..]
            );
            assert_eq!(copies[0]["duplicate_of"], Value::Null);
            acked_total += 1;
        }
        // A message whose connection broke: if its first copy was stored, the resend is
        // flagged as its duplicate.
        for id in &s.resent {
            let copies = &stored[id];
            assert!(copies.len() <= 2, "{id}: {copies:?}");
            if let [first, second] = &copies[..] {
                assert_eq!(second["duplicate_of"], first["id"], "{id}");
            }
        }
    }
    let resent: usize = sent.iter().map(|s| s.resent.len()).sum();
    eprintln!("two nodes: {acked_total} AA'd all stored, {resent} resent after the kill");
}
