//! The store's admin commands against a store that `serve` filled: `prune`, `search`,
//! `resend`, `check`, the health endpoints. `prune`, `search` and `resend` run the same
//! checks against PostgreSQL (`store_admin_pg`).

use crate::util::{Serve, message, run, scratch, text};

/// Runs `serve --store PATH`, sends `ids` through `send`, and stops it.
pub(crate) fn fill(store: &str, ids: &[&str]) {
    let serve = Serve::start(
        &[
            "--store",
            store,
            "--listen",
            "127.0.0.1:0",
            "--retain",
            "1h",
        ],
        &[],
    );
    let input: String = ids.iter().map(|id| message(id)).collect();
    let out = run(&["send", &serve.addr.to_string(), "-"], input.as_bytes());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let (stopped, _) = serve.stop();
    assert!(stopped.status.success(), "{}", text(&stopped.stderr));
}

#[test]
fn prune_dry_run_counts_and_prune_removes() {
    let dir = scratch("prune");
    let store = dir.join("s.db");
    let _ = std::fs::remove_file(&store);
    prune_cycle(store.to_str().unwrap());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Fills `store` with three messages; `prune` keeps them at 1d, counts them in a dry run at
/// 0s, then removes them.
pub(crate) fn prune_cycle(store: &str) {
    fill(store, &["a1", "a2", "a3"]);

    let kept = run(&["prune", store, "--older-than", "1d"], b"");
    assert!(kept.status.success(), "{}", text(&kept.stderr));
    assert!(
        text(&kept.stdout).starts_with("removed 0 messages"),
        "{}",
        text(&kept.stdout)
    );

    let dry = run(&["prune", store, "--older-than", "0s", "--dry-run"], b"");
    assert!(
        text(&dry.stdout).starts_with("would remove 3 messages"),
        "{}",
        text(&dry.stdout)
    );
    let all = run(&["export", store], b"");
    assert_eq!(text(&all.stdout).lines().count(), 3);

    let done = run(&["prune", store, "--older-than", "0s"], b"");
    assert!(
        text(&done.stdout).starts_with("removed 3 messages"),
        "{}",
        text(&done.stdout)
    );
    let none = run(&["export", store], b"");
    assert_eq!(text(&none.stdout), "");

    let bad = run(&["prune", store, "--older-than", "soon"], b"");
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad.stderr));
}

