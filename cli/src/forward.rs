//! Store and forward on the command line: `serve --forward NAME=HOST:PORT` (and its
//! `[forward.NAME]` tables in the config file), `forward status STORE` and
//! `forward requeue STORE ID… | --all-dead`. The engine is [`mllp_store::forward`]; this file
//! only turns flags into its types and prints what it reports.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand};
use mllp_store::forward::{
    Action, Destination, DestinationState, ForwardConfig, ForwardEvent, Forwarder, LaneKey,
    Observer, Requeue, requeue_postgres, requeue_sqlite, status_postgres, status_sqlite,
};
use mllp_store::{StoreSpec, WriteGate};

use crate::error::{CliError, ConfigFileError, ValueError};
use crate::parse::{parse_duration, parse_timeout};
use crate::tls_client::{TlsFiles, client_tls};

/// How often an idle lane of `serve` looks for new messages: short, so that a message is
/// forwarded within about this long after its commit when the lane was idle; a busy lane
/// never waits. An idle poll is three indexed SQLite reads.
const SERVE_POLL_INTERVAL: Duration = Duration::from_millis(10);

/// `serve`'s forwarding flags.
#[derive(Debug, Clone, Args)]
pub struct ForwardFlags {
    /// Forward every stored message to this MLLP destination (repeatable; every destination
    /// gets every message): NAME=HOST:PORT. Needs the store.
    #[arg(long = "forward", value_name = "NAME=HOST:PORT")]
    pub forward: Vec<String>,
    /// One destination's setting, NAME.KEY=VALUE (repeatable). Keys: lanes, key,
    /// connect-timeout, ack-timeout, max-attempts, initial-backoff, max-backoff, on-error,
    /// on-reject, on-invalid (dead-letter|retry|retry-forever), tls-ca, tls-cert, tls-key,
    /// tls-server-name. A config file's [forward.NAME] table (with `address`) gives these.
    #[arg(long = "forward-set", value_name = "NAME.KEY=VALUE")]
    pub forward_set: Vec<String>,
    /// Lanes per destination: messages are spread over them by --forward-key, each lane in
    /// store order, lanes in parallel (1: strict FIFO, one message in flight).
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub forward_lanes: u16,
    /// What picks a message's lane: pid3 (PID-3.1, per patient), msh4 or msh3.
    #[arg(long, default_value = "pid3", value_name = "pid3|msh4|msh3")]
    pub forward_key: LaneKey,
    /// When the sender gets its reply: `stored` (AA once committed) or `forwarded` (once
    /// every destination answered: AA if all gave AA, AE otherwise; needs --forward).
    #[arg(long, value_enum, default_value_t = AckAfter::Stored, value_name = "stored|forwarded")]
    pub ack_after: AckAfter,
    /// With --ack-after forwarded: answer AE when not every destination answered within
    /// this long (the message stays queued and is still delivered).
    #[arg(long, default_value = "30s", value_name = "DURATION", value_parser = parse_ack_timeout)]
    pub forward_ack_timeout: Duration,
}

/// `--ack-after`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AckAfter {
    /// AA once the message is committed to the store.
    Stored,
    /// Once every destination answered.
    Forwarded,
}

impl ForwardFlags {
    /// Whether any destination is configured.
    pub fn is_enabled(&self) -> bool {
        !self.forward.is_empty()
    }
}

/// `--forward-ack-timeout`: a duration greater than zero.
fn parse_ack_timeout(text: &str) -> Result<Duration, ValueError> {
    parse_timeout(text).map(|typed| typed.value)
}

