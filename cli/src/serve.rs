//! `mllp-reactor serve`: an MLLP server that stores each message before its AA (or, with
//! `--no-store`, answers at once through the ACK builder: AA when the message has a readable
//! MSH-10, AR with an ERR segment otherwise).
//!
//! Start-up runs in an order that leaves nothing behind when it fails: every flag is checked
//! first (clap's parsers, then [`check_flags`] for combinations), then the TLS files are read
//! and the metrics port bound, then an existing SQLite store gets a bounded integrity check
//! and is opened, then the disk-space watch starts, the MLLP port is bound, and last the
//! `--health` port. If one of the last steps fails, a store file this start created is
//! removed again.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use mllp_reactor::ack::{Ack, AckCode};
use mllp_reactor::proxy::ProxyMode;
use mllp_reactor::{Builder, ConfigError, Dispatch, Handler, Reply, Server, handler_fn};
use mllp_store::{Store, StoreConfig, StoreSpec};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::args::{DispatchArg, ProxyArg, ServeArgs};
use crate::error::{CliError, ValueError};
use crate::logging::{self, LogObserver};
use crate::store_glue::{log_health_changes, log_rejected, open_options, store_handler};

/// The variable systemd sets for `StateDirectory=`: a relative `--store` path is taken from
/// there, so the shipped unit's store lands in `/var/lib/mllp-reactor`.
pub const STATE_DIRECTORY: &str = "STATE_DIRECTORY";

/// Runs the server until SIGINT/SIGTERM, then drains and prints a one-line summary. A second
/// SIGINT/SIGTERM during the drain exits at once.
///
/// Stdout gets `listening on ADDR` first (scripts read it), then `storing to …`, `metrics
/// on …` and `health on …` where they apply, and `stopped: ...` last; everything else is a log line on stderr.
pub fn serve(args: &ServeArgs) -> Result<(), CliError> {
    check_flags(args)?;
    let store_spec = store_spec(args)?;
    let destinations = crate::forward::plan(&args.forward, store_spec.as_ref())?;
    let listen = crate::addr::resolve_flag("--listen", &args.listen)?;
    let _logs = logging::init(args.log_format, args.log_level.as_deref())?;
    let tls = tls_acceptor(args)?;
    let prometheus = args
        .metrics
        .as_deref()
        .map(crate::prometheus::start)
        .transpose()?;
    let setup = |source| CliError::Setup {
        what: "signal handlers",
        source,
    };
    // A store file past the process's file-size limit (RLIMIT_FSIZE) must fail its commits
    // with EFBIG (so senders get AE) instead of killing the server with SIGXFSZ.
    signal_hook::flag::register(
        signal_hook::consts::SIGXFSZ,
        Arc::new(std::sync::atomic::AtomicBool::new(false)),
    )
    .map_err(setup)?;
    // Before "listening on": a supervisor may send SIGTERM as soon as it reads that line.
    let signals = Signals::new([SIGINT, SIGTERM]).map_err(setup)?;
    let hup = match &tls {
        Some(_) => Some(Signals::new([SIGHUP]).map_err(setup)?),
        None => None,
    };

    if let Some(spec) = &store_spec {
        crate::integrity::check_at_start(spec)?;
    }
    let store = match store_spec {
        Some(spec) => Some(open_store(
            spec,
            args.allow_async_commit,
            store_config(args),
        )?),
        None => None,
    };
    let forwarder = match (destinations, &store) {
        (Some(destinations), Some(opened)) => {
            let gate = opened.store.write_gate().cloned();
            match crate::forward::start(destinations, &opened.spec, gate) {
                Ok(forwarder) => Some(forwarder),
                Err(e) => {
                    if let Some(store) = store {
                        store.discard();
                    }
                    return Err(e);
                }
            }
        }
        _ => None,
    };
    let draining = Arc::new(AtomicBool::new(false));
    // The pruner last: it logs that retention is on, which a start that fails should not.
    let started = (|| {
        let disk = match &store {
            Some(opened) => crate::health::watch_disk(&opened.spec, &args.health, &opened.store)?,
            None => None,
        };
        let server = bind(
            args,
            listen,
            handler(args, store.as_ref(), forwarder.as_ref()),
            tls.clone(),
        )?;
        let health = start_health(args, &server, store.as_ref(), disk.clone(), &draining)?;
        let pruner = start_pruner(args, store.as_ref())?;
        Ok::<_, CliError>((server, disk, health, pruner))
    })();
    let (server, disk, health, pruner) = match started {
        Ok(started) => started,
        Err(e) => {
            if let Some(forwarder) = forwarder {
                forwarder.stop(args.grace.value);
            }
            if let Some(store) = store {
                store.discard();
            }
            return Err(e);
        }
    };

    if let (Some(acceptor), Some(mut hup)) = (tls, hup) {
        // SIGHUP re-reads the certificate, key and client CA for new connections; a bad file
        // keeps the configuration in force and logs one line.
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
    println!("listening on {}", server.local_addr());
    if let Some(store) = &store {
        println!("storing to {}", store.store.summary());
    }
    if let Some(addr) = &prometheus {
        println!("metrics on http://{addr}/metrics");
    }
    if let Some(addr) = &health {
        println!("health on http://{addr}/healthz and /readyz");
    }
    let _ = std::io::stdout().flush();
    let allow = cidrs(&args.allow);
    tracing::info!(
        target: "mllp::server",
        listen = %server.local_addr(),
        store = store.as_ref().map_or("none (--no-store)", |s| s.store.summary()),
        reactors = args.reactors,
        tls = match (&args.tls_cert, &args.tls_client_ca) {
            (None, _) => "off",
            (Some(_), None) => "on",
            (Some(_), Some(_)) => "mutual",
        },
        allow = if allow.is_empty() { "any" } else { allow.as_str() },
        proxy_protocol = args.proxy_protocol.map_or("off", proxy_name),
        proxy_sources = cidrs(&args.proxy_sources),
        config = args.config.as_ref().map(|p| p.display().to_string()),
        idle_timeout = %args.idle_timeout,
        handler_timeout = %args.handler_timeout,
        frame_timeout = %args.frame_timeout,
        max_message_size = args.max_message_size,
        max_connections = args.max_connections,
        workers = args.workers,
        dispatch = ?args.dispatch,
        max_in_flight = args.max_in_flight,
        max_memory = args.max_memory,
        grace = %args.grace,
        metrics = prometheus.map(|a| a.to_string()),
        version = env!("CARGO_PKG_VERSION"),
        "server started"
    );
    drain_on_signals(signals, &server, args.grace.clone(), draining);
    let report = server.run().map_err(CliError::Server)?;
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
            .store
            .close(args.grace.value)
            .map_err(CliError::StoreClose)?;
    }
    if let Some(forwarder) = forwarder {
        // A lane in the middle of an exchange is not waited for: its message is sent again
        // at the next start (at least once).
        forwarder.stop(args.grace.value);
    }
    Ok(())
}

