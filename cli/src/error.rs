//! The CLI's errors: [`CliError`], the one type every subcommand returns, and the smaller
//! enums it carries ([`ValueError`] for a flag's value, [`ConfigFileError`] for `--config`,
//! [`InputError`] for `send`'s files).
//!
//! Each prints as one line without a trailing newline; `main` writes it as `error: LINE` and
//! exits with [`CliError::exit_code`]: 2 for bad usage (a flag, a config file, an environment
//! variable the operator can fix before trying again), 1 for anything that failed while
//! running. The only module it imports from is the load generator (for its error), which
//! imports nothing back: every other module may use this one without a cycle.

use std::error::Error as StdError;
use std::fmt;
use std::io;
use std::path::PathBuf;

use mllp_reactor::client::ClientError;

use crate::loadgen::LoadError;

/// Exit status for errors found while running.
pub const EXIT_FAILURE: u8 = 1;
/// Exit status for bad command-line usage (clap's and sysexits' convention).
pub const EXIT_USAGE: u8 = 2;

/// Everything a subcommand can fail with.
#[derive(Debug)]
pub enum CliError {
    /// clap refused the command line (help and version output are not errors).
    Args(clap::Error),
    /// A flag's value, or a combination of flags, that clap's own checks let through.
    Flag {
        /// The flag, e.g. `--listen`; empty for a positional argument, whose problem names
        /// the value itself.
        flag: String,
        /// What is wrong with it.
        problem: ValueError,
    },
    /// A value the server's builder refused (a backstop: the flag parsers catch these first).
    Config {
        /// The flag that set it.
        flag: String,
        /// The builder's reason.
        source: mllp_reactor::ConfigError,
    },
    /// The `serve --config` file.
    ConfigFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: ConfigFileError,
    },
    /// An environment variable (`RUST_LOG`, `STATE_DIRECTORY`).
    Env {
        /// The variable's name.
        var: &'static str,
        /// What is wrong with its value.
        problem: ValueError,
    },
    /// A file or standard input that could not be read.
    Read {
        /// What was read, e.g. `standard input` or the file name.
        what: String,
        /// The OS error.
        source: io::Error,
    },
    /// A message in `send`'s input that cannot be sent.
    Input(InputError),
    /// A thread or signal handler the tool needs could not be set up.
    Setup {
        /// What could not be set up.
        what: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// An address could not be listened on (`--listen`, `--metrics`).
    Listen {
        /// The flag and the address as typed, e.g. `--listen 0.0.0.0:2575`.
        flag: String,
        /// The OS error.
        source: io::Error,
    },
    /// The MLLP server failed to start or while running.
    Server(mllp_reactor::Error),
    /// The store could not be opened, or an operation on it failed (the store's error names
    /// it).
    Store(mllp_store::StoreError),
    /// The background retention pruner could not start.
    Retention(mllp_store::StoreError),
    /// The store did not shut down cleanly.
    StoreClose(mllp_store::CloseError),
    /// `export` failed.
    Export(mllp_store::export::ExportError),
    /// A TLS file given by a flag could not be used.
    Tls {
        /// The flag(s), e.g. `--tls-cert cert.pem / --tls-key key.pem`.
        flag: String,
        /// Why.
        source: mllp_reactor::tls::TlsError,
    },
    /// `send` could not connect or lost its connection.
    Client {
        /// Where: `cannot connect to ADDR` or `FILE: message N`.
        context: String,
        /// Why.
        source: ClientError,
    },
    /// Forwarding could not start, or `forward status`/`requeue` failed.
    Forward(mllp_store::forward::ForwardError),
    /// `forward requeue ID…`: none of the ids is a dead letter.
    NoDeadLetters,
    /// `bench` could not carry out its run.
    Load(LoadError),
    /// `bench` ran, but some messages got no valid ACK.
    RunErrors {
        /// How many errors.
        count: u64,
        /// The kinds, as the report names them.
        kinds: String,
    },
    /// `send` got a NAK, or `resend` a reply other than AA: it printed the ACK line
    /// already, so nothing more is written.
    Nak,
    /// `--min-free-disk`: the free space of the store's directory cannot be read.
    DiskSpace {
        /// The directory.
        dir: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// `serve`'s start-up check found the store damaged.
    Damaged {
        /// The store file.
        path: PathBuf,
        /// The problems found (the first is shown).
        problems: Vec<String>,
    },
    /// `check` found the store damaged (it printed every problem on stdout).
    CheckFailed {
        /// The store, as given (never a password).
        store: String,
        /// How many problems it printed.
        problems: usize,
    },
    /// `check` found a PostgreSQL server whose settings can lose acknowledged messages (it
    /// printed them on stdout).
    CheckUnsafe {
        /// The store, as given (never a password).
        store: String,
        /// How many problems it printed.
        problems: usize,
    },
    /// `check` did not finish (it has no time budget, so this is not expected).
    CheckIncomplete,
    /// `resend ID…`: ids no stored message has.
    NoSuchMessages(Vec<i64>),
    /// `resend` sent the messages, but recording the resends in the store failed.
    ResendAudit(mllp_store::StoreError),
    /// Writing the results to stdout failed.
    Write(io::Error),
}

impl CliError {
    /// A flag's value refused after parsing.
    pub fn flag(flag: impl Into<String>, problem: ValueError) -> Self {
        Self::Flag {
            flag: flag.into(),
            problem,
        }
    }

    /// The process exit status for this error: [`EXIT_USAGE`] or [`EXIT_FAILURE`].
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Args(_)
            | Self::Flag { .. }
            | Self::Config { .. }
            | Self::ConfigFile { .. }
            | Self::Env { .. } => EXIT_USAGE,
            _ => EXIT_FAILURE,
        }
    }

    /// The line to print on stderr, or `None` when there is nothing to add (a NAK `send`
    /// printed already).
    pub fn line(&self) -> Option<String> {
        match self {
            Self::Nak => None,
            other => Some(format!("error: {other}")),
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Args(e) => f.write_str(&clap_line(e)),
            Self::Flag { flag, problem } if flag.is_empty() => problem.fmt(f),
            Self::Flag { flag, problem } => write!(f, "{flag} {problem}"),
            Self::Config { flag, source } => write!(f, "{flag}: {source}"),
            Self::ConfigFile { path, problem } => write!(f, "{}: {problem}", path.display()),
            Self::Env { var, problem } => write!(f, "{var}: {problem}"),
            Self::Read { what, source } => write!(f, "cannot read {what}: {source}"),
            Self::Input(e) => e.fmt(f),
            Self::Setup { what, source } => write!(f, "cannot set up {what}: {source}"),
            Self::Listen { flag, source } => {
                if source.kind() == io::ErrorKind::AddrInUse {
                    write!(
                        f,
                        "{flag} is already in use: stop the other server or pick another address"
                    )
                } else {
                    write!(f, "{flag}: cannot listen: {source}")
                }
            }
            Self::Server(e) => write!(f, "server failed: {e}"),
            Self::Store(e) => e.fmt(f),
            Self::Retention(e) => write!(f, "cannot start retention: {e}"),
            Self::StoreClose(e) => write!(f, "store not closed cleanly: {e}"),
            Self::Export(e) => e.fmt(f),
            Self::Tls { flag, source } => write!(f, "{flag}: {source}"),
            Self::Client { context, source } => {
                write!(f, "{context}: {source}")?;
                match source {
                    ClientError::Connect(io) if io.kind() == io::ErrorKind::ConnectionRefused => {
                        f.write_str(" (is a server listening there?)")
                    }
                    _ => Ok(()),
                }
            }
            Self::Forward(e) => write!(f, "forwarding: {e}"),
            Self::NoDeadLetters => f.write_str("none of these ids is a dead letter"),
            Self::Load(e) => e.fmt(f),
            Self::RunErrors { count, kinds } => {
                write!(f, "{count} errors during the run ({kinds})")
            }
            Self::Nak => f.write_str("a message was not accepted"),
            Self::DiskSpace { dir, source } => write!(
                f,
                "--min-free-disk: cannot read the free space of {}: {source}",
                dir.display()
            ),
            Self::Damaged { path, problems } => {
                f.write_str(&mllp_store::integrity::refusal(path, problems))
            }
            Self::CheckFailed { store, problems } => {
                write!(f, "{store} is damaged ({problems} problems listed)")
            }
            Self::CheckUnsafe { store, problems } => write!(
                f,
                "{store} can lose acknowledged messages as its server is configured \
                 ({problems} problems listed)"
            ),
            Self::CheckIncomplete => f.write_str("the check did not finish"),
            Self::NoSuchMessages(ids) => {
                f.write_str("no stored message with id ")?;
                for (i, id) in ids.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{id}")?;
                }
                Ok(())
            }
            Self::ResendAudit(e) => write!(
                f,
                "the messages were sent but the audit was not recorded: {e}"
            ),
            Self::Write(e) => write!(f, "cannot write: {e}"),
        }
    }
}

