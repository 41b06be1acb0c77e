//! Reading records back: [`Export`] streams them in id order, [`Format`] writes them as JSON
//! lines or HL7 text, and [`export_sqlite`] does both for a store file.
//!
//! An export works while a writer is running: it reads page by page, each page in its own
//! short read transaction, so it never holds a snapshot that would stop SQLite's checkpoints,
//! and it stops at the last id committed when it started.

use std::fmt;
use std::io::{self, Write};
use std::path::Path;

use crate::backend::Backend;
use crate::error::{Problem, StoreError};
use crate::open::OpenOptions;
use crate::record::{StoreId, StoredRecord};
use crate::spec::StoreSpec;
use crate::sqlite::{SqliteBackend, SqliteOptions};

/// Records read per page: large enough that the per-query overhead vanishes, small enough to
/// bound the page's memory together with [`PAGE_BYTES`].
pub const PAGE_RECORDS: usize = 512;

/// Payload bytes per page, past which a page ends early: with it a page holds at most
/// 8 MiB plus one message, whatever the message sizes.
pub const PAGE_BYTES: usize = 8 << 20;

/// Streams the records with `since < id <= last id at start`, in id order.
///
/// Each item is one record, or the error that ended the stream (after an error the iterator
/// is finished).
///
/// # Past damage
///
/// Where a read fails because the file is damaged ([`Problem::Corrupt`]), the export goes on
/// past it where the file allows: it reads one record at a time up to the damage, then probes
/// forward (doubling the step, then halving it back) for the first id from which reading works
/// again, and goes on from there. Each range it skipped is kept as an [`Unreadable`]
/// ([`take_unreadable`](Self::take_unreadable)); records outside them are all exported.
#[derive(Debug)]
pub struct Export<B> {
    backend: B,
    after: StoreId,
    until: StoreId,
    page: std::vec::IntoIter<StoredRecord>,
    finished: bool,
    /// Reads left to make one record at a time (after damage was met).
    careful: usize,
    unreadable: Vec<Unreadable>,
}

/// Ids an [`Export`] could not read (damaged pages) and skipped: `first..=last` (some of them
/// may never have existed), and what reading them said.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Unreadable {
    /// The first id skipped.
    pub first: StoreId,
    /// The last id skipped.
    pub last: StoreId,
    /// The read error met at `first`.
    pub error: StoreError,
}

impl fmt::Display for Unreadable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "id {} could not be read ({})", self.first, self.error)
        } else {
            write!(
                f,
                "ids {} to {} could not be read ({})",
                self.first, self.last, self.error
            )
        }
    }
}

/// Whether `e` is damage that an export can try to read past.
fn is_damage(e: &StoreError) -> bool {
    matches!(e.problem(), Some(Problem::Corrupt))
}

impl<B: Backend> Export<B> {
    /// Starts an export of the records after `since` (0: all), up to the last one committed
    /// now.
    ///
    /// # Errors
    ///
    /// The backend's error reading the last id.
    pub fn new(mut backend: B, since: StoreId) -> Result<Self, StoreError> {
        let until = backend.last_id()?;
        Ok(Self {
            backend,
            after: since,
            until,
            page: Vec::new().into_iter(),
            finished: false,
            careful: 0,
            unreadable: Vec::new(),
        })
    }

    /// The ranges skipped since the last call (see "Past damage" above).
    pub fn take_unreadable(&mut self) -> Vec<Unreadable> {
        std::mem::take(&mut self.unreadable)
    }

