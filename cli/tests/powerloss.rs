//! Power-loss ordering (issue 21): no AA leaves before its message is on stable storage.
//!
//! A simulated power cut. The server (this test binary, re-run as a child that serves what
//! `serve --store` serves: `StoreThenAck` over an SQLite store) runs under an
//! `LD_PRELOAD` shim (`powerloss/shim.c`, compiled here with `cc`) that logs, in order, every
//! write to the store's files, every fsync/fdatasync that returned, and every reply sent on a
//! socket (logged before it is sent). Clients send messages until the child is SIGKILLed.
//! Then, for cut points after each of a random sample of AA replies (and at the end), each
//! store file is rebuilt as it would be after a power loss at that point in the worst case:
//! the file as it was before the run plus only the writes that a later sync (before the cut)
//! made durable. SQLite opens the rebuilt store (recovering the WAL), and every control id
//! AA'd before the cut must be in it.
//!
//! The negative control runs the same against a store opened with `synchronous=NORMAL`
//! (a test-only switch): the WAL is then not synced at each commit, and the test must report
//! lost AAs; if it did not, the test could not tell a safe store from an unsafe one.
//!
//! Needs `cc` (build-essential); under `CI=true` a missing compiler fails the test.

use std::collections::HashSet;
use std::hash::{BuildHasher, RandomState};
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use mllp_reactor::ack::AckCode;
use mllp_reactor::{Client, ClientConfig, Server};
use mllp_store::{SqliteBackend, SqliteOptions, Store, StoreConfig, StoreThenAck};
use mllp_test_support::TempDir;
use mllp_test_support::hl7::adt_a01 as message;

/// Bound on every wait for the child (start-up, replies).
const WAIT: Duration = Duration::from_secs(30);
/// How long the clients send before the power is cut.
const LOAD: Duration = Duration::from_millis(1_500);
const CONNECTIONS: usize = 8;
/// Cut points checked per run, besides the end of the log.
const CUTS: usize = 40;
/// Set in the child: the store file to serve.
const CHILD_STORE: &str = "MLLP_POWERLOSS_CHILD_STORE";
/// Set in the child ("1") for the negative control.
const CHILD_NORMAL: &str = "MLLP_POWERLOSS_CHILD_SYNC_NORMAL";

/// Not a test on its own: the server the other tests run under the shim (does nothing unless
/// they set `MLLP_POWERLOSS_CHILD_STORE`).
#[test]
fn powerloss_child_server() {
    let Some(store) = std::env::var_os(CHILD_STORE) else {
        return;
    };
    let mut options = SqliteOptions::default();
    options.unsafe_synchronous_normal_for_tests =
        std::env::var(CHILD_NORMAL).is_ok_and(|v| v == "1");
    let store = Arc::new(Store::open_sqlite(store, &options, StoreConfig::default()).unwrap());
    let server = Server::builder(StoreThenAck::new(Arc::clone(&store)))
        .bind("127.0.0.1:0")
        .unwrap();
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on {}", server.local_addr()).unwrap();
        out.flush().unwrap();
    }
    // Serves until the parent SIGKILLs it.
    server.run().unwrap();
}

#[test]
fn power_cut_at_any_point_loses_no_aad_message() {
    let Some(report) = power_cut("full", false) else {
        return;
    };
    assert!(
        report.lost.is_empty(),
        "AA'd messages missing after a power cut: {report:?}"
    );
    eprintln!(
        "power-loss test: {} AA'd messages all found at {} cut points ({} log records)",
        report.aad, report.cuts, report.records
    );
}

#[test]
fn negative_control_synchronous_normal_loses_aad_messages() {
    let Some(report) = power_cut("normal", true) else {
        return;
    };
    assert!(
        !report.lost.is_empty(),
        "with synchronous=NORMAL some AA'd message must be lost at some cut, or the test \
         cannot tell: {report:?}"
    );
    eprintln!(
        "negative control: {} AA'd messages missing over {} cut points ({} AA'd, {} log \
         records), as expected",
        report.lost_total, report.cuts, report.aad, report.records
    );
}

/// Runs the shimmed server under load, cuts the power, checks the cuts; `None` when skipped.
fn power_cut(name: &str, normal: bool) -> Option<Report> {
    let report = Run::start(name, normal)?.cut_and_check();
    assert!(
        report.aad >= 100,
        "too few AAs to show anything: {report:?}"
    );
    Some(report)
}

