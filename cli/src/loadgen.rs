//! Closed-loop MLLP load generator behind `mllp-reactor bench`.
//!
//! ```text
//!  main thread                      one thread per active connection
//!  ───────────                      ────────────────────────────────
//!  [idle phase: RSS before,         loop until `end`:
//!   open N idle conns, 1 msg each,    keep `pipeline` ADT^A01 in flight ──frames──▶ server
//!   RSS after]                        read ACKs, deframe, verify      ◀──ACKs──────
//!  connect active conns               (MSA-1 = AA, MSA-2 = oldest MSH-10)
//!  spawn workers ───────────────▶     record send→ACK latency if ACKed in the window
//!  progress once a second           drain outstanding ACKs, close
//!  CPU samples at warmup end, end
//!  join, merge histograms ──▶ Report
//! ```
//!
//! Timeline of one run: `[start, start + warmup)` warms up (ACKs verified, not counted);
//! `[start + warmup, start + warmup + duration]` is the measurement window; a message counts
//! when its ACK arrives inside the window. After the window, workers send nothing new, wait for
//! the ACKs still outstanding (verifying them too), and close. An interrupt
//! ([`LoadConfig::interrupt`]) ends the window early, the same way.
//!
//! Every MSH-10 of a run starts with a run id drawn at start, so a second run against a server
//! that stores messages is not taken for resends of the first.
//!
//! Nothing here depends on the library: the load generator must be able to measure any MLLP
//! server, including a broken one.

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, ErrorKind, Read};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use self::wire::{AckDeframer, AckError, MessageTemplate, verify_ack};

mod wire;

/// MLLP start block (`docs/behaviour.md`, "Framing").
const START_BLOCK: u8 = 0x0B;
/// MLLP end block, followed by [`CARRIAGE_RETURN`].
const END_BLOCK: u8 = 0x1C;
/// Carriage return: ends an MLLP frame after [`END_BLOCK`], and ends each HL7 segment.
const CARRIAGE_RETURN: u8 = 0x0D;

/// How long a read may wait for an ACK, or a write for progress, before it counts as a
/// timeout. 10 s is four orders of magnitude above loopback p99 for 1 KiB messages and ~100×
/// the time a 1 MiB message needs, so a timeout means a stuck server, not a slow one.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on connection establishment; loopback connects take microseconds unless the accept
/// backlog is full.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a failed connection before reconnecting. Bounds the error rate against a dead
/// server to 10 per second per connection while still recovering quickly from a single reset.
const RECONNECT_BACKOFF: Duration = Duration::from_millis(100);
/// Largest ACK frame accepted, in bytes. A real ACK is ~120 bytes; an ACK with an ERR segment
/// carrying a long diagnostic stays well below 64 KiB. A larger frame counts as a framing error.
const MAX_ACK_FRAME: usize = 65_536;
/// Largest message payload a run may ask for, in bytes (256 MiB): 25× the library's default
/// `max_message_size`, enough to test rejection of oversize messages.
pub const MAX_SIZE: usize = 256 << 20;
/// Most connections (active plus idle) one run may open. The machine caps open files at 20 000
/// per process; this leaves room for the binary's own descriptors.
pub const MAX_CONNECTIONS: usize = 19_000;
/// Stack of each connection thread. The loop keeps its buffers on the heap; 256 KiB is plenty
/// and keeps 1000 threads at 256 MiB of address space.
const THREAD_STACK: usize = 256 * 1024;
/// Upper bound of the latency histogram, in nanoseconds (60 s); larger samples saturate.
const HISTOGRAM_MAX_NS: u64 = 60_000_000_000;
/// Significant digits kept by the latency histogram (0.1 % relative error).
const HISTOGRAM_SIGFIG: u8 = 3;
/// Wait after the idle connections are served and before the second RSS sample, so that memory
/// the server frees or allocates right after writing the last ACK is settled.
const IDLE_SETTLE: Duration = Duration::from_millis(200);
/// How often the main thread checks [`LoadConfig::interrupt`]: an interrupted run stops within
/// this, which a person at a terminal does not notice.
const INTERRUPT_POLL: Duration = Duration::from_millis(50);
/// Linux `USER_HZ`: `/proc/<pid>/stat` reports CPU time in these ticks (fixed at 100 by the
/// kernel ABI, independent of `CONFIG_HZ`).
const CLOCK_TICKS_PER_SEC: f64 = 100.0;

