//! Structured logs for `serve`: the server's events, through an [`Observer`], as `tracing`
//! events written to stderr by `tracing-subscriber`.
//!
//! | target | level | what |
//! |---|---|---|
//! | `mllp::server` | info | start (with the options in force), drain, stop |
//! | `mllp::conn` | info, warn | client authenticated (mTLS: `client_cert`, the certificate's CN, SANs and SHA-256 fingerprint); connection opened (at its first message); closed with peer, reason and duration (warn for timeouts, oversize, I/O errors, rejections) |
//! | `mllp::conn` | debug | connection accepted; a probe (a health check: connect, then close with no bytes or a PROXY header alone) |
//! | `mllp::msg` | warn | a NAK or a handler failure: connection, peer, sequence, reason, control id where known, detail |
//! | `mllp::msg` | debug | every message received and answered (off by default) |
//!
//! Two formats: `human`, one readable line per event, and `json`, one object per line with the
//! event's fields at the top level. The filter is `--log-level`, else `$RUST_LOG`, else `info`;
//! it takes a level (`warn`) or per-target levels (`info,mllp::msg=debug`).
//!
//! # Cost
//!
//! Observer methods run on the reactor thread, which serves every connection, so a log line must
//! never wait on stderr: lines go through a bounded queue to a writer thread, and when the queue
//! is full (stderr blocked, e.g. a stalled journal) lines are dropped and counted rather than
//! stalling the server. Per-message events are `debug`: below that level the observer asks the
//! server for each connection's first message only ([`Observer::message_events`]), so the
//! reactor builds no event for the others.

use std::fmt;
use std::io::{self, Write};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::thread;
use std::time::Duration;

use mllp_reactor::{
    CloseReason, ConnectionStart, ConnectionStop, MessageEvents, MessageException, MessageStart,
    MessageStop, Observer,
};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

use crate::error::{CliError, ValueError};

/// Log lines that may wait for the writer thread. At ~200 bytes a line that is 800 KiB at most;
/// a burst of thousands of connections closing at once still fits, and a stderr that stopped
/// draining costs dropped lines, not memory or latency.
const QUEUE_LINES: usize = 4096;

/// How long [`LogGuard`] waits at exit for the queued lines to be written.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// The filter when neither `--log-level` nor `$RUST_LOG` is set.
const DEFAULT_FILTER: &str = "info";

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One readable line per event: time, level, target, message, fields.
    Human,
    /// One JSON object per line.
    Json,
}

/// Keeps the writer thread; dropping it writes out what is queued (waiting at most
/// [`FLUSH_TIMEOUT`]).
#[derive(Debug)]
pub struct LogGuard {
    queue: SyncSender<Line>,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        let (done, flushed) = mpsc::sync_channel(1);
        if self.queue.send(Line::Flush(done)).is_ok() {
            let _ = flushed.recv_timeout(FLUSH_TIMEOUT);
        }
    }
}

/// Sets up logging to stderr for the rest of the process.
///
/// `level` is `--log-level` (checked by its parser already); without it `$RUST_LOG` is read,
/// and without that `info` applies.
///
/// # Errors
///
/// [`CliError::Flag`] or [`CliError::Env`] (usage errors) when the filter does not parse,
/// [`CliError::Setup`] when the writer thread cannot start.
pub fn init(format: LogFormat, level: Option<&str>) -> Result<LogGuard, CliError> {
    let filter = match level {
        Some(text) => parse_filter(text).map_err(|e| CliError::flag("--log-level", e))?,
        None => match std::env::var("RUST_LOG") {
            Ok(text) if !text.trim().is_empty() => {
                parse_filter(&text).map_err(|problem| CliError::Env {
                    var: "RUST_LOG",
                    problem,
                })?
            }
            _ => parse_filter(DEFAULT_FILTER).expect("the default filter parses"),
        },
    };
    let (queue, lines) = mpsc::sync_channel(QUEUE_LINES);
    let dropped = Arc::new(AtomicU64::new(0));
    let sink = QueueWriter {
        queue: queue.clone(),
        dropped: Arc::clone(&dropped),
    };
    thread::Builder::new()
        .name("log-writer".to_owned())
        .spawn(move || write_lines(&lines, &dropped, &mut io::stderr()))
        .map_err(|source| CliError::Setup {
            what: "the log writer thread",
            source,
        })?;
    let layer = match format {
        LogFormat::Human => tracing_subscriber::fmt::layer()
            .with_writer(sink)
            .with_ansi(false)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_writer(sink)
            .boxed(),
    };
    // Fails only when a global subscriber is set already; this is the one place that sets it,
    // and it runs once per process.
    let _ = Registry::default()
        .with(layer.with_filter(filter))
        .try_init();
    Ok(LogGuard { queue })
}

