//! The command line: clap's definitions of every subcommand and flag, and the parsers that
//! check each value as it is read, so that a bad value is a usage error (exit 2) before
//! anything is opened, created or bound. Nothing here acts on a value.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use mllp_store::StoreSpec;

use crate::error::ValueError;
use crate::forward::{ForwardArgs, ForwardFlags};
use crate::health::HealthArgs;
use crate::integrity::CheckArgs;
use crate::logging::LogFormat;
use crate::parse::{TypedDuration, parse_duration, parse_timeout, parse_typed_duration};
use crate::resend::ResendArgs;
use crate::retention::{PruneArgs, RetainArgs};
use crate::search::SearchArgs;

/// The store `serve` uses without `--store`: relative, so it lands in `$STATE_DIRECTORY`
/// under systemd and in the working directory otherwise.
pub const DEFAULT_STORE: &str = "mllp-reactor.db";

/// `--proxy-protocol`: which PROXY header versions to accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProxyArg {
    V1,
    V2,
    Any,
}

/// `--dispatch`: where the handler runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DispatchArg {
    Inline,
    Pool,
}

#[derive(Debug, Parser)]
#[command(
    name = "mllp-reactor",
    version,
    about = "MLLP (HL7 v2 over TCP) receiver tools"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once per process and moved out at once: the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run an MLLP server that stores every message, then answers AA (AR for anything
    /// without a readable MSH-10); Ctrl-C / SIGTERM drain gracefully.
    ///
    /// Durations are written with a unit: 500ms, 60s, 5m, 1h, 1.5s.
    // A flag given twice takes the last value: `--config` puts the file's values first, so the
    // command line overrides them.
    #[command(args_override_self = true)]
    Serve(ServeArgs),
    /// Send HL7 messages from files (or stdin) and print one line per ACK.
    Send(SendArgs),
    /// Drive an MLLP server with ADT^A01 messages and verify every ACK.
    Bench(BenchArgs),
    /// Write the messages of a store to stdout, in store order (works while serve runs).
    Export(ExportArgs),
    /// Store and forward: show the delivery state, requeue dead letters.
    Forward(ForwardArgs),
    /// Remove messages older than a period from a store now (works while serve runs).
    Prune(PruneArgs),
    /// Find stored messages by control id, sender, type, patient, time or status (works
    /// while serve runs).
    Search(SearchArgs),
    /// Check a store for damage (SQLite integrity_check); exit 1 if it is damaged.
    Check(CheckArgs),
    /// Send stored messages again (by id, or --query with search's filters), check every
    /// ACK, and record who resent what, when, and the result in the store.
    Resend(ResendArgs),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Read options from a TOML file whose keys are these flags without `--`
    /// (e.g. `max-message-size = 1048576`, `idle-timeout = "5m"`); flags given here override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to listen on (IPv4 or IPv6, host name or address, port 0 for any free port).
    #[arg(long, default_value = "127.0.0.1:2575", value_name = "ADDR")]
    pub listen: String,
    /// Close a connection that sends nothing for this long.
    #[arg(long, default_value = "60s", value_name = "DURATION", value_parser = parse_timeout)]
    pub idle_timeout: TypedDuration,
    /// Give up on a handler call after this long (the sender gets an AE).
    #[arg(long, default_value = "60s", value_name = "DURATION", value_parser = parse_timeout)]
    pub handler_timeout: TypedDuration,
    /// Close a connection whose started frame is not complete within this long.
    #[arg(long, default_value = "120s", value_name = "DURATION", value_parser = parse_timeout)]
    pub frame_timeout: TypedDuration,
    /// Largest message payload accepted, in bytes (larger: AR NAK and close).
    #[arg(long, default_value_t = 10_485_760, value_name = "BYTES", value_parser = parse_max_message_size)]
    pub max_message_size: usize,
    /// Most connections open at once (more are accepted and closed at once).
    #[arg(long, default_value_t = 10_000, value_name = "N", value_parser = parse_max_connections)]
    pub max_connections: usize,
    /// Handler threads, 1 to 1024 (default: available parallelism).
    #[arg(long, value_name = "N", value_parser = parse_workers)]
    pub workers: Option<usize>,
    /// Serve Prometheus metrics on this address (http://ADDR/metrics).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    /// How long Ctrl-C / SIGTERM waits for in-flight messages (0s: close at once).
    #[arg(long, default_value = "10s", value_name = "DURATION", value_parser = parse_typed_duration)]
    pub grace: TypedDuration,
    /// Where the ACK is built: `inline` on the I/O thread (fastest; the handler never
    /// blocks) or `pool` on a worker thread (what a blocking handler needs).
    #[arg(long, default_value = "inline", value_name = "inline|pool")]
    pub dispatch: DispatchArg,
    /// Messages per connection read and handled before earlier replies are written
    /// (default: 64 inline, 1 pool).
    #[arg(long, value_name = "N", value_parser = parse_max_in_flight)]
    pub max_in_flight: Option<usize>,
    /// Server-wide budget for buffered bytes; above it reading pauses.
    #[arg(long, default_value_t = mllp_reactor::DEFAULT_MAX_MEMORY, value_name = "BYTES", value_parser = parse_max_memory)]
    pub max_memory: usize,
    /// Reactor threads (poll loops); connections are spread over them by load.
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = parse_reactors)]
    pub reactors: usize,
    /// Require a PROXY protocol header (from HAProxy's send-proxy[-v2]) on every connection;
    /// needs --proxy-source.
    #[arg(long, value_name = "v1|v2|any", requires = "proxy_sources")]
    pub proxy_protocol: Option<ProxyArg>,
    /// With --proxy-protocol: trust headers only from this balancer CIDR (repeatable; required,
    /// 0.0.0.0/0 and ::/0 trust anyone). --allow must list the balancers too.
    #[arg(
        long = "proxy-source",
        value_name = "CIDR",
        requires = "proxy_protocol"
    )]
    pub proxy_sources: Vec<mllp_reactor::cidr::Cidr>,
    /// Accept connections only from this CIDR, IPv4 or IPv6 (repeatable; default: anyone).
    #[arg(long = "allow", value_name = "CIDR")]
    pub allow: Vec<mllp_reactor::cidr::Cidr>,
    /// Serve TLS with this certificate chain (PEM); needs --tls-key. SIGHUP reloads the files.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by a CA in this bundle (PEM): mutual TLS.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Most TLS handshakes in progress at once (default 256); more wait, unread, for one to
    /// finish. Each holds at most 32 KiB of the client's handshake.
    #[arg(long, value_name = "N", requires = "tls_cert", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_handshakes: Option<u32>,
    /// Log format on stderr: human (one readable line per event) or json (one object per line).
    #[arg(long, value_enum, default_value_t = LogFormat::Human, value_name = "FORMAT")]
    pub log_format: LogFormat,
    /// Log filter: error, warn, info, debug or trace, optionally per target
    /// (e.g. `info,mllp::msg=debug`). Default: $RUST_LOG, else info. debug logs every message.
    #[arg(long, value_name = "FILTER", value_parser = parse_log_filter)]
    pub log_level: Option<String>,
    /// Store every message before its AA: in this SQLite file (created if missing), or in
    /// PostgreSQL with postgres://USER@HOST:PORT/DB (schema created on first use; password
    /// from PGPASSWORD; several nodes may share one database).
    /// A relative path is taken from $STATE_DIRECTORY when systemd sets it (StateDirectory=),
    /// else from the working directory.
    #[arg(long, default_value = DEFAULT_STORE, value_name = "PATH|URL", value_parser = StoreSpec::parse)]
    pub store: StoreSpec,
    /// Do not store messages: AA straight away (the ACK-only server, for benchmarks).
    #[arg(long, conflicts_with = "store")]
    pub no_store: bool,
    /// Start even if PostgreSQL has synchronous_commit=off (or fsync=off): an AA may then
    /// be lost if the database server crashes.
    #[arg(long, conflicts_with = "no_store")]
    pub allow_async_commit: bool,
    #[command(flatten)]
    pub forward: ForwardFlags,
    #[command(flatten)]
    pub retention: RetainArgs,
    #[command(flatten)]
    pub health: HealthArgs,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The store (as given to serve --store): an SQLite file or a postgres:// URL.
    #[arg(value_name = "STORE", value_parser = StoreSpec::parse)]
    pub store: StoreSpec,
    /// Only messages with a store id greater than this.
    #[arg(long, default_value_t = 0, value_name = "ID")]
    pub since: i64,
    /// jsonl (one JSON object per message) or hl7 (segments as lines).
    #[arg(long, default_value = "jsonl", value_name = "FORMAT")]
    pub format: mllp_store::export::Format,
}