/// What to run: where, how many connections, how hard, for how long.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Server address.
    pub addr: SocketAddr,
    /// Active connections, one thread each.
    pub conns: usize,
    /// Messages in flight per active connection (1 = send, wait for the ACK, send again).
    pub pipeline: usize,
    /// Approximate payload bytes per message; an NTE segment is padded to reach it.
    pub size: usize,
    /// Length of the measurement window.
    pub duration: Duration,
    /// Load before the window whose messages are verified but not counted.
    pub warmup: Duration,
    /// Connections opened (and served one message each) before the run, then left idle.
    pub idle_conns: usize,
    /// Server process, for RSS per idle connection and server CPU use.
    pub server_pid: Option<u32>,
    /// Speak TLS on the active connections (idle ones stay plain TCP).
    pub tls: Option<mllp_reactor::tls::ClientTls>,
    /// When this becomes true (e.g. on Ctrl-C), the measurement window ends there and the run
    /// reports on what it measured so far.
    pub interrupt: Option<Arc<AtomicBool>>,
}

/// An active connection: plain TCP or TLS over it.
enum Conn {
    Plain(TcpStream),
    Tls(Box<mllp_reactor::tls::TlsClientStream>),
}

impl Conn {
    fn shutdown(&self) {
        let tcp = match self {
            Self::Plain(tcp) => tcp,
            Self::Tls(tls) => tls.tcp(),
        };
        let _ = tcp.shutdown(Shutdown::Both);
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Plain(s) => s.read(buf),
            Self::Tls(s) => s.read(buf),
        }
    }
}

impl io::Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Plain(s) => s.write(buf),
            Self::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Plain(s) => s.flush(),
            Self::Tls(s) => s.flush(),
        }
    }
}

/// Connects an active connection (with TLS when configured).
fn connect_active(
    addr: SocketAddr,
    tls: Option<&mllp_reactor::tls::ClientTls>,
) -> io::Result<Conn> {
    let tcp = connect(addr)?;
    match tls {
        None => Ok(Conn::Plain(tcp)),
        Some(tls) => Ok(Conn::Tls(Box::new(tls.connect_stream(tcp, IO_TIMEOUT)?))),
    }
}

/// Why a run could not be carried out. Errors *during* a run (timeouts, NAKs, resets) are not
/// `LoadError`s: they are counted in [`Report::error_counts`].
#[derive(Debug)]
#[non_exhaustive]
pub enum LoadError {
    /// A configuration value is out of range.
    InvalidConfig(String),
    /// An active connection could not be opened before the run.
    Connect {
        /// The server address.
        addr: SocketAddr,
        /// The connect error.
        source: io::Error,
    },
    /// An idle connection could not be opened or did not get a valid ACK.
    Idle {
        /// Index of the idle connection (0-based).
        index: usize,
        /// What went wrong.
        reason: String,
    },
    /// The server's RSS could not be read from `/proc/<pid>/smaps_rollup` or `status`.
    Rss {
        /// The server process id.
        pid: u32,
        /// The read or parse error.
        source: io::Error,
    },
    /// A connection thread could not be started.
    Spawn(io::Error),
    /// A connection thread panicked (a bug in the load generator).
    WorkerPanicked,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidConfig(why) => write!(f, "invalid configuration: {why}"),
            Self::Connect { addr, source } => write!(f, "cannot connect to {addr}: {source}"),
            Self::Idle { index, reason } => write!(f, "idle connection {index}: {reason}"),
            Self::Rss { pid, source } => {
                write!(
                    f,
                    "cannot read RSS of process {pid} from /proc/{pid}/smaps_rollup or status: {source}"
                )
            }
            Self::Spawn(e) => write!(f, "cannot start a connection thread: {e}"),
            Self::WorkerPanicked => write!(f, "a connection thread panicked"),
        }
    }
}

impl std::error::Error for LoadError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Connect { source, .. } | Self::Rss { source, .. } | Self::Spawn(source) => {
                Some(source)
            }
            _ => None,
        }
    }
}

/// Errors seen during a run, by kind. Every failed expectation lands in exactly one counter.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ErrorCounts {
    /// Reconnect attempts that failed.
    pub connect: u64,
    /// No ACK (or no write progress) within [`IO_TIMEOUT`].
    pub timeout: u64,
    /// The server closed or reset the connection during the run.
    pub closed: u64,
    /// Other socket errors.
    pub io: u64,
    /// Bytes outside frames, an ACK frame over 64 KiB, or an ACK with nothing outstanding.
    pub framing: u64,
    /// ACKs whose MSA-1 is not `AA`.
    pub nak: u64,
    /// ACKs whose MSA-2 is not the MSH-10 of the oldest outstanding message.
    pub mismatch: u64,
    /// ACK frames without an MSH or MSA segment.
    pub malformed: u64,
    /// Messages in flight on a connection that failed; never ACKed. Not part of [`Self::total`]
    /// (the failure itself is counted once under its own kind).
    pub lost: u64,
}

