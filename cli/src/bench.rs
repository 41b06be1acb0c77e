//! `mllp-reactor bench`: runs the load generator, prints progress to stderr and the report to
//! stdout. Ctrl-C ends the measurement early and still prints the report; a second Ctrl-C
//! exits at once.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use signal_hook::consts::SIGINT;

use crate::args::BenchArgs;
use crate::error::CliError;
use crate::loadgen::{self, LoadConfig};

/// Exit status of a process ended by a second Ctrl-C: 128 + SIGINT, as a shell reports it.
pub const EXIT_INTERRUPTED: i32 = 128 + SIGINT;

/// Runs `bench`.
///
/// # Errors
///
/// Usage errors for an address or TLS file; [`CliError::Load`] when the run cannot be carried
/// out; [`CliError::RunErrors`] after the report when any message got no valid ACK.
pub fn bench(args: &BenchArgs) -> Result<(), CliError> {
    if args.idle > 0 && args.server_pid.is_none() {
        eprintln!("note: --idle without --server-pid: RSS per idle connection is not measured");
    }
    let tls = crate::send::client_tls(&args.tls, args.to.as_deref().unwrap_or_default())?;
    let to = args
        .to
        .as_deref()
        .map(|to| crate::addr::resolve_flag("--to", to))
        .transpose()?;
    let interrupt = interrupt_on_ctrl_c()?;
    // Without --to, measure an in-process server (AA via the ACK builder).
    let in_process = match to {
        Some(_) => None,
        None => Some(
            mllp_reactor::Server::builder(mllp_reactor::handler_fn(|msg, _cx| {
                Ok(mllp_reactor::Reply::Send(mllp_reactor::ack::accept(msg)))
            }))
            .bind("127.0.0.1:0")
            .and_then(|s| s.spawn())
            .map_err(CliError::Server)?,
        ),
    };
    let addr = match (&in_process, to) {
        (Some(server), _) => server.local_addr(),
        (None, Some(to)) => to,
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
        tls,
        interrupt: Some(interrupt),
    };
    let started = Instant::now();
    let progress = |acked: u64| {
        eprintln!(
            "[{:>5.1}s] {acked} messages acked (AA with the right MSA-2)",
            started.elapsed().as_secs_f64()
        );
    };
    let report = loadgen::run(&cfg, Some(&progress)).map_err(CliError::Load);
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
        return Err(CliError::RunErrors {
            count: report.errors,
            kinds: report.error_counts.kinds(),
        });
    }
    Ok(())
}

/// A flag the first Ctrl-C sets; the second one exits the process at once.
fn interrupt_on_ctrl_c() -> Result<Arc<AtomicBool>, CliError> {
    let flag = Arc::new(AtomicBool::new(false));
    let setup = |source| CliError::Setup {
        what: "the Ctrl-C handler",
        source,
    };
    // Registered first, so it sees the flag as the previous signal left it: a second Ctrl-C
    // exits, the first only sets the flag.
    signal_hook::flag::register_conditional_shutdown(SIGINT, EXIT_INTERRUPTED, Arc::clone(&flag))
        .map_err(setup)?;
    signal_hook::flag::register(SIGINT, Arc::clone(&flag)).map_err(setup)?;
    Ok(flag)
}
