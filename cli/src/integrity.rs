//! `mllp-reactor check STORE`, and `serve`'s bounded start-up check: flags in, the store
//! crate's `integrity` out.

use std::path::Path;

use clap::Args;
use mllp_store::SqliteOptions;
use mllp_store::integrity::{
    CheckDepth, CheckOutcome, STARTUP_CHECK_BUDGET, check_sqlite, refusal,
};
use mllp_store::postgresql::is_postgres_url;

/// `check`'s flags.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The store (an SQLite file). Best checked with the server stopped, or on a copy.
    #[arg(value_name = "STORE")]
    pub store: String,
    /// Pages and rows only (PRAGMA quick_check), not every index entry.
    #[arg(long)]
    pub quick: bool,
}

/// `mllp-reactor check`: prints `ok` or every problem found; `Ok(false)` on damage.
pub fn check(args: &CheckArgs) -> Result<bool, String> {
    if is_postgres_url(&args.store) {
        return Err("check supports SQLite stores (for PostgreSQL use amcheck)".to_owned());
    }
    let depth = if args.quick {
        CheckDepth::Quick
    } else {
        CheckDepth::Full
    };
    let outcome = check_sqlite(
        Path::new(&args.store),
        depth,
        None,
        &SqliteOptions::default(),
    )
    .map_err(|e| e.to_string())?;
    match outcome {
        CheckOutcome::Ok => {
            println!("ok");
            Ok(true)
        }
        CheckOutcome::Damaged(problems) => {
            for p in &problems {
                println!("{p}");
            }
            eprintln!(
                "error: {} is damaged ({} problems listed)",
                args.store,
                problems.len()
            );
            Ok(false)
        }
        // No budget was given, so the check always finishes.
        _ => Err("the check did not finish".to_owned()),
    }
}

/// `serve`'s start-up check of an existing SQLite store, bounded by `STARTUP_CHECK_BUDGET`:
/// `Err` with the one-line refusal for a damaged store.
pub fn check_at_start(store: &str) -> Result<(), String> {
    let path = Path::new(store);
    if is_postgres_url(store) || !path.is_file() {
        return Ok(());
    }
    match check_sqlite(
        path,
        CheckDepth::Quick,
        Some(STARTUP_CHECK_BUDGET),
        &SqliteOptions::default(),
    ) {
        Ok(CheckOutcome::Damaged(problems)) => Err(refusal(path, &problems)),
        Ok(CheckOutcome::Incomplete) => {
            tracing::info!(
                target: "mllp::store",
                budget = ?STARTUP_CHECK_BUDGET,
                "start-up integrity check incomplete (large store): run `mllp-reactor check` offline"
            );
            Ok(())
        }
        // Opening problems are reported by the open that follows, in its own words.
        _ => Ok(()),
    }
}

/// Logs an error once when the store reports damage found during service.
pub fn watch_corruption(health: mllp_store::health::Pulse, store: String) {
    let _ = std::thread::Builder::new()
        .name("store-integrity".to_owned())
        .spawn(move || {
            while !health.is_corrupt() {
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
            tracing::error!(
                target: "mllp::store",
                store = %store,
                "the store's file is damaged: new messages get AE, /readyz is 503; stop the \
                 server and run `mllp-reactor check`"
            );
        });
}
