//! `mllp-reactor serve`: an MLLP server that stores each message before its AA (or, with
//! `--no-store`, answers at once through the ACK builder: AA when the message has a readable
//! MSH-10, AR with an ERR segment otherwise).

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use mllp_reactor::cidr::Cidr;
use mllp_reactor::msh::Msh;
use mllp_reactor::proxy::ProxyMode;
use mllp_reactor::{ConfigError, Dispatch, Handler, Reply, Server, ack, handler_fn};
use mllp_store::StoreConfig;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::TypedDuration;
use crate::logging::{self, LogFormat, LogObserver};
use crate::store_glue::{open_store, store_handler};

/// Options of `serve`, already parsed.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub config: Option<PathBuf>,
    pub listen: String,
    pub idle_timeout: TypedDuration,
    pub handler_timeout: TypedDuration,
    pub frame_timeout: TypedDuration,
    pub max_message_size: usize,
    pub max_connections: usize,
    pub workers: Option<usize>,
    pub metrics: Option<String>,
    /// How long a Ctrl-C drain may take.
    pub grace: TypedDuration,
    pub dispatch: DispatchArg,
    pub max_in_flight: Option<usize>,
    pub max_memory: usize,
    pub reactors: usize,
    pub proxy_protocol: Option<ProxyArg>,
    pub proxy_sources: Vec<Cidr>,
    pub allow: Vec<Cidr>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_client_ca: Option<PathBuf>,
    /// `--max-handshakes`; `None`: the library's default.
    pub max_handshakes: Option<u32>,
    pub log_format: LogFormat,
    pub log_level: Option<String>,
    /// The store: an SQLite file path or a `postgres://` URL; `None`: `--no-store`.
    pub store: Option<String>,
    /// Accept a PostgreSQL server with `synchronous_commit=off`.
    pub allow_async_commit: bool,
    /// `--forward` and its settings.
    pub forward: crate::forward::ForwardFlags,
    /// `--retain`, `--retain-size`.
    pub retention: crate::retention::RetainArgs,
    /// `--health`, `--min-free-disk`.
    pub health: crate::health::HealthArgs,
}

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

