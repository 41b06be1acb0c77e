//! A private PostgreSQL 15 cluster for one test: `initdb` (once per test process, then copied),
//! `pg_ctl start` on a free loopback port with its socket in a temporary directory, stopped
//! and removed on drop, also when the test panics. Shared by the store's and the CLI's tests,
//! so there is one place that knows how to get a PostgreSQL server.
//!
//! Where PostgreSQL cannot be had (no server binaries, or running as root without a
//! `postgres` user to run them as), [`PgCluster::start`] prints why and returns `None`, and
//! the test returns early, except under `CI=true`, where it fails ([`crate::unavailable`]).
//! `.ci/run` installs `postgresql-15` so that CI always has one.
//! `MLLP_PG_BIN` overrides the binary directory (default: the newest of
//! /usr/lib/postgresql/*/bin, preferring 15).
//!
//! The server runs as the `postgres` user when the tests run as root (`initdb` refuses root),
//! with `trust` authentication on 127.0.0.1 only. Clusters of test processes that died without
//! dropping theirs (SIGKILL, a harness timeout) are stopped and removed by the next start.

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// Where every test cluster lives: `<dir>/<pid>-<n>`.
const ROOT: &str = "mllp-pg-test";

/// Settings appended to each cluster's postgresql.conf: small, private, durable (fsync stays
/// on, as in production; the store refuses `fsync=off`).
const SETTINGS: &str = "
listen_addresses = '127.0.0.1'
max_connections = 40
shared_buffers = 16MB
logging_collector = off
log_min_messages = warning
";

/// The binaries and the user to run them as.
#[derive(Clone, Debug)]
struct Toolchain {
    bin: PathBuf,
    /// `(uid, gid)` of `postgres` when running as root; `None`: run as ourselves.
    run_as: Option<(u32, u32)>,
    /// A ready data directory to copy: initdb once per process.
    template: PathBuf,
}

/// A running PostgreSQL server, stopped and deleted on drop.
#[derive(Debug)]
pub struct PgCluster {
    tools: Toolchain,
    dir: PathBuf,
    port: u16,
}

impl PgCluster {
    /// Starts a fresh cluster, or prints why PostgreSQL is not available and returns `None`.
    #[track_caller]
    pub fn start() -> Option<Self> {
        let tools = match toolchain() {
            Ok(tools) => tools.clone(),
            Err(why) => {
                crate::unavailable("PostgreSQL", why);
                return None;
            }
        };
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = root().join(format!(
            "{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("cluster directory");
        let data = dir.join("data");
        run(Command::new("cp").arg("-a").arg(&tools.template).arg(&data));
        chown(&tools, &dir);
        let mut cluster = Self {
            tools,
            dir,
            port: 0,
        };
        // A port picked free can be taken before the server binds it: try a few.
        for attempt in 0..5 {
            cluster.port = free_port();
            if cluster.try_start() {
                return Some(cluster);
            }
            eprintln!(
                "postgres did not start on port {} (attempt {attempt}):\n{}",
                cluster.port,
                cluster.log()
            );
        }
        panic!("PostgreSQL did not start; log above");
    }

    /// `postgres://postgres@127.0.0.1:PORT/DB`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates database `name` (UTF-8) and returns its URL.
    #[track_caller]
    pub fn create_db(&self, name: &str) -> String {
        self.sql(
            "postgres",
            &format!("CREATE DATABASE {name} ENCODING 'UTF8' TEMPLATE template0"),
        );
        self.url(name)
    }

    /// Runs `sql` in `db` with psql; returns its unaligned, tuples-only output.
    #[track_caller]
    pub fn sql(&self, db: &str, sql: &str) -> String {
        let out = self
            .psql(db, sql)
            .unwrap_or_else(|err| panic!("psql {sql:?} failed: {err}"));
        out.trim_end().to_owned()
    }

    /// Runs `sql` in `db` with psql; `Err` with its stderr if it failed.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String, String> {
        let out = Command::new(self.tools.bin.join("psql"))
            .args([
                "-X",
                "-q",
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
            ])
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                db,
                "-c",
                sql,
            ])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Stops the server (fast shutdown: open sessions are ended, like a database restart).
    #[track_caller]
    pub fn stop(&self) {
        let out = self.pg_ctl(&["stop", "-m", "fast", "-w", "-t", "60"]);
        assert!(out.status.success(), "pg_ctl stop: {}", stderr(&out));
    }

    /// Starts it again on the same port after [`stop`](Self::stop).
    #[track_caller]
    pub fn restart(&self) {
        assert!(
            self.try_start(),
            "postgres did not restart:\n{}",
            self.log()
        );
    }

