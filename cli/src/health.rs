//! `serve --health ADDR`: `GET /healthz` (liveness) and `GET /readyz` (readiness) for load
//! balancers and orchestrators, on a port of their own so that `--metrics` can stay private
//! while a balancer probes this one. The decisions are the store crate's
//! (`mllp_store::health::{alive, ready}`); this file only answers HTTP.
//!
//! - `/healthz`: 200 `{"status":"alive"}` while every reactor and the store writer stamped
//!   their heartbeat within 5 s; else 503 `{"status":"stuck","reason":"reactor",…}`.
//! - `/readyz`: 200 `{"status":"ready"}`, or 503 `{"status":"not ready","reason":
//!   "draining"|"store"|"disk","detail":"…"}`.
//! - Anything else: 404.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use mllp_reactor::Heartbeat;
use mllp_store::disk::{DEFAULT_MIN_FREE, DiskMonitor, MinFree};
use mllp_store::readiness::{alive, ready};
use mllp_store::{Store, StoreSpec};

use crate::error::{CliError, ValueError};
use crate::parse::parse_size;

/// What the endpoints read.
#[derive(Clone, Debug)]
pub struct Sources {
    pub reactors: Heartbeat,
    pub store: Option<Arc<Store>>,
    pub disk: Option<DiskMonitor>,
    /// Set when SIGTERM/SIGINT starts the drain.
    pub draining: Arc<AtomicBool>,
}

/// Binds `addr` and answers on a thread (`health-http`). Returns the bound address.
pub fn start(addr: &str, sources: Sources) -> Result<SocketAddr, CliError> {
    let listen = |source| CliError::Listen {
        flag: format!("--health {addr}"),
        source,
    };
    let resolved = crate::addr::resolve_flag("--health", addr)?;
    let listener = TcpListener::bind(resolved).map_err(listen)?;
    let local = listener.local_addr().map_err(listen)?;
    thread::Builder::new()
        .name("health-http".to_owned())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                answer(stream, &sources);
            }
        })
        .map_err(|source| CliError::Setup {
            what: "the health thread",
            source,
        })?;
    Ok(local)
}

fn answer(mut stream: TcpStream, sources: &Sources) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
    // The request line, however the client split its writes (bounded: 1 KiB, 2 s).
    let mut request = [0u8; 1024];
    let mut n = 0;
    while n < request.len() && !request[..n].contains(&b'\n') {
        match stream.read(&mut request[n..]) {
            Ok(0) | Err(_) => break,
            Ok(got) => n += got,
        }
    }
    let line = request[..n]
        .split(|&b| b == b'\r' || b == b'\n')
        .next()
        .unwrap_or_default();
    let path = line.split(|&b| b == b' ').nth(1).unwrap_or_default();
    let (status, body) = match path {
        b"/healthz" => match alive(&sources.reactors, sources.store.as_deref(), Instant::now()) {
            Ok(()) => (200, r#"{"status":"alive"}"#.to_owned()),
            Err((part, silent)) => (
                503,
                serde_json::json!({
                    "status": "stuck",
                    "reason": part,
                    "silent_seconds": silent.as_secs_f64(),
                })
                .to_string(),
            ),
        },
        b"/readyz" => match ready(
            sources.draining.load(Ordering::Relaxed),
            sources.store.as_deref(),
            sources.disk.as_ref(),
        ) {
            Ok(()) => (200, r#"{"status":"ready"}"#.to_owned()),
            Err(why) => (
                503,
                serde_json::json!({
                    "status": "not ready",
                    "reason": why.as_str(),
                    "detail": why.to_string(),
                })
                .to_string(),
            ),
        },
        _ => (404, r#"{"status":"not found"}"#.to_owned()),
    };
    let text = match status {
        200 => "OK",
        503 => "Service Unavailable",
        _ => "Not Found",
    };
    let _ = write!(
        stream,
        "HTTP/1.1 {status} {text}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// `serve`'s health and free-space flags.
#[derive(Debug, Clone, clap::Args)]
pub struct HealthArgs {
    /// Serve GET /healthz (liveness: reactors and store writer alive) and GET /readyz
    /// (readiness: not draining, store committing, disk above --min-free-disk) on this
    /// address, for load balancers (HAProxy: `option httpchk GET /readyz` + `check port`).
    #[arg(long, value_name = "ADDR")]
    pub health: Option<String>,
    /// Refuse new messages (AE) while free space on the store's file system is below this:
    /// a size (2GiB, 500MB) or a percentage (5%); 0 turns the check off. Default: 1 GiB or
    /// 5 %, whichever is smaller.
    #[arg(long, value_name = "SIZE|PERCENT", value_parser = parse_min_free)]
    pub min_free_disk: Option<MinFree>,
}

fn parse_min_free(text: &str) -> Result<MinFree, ValueError> {
    let text = text.trim();
    match text.strip_suffix('%') {
        Some(p) => match p.trim().parse::<f64>() {
            Ok(p) if (0.0..=100.0).contains(&p) => Ok(MinFree::Percent(p)),
            _ => Err(ValueError::Percent),
        },
        None => parse_size(text).map(MinFree::Bytes),
    }
}

/// For an SQLite store: watches the free space of the directory holding `store`, logs a
/// warning when it falls below the minimum and a line when it recovers, and has the store
/// refuse new messages meanwhile. `None` for PostgreSQL (its disk is the database server's).
pub fn watch_disk(
    store: &StoreSpec,
    args: &HealthArgs,
    target: &Store,
) -> Result<Option<DiskMonitor>, CliError> {
    let StoreSpec::Sqlite(path) = store else {
        return Ok(None);
    };
    let min = args.min_free_disk.unwrap_or(DEFAULT_MIN_FREE);
    if min == MinFree::Bytes(0) || min == MinFree::Percent(0.0) {
        return Ok(None);
    }
    let dir = match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => dir.to_owned(),
        None => std::path::PathBuf::from("."),
    };
    let monitor = DiskMonitor::start(&dir, min, |state| {
        if state.low {
            tracing::warn!(
                target: "mllp::store",
                available_bytes = state.available,
                minimum_bytes = state.minimum,
                "free disk space below --min-free-disk: new messages get AE until space is freed"
            );
        } else {
            tracing::info!(
                target: "mllp::store",
                available_bytes = state.available,
                minimum_bytes = state.minimum,
                "free disk space back above --min-free-disk: storing again"
            );
        }
    })
    .map_err(|source| CliError::DiskSpace {
        dir: dir.clone(),
        source,
    })?;
    target.refuse_when_disk_low(monitor.clone());
    Ok(Some(monitor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_free_takes_sizes_and_percentages() {
        assert_eq!(parse_min_free("5%").unwrap(), MinFree::Percent(5.0));
        assert_eq!(parse_min_free("1GiB").unwrap(), MinFree::Bytes(1 << 30));
        assert_eq!(parse_min_free("0").unwrap(), MinFree::Bytes(0));
        assert!(parse_min_free("120%").is_err());
    }
}