/// The destinations the flags describe. A name given twice takes the last address (so the
/// command line overrides the config file).
///
/// # Errors
///
/// A usage error naming the flag and value at fault.
pub fn destinations(flags: &ForwardFlags) -> Result<Vec<Destination>, CliError> {
    let mut out: Vec<Destination> = Vec::new();
    for spec in &flags.forward {
        let (name, address) = spec
            .split_once('=')
            .filter(|(n, a)| !n.is_empty() && !a.is_empty())
            .ok_or_else(|| {
                CliError::flag(
                    format!("--forward {spec:?}:"),
                    ValueError::Expected("NAME=HOST:PORT"),
                )
            })?;
        let destination = Destination::new(name, address)
            .lanes(flags.forward_lanes)
            .key(flags.forward_key);
        match out.iter_mut().find(|d| d.name == name) {
            Some(existing) => existing.address = address.to_owned(),
            None => out.push(destination),
        }
    }
    let mut tls: Vec<(String, TlsFiles)> = Vec::new();
    for setting in &flags.forward_set {
        let bad = |problem| CliError::flag(format!("--forward-set {setting:?}:"), problem);
        let (target, value) = setting
            .split_once('=')
            .ok_or_else(|| bad(ValueError::Expected("NAME.KEY=VALUE")))?;
        let (name, key) = target
            .split_once('.')
            .ok_or_else(|| bad(ValueError::Expected("NAME.KEY=VALUE")))?;
        let d = out
            .iter_mut()
            .find(|d| d.name == name)
            .ok_or_else(|| bad(ValueError::NoSuchDestination(name.to_owned())))?;
        let files = match tls.iter_mut().find(|(n, _)| n == name) {
            Some((_, files)) => files,
            None => {
                tls.push((name.to_owned(), TlsFiles::default()));
                &mut tls.last_mut().expect("just pushed").1
            }
        };
        apply(d, files, key, value).map_err(bad)?;
    }
    for (name, files) in tls {
        let Some(d) = out.iter_mut().find(|d| d.name == name) else {
            continue;
        };
        let config = client_tls(&files, &d.address).map_err(|e| match e {
            CliError::Tls { flag, source } => CliError::Tls {
                flag: format!("destination {name}: {flag}"),
                source,
            },
            other => other,
        })?;
        if let Some(config) = config {
            d.client = d.client.clone().tls(config);
        }
    }
    Ok(out)
}

/// Applies one `KEY=VALUE` to a destination.
fn apply(
    d: &mut Destination,
    tls: &mut TlsFiles,
    key: &str,
    value: &str,
) -> Result<(), ValueError> {
    let duration = || parse_duration(value);
    let action = || {
        value
            .parse::<Action>()
            .map_err(|e| ValueError::Invalid(Box::new(e)))
    };
    match key {
        "address" => d.address = value.to_owned(),
        "lanes" => d.lanes = value.parse().map_err(|_| ValueError::NotWholeNumber)?,
        "key" => {
            d.key = value
                .parse()
                .map_err(|e| ValueError::Invalid(Box::new(e)))?
        }
        "connect-timeout" => d.client = d.client.clone().connect_timeout(duration()?),
        "ack-timeout" => d.client = d.client.clone().response_timeout(duration()?),
        "max-attempts" => {
            let n = value.parse().map_err(|_| ValueError::NotWholeNumber)?;
            d.policy = d.policy.max_attempts(n);
        }
        "initial-backoff" => d.policy = d.policy.backoff(duration()?, d.policy.max_backoff),
        "max-backoff" => d.policy = d.policy.backoff(d.policy.initial_backoff, duration()?),
        "on-error" => d.policy.on_error = action()?,
        "on-reject" => d.policy.on_reject = action()?,
        "on-invalid" => d.policy.on_invalid = action()?,
        "tls-ca" => tls.ca = Some(value.into()),
        "tls-cert" => tls.cert = Some(value.into()),
        "tls-key" => tls.key = Some(value.into()),
        "tls-server-name" => tls.server_name = Some(value.to_owned()),
        other => return Err(ValueError::UnknownKey(other.to_owned())),
    }
    Ok(())
}