impl StdError for CliError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            Self::Args(e) => Some(e),
            Self::Flag { problem, .. } | Self::Env { problem, .. } => Some(problem),
            Self::Config { source, .. } => Some(source),
            Self::ConfigFile { problem, .. } => Some(problem),
            Self::Read { source, .. }
            | Self::Setup { source, .. }
            | Self::Listen { source, .. } => Some(source),
            Self::Input(e) => Some(e),
            Self::Server(e) => Some(e),
            Self::Store(e) | Self::Retention(e) | Self::ResendAudit(e) => Some(e),
            Self::DiskSpace { source, .. } => Some(source),
            Self::Write(e) => Some(e),
            Self::StoreClose(e) => Some(e),
            Self::Export(e) => Some(e),
            Self::Tls { source, .. } => Some(source),
            Self::Client { source, .. } => Some(source),
            Self::Forward(e) => Some(e),
            Self::Load(e) => Some(e),
            Self::RunErrors { .. }
            | Self::Nak
            | Self::NoDeadLetters
            | Self::Damaged { .. }
            | Self::CheckFailed { .. }
            | Self::CheckUnsafe { .. }
            | Self::CheckIncomplete
            | Self::NoSuchMessages(_) => None,
        }
    }
}

/// Whether clap's "error" is help or version output, to be printed as clap formats it.
pub fn is_help(error: &clap::Error) -> bool {
    use clap::error::ErrorKind;
    matches!(
        error.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    )
}

