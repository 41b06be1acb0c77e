//! The server's documented defaults and the limits its options are checked against: plain
//! values, so that the builder, the error messages and the CLI share one source.

use std::time::Duration;

/// Default idle timeout: 60 s, long enough for a quiet feed between messages, short enough
/// that abandoned connections do not pile up (a common MLLP library default).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default handler timeout: 60 s: far above any healthy handler, and below the typical
/// sender's own ACK timeout, so the sender gets our AE rather than timing out blind.
pub const DEFAULT_HANDLER_TIMEOUT: Duration = Duration::from_secs(60);
/// Default frame deadline: a started frame must complete within 120 s, so a peer dripping a
/// byte a minute cannot hold a connection forever; 120 s lets a 10 MiB message cross a
/// 1 Mbit/s link (84 s) with room to spare.
pub const DEFAULT_FRAME_TIMEOUT: Duration = Duration::from_secs(120);
/// Default write-stall deadline: a peer that reads none of our reply for 30 s is closed.
/// ACKs are a few hundred bytes and fit any socket buffer, so only a peer that stopped reading
/// altogether (and keeps sending) can stall.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default connection cap: 10 000, below the 20 000 open files a process commonly may hold,
/// leaving room for the store, logs and metrics.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Default read-ahead: 64 KiB of undecoded pipelined bytes per connection while its message is
/// with the handler; past it reading stops and TCP pushes back. 64 KiB holds dozens of typical
/// (1–2 KiB) pipelined messages.
pub const DEFAULT_READ_AHEAD: usize = 64 * 1024;
/// Largest accepted `max_message_size`: 1 GiB. Beyond it one connection could exhaust memory.
pub const MAX_MESSAGE_SIZE_LIMIT: usize = 1 << 30;
/// Default messages in flight per connection with [`Dispatch::Inline`](crate::Dispatch::Inline): 64. Enough that a
/// sender pipelining a window of messages never waits on us for a full round trip per
/// message (and replies go out dozens per `writev`), small enough that one connection's
/// messages in flight stay a small share of the memory budget.
pub const DEFAULT_MAX_IN_FLIGHT_INLINE: usize = 64;
/// Default messages in flight per connection with [`Dispatch::Pool`](crate::Dispatch::Pool): 1, strictly serial per
/// connection (the next message is read and dispatched only once the previous reply is
/// written), the classic MLLP behaviour.
pub const DEFAULT_MAX_IN_FLIGHT_POOL: usize = 1;
/// Default threshold above which an inline handler call counts as slow: 1 ms. An inline call
/// that long holds every connection of its reactor for that long.
pub const DEFAULT_INLINE_SLOW_THRESHOLD: Duration = Duration::from_millis(1);
/// Default server-wide memory budget for buffered bytes: 512 MiB. It holds fifty messages of
/// the default maximum size, or about half a million typical (1 KiB) messages in flight, and
/// fits a small VM; above it reads stop and TCP pushes back on senders.
pub const DEFAULT_MAX_MEMORY: usize = 512 << 20;
/// Default time a connection gets to start (PROXY header, TLS handshake): 10 s, ample for a
/// handshake across a slow WAN, short enough that silent connections do not pile up.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default cap on TLS handshakes in progress at once, server-wide: 256. A handshake costs
/// about a millisecond of CPU, so 256 at once is a burst of hundreds of clients, or slow (or
/// hostile) peers; each may hold up to `tls::MAX_HANDSHAKE_BYTES` (32 KiB) of handshake and
/// one 32 KiB read buffer, so the cap bounds handshake memory at about 36 MiB.
pub(crate) const DEFAULT_MAX_HANDSHAKES: usize = 256;
/// Default grace period when a [`ServerHandle`](crate::ServerHandle) is dropped without a shutdown: 5 s.
pub(crate) const DROP_GRACE: Duration = Duration::from_secs(5);

/// Most reactors `reactors` accepts: a reactor is a thread with its own poll, so more than
/// the machine's cores buys nothing, and connection ids hold the reactor number in 8 bits.
pub const MAX_REACTORS: usize = 64;
/// Most handler threads `workers` accepts: far above any useful count (handlers that block
/// for long should defer their replies instead), low enough that a typo cannot exhaust the
/// process's threads.
pub const MAX_WORKERS: usize = 1024;
/// Largest accepted `max_in_flight`.
pub const MAX_IN_FLIGHT_LIMIT: usize = 65_536;
