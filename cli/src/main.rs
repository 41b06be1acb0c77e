//! `mllp-reactor`: the command-line tool. One module per subcommand; `main` only parses,
//! dispatches, and turns every error into one line on stderr and its exit status
//! ([`error::CliError::exit_code`]).
//!
//! Modules depend one way: `main` → subcommands (`serve`, `send`, `bench`, `export`,
//! `forward`, `retention`'s `prune`, `search`, `integrity`'s `check`, `resend`) → `args`
//! (flags), `config`, `logging`, `addr`, `tls_client`, `health` → `parse` → `error` →
//! `loadgen`.
// A binary (or test/example root): `pub` inside it only ever means crate-visible.
#![allow(unreachable_pub)]

mod addr;
mod args;
mod bench;
mod config;
mod error;
mod export;
mod forward;
mod health;
mod integrity;
mod loadgen;
mod logging;
mod parse;
mod prometheus;
mod resend;
mod retention;
mod search;
mod send;
mod serve;
mod store_glue;
mod tls_client;

use std::process::ExitCode;

use clap::Parser;

use crate::args::{Cli, Command};
use crate::error::CliError;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(CliError::Args(e)) if error::is_help(&e) => {
            // Help and version: printed as clap prints them. Printing can only fail if stdout
            // is gone; nothing useful is left to do then.
            let _ = e.print();
            ExitCode::from(if e.use_stderr() { error::EXIT_USAGE } else { 0 })
        }
        Err(e) => {
            if let Some(line) = e.line() {
                eprintln!("{line}");
            }
            ExitCode::from(e.exit_code())
        }
    }
}

/// Parses the command line (with `serve --config`'s file) and runs the subcommand.
fn run() -> Result<(), CliError> {
    let args = config::expand(std::env::args_os().collect())?;
    let cli = Cli::try_parse_from(args).map_err(CliError::Args)?;
    match cli.command {
        Command::Serve(args) => serve::serve(&args),
        Command::Send(args) => send::send(&args),
        Command::Bench(args) => bench::bench(&args),
        Command::Export(args) => export::export(&args),
        Command::Forward(args) => forward::run(&args),
        Command::Prune(args) => retention::prune(&args),
        Command::Search(args) => search::search(&args),
        Command::Check(args) => integrity::run(&args),
        Command::Resend(args) => resend::resend(&args),
    }
}