    /// Whether reading from `from` works (`Ok(false)`: damage there).
    fn readable_from(&mut self, from: StoreId) -> Result<bool, StoreError> {
        match self.backend.read_after(from, self.until, 1, PAGE_BYTES) {
            Ok(_) => Ok(true),
            Err(e) if is_damage(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Reading from `self.after` failed with damage: the last id of the damaged range, the
    /// smallest found from which reading works again (`until` if none).
    fn skip_damage(&mut self) -> Result<StoreId, StoreError> {
        let start = self.after;
        let mut bad = start;
        let mut step: StoreId = 1;
        let mut good = loop {
            let probe = start.saturating_add(step);
            if probe >= self.until {
                break self.until;
            }
            if self.readable_from(probe)? {
                break probe;
            }
            bad = probe;
            step = step.saturating_mul(2);
        };
        while good - bad > 1 {
            let mid = bad + (good - bad) / 2;
            if self.readable_from(mid)? {
                good = mid;
            } else {
                bad = mid;
            }
        }
        Ok(good)
    }
}

impl<B: Backend> Iterator for Export<B> {
    type Item = Result<StoredRecord, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(record) = self.page.next() {
                return Some(Ok(record));
            }
            if self.finished || self.after >= self.until {
                self.finished = true;
                return None;
            }
            let max = if self.careful > 0 { 1 } else { PAGE_RECORDS };
            match self
                .backend
                .read_after(self.after, self.until, max, PAGE_BYTES)
            {
                Ok(page) => {
                    self.careful = self.careful.saturating_sub(1);
                    let Some(last) = page.last() else {
                        self.finished = true;
                        return None;
                    };
                    self.after = last.id;
                    self.page = page.into_iter();
                }
                // Damage somewhere in the page: read up to it one record at a time.
                Err(e) if is_damage(&e) && self.careful == 0 => self.careful = PAGE_RECORDS,
                // Damage at the next record: skip to where reading works again.
                Err(e) if is_damage(&e) => match self.skip_damage() {
                    Ok(resume) => {
                        self.unreadable.push(Unreadable {
                            first: self.after + 1,
                            last: resume,
                            error: e,
                        });
                        self.after = resume;
                    }
                    Err(e) => {
                        self.finished = true;
                        return Some(Err(e));
                    }
                },
                Err(e) => {
                    self.finished = true;
                    return Some(Err(e));
                }
            }
        }
    }
}

/// How [`RecordWriter`] prints records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// One JSON object per line: `id`, `received_at` (RFC 3339, UTC, µs), `peer`, `local`,
    /// `control_id`, `message_type`, `sending_application`, `sending_facility`,
    /// `client_cert` (under mutual TLS: the sender's certificate as CN, SANs and SHA-256
    /// fingerprint; null otherwise), `size`, `duplicate_of` (null or an id), and the payload as `message` when it is valid UTF-8,
    /// otherwise `message_base64` (standard alphabet, padded). Missing MSH fields are null.
    Jsonl,
    /// The payloads with segment ends (CR, or CR LF) written as newlines and a blank line
    /// between messages; bytes otherwise unchanged.
    Hl7,
}

impl std::str::FromStr for Format {
    type Err = UnknownFormat;

    fn from_str(s: &str) -> Result<Self, UnknownFormat> {
        match s {
            "jsonl" => Ok(Self::Jsonl),
            "hl7" => Ok(Self::Hl7),
            other => Err(UnknownFormat(other.to_owned())),
        }
    }
}

/// A [`Format`] name that is neither `jsonl` nor `hl7` (the name given).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownFormat(pub String);

impl fmt::Display for UnknownFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown export format {:?} (use jsonl or hl7)", self.0)
    }
}

impl std::error::Error for UnknownFormat {}

/// Writes records one after another in a [`Format`].
///
/// ```
/// use mllp_store::export::{Format, RecordWriter};
/// # use mllp_store::StoredRecord;
/// # fn records() -> Vec<StoredRecord> { Vec::new() }
/// let mut out = Vec::new();
/// let mut writer = RecordWriter::new(Format::Hl7, &mut out);
/// for record in records() {
///     writer.write(&record)?;
/// }
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug)]
pub struct RecordWriter<W> {
    format: Format,
    out: W,
    written: u64,
}

impl<W: Write> RecordWriter<W> {
    /// A writer of `format` into `out` (wrap a terminal or pipe in a `BufWriter`).
    pub fn new(format: Format, out: W) -> Self {
        Self {
            format,
            out,
            written: 0,
        }
    }

    /// Writes one record.
    ///
    /// # Errors
    ///
    /// The output's I/O error.
    pub fn write(&mut self, record: &StoredRecord) -> io::Result<()> {
        match self.format {
            Format::Jsonl => write_jsonl(record, &mut self.out)?,
            Format::Hl7 => {
                if self.written > 0 {
                    self.out.write_all(b"\n")?;
                }
                write_hl7(&record.payload, &mut self.out)?;
            }
        }
        self.written += 1;
        Ok(())
    }

    /// Records written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Flushes and returns the output.
    ///
    /// # Errors
    ///
    /// The output's I/O error.
    pub fn finish(mut self) -> io::Result<W> {
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Why [`export_sqlite`] stopped, or failed at the end.
#[derive(Debug)]
#[non_exhaustive]
pub enum ExportError {
    /// Opening or reading the store failed.
    Store(StoreError),
    /// Writing the output failed (`BrokenPipe` when a pager or `head` quit early).
    Output(io::Error),
    /// The export went through to the end, but skipped damaged ranges (see [`Export`]).
    Damaged {
        /// Records written.
        written: u64,
        /// The ranges skipped, in id order.
        unreadable: Vec<Unreadable>,
    },
}

impl fmt::Display for ExportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Store(e) => e.fmt(f),
            Self::Output(e) => write!(f, "cannot write the export: {e}"),
            Self::Damaged {
                written,
                unreadable,
            } => {
                let ids: u64 = unreadable
                    .iter()
                    .map(|u| u.last.saturating_sub(u.first).saturating_add(1) as u64)
                    .sum();
                write!(
                    f,
                    "the store is damaged: {written} messages exported, {} range(s) of ids \
                     could not be read ({ids} ids at most)",
                    unreadable.len()
                )
            }
        }
    }
}