/// A clap error as one line (`error: ...` without the prefix, the usage and the hint).
pub fn clap_line(error: &clap::Error) -> String {
    error
        .to_string()
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
        .trim_start_matches("error: ")
        .to_owned()
}

/// Why a flag's (or a config key's, or a variable's) value is refused. clap prints it after
/// `invalid value 'TEXT' for '--flag'`, so it does not repeat the value unless it helps.
#[derive(Debug)]
pub enum ValueError {
    /// A duration without a unit (`10`).
    NoUnit,
    /// A duration that does not start with a number.
    NotANumber,
    /// A duration with a unit other than ms, s, m, h.
    UnknownUnit(String),
    /// A duration or size too large to represent.
    TooLarge,
    /// A size with a unit other than B, KB, MB, GB, TB, KiB, MiB, GiB, TiB.
    UnknownSizeUnit(String),
    /// `--retain 0s`: zero would remove every message.
    ZeroRetain,
    /// A command that supports SQLite stores only.
    /// Not of the expected form (the text is the form, e.g. `NAME=HOST:PORT`).
    Expected(&'static str),
    /// `--forward-set` for a destination no `--forward` names.
    NoSuchDestination(String),
    /// A destination setting's key that does not exist.
    UnknownKey(String),
    /// A value a library type refused (its own error says why).
    Invalid(Box<dyn StdError + Send + Sync>),
    /// A flag that needs another one.
    Needs(&'static str),
    /// `--forward` with `--no-store`: messages are forwarded from the store.
    NeedsStore,
    /// Zero where only a positive value works.
    Zero,
    /// Not a whole number.
    NotWholeNumber,
    /// A count outside its range.
    OutOfRange {
        /// The value given.
        value: u128,
        /// Smallest accepted.
        min: u128,
        /// Largest accepted.
        max: u128,
    },
    /// A log filter item whose level is not a level.
    LogLevel(String),
    /// A log filter that does not parse.
    LogFilter(String),
    /// An address that is only a port (`2575`).
    BarePort(String),
    /// An address without a port.
    NoPort {
        /// The address as typed.
        text: String,
        /// The same with a port, as an example.
        example: String,
    },
    /// A host name that does not resolve.
    Resolve {
        /// The address as typed.
        text: String,
        /// The resolver's error.
        source: io::Error,
    },
    /// A name that resolved to no address.
    NoAddress(String),
    /// A flag that only applies to a PostgreSQL store.
    OnlyPostgres,
    /// `--max-memory` below two messages of `--max-message-size`.
    BelowTwoMessages {
        /// `--max-message-size`.
        max_message_size: usize,
    },
    /// A relative path where the process's working directory is not where the user thinks.
    NotAbsolute,
    /// A percentage outside 0 % to 100 %.
    Percent,
}

impl fmt::Display for ValueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoUnit => f.write_str("has no unit (use ms, s, m or h, e.g. 10s)"),
            Self::NotANumber => f.write_str("does not start with a number"),
            Self::UnknownUnit(unit) => write!(f, "has unknown unit {unit:?} (use ms, s, m or h)"),
            Self::TooLarge => f.write_str("is out of range"),
            Self::UnknownSizeUnit(unit) => {
                write!(f, "has unknown unit {unit:?} (use B, MB, GB, MiB, GiB, …)")
            }
            Self::ZeroRetain => {
                f.write_str("must be greater than zero (use `forever` to keep everything)")
            }
            Self::Expected(form) => write!(f, "expected {form}"),
            Self::NoSuchDestination(name) => write!(f, "no --forward {name}=HOST:PORT"),
            Self::UnknownKey(key) => write!(f, "unknown key {key:?}"),
            Self::Invalid(e) => e.fmt(f),
            Self::Needs(other) => write!(f, "needs {other}"),
            Self::NeedsStore => {
                f.write_str("needs the store: messages are forwarded from it (drop --no-store)")
            }
            Self::Zero => f.write_str("must be greater than zero"),
            Self::NotWholeNumber => f.write_str("is not a whole number"),
            Self::OutOfRange { value, min, max } => {
                write!(
                    f,
                    "{value} is out of range: must be between {min} and {max}"
                )
            }
            Self::LogLevel(level) => write!(
                f,
                "{level:?} is not a level (use error, warn, info, debug, trace, or \
                 target=level,...)"
            ),
            Self::LogFilter(why) => write!(
                f,
                "{why} (use error, warn, info, debug, trace, or target=level,...)"
            ),
            Self::BarePort(port) => write!(
                f,
                "{port:?} is a port, not an address: give HOST:PORT, e.g. 127.0.0.1:{port}"
            ),
            Self::NoPort { text, example } => {
                write!(f, "{text:?} has no port: give HOST:PORT, e.g. {example}")
            }
            Self::Resolve { text, source } => write!(f, "cannot resolve {text:?}: {source}"),
            Self::NoAddress(text) => write!(f, "{text:?} resolves to no address"),
            Self::OnlyPostgres => {
                f.write_str("applies only to a PostgreSQL store (--store postgres://…)")
            }
            Self::BelowTwoMessages { max_message_size } => write!(
                f,
                "must be at least twice --max-message-size ({max_message_size})"
            ),
            Self::NotAbsolute => f.write_str("must be an absolute path"),
            Self::Percent => f.write_str("is not a percentage between 0% and 100%"),
        }
    }
}