impl ErrorCounts {
    /// All error events (every counter but [`Self::lost`]).
    pub fn total(&self) -> u64 {
        self.connect
            + self.timeout
            + self.closed
            + self.io
            + self.framing
            + self.nak
            + self.mismatch
            + self.malformed
    }

    /// Each non-zero kind with its count, e.g. `nak 7390, timeout 1` (`lost` included);
    /// empty when there were no errors.
    pub fn kinds(&self) -> String {
        [
            ("connect", self.connect),
            ("timeout", self.timeout),
            ("closed", self.closed),
            ("io", self.io),
            ("framing", self.framing),
            ("nak", self.nak),
            ("mismatch", self.mismatch),
            ("malformed", self.malformed),
            ("lost", self.lost),
        ]
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(kind, n)| format!("{kind} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
    }

    fn merge(&mut self, other: &Self) {
        self.connect += other.connect;
        self.timeout += other.timeout;
        self.closed += other.closed;
        self.io += other.io;
        self.framing += other.framing;
        self.nak += other.nak;
        self.mismatch += other.mismatch;
        self.malformed += other.malformed;
        self.lost += other.lost;
    }

    fn count_failure(&mut self, failure: Failure) {
        match failure {
            Failure::Timeout => self.timeout += 1,
            Failure::Closed => self.closed += 1,
            Failure::Io => self.io += 1,
            Failure::Framing => self.framing += 1,
        }
    }

    fn count_ack_error(&mut self, error: AckError) {
        match error {
            AckError::Malformed => self.malformed += 1,
            AckError::Nak => self.nak += 1,
            AckError::Mismatch => self.mismatch += 1,
        }
    }
}

/// The outcome of a run.
#[derive(Debug, Clone)]
pub struct Report {
    /// Active connections.
    pub conns: usize,
    /// Messages in flight per connection.
    pub pipeline: usize,
    /// Actual payload bytes per message (unframed).
    pub size: usize,
    /// Idle connections held during the run.
    pub idle_conns: usize,
    /// Messages whose verified ACK arrived inside the measurement window.
    pub messages: u64,
    /// Framed bytes of those messages.
    pub bytes_sent: u64,
    /// Length of the measurement window.
    pub elapsed: Duration,
    /// `messages / elapsed`.
    pub msgs_per_sec: f64,
    /// `bytes_sent / elapsed`, in MB (10^6 bytes) per second.
    pub mb_per_sec: f64,
    /// Median send → ACK latency, µs.
    pub p50_us: f64,
    /// 90th percentile latency, µs.
    pub p90_us: f64,
    /// 99th percentile latency, µs.
    pub p99_us: f64,
    /// 99.9th percentile latency, µs.
    pub p999_us: f64,
    /// Largest latency, µs.
    pub max_us: f64,
    /// All error events of the whole run (warmup and drain included): `error_counts.total()`.
    pub errors: u64,
    /// Errors by kind.
    pub error_counts: ErrorCounts,
    /// Server RSS growth per idle connection, bytes (needs `idle_conns > 0` and `server_pid`):
    /// anonymous memory only (heap, stacks), what the process holds for its connections.
    pub rss_per_idle_conn: Option<f64>,
    /// The same with file-backed pages too (`Rss` of `smaps_rollup`): it also counts the
    /// binary's and libraries' code pages that paths run for the first time fault in, 64 KiB
    /// at a time (the kernel's fault-around), which is not per-connection memory.
    pub rss_total_per_idle_conn: Option<f64>,
    /// Idle connections the server had closed (or sent unexpected bytes on) by the end of the
    /// run. Not counted in `errors`: a server may legitimately close idle connections (idle
    /// timeout), but then `rss_per_idle_conn` no longer describes connections held open.
    pub idle_closed: u64,
    /// CPU used by this load generator during the window, in cores (1.0 = one core busy).
    pub client_cpu: f64,
    /// CPU used by the server during the window, in cores (needs `server_pid`).
    pub server_cpu: Option<f64>,
    /// CPU busy machine-wide during the window, in cores: client, server, kernel work outside
    /// both (softirq), and any other process. Near the core count means the run was CPU-bound.
    pub system_cpu: Option<f64>,
}

impl Report {
    /// The report as one JSON object (one line when printed with `to_string()`).
    pub fn to_json(&self) -> serde_json::Value {
        let e = &self.error_counts;
        serde_json::json!({
            "conns": self.conns,
            "pipeline": self.pipeline,
            "size": self.size,
            "idle_conns": self.idle_conns,
            "messages": self.messages,
            "bytes_sent": self.bytes_sent,
            "elapsed_s": self.elapsed.as_secs_f64(),
            "msgs_per_sec": self.msgs_per_sec,
            "mb_per_sec": self.mb_per_sec,
            "p50_us": self.p50_us,
            "p90_us": self.p90_us,
            "p99_us": self.p99_us,
            "p999_us": self.p999_us,
            "max_us": self.max_us,
            "errors": self.errors,
            "error_counts": {
                "connect": e.connect,
                "timeout": e.timeout,
                "closed": e.closed,
                "io": e.io,
                "framing": e.framing,
                "nak": e.nak,
                "mismatch": e.mismatch,
                "malformed": e.malformed,
                "lost": e.lost,
            },
            "rss_per_idle_conn": self.rss_per_idle_conn,
            "rss_total_per_idle_conn": self.rss_total_per_idle_conn,
            "idle_closed": self.idle_closed,
            "client_cpu": self.client_cpu,
            "server_cpu": self.server_cpu,
            "system_cpu": self.system_cpu,
        })
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} msgs in {:.1}s: {:.0} msg/s, {:.1} MB/s, latency µs p50 {:.1} p90 {:.1} \
             p99 {:.1} p99.9 {:.1} max {:.1}, errors {}",
            self.messages,
            self.elapsed.as_secs_f64(),
            self.msgs_per_sec,
            self.mb_per_sec,
            self.p50_us,
            self.p90_us,
            self.p99_us,
            self.p999_us,
            self.max_us,
            self.errors,
        )?;
        if self.errors > 0 || self.error_counts.lost > 0 {
            write!(f, " ({})", self.error_counts.kinds())?;
        }
        if let Some(rss) = self.rss_per_idle_conn {
            write!(f, ", server RSS per idle conn {rss:.0} B")?;
        }
        if self.idle_closed > 0 {
            write!(f, ", {} idle conns closed by the server", self.idle_closed)?;
        }
        write!(f, ", cpu client {:.2}", self.client_cpu)?;
        if let Some(cpu) = self.server_cpu {
            write!(f, " server {cpu:.2}")?;
        }
        if let Some(cpu) = self.system_cpu {
            write!(f, " machine {cpu:.2}")?;
        }
        Ok(())
    }
}

