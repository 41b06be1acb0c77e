//! Tests of the `mllp-reactor` binary as an operator runs it: exit codes, one-line errors that
//! name the file or flag, logs, metrics and the config file. One test binary (link time on
//! 2 cores); every child process is killed when its test ends, every wait has a deadline.
// A binary (or test/example root): `pub` inside it only ever means crate-visible.
#![allow(unreachable_pub)]

#[path = "cli/bench.rs"]
mod bench;
#[path = "cli/config.rs"]
mod config;
#[path = "cli/deploy.rs"]
mod deploy;
#[path = "cli/logs.rs"]
mod logs;
#[path = "cli/scrape.rs"]
mod scrape;
#[path = "cli/send.rs"]
mod send;
#[path = "cli/serve.rs"]
mod serve;
#[path = "cli/store_admin.rs"]
mod store_admin;
#[path = "cli/store_admin_pg.rs"]
mod store_admin_pg;
#[path = "cli/util.rs"]
mod util;
