//! `mllp-reactor`: the command-line tool. One function per subcommand; `main` only parses and
//! dispatches, and turns every error into one line on stderr and a non-zero exit.
// A binary (or test/example root): `pub` inside it only ever means crate-visible.
#![allow(unreachable_pub)]

mod addr;
mod config;
mod export;
mod forward;
mod health;
mod integrity;
mod loadgen;
mod logging;
mod parse;
mod prometheus;
mod resend;
mod retention;
mod search;
mod send;
mod serve;
mod store_glue;
mod units;

use std::fmt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};

use crate::loadgen::LoadConfig;
use crate::logging::LogFormat;
use crate::parse::parse_duration;

/// Exit status for errors found while running.
const EXIT_FAILURE: u8 = 1;
/// Exit status for bad command-line usage (clap's and sysexits' convention).
const EXIT_USAGE: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "mllp-reactor",
    version,
    about = "MLLP (HL7 v2 over TCP) receiver tools"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process and moved out at once: the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
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
    Forward(forward::ForwardArgs),
    /// Remove messages older than a period from a store now (works while serve runs).
    Prune(retention::PruneArgs),
    /// Find stored messages by control id, sender, type, patient, time or status (works
    /// while serve runs).
    Search(search::SearchArgs),
    /// Check a store for damage (SQLite integrity_check); exit 1 if it is damaged.
    Check(integrity::CheckArgs),
    /// Send stored messages again (by id, or --query with search's filters), check every
    /// ACK, and record who resent what, when, and the result in the store.
    Resend(resend::ResendArgs),
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Read options from a TOML file whose keys are these flags without `--`
    /// (e.g. `max-message-size = 1048576`, `idle-timeout = "5m"`); flags given here override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to listen on (IPv4 or IPv6, host name or address, port 0 for any free port).
    #[arg(long, default_value = "127.0.0.1:2575", value_name = "ADDR")]
    listen: String,
    /// Close a connection that sends nothing for this long.
    #[arg(long, default_value = "60s", value_name = "DURATION", value_parser = parse_timeout)]
    idle_timeout: TypedDuration,
    /// Give up on a handler call after this long (the sender gets an AE).
    #[arg(long, default_value = "60s", value_name = "DURATION", value_parser = parse_timeout)]
    handler_timeout: TypedDuration,
    /// Close a connection whose started frame is not complete within this long.
    #[arg(long, default_value = "120s", value_name = "DURATION", value_parser = parse_timeout)]
    frame_timeout: TypedDuration,
    /// Largest message payload accepted, in bytes (larger: AR NAK and close).
    #[arg(long, default_value_t = 10_485_760, value_name = "BYTES", value_parser = parse_max_message_size)]
    max_message_size: usize,
    /// Most connections open at once (more are accepted and closed at once).
    #[arg(long, default_value_t = 10_000, value_name = "N", value_parser = parse_max_connections)]
    max_connections: usize,
    /// Handler threads, 1 to 1024 (default: available parallelism).
    #[arg(long, value_name = "N", value_parser = parse_workers)]
    workers: Option<usize>,
    /// Serve Prometheus metrics on this address (http://ADDR/metrics).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
    /// How long Ctrl-C / SIGTERM waits for in-flight messages (0s: close at once).
    #[arg(long, default_value = "10s", value_name = "DURATION", value_parser = parse_typed_duration)]
    grace: TypedDuration,
    /// Where the ACK is built: `inline` on the I/O thread (fastest; the handler never
    /// blocks) or `pool` on a worker thread (what a blocking handler needs).
    #[arg(long, default_value = "inline", value_name = "inline|pool")]
    dispatch: serve::DispatchArg,
    /// Messages per connection read and handled before earlier replies are written
    /// (default: 64 inline, 1 pool).
    #[arg(long, value_name = "N", value_parser = parse_max_in_flight)]
    max_in_flight: Option<usize>,
    /// Server-wide budget for buffered bytes; above it reading pauses.
    #[arg(long, default_value_t = mllp_reactor::DEFAULT_MAX_MEMORY, value_name = "BYTES")]
    max_memory: usize,
    /// Reactor threads (poll loops); connections are spread over them by load.
    #[arg(long, default_value_t = 1, value_name = "N")]
    reactors: usize,
    /// Require a PROXY protocol header (from HAProxy's send-proxy[-v2]) on every connection;
    /// needs --proxy-source.
    #[arg(long, value_name = "v1|v2|any", requires = "proxy_sources")]
    proxy_protocol: Option<serve::ProxyArg>,
    /// With --proxy-protocol: trust headers only from this balancer CIDR (repeatable; required,
    /// 0.0.0.0/0 and ::/0 trust anyone). --allow must list the balancers too.
    #[arg(
        long = "proxy-source",
        value_name = "CIDR",
        requires = "proxy_protocol"
    )]
    proxy_sources: Vec<mllp_reactor::cidr::Cidr>,
    /// Accept connections only from this CIDR, IPv4 or IPv6 (repeatable; default: anyone).
    #[arg(long = "allow", value_name = "CIDR")]
    allow: Vec<mllp_reactor::cidr::Cidr>,
    /// Serve TLS with this certificate chain (PEM); needs --tls-key. SIGHUP reloads the files.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require client certificates signed by a CA in this bundle (PEM): mutual TLS.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Most TLS handshakes in progress at once (default 256); more wait, unread, for one to
    /// finish. Each holds at most 32 KiB of the client's handshake.
    #[arg(long, value_name = "N", requires = "tls_cert", value_parser = clap::value_parser!(u32).range(1..))]
    max_handshakes: Option<u32>,
    /// Log format on stderr: human (one readable line per event) or json (one object per line).
    #[arg(long, value_enum, default_value_t = LogFormat::Human, value_name = "FORMAT")]
    log_format: LogFormat,
    /// Log filter: error, warn, info, debug or trace, optionally per target
    /// (e.g. `info,mllp::msg=debug`). Default: $RUST_LOG, else info. debug logs every message.
    #[arg(long, value_name = "FILTER")]
    log_level: Option<String>,
    /// Store every message before its AA: in this SQLite file (created if missing), or in
    /// PostgreSQL with postgres://USER@HOST:PORT/DB (schema created on first use; password
    /// from PGPASSWORD; several nodes may share one database).
    #[arg(long, default_value = "./mllp-reactor.db", value_name = "PATH|URL")]
    store: String,
    /// Do not store messages: AA straight away (the ACK-only server, for benchmarks).
    #[arg(long, conflicts_with = "store")]
    no_store: bool,
    /// Start even if PostgreSQL has synchronous_commit=off (or fsync=off): an AA may then
    /// be lost if the database server crashes.
    #[arg(long, conflicts_with = "no_store")]
    allow_async_commit: bool,
    #[command(flatten)]
    forward: forward::ForwardFlags,
    #[command(flatten)]
    retention: retention::RetainArgs,
    #[command(flatten)]
    health: health::HealthArgs,
}