/// A `serve --store … --health 127.0.0.1:0` child with its stderr captured; killed on drop.
pub(crate) struct HealthServe {
    child: std::process::Child,
    pub(crate) addr: std::net::SocketAddr,
    pub(crate) health: std::net::SocketAddr,
    /// With `--metrics ADDR` among the arguments.
    pub(crate) metrics: Option<std::net::SocketAddr>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl HealthServe {
    #[track_caller]
    pub(crate) fn start(store: &str, args: &[&str]) -> Self {
        use std::io::{BufRead, BufReader, Read};
        let mut child = crate::util::bin()
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--health",
                "127.0.0.1:0",
            ])
            .args(["--store", store])
            .args(args)
            .env_remove("RUST_LOG")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("the binary starts");
        let mut err = child.stderr.take().expect("piped");
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = err.read_to_string(&mut text);
            text
        });
        let (tx, lines) = std::sync::mpsc::channel();
        let out = child.stdout.take().expect("piped");
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut addr = None;
        let mut health = None;
        let mut metrics = None;
        // The health line comes last.
        while addr.is_none() || health.is_none() {
            let line = lines
                .recv_timeout(crate::util::WAIT)
                .expect("serve printed its addresses");
            if let Some(a) = line.strip_prefix("listening on ") {
                addr = Some(a.parse().expect("an address"));
            }
            if let Some(m) = line.strip_prefix("metrics on http://") {
                metrics = Some(m.split('/').next().unwrap().parse().expect("an address"));
            }
            if let Some(h) = line.strip_prefix("health on http://") {
                health = Some(h.split('/').next().unwrap().parse().expect("an address"));
            }
        }
        Self {
            child,
            addr: addr.unwrap(),
            health: health.unwrap(),
            metrics,
            stderr: Some(stderr),
        }
    }

    /// `GET path`: status code and body.
    #[track_caller]
    pub(crate) fn get(&self, path: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(self.health).expect("health port accepts");
        s.set_read_timeout(Some(crate::util::WAIT)).unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .unwrap();
        let mut response = String::new();
        s.read_to_string(&mut response).unwrap();
        let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
        let code = head.split(' ').nth(1).unwrap().parse().unwrap();
        (code, body.to_owned())
    }

    /// Polls `path` until its status is `code` (bounded by WAIT); returns the body.
    #[track_caller]
    pub(crate) fn await_status(&self, path: &str, code: u16) -> String {
        let deadline = std::time::Instant::now() + crate::util::WAIT;
        loop {
            let (got, body) = self.get(path);
            if got == code {
                return body;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{path} stayed {got}: {body}"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the server; returns its stderr.
    pub(crate) fn kill(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.stderr.take().unwrap().join().unwrap()
    }
}

impl Drop for HealthServe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn client(addr: std::net::SocketAddr) -> mllp_reactor::Client {
    let config = mllp_reactor::ClientConfig::default()
        .connect_timeout(crate::util::WAIT)
        .response_timeout(crate::util::WAIT);
    mllp_reactor::Client::connect(addr, config).expect("connect")
}

pub(crate) fn hl7(id: &str) -> Vec<u8> {
    message(id).replace('\n', "\r").into_bytes()
}

fn prlimit_fsize(pid: u32, soft: &str) -> bool {
    std::process::Command::new("prlimit")
        .args([
            "--pid",
            &pid.to_string(),
            &format!("--fsize={soft}:unlimited"),
        ])
        .status()
        .is_ok_and(|s| s.success())
}

/// `/healthz` is 200 while the server runs; `/readyz` turns 503 ("store") while commits fail
/// (the file may not grow: RLIMIT_FSIZE via prlimit) and back to 200 after a good commit.
#[test]
fn readyz_follows_the_store() {
    use mllp_reactor::ack::AckCode;
    let dir = scratch("readyz-store");
    let store = dir.join("s.db");
    let _ = std::fs::remove_file(&store);
    let serve = HealthServe::start(store.to_str().unwrap(), &["--min-free-disk", "0"]);
    assert_eq!(
        serve.get("/healthz"),
        (200, r#"{"status":"alive"}"#.to_owned())
    );
    assert_eq!(
        serve.get("/readyz"),
        (200, r#"{"status":"ready"}"#.to_owned())
    );
    assert_eq!(serve.get("/nope").0, 404);
    let mut c = client(serve.addr);
    assert_eq!(c.send(&hl7("ok1")).unwrap().code, AckCode::AA);
    if !prlimit_fsize(serve.pid(), "1") {
        mllp_test_support::unavailable("prlimit (util-linux)", "prlimit --fsize failed");
        return;
    }
    assert_eq!(c.send(&hl7("lost1")).unwrap().code, AckCode::AE);
    let body = serve.await_status("/readyz", 503);
    assert!(body.contains(r#""reason":"store""#), "{body}");
    // Alive all the same: the writer thread runs, it only cannot commit.
    assert_eq!(serve.get("/healthz").0, 200);
    assert!(prlimit_fsize(serve.pid(), "unlimited"));
    assert_eq!(c.send(&hl7("ok2")).unwrap().code, AckCode::AA);
    serve.await_status("/readyz", 200);
    drop(c);
    serve.kill();
    let _ = std::fs::remove_dir_all(&dir);
}

/// `/readyz` answers 503 "draining" from the first SIGTERM on, while the drain waits for a
/// message still with the store (its commit waits on a lock the test holds, within the busy
/// timeout); `/healthz` stays 200 meanwhile: draining is not dying.
#[test]
fn readyz_is_503_while_draining_and_healthz_stays_200() {
    let dir = scratch("readyz-drain");
    let store = dir.join("s.db");
    let _ = std::fs::remove_file(&store);
    let serve = HealthServe::start(
        store.to_str().unwrap(),
        &[
            "--min-free-disk",
            "0",
            "--grace",
            "60s",
            "--metrics",
            "127.0.0.1:0",
        ],
    );
    assert_eq!(serve.get("/readyz").0, 200);
    // The store's write lock, held by the test: the message's commit waits for it.
    let (holder, peer) = crate::util::send_while_the_store_is_locked(
        serve.addr,
        serve.metrics.expect("--metrics given"),
        &store,
        "D1",
    );
    let status = std::process::Command::new("kill")
        .args(["-TERM", &serve.pid().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
    let body = serve.await_status("/readyz", 503);
    assert!(body.contains(r#""reason":"draining""#), "{body}");
    assert_eq!(
        serve.get("/healthz"),
        (200, r#"{"status":"alive"}"#.to_owned())
    );
    drop((peer, holder));
    serve.kill();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A small file system of our own (tmpfs, 16 MiB): below `--min-free-disk` new messages get
/// AE with a clear text and `/readyz` says "disk"; one warning per change; nothing stored is
/// lost or damaged; freeing space resumes service by itself.
#[test]
fn low_disk_refuses_with_ae_and_recovers() {
    use mllp_reactor::ack::AckCode;
    let Some(fs) = mllp_test_support::tmpfs::Tmpfs::mount("low-disk", "16m") else {
        return;
    };
    let mnt = fs.path().to_owned();
    let store = mnt.join("s.db");
    let serve = HealthServe::start(store.to_str().unwrap(), &["--min-free-disk", "6MiB"]);
    let mut c = client(serve.addr);
    for i in 0..20 {
        assert_eq!(
            c.send(&hl7(&format!("before{i}"))).unwrap().code,
            AckCode::AA
        );
    }
    // Take the free space below 6 MiB.
    let filler = mnt.join("filler");
    std::fs::write(&filler, vec![0u8; 12 << 20]).unwrap();
    let body = serve.await_status("/readyz", 503);
    assert!(body.contains(r#""reason":"disk""#), "{body}");
    for i in 0..5 {
        let ack = c.send(&hl7(&format!("refused{i}"))).unwrap();
        assert_eq!(ack.code, AckCode::AE);
        let text = ack.text.unwrap_or_default();
        assert!(
            text.contains("free disk space is below the minimum"),
            "{text}"
        );
    }
    std::fs::remove_file(&filler).unwrap();
    serve.await_status("/readyz", 200);
    assert_eq!(c.send(&hl7("after")).unwrap().code, AckCode::AA);
    drop(c);
    let stderr = serve.kill();
    assert_eq!(
        stderr
            .matches("free disk space below --min-free-disk")
            .count(),
        1,
        "{stderr}"
    );
    assert_eq!(
        stderr.matches("free disk space back above").count(),
        1,
        "{stderr}"
    );
    let out = run(&["export", store.to_str().unwrap()], b"");
    let ids: Vec<String> = text(&out.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["control_id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    let mut want: Vec<String> = (0..20).map(|i| format!("before{i}")).collect();
    want.push("after".to_owned());
    assert_eq!(ids, want);
}

#[test]
fn search_finds_by_control_id_in_every_format() {
    let dir = scratch("search");
    let store = dir.join("s.db");
    let _ = std::fs::remove_file(&store);
    search_cycle(store.to_str().unwrap());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Fills `store` with three messages and finds them by control id, sender, patient and type,
/// in each output format.
pub(crate) fn search_cycle(store: &str) {
    fill(store, &["s1", "s2", "s3"]);
    let jsonl = run(
        &["search", store, "--control-id", "s2", "--format", "jsonl"],
        b"",
    );
    assert!(jsonl.status.success(), "{}", text(&jsonl.stderr));
    let lines: Vec<serde_json::Value> = text(&jsonl.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["control_id"], "s2");
    let table = text(&run(&["search", store, "--sender", "LAB^H", "--limit", "2"], b"").stdout);
    let rows: Vec<&str> = table.lines().collect();
    assert_eq!(rows.len(), 3, "{table}");
    assert!(rows[0].contains("CONTROL ID") && rows[1].contains("s3") && rows[2].contains("s2"));
    let hl7 = text(
        &run(
            &[
                "search",
                store,
                "--patient",
                "123",
                "--type",
                "ADT^A01",
                "--format",
                "hl7",
            ],
            b"",
        )
        .stdout,
    );
    assert_eq!(hl7.matches("MSH|").count(), 3, "{hl7}");
    let bad = run(&["search", store, "--status", "lost"], b"");
    assert_eq!(bad.status.code(), Some(2));
}

/// Garbage over the second half of a store's pages (header intact).
fn damage(store: &std::path::Path) {
    use std::io::{Seek, SeekFrom, Write};
    let len = std::fs::metadata(store).unwrap().len();
    let start = (len / 2) / 4096 * 4096;
    let mut f = std::fs::OpenOptions::new().write(true).open(store).unwrap();
    f.seek(SeekFrom::Start(start)).unwrap();
    f.write_all(&vec![0x5a; (len - start) as usize]).unwrap();
}

#[test]
fn a_damaged_store_is_found_by_check_and_refused_by_serve() {
    let dir = scratch("integrity");
    let store = dir.join("s.db");
    let _ = std::fs::remove_file(&store);
    let path = store.to_str().unwrap();
    let ids: Vec<String> = (0..300).map(|i| format!("m{i}")).collect();
    fill(path, &ids.iter().map(String::as_str).collect::<Vec<_>>());
    let ok = run(&["check", path], b"");
    assert!(ok.status.success(), "{}", text(&ok.stderr));
    assert_eq!(text(&ok.stdout), "ok\n");
    // The search index file that `serve`'s follower wrote is checked too.
    assert!(
        text(&ok.stderr).contains("search index") && text(&ok.stderr).contains(": ok"),
        "{}",
        text(&ok.stderr)
    );

    // A copy exports without leaving -wal/-shm files beside it.
    let copy = dir.join("copy.db");
    std::fs::copy(&store, &copy).unwrap();
    let out = run(&["export", copy.to_str().unwrap()], b"");
    assert_eq!(text(&out.stdout).lines().count(), 300);
    assert!(!dir.join("copy.db-wal").exists() && !dir.join("copy.db-shm").exists());

    damage(&store);
    // Export goes on past the damage: what it can read on stdout, each range it skipped on
    // stderr, and a failure at the end.
    let partial = run(&["export", path], b"");
    assert_eq!(partial.status.code(), Some(1), "{}", text(&partial.stderr));
    let err = text(&partial.stderr);
    assert!(err.contains("could not be read"), "{err}");
    assert!(err.contains("the store is damaged"), "{err}");
    let exported = text(&partial.stdout).lines().count();
    assert!(exported < 300, "{exported} exported from a damaged store");
    let bad = run(&["check", path], b"");
    assert_eq!(bad.status.code(), Some(1), "{}", text(&bad.stdout));
    assert!(!text(&bad.stdout).is_empty());
    let refused = run(&["serve", "--listen", "127.0.0.1:0", "--store", path], b"");
    assert_eq!(refused.status.code(), Some(1));
    let err = text(&refused.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("is damaged") && err.contains("mllp-reactor check"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `resend` sends what it finds to a receiver, checks every ACK (an AE fails the command),
/// and `--dry-run` sends nothing.
#[test]
fn resend_checks_every_ack() {
    let dir = scratch("resend");
    let store = dir.join("s.db");
    let _ = std::fs::remove_file(&store);
    resend_cycle(store.to_str().unwrap());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Fills `store` with r1..r3 and resends them to a receiver that answers r2 with AE: the
/// dry run sends nothing, each resend's ACK decides the exit code. Four resends are recorded
/// (1 and 3 with the reason "EHR lost them", then 2 with its AE).
pub(crate) fn resend_cycle(path: &str) {
    use mllp_reactor::ack::{self, AckCode};
    use mllp_reactor::{Reply, handler_fn};
    fill(path, &["r1", "r2", "r3"]);
    let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = std::sync::Arc::clone(&received);
    let receiver = crate::util::server(handler_fn(move |msg, _| {
        let text = String::from_utf8_lossy(msg).into_owned();
        seen.lock().unwrap().push(text.clone());
        Ok(Reply::Send(if text.contains("|r2|") {
            ack::nak(msg, AckCode::AE, "not today")
        } else {
            ack::accept(msg)
        }))
    }));
    let to = receiver.local_addr().to_string();

    let dry = run(&["resend", path, "1", "3", "--to", &to, "--dry-run"], b"");
    assert!(dry.status.success(), "{}", text(&dry.stderr));
    assert_eq!(text(&dry.stdout), "would resend 1 r1\nwould resend 3 r3\n");
    assert!(received.lock().unwrap().is_empty());

    let ok = run(
        &[
            "resend",
            path,
            "3",
            "1",
            "--to",
            &to,
            "--reason",
            "EHR lost them",
        ],
        b"",
    );
    assert!(ok.status.success(), "{}", text(&ok.stderr));
    assert_eq!(text(&ok.stdout), "1 r1 AA\n3 r3 AA\n", "oldest first");

    let q = run(
        &[
            "resend",
            path,
            "--query",
            "--control-id",
            "r2",
            "--to",
            &to,
            "--rate",
            "100/s",
        ],
        b"",
    );
    assert_eq!(q.status.code(), Some(1), "an AE fails the command");
    assert_eq!(text(&q.stdout), "2 r2 AE: not today\n");
    assert_eq!(received.lock().unwrap().len(), 3);

    let missing = run(&["resend", path, "99", "--to", &to], b"");
    assert_eq!(missing.status.code(), Some(1));
    assert!(text(&missing.stderr).contains("no stored message with id 99"));
}

/// `export` of a store on a read-only file system (no server running) reads every message and
/// leaves nothing behind: SQLite could not create `-wal`/`-shm` files there anyway, so the
/// store must be opened without them.
#[test]
fn export_reads_a_store_on_a_read_only_file_system() {
    let Some(fs) = mllp_test_support::tmpfs::Tmpfs::mount("read-only-export", "16m") else {
        return;
    };
    let store = fs.path().join("s.db");
    let path = store.to_str().unwrap();
    let ids: Vec<String> = (0..50).map(|i| format!("ro{i}")).collect();
    fill(path, &ids.iter().map(String::as_str).collect::<Vec<_>>());
    let remounted = std::process::Command::new("mount")
        .args(["-o", "remount,ro"])
        .arg(fs.path())
        .status()
        .is_ok_and(|s| s.success());
    assert!(remounted, "remount the tmpfs read-only");
    let files = || {
        let mut names: Vec<_> = std::fs::read_dir(fs.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        names
    };
    // What `serve` left: the store and its search index file (`mllp_store::search_index`).
    let before = files();
    assert_eq!(before, ["s.db", "s.db-search"], "{before:?}");
    let out = run(&["export", path], b"");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).lines().count(), 50);
    assert_eq!(files(), before);
}