/// Runs the load described by `cfg` and reports on it.
///
/// `progress`, when given, is called on the calling thread about once a second with the number
/// of ACKs received so far (warmup included).
///
/// # Errors
///
/// Returns a [`LoadError`] when the run cannot be carried out: invalid configuration, server
/// unreachable at start, an idle connection not served, RSS unreadable, or no thread available.
/// Failures during the run are counted in the report instead.
pub fn run(cfg: &LoadConfig, progress: Option<&dyn Fn(u64)>) -> Result<Report, LoadError> {
    validate(cfg)?;
    let run_id = run_id();
    let templates: Vec<MessageTemplate> = (0..cfg.conns)
        .map(|c| MessageTemplate::for_patient(cfg.size, c, run_id))
        .collect();

    let mut rss_per_idle_conn = None;
    let mut rss_total_per_idle_conn = None;
    let idle = if cfg.idle_conns > 0 {
        let before = cfg.server_pid.map(read_rss).transpose()?;
        let idle = open_idle(cfg, run_id)?;
        thread::sleep(IDLE_SETTLE);
        let after = cfg.server_pid.map(read_rss).transpose()?;
        if let (Some(before), Some(after)) = (before, after) {
            let per_conn = |a: u64, b: u64| (a as f64 - b as f64) / cfg.idle_conns as f64;
            rss_per_idle_conn = Some(per_conn(after.anon, before.anon));
            rss_total_per_idle_conn = Some(per_conn(after.total, before.total));
        }
        idle
    } else {
        Vec::new()
    };

    // Connect every active connection up front: an unreachable server fails the run at once.
    let mut streams = Vec::with_capacity(cfg.conns);
    for _ in 0..cfg.conns {
        let stream =
            connect_active(cfg.addr, cfg.tls.as_ref()).map_err(|source| LoadError::Connect {
                addr: cfg.addr,
                source,
            })?;
        streams.push(stream);
    }

    let stop = AtomicBool::new(false);
    let acked: Vec<AtomicU64> = (0..cfg.conns).map(|_| AtomicU64::new(0)).collect();
    let start = Instant::now();
    let warmup_end = start + cfg.warmup;
    let end = warmup_end + cfg.duration;
    let client_pid = std::process::id();

    let (results, cpu, ended) = thread::scope(|scope| {
        let mut handles = Vec::with_capacity(cfg.conns);
        let mut spawn_error = None;
        for (index, stream) in streams.into_iter().enumerate() {
            let worker = Worker {
                index,
                addr: cfg.addr,
                tls: cfg.tls.as_ref(),
                pipeline: cfg.pipeline,
                template: &templates[index],
                warmup_end,
                end,
                stop: &stop,
                acked: &acked[index],
            };
            let spawned = thread::Builder::new()
                .name(format!("loadgen-{index}"))
                .stack_size(THREAD_STACK)
                .spawn_scoped(scope, move || worker.run(stream));
            match spawned {
                Ok(handle) => handles.push(handle),
                Err(e) => {
                    spawn_error = Some(e);
                    stop.store(true, Ordering::Relaxed);
                    break;
                }
            }
        }
        let (cpu, ended) = if spawn_error.is_none() {
            let window = Window {
                start,
                warmup_end,
                end,
            };
            monitor(cfg, client_pid, &window, &acked, &stop, progress)
        } else {
            (CpuUse::default(), end)
        };
        let joined: Vec<_> = handles.into_iter().map(|h| h.join()).collect();
        match spawn_error {
            Some(e) => (Err(LoadError::Spawn(e)), cpu, ended),
            None => (Ok(joined), cpu, ended),
        }
    });
    let idle_closed = count_closed(&idle);
    drop(idle);

    let mut histogram = new_histogram();
    let mut messages = 0;
    let mut bytes_sent = 0;
    let mut error_counts = ErrorCounts::default();
    for result in results? {
        let result = result.map_err(|_| LoadError::WorkerPanicked)?;
        // Same bounds and precision on both sides, so `add` cannot fail.
        let _ = histogram.add(&result.histogram);
        messages += result.messages;
        bytes_sent += result.bytes;
        error_counts.merge(&result.errors);
    }

    let elapsed = ended.saturating_duration_since(warmup_end);
    // An interrupt during the warmup leaves no window: report zero rates, not NaN.
    let secs = elapsed.as_secs_f64().max(f64::MIN_POSITIVE);
    let us = |ns: u64| ns as f64 / 1_000.0;
    Ok(Report {
        conns: cfg.conns,
        pipeline: cfg.pipeline,
        size: templates.first().map_or(0, |t| t.payload_len),
        idle_conns: cfg.idle_conns,
        messages,
        bytes_sent,
        elapsed,
        msgs_per_sec: messages as f64 / secs,
        mb_per_sec: bytes_sent as f64 / 1e6 / secs,
        p50_us: us(histogram.value_at_quantile(0.50)),
        p90_us: us(histogram.value_at_quantile(0.90)),
        p99_us: us(histogram.value_at_quantile(0.99)),
        p999_us: us(histogram.value_at_quantile(0.999)),
        max_us: us(histogram.max()),
        errors: error_counts.total(),
        error_counts,
        rss_per_idle_conn,
        rss_total_per_idle_conn,
        idle_closed,
        client_cpu: cpu.client,
        server_cpu: cpu.server,
        system_cpu: cpu.system,
    })
}

