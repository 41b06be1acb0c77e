//! Value parsers shared by several modules' flags (`args`, `retention`, `forward`, `health`,
//! `search`): a leaf below them, so `args` (which flattens their flags) and they never import
//! each other.

use std::fmt;
use std::time::Duration;

use crate::error::ValueError;

/// Parses `500ms`, `10s`, `2m`, `1h`, or `1.5s`. A bare number is rejected: the unit must be
/// explicit.
pub fn parse_duration(text: &str) -> Result<Duration, ValueError> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or(ValueError::NoUnit)?;
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().map_err(|_| ValueError::NotANumber)?;
    let scale = match unit {
        "ms" => 0.001,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3_600.0,
        _ => return Err(ValueError::UnknownUnit(unit.to_owned())),
    };
    Duration::try_from_secs_f64(value * scale).map_err(|_| ValueError::TooLarge)
}

/// A period: a duration as [`parse_duration`] takes it, or in days (`30d`).
pub fn parse_period(text: &str) -> Result<Duration, ValueError> {
    let text = text.trim();
    match text.strip_suffix('d') {
        Some(days) => {
            let days: f64 = days.parse().map_err(|_| ValueError::NotANumber)?;
            Duration::try_from_secs_f64(days * 86_400.0).map_err(|_| ValueError::TooLarge)
        }
        None => parse_duration(text),
    }
}

/// A size in bytes: a number with an optional unit B, KB, MB, GB, TB (powers of 1000) or
/// KiB, MiB, GiB, TiB (powers of 1024).
pub fn parse_size(text: &str) -> Result<u64, ValueError> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().map_err(|_| ValueError::NotANumber)?;
    let scale: f64 = match unit.trim() {
        "" | "B" => 1.0,
        "KB" | "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        "TiB" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        other => return Err(ValueError::UnknownSizeUnit(other.to_owned())),
    };
    let bytes = value * scale;
    if !(0.0..1.8e19).contains(&bytes) {
        return Err(ValueError::TooLarge);
    }
    Ok(bytes as u64)
}

/// A duration as the user typed it: compared and used as a [`Duration`], printed as typed (so
/// `--grace 0s` prints `0s`, not `0ns`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypedDuration {
    /// The value.
    pub value: Duration,
    /// The text it was parsed from, trimmed.
    pub text: String,
}

impl fmt::Display for TypedDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// [`parse_duration`], keeping the text.
pub fn parse_typed_duration(text: &str) -> Result<TypedDuration, ValueError> {
    Ok(TypedDuration {
        value: parse_duration(text)?,
        text: text.trim().to_owned(),
    })
}

/// A timeout: a duration greater than zero (zero would close every connection at once).
pub fn parse_timeout(text: &str) -> Result<TypedDuration, ValueError> {
    let typed = parse_typed_duration(text)?;
    if typed.value.is_zero() {
        return Err(ValueError::Zero);
    }
    Ok(typed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_duration_accepts_units() {
        let ok = |t| parse_duration(t).unwrap();
        assert_eq!(ok("500ms"), Duration::from_millis(500));
        assert_eq!(ok("10s"), Duration::from_secs(10));
        assert_eq!(ok("2m"), Duration::from_secs(120));
        assert_eq!(ok("1h"), Duration::from_secs(3_600));
        assert_eq!(ok("1.5s"), Duration::from_millis(1_500));
        assert_eq!(ok("0s"), Duration::ZERO);
    }

    #[test]
    fn sizes_and_periods() {
        assert_eq!(parse_size("50GiB").unwrap(), 50 << 30);
        assert_eq!(parse_size("500MB").unwrap(), 500_000_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("5 parsecs").is_err());
        assert_eq!(
            parse_period("30d").unwrap(),
            Duration::from_secs(30 * 86_400)
        );
        assert_eq!(parse_period("12h").unwrap(), Duration::from_secs(12 * 3600));
        assert_eq!(parse_period("500ms").unwrap(), Duration::from_millis(500));
        assert!(parse_period("soon").is_err());
        assert!(parse_period("30").is_err());
    }

    #[test]
    fn parse_duration_rejects_garbage() {
        for bad in [
            "",
            "10",
            "s",
            "ms",
            "10x",
            "1.2.3s",
            "-1s",
            "10 s",
            "1e400s",
            "99999999999999999999999h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }
}
