//! Store and forward end to end (issue "Store and forward", Must show): the real
//! `mllp-reactor serve --forward` is SIGKILLed under load and every AA'd message still reaches
//! the downstream, in store order per lane, repeated only when it was in flight at a kill;
//! a downstream that is down lets the backlog grow on disk (not in memory) and drains in
//! order when it returns; `forward status` / `requeue` and the usage errors.
//!
//! Loopback only; every wait is bounded (`WAIT`; the crash test's final drain by `DRAIN_CAP`),
//! the crash loop by `CRASH_BUDGET`.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, RandomState};
use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mllp_reactor::ack::AckCode;
use mllp_reactor::{Client, ClientConfig};
use mllp_store::forward::LaneKey;
use serde_json::Value;

// A private PostgreSQL for the two-node test.
use mllp_test_support::TempDir;
use mllp_test_support::downstream::{Downstream, RefusingPort, always_accept};
use mllp_test_support::pg;
use mllp_test_support::process::ServeProcess;

const BIN: &str = env!("CARGO_BIN_EXE_mllp-reactor");
/// Bound on every wait: far above what a passing run needs.
const WAIT: Duration = Duration::from_secs(60);
/// The crash loop starts no new round after this long (the issue: about 30 s of CI).
const CRASH_BUDGET: Duration = Duration::from_secs(15);
const CRASH_MIN_ROUNDS: usize = 3;
/// The crash test's final drain, at most (it fails sooner when deliveries stop).
const DRAIN_CAP: Duration = Duration::from_secs(300);
const LANES: u16 = 2;
const SENDERS: usize = 4;

/// Starts `serve --store store ARGS` (warnings only) on a free port.
#[track_caller]
fn start_serve(store: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> ServeProcess {
    let mut command = Command::new(BIN);
    command
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--log-level",
            "warn",
            "--store",
        ])
        .arg(store)
        .args(args);
    ServeProcess::start(command, WAIT)
}

/// A downstream that records every message's MSH-10 in arrival order and answers AA.
fn downstream(listener: TcpListener) -> Downstream {
    Downstream::start_on(listener, always_accept()).bounded_by(WAIT)
}

fn client(addr: SocketAddr) -> Client {
    try_client(addr).expect("connect")
}

fn try_client(addr: SocketAddr) -> Result<Client, mllp_reactor::ClientError> {
    let config = ClientConfig::default()
        .connect_timeout(WAIT)
        .response_timeout(WAIT);
    Client::connect(addr, config)
}

fn message(control_id: &str, patient: &str, filler: usize) -> Vec<u8> {
    format!(
        "MSH|^~\\&|ADT1|GHH|LAB|GHH|20260101120000||ADT^A01^ADT_A01|{control_id}|P|2.5.1\r\
         PID|1||{patient}^^^GHH^MR||EVERYMAN^ADAM\rNTE|1||{}\r",
        "x".repeat(filler)
    )
    .into_bytes()
}

/// `export`'s records: (store id, control id, lane).
#[track_caller]
fn stored(store: impl AsRef<std::ffi::OsStr>) -> Vec<(i64, String, u16)> {
    let out = Command::new(BIN).arg("export").arg(store).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            let msg = v["message"].as_str().unwrap().as_bytes().to_vec();
            (
                v["id"].as_i64().unwrap(),
                v["control_id"].as_str().unwrap().to_owned(),
                LaneKey::Pid3.lane(&msg, LANES),
            )
        })
        .collect()
}