fn validate(cfg: &LoadConfig) -> Result<(), LoadError> {
    let invalid = |why: String| Err(LoadError::InvalidConfig(why));
    if cfg.conns == 0 {
        return invalid("at least one active connection is needed".into());
    }
    if cfg.pipeline == 0 {
        return invalid("pipeline must be at least 1".into());
    }
    if cfg.size > MAX_SIZE {
        return invalid(format!(
            "size {} exceeds the maximum of {MAX_SIZE} bytes",
            cfg.size
        ));
    }
    if cfg.duration.is_zero() {
        return invalid("duration must be greater than zero".into());
    }
    if cfg.conns.saturating_add(cfg.idle_conns) > MAX_CONNECTIONS {
        return invalid(format!(
            "{} active + {} idle connections exceed the maximum of {MAX_CONNECTIONS}",
            cfg.conns, cfg.idle_conns
        ));
    }
    Ok(())
}

/// CPU used during the measurement window, in cores (1.0 = one core busy for the whole window).
#[derive(Debug, Clone, Copy, Default)]
struct CpuUse {
    client: f64,
    server: Option<f64>,
    system: Option<f64>,
}

/// One CPU-time sample: ticks of this process, of the server, and machine-wide busy ticks.
#[derive(Debug, Clone, Copy)]
struct CpuSample {
    client: Option<u64>,
    server: Option<u64>,
    system: Option<u64>,
}

