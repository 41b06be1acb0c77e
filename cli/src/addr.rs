//! Turning an address as typed (`127.0.0.1:2575`, `[::1]:2575`, `mllp.example:2575`) into
//! socket addresses, the same way in every subcommand, with a hint for the usual slips.

use std::net::{SocketAddr, ToSocketAddrs};

use crate::error::{CliError, ValueError};

/// Resolves `text` to every address it names, in resolver order.
///
/// # Errors
///
/// A bare port or a host without a port gets a hint with the fix, a name that does not
/// resolve gets the resolver's reason.
pub fn resolve_all(text: &str) -> Result<Vec<SocketAddr>, ValueError> {
    let text = text.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ValueError::BarePort(text.to_owned()));
    }
    // `host` alone, or an IPv6 address without brackets: no port to connect to.
    let has_port = text.rsplit_once(':').is_some_and(|(host, port)| {
        !port.is_empty() && (!host.contains(':') || host.ends_with(']'))
    });
    if !has_port {
        let host = if text.contains(':') {
            format!("[{text}]")
        } else {
            text.to_owned()
        };
        return Err(ValueError::NoPort {
            text: text.to_owned(),
            example: format!("{host}:2575"),
        });
    }
    let addrs: Vec<SocketAddr> = text
        .to_socket_addrs()
        .map_err(|source| ValueError::Resolve {
            text: text.to_owned(),
            source,
        })?
        .collect();
    if addrs.is_empty() {
        return Err(ValueError::NoAddress(text.to_owned()));
    }
    Ok(addrs)
}

/// [`resolve_all`] for the address of `flag` (`--listen`, `--to`, …), as a [`CliError`]
/// naming the flag: a usage error.
pub fn resolve_flag_all(flag: &str, text: &str) -> Result<Vec<SocketAddr>, CliError> {
    resolve_all(text).map_err(|problem| CliError::flag(flag, problem))
}

/// The first address of [`resolve_flag_all`].
pub fn resolve_flag(flag: &str, text: &str) -> Result<SocketAddr, CliError> {
    resolve_flag_all(flag, text).map(|addrs| addrs[0])
}

/// The first address `text` resolves to (see [`resolve_all`]).
#[cfg(test)]
fn resolve(text: &str) -> Result<SocketAddr, ValueError> {
    resolve_all(text).map(|addrs| addrs[0])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_host_names_resolve() {
        assert_eq!(
            resolve("127.0.0.1:2575").unwrap(),
            "127.0.0.1:2575".parse().unwrap()
        );
        assert_eq!(resolve("[::1]:7").unwrap(), "[::1]:7".parse().unwrap());
        assert!(
            resolve_all("localhost:2575")
                .unwrap()
                .iter()
                .all(|a| a.ip().is_loopback() && a.port() == 2575)
        );
    }

    #[test]
    fn slips_get_a_hint() {
        let e = resolve("2575").unwrap_err().to_string();
        assert!(e.contains("127.0.0.1:2575"), "{e}");
        let e = resolve("localhost").unwrap_err().to_string();
        assert!(
            e.contains("has no port") && e.contains("localhost:2575"),
            "{e}"
        );
        let e = resolve("::1").unwrap_err().to_string();
        assert!(e.contains("[::1]:2575"), "{e}");
        assert!(resolve("localhost:").is_err());
    }
}
