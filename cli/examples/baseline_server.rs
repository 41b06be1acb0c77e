//! Baseline MLLP server for the end-to-end benchmark (`benches/e2e.sh`).
//!
//! The smallest server that does the same job as mllp-reactor on the wire: one thread, one mio
//! `Poll`, read until `WouldBlock` into a per-connection `Vec`, find frames, answer each with an
//! `AA` ACK built inline, write until `WouldBlock` (keeping partial writes). No handler pool, no
//! timers, no limits, no metrics. It stands for "the practical limit of this design": whatever
//! mllp-reactor adds (a thread hop per message, deadlines, caps, telemetry) shows up as the ratio
//! between the two in `benches/e2e.sh`.
//!
//! ```text
//! cargo run --release -p mllp-reactor-cli --example baseline_server -- 127.0.0.1:0
//! listening on 127.0.0.1:40123
//! ```
//!
//! It prints exactly one line, `listening on <ADDR>`, to stdout, then serves until killed.
//! Not for production: a peer that never reads grows the write buffer without bound.
// A binary (or test/example root): `pub` inside it only ever means crate-visible.
#![allow(unreachable_pub)]

use std::io::{self, ErrorKind, Write};
use std::net::SocketAddr;
use std::process::ExitCode;

use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

#[path = "support/wire.rs"]
mod wire;

use wire::{AckWriter, Conn, READ_CHUNK, accept_all};

/// The listener's token; connections use their slab key, which never reaches this value.
const LISTENER: Token = Token(usize::MAX);
/// Events handled per `poll` call; 1024 keeps a 1000-connection burst to one or two calls.
const EVENTS_CAPACITY: usize = 1024;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let addr_arg = args.next().unwrap_or_else(|| "127.0.0.1:0".to_owned());
    if args.next().is_some() || addr_arg == "-h" || addr_arg == "--help" {
        eprintln!("usage: baseline_server [LISTEN_ADDR]   (default 127.0.0.1:0)");
        return ExitCode::from(2);
    }
    let addr: SocketAddr = match addr_arg.parse() {
        Ok(addr) => addr,
        Err(_) => {
            eprintln!("error: invalid listen address {addr_arg:?} (expected e.g. 127.0.0.1:0)");
            return ExitCode::from(2);
        }
    };
    match serve(addr) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(addr: SocketAddr) -> io::Result<()> {
    let mut poll = Poll::new()?;
    let mut listener = TcpListener::bind(addr)?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    {
        let mut out = io::stdout().lock();
        writeln!(out, "listening on {}", listener.local_addr()?)?;
        out.flush()?;
    }

    let mut events = Events::with_capacity(EVENTS_CAPACITY);
    let mut connections: Slab<(Conn, ())> = Slab::new();
    let mut scratch = vec![0u8; READ_CHUNK];
    let mut acks = AckWriter::new();

    loop {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        acks.refresh_timestamp();
        for event in events.iter() {
            if event.token() == LISTENER {
                accept_all(&poll, &listener, &mut connections, |_| ());
                continue;
            }
            let key = event.token().0;
            let Some((conn, ())) = connections.get_mut(key) else {
                continue;
            };
            let mut open = true;
            if event.is_readable() || event.is_read_closed() {
                open = conn.read_frames(&mut scratch, |payload, wbuf| {
                    acks.append_ack(payload, b"AA", wbuf);
                });
            }
            if open {
                open = conn.flush();
            }
            if open {
                open = conn.update_interest(&poll, key).is_ok();
            }
            if !open {
                let (mut conn, ()) = connections.remove(key);
                // Deregistering a socket that is about to be dropped cannot usefully fail.
                let _ = poll.registry().deregister(&mut conn.stream);
            }
        }
    }
}