/// Runs the server until SIGINT/SIGTERM, then drains and prints a one-line summary.
///
/// Stdout gets exactly two lines, `listening on ADDR` first (scripts read it) and `stopped: ...`
/// last; everything else is a log line on stderr.
pub fn serve(opts: &ServeOptions) -> Result<(), String> {
    let _logs = logging::init(opts.log_format, opts.log_level.as_deref())?;
    let prometheus = match &opts.metrics {
        Some(addr) => Some(crate::prometheus::start(addr)?),
        None => None,
    };
    // A store file past the process's file-size limit (RLIMIT_FSIZE) must fail its commits
    // with EFBIG (so senders get AE) instead of killing the server with SIGXFSZ.
    signal_hook::flag::register(
        signal_hook::consts::SIGXFSZ,
        Arc::new(std::sync::atomic::AtomicBool::new(false)),
    )
    .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let dispatch = match opts.dispatch {
        DispatchArg::Inline => Dispatch::Inline,
        DispatchArg::Pool => Dispatch::Pool,
    };
    let max_in_flight = opts
        .max_in_flight
        .unwrap_or(dispatch.default_max_in_flight());
    let mut gate = None;
    let mut disk = None;
    let mut write_gate = None;
    let (store, storing_to) = match &opts.store {
        Some(spec) => {
            let config = StoreConfig::default().for_server(
                opts.max_connections,
                max_in_flight,
                opts.max_memory,
            );
            crate::integrity::check_at_start(spec)?;
            let (store, shown, writer_gate) = open_store(spec, opts.allow_async_commit, config)?;
            crate::integrity::watch_corruption(store.pulse(), spec.clone());
            write_gate.clone_from(&writer_gate);
            gate = writer_gate;
            disk = crate::health::watch_disk(spec, &opts.health, &store)?;
            (Some(Arc::new(store)), Some(shown))
        }
        None if opts.allow_async_commit => {
            return Err("--allow-async-commit needs a store".to_owned());
        }
        None => (None, None),
    };
    let forwarder = crate::forward::start(&opts.forward, opts.store.as_deref(), write_gate)?;
    let after_forwarded =
        crate::forward::ack_after_handler(&opts.forward, store.as_ref(), forwarder.as_ref());
    let mut builder = match (&store, after_forwarded) {
        (_, Some(handler)) => Server::builder(handler),
        (Some(store), None) => Server::builder(store_handler(Arc::clone(store))),
        (None, None) => Server::builder(ack_only()),
    }
    .idle_timeout(opts.idle_timeout.value)
    .handler_timeout(opts.handler_timeout.value)
    .frame_timeout(opts.frame_timeout.value)
    .max_message_size(opts.max_message_size)
    .max_connections(opts.max_connections)
    .max_memory(opts.max_memory)
    .max_in_flight(max_in_flight)
    .dispatch(dispatch)
    .observer(LogObserver);
    if let Some(n) = opts.workers {
        builder = builder.workers(n);
    }
    if let Some(n) = opts.max_handshakes {
        builder = builder.max_handshakes(n as usize);
    }
    builder = builder.reactors(opts.reactors);
    if let Some(mode) = opts.proxy_protocol {
        builder = builder.proxy_protocol(match mode {
            ProxyArg::V1 => ProxyMode::V1,
            ProxyArg::V2 => ProxyMode::V2,
            ProxyArg::Any => ProxyMode::Any,
        });
        if !opts.proxy_sources.is_empty() {
            builder = builder.proxy_sources(opts.proxy_sources.iter().copied().collect());
        }
    }
    if !opts.allow.is_empty() {
        builder = builder.allow(opts.allow.iter().copied().collect());
    }
    let tls = tls_acceptor(opts)?;
    if let Some(acceptor) = &tls {
        builder = builder.tls(acceptor.clone());
    }
    let listen = crate::addr::resolve(&opts.listen).map_err(|e| format!("--listen {e}"))?;
    let server = builder.bind(listen).map_err(|e| match e {
        mllp_reactor::Error::Bind(io) if io.kind() == std::io::ErrorKind::AddrInUse => {
            format!(
                "--listen {} is already in use: stop the other server or pick another address",
                opts.listen
            )
        }
        mllp_reactor::Error::Bind(io) => format!("--listen {}: {io}", opts.listen),
        mllp_reactor::Error::Config(c) => config_error(&c, opts),
        other => format!("cannot start on {}: {other}", opts.listen),
    })?;
    // Before "listening on": a supervisor may send SIGTERM as soon as it reads that line.
    let mut signals = Signals::new([SIGINT, SIGTERM])
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    if let Some(acceptor) = tls {
        // SIGHUP re-reads the certificate, key and client CA for new connections; a bad file
        // keeps the configuration in force and logs one line.
        let mut hup = Signals::new([signal_hook::consts::SIGHUP])
            .map_err(|e| format!("cannot install signal handlers: {e}"))?;
        std::thread::spawn(move || {
            for _ in hup.forever() {
                match acceptor.reload() {
                    Ok(()) => tracing::info!(target: "mllp::server", "tls reloaded"),
                    Err(e) => {
                        tracing::error!(target: "mllp::server", error = %e, "tls reload failed, keeping the old configuration")
                    }
                }
            }
        });
    }
    let draining = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let health = match &opts.health.health {
        Some(addr) => Some(crate::health::start(
            addr,
            crate::health::Sources {
                reactors: server.heartbeat(),
                store: store.clone(),
                disk: disk.clone(),
                draining: Arc::clone(&draining),
            },
        )?),
        None => None,
    };
    println!("listening on {}", server.local_addr());
    if let Some(line) = &storing_to {
        println!("{line}");
    }
    if let Some(addr) = &prometheus {
        println!("metrics on http://{addr}/metrics");
    }
    if let Some(addr) = &health {
        println!("health on http://{addr}/healthz and /readyz");
    }
    let _ = std::io::stdout().flush();
    // After binding: a server that cannot start has nothing to prune.
    let pruner = match &opts.store {
        Some(spec) => crate::retention::start_pruner(spec, gate, &opts.retention)?,
        None => None,
    };
    tracing::info!(
        target: "mllp::server",
        listen = %server.local_addr(),
        config = opts.config.as_ref().map(|p| p.display().to_string()),
        idle_timeout = %opts.idle_timeout,
        handler_timeout = %opts.handler_timeout,
        frame_timeout = %opts.frame_timeout,
        max_message_size = opts.max_message_size,
        max_connections = opts.max_connections,
        workers = opts.workers,
        dispatch = ?opts.dispatch,
        max_in_flight = opts.max_in_flight,
        max_memory = opts.max_memory,
        grace = %opts.grace,
        metrics = prometheus.map(|a| a.to_string()),
        version = env!("CARGO_PKG_VERSION"),
        "server started"
    );
    let trigger = server.shutdown_trigger();
    let grace = opts.grace.clone();
    std::thread::spawn(move || {
        if let Some(signal) = signals.forever().next() {
            let signal = if signal == SIGINT {
                "SIGINT"
            } else {
                "SIGTERM"
            };
            tracing::info!(target: "mllp::server", signal, grace = %grace, "draining");
            draining.store(true, std::sync::atomic::Ordering::Relaxed);
            trigger.shutdown(grace.value);
        }
    });
    let report = server.run().map_err(|e| format!("server failed: {e}"))?;
    let finished = report.in_flight.saturating_sub(report.forced);
    tracing::info!(
        target: "mllp::server",
        closed = report.closed,
        finished,
        forced = report.forced,
        "stopped"
    );
    println!(
        "stopped: {} connections closed, {finished} with a message in flight finished, {} forced",
        report.closed, report.forced
    );
    drop(pruner);
    if let Some(disk) = disk {
        disk.stop();
    }
    if let Some(store) = store {
        store
            .close(opts.grace.value)
            .map_err(|e| format!("store not closed cleanly: {e}"))?;
    }
    if let Some(forwarder) = forwarder {
        // A lane in the middle of an exchange is not waited for: its message is sent again
        // at the next start (at least once).
        forwarder.stop(opts.grace.value);
    }
    Ok(())
}