/// The flags of a config file's `[forward.NAME]` tables: `--forward=NAME=ADDRESS` for the
/// `address` key, `--forward-set=NAME.KEY=VALUE` for the others.
///
/// # Errors
///
/// A table without `address`, or a value that is not a string, number or boolean.
pub fn flags_from_table(
    table: &toml::Table,
) -> Result<Vec<(String, std::ffi::OsString)>, ConfigFileError> {
    let mut flags = Vec::new();
    for (name, section) in table {
        let toml::Value::Table(section) = section else {
            return Err(ConfigFileError::ForwardNotTable(name.clone()));
        };
        let address = section
            .get("address")
            .and_then(toml::Value::as_str)
            .ok_or_else(|| ConfigFileError::ForwardNoAddress(name.clone()))?;
        flags.push((
            "forward".to_owned(),
            format!("--forward={name}={address}").into(),
        ));
        for (key, value) in section {
            if key == "address" {
                continue;
            }
            let text = match value {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(n) => n.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                _ => {
                    return Err(ConfigFileError::ForwardWrongType {
                        name: name.clone(),
                        key: key.clone(),
                    });
                }
            };
            flags.push((
                "forward-set".to_owned(),
                format!("--forward-set={name}.{}={text}", key.replace('_', "-")).into(),
            ));
        }
    }
    Ok(flags)
}

/// The destinations to forward to, checked before anything is opened; `None` without
/// `--forward`.
///
/// # Errors
///
/// A usage error: `--forward-set` or `--ack-after forwarded` without `--forward`,
/// `--forward` without a store, or a bad destination.
pub fn plan(
    flags: &ForwardFlags,
    store: Option<&StoreSpec>,
) -> Result<Option<Vec<Destination>>, CliError> {
    let needs_forward = ValueError::Needs("--forward NAME=HOST:PORT");
    if !flags.is_enabled() {
        if !flags.forward_set.is_empty() {
            return Err(CliError::flag("--forward-set", needs_forward));
        }
        if flags.ack_after == AckAfter::Forwarded {
            return Err(CliError::flag("--ack-after forwarded", needs_forward));
        }
        return Ok(None);
    }
    if store.is_none() {
        return Err(CliError::flag("--forward", ValueError::NeedsStore));
    }
    destinations(flags).map(Some)
}

/// Starts forwarding `destinations` from the store `spec`.
///
/// # Errors
///
/// [`CliError::Forward`] with the store's error.
pub fn start(
    destinations: Vec<Destination>,
    spec: &StoreSpec,
    gate: Option<WriteGate>,
) -> Result<Forwarder, CliError> {
    let shown: Vec<String> = destinations
        .iter()
        .map(|d| {
            format!(
                "{}={} ({} lanes by {})",
                d.name,
                d.address,
                d.lanes,
                d.key.as_str()
            )
        })
        .collect();
    let mut config = ForwardConfig::default().poll_interval(SERVE_POLL_INTERVAL);
    if let Some(gate) = gate {
        config = config.gate(gate);
    }
    let forwarder = match spec {
        StoreSpec::Sqlite(path) => {
            Forwarder::start_sqlite(path, destinations, config, Some(observer()))
        }
        other => {
            let options = crate::store_glue::open_options().postgres;
            Forwarder::start_postgres(
                &postgres_url(other),
                &options,
                destinations,
                config,
                Some(observer()),
            )
        }
    }
    .map_err(CliError::Forward)?;
    tracing::info!(target: "mllp::forward", destinations = %shown.join(", "), "forwarding");
    Ok(forwarder)
}

/// The URL of a PostgreSQL store spec (with its password: it is not shown anywhere).
fn postgres_url(spec: &StoreSpec) -> String {
    match spec {
        StoreSpec::Postgres(url) => url.clone(),
        other => other.to_string(),
    }
}

/// The handler of `--ack-after forwarded`, when set.
pub fn ack_after_handler(
    flags: &ForwardFlags,
    store: Option<&Arc<mllp_store::Store>>,
    forwarder: Option<&Forwarder>,
) -> Option<impl mllp_reactor::Handler> {
    match (flags.ack_after, store, forwarder) {
        (AckAfter::Forwarded, Some(store), Some(forwarder)) => {
            Some(mllp_store::forward::ack_after_forwarded(
                Arc::clone(store),
                forwarder.watcher(),
                flags.forward_ack_timeout,
            ))
        }
        _ => None,
    }
}

