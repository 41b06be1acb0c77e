//! `mllp-reactor export`: writes a store's messages to stdout in store order.

use std::io;
use std::path::Path;
use std::time::Duration;

use mllp_store::SqliteOptions;
use mllp_store::export::{ExportError, export_postgres, export_sqlite};
use mllp_store::postgresql::is_postgres_url;

use crate::args::ExportArgs;
use crate::error::CliError;
use crate::store_glue::postgres_options;

/// How long export waits for a lock. Readers of a WAL store wait only in rare, short moments
/// (a checkpoint resetting the log), so 1 s is plenty, and a store held exclusively by another
/// program is reported quickly instead of after the writer's 5 s.
const EXPORT_BUSY_TIMEOUT: Duration = Duration::from_secs(1);

/// Streams the records after `since` to stdout. A reader that goes away early (`| head`) ends
/// the export quietly.
pub fn export(opts: &ExportArgs) -> Result<(), CliError> {
    let stdout = io::stdout().lock();
    let out = io::BufWriter::with_capacity(64 * 1024, stdout);
    let result = if is_postgres_url(&opts.store) {
        let options = postgres_options().lock_timeout(EXPORT_BUSY_TIMEOUT);
        export_postgres(&opts.store, opts.since, opts.format, &options, out)
    } else {
        let options = SqliteOptions::default().busy_timeout(EXPORT_BUSY_TIMEOUT);
        export_sqlite(
            Path::new(&opts.store),
            opts.since,
            opts.format,
            &options,
            out,
        )
    };
    match result {
        Ok(_) => Ok(()),
        Err(ExportError::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(CliError::Export(e)),
    }
}