impl StdError for ValueError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            Self::Resolve { source, .. } => Some(source),
            Self::Invalid(e) => Some(e.as_ref()),
            _ => None,
        }
    }
}

/// What is wrong with a `serve --config` file.
#[derive(Debug)]
pub enum ConfigFileError {
    /// It cannot be read.
    Read(io::Error),
    /// It is not TOML.
    Syntax {
        /// The line of the error, from 1, where the parser gives one.
        line: Option<usize>,
        /// The parser's message.
        message: String,
    },
    /// A key that is no `serve` flag.
    UnknownKey(String),
    /// An array for a flag that takes one value.
    NotOneValue(String),
    /// A table or date.
    WrongType(String),
    /// A string or number for a switch.
    Switch(String),
    /// A value the flag refuses (clap's line).
    Value(clap::Error),
    /// `forward.NAME` is not a table.
    ForwardNotTable(String),
    /// A `[forward.NAME]` table without `address`.
    ForwardNoAddress(String),
    /// A `[forward.NAME]` key whose value is not a string, number or boolean.
    ForwardWrongType {
        /// The destination.
        name: String,
        /// The key.
        key: String,
    },
}

impl fmt::Display for ConfigFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Read(e) => write!(f, "cannot read the config file: {e}"),
            Self::Syntax {
                line: Some(line),
                message,
            } => write!(f, "line {line}: {message}"),
            Self::Syntax {
                line: None,
                message,
            } => f.write_str(message),
            Self::UnknownKey(key) => write!(
                f,
                "unknown key `{key}` (keys are `serve` flags without `--`, e.g. \
                 max-message-size; see `mllp-reactor serve --help`)"
            ),
            Self::NotOneValue(key) => write!(f, "key `{key}` takes one value, not an array"),
            Self::WrongType(key) => {
                write!(f, "key `{key}` must be a string, a number or a boolean")
            }
            Self::Switch(key) => write!(f, "key `{key}` is a switch: write `{key} = true`"),
            Self::Value(e) => f.write_str(&clap_line(e)),
            Self::ForwardNotTable(name) => write!(
                f,
                "`forward.{name}` must be a table ([forward.{name}] with address = \"HOST:PORT\")"
            ),
            Self::ForwardNoAddress(name) => {
                write!(f, "[forward.{name}] needs address = \"HOST:PORT\"")
            }
            Self::ForwardWrongType { name, key } => write!(
                f,
                "[forward.{name}] key `{key}` must be a string or a number"
            ),
        }
    }
}

