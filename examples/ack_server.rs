//! A minimal MLLP ACK server: replies AA to every message, MSA-2 = the incoming MSH-10.
//!
//! `cargo run --release --example ack_server -- [ADDR]` (default `127.0.0.1:2575`). Prints
//! `listening on ADDR` as its first line (benchmark scripts read it), then serves until
//! killed. (`mllp-reactor serve` is the full tool, with graceful Ctrl-C.)

use std::io::Write;

use mllp_reactor::{Reply, Server, ack, handler_fn};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:2575".to_owned());
    let server = Server::builder(handler_fn(|msg, _cx| Ok(Reply::Send(ack::accept(msg)))))
        .bind(addr.as_str())?;
    println!("listening on {}", server.local_addr());
    std::io::stdout().flush()?;
    let running = server.spawn()?;
    running.join()?;
    Ok(())
}