/// Logs one line per destination state change, per dead letter and per store error.
fn observer() -> Observer {
    Arc::new(|event: &ForwardEvent<'_>| match event {
        ForwardEvent::State {
            destination,
            state: DestinationState::Up,
            ..
        } => tracing::info!(target: "mllp::forward", destination, state = "up", "destination up"),
        ForwardEvent::State {
            destination,
            state,
            reason,
        } => tracing::warn!(
            target: "mllp::forward",
            destination,
            state = state.as_str(),
            reason = reason.unwrap_or_default(),
            "destination {}", state.as_str()
        ),
        ForwardEvent::DeadLetter {
            destination,
            lane,
            message_id,
            attempts,
            reason,
        } => tracing::warn!(
            target: "mllp::forward",
            destination,
            lane,
            message_id,
            attempts,
            reason,
            "message dead-lettered"
        ),
        ForwardEvent::StoreError {
            destination,
            lane,
            error,
        } => tracing::error!(
            target: "mllp::forward",
            destination,
            lane,
            error = %error,
            "forwarding state not written, retrying"
        ),
        _ => {}
    })
}

/// `mllp-reactor forward …`.
#[derive(Debug, Args)]
pub struct ForwardArgs {
    #[command(subcommand)]
    command: ForwardCommand,
}

#[derive(Debug, Subcommand)]
enum ForwardCommand {
    /// Per destination and lane: cursor, messages after it, oldest undelivered age,
    /// dead letters, last error (works while serve runs).
    Status {
        /// The store (an SQLite file or a postgres:// URL, as given to serve --store).
        #[arg(value_name = "STORE", value_parser = StoreSpec::parse)]
        store: StoreSpec,
    },
    /// Put dead letters back in their lanes; a running serve delivers them again.
    Requeue {
        /// The store (an SQLite file or a postgres:// URL, as given to serve --store).
        #[arg(value_name = "STORE", value_parser = StoreSpec::parse)]
        store: StoreSpec,
        /// Store ids of the dead letters.
        #[arg(value_name = "ID", required_unless_present = "all_dead")]
        ids: Vec<i64>,
        /// Every dead letter.
        #[arg(long, conflicts_with = "ids")]
        all_dead: bool,
        /// Only this destination's dead letters (default: every destination's).
        #[arg(long, value_name = "NAME")]
        destination: Option<String>,
    },
}

/// Runs `forward status` or `forward requeue`.
///
/// # Errors
///
/// [`CliError::Forward`] with the store's error; [`CliError::NoDeadLetters`] when none of
/// the ids given is a dead letter.
pub fn run(args: &ForwardArgs) -> Result<(), CliError> {
    let options = crate::store_glue::open_options().postgres;
    match &args.command {
        ForwardCommand::Status { store } => {
            let lanes = match store {
                StoreSpec::Sqlite(path) => status_sqlite(path),
                other => status_postgres(&postgres_url(other), &options),
            }
            .map_err(CliError::Forward)?;
            print!("{}", status_table(&lanes, now_us()));
            Ok(())
        }
        ForwardCommand::Requeue {
            store,
            ids,
            all_dead,
            destination,
        } => {
            let which = if *all_dead {
                Requeue::AllDead
            } else {
                Requeue::Ids(ids.clone())
            };
            let n = match store {
                StoreSpec::Sqlite(path) => requeue_sqlite(path, &which, destination.as_deref()),
                other => requeue_postgres(
                    &postgres_url(other),
                    &options,
                    &which,
                    destination.as_deref(),
                ),
            }
            .map_err(CliError::Forward)?;
            println!("requeued {n} dead letters");
            if n == 0 && !*all_dead {
                return Err(CliError::NoDeadLetters);
            }
            Ok(())
        }
    }
}

