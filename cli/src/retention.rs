//! `serve --retain/--retain-size` and `mllp-reactor prune`: flags in, the store crate's
//! [`RetentionPolicy`] out; the pruning itself lives in `mllp_store::retention`.

use std::time::{Duration, SystemTime};

use clap::Args;
use mllp_store::retention::{PassResult, PruneMode, PruneReport, Pruner, RetentionPolicy};
use mllp_store::{StoreSpec, WriteGate};

use crate::error::{CliError, ValueError};
use crate::parse::{parse_period, parse_size};

/// `serve`'s retention flags.
#[derive(Debug, Clone, Args)]
pub struct RetainArgs {
    /// Remove stored messages older than this (e.g. 30d, 12h; `forever` keeps them), oldest
    /// first, in small batches in the background; never one a forwarding destination has not
    /// delivered or that is dead-lettered.
    #[arg(long, default_value = DEFAULT_RETAIN_TEXT, value_name = "DURATION", value_parser = parse_retain)]
    pub retain: Retain,
    /// Also remove the oldest messages while the store's data is larger than this
    /// (e.g. 50GiB, 500MB; PostgreSQL: an estimate of the rows' bytes, since the table's
    /// size on disk does not shrink when rows are deleted).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub retain_size: Option<u64>,
}

/// A parsed `--retain`: a period, or keep forever; with the text for the start-up log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retain {
    pub period: Option<Duration>,
    pub text: String,
}

/// `mllp-reactor prune`'s flags.
#[derive(Debug, Args)]
pub struct PruneArgs {
    /// The store (an SQLite file or a postgres:// URL).
    #[arg(value_name = "STORE", value_parser = StoreSpec::parse)]
    pub store: StoreSpec,
    /// Remove messages received longer ago than this (e.g. 30d, 12h).
    #[arg(long, value_name = "DURATION", value_parser = parse_period)]
    pub older_than: Duration,
    /// Count what would be removed; change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

impl RetainArgs {
    /// The policy these flags ask for; `None` when nothing is ever removed.
    pub fn policy(&self) -> Option<RetentionPolicy> {
        if self.retain.period.is_none() && self.retain_size.is_none() {
            return None;
        }
        Some(
            RetentionPolicy::default()
                .max_age(self.retain.period)
                .max_bytes(self.retain_size),
        )
    }
}

/// Starts the background pruner for `serve`'s store, logging each pass that removed something
/// (info) or failed (error). `gate` is the SQLite writer's (`None` for PostgreSQL).
pub fn start_pruner(
    store: &StoreSpec,
    gate: Option<WriteGate>,
    args: &RetainArgs,
) -> Result<Option<Pruner>, CliError> {
    let Some(policy) = args.policy() else {
        return Ok(None);
    };
    tracing::info!(
        target: "mllp::store",
        retain = %args.retain.text,
        retain_size = args.retain_size,
        interval = ?policy.interval(),
        "retention on"
    );
    Pruner::start(
        store,
        &crate::store_glue::open_options(),
        policy,
        gate,
        log_pass,
    )
    .map(Some)
    .map_err(CliError::Retention)
}

fn log_pass(result: &PassResult) {
    match result {
        Ok((report, usage)) if report.deleted > 0 || report.released_bytes > 0 => {
            tracing::info!(
                target: "mllp::store",
                deleted = report.deleted,
                deleted_bytes = report.deleted_bytes,
                kept_dead_lettered = report.protected,
                released_bytes = report.released_bytes,
                store_bytes = usage.file_bytes,
                "retention pass"
            );
        }
        Ok(_) => {}
        Err(e) => tracing::error!(target: "mllp::store", error = %e, "retention pass failed"),
    }
}

/// `mllp-reactor prune`: removes (or counts) expired messages now; prints one line.
pub fn prune(args: &PruneArgs) -> Result<(), CliError> {
    let policy = RetentionPolicy::default().max_age(Some(args.older_than));
    let mode = if args.dry_run {
        PruneMode::DryRun
    } else {
        PruneMode::Delete
    };
    let report = mllp_store::retention::prune(
        &args.store,
        &policy,
        SystemTime::now(),
        mode,
        &crate::store_glue::open_options(),
    )
    .map_err(CliError::Store)?;
    println!("{}", summary(&report, args.dry_run));
    Ok(())
}

fn summary(report: &PruneReport, dry_run: bool) -> String {
    let verb = if dry_run { "would remove" } else { "removed" };
    let mut line = format!(
        "{verb} {} messages ({} payload bytes); kept {} dead-lettered",
        report.deleted, report.deleted_bytes, report.protected
    );
    if !dry_run {
        line.push_str(&format!(
            "; gave {} bytes back to the file system",
            report.released_bytes
        ));
    }
    line
}

/// `--retain`: a period (with `d` for days as well as the usual units) or `forever`.
fn parse_retain(text: &str) -> Result<Retain, ValueError> {
    let text = text.trim();
    let period = match text {
        "forever" | "off" => None,
        _ => Some(parse_period(text)?),
    };
    if period.is_some_and(|p| p.is_zero()) {
        return Err(ValueError::ZeroRetain);
    }
    Ok(Retain {
        period,
        text: text.to_owned(),
    })
}

/// `--retain`'s default (the store crate's `DEFAULT_RETAIN`).
const DEFAULT_RETAIN_TEXT: &str = "30d";

#[cfg(test)]
mod tests {
    use super::*;
    use mllp_store::retention::DEFAULT_RETAIN;

    #[test]
    fn retain_takes_periods_and_forever() {
        assert_eq!(parse_retain("forever").unwrap().period, None);
        assert!(parse_retain("0s").is_err());
        assert_eq!(
            parse_retain(DEFAULT_RETAIN_TEXT).unwrap().period,
            Some(DEFAULT_RETAIN)
        );
    }
}