#[derive(Debug, Args)]
pub struct SendArgs {
    /// Server address, e.g. 127.0.0.1:2575.
    #[arg(value_name = "ADDR")]
    pub addr: String,
    /// Files holding one or more messages (`-` or none: standard input).
    #[arg(value_name = "FILE")]
    pub files: Vec<String>,
    /// Messages in flight at once, 1 to 65536 (each ACK is still matched to its message).
    #[arg(long, default_value_t = 1, value_name = "K", value_parser = parse_pipeline)]
    pub pipeline: usize,
    /// Deadline for each ACK (e.g. 500ms, 30s, 2m), greater than zero.
    #[arg(long, default_value = "30s", value_name = "DURATION", value_parser = parse_positive_duration)]
    pub timeout: Duration,
    #[command(flatten)]
    pub tls: TlsClientArgs,
}

/// The client side's TLS flags, shared by `send` and `bench`.
#[derive(Debug, Args)]
pub struct TlsClientArgs {
    /// Connect with TLS, trusting the CAs in this bundle (PEM).
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate chain (PEM) for mutual TLS; needs --tls-key and --tls-ca.
    #[arg(long, value_name = "FILE", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The name to verify the server's certificate against (default: the address's host).
    #[arg(long, value_name = "NAME", requires = "tls_ca")]
    pub tls_server_name: Option<String>,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Server address, e.g. 127.0.0.1:2575 or mllp.example:2575 (default: an in-process
    /// server on a free port).
    #[arg(long, value_name = "ADDR")]
    pub to: Option<String>,
    /// Active connections (one thread each).
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = parse_bench_conns)]
    pub conns: usize,
    /// Messages in flight per connection.
    #[arg(long, default_value_t = 1, value_name = "K", value_parser = parse_pipeline)]
    pub pipeline: usize,
    /// Approximate payload bytes per message.
    #[arg(long, default_value_t = 1024, value_name = "BYTES")]
    pub size: usize,
    /// Measurement window, e.g. 500ms, 10s, 2m.
    #[arg(long, default_value = "10s", value_name = "DURATION", value_parser = parse_positive_duration)]
    pub duration: Duration,
    /// Load before the window that is verified but not counted (e.g. 500ms, 1s).
    #[arg(long, default_value = "1s", value_name = "DURATION", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Idle connections to open (and serve once) before the run; needs --server-pid for RSS.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub idle: usize,
    /// Server process id: enables RSS per idle connection and server CPU in the report.
    #[arg(long, value_name = "PID")]
    pub server_pid: Option<u32>,
    /// Print the report as one JSON line on stdout.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub tls: TlsClientArgs,
}

