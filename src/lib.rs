//! mllp-reactor: a high-throughput MLLP (HL7 v2) receiver for interface engines.
//!
//! It accepts long-lived TCP connections from hospital systems, frames HL7 v2 messages exactly
//! (`0x0B` payload `0x1C 0x0D`), hands each to your [`Handler`] on a worker thread, and sends
//! back the reply your handler returns, in order, per connection. It is not an HL7 parser: the
//! [`ack`] and [`msh`] modules read just enough of the MSH segment to build ACKs and NAKs.
//!
//! ```text
//!              ┌──────────────────── reactor thread (mio poll) ───────────────────┐
//!  TCP bytes ─▶│ socket ─▶ Connection (sans-IO) ─▶ FrameDecoder ─▶ frame ─┐        │
//!              │   ▲          │ deadlines ─▶ TimerWheel                   │ Job    │
//!  ACK bytes ◀─│ socket ◀─ EncodedFrame ◀── reply ◀─┐                      ▼        │
//!              └─────────────────────────────────────│──── channel + Waker ─┐─────┘
//!                                                    │                      │
//!                                          ┌─────────┴── pool threads ─────▼──┐
//!                                          │  Handler::handle(payload, cx)     │
//!                                          └───────────────────────────────────┘
//! ```
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
//! - **Replies in order.** One message per connection is with the handler at a time; its reply
//!   is fully written before the next message of that connection is dispatched.
//! - **Nothing is ACKed that the handler did not accept.** The server itself only ever sends
//!   NAKs (AE on handler error, panic or timeout; AR on an oversize frame), never an AA; with
//!   [`NakPolicy::Silent`] it sends nothing at all of its own.
//! - **Bounded memory per connection**: at most `max_message_size` + one 64 KiB read while a
//!   frame is being received, `read_ahead` + one read while a message is with the handler, and
//!   no buffer at all while idle.
//! - **One bad peer affects no other**: junk, oversize frames, slow drips, resets and peers that
//!   never read end only their own connection; a handler that hangs or panics costs one worker,
//!   which is replaced.
//! - **Shutdown** ([`ServerHandle::shutdown`]) stops accepting, closes idle connections, lets
//!   messages already with the handler finish and their replies flush, and closes whatever is
//!   left when the grace period ends. Messages received but not yet dispatched are dropped
//!   unanswered (never ACKed), so senders resend them.
//! - A handler still running when its message timed out cannot be stopped (threads cannot be
//!   killed): its message may have been processed although the sender got an AE.
//!
//! # Threads
//!
//! [`Handler::handle`] runs on the pool's worker threads (`workers`, default the available
//! parallelism). Every [`Observer`] method runs on the reactor thread. Replies are written with
//! `writev`; the Rust runtime ignores `SIGPIPE`, as this crate expects — if you embed it in a
//! non-Rust program, ignore `SIGPIPE` yourself.
//!
//! # Limits and defaults
//!
//! See [`Server::builder`] for the table, and [`telemetry`] for the metrics.
#![doc(test(attr(deny(warnings))))]
#![warn(missing_docs)]

pub mod ack;
pub mod client;
pub mod codec;
mod connection;
mod error;
mod handler;
pub mod msh;
mod pool;
mod reactor;
mod server;
pub mod telemetry;
pub mod timer;
#[cfg(feature = "tls")]
pub mod tls;

pub use client::{Backoff, Client, ClientConfig, ClientError};
pub use connection::NakPolicy;
pub use error::{CloseReason, ConfigError, Error, ExceptionReason};
pub use handler::{ConnectionId, Context, Handler, HandlerError, HandlerFn, Reply, handler_fn};
pub use server::{
    Builder, DEFAULT_FRAME_TIMEOUT, DEFAULT_HANDLER_TIMEOUT, DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS, DEFAULT_READ_AHEAD, DEFAULT_WRITE_TIMEOUT, MAX_MESSAGE_SIZE_LIMIT,
    Server, ServerHandle, ShutdownReport, ShutdownTrigger,
};
pub use telemetry::{
    ConnectionStart, ConnectionStop, MessageException, MessageStart, MessageStop, Observer,
};

#[doc(hidden)]
#[path = "fuzz.rs"]
pub mod __fuzz;