impl CpuSample {
    fn take(client_pid: u32, server_pid: Option<u32>) -> Self {
        Self {
            client: read_cpu_ticks(client_pid),
            server: server_pid.and_then(read_cpu_ticks),
            system: read_system_busy_ticks(),
        }
    }

    fn cores_until(&self, later: &Self, window: Duration) -> CpuUse {
        let secs = window.as_secs_f64();
        let cores = |a: Option<u64>, b: Option<u64>| {
            Some(b?.saturating_sub(a?) as f64 / CLOCK_TICKS_PER_SEC / secs)
        };
        CpuUse {
            client: cores(self.client, later.client).unwrap_or(0.0),
            server: cores(self.server, later.server),
            system: cores(self.system, later.system),
        }
    }
}

/// The phases of a run: warmup from `start`, window from `warmup_end` to `end`.
struct Window {
    start: Instant,
    warmup_end: Instant,
    end: Instant,
}

/// Sleeps through the run on the calling thread: reports progress once a second and samples
/// CPU time at the start and end of the window. On an interrupt it sets `stop` (the workers
/// then finish as at the end of the window). Returns the CPU use and when the window ended.
fn monitor(
    cfg: &LoadConfig,
    client_pid: u32,
    window: &Window,
    acked: &[AtomicU64],
    stop: &AtomicBool,
    progress: Option<&dyn Fn(u64)>,
) -> (CpuUse, Instant) {
    let Window {
        start,
        warmup_end,
        mut end,
    } = *window;
    let mut at_warmup_end = None;
    let mut next_tick = start + Duration::from_secs(1);
    loop {
        let now = Instant::now();
        if cfg
            .interrupt
            .as_ref()
            .is_some_and(|i| i.load(Ordering::Relaxed))
        {
            stop.store(true, Ordering::Relaxed);
            end = now.max(warmup_end);
        }
        if at_warmup_end.is_none() && now >= warmup_end {
            at_warmup_end = Some(CpuSample::take(client_pid, cfg.server_pid));
        }
        if now >= next_tick {
            if let Some(progress) = progress {
                progress(acked.iter().map(|a| a.load(Ordering::Relaxed)).sum());
            }
            next_tick += Duration::from_secs(1);
        }
        if now >= end {
            break;
        }
        if stop.load(Ordering::Relaxed) {
            // Interrupted during the warmup: there is no window to measure.
            return (CpuUse::default(), end);
        }
        let mut wake = next_tick.min(end);
        if at_warmup_end.is_none() {
            wake = wake.min(warmup_end);
        }
        if cfg.interrupt.is_some() {
            wake = wake.min(now + INTERRUPT_POLL);
        }
        thread::sleep(wake.saturating_duration_since(now));
    }
    let at_end = CpuSample::take(client_pid, cfg.server_pid);
    // INVARIANT: the loop only exits once `now >= end >= warmup_end`, after sampling.
    let cpu = at_warmup_end.map_or_else(CpuUse::default, |s| {
        s.cores_until(&at_end, end - warmup_end)
    });
    (cpu, end)
}

/// An id for this run, from the clock and the process id: different for every run in
/// practice (see the message template).
fn run_id() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    // Fold the 128 bits and the pid with a multiplicative hash, so runs a second apart differ
    // in every digit.
    let mixed = (nanos as u64 ^ (nanos >> 64) as u64 ^ u64::from(std::process::id()) << 32)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (mixed >> 32) as u32
}

/// Opens `cfg.idle_conns` connections, sends one small message on each, and reads its ACK, so
/// the server has accepted and served every one of them before the RSS sample.
fn open_idle(cfg: &LoadConfig, run_id: u32) -> Result<Vec<TcpStream>, LoadError> {
    let template = MessageTemplate::new(0, run_id);
    let mut streams = Vec::with_capacity(cfg.idle_conns);
    let mut id = Vec::new();
    let idle_error = |index: usize, reason: String| LoadError::Idle { index, reason };
    for index in 0..cfg.idle_conns {
        let mut stream = connect(cfg.addr).map_err(|e| idle_error(index, e.to_string()))?;
        // Idle ids continue after the active ones, so every MSH-10 of a run is unique.
        template.write_id(cfg.conns + index, 0, &mut id);
        template
            .write(&mut stream, &id)
            .map_err(|e| idle_error(index, format!("send: {e}")))?;
        streams.push(stream);
    }
    let mut deframer = AckDeframer::new(MAX_ACK_FRAME);
    for (index, stream) in streams.iter_mut().enumerate() {
        deframer.clear();
        template.write_id(cfg.conns + index, 0, &mut id);
        let range = loop {
            if let Some(range) = deframer.next_frame() {
                break range;
            }
            let Some(spare) = deframer.spare() else {
                return Err(idle_error(index, "ACK frame too large".into()));
            };
            match stream.read(spare) {
                Ok(0) => return Err(idle_error(index, "closed by the server".into())),
                Ok(n) => deframer.filled(n),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(idle_error(index, format!("reading the ACK: {e}"))),
            }
        };
        verify_ack(deframer.payload(range), &id)
            .map_err(|e| idle_error(index, format!("bad ACK: {e}")))?;
    }
    Ok(streams)
}