#[derive(Debug, Args)]
struct ExportArgs {
    /// The store (as given to serve --store): an SQLite file or a postgres:// URL.
    #[arg(value_name = "STORE")]
    store: String,
    /// Only messages with a store id greater than this.
    #[arg(long, default_value_t = 0, value_name = "ID")]
    since: i64,
    /// jsonl (one JSON object per message) or hl7 (segments as lines).
    #[arg(long, default_value = "jsonl", value_name = "FORMAT")]
    format: mllp_store::export::Format,
}

#[derive(Debug, Args)]
struct SendArgs {
    /// Server address, e.g. 127.0.0.1:2575.
    #[arg(value_name = "ADDR")]
    addr: String,
    /// Files holding one or more messages (`-` or none: standard input).
    #[arg(value_name = "FILE")]
    files: Vec<String>,
    /// Messages in flight at once (each ACK is still matched to its message).
    #[arg(long, default_value_t = 1, value_name = "K")]
    pipeline: usize,
    /// Deadline for each ACK (e.g. 500ms, 30s, 2m).
    #[arg(long, default_value = "30s", value_name = "DURATION", value_parser = parse_duration)]
    timeout: Duration,
    #[command(flatten)]
    tls: TlsClientArgs,
}

/// The client side's TLS flags, shared by `send` and `bench`.
#[derive(Debug, Args)]
struct TlsClientArgs {
    /// Connect with TLS, trusting the CAs in this bundle (PEM).
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// Client certificate chain (PEM) for mutual TLS; needs --tls-key and --tls-ca.
    #[arg(long, value_name = "FILE", requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The name to verify the server's certificate against (default: the address's host).
    #[arg(long, value_name = "NAME", requires = "tls_ca")]
    tls_server_name: Option<String>,
}

