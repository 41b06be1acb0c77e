//! `mllp-reactor serve`: an MLLP ACK server (AA to every message through the ACK builder).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use mllp_reactor::cidr::Cidr;
use mllp_reactor::proxy::ProxyMode;
use mllp_reactor::{Dispatch, Reply, Server, ack, handler_fn};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

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
    pub dispatch: DispatchArg,
    pub max_in_flight: Option<usize>,
    pub max_memory: usize,
    pub reactors: usize,
    pub proxy_protocol: Option<ProxyArg>,
    pub proxy_sources: Vec<Cidr>,
    pub allow: Vec<Cidr>,
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
pub fn serve(opts: &ServeOptions) -> Result<(), String> {
    let prometheus = match &opts.metrics {
        Some(addr) => Some(start_metrics(addr)?),
        None => None,
    };
    let mut builder = Server::builder(handler_fn(|msg, _cx| Ok(Reply::Send(ack::accept(msg)))))
        .idle_timeout(opts.idle_timeout)
        .handler_timeout(opts.handler_timeout)
        .frame_timeout(opts.frame_timeout)
        .max_message_size(opts.max_message_size)
        .max_connections(opts.max_connections)
        .max_memory(opts.max_memory)
        .dispatch(match opts.dispatch {
            DispatchArg::Inline => Dispatch::Inline,
            DispatchArg::Pool => Dispatch::Pool,
        });
    if let Some(n) = opts.workers {
        builder = builder.workers(n);
    }
    if let Some(n) = opts.max_in_flight {
        builder = builder.max_in_flight(n);
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
    } else if !opts.proxy_sources.is_empty() {
        return Err("--proxy-source needs --proxy-protocol".to_owned());
    }
    if !opts.allow.is_empty() {
        builder = builder.allow(opts.allow.iter().copied().collect());
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
