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
//! The WAL restart test runs a store with a 1 MiB WAL limit, so the WAL starts over many times
//! during the load, and checks that it never does so before the database file holds what the
//! WAL carried on stable storage: in the log, every database write before a restart (the WAL
//! header written again) is followed by a database sync before it; and power cuts right after
//! each restart's first WAL sync (the new header durable, so no old frame counts any more)
//! lose no AA'd message. It also checks what the checkpointer's own database sync is for
//! (moving the write-back off the commit path, not durability): every copy the checkpointer
//! thread starts (its sync of the WAL before copying) is followed by its sync of the
//! database file before its next copy. Its negative control runs the checkpointer's connection with
//! `synchronous=OFF` (a test-only switch; the checkpointer's own database sync after each
//! copy stays on, and comes too late), and must show both: restarts before the database
//! sync, and lost AAs.
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
/// Cut points checked in a WAL restart test: right after each restart, up to this many.
const RESTART_CUTS: usize = 50;
/// Set in the child: the store file to serve.
const CHILD_STORE: &str = "MLLP_POWERLOSS_CHILD_STORE";
/// Set in the child ("1") for the negative control.
const CHILD_NORMAL: &str = "MLLP_POWERLOSS_CHILD_SYNC_NORMAL";
/// Set in the child: the store's WAL limit in bytes (unset: the default).
const CHILD_WAL_LIMIT: &str = "MLLP_POWERLOSS_CHILD_WAL_LIMIT";
/// Set in the child ("1") for the WAL restart test's negative control.
const CHILD_CHECKPOINT_OFF: &str = "MLLP_POWERLOSS_CHILD_CHECKPOINT_OFF";
/// The WAL restart tests' WAL limit: 256 pages, a restart every few hundred commits.
const SMALL_WAL_LIMIT: u64 = 1 << 20;

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
    options.unsafe_checkpoint_synchronous_off_for_tests =
        std::env::var(CHILD_CHECKPOINT_OFF).is_ok_and(|v| v == "1");
    if let Ok(limit) = std::env::var(CHILD_WAL_LIMIT) {
        options.wal_limit = limit.parse().unwrap();
    }
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
    let Some(report) = power_cut("full", ChildStore::default()) else {
        return;
    };
    assert!(
        report.lost.is_empty() && report.unreadable == 0,
        "AA'd messages missing after a power cut: {report:?}"
    );
    eprintln!(
        "power-loss test: {} AA'd messages all found at {} cut points ({} log records)",
        report.aad, report.cuts, report.records
    );
}