/// How many of the idle connections are no longer quietly open: closed or reset by the server,
/// or holding bytes nobody asked for. Checked with a non-blocking peek, so it never waits.
fn count_closed(idle: &[TcpStream]) -> u64 {
    let still_open = |stream: &TcpStream| {
        let mut byte = [0u8; 1];
        stream.set_nonblocking(true).is_ok()
            && matches!(stream.peek(&mut byte), Err(e) if e.kind() == ErrorKind::WouldBlock)
    };
    idle.iter().filter(|stream| !still_open(stream)).count() as u64
}

/// Connects with [`CONNECT_TIMEOUT`], sets `TCP_NODELAY` and the [`IO_TIMEOUT`]s.
fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(stream)
}

fn new_histogram() -> Histogram<u64> {
    // The bounds are valid constants (1 <= low, high >= 2 * low, sigfig <= 5).
    Histogram::new_with_bounds(1, HISTOGRAM_MAX_NS, HISTOGRAM_SIGFIG)
        .expect("constant histogram bounds are valid")
}

/// A process's resident memory, in bytes.
#[derive(Clone, Copy, Debug)]
struct Rss {
    /// Anonymous pages: heap, stacks, anonymous mappings.
    anon: u64,
    /// Everything resident, file-backed pages (code, mapped files) included.
    total: u64,
}

/// The resident memory of `pid`.
fn read_rss(pid: u32) -> Result<Rss, LoadError> {
    let rss_error = |source| LoadError::Rss { pid, source };
    // `smaps_rollup` counts the pages mapped now (a page-table walk); `status`'s VmRSS and
    // RssAnon come from per-CPU counters that lag by up to a batch per CPU (64 KiB steps seen
    // here, 64 B per connection at 1 000 idle ones). The latter only where the former is
    // missing. `Anonymous` is what the process holds; `Rss` adds code pages faulted in by
    // paths run for the first time (64 KiB per fault, the kernel's fault-around), which made
    // the per-connection figure jump by 64–192 B in some runs.
    let kb = |text: &str, key: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(key))
            .and_then(|rest| rest.trim().strip_suffix("kB"))
            .and_then(|kb| kb.trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    if let Ok(rollup) = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        && let (Some(anon), Some(total)) = (kb(&rollup, "Anonymous:"), kb(&rollup, "Rss:"))
    {
        return Ok(Rss { anon, total });
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(rss_error)?;
    match (kb(&status, "RssAnon:"), kb(&status, "VmRSS:")) {
        (Some(anon), Some(total)) => Ok(Rss { anon, total }),
        _ => Err(rss_error(io::Error::new(
            ErrorKind::InvalidData,
            "no RssAnon or VmRSS line",
        ))),
    }
}

/// User plus system CPU time of `pid` so far, in clock ticks; `None` if unreadable.
fn read_cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; fields after its closing ')' are plain.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // After ')': field 3 (state) is index 0, so utime (field 14) is index 11, stime index 12.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Busy ticks of the whole machine so far (all CPUs; everything but idle and iowait), from the
/// first line of `/proc/stat`. Includes softirq work that the kernel does outside any process
/// (loopback TCP delivery deferred to `ksoftirqd`), which per-process times miss.
fn read_system_busy_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice, already in user/nice].
    let total: u64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3)? + ticks.get(4).unwrap_or(&0);
    Some(total - idle)
}

/// A connection failure that ends the current connection (and its in-flight messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    Timeout,
    Closed,
    Io,
    Framing,
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Self {
        match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => Self::Timeout,
            ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::BrokenPipe
            | ErrorKind::UnexpectedEof
            | ErrorKind::WriteZero => Self::Closed,
            _ => Self::Io,
        }
    }
}