/// The server, with the handler the flags ask for: store then ACK (or ACK once forwarded,
/// `--ack-after forwarded`), or the ACK-only one with `--no-store`.
fn handler(
    args: &ServeArgs,
    store: Option<&OpenedStore>,
    forwarder: Option<&mllp_store::forward::Forwarder>,
) -> Builder {
    let store = store.map(|s| &s.store);
    match (
        crate::forward::ack_after_handler(&args.forward, store, forwarder),
        store,
    ) {
        (Some(handler), _) => Server::builder(handler),
        (None, Some(store)) => Server::builder(store_handler(Arc::clone(store))),
        (None, None) => Server::builder(ack_only()),
    }
}

/// The background retention pruner for an SQLite store (`--retain`, `--retain-size`).
fn start_pruner(
    args: &ServeArgs,
    store: Option<&OpenedStore>,
) -> Result<Option<mllp_store::retention::Pruner>, CliError> {
    match store {
        Some(store) => crate::retention::start_pruner(
            &store.spec,
            store.store.write_gate().cloned(),
            &args.retention,
        ),
        None => Ok(None),
    }
}

/// `--health`: the liveness and readiness endpoints, on their own port.
fn start_health(
    args: &ServeArgs,
    server: &Server,
    store: Option<&OpenedStore>,
    disk: Option<mllp_store::disk::DiskMonitor>,
    draining: &Arc<AtomicBool>,
) -> Result<Option<std::net::SocketAddr>, CliError> {
    let Some(addr) = &args.health.health else {
        return Ok(None);
    };
    crate::health::start(
        addr,
        crate::health::Sources {
            reactors: server.heartbeat(),
            store: store.map(|s| Arc::clone(&s.store)),
            disk,
            draining: Arc::clone(draining),
        },
    )
    .map(Some)
}

/// The first SIGINT/SIGTERM drains for `grace` (and sets `draining`, so `/readyz` answers 503); a second one exits at once (exit status
/// 128 + the signal, as a shell reports it). Nothing unacknowledged is lost by that: a message
/// gets its AA only after it is stored.
fn drain_on_signals(
    mut signals: Signals,
    server: &Server,
    grace: crate::parse::TypedDuration,
    draining: Arc<AtomicBool>,
) {
    let trigger = server.shutdown_trigger();
    std::thread::spawn(move || {
        let mut signals = signals.forever();
        if let Some(signal) = signals.next() {
            tracing::info!(target: "mllp::server", signal = signal_name(signal), grace = %grace, "draining (a second signal stops at once)");
            draining.store(true, Ordering::Relaxed);
            trigger.shutdown(grace.value);
        }
        if let Some(signal) = signals.next() {
            // Straight to stderr: the log writer thread may not get to run again.
            eprintln!(
                "{}: stopping at once, without waiting for messages in flight",
                signal_name(signal)
            );
            std::process::exit(128 + signal);
        }
    });
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        SIGINT => "SIGINT",
        SIGTERM => "SIGTERM",
        _ => "signal",
    }
}

