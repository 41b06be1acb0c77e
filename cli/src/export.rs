//! `mllp-reactor export`: writes a store's messages to stdout in store order.

use std::io;
use std::time::Duration;

use mllp_store::export::{ExportError, Unreadable, export_store};

use crate::args::ExportArgs;
use crate::error::CliError;
use crate::store_glue::open_options;

/// How long export waits for a lock. Readers of a WAL store wait only in rare, short moments
/// (a checkpoint resetting the log), so 1 s is plenty, and a store held exclusively by another
/// program is reported quickly instead of after the writer's 5 s.
const EXPORT_BUSY_TIMEOUT: Duration = Duration::from_secs(1);

/// Streams the records after `since` to stdout. A reader that goes away early (`| head`) ends
/// the export quietly. Each damaged range the export skips is reported on stderr as it is met
/// (`error: ids 1001 to 1500 could not be read (…)`); the export then fails at the end.
pub fn export(opts: &ExportArgs) -> Result<(), CliError> {
    let stdout = io::stdout().lock();
    let out = io::BufWriter::with_capacity(64 * 1024, stdout);
    let options = open_options().lock_timeout(EXPORT_BUSY_TIMEOUT);
    let mut report = |skipped: &Unreadable| eprintln!("error: {skipped}");
    match export_store(
        &opts.store,
        opts.since,
        opts.format,
        &options,
        out,
        &mut report,
    ) {
        Ok(_) => Ok(()),
        Err(ExportError::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(CliError::Export(e)),
    }
}