/// A duration greater than zero.
fn parse_positive_duration(text: &str) -> Result<Duration, ValueError> {
    parse_timeout(text).map(|typed| typed.value)
}

/// Most connections `--max-connections` accepts: one million, each an open file; a process
/// rarely may hold more (see `ulimit -n`).
pub const MAX_CONNECTIONS: usize = 1_000_000;

/// A count within `1..=max`.
fn parse_count(text: &str, max: usize) -> Result<usize, ValueError> {
    match text.trim().parse::<u128>() {
        Ok(n) if (1..=max as u128).contains(&n) => Ok(n as usize),
        Ok(n) => Err(ValueError::OutOfRange {
            value: n,
            min: 1,
            max: max as u128,
        }),
        Err(_) => Err(ValueError::NotWholeNumber),
    }
}

/// `--workers`: up to the library's [`mllp_reactor::MAX_WORKERS`] (1024), checked here so that
/// the error names the flag and comes before anything listens.
fn parse_workers(text: &str) -> Result<usize, ValueError> {
    parse_count(text, mllp_reactor::MAX_WORKERS)
}

fn parse_max_in_flight(text: &str) -> Result<usize, ValueError> {
    parse_count(text, mllp_reactor::MAX_IN_FLIGHT_LIMIT)
}

fn parse_max_connections(text: &str) -> Result<usize, ValueError> {
    parse_count(text, MAX_CONNECTIONS)
}

fn parse_max_message_size(text: &str) -> Result<usize, ValueError> {
    parse_count(text, mllp_reactor::MAX_MESSAGE_SIZE_LIMIT)
}

fn parse_reactors(text: &str) -> Result<usize, ValueError> {
    parse_count(text, mllp_reactor::MAX_REACTORS)
}

/// `--max-memory`: a byte count a buffer can hold (at most `isize::MAX`; the lower bound,
/// twice `--max-message-size`, is checked once both are known).
fn parse_max_memory(text: &str) -> Result<usize, ValueError> {
    parse_count(text, isize::MAX as usize)
}

/// `send --pipeline` and `bench --pipeline`: the library's cap on messages in flight.
fn parse_pipeline(text: &str) -> Result<usize, ValueError> {
    parse_count(text, mllp_reactor::MAX_IN_FLIGHT_LIMIT)
}

fn parse_bench_conns(text: &str) -> Result<usize, ValueError> {
    parse_count(text, crate::loadgen::MAX_CONNECTIONS)
}

/// `--log-level`: checked now, so a typo is a usage error; kept as text for the logger.
fn parse_log_filter(text: &str) -> Result<String, ValueError> {
    crate::logging::parse_filter(text)?;
    Ok(text.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positive_durations() {
        assert_eq!(
            parse_positive_duration("1.5s").unwrap(),
            Duration::from_millis(1_500)
        );
        assert!(parse_positive_duration("0s").is_err());
    }

    #[test]
    fn counts_are_range_checked() {
        assert_eq!(parse_reactors("2").unwrap(), 2);
        assert!(parse_reactors("0").is_err());
        assert!(parse_max_memory("0").is_err());
        assert!(parse_max_memory("9223372036854775808").is_err());
        assert!(parse_max_memory("99999999999999999999999").is_err());
        assert!(parse_pipeline("0").is_err());
        let e = parse_count("7", 5).unwrap_err().to_string();
        assert_eq!(e, "7 is out of range: must be between 1 and 5");
    }

    #[test]
    fn cli_definition_is_valid() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