    /// The server log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    fn try_start(&self) -> bool {
        let options = format!("-p {} -k {}", self.port, self.dir.display());
        let log = self.dir.join("log");
        self.pg_ctl(&[
            "start",
            "-w",
            "-t",
            "60",
            "-o",
            &options,
            "-l",
            log.to_str().unwrap(),
        ])
        .status
        .success()
    }

    fn pg_ctl(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(self.tools.bin.join("pg_ctl"));
        cmd.arg("-D").arg(self.dir.join("data")).args(args);
        as_user(&mut cmd, &self.tools, &self.dir);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .output()
            .expect("run pg_ctl")
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = self.pg_ctl(&["stop", "-m", "immediate", "-w", "-t", "30"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The system temp dir's test-cluster folder, traversable by the `postgres` user.
fn root() -> PathBuf {
    let root = std::env::temp_dir().join(ROOT);
    if std::fs::create_dir_all(&root).is_ok() {
        let _ = std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o1777));
    }
    root
}

/// Finds the binaries, the user, and makes the template, once per process.
fn toolchain() -> &'static Result<Toolchain, String> {
    static TOOLS: OnceLock<Result<Toolchain, String>> = OnceLock::new();
    TOOLS.get_or_init(|| {
        let bin = find_bin()?;
        let run_as = if is_root() {
            Some(postgres_user().ok_or(
                "running as root and there is no `postgres` user to run initdb as \
                 (the postgresql-15 package creates it)",
            )?)
        } else {
            None
        };
        reap_orphans(&bin, run_as);
        let dir = root().join(format!("{}-template", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let mut tools = Toolchain {
            bin,
            run_as,
            template: dir.join("data"),
        };
        chown(&tools, &dir);
        let mut initdb = Command::new(tools.bin.join("initdb"));
        initdb.arg("-D").arg(&tools.template).args([
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
            "-N",
        ]);
        as_user(&mut initdb, &tools, &dir);
        let out = initdb
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run initdb: {e}"))?;
        if !out.status.success() {
            return Err(format!("initdb failed: {}", stderr(&out)));
        }
        let conf = tools.template.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).map_err(|e| e.to_string())?;
        text.push_str(SETTINGS);
        std::fs::write(&conf, text).map_err(|e| e.to_string())?;
        tools.template = dir.join("data");
        Ok(tools)
    })
}

fn find_bin() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("MLLP_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let preferred = Path::new("/usr/lib/postgresql/15/bin");
    if preferred.join("initdb").is_file() {
        return Ok(preferred.to_owned());
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|bin| bin.join("initdb").is_file() && bin.join("psql").is_file())
        .collect();
    found.sort();
    found.pop().ok_or_else(|| {
        "no server binaries in /usr/lib/postgresql/*/bin (Debian: apt-get install postgresql-15; \
         or set MLLP_PG_BIN)"
            .to_owned()
    })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn postgres_user() -> Option<(u32, u32)> {
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id").args([flag, "postgres"]).output().ok()?;
        if !out.status.success() {
            return None;
        }
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    Some((id("-u")?, id("-g")?))
}

/// Runs `cmd` as the cluster's user, in `dir` (the user may not be able to enter ours).
fn as_user(cmd: &mut Command, tools: &Toolchain, dir: &Path) {
    cmd.current_dir(dir);
    if let Some((uid, gid)) = tools.run_as {
        cmd.uid(uid).gid(gid).env("HOME", dir);
    }
}

fn chown(tools: &Toolchain, dir: &Path) {
    if let Some((uid, gid)) = tools.run_as {
        run(Command::new("chown")
            .arg("-R")
            .arg(format!("{uid}:{gid}"))
            .arg(dir));
    }
}

/// Stops and removes the clusters of test processes that are gone.
fn reap_orphans(bin: &Path, run_as: Option<(u32, u32)>) {
    let Ok(entries) = std::fs::read_dir(root()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if Path::new("/proc").join(pid.to_string()).exists() {
            continue;
        }
        let data = entry.path().join("data");
        if data.join("postmaster.pid").exists() {
            let mut cmd = Command::new(bin.join("pg_ctl"));
            cmd.arg("-D")
                .arg(&data)
                .args(["stop", "-m", "immediate", "-w", "-t", "30"])
                .current_dir(entry.path());
            if let Some((uid, gid)) = run_as {
                cmd.uid(uid).gid(gid);
            }
            let _ = cmd.stdin(Stdio::null()).output();
        }
        let _ = std::fs::remove_dir_all(entry.path());
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

#[track_caller]
fn run(cmd: &mut Command) {
    let out = cmd.output().expect("run a command");
    assert!(out.status.success(), "{cmd:?}: {}", stderr(&out));
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}
