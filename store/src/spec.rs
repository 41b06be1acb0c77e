//! [`StoreSpec`]: which store a string names, an SQLite file or a PostgreSQL URL, decided in
//! one place for every caller (`serve --store`, `export --store`, a library user's config).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// Which store to open: an SQLite file or a PostgreSQL database.
///
/// Parsed from the strings operators write (`serve --store`, `export --store`): a string
/// starting with `postgres://` or `postgresql://` is a PostgreSQL connection URL, anything
/// else non-empty is an SQLite file path. Open it with [`Store::open`](crate::Store::open)
/// (writer) or [`export_store`](crate::export::export_store) (reader).
///
/// `Display` and `Debug` never show a password in a URL.
///
/// ```
/// use mllp_store::StoreSpec;
///
/// let spec: StoreSpec = "postgres://mllp:secret@db:5432/mllp".parse()?;
/// assert!(spec.is_postgres());
/// assert_eq!(spec.to_string(), "postgres://mllp:***@db:5432/mllp");
/// let spec: StoreSpec = "./mllp-reactor.db".parse()?;
/// assert_eq!(spec, StoreSpec::Sqlite("./mllp-reactor.db".into()));
/// assert!("".parse::<StoreSpec>().is_err());
/// # Ok::<(), mllp_store::SpecError>(())
/// ```
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreSpec {
    /// An SQLite file (created on first open by a writer).
    Sqlite(PathBuf),
    /// A PostgreSQL connection URL (`postgres://…` or `postgresql://…`; needs the cargo
    /// feature `postgres` to open).
    Postgres(String),
}

impl StoreSpec {
    /// Parses `text` (see the type's docs).
    ///
    /// # Errors
    ///
    /// [`SpecError::Empty`] for an empty string.
    pub fn parse(text: &str) -> Result<Self, SpecError> {
        if text.is_empty() {
            return Err(SpecError::Empty);
        }
        if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            return Ok(Self::Postgres(text.to_owned()));
        }
        Ok(Self::Sqlite(PathBuf::from(text)))
    }

    /// Whether this names a PostgreSQL database.
    pub fn is_postgres(&self) -> bool {
        matches!(self, Self::Postgres(_))
    }
}

impl FromStr for StoreSpec {
    type Err = SpecError;

    fn from_str(text: &str) -> Result<Self, SpecError> {
        Self::parse(text)
    }
}

impl fmt::Display for StoreSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sqlite(path) => write!(f, "{}", path.display()),
            Self::Postgres(url) => f.write_str(&redact(url)),
        }
    }
}

impl fmt::Debug for StoreSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sqlite(path) => f.debug_tuple("Sqlite").field(path).finish(),
            Self::Postgres(url) => f.debug_tuple("Postgres").field(&redact(url)).finish(),
        }
    }
}

/// Why a string names no store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SpecError {
    /// The string is empty.
    Empty,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => f.write_str("the store is empty: give a file path or a postgres:// URL"),
        }
    }
}

impl std::error::Error for SpecError {}

/// `url` with any password replaced by `***` and the query (which may hold one) left out.
pub(crate) fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "the PostgreSQL connection string".to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
    .split('?')
    .next()
    .unwrap_or_default()
    .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_never_show_passwords() {
        assert_eq!(
            redact("postgres://u:pw@h:1/d?password=x"),
            "postgres://u:***@h:1/d"
        );
        assert_eq!(redact("postgres://u@h/d"), "postgres://u@h/d");
        assert_eq!(
            redact("host=h password=x"),
            "the PostgreSQL connection string"
        );
        let spec = StoreSpec::parse("postgresql://u:pw@h/d").unwrap();
        assert!(!format!("{spec:?}").contains("pw"));
    }
}