impl std::error::Error for ExportError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Store(e) => Some(e),
            Self::Output(e) => Some(e),
            Self::Damaged { unreadable, .. } => unreadable
                .first()
                .map(|u| &u.error as &(dyn std::error::Error + 'static)),
        }
    }
}

/// Writes the records of the SQLite store at `path` with id > `since`, in id order, to `out`;
/// returns how many. Never creates or changes the file; works while a server writes to it.
///
/// # Errors
///
/// [`ExportError::Store`] for a missing file, a file that is not a store, a lock held past
/// `options.busy_timeout`, or a read failure; [`ExportError::Output`] if `out` fails;
/// [`ExportError::Damaged`] once everything readable of a damaged store was written.
pub fn export_sqlite(
    path: &Path,
    since: StoreId,
    format: Format,
    options: &SqliteOptions,
    out: impl Write,
) -> Result<u64, ExportError> {
    let backend = SqliteBackend::open_read_only(path, options).map_err(ExportError::Store)?;
    write_all(backend, since, format, out, &mut |_| {})
}

/// Writes the records of the PostgreSQL store at `url` with id > `since`, in id order, to
/// `out`; returns how many (feature `postgres`). Its session is read-only; works while nodes
/// write. Ids increase in commit order across all nodes (see [`crate::postgresql`]), so the
/// last id written is a safe `since` for the next run.
///
/// # Errors
///
/// [`ExportError::Store`] for an unreachable server, a database without the store's tables,
/// or a read failure; [`ExportError::Output`] if `out` fails.
#[cfg(feature = "postgres")]
pub fn export_postgres(
    url: &str,
    since: StoreId,
    format: Format,
    options: &crate::postgresql::PostgresOptions,
    out: impl Write,
) -> Result<u64, ExportError> {
    let backend = crate::postgresql::PostgresBackend::connect_read_only(url, options)
        .map_err(ExportError::Store)?;
    write_all(backend, since, format, out, &mut |_| {})
}

/// Writes the records of the store `spec` names with id > `since`, in id order, to `out`;
/// returns how many: [`export_sqlite`] or [`export_postgres`], as the spec says. Calls
/// `on_unreadable` for each damaged range as soon as it was skipped (see [`Export`]).
///
/// # Errors
///
/// As [`export_sqlite`] and [`export_postgres`]; [`ExportError::Store`] with
/// [`crate::Problem::NoPostgres`] for a URL in a build without the
/// feature `postgres`.
pub fn export_store(
    spec: &StoreSpec,
    since: StoreId,
    format: Format,
    options: &OpenOptions,
    out: impl Write,
    on_unreadable: &mut dyn FnMut(&Unreadable),
) -> Result<u64, ExportError> {
    match spec {
        StoreSpec::Sqlite(path) => {
            let backend =
                SqliteBackend::open_read_only(path, &options.sqlite).map_err(ExportError::Store)?;
            write_all(backend, since, format, out, on_unreadable)
        }
        #[cfg(feature = "postgres")]
        StoreSpec::Postgres(url) => export_postgres(url, since, format, &options.postgres, out),
        #[cfg(not(feature = "postgres"))]
        StoreSpec::Postgres(_) => Err(ExportError::Store(StoreError::open(
            std::path::Path::new(&spec.to_string()),
            crate::error::Problem::NoPostgres,
        ))),
    }
}

/// Streams every record after `since` from `backend` into `out` in `format`, past damage
/// (each range skipped goes to `on_unreadable`, and the result is then
/// [`ExportError::Damaged`]).
fn write_all(
    backend: impl Backend,
    since: StoreId,
    format: Format,
    out: impl Write,
    on_unreadable: &mut dyn FnMut(&Unreadable),
) -> Result<u64, ExportError> {
    let mut records = Export::new(backend, since).map_err(ExportError::Store)?;
    let mut writer = RecordWriter::new(format, out);
    let mut unreadable = Vec::new();
    loop {
        let next = records.next();
        for skipped in records.take_unreadable() {
            on_unreadable(&skipped);
            unreadable.push(skipped);
        }
        let Some(record) = next else { break };
        let record = record.map_err(ExportError::Store)?;
        writer.write(&record).map_err(ExportError::Output)?;
    }
    let written = writer.written();
    writer.finish().map_err(ExportError::Output)?;
    if unreadable.is_empty() {
        Ok(written)
    } else {
        Err(ExportError::Damaged {
            written,
            unreadable,
        })
    }
}