/// Checks the downstream's log against the store: every stored message arrived; per lane,
/// the first arrivals are in store order; returns the number of repeats (arrivals after the
/// first). A repeat may come late: the copy a killed node had already written can still sit
/// in the downstream's socket buffer when the restarted node sends it again and goes on.
#[track_caller]
fn check_order(stored: &[(i64, String, u16)], received: &[String], lanes: u16) -> usize {
    let by_control: HashMap<&str, (i64, u16)> = stored
        .iter()
        .map(|(id, c, lane)| (c.as_str(), (*id, *lane % lanes)))
        .collect();
    let got: HashSet<&str> = received.iter().map(String::as_str).collect();
    for (_, control, _) in stored {
        assert!(
            got.contains(control.as_str()),
            "{control} stored but never forwarded"
        );
    }
    let mut repeats = 0;
    for lane in 0..lanes {
        let ids: Vec<i64> = received
            .iter()
            .filter_map(|c| by_control.get(c.as_str()))
            .filter(|(_, l)| *l == lane)
            .map(|(id, _)| *id)
            .collect();
        let mut seen = HashSet::new();
        let first: Vec<i64> = ids.iter().copied().filter(|id| seen.insert(*id)).collect();
        repeats += ids.len() - first.len();
        assert!(
            first.windows(2).all(|w| w[0] < w[1]),
            "lane {lane}: first arrivals out of store order: {ids:?}"
        );
    }
    repeats
}

