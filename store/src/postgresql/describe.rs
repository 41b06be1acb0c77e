//! Errors and locations in words, never with a password.

use std::fmt;

use tokio_postgres::config::Host;
use tokio_postgres::{Client, Config};

/// A `postgres` error in words: the server's message and SQLSTATE for database errors (the
/// crate's own `Display` says only "db error"), the cause chain otherwise.
pub(super) struct Describe<'a>(pub(super) &'a tokio_postgres::Error);

impl fmt::Display for Describe<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(db) = self.0.as_db_error() {
            write!(
                f,
                "{}: {} (SQLSTATE {})",
                db.severity(),
                db.message(),
                db.code().code()
            )?;
            if let Some(detail) = db.detail() {
                write!(f, "; {detail}")?;
            }
            return Ok(());
        }
        write!(f, "{}", self.0)?;
        let mut source = std::error::Error::source(self.0);
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

/// Reads one setting with `SHOW`.
pub(super) async fn show(client: &Client, name: &str) -> Result<String, tokio_postgres::Error> {
    client
        .query_one(&format!("SHOW {name}"), &[])
        .await?
        .try_get(0)
}

/// `postgres://user@host:port/db` for messages: never the password.
pub(super) fn location(config: &Config) -> String {
    let user = config
        .get_user()
        .map(|u| format!("{u}@"))
        .unwrap_or_default();
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let name = match host {
                Host::Tcp(name) if name.contains(':') => format!("[{name}]"),
                Host::Tcp(name) => name.clone(),
                Host::Unix(dir) => dir.display().to_string().replace('/', "%2F"),
            };
            match config.get_ports().get(i).or(config.get_ports().first()) {
                Some(port) => format!("{name}:{port}"),
                None => name,
            }
        })
        .collect();
    let db = config.get_dbname().unwrap_or_default();
    format!("postgres://{user}{}/{db}", hosts.join(","))
}

/// `url` with any password replaced by `***` (for errors about a URL that did not parse).
pub(super) fn redact(url: &str) -> String {
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
    use std::str::FromStr;

    use super::*;

    #[test]
    fn locations_never_show_passwords() {
        let config = Config::from_str("postgres://mllp:secret@db.example:6432/store").unwrap();
        assert_eq!(location(&config), "postgres://mllp@db.example:6432/store");
        let config = Config::from_str("postgresql://u@%2Ftmp%2Fpg/d").unwrap();
        assert_eq!(location(&config), "postgres://u@%2Ftmp%2Fpg:5432/d");
        assert_eq!(
            redact("postgres://u:pw@h:1/d?password=x"),
            "postgres://u:***@h:1/d"
        );
        assert_eq!(redact("postgres://u@h/d"), "postgres://u@h/d");
        assert_eq!(
            redact("host=h password=x"),
            "the PostgreSQL connection string"
        );
    }
}
