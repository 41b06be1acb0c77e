//! Running the binary: [`run`] for commands that end by themselves, [`Serve`] for a server
//! child that is stopped with SIGTERM, and in-process servers for `send` and `bench` to talk to.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use mllp_reactor::{Handler, Server, ServerHandle};
use mllp_test_support::process::read_lines;

/// How long a server child gets to print `listening on`, and any command to finish.
pub(crate) const WAIT: Duration = Duration::from_secs(30);

/// The binary under test.
pub(crate) fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mllp-reactor"))
}

/// Runs the binary to completion with `stdin` as its input, within [`WAIT`].
#[track_caller]
pub(crate) fn run(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = bin()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    let mut input = child.stdin.take().expect("piped");
    let stdin = stdin.to_vec();
    thread::spawn(move || {
        let _ = input.write_all(&stdin);
    });
    wait_output(child)
}

/// Collects a child's output, killing it if it runs past [`WAIT`].
#[track_caller]
pub(crate) fn wait_output(child: Child) -> Output {
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(WAIT) {
        Ok(output) => output.expect("the child's output is readable"),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("the command ran past {WAIT:?}");
        }
    }
}

/// The first line of `bytes`, lossily.
pub(crate) fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A `serve` child. Dropping it kills the process.
pub(crate) struct Serve {
    child: Option<Child>,
    /// The MLLP address it printed.
    pub(crate) addr: SocketAddr,
    /// The metrics address it printed, with `--metrics`.
    pub(crate) metrics: Option<SocketAddr>,
    stdout: Vec<String>,
    rest: Option<mpsc::Receiver<String>>,
}

impl Serve {
    /// Starts `serve ARGS` (add `--listen 127.0.0.1:0` yourself) with `env`, and waits for its
    /// `listening on` line.
    #[track_caller]
    pub(crate) fn start(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut command = bin();
        command.arg("serve");
        // These tests are about the CLI, not the store: without a store of their own they
        // would all share ./mllp-reactor.db.
        if !args
            .iter()
            .any(|a| a.starts_with("--store") || *a == "--no-store")
        {
            command.arg("--no-store");
        }
        command.args(args).env_remove("RUST_LOG");
        for (key, value) in env {
            command.env(key, value);
        }
        let metrics =
            args.contains(&"--metrics") || args.iter().any(|a| a.starts_with("--metrics="));
        Self::spawn(command, metrics)
    }

    /// Starts `command` (a `serve`, set up by the caller) and waits for its `listening on`
    /// line, and its `metrics on` line when `metrics`; other lines before them are kept.
    #[track_caller]
    pub(crate) fn spawn(mut command: Command, metrics: bool) -> Self {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("the binary starts");
        let stdout = child.stdout.take().expect("piped");
        let lines = read_lines(stdout);
        let mut serve = Self {
            child: Some(child),
            addr: "0.0.0.0:0".parse().expect("valid"),
            metrics: None,
            stdout: Vec::new(),
            rest: None,
        };
        let Ok(first) = lines.recv_timeout(WAIT) else {
            let output = serve.kill();
            panic!("serve printed no address; stderr: {}", text(&output.stderr));
        };
        serve.addr = first
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
            .parse()
            .expect("an address");
        serve.stdout.push(first);
        if metrics {
            loop {
                let line = lines.recv_timeout(WAIT).expect("a metrics line");
                if let Some(addr) = line
                    .strip_prefix("metrics on http://")
                    .and_then(|s| s.strip_suffix("/metrics"))
                {
                    serve.metrics = Some(addr.parse().expect("an address"));
                    serve.stdout.push(line);
                    break;
                }
                serve.stdout.push(line);
            }
        }
        serve.rest = Some(lines);
        serve
    }

    /// The lines printed on stdout so far.
    pub(crate) fn stdout_lines(&mut self) -> &[String] {
        if let Some(rest) = &self.rest {
            self.stdout.extend(rest.try_iter());
        }
        &self.stdout
    }

    /// The child's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Sends SIGTERM and waits for the exit: stdout (every line) and stderr.
    #[track_caller]
    pub(crate) fn stop(mut self) -> (Output, Vec<String>) {
        let child = self.child.take().expect("running");
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
        let output = wait_output(child);
        let mut lines = std::mem::take(&mut self.stdout);
        if let Some(rest) = self.rest.take() {
            lines.extend(rest.try_iter());
        }
        (output, lines)
    }

    fn kill(&mut self) -> Output {
        let mut child = self.child.take().expect("running");
        let _ = child.kill();
        wait_output(child)
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// An in-process server with `handler` on a free loopback port.
pub(crate) fn server(handler: impl Handler) -> ServerHandle {
    Server::builder(handler)
        .bind("127.0.0.1:0")
        .and_then(Server::spawn)
        .expect("the test server starts")
}

/// A fresh scratch directory for this test (removed by the caller, or left in the temp dir).
pub(crate) fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mllp-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("the temp dir is writable");
    dir
}

/// One HTTP GET on `addr` for `/metrics`; returns the body.
#[track_caller]
pub(crate) fn scrape(addr: SocketAddr) -> String {
    let mut stream = std::net::TcpStream::connect(addr).expect("the metrics port accepts");
    stream.set_read_timeout(Some(WAIT)).expect("timeout set");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("request written");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response read");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}

/// Takes the SQLite store's write lock (so no commit can finish while the returned connection
/// lives), sends the message `id` to the server at `addr` and waits (bounded) until the
/// server's `--metrics` at `metrics` count it as received. Keep both returned values alive.
#[track_caller]
pub(crate) fn send_while_the_store_is_locked(
    addr: SocketAddr,
    metrics: SocketAddr,
    store: &std::path::Path,
    id: &str,
) -> (rusqlite::Connection, std::net::TcpStream) {
    let holder = rusqlite::Connection::open(store).expect("opens");
    holder.execute_batch("BEGIN IMMEDIATE").expect("locked");
    let mut peer = std::net::TcpStream::connect(addr).expect("connects");
    let frame = format!("\x0b{}\x1c\r", message(id).replace('\n', "\r"));
    peer.write_all(frame.as_bytes()).expect("written");
    let deadline = std::time::Instant::now() + WAIT;
    while !scrape(metrics).contains("mllp_messages_received_total{listener=\"mllp\"} 1") {
        assert!(
            std::time::Instant::now() < deadline,
            "the message never arrived"
        );
        thread::sleep(Duration::from_millis(20));
    }
    (holder, peer)
}

/// An ADT^A01 text message with MSH-10 `id`, segments ending in `\n` as in a file.
pub(crate) fn message(id: &str) -> String {
    format!("MSH|^~\\&|LAB|H|EHR|H|20260101120000||ADT^A01|{id}|P|2.5.1\nPID|1||123\n")
}

/// The `server started` line of a `--log-format json` log, as JSON.
#[track_caller]
pub(crate) fn start_line(log: &str) -> serde_json::Value {
    let line = log
        .lines()
        .find(|l| l.contains("server started"))
        .unwrap_or_else(|| panic!("no start line in {log}"));
    serde_json::from_str(line).expect("JSON")
}