#[test]
fn crash_test_every_acked_message_reaches_the_downstream_in_order_per_lane() {
    let dir = TempDir::new("crash");
    let store = dir.join("crash.db");
    let downstream = downstream(TcpListener::bind("127.0.0.1:0").unwrap());
    let forward = format!("ds={}", downstream.addr);
    let lanes = LANES.to_string();
    let args = [
        "--forward",
        &forward,
        "--forward-lanes",
        &lanes,
        "--forward-key",
        "pid3",
    ];
    let started = Instant::now();
    let mut acked_all: Vec<String> = Vec::new();
    let mut kills = 0usize;
    while kills < CRASH_MIN_ROUNDS || started.elapsed() < CRASH_BUDGET {
        let server = start_serve(&store, &args);
        let addr = server.addr;
        let count = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        // Set just before the kill: a sender scheduled late on a loaded machine may connect
        // only after it, and is refused; before it, a refusal is a failure.
        let killing = Arc::new(AtomicBool::new(false));
        let senders: Vec<_> = (0..SENDERS)
            .map(|c| {
                let (count, stop, killing) =
                    (Arc::clone(&count), Arc::clone(&stop), Arc::clone(&killing));
                let round = kills;
                std::thread::spawn(move || {
                    let mut client = match try_client(addr) {
                        Ok(client) => client,
                        Err(e) => {
                            assert!(killing.load(Ordering::SeqCst), "connect: {e}");
                            return Vec::new();
                        }
                    };
                    let mut acked = Vec::new();
                    for n in 0.. {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let id = format!("r{round}c{c}n{n}");
                        let patient = format!("P{c}x{}", n % 5);
                        match client.send(&message(&id, &patient, 100)) {
                            Ok(ack) => {
                                assert_eq!(ack.code, AckCode::AA, "{id}: {:?}", ack.text);
                                acked.push(id);
                                count.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(_) => break, // killed: this one may or may not be stored
                        }
                    }
                    acked
                })
            })
            .collect();
        let deadline = Instant::now() + WAIT;
        while count.load(Ordering::Relaxed) < 20 {
            assert!(Instant::now() < deadline, "no ACKs from the server");
            std::thread::sleep(Duration::from_millis(5));
        }
        let delay = RandomState::new().hash_one(kills) % 400;
        std::thread::sleep(Duration::from_millis(delay));
        killing.store(true, Ordering::SeqCst);
        server.kill();
        kills += 1;
        stop.store(true, Ordering::Relaxed);
        for sender in senders {
            acked_all.extend(sender.join().unwrap());
        }
    }
    // One last start without load: the backlog drains.
    let server = start_serve(&store, &args);
    let stored = stored(&store);
    let want: HashSet<&str> = stored.iter().map(|(_, c, _)| c.as_str()).collect();
    for id in &acked_all {
        assert!(want.contains(id.as_str()), "{id} got AA but is not stored");
    }
    let received = drained(&downstream, &want);
    let repeats = check_order(&stored, &received, LANES);
    // Per lane and kill: the message in flight and at most `max_unrecorded` delivered since
    // the lane's last cursor write.
    let per_kill = usize::from(LANES) * (mllp_store::forward::DEFAULT_MAX_UNRECORDED + 1);
    assert!(
        repeats <= kills * per_kill,
        "{repeats} repeats after {kills} kills"
    );
    server.kill();
    eprintln!(
        "forward crash test: {kills} kills, {} AA'd, {} stored, {} received, {repeats} repeats, {:.1} s",
        acked_all.len(),
        stored.len(),
        received.len(),
        started.elapsed().as_secs_f64()
    );
}

/// Waits until every id in `want` has reached `downstream`; returns its log. The backlog
/// drains at the forwarder's pace, and how large it is depends on how fast the receiving side
/// filled it during the kill loop (a faster receiver stores more in `CRASH_BUDGET`): so the
/// wait is bounded by progress (the downstream's own bound without a new arrival, the sign
/// of a lost or stuck message) and by `DRAIN_CAP` in all, not by one fixed time. Each wait asks
/// for a batch of arrivals no larger than what is still missing (each missing id needs one),
/// so the log is copied about once per 1 024 arrivals, not once per arrival.
fn drained(downstream: &Downstream, want: &HashSet<&str>) -> Vec<String> {
    let started = Instant::now();
    let mut missing: HashSet<&str> = want.clone();
    let mut seen = 0;
    loop {
        let batch = missing.len().min(1024);
        let log =
            downstream.wait_until("the next stored messages", |log| log.len() >= seen + batch);
        for id in &log[seen..] {
            missing.remove(id.as_str());
        }
        seen = log.len();
        if missing.is_empty() {
            return log;
        }
        assert!(
            started.elapsed() < DRAIN_CAP,
            "{} of {} stored messages not delivered after {DRAIN_CAP:?}",
            missing.len(),
            want.len()
        );
    }
}

/// Resident set size of `pid` in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn a_down_downstream_grows_the_backlog_on_disk_not_in_memory_and_drains_in_order() {
    let dir = TempDir::new("down");
    let store = dir.join("down.db");
    // Held bound, not listening: refused until the downstream starts there, and no other
    // test's server can be given the port meanwhile.
    let reserved = RefusingPort::new();
    let port_addr = reserved.addr;
    let forward = format!("ds={port_addr}");
    let server = start_serve(
        &store,
        &[
            "--forward",
            &forward,
            "--forward-set",
            "ds.initial-backoff=20ms",
            "--forward-set",
            "ds.max-backoff=200ms",
        ],
    );
    let addr = server.addr;
    const PER_SENDER: usize = 400;
    const FILLER: usize = 8 * 1024;
    let send_all = |from: usize, to: usize| {
        let threads: Vec<_> = (0..8)
            .map(|c| {
                std::thread::spawn(move || {
                    let mut client = client(addr);
                    for n in from..to {
                        let ack = client
                            .send(&message(&format!("c{c}n{n}"), &format!("P{c}"), FILLER))
                            .unwrap();
                        assert_eq!(ack.code, AckCode::AA);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    };
    send_all(0, PER_SENDER / 4);
    let early = rss_kib(server.pid());
    send_all(PER_SENDER / 4, PER_SENDER);
    let late = rss_kib(server.pid());
    let backlog_mib = (8 * PER_SENDER * 3 / 4 * FILLER) >> 20;
    eprintln!("RSS {early} KiB after 1/4, {late} KiB after all ({backlog_mib} MiB more backlog)");
    assert!(
        late < early + 12 * 1024,
        "RSS grew from {early} to {late} KiB while {backlog_mib} MiB of backlog queued"
    );
    // `forward status` shows the backlog and why.
    let out = Command::new(BIN)
        .args(["forward", "status"])
        .arg(&store)
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{text}");
    let line = text.lines().nth(1).unwrap();
    assert!(line.starts_with("ds "), "{text}");
    assert!(line.contains(&(8 * PER_SENDER).to_string()), "{text}");
    assert!(line.contains("refused"), "{text}");

    let downstream = downstream(reserved.listen());
    let stored = stored(&store);
    let received = downstream.wait_until("the backlog", |log| log.len() >= stored.len());
    assert_eq!(check_order(&stored, &received, 1), 0);
    assert_eq!(received.len(), stored.len());
    server.kill();
    drop(downstream);
}

#[test]
fn usage_errors_and_requeue_of_an_unknown_id() {
    let run = |args: &[&str]| -> Output { Command::new(BIN).args(args).output().unwrap() };
    let out = run(&["serve", "--no-store", "--forward", "a=127.0.0.1:1"]);
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("--forward needs the store"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");

    let dir = TempDir::new("usage");
    let store = dir.join("s.db");
    let out = run(&[
        "serve",
        "--store",
        store.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--forward",
        "a=127.0.0.1:1",
        "--forward-set",
        "b.lanes=2",
    ]);
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("no --forward b=HOST:PORT"), "{err}");

    let out = run(&[
        "serve",
        "--store",
        store.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--ack-after",
        "forwarded",
    ]);
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("--ack-after forwarded needs --forward"),
        "{err}"
    );

    // A store that was never forwarded from.
    let server = start_serve(&store, &[]);
    server.kill();
    let out = run(&["forward", "status", store.to_str().unwrap()]);
    assert!(out.status.success());
    assert!(
        String::from_utf8(out.stdout)
            .unwrap()
            .contains("never forwarded")
    );
    let out = run(&["forward", "requeue", store.to_str().unwrap(), "7"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8(out.stderr)
            .unwrap()
            .contains("none of these ids")
    );
}

/// Two `serve` nodes share one PostgreSQL store and forward to one downstream; each lane is
/// delivered by one node at a time (a session advisory lock). The node that started first
/// (and so delivers) is SIGKILLed under load: the other takes over within about a second,
/// nothing is lost, and the order per lane holds.
#[test]
fn pg_two_nodes_one_deliverer_per_lane_and_takeover_after_a_kill() {
    let Some(cluster) = pg::PgCluster::start() else {
        return;
    };
    let url = cluster.create_db("forward");
    let downstream = downstream(TcpListener::bind("127.0.0.1:0").unwrap());
    let forward = format!("ds={}", downstream.addr);
    let lanes = LANES.to_string();
    let args = ["--forward", &forward, "--forward-lanes", &lanes];
    let first = start_serve(&url, &args);
    // The first node's lanes hold the locks before the second starts.
    std::thread::sleep(Duration::from_millis(300));
    let second = start_serve(&url, &args);
    let send = |addr: SocketAddr, prefix: &'static str, n: usize| {
        std::thread::spawn(move || {
            let mut client = client(addr);
            for i in 0..n {
                let id = format!("{prefix}{i}");
                let ack = client.send(&message(&id, &format!("P{}", i % 7), 50));
                assert_eq!(ack.unwrap().code, AckCode::AA);
            }
        })
    };
    let a = send(first.addr, "a", 150);
    let b = send(second.addr, "b", 150);
    a.join().unwrap();
    b.join().unwrap();
    downstream.wait_until("some deliveries", |log| log.len() >= 100);
    // Kill the delivering node while it delivers the next messages.
    let b = send(second.addr, "c", 200);
    downstream.wait_until("the next messages", |log| {
        log.iter().any(|id| id.starts_with('c'))
    });
    let before = downstream.wait_until("", |_| true).len();
    first.kill();
    let killed = Instant::now();
    let received = downstream.wait_until("a delivery after the kill", |log| {
        log.len() > before && log.last().is_some_and(|id| id.starts_with('c'))
    });
    let takeover = killed.elapsed();
    b.join().unwrap();
    let stored = stored(&url);
    assert_eq!(stored.len(), 500);
    let want: HashSet<&str> = stored.iter().map(|(_, c, _)| c.as_str()).collect();
    let received_all = downstream.wait_until("every stored message", |log| {
        let got: HashSet<&str> = log.iter().map(String::as_str).collect();
        want.iter().all(|c| got.contains(c))
    });
    let repeats = check_order(&stored, &received_all, LANES);
    assert!(
        repeats <= usize::from(LANES),
        "{repeats} repeats after one kill"
    );
    eprintln!(
        "pg takeover: first delivery by the second node {:.2} s after the kill ({} before), {repeats} repeats",
        takeover.as_secs_f64(),
        received.len()
    );
    // `forward status` by URL.
    let out = Command::new(BIN)
        .args(["forward", "status", &url])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success() && text.contains("ds "), "{text}");
    drop(second);
}
