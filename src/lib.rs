//! mllp-reactor: a high-throughput MLLP (HL7 v2) receiver for interface engines.
//!
//! It accepts long-lived TCP connections from hospital systems, frames HL7 v2 messages exactly
//! (`0x0B` payload `0x1C 0x0D`), hands each to your [`Handler`], and sends back the reply your
//! handler returns, in order, per connection. It is not an HL7 parser: the [`ack`] and [`msh`]
//! modules read just enough of the MSH segment to build ACKs and NAKs.
//!
//! ```text
//!              ┌───────────────────── reactor thread (mio poll) ──────────────────────┐
//!  TCP bytes ─▶│ Transport ─▶ Connection (sans-IO) ─▶ FrameDecoder ─▶ message ─┐       │
//!              │                 │ deadlines ─▶ TimerWheel                      │       │
//!  ACK bytes ◀─│ Transport ◀─ writev(replies in order) ◀── reply ◀─┬── Inline: handler │
//!              └───────────────────────────────────────────────────│──────────│───────┘
//!                       completion queue + one Waker per batch ──▶─┤          │ Pool: jobs
//!                                                                  │          ▼ (one lock/turn)
//!                  ReplyHandle::send (any thread, later) ──────────┤   pool threads:
//!                                                                  └── Handler::handle
//! ```
//!
//! A handler runs on the reactor thread ([`Dispatch::Inline`]: no hand-off, for handlers that
//! never block) or on the pool ([`Dispatch::Pool`]). Either way it may answer later: take a
//! [`ReplyHandle`] with [`Context::defer`], return [`Reply::Deferred`], and complete the handle
//! from any thread, for example once a store has committed the message. Meanwhile the
//! connection reads and hands over its next messages (up to `max_in_flight`), and replies still
//! leave in message order, as many per `writev` as are ready.
//!
//! # The path of a message
//!
//! One plaintext message with [`Dispatch::Inline`] (what `serve --no-store` runs), in the
//! order the code runs it. ARCHITECTURE.md at the repository root has the pool and
//! store-then-ACK paths and what each module owns.
//!
//! 1. `reactor.rs` — the poll reports the socket readable; the loop drives that connection.
//! 2. `link.rs` → `transport.rs` — the connection's link reads into the
//!    reactor's one 64 KiB buffer; the bytes go to `Connection::handle_read`
//!    (`connection.rs`).
//! 3. `connection.rs` → `codec.rs` — `poll_dispatch` decodes one frame and opens a slot for it.
//! 4. `dispatch.rs` → `handler.rs` — the dispatcher calls [`Handler::handle`] on the reactor
//!    thread (catching a panic); the outcome goes straight to `Connection::handle_completion`,
//!    which applies the [`NakPolicy`] (every NAK the server sends is built there).
//! 5. `link.rs` → `transport.rs` — `Connection::transmit` offers the ready replies
//!    in order and one `writev` sends them; `handle_written` retires the slots.
//! 6. `telemetry.rs` — the connection's events become metrics and observer calls.
//!
//! With [`Dispatch::Pool`], step 4 queues a job instead (`dispatch.rs` → `pool.rs`; one lock
//! per poll turn) and a worker calls the handler; the outcome comes back through the reactor's
//! completion queue (`completion.rs`, one wake-up per batch) to `handle_completion`. A
//! [`ReplyHandle`] (a deferred reply) takes that same way back from any thread.
//!
//! # Quick start
//!
//! ```
//! use std::io::{Read, Write};
//! use std::time::Duration;
//! use mllp_reactor::{ack, handler_fn, Reply, Server};
//!
//! let server = Server::builder(handler_fn(|msg, _cx| Ok(Reply::Send(ack::accept(msg)))))
//!     .idle_timeout(Duration::from_secs(60))
//!     .max_message_size(10_485_760)
//!     .bind("127.0.0.1:0")?;          // binds, validates options, registers metrics
//! let addr = server.local_addr();
//! let running = server.spawn()?;       // reactor + pool on their own threads
//!
//! let mut peer = std::net::TcpStream::connect(addr)?;
//! peer.set_read_timeout(Some(Duration::from_secs(10)))?;
//! peer.write_all(b"\x0bMSH|^~\\&|LAB|H|EHR|H|20260101||ORU^R01|MSG1|P|2.5.1\r\x1c\x0d")?;
//! let mut reply = [0u8; 512];
//! let n = peer.read(&mut reply)?;
//! assert!(reply[..n].windows(12).any(|w| w == b"MSA|AA|MSG1\r"));
//!
//! let report = running.shutdown(Duration::from_secs(5))?; // graceful: drains in-flight work
//! assert_eq!(report.forced, 0);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Guarantees
//!
//! - **Replies in order.** Replies leave each connection in the order its messages arrived,
//!   whatever order handlers or reply handles complete in. Handler calls for one connection
//!   never overlap and come in message order (one exception: a call abandoned at its handler
//!   deadline may still be running when the next message's call starts).
//! - **Nothing is ACKed that the handler did not accept.** The server itself only ever sends
//!   NAKs (AE on handler error, panic, timeout or a dropped reply handle; AR on an oversize
//!   frame or a message without a readable MSH), never an AA; with [`NakPolicy::Silent`] it
//!   sends nothing of its own. A reply that arrives after its deadline is discarded, never
//!   written. By default a NAK says "application error", not the handler's error text.
//! - **Bounded memory.** Per connection: a frame being received (at most `max_message_size`
//!   plus one 64 KiB read), `read_ahead` undecoded bytes when no more messages can be handed
//!   over, and at most `max_in_flight` messages with their replies; no buffer at all while
//!   idle (a connection in use keeps its small read buffer between messages until the
//!   reactor's next sweep, at most 10 ms, and counts it). Server-wide: every buffered byte
//!   counts against `max_memory` (a connection's count follows a shrink once what it holds
//!   has halved, so it counts at most twice its bytes, never fewer), and a frame under way
//!   counts as the largest frame allowed once more than 64 KiB of it are in (MLLP has no
//!   length prefix: its rest is unknown, and reading pauses before more frames are started
//!   than the budget could finish); above it the server stops reading and TCP pushes back on
//!   senders, except that one connection per reactor at a time (one with bytes waiting) may
//!   go on with the frame it is in, or receive one frame if it has no message in flight.
//!   A frame counted in full may finish (that adds one read past its end at most); any other
//!   may grow to its first 64 KiB (so a small message completes), and past that only as its
//!   reactor's one *finishing* frame: the next waits until that frame's message is answered
//!   and its reply written, or its connection closed (a peer that stops in it keeps the turn
//!   until its frame deadline; small messages and frames counted in full do not wait for
//!   it). None reads further until the total falls to ¾ of `max_memory`. So the bytes the
//!   server buffers stay below
//!
//!   ```text
//!   max_memory + 2 × R × (max_message_size + 64 KiB) + C × 64 KiB + N × E
//!   ```
//!
//!   where R is the number of reactors (per reactor, the frame whose read tipped the budget
//!   and the finishing frame, each with one read past its end), C the number of connections
//!   that read above the budget (each at most the first 64 KiB of one frame, or one read past
//!   the end of a frame counted in full; a peer that stops mid-frame keeps its partial frame
//!   until its frame deadline), N the number of open connections and E what an idle
//!   connection costs (at most 256 bytes, plus the TLS session's state with TLS; see
//!   BENCHMARKS.md). The terms after `max_memory` are bytes received; the buffers holding
//!   them grow by doubling, so their allocations (what the count takes) may be up to twice
//!   that. However slow the handler, frames grow past their first 64 KiB above the budget
//!   one per reactor at a time, not one per connection (before, every connection with at
//!   most 64 KiB of a frame in when reading paused finished a whole frame above it in turn:
//!   with a thousand such senders and a stalled store, gigabytes). A pipelining sender
//!   never reads past one frame above the budget, however many messages it may have in
//!   flight. The handler queue holds at most one job per connection, and a job whose
//!   connection closed or whose message was already answered is dropped before it runs.
//! - **One bad peer affects no other**: junk, oversize frames, slow drips, resets, peers that
//!   never read, and pipelining floods end or pause only their own connection; a handler that
//!   hangs or panics costs one worker, which is replaced; an observer that panics is counted
//!   and ignored.
//! - **No reply is destroyed by a reset.** A close that follows a reply (`SendAndClose`, the
//!   oversize AR, a drain) shuts our write side first and reads and discards input for up to
//!   2 s, so the peer can read the reply before the socket closes.
//! - **Shutdown** ([`ServerHandle::shutdown`], or dropping the handle) stops accepting, closes
//!   idle connections, lets messages already with the handler finish and their replies flush,
//!   and closes whatever is left when the grace period ends. Messages received but not yet
//!   handed over are dropped unanswered (never ACKed), so senders resend them.
//! - A handler still running when its message timed out cannot be stopped (threads cannot be
//!   killed): its message may have been processed although the sender got an AE.
//! - Durations too long to add to the clock (`Duration::MAX` as "no timeout") never fire.
//!
//! # Threads
//!
//! [`Handler::handle`] runs on the reactor thread ([`Dispatch::Inline`]) or on the pool's
//! worker threads ([`Dispatch::Pool`], `workers`, default the available parallelism). Every
//! [`Observer`] method runs on the reactor thread. Replies are written with `writev`; the Rust
//! runtime ignores `SIGPIPE`, as this crate expects — if you embed it in a non-Rust program,
//! ignore `SIGPIPE` yourself.
//!
//! # Limits and defaults
//!
//! See [`Server::builder`] for the table, and [`telemetry`] for the metrics.
#![doc(test(attr(deny(warnings))))]
#![warn(missing_docs)]

