//! `mllp-reactor search`: flags in, `mllp_store::search::SearchFilter` out, results printed as
//! a table, JSON lines or HL7. The filter flags ([`FilterArgs`]) are shared with `resend`.

use std::io::{self, Write};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Args;
use mllp_store::export::{Format, RecordWriter, rfc3339_micros};
use mllp_store::search::{DeliveryStatus, SearchFilter};
use mllp_store::{StoreSpec, StoredRecord};

use crate::error::{CliError, ValueError};
use crate::parse::parse_period;

/// The filter flags of `search` and `resend --query`.
#[derive(Debug, Clone, Args)]
pub struct FilterArgs {
    /// MSH-10, exactly.
    #[arg(long, value_name = "ID")]
    pub control_id: Option<String>,
    /// MSH-3, or MSH-3^MSH-4.
    #[arg(long, value_name = "APP[^FAC]")]
    pub sender: Option<String>,
    /// MSH-9 (ADT^A01 also matches ADT^A01^ADT_A01).
    #[arg(long = "type", value_name = "TYPE")]
    pub message_type: Option<String>,
    /// PID-3.1 (the first patient identifier's first component, as sent: not unescaped).
    #[arg(long, value_name = "ID")]
    pub patient: Option<String>,
    /// Received at or after: 2026-12-07T09:00:00Z (UTC), 2026-12-07, or an age such as 2h.
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub since: Option<i64>,
    /// Received before (same forms as --since).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub until: Option<i64>,
    /// stored (any), queued, delivered or dead (forwarding state).
    #[arg(long, value_name = "STATUS")]
    pub status: Option<DeliveryStatus>,
    /// Most messages, newest first.
    #[arg(long, default_value_t = mllp_store::search::DEFAULT_LIMIT, value_name = "N")]
    pub limit: usize,
}

impl FilterArgs {
    /// The store crate's filter for these flags.
    pub fn filter(&self) -> SearchFilter {
        let mut f = SearchFilter::default()
            .received(self.since, self.until)
            .limit(self.limit);
        if let Some(v) = &self.control_id {
            f = f.control_id(v);
        }
        if let Some(v) = &self.sender {
            f = f.sender(v);
        }
        if let Some(v) = &self.message_type {
            f = f.message_type(v);
        }
        if let Some(v) = &self.patient {
            f = f.patient(v);
        }
        if let Some(v) = self.status {
            f = f.status(v);
        }
        f
    }
}

/// `search`'s flags.
#[derive(Debug, Args)]
pub struct SearchArgs {
    /// The store (an SQLite file or a postgres:// URL; works while serve runs).
    #[arg(value_name = "STORE", value_parser = StoreSpec::parse)]
    pub store: StoreSpec,
    #[command(flatten)]
    pub filter: FilterArgs,
    /// table (one line per message), jsonl (as export) or hl7 (the messages).
    #[arg(long, default_value = "table", value_name = "FORMAT")]
    pub format: OutputFormat,
}

/// `search --format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Table,
    Jsonl,
    Hl7,
}

/// Finds the messages in `store` that match `filter`.
pub fn find(store: &StoreSpec, filter: &SearchFilter) -> Result<Vec<StoredRecord>, CliError> {
    mllp_store::search::search(store, filter, &crate::store_glue::open_options())
        .map_err(CliError::Store)
}

/// `mllp-reactor search`.
pub fn search(args: &SearchArgs) -> Result<(), CliError> {
    let found = find(&args.store, &args.filter.filter())?;
    let out = io::BufWriter::new(io::stdout().lock());
    let written = match args.format {
        OutputFormat::Table => table(&found, out),
        OutputFormat::Jsonl => records(Format::Jsonl, &found, out),
        OutputFormat::Hl7 => records(Format::Hl7, &found, out),
    };
    match written {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => Err(CliError::Write(e)),
        _ => Ok(()),
    }
}

fn records(format: Format, found: &[StoredRecord], out: impl Write) -> io::Result<()> {
    let mut writer = RecordWriter::new(format, out);
    for r in found {
        writer.write(r)?;
    }
    writer.finish().map(drop)
}

fn table(found: &[StoredRecord], mut out: impl Write) -> io::Result<()> {
    writeln!(
        out,
        "{:>10}  {:<27}  {:<20}  {:<16}  {:<20}  {:>8}",
        "ID", "RECEIVED", "SENDER", "TYPE", "CONTROL ID", "SIZE"
    )?;
    for r in found {
        let sender = match (&r.sending_application, &r.sending_facility) {
            (Some(a), Some(f)) => format!("{a}^{f}"),
            (Some(a), None) => a.clone(),
            (None, Some(f)) => format!("^{f}"),
            (None, None) => String::new(),
        };
        writeln!(
            out,
            "{:>10}  {:<27}  {:<20}  {:<16}  {:<20}  {:>8}",
            r.id,
            rfc3339_micros(r.received_at_us),
            sender,
            r.message_type.as_deref().unwrap_or(""),
            r.control_id.as_deref().unwrap_or(""),
            r.size
        )?;
    }
    out.flush()
}

/// `--since`/`--until`: `YYYY-MM-DD[THH:MM[:SS]][Z]` in UTC, or an age (`2h`, `30m`, `7d`) before
/// now. Returns µs since the epoch.
fn parse_time(text: &str) -> Result<i64, ValueError> {
    let text = text.trim();
    if let Some(first) = text.chars().next()
        && first.is_ascii_digit()
        && text.len() >= 10
        && text.as_bytes()[4] == b'-'
    {
        return parse_utc(text).ok_or(ValueError::Expected(
            "a time: 2026-12-07T09:00:00Z, 2026-12-07 or an age like 2h",
        ));
    }
    let age = parse_period(text)?;
    let at = SystemTime::now()
        .checked_sub(age)
        .unwrap_or(UNIX_EPOCH)
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    Ok(i64::try_from(at.as_micros()).unwrap_or(i64::MAX))
}

fn parse_utc(text: &str) -> Option<i64> {
    let text = text.strip_suffix('Z').unwrap_or(text);
    let (date, time) = text.split_once(['T', ' ']).unwrap_or((text, "00:00:00"));
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':').map(|p| p.parse::<f64>().ok());
    let (h, min) = (t.next()??, t.next().unwrap_or(Some(0.0))?);
    let s = t.next().unwrap_or(Some(0.0))?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || h >= 24.0 || min >= 60.0 || s >= 61.0 {
        return None;
    }
    let days = mllp_reactor::date::days_from_civil(y, m, day);
    let seconds = days as f64 * 86_400.0 + h * 3600.0 + min * 60.0 + s;
    Some((seconds * 1e6).round() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_as_utc() {
        assert_eq!(parse_utc("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_utc("2026-12-07"), Some(1_796_601_600_000_000));
        assert_eq!(parse_utc("2026-12-07T09:30Z"), Some(1_796_635_800_000_000));
        assert_eq!(
            rfc3339_micros(parse_utc("2024-02-29T23:59:59Z").unwrap()),
            "2024-02-29T23:59:59.000000Z"
        );
        assert!(parse_time("yesterday").is_err());
        assert!(parse_time("2026-13-01").is_err());
        assert!(parse_time("2h").is_ok());
    }
}
