//! `serve --metrics ADDR`: Prometheus text on `http://ADDR/metrics`.
//!
//! - The server's and the store's histograms are exported as Prometheus *histograms*
//!   (cumulative buckets), not summaries, so they can be summed across instances and over
//!   time: see the bucket constants. Every histogram the server or the store records needs a
//!   matcher here; one without would come out as a summary.
//! - The exporter keeps raw samples until they are folded into the buckets; a thread does that
//!   every [`UPKEEP_INTERVAL`], so memory stays flat whether or not anyone scrapes.
//! - `mllp_build_info{version}` (always 1) says which build is running.
//! - `process_*` metrics (CPU, resident memory, open and maximum file descriptors, start time)
//!   are read from `/proc/self` at each scrape, under the names Prometheus client libraries
//!   use. They are absent where `/proc` is not (not Linux).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::thread;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::error::CliError;

/// How often samples are folded into the buckets. The exporter's own default is 5 s; at a
/// sustained 100k msg/s, 4 histograms × 8 bytes per sample is 3.2 MB of samples per second,
/// so 1 s keeps that buffer a few MB at most, for a fold that takes well under a millisecond.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Bucket upper bounds for per-message latencies (`mllp_handler_queue_seconds`,
/// `mllp_handler_duration_seconds`, `mllp_response_latency_seconds`), in seconds: 10 µs (below
/// a loopback round trip) to 60 s (the default handler timeout), about three per decade.
pub const LATENCY_BUCKETS: [f64; 21] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Bucket upper bounds for `mllp_connection_duration_seconds`: HL7 connections live from
/// milliseconds (one message per connection) to days (persistent feeds).
pub const CONNECTION_BUCKETS: [f64; 11] = [
    0.001, 0.01, 0.1, 1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 14_400.0, 86_400.0,
];

/// Bucket upper bounds for `mllp_message_size_bytes` and `mllp_response_size_bytes`: powers of
/// four from 64 B (an ACK) to 16 MiB (past the default 10 MiB message limit).
pub const SIZE_BUCKETS: [f64; 10] = [
    64.0,
    256.0,
    1024.0,
    4096.0,
    16_384.0,
    65_536.0,
    262_144.0,
    1_048_576.0,
    4_194_304.0,
    16_777_216.0,
];

/// Bucket upper bounds for `mllp_store_batch_messages` (records per store transaction): powers
/// of two from 1 (a quiet server commits each message alone) to 1024 (the store's default
/// `max_batch_messages`). Without buckets the exporter would render it as a summary, which
/// cannot be summed across nodes.
pub const BATCH_BUCKETS: [f64; 11] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

/// The build-info gauge.
pub const BUILD_INFO: &str = "mllp_build_info";

/// Installs the Prometheus recorder (call before binding the server, so that the server's
/// handles land in it), starts the upkeep thread and serves the text on `addr`.
///
/// # Errors
///
/// A usage error naming `--metrics` when the address does not resolve,
/// [`CliError::Listen`] when it cannot be bound, [`CliError::Setup`] when a thread cannot
/// start.
pub fn start(text: &str) -> Result<SocketAddr, CliError> {
    let addr = crate::addr::resolve_flag("--metrics", text)?;
    let listen_error = |source| CliError::Listen {
        flag: format!("--metrics {text}"),
        source,
    };
    let listener = TcpListener::bind(addr).map_err(listen_error)?;
    let local = listener.local_addr().map_err(listen_error)?;
    // Fails only when a recorder is installed already; this is the one place that installs
    // it, once per process.
    let handle = builder().install_recorder().map_err(|e| CliError::Setup {
        what: "the metrics recorder",
        source: std::io::Error::other(e),
    })?;
    metrics::describe_gauge!(BUILD_INFO, "Build of the running server; always 1");
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    let upkeep = handle.clone();
    thread::Builder::new()
        .name("metrics-upkeep".to_owned())
        .spawn(move || {
            loop {
                thread::sleep(UPKEEP_INTERVAL);
                upkeep.run_upkeep();
            }
        })
        .map_err(|source| CliError::Setup {
            what: "the metrics upkeep thread",
            source,
        })?;
    thread::Builder::new()
        .name("metrics-http".to_owned())
        .spawn(move || serve_http(&listener, &handle))
        .map_err(|source| CliError::Setup {
            what: "the metrics thread",
            source,
        })?;
    Ok(local)
}