#[derive(Debug, Args)]
struct BenchArgs {
    /// Server address, e.g. 127.0.0.1:2575 or mllp.example:2575 (default: an in-process
    /// server on a free port).
    #[arg(long, value_name = "ADDR")]
    to: Option<String>,
    /// Active connections (one thread each).
    #[arg(long, default_value_t = 1, value_name = "N")]
    conns: usize,
    /// Messages in flight per connection.
    #[arg(long, default_value_t = 1, value_name = "K")]
    pipeline: usize,
    /// Approximate payload bytes per message.
    #[arg(long, default_value_t = 1024, value_name = "BYTES")]
    size: usize,
    /// Measurement window, e.g. 500ms, 10s, 2m.
    #[arg(long, default_value = "10s", value_name = "DURATION", value_parser = parse_duration)]
    duration: Duration,
    /// Load before the window that is verified but not counted (e.g. 500ms, 1s).
    #[arg(long, default_value = "1s", value_name = "DURATION", value_parser = parse_duration)]
    warmup: Duration,
    /// Idle connections to open (and serve once) before the run; needs --server-pid for RSS.
    #[arg(long, default_value_t = 0, value_name = "N")]
    idle: usize,
    /// Server process id: enables RSS per idle connection and server CPU in the report.
    #[arg(long, value_name = "PID")]
    server_pid: Option<u32>,
    /// Print the report as one JSON line on stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    tls: TlsClientArgs,
}

fn main() -> ExitCode {
    let args = match config::expand(std::env::args_os().collect()) {
        Ok(args) => args,
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => return usage_error(&e),
    };
    let result = match cli.command {
        Command::Serve(args) => serve::serve(&serve::ServeOptions {
            config: args.config,
            listen: args.listen,
            idle_timeout: args.idle_timeout,
            handler_timeout: args.handler_timeout,
            frame_timeout: args.frame_timeout,
            max_message_size: args.max_message_size,
            max_connections: args.max_connections,
            workers: args.workers,
            metrics: args.metrics,
            grace: args.grace,
            dispatch: args.dispatch,
            max_in_flight: args.max_in_flight,
            max_memory: args.max_memory,
            reactors: args.reactors,
            proxy_protocol: args.proxy_protocol,
            proxy_sources: args.proxy_sources,
            allow: args.allow,
            tls_cert: args.tls_cert,
            tls_key: args.tls_key,
            tls_client_ca: args.tls_client_ca,
            max_handshakes: args.max_handshakes,
            log_format: args.log_format,
            log_level: args.log_level,
            store: (!args.no_store).then_some(args.store),
            allow_async_commit: args.allow_async_commit,
            forward: args.forward,
            retention: args.retention,
            health: args.health,
        }),
        Command::Send(args) => {
            let opts = send::SendOptions {
                addr: args.addr,
                files: args.files,
                pipeline: args.pipeline,
                timeout: args.timeout,
                tls_ca: args.tls.tls_ca,
                tls_cert: args.tls.tls_cert,
                tls_key: args.tls.tls_key,
                tls_server_name: args.tls.tls_server_name,
            };
            match send::send(&opts) {
                Ok(true) => Ok(()),
                Ok(false) => return ExitCode::from(EXIT_FAILURE), // a NAK: printed already
                Err(e) => Err(e),
            }
        }
        Command::Bench(args) => bench(&args),
        Command::Forward(args) => forward::run(&args),
        Command::Export(args) => export::export(&export::ExportOptions {
            store: args.store,
            since: args.since,
            format: args.format,
        }),
        Command::Prune(args) => retention::prune(&args),
        Command::Search(args) => search::search(&args),
        Command::Resend(args) => match resend::resend(&args) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::from(EXIT_FAILURE),
            Err(e) => Err(e),
        },
        Command::Check(args) => match integrity::check(&args) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::from(EXIT_FAILURE),
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// Prints help and version as clap does; squeezes every real usage error into one line.
fn usage_error(error: &clap::Error) -> ExitCode {
    match one_line(error) {
        Some(line) => {
            eprintln!("{line}");
            ExitCode::from(EXIT_USAGE)
        }
        None => {
            // Printing help can only fail if stdout is gone; nothing useful is left to do then.
            let _ = error.print();
            ExitCode::from(if error.use_stderr() { EXIT_USAGE } else { 0 })
        }
    }
}

/// A clap error as one line (`error: ...`, without the usage and the hint), or `None` for
/// help and version output, which is not an error.
fn one_line(error: &clap::Error) -> Option<String> {
    use clap::error::ErrorKind;
    if matches!(
        error.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        return None;
    }
    let text = error.to_string();
    Some(
        text.lines()
            .map(str::trim)
            .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" "),
    )
}