/// Flag combinations clap's declarations cannot express, checked before anything is opened.
fn check_flags(args: &ServeArgs) -> Result<(), CliError> {
    if args.max_memory < args.max_message_size.saturating_mul(2) {
        return Err(CliError::flag(
            format!("--max-memory {}", args.max_memory),
            ValueError::BelowTwoMessages {
                max_message_size: args.max_message_size,
            },
        ));
    }
    if args.allow_async_commit && !args.store.is_postgres() {
        return Err(CliError::flag(
            "--allow-async-commit",
            ValueError::OnlyPostgres,
        ));
    }
    Ok(())
}

/// The store to open, `None` with `--no-store`. A relative SQLite path is taken from
/// `$STATE_DIRECTORY` when systemd set it (the first directory, if it lists several).
fn store_spec(args: &ServeArgs) -> Result<Option<StoreSpec>, CliError> {
    if args.no_store {
        return Ok(None);
    }
    let relative = match &args.store {
        StoreSpec::Sqlite(path) if path.is_relative() => path,
        other => return Ok(Some(other.clone())),
    };
    let Some(state) = std::env::var_os(STATE_DIRECTORY).filter(|v| !v.is_empty()) else {
        return Ok(Some(args.store.clone()));
    };
    let first = state
        .to_str()
        .and_then(|s| s.split(':').next())
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .ok_or(CliError::Env {
            var: STATE_DIRECTORY,
            problem: ValueError::NotAbsolute,
        })?;
    Ok(Some(StoreSpec::Sqlite(first.join(relative))))
}

/// Builds the server from the flags and binds it: the last step of the start.
fn bind(
    args: &ServeArgs,
    listen: std::net::SocketAddr,
    builder: Builder,
    tls: Option<mllp_reactor::tls::TlsAcceptor>,
) -> Result<Server, CliError> {
    let mut builder = builder
        .idle_timeout(args.idle_timeout.value)
        .handler_timeout(args.handler_timeout.value)
        .frame_timeout(args.frame_timeout.value)
        .max_message_size(args.max_message_size)
        .max_connections(args.max_connections)
        .max_memory(args.max_memory)
        .reactors(args.reactors)
        .dispatch(dispatch(args.dispatch))
        // Without `--metrics` no recorder is installed: nobody reads the timings.
        .timing_histograms(args.metrics.is_some())
        .observer(LogObserver);
    if let Some(n) = args.max_in_flight {
        builder = builder.max_in_flight(n);
    }
    if let Some(n) = args.workers {
        builder = builder.workers(n);
    }
    if let Some(n) = args.max_handshakes {
        builder = builder.max_handshakes(n as usize);
    }
    if let Some(mode) = args.proxy_protocol {
        builder = builder.proxy_protocol(match mode {
            ProxyArg::V1 => ProxyMode::V1,
            ProxyArg::V2 => ProxyMode::V2,
            ProxyArg::Any => ProxyMode::Any,
        });
        if !args.proxy_sources.is_empty() {
            builder = builder.proxy_sources(args.proxy_sources.iter().copied().collect());
        }
    }
    if !args.allow.is_empty() {
        builder = builder.allow(args.allow.iter().copied().collect());
    }
    if let Some(acceptor) = tls {
        builder = builder.tls(acceptor);
    }
    builder.bind(listen).map_err(|e| match e {
        mllp_reactor::Error::Bind(source) => CliError::Listen {
            flag: format!("--listen {}", args.listen),
            source,
        },
        mllp_reactor::Error::Config(c) => config_error(c, args),
        other => CliError::Server(other),
    })
}

/// A builder error in terms of the flag that caused it. The parsers in `args.rs` and
/// [`check_flags`] catch these first; this is the backstop for anything they let through.
fn config_error(error: ConfigError, args: &ServeArgs) -> CliError {
    let flag = match &error {
        ConfigError::ZeroDuration(name) => format!("--{}", name.replace('_', "-")),
        ConfigError::MaxMessageSize(_) => "--max-message-size".to_owned(),
        ConfigError::NoWorkers | ConfigError::TooManyWorkers(_) => "--workers".to_owned(),
        ConfigError::MaxInFlight(_) => "--max-in-flight".to_owned(),
        ConfigError::MaxMemory(_) => "--max-memory".to_owned(),
        ConfigError::MaxConnections(_) => "--max-connections".to_owned(),
        ConfigError::Reactors(_) => "--reactors".to_owned(),
        ConfigError::NoAddress => format!("--listen {}", args.listen),
        _ => return CliError::Server(mllp_reactor::Error::Config(error)),
    };
    CliError::Config {
        flag,
        source: error,
    }
}