/// What the cuts found.
#[derive(Debug)]
struct Report {
    /// Distinct control ids AA'd by the end of the log.
    aad: usize,
    /// Cut points checked.
    cuts: usize,
    /// Log records.
    records: usize,
    /// (cut index, control id) of AA'd messages missing after a cut (the first 20).
    lost: Vec<(usize, String)>,
    /// AA'd messages missing, summed over the cuts.
    lost_total: usize,
}

struct Run {
    dir: TempDir,
    store: PathBuf,
    /// The store file before the server started (its WAL was checkpointed and removed).
    snapshot: Vec<u8>,
    log: Vec<u8>,
}

impl Run {
    /// Builds the shim, creates the store, runs the shimmed server under load, cuts the
    /// power (SIGKILL). `None` when `cc` is missing outside CI.
    fn start(name: &str, normal: bool) -> Option<Self> {
        let dir = TempDir::new(name);
        let shim = build_shim(&dir)?;
        let data = dir.join("data");
        std::fs::create_dir_all(&data).unwrap();
        let store = data.join("store.db");
        drop(SqliteBackend::open(&store, &SqliteOptions::default()).unwrap());
        assert!(
            !data.join("store.db-wal").exists(),
            "a WAL outlived the close"
        );
        let snapshot = std::fs::read(&store).unwrap();
        let log_path = dir.join("log.bin");

        let mut child = ChildServer(
            Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "powerloss_child_server", "--nocapture"])
                .env(CHILD_STORE, &store)
                .env(CHILD_NORMAL, if normal { "1" } else { "0" })
                .env("LD_PRELOAD", &shim)
                .env("POWERLOSS_DIR", format!("{}/", data.display()))
                .env("POWERLOSS_LOG", &log_path)
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("spawn the child server"),
        );
        let addr = child.addr();
        load(addr);
        child.0.kill().unwrap();
        child.0.wait().unwrap();
        let log = std::fs::read(&log_path).unwrap();
        Some(Self {
            dir,
            store,
            snapshot,
            log,
        })
    }

    fn cut_and_check(&self) -> Report {
        let records = parse_log(&self.log);
        // Candidate cuts: right after each reply that carries an AA, the worst moment for it.
        let after_aa: Vec<usize> = records
            .iter()
            .enumerate()
            .filter(|(_, r)| r.kind == b'S' && !aa_ids(r.data).is_empty())
            .map(|(i, _)| i + 1)
            .collect();
        let random = RandomState::new();
        let mut cuts: Vec<usize> = (0..CUTS.min(after_aa.len()))
            .map(|n| after_aa[(random.hash_one(n) % after_aa.len() as u64) as usize])
            .collect();
        cuts.push(records.len());
        cuts.sort_unstable();
        cuts.dedup();

        let mut lost = Vec::new();
        let mut lost_total = 0;
        let mut aad_total = 0;
        for (n, &cut) in cuts.iter().enumerate() {
            let aad: HashSet<String> = records[..cut]
                .iter()
                .filter(|r| r.kind == b'S')
                .flat_map(|r| aa_ids(r.data))
                .collect();
            aad_total = aad.len();
            let stored = self.rebuild_and_read(&records[..cut], n);
            for id in aad.difference(&stored) {
                lost_total += 1;
                if lost.len() < 20 {
                    lost.push((n, id.clone()));
                }
            }
        }
        Report {
            aad: aad_total,
            cuts: cuts.len(),
            records: records.len(),
            lost,
            lost_total,
        }
    }

    /// Rebuilds the store files as of their last sync within `records`, opens the copy with
    /// SQLite (which recovers the WAL) and returns its control ids.
    fn rebuild_and_read(&self, records: &[Record<'_>], n: usize) -> HashSet<String> {
        let out = self.dir.join(format!("cut-{n}"));
        std::fs::create_dir_all(&out).unwrap();
        let mut names: Vec<(u32, String)> = Vec::new();
        for r in records.iter().filter(|r| r.kind == b'N') {
            let path = std::str::from_utf8(r.data).unwrap();
            let base = Path::new(path).file_name().unwrap().to_str().unwrap();
            names.push((r.file, base.to_owned()));
        }
        let main = self.store.file_name().unwrap().to_str().unwrap().to_owned();
        for (file, base) in &names {
            // The shared-memory index is rebuilt from the WAL on open; it is never synced.
            if base.ends_with("-shm") {
                continue;
            }
            let Some(last_sync) = records
                .iter()
                .rposition(|r| r.kind == b'F' && r.file == *file)
            else {
                continue;
            };
            let mut bytes = if *base == main {
                self.snapshot.clone()
            } else {
                Vec::new()
            };
            for r in records[..last_sync].iter().filter(|r| r.file == *file) {
                match r.kind {
                    b'W' => {
                        let at = r.offset as usize;
                        let end = at + r.data.len();
                        if bytes.len() < end {
                            bytes.resize(end, 0);
                        }
                        bytes[at..end].copy_from_slice(r.data);
                    }
                    b'T' => bytes.resize(r.offset as usize, 0),
                    _ => {}
                }
            }
            std::fs::write(out.join(base), bytes).unwrap();
        }
        if !out.join(&main).exists() {
            std::fs::write(out.join(&main), &self.snapshot).unwrap();
        }
        let conn = rusqlite::Connection::open(out.join(&main)).unwrap();
        let ids = conn
            .prepare("SELECT control_id FROM messages")
            .unwrap()
            .query_map([], |row| row.get::<_, String>(0))
            .unwrap()
            .collect::<Result<HashSet<_>, _>>()
            .unwrap();
        drop(conn);
        let _ = std::fs::remove_dir_all(&out);
        ids
    }
}