impl StdError for ConfigFileError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            Self::Read(e) => Some(e),
            Self::Value(e) => Some(e),
            _ => None,
        }
    }
}

/// A message in `send`'s input that cannot be sent, and where it is.
#[derive(Debug)]
pub struct InputError {
    /// The file (`<stdin>` for standard input).
    pub source: String,
    /// The message's position in it, from 1; `None` for the file as a whole.
    pub position: Option<usize>,
    /// What is wrong.
    pub problem: InputProblem,
}

/// What is wrong with a message of `send`'s input.
#[derive(Debug)]
pub enum InputProblem {
    /// The file holds no message at all.
    Empty,
    /// A byte outside any MLLP frame of a capture.
    OutsideFrame {
        /// The byte.
        byte: u8,
        /// Its offset in the file.
        offset: usize,
    },
    /// A frame without its end block.
    NoEnd,
    /// No MSH segment where the message starts.
    NoMsh {
        /// The parser's reason.
        reason: mllp_reactor::msh::MshError,
        /// How the message starts, for the user to recognise.
        start: String,
    },
    /// MSH-10 is empty or missing.
    NoControlId,
    /// The message contains 0x1C 0x0D.
    ContainsEndBlock,
}

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Some(n) => write!(f, "{}: message {n}: ", self.source)?,
            None => write!(f, "{} ", self.source)?,
        }
        match &self.problem {
            InputProblem::Empty => f.write_str(
                "holds no HL7 message (expected lines starting with MSH, or MLLP frames)",
            ),
            InputProblem::OutsideFrame { byte, offset } => write!(
                f,
                "byte 0x{byte:02X} at offset {offset} is outside any MLLP frame (expected \
                 0x0B, the start of a frame)"
            ),
            InputProblem::NoEnd => {
                f.write_str("the frame has no end (0x1C 0x0D): the capture is cut short")
            }
            InputProblem::NoMsh { reason, start } => write!(
                f,
                "{reason} (it starts with {start:?}; each message must begin with its MSH \
                 segment)"
            ),
            InputProblem::NoControlId => f.write_str(
                "MSH-10 (message control id) is empty or missing; its ACK could not be \
                 matched to it",
            ),
            InputProblem::ContainsEndBlock => {
                f.write_str("contains 0x1C 0x0D, which MLLP cannot carry inside a message")
            }
        }
    }
}

impl StdError for InputError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match &self.problem {
            InputProblem::NoMsh { reason, .. } => Some(reason),
            _ => None,
        }
    }
}