/// One JSON line (see [`Format::Jsonl`]).
fn write_jsonl(r: &StoredRecord, out: &mut impl Write) -> io::Result<()> {
    let mut line = String::with_capacity(r.payload.len() + 256);
    line.push_str("{\"id\":");
    line.push_str(&r.id.to_string());
    line.push_str(",\"received_at\":\"");
    line.push_str(&rfc3339_micros(r.received_at_us));
    line.push('"');
    for (name, value) in [
        ("peer", Some(r.peer.as_str())),
        ("local", Some(r.local.as_str())),
        ("control_id", r.control_id.as_deref()),
        ("message_type", r.message_type.as_deref()),
        ("sending_application", r.sending_application.as_deref()),
        ("sending_facility", r.sending_facility.as_deref()),
        ("client_cert", r.client_cert.as_deref()),
    ] {
        line.push_str(",\"");
        line.push_str(name);
        line.push_str("\":");
        match value {
            Some(v) => json_string(v, &mut line),
            None => line.push_str("null"),
        }
    }
    line.push_str(",\"size\":");
    line.push_str(&r.size.to_string());
    line.push_str(",\"duplicate_of\":");
    match r.duplicate_of {
        Some(id) => line.push_str(&id.to_string()),
        None => line.push_str("null"),
    }
    match std::str::from_utf8(&r.payload) {
        Ok(text) => {
            line.push_str(",\"message\":");
            json_string(text, &mut line);
        }
        Err(_) => {
            line.push_str(",\"message_base64\":\"");
            base64(&r.payload, &mut line);
            line.push('"');
        }
    }
    line.push_str("}\n");
    out.write_all(line.as_bytes())
}

/// One message with CR (or CR LF) segment ends as `\n`, ending in a newline.
fn write_hl7(payload: &[u8], out: &mut impl Write) -> io::Result<()> {
    let mut text = Vec::with_capacity(payload.len() + 1);
    let mut bytes = payload.iter().copied().peekable();
    while let Some(b) = bytes.next() {
        if b == b'\r' {
            if bytes.peek() == Some(&b'\n') {
                bytes.next();
            }
            text.push(b'\n');
        } else {
            text.push(b);
        }
    }
    if text.last() != Some(&b'\n') {
        text.push(b'\n');
    }
    out.write_all(&text)
}

/// Appends `s` as a JSON string literal (RFC 8259 §7: quote, backslash and controls escaped).
fn json_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Appends standard, padded base64 (RFC 4648 §4).
fn base64(bytes: &[u8], out: &mut String) {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
}

/// `us` since the Unix epoch as `YYYY-MM-DDTHH:MM:SS.ffffffZ` (RFC 3339, UTC).
pub fn rfc3339_micros(us: i64) -> String {
    let secs = us.div_euclid(1_000_000);
    let micros = us.rem_euclid(1_000_000);
    let days = secs.div_euclid(86_400);
    let of_day = secs.rem_euclid(86_400);
    let (y, m, d) = mllp_reactor::date::civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        of_day / 3600,
        of_day % 3600 / 60,
        of_day % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_instants() {
        assert_eq!(rfc3339_micros(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            rfc3339_micros(1_767_268_800_123_456),
            "2026-01-01T12:00:00.123456Z"
        );
        assert_eq!(
            rfc3339_micros(951_782_400_000_000),
            "2000-02-29T00:00:00.000000Z"
        );
        assert_eq!(rfc3339_micros(-1), "1969-12-31T23:59:59.999999Z");
    }

    #[test]
    fn base64_rfc4648_vectors() {
        for (input, expected) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            let mut out = String::new();
            base64(input.as_bytes(), &mut out);
            assert_eq!(out, expected, "{input:?}");
        }
    }

    #[test]
    fn json_escapes_controls() {
        let mut out = String::new();
        json_string("a\"b\\c\rd\u{1}é", &mut out);
        assert_eq!(out, r#""a\"b\\c\rd\u0001é""#);
    }

    #[test]
    fn hl7_segments_become_lines() {
        let mut out = Vec::new();
        write_hl7(b"MSH|a\rPID|1\r\nPV1|2", &mut out).unwrap();
        assert_eq!(out, b"MSH|a\nPID|1\nPV1|2\n");
    }
}
