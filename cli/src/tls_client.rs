//! A TLS client configuration from file names: `send`'s and `bench`'s `--tls-*` flags and a
//! forwarding destination's `tls-*` keys. A leaf: it knows no flags, only files.

use std::path::PathBuf;

use crate::error::CliError;

/// The files (and name) a TLS client is configured from.
#[derive(Debug, Default)]
pub struct TlsFiles {
    /// The CAs to trust (PEM); without it, no TLS.
    pub ca: Option<PathBuf>,
    /// The client certificate chain (PEM), for mutual TLS.
    pub cert: Option<PathBuf>,
    /// Its private key (PEM).
    pub key: Option<PathBuf>,
    /// The name to verify the server's certificate against (default: `addr`'s host).
    pub server_name: Option<String>,
}

/// The client's TLS settings for a server at `addr`; `None` without a CA file.
pub fn client_tls(
    files: &TlsFiles,
    addr: &str,
) -> Result<Option<mllp_reactor::tls::ClientTls>, CliError> {
    let Some(ca) = &files.ca else {
        return Ok(None);
    };
    let tls_error = |flag: String| move |source| CliError::Tls { flag, source };
    let mut tls = mllp_reactor::tls::ClientTls::from_ca_file(ca)
        .map_err(tls_error(format!("--tls-ca {}", ca.display())))?;
    if let (Some(cert), Some(key)) = (&files.cert, &files.key) {
        tls = tls
            .client_cert_files(cert, key)
            .map_err(tls_error("--tls-cert/--tls-key".to_owned()))?;
    }
    if let Some(name) = &files.server_name {
        tls = tls
            .server_name(name)
            .map_err(tls_error(format!("--tls-server-name {name}")))?;
    } else if let Some((host, _)) = addr.rsplit_once(':') {
        // Verify against the host the user typed (a name or an address).
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(named) = tls.clone().server_name(host) {
            tls = named;
        }
    }
    Ok(Some(tls))
}
