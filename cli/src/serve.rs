//! `mllp-reactor serve`: an MLLP server that stores each message before its AA (or, with
//! `--no-store`, answers AA at once through the ACK builder).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use mllp_reactor::{Reply, Server, ack, handler_fn};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::store_glue::{STORE_WORKERS, open_store, store_handler};

/// Options of `serve`, already parsed.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub listen: String,
    pub idle_timeout: Duration,
    pub handler_timeout: Duration,
    pub frame_timeout: Duration,
    pub max_message_size: usize,
    pub max_connections: usize,
    pub workers: Option<usize>,
    pub metrics: Option<String>,
    /// How long a Ctrl-C drain may take.
    pub grace: Duration,
    /// The store: an SQLite file path or a `postgres://` URL; `None`: `--no-store`.
    pub store: Option<String>,
    /// Accept a PostgreSQL server with `synchronous_commit=off`.
    pub allow_async_commit: bool,
}

/// Runs the server until SIGINT/SIGTERM, then drains and prints a one-line summary.
pub fn serve(opts: &ServeOptions) -> Result<(), String> {
    let prometheus = match &opts.metrics {
        Some(addr) => Some(start_metrics(addr)?),
        None => None,
    };
    // A store file past the process's file-size limit (RLIMIT_FSIZE) must fail its commits
    // with EFBIG (so senders get AE) instead of killing the server with SIGXFSZ.
    signal_hook::flag::register(
        signal_hook::consts::SIGXFSZ,
        Arc::new(std::sync::atomic::AtomicBool::new(false)),
    )
    .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let (store, storing_to) = match &opts.store {
        Some(spec) => {
            let (store, shown) = open_store(spec, opts.allow_async_commit)?;
            (Some(Arc::new(store)), Some(shown))
        }
        None if opts.allow_async_commit => {
            return Err("--allow-async-commit needs a store".to_owned());
        }
        None => (None, None),
    };
    let mut builder = match &store {
        Some(store) => Server::builder(store_handler(Arc::clone(store))),
        None => Server::builder(handler_fn(|msg, _cx| Ok(Reply::Send(ack::accept(msg))))),
    };
    builder = builder
        .idle_timeout(opts.idle_timeout)
        .handler_timeout(opts.handler_timeout)
        .frame_timeout(opts.frame_timeout)
        .max_message_size(opts.max_message_size)
        .max_connections(opts.max_connections);
    if let Some(n) = opts.workers.or(store.as_ref().map(|_| STORE_WORKERS)) {
        builder = builder.workers(n);
    }
    let server = builder.bind(opts.listen.as_str()).map_err(|e| match e {
        mllp_reactor::Error::Bind(io) if io.kind() == std::io::ErrorKind::AddrInUse => {
            format!(
                "{} is already in use: stop the other server or pick another with --listen",
                opts.listen
            )
        }
        other => format!("cannot start on {}: {other}", opts.listen),
    })?;
    println!("listening on {}", server.local_addr());
    if let Some(line) = &storing_to {
        println!("{line}");
    }
    if let Some(addr) = &prometheus {
        println!("metrics on http://{addr}/metrics");
    }
    let _ = std::io::stdout().flush();
    let trigger = server.shutdown_trigger();
    let mut signals = Signals::new([SIGINT, SIGTERM])
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let grace = opts.grace;
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            eprintln!("draining (up to {grace:?})...");
            trigger.shutdown(grace);
        }
    });
    let report = server.run().map_err(|e| format!("server failed: {e}"))?;
    println!(
        "stopped: {} connections closed, {} with a message in flight finished, {} forced",
        report.closed,
        report.in_flight.saturating_sub(report.forced),
        report.forced
    );
    if let Some(store) = store {
        store
            .close(grace)
            .map_err(|e| format!("store not closed cleanly: {e}"))?;
    }
    Ok(())
}

/// Installs the Prometheus recorder (before `bind`, so the server's handles land in it) and
/// serves its text on `addr` from a small thread.
fn start_metrics(addr: &str) -> Result<SocketAddr, String> {
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| format!("cannot install the metrics recorder: {e}"))?;
    let listener =
        TcpListener::bind(addr).map_err(|e| format!("cannot listen for metrics on {addr}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let mut request = [0u8; 1024];
            let _ = stream.read(&mut request);
            let body = handle.render();
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                body.len(),
                body
            );
        }
    });
    Ok(local)
}