/// A builder error in terms of the flag that caused it. The parsers in `main.rs` catch these
/// first; this is the backstop for anything they let through.
fn config_error(error: &ConfigError, opts: &ServeOptions) -> String {
    match error {
        ConfigError::ZeroDuration(name) => {
            format!("--{} must be greater than zero", name.replace('_', "-"))
        }
        ConfigError::MaxMessageSize(n) => format!(
            "--max-message-size {n} is out of range: must be between 1 and {}",
            mllp_reactor::MAX_MESSAGE_SIZE_LIMIT
        ),
        ConfigError::NoWorkers => "--workers must be at least 1".to_owned(),
        ConfigError::TooManyWorkers(n) => format!(
            "--workers {n} is out of range: must be between 1 and {}",
            mllp_reactor::MAX_WORKERS
        ),
        ConfigError::MaxInFlight(n) => format!(
            "--max-in-flight {n} is out of range: must be between 1 and {}",
            mllp_reactor::MAX_IN_FLIGHT_LIMIT
        ),
        ConfigError::MaxMemory(n) => format!(
            "--max-memory {n} must be at least twice --max-message-size ({})",
            opts.max_message_size
        ),
        ConfigError::MaxConnections(n) => format!("--max-connections {n} is out of range"),
        ConfigError::NoAddress => format!("--listen {} resolves to no address", opts.listen),
        other => format!("invalid configuration: {other}"),
    }
}

/// The `--no-store` handler: AA for a message with a readable MSH-10, AR (logged) otherwise.
fn ack_only() -> impl Handler {
    handler_fn(|msg, cx| {
        // The builder says which code it wrote (AR when the message has no MSH-10): no
        // second parse of the message, no search of the reply.
        let (code, reply) = ack::Ack::new(ack::AckCode::AA).build_coded(msg);
        if code != ack::AckCode::AA {
            // An AR: the sender cannot be told which message is meant.
            tracing::warn!(
                target: "mllp::msg",
                conn = %cx.connection_id(),
                peer = %cx.peer_addr(),
                seq = cx.sequence(),
                code = "AR",
                control_id = "",
                reason = if Msh::parse(msg).is_ok() { "no MSH-10" } else { "no readable MSH" },
                size = msg.len(),
                "message rejected"
            );
        }
        Ok(Reply::Send(reply))
    })
}

/// The TLS acceptor from `--tls-cert`, `--tls-key` and `--tls-client-ca`, checked now: a bad
/// or mismatched file is a one-line error before anything listens.
fn tls_acceptor(opts: &ServeOptions) -> Result<Option<mllp_reactor::tls::TlsAcceptor>, String> {
    let (Some(cert), Some(key)) = (&opts.tls_cert, &opts.tls_key) else {
        return Ok(None);
    };
    let mut config = mllp_reactor::tls::TlsConfig::from_files(cert, key);
    if let Some(ca) = &opts.tls_client_ca {
        config = config.client_ca_file(ca);
    }
    mllp_reactor::tls::TlsAcceptor::new(config)
        .map(Some)
        .map_err(|e| {
            format!(
                "--tls-cert {} / --tls-key {}: {e}",
                cert.display(),
                key.display()
            )
        })
}