/// The exporter configuration: buckets for every histogram.
fn builder() -> PrometheusBuilder {
    // Matchers: a full name wins over a suffix. Each call fails only on an empty bucket list.
    PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(mllp_reactor::telemetry::names::CONNECTION_DURATION.to_owned()),
            &CONNECTION_BUCKETS,
        )
        .and_then(|b| {
            b.set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS)
        })
        .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_bytes".into()), &SIZE_BUCKETS))
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(mllp_store::telemetry::BATCH_MESSAGES.to_owned()),
                &BATCH_BUCKETS,
            )
        })
        .expect("the bucket lists are not empty")
}

/// Answers every request with the current text (one request per connection).
fn serve_http(listener: &TcpListener, handle: &PrometheusHandle) {
    for mut stream in listener.incoming().flatten() {
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
        let mut request = [0u8; 1024];
        let _ = stream.read(&mut request);
        let mut body = handle.render();
        process::render(&mut body);
        let _ = write!(
            stream,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
            body.len(),
            body
        );
    }
}

/// A small `/proc/self` collector, in the Prometheus client libraries' names and units.
pub mod process {
    use std::fmt::Write as _;

    /// Linux `USER_HZ`: `/proc/<pid>/stat` counts CPU time in these ticks (fixed at 100 by the
    /// kernel ABI).
    const TICKS_PER_SECOND: f64 = 100.0;

    /// Appends the process metrics to `out`; writes nothing it cannot read.
    pub fn render(out: &mut String) {
        let stat = std::fs::read_to_string("/proc/self/stat").ok();
        // Fields after the command name, which is in parentheses and may contain spaces.
        let fields: Vec<&str> = stat
            .as_deref()
            .and_then(|s| s.rsplit_once(')'))
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        // rest[0] is field 3 (state): utime is field 14, stime 15, starttime 22.
        let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<f64>().ok());
        if let (Some(utime), Some(stime)) = (field(14), field(15)) {
            metric(
                out,
                "process_cpu_seconds_total",
                "counter",
                "Total user and system CPU time spent in seconds.",
                (utime + stime) / TICKS_PER_SECOND,
            );
        }
        if let Some(rss) = status_kib("VmRSS:") {
            metric(
                out,
                "process_resident_memory_bytes",
                "gauge",
                "Resident memory size in bytes.",
                rss * 1024.0,
            );
        }
        if let Some(vsz) = status_kib("VmSize:") {
            metric(
                out,
                "process_virtual_memory_bytes",
                "gauge",
                "Virtual memory size in bytes.",
                vsz * 1024.0,
            );
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            // The directory handle itself is one of the entries; leave it out.
            let open = dir.count().saturating_sub(1);
            metric(
                out,
                "process_open_fds",
                "gauge",
                "Number of open file descriptors.",
                open as f64,
            );
        }
        if let Some(max) = max_open_files() {
            metric(
                out,
                "process_max_fds",
                "gauge",
                "Maximum number of open file descriptors.",
                max,
            );
        }
        if let (Some(start_ticks), Some(boot)) = (field(22), boot_time()) {
            metric(
                out,
                "process_start_time_seconds",
                "gauge",
                "Start time of the process since unix epoch in seconds.",
                boot + start_ticks / TICKS_PER_SECOND,
            );
        }
    }

    fn metric(out: &mut String, name: &str, kind: &str, help: &str, value: f64) {
        let _ = write!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n\n"
        );
    }

    /// A `kB` line of `/proc/self/status`.
    fn status_kib(key: &str) -> Option<f64> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find(|l| l.starts_with(key))?;
        line[key.len()..].split_whitespace().next()?.parse().ok()
    }

    /// The soft limit on open files, from `/proc/self/limits`.
    fn max_open_files() -> Option<f64> {
        let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
        let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
        line["Max open files".len()..]
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    /// Boot time in seconds since the epoch (`btime` in `/proc/stat`).
    fn boot_time() -> Option<f64> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        stat.lines()
            .find_map(|l| l.strip_prefix("btime "))?
            .trim()
            .parse()
            .ok()
    }

    #[cfg(all(test, target_os = "linux"))]
    mod tests {
        #[test]
        fn reads_this_process() {
            let mut out = String::new();
            super::render(&mut out);
            let values: Vec<f64> = out
                .lines()
                .filter(|l| !l.starts_with('#') && !l.is_empty())
                .map(|l| l.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap())
                .collect();
            // CPU, RSS, virtual size, open fds, start time, and max fds unless "unlimited".
            assert!(values.len() >= 5, "{out}");
            assert!(values.iter().all(|v| *v >= 0.0), "{out}");
            assert!(out.contains("# TYPE process_cpu_seconds_total counter\n"));
        }
    }
}