/// One log record (see `powerloss/shim.c`).
struct Record<'a> {
    kind: u8,
    file: u32,
    offset: u64,
    data: &'a [u8],
}

fn parse_log(log: &[u8]) -> Vec<Record<'_>> {
    let mut records = Vec::new();
    let mut at = 0;
    // A record cut short by the SIGKILL is dropped, as the power cut would have.
    while at + 17 <= log.len() {
        let kind = log[at];
        let file = u32::from_le_bytes(log[at + 1..at + 5].try_into().unwrap());
        let offset = u64::from_le_bytes(log[at + 5..at + 13].try_into().unwrap());
        let len = u32::from_le_bytes(log[at + 13..at + 17].try_into().unwrap()) as usize;
        if at + 17 + len > log.len() {
            break;
        }
        assert!(
            b"NWFTS".contains(&kind),
            "bad log record kind {kind} at {at}"
        );
        records.push(Record {
            kind,
            file,
            offset,
            data: &log[at + 17..at + 17 + len],
        });
        at += 17 + len;
    }
    records
}

/// The MSA-2 of every AA in `bytes` (framed ACKs, possibly several).
fn aa_ids(bytes: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(bytes);
    text.split("MSA|AA|")
        .skip(1)
        .filter_map(|rest| rest.split(['\r', '|']).next())
        .map(str::to_owned)
        .collect()
}

/// Sends from `CONNECTIONS` clients for `LOAD`; every reply must be an AA.
fn load(addr: SocketAddr) {
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..CONNECTIONS)
        .map(|c| {
            let stop = Arc::clone(&stop);
            let acked = Arc::clone(&acked);
            std::thread::spawn(move || {
                let config = ClientConfig::default()
                    .connect_timeout(WAIT)
                    .response_timeout(WAIT);
                let mut client = Client::connect(addr, config).expect("connect");
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let ack = client.send(&message(&format!("c{c}-{n}"))).expect("send");
                    assert_eq!(ack.code, AckCode::AA, "{ack:?}");
                    acked.fetch_add(1, Ordering::Relaxed);
                    n += 1;
                }
            })
        })
        .collect();
    let started = Instant::now();
    while started.elapsed() < LOAD {
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    assert!(acked.load(Ordering::Relaxed) > 0, "no AA at all");
}

/// Compiles the shim into `dir`. `None` (the test is skipped) when `cc` is missing, unless
/// `CI=true`, where that fails the test.
fn build_shim(dir: &TempDir) -> Option<PathBuf> {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/powerloss/shim.c");
    let out = dir.join("shim.so");
    let status = Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-Wall", "-Werror", "-o"])
        .arg(&out)
        .arg(&source)
        .args(["-ldl", "-lpthread"])
        .status();
    match status {
        Ok(status) => {
            assert!(status.success(), "cc failed to build {}", source.display());
            Some(out)
        }
        Err(e) => {
            mllp_test_support::unavailable(
                "cc (apt-get install build-essential)",
                &format!("the power-loss test needs it: {e}"),
            );
            None
        }
    }
}

/// The shimmed child; SIGKILLed on drop.
struct ChildServer(Child);

impl ChildServer {
    /// Waits for its `listening on ADDR` line (the test harness prints its own lines first).
    fn addr(&mut self) -> SocketAddr {
        let stdout = self.0.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.strip_prefix("listening on ") {
                    let _ = tx.send(addr.parse::<SocketAddr>().unwrap());
                }
            }
        });
        rx.recv_timeout(WAIT)
            .expect("the child server did not start")
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