/// Parses a filter: `level` or `target=level` items separated by commas.
///
/// A bare word must be a level: `Targets` alone would read `loud` as "everything from the
/// target `loud`", which silently logs nothing else.
pub fn parse_filter(text: &str) -> Result<Targets, ValueError> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let level = item.rsplit_once('=').map_or(item, |(_, level)| level);
        if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(ValueError::LogLevel(level.to_owned()));
        }
    }
    Targets::from_str(text.trim()).map_err(|e| ValueError::LogFilter(e.to_string()))
}

/// What the writer thread gets.
enum Line {
    Text(Vec<u8>),
    /// Reply once everything before it is written.
    Flush(SyncSender<()>),
}

/// Writes queued lines until every sender is gone; reports lines dropped since the last write.
fn write_lines(lines: &Receiver<Line>, dropped: &AtomicU64, out: &mut impl Write) {
    for line in lines {
        match line {
            Line::Text(text) => {
                let _ = out.write_all(&text);
                let lost = dropped.swap(0, Ordering::Relaxed);
                if lost > 0 {
                    let _ = writeln!(out, "(log queue full: {lost} lines dropped)");
                }
            }
            Line::Flush(done) => {
                let _ = out.flush();
                let _ = done.send(());
            }
        }
    }
}

/// The subscriber's writer: each event's text goes to the queue as one line, never blocking.
#[derive(Clone, Debug)]
struct QueueWriter {
    queue: SyncSender<Line>,
    dropped: Arc<AtomicU64>,
}

/// One event being formatted; sent when the subscriber is done with it.
struct EventWriter<'a> {
    sink: &'a QueueWriter,
    text: Vec<u8>,
}

impl<'a> MakeWriter<'a> for QueueWriter {
    type Writer = EventWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        EventWriter {
            sink: self,
            text: Vec::new(),
        }
    }
}

impl Write for EventWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.text.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for EventWriter<'_> {
    fn drop(&mut self) {
        if self.text.is_empty() {
            return;
        }
        let text = std::mem::take(&mut self.text);
        match self.sink.queue.try_send(Line::Text(text)) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full(_)) => {
                self.sink.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// A duration as logged: three significant decimals in the largest fitting unit (`1.503s`,
/// `250.000ms`, `12.400µs`).
struct Elapsed(Duration);

impl fmt::Display for Elapsed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.3?}", self.0)
    }
}

/// Logs the server's events; see the [module docs](self).
#[derive(Debug, Default)]
pub struct LogObserver;

impl Observer for LogObserver {
    fn connection_start(&self, e: &ConnectionStart) {
        match &e.peer_identity {
            // mTLS: who the client is, from its verified certificate (CN, SANs, fingerprint).
            // A verified certificate is no health check: say so at once.
            Some(client) => tracing::info!(
                target: "mllp::conn",
                conn = %e.connection,
                peer = %e.peer,
                local = %e.local,
                client_cert = %client,
                "client authenticated"
            ),
            // At debug: a health check connects every few seconds and sends nothing. The
            // info line comes with the first message (`message_start`).
            None => tracing::debug!(
                target: "mllp::conn",
                conn = %e.connection,
                peer = %e.peer,
                local = %e.local,
                "connection accepted"
            ),
        }
    }

