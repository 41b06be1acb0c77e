//! A minimal MLLP ACK server: replies AA to every message with an MSH-10 (MSA-2 = that
//! MSH-10), AR to anything else.
//!
//! `cargo run --release --example ack_server -- [ADDR]` (default `127.0.0.1:2575`). Prints
//! `listening on ADDR` as its first line (benchmark scripts read it), then serves until
//! killed. (`mllp-reactor serve` is the full tool, with graceful Ctrl-C.)

use std::io::Write;

use mllp_reactor::{Bytes, Context, Handler, HandlerError, Reply, Server, ack};

/// Answers every message with the ACK builder: AA, or AR when it has no readable MSH-10.
///
/// A handler as a type (rather than `handler_fn`) is where state goes; `Bytes` comes re-exported
/// from the crate, so no direct `bytes` dependency is needed.
struct Accept;

impl Handler for Accept {
    fn handle(&self, message: &Bytes, _cx: &Context) -> Result<Reply, HandlerError> {
        Ok(Reply::Send(ack::accept(message)))
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:2575".to_owned());
    let server = Server::builder(Accept).bind(addr.as_str())?;
    println!("listening on {}", server.local_addr());
    std::io::stdout().flush()?;
    let running = server.spawn()?;
    running.join()?;
    Ok(())
}