pub mod ack;
pub mod cidr;
pub mod client;
pub mod codec;
mod completion;
mod connection;
mod control;
pub mod date;
mod dispatch;
mod error;
mod handler;
mod heartbeat;
mod identity;
mod limits;
mod link;
pub mod msh;
mod outcome;
mod pool;
pub mod proxy;
mod reactor;
mod reason;
mod server;
mod sync;
pub mod telemetry;
mod timer;
#[cfg(feature = "tls")]
pub mod tls;
mod transport;

pub use bytes::Bytes;
pub use client::{Backoff, Client, ClientConfig, ClientError};
pub use completion::{ReplyHandle, send_together};
pub use connection::NakPolicy;
pub use control::ShutdownReport;
pub use error::{ConfigError, Error};
pub use handler::{Context, Dispatch, Handler, HandlerFn, handler_fn};
pub use heartbeat::{HEARTBEAT_INTERVAL, Heartbeat};
pub use identity::{PeerIdentity, SubjectAltName};
pub use limits::{
    DEFAULT_FRAME_TIMEOUT, DEFAULT_HANDLER_TIMEOUT, DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT, DEFAULT_INLINE_SLOW_THRESHOLD, DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_IN_FLIGHT_INLINE, DEFAULT_MAX_IN_FLIGHT_POOL, DEFAULT_MAX_MEMORY,
    DEFAULT_READ_AHEAD, DEFAULT_WRITE_TIMEOUT, MAX_IN_FLIGHT_LIMIT, MAX_MESSAGE_SIZE_LIMIT,
    MAX_REACTORS, MAX_WORKERS,
};
pub use outcome::{ConnectionId, HandlerError, Reply};
pub use reason::{CloseReason, ExceptionReason};
pub use server::{Builder, Reloader, Server, ServerHandle, ShutdownTrigger};
pub use telemetry::{
    ConnectionStart, ConnectionStop, MessageEvents, MessageException, MessageStart, MessageStop,
    Observer,
};

#[doc(hidden)]
#[path = "fuzz.rs"]
pub mod __fuzz;

/// The README's Rust code, compiled by `cargo test` as doc tests: its library snippet must
/// work pasted into a `main`.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
