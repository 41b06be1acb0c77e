//! `mllp-reactor check STORE`, and `serve`'s bounded start-up check: flags in, the store
//! crate's `integrity` out.

use clap::Args;
use mllp_store::integrity::{
    CheckDepth, CheckOutcome, STARTUP_CHECK_BUDGET, check, check_search_index_sqlite, check_sqlite,
};
use mllp_store::{SqliteOptions, StoreSpec};

use crate::error::CliError;

/// `check`'s flags.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The store (an SQLite file, best checked with the server stopped or on a copy; or a
    /// postgres:// URL: settings, schema, and amcheck where the database has it).
    #[arg(value_name = "STORE", value_parser = StoreSpec::parse)]
    pub store: StoreSpec,
    /// SQLite: pages and rows only (PRAGMA quick_check), not every index entry.
    /// PostgreSQL: the settings and schema only, no amcheck.
    #[arg(long)]
    pub quick: bool,
}

/// `mllp-reactor check`: prints `ok` or every problem found ([`CliError::CheckFailed`] on
/// damage).
pub fn run(args: &CheckArgs) -> Result<(), CliError> {
    let depth = if args.quick {
        CheckDepth::Quick
    } else {
        CheckDepth::Full
    };
    let outcome = check(&args.store, depth, None, &crate::store_glue::open_options())
        .map_err(CliError::Store)?;
    if let StoreSpec::Sqlite(path) = &args.store {
        report_search_index(path, depth)?;
    }
    match outcome {
        CheckOutcome::Damaged(problems) => {
            for p in &problems {
                println!("{p}");
            }
            Err(CliError::CheckFailed {
                store: args.store.to_string(),
                problems: problems.len(),
            })
        }
        CheckOutcome::Unsafe(problems) => {
            for p in &problems {
                println!("{p}");
            }
            Err(CliError::CheckUnsafe {
                store: args.store.to_string(),
                problems: problems.len(),
            })
        }
        CheckOutcome::Unchecked(why) => {
            println!("ok (settings and schema); pages and indexes not checked: {why}");
            Ok(())
        }
        CheckOutcome::Ok => {
            println!("ok");
            Ok(())
        }
        // No budget was given, so the check always finishes.
        _ => Err(CliError::CheckIncomplete),
    }
}

/// `check`'s line on the store's search index file, if it has one. Damage there fails
/// nothing: the file is derived from the store, and `serve` rebuilds it.
fn report_search_index(path: &std::path::Path, depth: CheckDepth) -> Result<(), CliError> {
    let side = mllp_store::search_index::index_path(path);
    match check_search_index_sqlite(path, depth).map_err(CliError::Store)? {
        Some(CheckOutcome::Damaged(problems)) => eprintln!(
            "search index {} is damaged ({}); it is derived from the store: the next `serve` \
             rebuilds it (search scans meanwhile)",
            side.display(),
            problems.first().map_or("", String::as_str)
        ),
        Some(_) => eprintln!("search index {}: ok", side.display()),
        None => {}
    }
    Ok(())
}

/// `serve`'s start-up check of an existing SQLite store, bounded by `STARTUP_CHECK_BUDGET`:
/// [`CliError::Damaged`] for a damaged store.
pub fn check_at_start(store: &StoreSpec) -> Result<(), CliError> {
    let StoreSpec::Sqlite(path) = store else {
        return Ok(());
    };
    if !path.is_file() {
        return Ok(());
    }
    match check_sqlite(
        path,
        CheckDepth::Quick,
        Some(STARTUP_CHECK_BUDGET),
        &SqliteOptions::default(),
    ) {
        Ok(CheckOutcome::Damaged(problems)) => Err(CliError::Damaged {
            path: path.clone(),
            problems,
        }),
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