/// `--allow` / `--proxy-source` as one comma-separated field.
fn cidrs(list: &[mllp_reactor::cidr::Cidr]) -> String {
    list.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn proxy_name(mode: ProxyArg) -> &'static str {
    match mode {
        ProxyArg::V1 => "v1",
        ProxyArg::V2 => "v2",
        ProxyArg::Any => "any",
    }
}

/// The `--no-store` handler: AA for a message with a readable MSH-10, AR (logged, as the
/// storing handler logs it) otherwise. The builder says which code it wrote, and the reply
/// carries it to the server's NAK count, so neither the message nor the ACK is read twice.
fn ack_only() -> impl Handler {
    handler_fn(|msg, cx| {
        // MSH-7 is when the message arrived (the reactor read that clock already).
        let (code, reply) = Ack::new(AckCode::AA)
            .timestamp(cx.received_time())
            .build_coded(msg);
        if code != AckCode::AA {
            log_rejected(cx.connection_id(), cx.peer_addr(), cx.sequence(), code, msg);
        }
        Ok(Reply::SendAck(code, reply))
    })
}

/// An open store, what `serve` prints for it, and the file this start created, if any.
struct OpenedStore {
    store: Arc<Store>,
    /// The store as `--store` gave it (with `$STATE_DIRECTORY` applied).
    spec: StoreSpec,
    /// The SQLite file, when it did not exist before: [`discard`](Self::discard) removes it.
    created: Option<PathBuf>,
}

impl OpenedStore {
    /// Closes the store after a failed start and removes the file (and its WAL, shared
    /// memory and search index files) if this start created it: a failed start leaves no empty store behind.
    fn discard(self) {
        let _ = self.store.close(std::time::Duration::from_secs(5));
        remove_created(self.created);
    }
}

/// Removes an SQLite store's files (the database, its WAL and shared memory, its search
/// index file) that a failed start created.
fn remove_created(created: Option<PathBuf>) {
    if let Some(path) = created {
        for file in mllp_store::sqlite::files(&path) {
            let _ = std::fs::remove_file(file);
        }
    }
}

/// Opens the store `spec` names with `config`'s caps (the PostgreSQL connection is made
/// here, then moves to the store's writer thread; never a reactor's).
fn open_store(
    spec: StoreSpec,
    allow_async_commit: bool,
    config: StoreConfig,
) -> Result<OpenedStore, CliError> {
    let created = match &spec {
        StoreSpec::Sqlite(path) if std::fs::symlink_metadata(path).is_err() => Some(path.clone()),
        _ => None,
    };
    let mut options = open_options();
    options.postgres = options.postgres.allow_async_commit(allow_async_commit);
    match Store::open(&spec, &options, config) {
        Ok(store) => {
            log_health_changes(&store);
            crate::integrity::watch_corruption(store.pulse(), store.summary().to_owned());
            Ok(OpenedStore {
                store: Arc::new(store),
                spec,
                created,
            })
        }
        Err(e) => {
            remove_created(created);
            Err(CliError::Store(e))
        }
    }
}

/// The store sized for this server ([`StoreConfig::for_server`]): its queue never refuses
/// a message before the server's own caps (connections × messages in flight, `--max-memory`)
/// stop reading.
fn store_config(args: &ServeArgs) -> StoreConfig {
    let max_in_flight = args
        .max_in_flight
        .unwrap_or(dispatch(args.dispatch).default_max_in_flight());
    StoreConfig::default().for_server(args.max_connections, max_in_flight, args.max_memory)
}

fn dispatch(arg: DispatchArg) -> Dispatch {
    match arg {
        DispatchArg::Inline => Dispatch::Inline,
        DispatchArg::Pool => Dispatch::Pool,
    }
}

/// The TLS acceptor from `--tls-cert`, `--tls-key` and `--tls-client-ca`, checked now: a bad
/// or mismatched file is a one-line error before anything listens.
fn tls_acceptor(args: &ServeArgs) -> Result<Option<mllp_reactor::tls::TlsAcceptor>, CliError> {
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        return Ok(None);
    };
    let mut config = mllp_reactor::tls::TlsConfig::from_files(cert, key);
    if let Some(ca) = &args.tls_client_ca {
        config = config.client_ca_file(ca);
    }
    mllp_reactor::tls::TlsAcceptor::new(config)
        .map(Some)
        .map_err(|source| CliError::Tls {
            flag: format!(
                "--tls-cert {} / --tls-key {}",
                cert.display(),
                key.display()
            ),
            source,
        })
}