    fn connection_stop(&self, e: &ConnectionStop) {
        let reason = e.reason.as_str();
        let duration = Elapsed(e.duration);
        match e.reason {
            // Connected and left without a byte (or with a PROXY header alone): a balancer's
            // health check every few seconds, not a problem, however it ended (HAProxy's end
            // with a reset).
            CloseReason::Probe => tracing::debug!(
                target: "mllp::conn",
                conn = %e.connection,
                peer = %e.peer,
                reason,
                duration = %duration,
                "connection probed"
            ),
            CloseReason::PeerClosed
            | CloseReason::IdleTimeout
            | CloseReason::Shutdown
            | CloseReason::ClosedByHandler => tracing::info!(
                target: "mllp::conn",
                conn = %e.connection,
                peer = %e.peer,
                reason,
                duration = %duration,
                "connection closed"
            ),
            _ => tracing::warn!(
                target: "mllp::conn",
                conn = %e.connection,
                peer = %e.peer,
                reason,
                detail = %e.reason,
                duration = %duration,
                "connection closed"
            ),
        }
    }

    fn message_start(&self, e: &MessageStart) {
        if e.sequence == 0 {
            tracing::info!(
                target: "mllp::conn",
                conn = %e.connection,
                peer = %e.peer,
                local = %e.local,
                "connection opened"
            );
        }
        tracing::debug!(
            target: "mllp::msg",
            conn = %e.connection,
            peer = %e.peer,
            seq = e.sequence,
            size = e.message_size,
            "message received"
        );
    }

    fn message_stop(&self, e: &MessageStop) {
        tracing::debug!(
            target: "mllp::msg",
            conn = %e.connection,
            peer = %e.peer,
            seq = e.sequence,
            duration = %Elapsed(e.duration),
            response_size = e.response_size,
            "message answered"
        );
    }

    /// Every message's start and stop only when `mllp::msg` logs at debug; otherwise only each
    /// connection's first message (its info line "connection opened"). Asked once, when the
    /// server is bound, after [`init`] has set the filter (which does not change afterwards):
    /// at the default level the reactor then builds no per-message event at all.
    fn message_events(&self) -> MessageEvents {
        if tracing::enabled!(target: "mllp::msg", tracing::Level::DEBUG) {
            MessageEvents::All
        } else {
            MessageEvents::FirstStart
        }
    }

    fn message_exception(&self, e: &MessageException<'_>) {
        tracing::warn!(
            target: "mllp::msg",
            conn = %e.connection,
            peer = %e.peer,
            seq = e.sequence,
            reason = e.reason.as_str(),
            size = e.message_size,
            duration = %Elapsed(e.duration),
            control_id = %String::from_utf8_lossy(e.control_id.unwrap_or_default()),
            detail = e.detail.unwrap_or(""),
            "message failed"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_parse_and_errors_name_the_syntax() {
        assert!(parse_filter("info").is_ok());
        assert!(parse_filter("warn,mllp::msg=debug").is_ok());
        let e = parse_filter("loud").unwrap_err().to_string();
        assert!(e.contains("\"loud\"") && e.contains("debug"), "{e}");
        assert!(parse_filter("mllp::msg=chatty").is_err());
    }

    #[test]
    fn writer_thread_writes_in_order_and_reports_drops() {
        let (queue, lines) = mpsc::sync_channel(8);
        let dropped = AtomicU64::new(0);
        queue.send(Line::Text(b"one\n".to_vec())).unwrap();
        dropped.store(3, Ordering::Relaxed);
        queue.send(Line::Text(b"two\n".to_vec())).unwrap();
        drop(queue);
        let mut out = Vec::new();
        write_lines(&lines, &dropped, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "one\n(log queue full: 3 lines dropped)\ntwo\n"
        );
    }

    #[test]
    fn a_full_queue_drops_instead_of_blocking() {
        let (queue, _lines) = mpsc::sync_channel(1);
        let sink = QueueWriter {
            queue,
            dropped: Arc::new(AtomicU64::new(0)),
        };
        for _ in 0..3 {
            let mut w = sink.make_writer();
            w.write_all(b"line\n").unwrap();
        }
        assert_eq!(sink.dropped.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn elapsed_keeps_three_decimals() {
        assert_eq!(Elapsed(Duration::from_millis(1503)).to_string(), "1.503s");
        assert_eq!(Elapsed(Duration::ZERO).to_string(), "0.000ns");
    }
}
