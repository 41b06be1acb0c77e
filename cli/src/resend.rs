//! `mllp-reactor resend`: finds stored messages (by id, or with `search`'s filter flags), sends
//! them to `--to` at a bounded rate, checks every ACK (AA, MSA-2 = the message's MSH-10), and
//! records each resend in the store (`mllp_store::resend`).

use std::time::{Duration, Instant};

use clap::Args;
use mllp_reactor::{Client, ClientConfig};
use mllp_store::StoreSpec;
use mllp_store::resend::{ResendAudit, record_resends};

use crate::error::{CliError, ValueError};
use crate::search::{FilterArgs, find};

/// `resend`'s flags.
#[derive(Debug, Args)]
pub struct ResendArgs {
    /// The store (an SQLite file or a postgres:// URL; works while serve runs).
    #[arg(value_name = "STORE", value_parser = StoreSpec::parse)]
    pub store: StoreSpec,
    /// Store ids of the messages to resend (or use --query).
    #[arg(value_name = "ID")]
    pub ids: Vec<i64>,
    /// Resend what the filter flags (as for search) find, oldest first.
    #[arg(long, conflicts_with = "ids")]
    pub query: bool,
    #[command(flatten)]
    pub filter: FilterArgs,
    /// The receiver, HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    pub to: String,
    /// At most this many messages per second (e.g. 50/s).
    #[arg(long, default_value = "50/s", value_name = "N/s", value_parser = parse_rate)]
    pub rate: f64,
    /// List what would be resent; send nothing, record nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Why, recorded with each resend.
    #[arg(long, value_name = "TEXT")]
    pub reason: Option<String>,
}

fn parse_rate(text: &str) -> Result<f64, ValueError> {
    let number = text.trim().strip_suffix("/s").unwrap_or(text.trim());
    match number.parse::<f64>() {
        Ok(r) if r > 0.0 && r.is_finite() => Ok(r),
        _ => Err(ValueError::Expected("a rate greater than zero, e.g. 50/s")),
    }
}

/// The OS user running this command (for the audit trail).
fn os_user() -> String {
    for var in ["USER", "LOGNAME"] {
        if let Ok(name) = std::env::var(var)
            && !name.is_empty()
        {
            return name;
        }
    }
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().next().map(|uid| format!("uid {uid}")))
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

/// `mllp-reactor resend`: one line per message; [`CliError::Nak`] if any was not accepted.
pub fn resend(args: &ResendArgs) -> Result<(), CliError> {
    let filter = if args.query {
        args.filter.filter()
    } else if args.ids.is_empty() {
        return Err(CliError::flag(
            "resend",
            ValueError::Needs("the messages: resend STORE ID… or resend STORE --query …"),
        ));
    } else {
        mllp_store::search::SearchFilter::default()
            .ids(args.ids.clone())
            .limit(args.ids.len())
    };
    let mut found = find(&args.store, &filter)?;
    found.reverse(); // oldest first: the order they were received in
    if !args.ids.is_empty() && found.len() < args.ids.len() {
        let missing: Vec<i64> = args
            .ids
            .iter()
            .copied()
            .filter(|id| !found.iter().any(|r| r.id == *id))
            .collect();
        return Err(CliError::NoSuchMessages(missing));
    }
    if args.dry_run {
        for r in &found {
            println!(
                "would resend {} {}",
                r.id,
                r.control_id.as_deref().unwrap_or("-")
            );
        }
        return Ok(());
    }
    let target = crate::addr::resolve_flag("--to", &args.to)?;
    let user = os_user();
    let gap = Duration::from_secs_f64(1.0 / args.rate);
    let mut client: Option<Client> = None;
    let mut audits = Vec::with_capacity(found.len());
    let mut all_ok = true;
    let mut next = Instant::now();
    for r in &found {
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        next = Instant::now() + gap;
        let config = ClientConfig::default();
        let result = match client
            .take()
            .map_or_else(|| Client::connect(target, config), Ok)
        {
            Ok(mut c) => match c.send(&r.payload) {
                Ok(ack) => {
                    let line = match &ack.text {
                        Some(text) if !ack.is_accept() => format!("{}: {text}", ack.code),
                        _ => ack.code.to_string(),
                    };
                    all_ok &= ack.is_accept();
                    client = Some(c);
                    line
                }
                Err(e) => {
                    all_ok = false;
                    format!("error: {e}")
                }
            },
            Err(e) => {
                all_ok = false;
                format!("error: {e}")
            }
        };
        println!(
            "{} {} {result}",
            r.id,
            r.control_id.as_deref().unwrap_or("-")
        );
        audits.push(ResendAudit::new(
            r.id,
            user.clone(),
            args.to.clone(),
            result,
            args.reason.clone(),
        ));
    }
    record_resends(&args.store, &audits, &crate::store_glue::open_options())
        .map_err(CliError::ResendAudit)?;
    if all_ok { Ok(()) } else { Err(CliError::Nak) }
}
