//! A `serve` child process (the real binary, started by the CLI's tests), known by the
//! address it prints first (`listening on ADDR`); SIGKILLed on drop.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::Duration;

/// A running `serve` child: its address and the rest of its stdout, line by line.
#[derive(Debug)]
pub struct ServeProcess {
    child: Child,
    /// The address from its first line, `listening on ADDR`.
    pub addr: SocketAddr,
    lines: Receiver<String>,
}

impl ServeProcess {
    /// Spawns `command` (a `serve` with `--listen …:0`) with stdout piped and stderr inherited,
    /// and waits, at most `wait`, for its first line.
    ///
    /// # Panics
    ///
    /// If it cannot be spawned, prints nothing within `wait`, or its first line is not
    /// `listening on ADDR`.
    #[track_caller]
    pub fn start(mut command: Command, wait: Duration) -> Self {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn mllp-reactor serve");
        let lines = read_lines(child.stdout.take().unwrap());
        let first = lines.recv_timeout(wait).expect("serve printed nothing");
        let addr = first
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("first line {first:?}"))
            .parse()
            .unwrap();
        Self { child, addr, lines }
    }

    /// Its next line on stdout, waiting at most `wait`.
    ///
    /// # Panics
    ///
    /// If there is none within `wait`.
    #[track_caller]
    pub fn next_line(&self, wait: Duration) -> String {
        self.lines.recv_timeout(wait).expect("no further line")
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILLs it and reaps it.
    ///
    /// # Panics
    ///
    /// If it cannot be killed or waited for.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Forwards the lines of `out` to a channel from a thread (which also keeps the pipe drained
/// while the receiver lives).
pub fn read_lines(out: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}
