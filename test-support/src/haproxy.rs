//! A real HAProxy on the committed template `deploy/haproxy.cfg`, for loopback tests (the
//! CLI's `tests/haproxy.rs` and `tests/pg_haproxy.rs`). Where HAProxy is not installed the
//! tests return early, except under `CI=true`, where they fail ([`crate::unavailable`]). HAProxy runs the template unchanged; the tests point it at their own ports
//! through the environment variables the template reads.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Bound on every wait in these tests: HAProxy start, a health check, a read.
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// Health-check interval for the tests (the template's default is 2 s): with `fall 3`, a dead
/// node is marked down in about 0.3 s.
pub const CHECK_INTER: &str = "100ms";
/// The committed template the tests run.
pub const TEMPLATE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/haproxy.cfg");

/// The `haproxy` binary, or `None` (with the skip message printed) where it is not installed.
/// Debian installs it in /usr/sbin, which is not on every user's PATH.
pub fn haproxy_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|dir| dir.join("haproxy"))
        .find(|p| p.is_file());
    if found.is_none() {
        crate::unavailable("haproxy", "not installed (Debian: apt-get install haproxy)");
    }
    found
}

/// A free port on `ip`: bound and released, for HAProxy to bind next. Another process could
/// take it in between; `Haproxy::start` then fails visibly (HAProxy exits), never silently.
pub fn free_port(ip: &str) -> SocketAddr {
    TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
}

/// A running HAProxy on `deploy/haproxy.cfg`, killed on drop.
#[derive(Debug)]
pub struct Haproxy {
    /// The HAProxy process.
    pub child: Child,
    /// Where clients connect (the template's frontend).
    pub frontend: SocketAddr,
    /// Its working directory (configuration, log, stats socket).
    pub dir: PathBuf,
}

impl Haproxy {
    /// Starts HAProxy with its frontend on a free port of `ip` (`127.0.0.1` or `::1`) and
    /// `node1`, `node2` pointing at `backends`, and returns once the frontend accepts
    /// connections.
    #[track_caller]
    pub fn start(
        binary: &Path,
        ip: &str,
        backends: [SocketAddr; 2],
        health: [SocketAddr; 2],
    ) -> Self {
        let frontend = free_port(ip);
        let dir = std::env::temp_dir().join(format!(
            "mllp-haproxy-{}-{}",
            std::process::id(),
            frontend.port()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let log = std::fs::File::create(dir.join("haproxy.log")).expect("log file");
        let child = Command::new(binary)
            // -db: stay in the foreground, so the child is HAProxy itself and dies with kill.
            .args(["-db", "-f", TEMPLATE])
            .env("MLLP_FRONTEND", frontend.to_string())
            .env("MLLP_NODE1", backends[0].to_string())
            .env("MLLP_NODE2", backends[1].to_string())
            .env("MLLP_NODE1_HEALTH", health[0].port().to_string())
            .env("MLLP_NODE2_HEALTH", health[1].port().to_string())
            .env("MLLP_CHECK_INTER", CHECK_INTER)
            .env("MLLP_HAPROXY_STATS", dir.join("stats.sock"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("haproxy starts");
        let mut haproxy = Self {
            child,
            frontend,
            dir,
        };
        haproxy.wait_for("the frontend to listen", |h| {
            TcpStream::connect(h.frontend).is_ok() && h.dir.join("stats.sock").exists()
        });
        haproxy
    }

    /// Polls `ready` until it holds, failing with HAProxy's log after [`TIMEOUT`] or if
    /// HAProxy exits. Bounded polling of an external process's state: it has no other signal.
    #[track_caller]
    pub fn wait_for(&mut self, what: &str, mut ready: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if ready(self) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "haproxy exited ({status}) waiting for {what}:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The health status HAProxy reports for `server` ("UP", "DOWN", "UP 1/3", ...), from
    /// `show stat` on the runtime API socket.
    pub fn status(&self, server: &str) -> Option<String> {
        let mut sock = UnixStream::connect(self.dir.join("stats.sock")).ok()?;
        sock.set_read_timeout(Some(TIMEOUT)).ok()?;
        sock.write_all(b"show stat\n").ok()?;
        let mut csv = String::new();
        sock.read_to_string(&mut csv).ok()?;
        let mut lines = csv.lines();
        let head: Vec<&str> = lines.next()?.trim_start_matches("# ").split(',').collect();
        let column = head.iter().position(|c| *c == "status")?;
        lines
            .map(|l| l.split(',').collect::<Vec<_>>())
            .find(|f| f.first() == Some(&"mllp_nodes") && f.get(1) == Some(&server))
            .and_then(|f| f.get(column).map(|s| (*s).to_owned()))
    }

    /// Waits until HAProxy reports `server` exactly `status` ("UP" or "DOWN").
    #[track_caller]
    pub fn wait_status(&mut self, server: &str, status: &str) {
        self.wait_for(&format!("{server} {status}"), |h| {
            h.status(server).as_deref() == Some(status)
        });
    }

    /// What HAProxy logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("haproxy.log")).unwrap_or_default()
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