#[test]
fn negative_control_synchronous_normal_loses_aad_messages() {
    let sync_normal = ChildStore {
        sync_normal: true,
        ..ChildStore::default()
    };
    let Some(report) = power_cut("normal", sync_normal) else {
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

/// The WAL starts over (its header written again) only once every database write before
/// it is synced, and a power cut right after a restart loses no AA'd message.
#[test]
fn wal_restarts_only_after_the_database_sync() {
    let Some(report) = wal_restarts("restart", false) else {
        return;
    };
    assert!(
        report.early.is_empty() && report.cut.lost.is_empty() && report.cut.unreadable == 0,
        "the WAL started over before the database file was synced: {report:?}"
    );
    let copies = &report.copies;
    assert!(
        copies.started > 0 && copies.left_unsynced == 0,
        "the checkpointer thread must sync the database file after each copy it makes \
         (else the writer's restart writes it all back, on the commit path): {copies:?}"
    );
    eprintln!(
        "WAL restart test: {} restarts, each after the database sync; {} AA'd messages all \
         found at {} cut points right after restarts ({} log records); {} checkpointer \
         copies, each synced by it",
        report.restarts, report.cut.aad, report.cut.cuts, report.cut.records, copies.started
    );
}

#[test]
fn negative_control_checkpoint_synchronous_off_restarts_the_wal_too_early() {
    let Some(report) = wal_restarts("restart-nosync", true) else {
        return;
    };
    assert!(
        !report.early.is_empty() && report.cut.lost_total + report.cut.unreadable > 0,
        "with the checkpointer at synchronous=OFF some restart must come before the database \
         sync and lose AA'd messages, or the test cannot tell: {report:?}"
    );
    eprintln!(
        "negative control: {} of {} restarts before the database sync; {} AA'd messages \
         missing and {} stores unreadable over {} cut points ({} AA'd, {} log records), as \
         expected",
        report.early_total,
        report.restarts,
        report.cut.lost_total,
        report.cut.unreadable,
        report.cut.cuts,
        report.cut.aad,
        report.cut.records
    );
}

/// How the child opens its store.
#[derive(Clone, Copy, Debug, Default)]
struct ChildStore {
    /// The writer at `synchronous=NORMAL` (the first negative control).
    sync_normal: bool,
    /// The WAL limit; `None`: the default (64 MiB, never reached during `LOAD`).
    wal_limit: Option<u64>,
    /// The checkpointer's connection at `synchronous=OFF` (the WAL restart test's negative
    /// control).
    checkpoint_synchronous_off: bool,
}

/// Runs the shimmed server under load, cuts the power, checks the cuts; `None` when skipped.
fn power_cut(name: &str, child: ChildStore) -> Option<Report> {
    let run = Run::start(name, child)?;
    let records = parse_log(&run.log);
    let report = run.check_cuts(&records, Run::cuts_after_aas(&records));
    assert_enough(&report);
    Some(report)
}

/// Runs the shimmed server with a small WAL limit (`synchronous_off`: the checkpointer's
/// connection at `synchronous=OFF`), finds the WAL restarts in the log and cuts the power
/// right after them.
fn wal_restarts(name: &str, synchronous_off: bool) -> Option<RestartReport> {
    let child = ChildStore {
        wal_limit: Some(SMALL_WAL_LIMIT),
        checkpoint_synchronous_off: synchronous_off,
        ..ChildStore::default()
    };
    let run = Run::start(name, child)?;
    let records = parse_log(&run.log);
    let restarts = run.restarts(&records);
    assert!(
        restarts.len() >= 3,
        "the WAL started over {} times: too few to show anything",
        restarts.len()
    );
    let early: Vec<(usize, usize)> = restarts
        .iter()
        .filter(|restart| restart.unsynced_database_writes > 0)
        .map(|restart| (restart.at, restart.unsynced_database_writes))
        .collect();
    let cuts = sample(restarts.iter().filter_map(|restart| restart.cut).collect());
    let cut = run.check_cuts(&records, cuts);
    assert_enough(&cut);
    Some(RestartReport {
        copies: run.checkpointer_copies(&records),
        restarts: restarts.len(),
        early_total: early.len(),
        early: early.into_iter().take(20).collect(),
        cut,
    })
}

fn assert_enough(report: &Report) {
    assert!(
        report.aad >= 100,
        "too few AAs to show anything: {report:?}"
    );
}

/// At most `RESTART_CUTS` of `cuts`, spread evenly.
fn sample(cuts: Vec<usize>) -> Vec<usize> {
    let step = cuts.len().div_ceil(RESTART_CUTS).max(1);
    cuts.into_iter().step_by(step).collect()
}

/// What the WAL restart test found.
#[derive(Debug)]
struct RestartReport {
    /// Times the WAL started over.
    restarts: usize,
    /// (log index, database writes not yet synced) of restarts before the database sync
    /// (the first 20).
    early: Vec<(usize, usize)>,
    /// Restarts before the database sync.
    early_total: usize,
    /// The power cuts right after restarts.
    cut: Report,
    /// The checkpointer thread's copies.
    copies: Copies,
}

/// The checkpointer thread's copies and its syncs of the database file after them.
#[derive(Debug, Default)]
struct Copies {
    /// Copies it started (each `PASSIVE` with frames to copy syncs the WAL first).
    started: usize,
    /// Copies not followed by its sync of the database file before its next copy (the
    /// (log index of the copy's start) of the first 20).
    unsynced: Vec<usize>,
    /// All such copies.
    left_unsynced: usize,
}

/// One WAL restart in the log.
struct Restart {
    /// Index of the record that wrote the WAL header again.
    at: usize,
    /// Database writes (and truncations) before it not followed by a database sync before it.
    unsynced_database_writes: usize,
    /// Right after the WAL's first sync after it (the new header durable): `None` if the log
    /// ends before.
    cut: Option<usize>,
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
    /// Cuts after which SQLite could not read the rebuilt store (corrupt).
    unreadable: usize,
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
    fn start(name: &str, child_store: ChildStore) -> Option<Self> {
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

        let flag = |on: bool| if on { "1" } else { "0" };
        let mut command = Command::new(std::env::current_exe().unwrap());
        if let Some(limit) = child_store.wal_limit {
            command.env(CHILD_WAL_LIMIT, limit.to_string());
        }
        let mut child = ChildServer(
            command
                .args(["--exact", "powerloss_child_server", "--nocapture"])
                .env(CHILD_STORE, &store)
                .env(CHILD_NORMAL, flag(child_store.sync_normal))
                .env(
                    CHILD_CHECKPOINT_OFF,
                    flag(child_store.checkpoint_synchronous_off),
                )
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

    /// `CUTS` cut points right after random AA replies, and the end of the log.
    fn cuts_after_aas(records: &[Record<'_>]) -> Vec<usize> {
        // Candidate cuts: right after each reply that carries an AA, the worst moment for it.
        let after_aa: Vec<usize> = records
            .iter()
            .enumerate()
            .filter(|(_, r)| r.kind == b'S' && !aa_ids(r.data).is_empty())
            .map(|(i, _)| i + 1)
            .collect();
        let random = RandomState::new();
        (0..CUTS.min(after_aa.len()))
            .map(|n| after_aa[(random.hash_one(n) % after_aa.len() as u64) as usize])
            .collect()
    }

    /// The file numbers of the store's database file and its WAL in the log.
    fn store_files(&self, records: &[Record<'_>]) -> (Option<u32>, Option<u32>) {
        let main = self.store.to_str().unwrap();
        let wal = format!("{main}-wal");
        let file = |path: &str| {
            records
                .iter()
                .find(|r| r.kind == b'N' && r.data == path.as_bytes())
                .map(|r| r.file)
        };
        (file(main), file(&wal))
    }

    /// Every time the WAL started over: its header (32 bytes at offset 0) written again after
    /// the first time.
    fn restarts(&self, records: &[Record<'_>]) -> Vec<Restart> {
        let (Some(db), Some(wal)) = self.store_files(records) else {
            return Vec::new();
        };
        let mut restarts = Vec::new();
        let mut unsynced = 0;
        let mut headers = 0;
        for (i, r) in records.iter().enumerate() {
            match r.kind {
                b'W' | b'T' if r.file == db => unsynced += 1,
                b'F' if r.file == db => unsynced = 0,
                b'W' if r.file == wal && r.offset == 0 => {
                    headers += 1;
                    if headers > 1 {
                        let cut = records[i..]
                            .iter()
                            .position(|r| r.kind == b'F' && r.file == wal)
                            .map(|after| i + after + 1);
                        restarts.push(Restart {
                            at: i,
                            unsynced_database_writes: unsynced,
                            cut,
                        });
                    }
                }
                _ => {}
            }
        }
        restarts
    }

    /// The checkpointer thread's copies: a `PASSIVE` that has frames to copy syncs the WAL
    /// before it copies them (its connection is at `synchronous=FULL`), and the checkpointer
    /// syncs the database file after it; a copy whose database sync has not come before the
    /// checkpointer's next copy was left for someone else to write back. The last copy of the
    /// log (the child may have been killed in it) is not counted.
    fn checkpointer_copies(&self, records: &[Record<'_>]) -> Copies {
        let mut copies = Copies::default();
        let (Some(db), Some(wal)) = self.store_files(records) else {
            return copies;
        };
        // Thread names are cut to 15 bytes (prctl PR_GET_NAME).
        let checkpointer = &b"mllp-store-checkpoint"[..15];
        let mut copying: Option<usize> = None;
        for (i, r) in records.iter().enumerate() {
            if r.kind != b'F' || r.data != checkpointer {
                continue;
            }
            if r.file == wal {
                if let Some(start) = copying {
                    copies.left_unsynced += 1;
                    if copies.unsynced.len() < 20 {
                        copies.unsynced.push(start);
                    }
                }
                copies.started += 1;
                copying = Some(i);
            } else if r.file == db {
                copying = None;
            }
        }
        copies
    }

    /// Cuts the power at each of `cuts` (log indexes) and at the end of the log, and checks
    /// that every AA'd message is still there.
    fn check_cuts(&self, records: &[Record<'_>], mut cuts: Vec<usize>) -> Report {
        cuts.push(records.len());
        cuts.sort_unstable();
        cuts.dedup();

        let mut lost = Vec::new();
        let mut lost_total = 0;
        let mut aad_total = 0;
        let mut unreadable = 0;
        for (n, &cut) in cuts.iter().enumerate() {
            let aad: HashSet<String> = records[..cut]
                .iter()
                .filter(|r| r.kind == b'S')
                .flat_map(|r| aa_ids(r.data))
                .collect();
            aad_total = aad.len();
            let Ok(stored) = self.rebuild_and_read(&records[..cut], n) else {
                unreadable += 1;
                continue;
            };
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
            unreadable,
        }
    }

    /// Rebuilds the store files as of their last sync within `records`, opens the copy with
    /// SQLite (which recovers the WAL) and returns its control ids (an error: SQLite could
    /// not read them, the rebuilt store is corrupt).
    fn rebuild_and_read(
        &self,
        records: &[Record<'_>],
        n: usize,
    ) -> rusqlite::Result<HashSet<String>> {
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
        let ids = rusqlite::Connection::open(out.join(&main)).and_then(|conn| {
            conn.prepare("SELECT control_id FROM messages")?
                .query_map([], |row| row.get::<_, String>(0))?
                .collect::<Result<HashSet<_>, _>>()
        });
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
