//! Settings, and locations in words, never with a password.

use tokio_postgres::config::Host;
use tokio_postgres::{Client, Config};

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
    }
}