/// The status as a table, one line per lane.
fn status_table(lanes: &[mllp_store::forward::LaneStatus], now_us: i64) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if lanes.is_empty() {
        out.push_str("no destinations: this store was never forwarded from\n");
        return out;
    }
    let _ = writeln!(
        out,
        "{:<16} {:>4} {:<22} {:>12} {:>8} {:>10} {:>5} {:>8}  LAST ERROR",
        "DESTINATION", "LANE", "ADDRESS", "DELIVERED", "DEPTH", "OLDEST", "DEAD", "REQUEUED"
    );
    for l in lanes {
        let oldest = l
            .oldest_received_at_us
            .map(|at| format!("{:.1}s", (now_us - at).max(0) as f64 / 1e6))
            .unwrap_or_else(|| "-".to_owned());
        let depth = if l.lanes > 1 {
            format!("≤{}", l.after_cursor)
        } else {
            l.after_cursor.to_string()
        };
        let _ = writeln!(
            out,
            "{:<16} {:>4} {:<22} {:>12} {:>8} {:>10} {:>5} {:>8}  {}",
            l.destination,
            l.lane,
            l.address.as_deref().unwrap_or("-"),
            l.delivered_through,
            depth,
            oldest,
            l.dead_letters,
            l.requeued,
            l.last_error.as_deref().unwrap_or("-"),
        );
    }
    out
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(forward: &[&str], set: &[&str]) -> ForwardFlags {
        ForwardFlags {
            forward: forward.iter().map(|s| s.to_string()).collect(),
            forward_set: set.iter().map(|s| s.to_string()).collect(),
            forward_lanes: 2,
            forward_key: LaneKey::Msh4,
            ack_after: AckAfter::Stored,
            forward_ack_timeout: Duration::from_secs(30),
        }
    }

    #[test]
    fn flags_become_destinations() {
        let d = destinations(&flags(
            &["lab=127.0.0.1:1", "ehr=h:2", "lab=127.0.0.1:3"],
            &[
                "ehr.lanes=8",
                "ehr.ack-timeout=5s",
                "ehr.on-reject=retry",
                "lab.key=pid3",
            ],
        ))
        .unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(
            (d[0].name.as_str(), d[0].address.as_str()),
            ("lab", "127.0.0.1:3")
        );
        assert_eq!((d[0].lanes, d[0].key), (2, LaneKey::Pid3));
        assert_eq!((d[1].lanes, d[1].key), (8, LaneKey::Msh4));
        assert_eq!(d[1].client.response_timeout, Duration::from_secs(5));
        assert_eq!(d[1].policy.on_reject, Action::Retry);
    }

    #[test]
    fn bad_flags_name_the_value() {
        for (forward, set, want) in [
            (&["nohost"][..], &[][..], "expected NAME=HOST:PORT"),
            (&["a=h:1"], &["b.lanes=2"], "no --forward b=HOST:PORT"),
            (&["a=h:1"], &["a.bogus=2"], "unknown key"),
            (&["a=h:1"], &["a.on-error=maybe"], "unknown action"),
            (&["a=h:1"], &["a.ack-timeout=5"], "no unit"),
        ] {
            let e = destinations(&flags(forward, set)).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn config_tables_become_flags() {
        let table: toml::Table = "[lab]\naddress = \"h:1\"\nlanes = 4\nack_timeout = \"5s\"\n"
            .parse()
            .unwrap();
        let flags = flags_from_table(&table).unwrap();
        let flags: Vec<_> = flags.into_iter().map(|(_, f)| f).collect();
        assert_eq!(
            flags,
            [
                "--forward=lab=h:1",
                "--forward-set=lab.ack-timeout=5s",
                "--forward-set=lab.lanes=4"
            ]
            .map(std::ffi::OsString::from)
        );
        let table: toml::Table = "[lab]\nlanes = 4\n".parse().unwrap();
        assert!(
            flags_from_table(&table)
                .unwrap_err()
                .to_string()
                .contains("needs address")
        );
    }

    #[test]
    fn forward_needs_a_store() {
        let f = flags(&["a=h:1"], &[]);
        assert!(
            plan(&f, None)
                .unwrap_err()
                .to_string()
                .contains("needs the store")
        );
    }
}