/// What one connection thread measured.
struct WorkerResult {
    histogram: Histogram<u64>,
    messages: u64,
    bytes: u64,
    errors: ErrorCounts,
}

/// One active connection's thread: everything it needs, borrowed from [`run`].
struct Worker<'a> {
    tls: Option<&'a mllp_reactor::tls::ClientTls>,
    index: usize,
    addr: SocketAddr,
    pipeline: usize,
    template: &'a MessageTemplate,
    warmup_end: Instant,
    end: Instant,
    stop: &'a AtomicBool,
    /// ACKs received so far, read by the progress reporter.
    acked: &'a AtomicU64,
}

/// Per-connection state that outlives one TCP connection (sequence numbers keep going after a
/// reconnect, so MSH-10 stays unique).
struct WorkerState {
    seq: u64,
    outstanding: VecDeque<(u64, Instant)>,
    deframer: AckDeframer,
    id: Vec<u8>,
    result: WorkerResult,
}

impl Worker<'_> {
    fn finished(&self) -> bool {
        self.stop.load(Ordering::Relaxed) || Instant::now() >= self.end
    }

    fn run(&self, stream: Conn) -> WorkerResult {
        let mut state = WorkerState {
            seq: 0,
            outstanding: VecDeque::with_capacity(self.pipeline),
            deframer: AckDeframer::new(MAX_ACK_FRAME),
            id: Vec::with_capacity(32),
            result: WorkerResult {
                histogram: new_histogram(),
                messages: 0,
                bytes: 0,
                errors: ErrorCounts::default(),
            },
        };
        let mut next = Some(stream);
        loop {
            let mut stream = match next.take() {
                Some(stream) => stream,
                None if self.finished() => break,
                None => match connect_active(self.addr, self.tls) {
                    Ok(stream) => stream,
                    Err(_) => {
                        state.result.errors.connect += 1;
                        self.backoff();
                        continue;
                    }
                },
            };
            state.outstanding.clear();
            state.deframer.clear();
            match self.drive(&mut stream, &mut state) {
                Ok(()) => {
                    // Orderly end: everything sent was ACKed.
                    stream.shutdown();
                    break;
                }
                Err(failure) => {
                    state.result.errors.count_failure(failure);
                    state.result.errors.lost += state.outstanding.len() as u64;
                    drop(stream);
                    self.backoff();
                }
            }
        }
        state.result
    }

    fn backoff(&self) {
        let wait = RECONNECT_BACKOFF.min(self.end.saturating_duration_since(Instant::now()));
        thread::sleep(wait);
    }

    /// Keeps `pipeline` messages in flight until the window ends, then drains. Returns `Ok`
    /// once every message sent on this connection is ACKed after the end.
    fn drive(&self, stream: &mut Conn, state: &mut WorkerState) -> Result<(), Failure> {
        loop {
            while state.outstanding.len() < self.pipeline && !self.finished() {
                self.template.write_id(self.index, state.seq, &mut state.id);
                let sent_at = Instant::now();
                self.template.write(stream, &state.id)?;
                state.outstanding.push_back((state.seq, sent_at));
                state.seq += 1;
            }
            if state.outstanding.is_empty() {
                return Ok(());
            }
            let spare = state.deframer.spare().ok_or(Failure::Framing)?;
            match stream.read(spare) {
                Ok(0) => return Err(Failure::Closed),
                Ok(n) => state.deframer.filled(n),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
            while let Some(range) = state.deframer.next_frame() {
                let Some((seq, sent_at)) = state.outstanding.pop_front() else {
                    return Err(Failure::Framing);
                };
                let now = Instant::now();
                self.template.write_id(self.index, seq, &mut state.id);
                let result = &mut state.result;
                let verified = verify_ack(state.deframer.payload(range), &state.id);
                if verified.is_ok() {
                    // Progress counts verified ACKs only: a NAK or a mismatch is not "acked".
                    self.acked.fetch_add(1, Ordering::Relaxed);
                }
                match verified {
                    Ok(()) if now >= self.warmup_end && now <= self.end => {
                        let ns = u64::try_from((now - sent_at).as_nanos()).unwrap_or(u64::MAX);
                        result.histogram.saturating_record(ns.max(1));
                        result.messages += 1;
                        result.bytes += self.template.framed_len(state.id.len()) as u64;
                    }
                    Ok(()) => {}
                    Err(e) => result.errors.count_ack_error(e),
                }
            }
            if state.deframer.take_junk() > 0 {
                state.result.errors.framing += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests;