/// `mllp-reactor bench`: runs the load generator, prints progress to stderr and the report to
/// stdout.
fn bench(args: &BenchArgs) -> Result<(), String> {
    if args.idle > 0 && args.server_pid.is_none() {
        eprintln!("note: --idle without --server-pid: RSS per idle connection is not measured");
    }
    // Without --to, measure an in-process server (AA via the ACK builder).
    let in_process = match args.to {
        Some(_) => None,
        None => Some(
            mllp_reactor::Server::builder(mllp_reactor::handler_fn(|msg, _cx| {
                Ok(mllp_reactor::Reply::Send(mllp_reactor::ack::accept(msg)))
            }))
            .bind("127.0.0.1:0")
            .and_then(|s| s.spawn())
            .map_err(|e| format!("cannot start the in-process server: {e}"))?,
        ),
    };
    let addr = match (&in_process, &args.to) {
        (Some(server), _) => server.local_addr(),
        (None, Some(to)) => addr::resolve(to).map_err(|e| format!("--to {e}"))?,
        (None, None) => unreachable!("one of the two is set above"),
    };
    let cfg = LoadConfig {
        addr,
        conns: args.conns,
        pipeline: args.pipeline,
        size: args.size,
        duration: args.duration,
        warmup: args.warmup,
        idle_conns: args.idle,
        server_pid: args.server_pid,
        tls: send::tls_from_flags(
            args.tls.tls_ca.as_deref(),
            args.tls.tls_cert.as_deref(),
            args.tls.tls_key.as_deref(),
            args.tls.tls_server_name.as_deref(),
            args.to.as_deref().unwrap_or_default(),
        )?,
    };
    let started = Instant::now();
    let progress = |acked: u64| {
        eprintln!(
            "[{:>5.1}s] {acked} messages acked (AA with the right MSA-2)",
            started.elapsed().as_secs_f64()
        );
    };
    let report = loadgen::run(&cfg, Some(&progress)).map_err(|e| e.to_string());
    if let Some(server) = in_process {
        let _ = server.shutdown(Duration::from_secs(5));
    }
    let report = report?;
    if args.json {
        println!("{}", report.to_json());
    } else {
        println!("{report}");
    }
    if report.errors > 0 {
        // Any error fails the run: a benchmark that measured NAKs or timeouts measured
        // something other than what it claims.
        return Err(format!(
            "{} errors during the run ({})",
            report.errors,
            report.error_counts.kinds()
        ));
    }
    Ok(())
}

/// A duration as the user typed it: compared and used as a [`Duration`], printed as typed (so
/// `--grace 0s` prints `0s`, not `0ns`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypedDuration {
    /// The value.
    pub value: Duration,
    /// The text it was parsed from, trimmed.
    pub text: String,
}

impl fmt::Display for TypedDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// [`parse_duration`], keeping the text.
fn parse_typed_duration(text: &str) -> Result<TypedDuration, String> {
    Ok(TypedDuration {
        value: parse_duration(text)?,
        text: text.trim().to_owned(),
    })
}

/// A timeout: a duration greater than zero (zero would close every connection at once).
fn parse_timeout(text: &str) -> Result<TypedDuration, String> {
    let typed = parse_typed_duration(text)?;
    if typed.value.is_zero() {
        return Err("must be greater than zero".to_owned());
    }
    Ok(typed)
}

/// Most connections `--max-connections` accepts: one million, each an open file; a process
/// rarely may hold more (see `ulimit -n`).
pub const MAX_CONNECTIONS: usize = 1_000_000;

/// A count within `1..=max`.
fn parse_count(text: &str, max: usize) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        Ok(n) => Err(format!("{n} is out of range: must be between 1 and {max}")),
        Err(_) => Err(format!("{text:?} is not a whole number")),
    }
}

/// `--workers`: up to the library's [`mllp_reactor::MAX_WORKERS`] (1024), checked here so that
/// the error names the flag and comes before anything listens.
fn parse_workers(text: &str) -> Result<usize, String> {
    parse_count(text, mllp_reactor::MAX_WORKERS)
}

fn parse_max_in_flight(text: &str) -> Result<usize, String> {
    parse_count(text, mllp_reactor::MAX_IN_FLIGHT_LIMIT)
}

fn parse_max_connections(text: &str) -> Result<usize, String> {
    parse_count(text, MAX_CONNECTIONS)
}

fn parse_max_message_size(text: &str) -> Result<usize, String> {
    parse_count(text, mllp_reactor::MAX_MESSAGE_SIZE_LIMIT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_duration_accepts_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3_600)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1_500)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn parse_duration_rejects_garbage() {
        for bad in [
            "",
            "10",
            "s",
            "ms",
            "10x",
            "1.2.3s",
            "-1s",
            "10 s",
            "1e400s",
            "99999999999999999999999h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn cli_definition_is_valid() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
