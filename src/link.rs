//! One connection's seam: its [`Transport`] (socket and layer), its sans-IO [`Connection`]
//! and its peer. Everything that concerns one connection and is not MLLP lives here, in one
//! place:
//!
//! - the PROXY header (read before anything else, its source becoming the peer);
//! - the allow-list decision, for the socket's peer at accept ([`admits`]) and for the client
//!   a header names;
//! - the TLS start (the connection serves MLLP once the handshake is done) and the mapping of
//!   TLS failures to close reasons;
//! - the read and write transfer between the transport and the connection;
//! - the close reason of a connection that ends, including one that never started
//!   ([`Link::closed`]).
//!
//! The reactor owns the links in a slab, routes readiness and timers to them, and applies the
//! memory budget: it decides *whether* a link may read, the link decides *what* a read means.
//!
//! ```text
//!  reactor ── readable/writable ──▶ Link ── read / write ──▶ Transport ──▶ socket
//!                                    │ handle_read, transmit, handle_written
//!                                    ▼
//!                                Connection (sans-IO)
//! ```

use std::io::{ErrorKind, IoSlice};
use std::net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::cidr::AllowList;
use crate::connection::{Connection, Event, Limits};
use crate::identity::PeerIdentity;
use crate::outcome::ConnectionId;
use crate::reason::{CloseReason, RejectReason};
use crate::sync::lock;
use crate::telemetry::Telemetry;
use crate::transport::{Preambled, Transport};

/// Most slices per `writev`: 42 replies of 3 slices each. Linux takes up to 1024; past a few
/// dozen replies the syscall is amortized and the stack array stays at 2 KiB.
const MAX_IOV: usize = 126;
/// Slices tried before `MAX_IOV`: room for three replies of up to three slices each.
const FEW_IOV: usize = 12;

/// Who may connect. New connections see a reload; established ones are not re-checked.
#[derive(Clone, Debug, Default)]
pub(crate) struct Policy {
    /// Peers allowed to connect (the PROXY header's source when PROXY protocol is on).
    pub(crate) allow: Option<AllowList>,
    /// With PROXY protocol: the balancers allowed to send headers.
    pub(crate) proxy_sources: Option<AllowList>,
}

/// Whether a connection from `peer` may be served, decided before a byte is read: `peer`
/// must be on the allow-list and, behind a balancer (`proxied`), also among the sources
/// trusted to send PROXY headers (none when unset: `bind` requires them). The client a header
/// names is checked again once it is known.
pub(crate) fn admits(policy: &Policy, proxied: bool, peer: IpAddr) -> bool {
    policy.allow.as_ref().is_none_or(|l| l.contains(peer))
        && (!proxied
            || policy
                .proxy_sources
                .as_ref()
                .is_some_and(|l| l.contains(peer)))
}

/// One served connection: transport, connection state machine, peer.
#[derive(Debug)]
pub(crate) struct Link {
    pub(crate) id: ConnectionId,
    transport: Transport,
    pub(crate) conn: Connection,
    /// The socket's peer, or the client a PROXY header named.
    peer: PeerAddr,
    /// The socket reported readable (edge-triggered: until a read says `WouldBlock`).
    pub(crate) read_ready: bool,
    /// The socket reported writable (until a write says `WouldBlock`).
    pub(crate) write_ready: bool,
    /// Bytes came from the peer other than a PROXY header (a health check sends none, or a
    /// header alone: see [`CloseReason::Probe`]).
    received: bool,
    /// [`poll_started`](Self::poll_started) reported the start.
    announced: bool,
    /// The poll reported the peer's end of stream (or an error): reads go on until they say
    /// so, short or not (see [`read`](Self::read)).
    read_closed: bool,
    /// Its TLS handshake's slot under the reactor's `max_handshakes` cap (kept here, where
    /// the struct has room, for the reactor).
    pub(crate) handshake: HandshakeSlot,
    /// For the reactor (kept here, where the struct has room): whether the connection is on
    /// its list of connections that keep pooled buffers between messages, or when it last
    /// gave them back (see `Loop::end_visit`).
    pub(crate) rested: Rested,
}

/// Where a link stands with the reactor's pooled-buffer sweep (see `Loop::end_visit`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Rested {
    /// It has not given buffers back yet.
    Never,
    /// It gave them back in this sweep period (the reactor's count of periods, wrapping).
    At(u8),
    /// On the reactor's list: it keeps them until a sweep finds it idle.
    Listed,
}

/// A peer's address in 24 bytes instead of `SocketAddr`'s 32 (an idle connection's cost
/// counts): IPv6 flow information, meaningless for a peer's address, is not kept; the scope
/// of a link-local peer is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PeerAddr {
    ip: IpAddr,
    port: u16,
    /// IPv6 scope id (0 for IPv4).
    scope: u32,
}

const _: () = assert!(std::mem::size_of::<PeerAddr>() <= 24);

impl From<SocketAddr> for PeerAddr {
    fn from(addr: SocketAddr) -> Self {
        let scope = match addr {
            SocketAddr::V4(_) => 0,
            SocketAddr::V6(v6) => v6.scope_id(),
        };
        Self {
            ip: addr.ip(),
            port: addr.port(),
            scope,
        }
    }
}

impl From<PeerAddr> for SocketAddr {
    fn from(addr: PeerAddr) -> Self {
        match addr.ip {
            IpAddr::V4(ip) => SocketAddrV4::new(ip, addr.port).into(),
            IpAddr::V6(ip) => SocketAddrV6::new(ip, addr.port, 0, addr.scope).into(),
        }
    }
}

/// A link's part in the reactor's cap on TLS handshakes in progress.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum HandshakeSlot {
    /// Not handshaking, or not yet asked to read.
    #[default]
    None,
    /// Handshaking in one of the reactor's slots.
    Held,
    /// Waiting for a slot.
    Waiting,
}

/// How a link ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Closed {
    /// Why, with a connection that never started blamed on the stage it was in.
    pub(crate) reason: CloseReason,
    /// It never served MLLP (no PROXY header or TLS handshake done): why it was rejected.
    pub(crate) rejected: Option<RejectReason>,
}

impl Link {
    /// A link over `transport`: started at once over plain TCP, pending a PROXY header or a
    /// TLS handshake otherwise.
    pub(crate) fn new(
        id: ConnectionId,
        transport: Transport,
        peer: SocketAddr,
        limits: Arc<Limits>,
        now: Instant,
    ) -> Self {
        let conn = if transport.ready() {
            Connection::new(limits, now)
        } else {
            Connection::new_pending(limits, now)
        };
        Self {
            id,
            transport,
            conn,
            peer: PeerAddr::from(peer),
            read_ready: false,
            write_ready: false,
            received: false,
            announced: false,
            read_closed: false,
            handshake: HandshakeSlot::None,
            rested: Rested::Never,
        }
    }

    /// The peer: the socket's, or the client a PROXY header named.
    pub(crate) fn peer(&self) -> SocketAddr {
        self.peer.into()
    }

    /// The verified client certificate's identity (mutual TLS).
    pub(crate) fn identity(&self) -> Option<Arc<PeerIdentity>> {
        self.transport.peer_identity()
    }

    /// Takes a readiness event.
    pub(crate) fn handle_readiness(&mut self, readable: bool, writable: bool, read_closed: bool) {
        self.read_ready |= readable || read_closed;
        self.read_closed |= read_closed;
        self.write_ready |= writable;
    }

    /// Whether the link has bytes waiting and room to take them.
    pub(crate) fn wants_read(&self) -> bool {
        self.read_ready && self.conn.wants_read()
    }

    /// Whether the next read is outside the memory budget: a PROXY header is at most
    /// [`MAX_HEADER_LEN`](crate::proxy::MAX_HEADER_LEN) bytes.
    pub(crate) fn reads_header(&self) -> bool {
        self.transport.in_preamble()
    }

    /// Whether there is something to write and the socket takes it.
    pub(crate) fn wants_write(&self) -> bool {
        self.write_ready && (self.conn.wants_write() || self.transport.wants_flush())
    }

    /// Writes as much of the connection's ready replies (and the transport's own bytes) as the
    /// socket takes, many replies per `writev`, then ends our sending side if the connection
    /// asks. Returns whether any progress was made (bytes written or the connection failed).
    pub(crate) fn write(
        &mut self,
        telemetry: &Telemetry,
        now: Instant,
        out: &mut Vec<Event>,
    ) -> bool {
        let mut progress = self.wants_write() && self.write_some(telemetry, now, out);
        if self.conn.wants_shutdown_write() {
            // Failure (already reset) is fine: the linger then just times out or reads EOF.
            let _ = self.transport.shutdown_write();
            self.conn.handle_write_shutdown();
            progress = true;
        }
        progress
    }

    fn write_some(&mut self, telemetry: &Telemetry, now: Instant, out: &mut Vec<Event>) -> bool {
        let mut progress = false;
        loop {
            if self.transport.wants_flush() {
                match self.transport.flush() {
                    Ok(n) => {
                        telemetry.metrics.bytes_sent.increment(n as u64);
                        progress |= n > 0;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        self.write_ready = false;
                        return progress;
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => {
                        self.conn.handle_io_error(e.kind(), out);
                        return true;
                    }
                }
            }
            // Checked first, and a few slices tried before `MAX_IOV` of them: filling 126 empty
            // slices is 2 KiB of stores, about 400 instructions per message at one reply per
            // write (callgrind), when one reply needs at most 3. Settled, the connection's
            // front slot holds an unwritten reply exactly when `transmit` has bytes to offer.
            if !self.conn.wants_write() {
                return progress;
            }
            let result = if let Some(frame) = self.conn.lone_reply() {
                // One reply ready (every one at one message in flight): its own slices.
                let mut three = [IoSlice::new(&[]); 3];
                let n = frame.io_slices(&mut three);
                telemetry.metrics.socket_writes.increment(1);
                self.transport.write_vectored(&three[..n])
            } else {
                let mut few = [IoSlice::new(&[]); FEW_IOV];
                let n = self.conn.transmit(&mut few);
                if n == 0 {
                    return progress;
                }
                telemetry.metrics.socket_writes.increment(1);
                // `transmit` stops when fewer than 3 slices are left: with more room than
                // that left, it offered everything ready.
                if n + 3 <= FEW_IOV {
                    self.transport.write_vectored(&few[..n])
                } else {
                    let mut slices = [IoSlice::new(&[]); MAX_IOV];
                    let n = self.conn.transmit(&mut slices);
                    self.transport.write_vectored(&slices[..n])
                }
            };
            match result {
                Ok(0) => {
                    self.conn.handle_io_error(ErrorKind::WriteZero, out);
                    return true;
                }
                Ok(written) => {
                    if self.transport.writes_through() {
                        // Plain TCP: these bytes reached the socket (a layer counts in flush).
                        telemetry.metrics.bytes_sent.increment(written as u64);
                    }
                    self.conn.handle_written(written, now, out);
                    progress = true;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.write_ready = false;
                    return progress;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    self.conn.handle_io_error(e.kind(), out);
                    return true;
                }
            }
        }
    }

    /// One read, handed on: to the PROXY header while it is awaited (checking the client it
    /// names against `policy`), to the connection after; through `scratch` unless the bytes
    /// can go straight into the connection's buffer. It takes at most `budget` bytes (at
    /// least 1), and takes what it read off `budget`. `drain`: readiness ends only with
    /// `WouldBlock` (or the end of stream), not already with a read that found fewer bytes
    /// than it had room for. Returns whether any progress was made.
    // The reactor's per-turn state, passed apart (it is borrowed apart from the link).
    // Inline into the reactor's one caller: the call's register saves and its eight
    // arguments cost about 25 instructions per message (callgrind, S1).
    #[allow(clippy::too_many_arguments)]
    #[inline]
    pub(crate) fn read(
        &mut self,
        scratch: &mut [u8],
        budget: &mut usize,
        drain: bool,
        policy: &Mutex<Arc<Policy>>,
        telemetry: &Telemetry,
        now: Instant,
        out: &mut Vec<Event>,
    ) -> bool {
        // Straight into the connection's buffer where the bytes are MLLP over plain TCP; else
        // through `scratch`, to the layer or the PROXY header (or discarded while lingering).
        let mut short = false;
        let direct = if self.transport.reads_into() {
            let transport = &mut self.transport;
            self.conn.read_with(now, *budget, |buf, max| {
                let room = (buf.capacity() - buf.len()).min(max);
                let read = transport.read_into(buf, max);
                short = matches!(read, Ok(n) if n > 0 && n < room);
                read
            })
        } else {
            None
        };
        let read = match direct {
            Some(read) => read.map(|n| (n, true)),
            None => {
                let take = scratch.len().min(*budget);
                self.transport
                    .read(&mut scratch[..take])
                    .map(|n| (n, false))
            }
        };
        if let Ok((n, _)) = read {
            *budget = budget.saturating_sub(n);
        }
        let progress = match read {
            Ok((0, _)) => {
                self.read_ready = false;
                if self.conn.is_started() {
                    self.conn.handle_eof(out);
                } else {
                    let reason = self.before_start(CloseReason::PeerClosed).close_reason();
                    self.conn.handle_start_failed(reason, out);
                }
                true
            }
            Ok((n, direct)) => {
                telemetry.metrics.bytes_received.increment(n as u64);
                if direct {
                    self.received = true;
                    // Fewer bytes than there was room for: the socket had no more, so no read
                    // that would only say `WouldBlock` (one syscall per message less). Bytes
                    // that come later raise a new edge-triggered event (epoll reports every
                    // arrival), as tokio relies on too. Not once the peer's end was reported:
                    // that edge is spent, so reading goes on until the end of stream itself.
                    // Nor when `drain`: the budget's holder keeps its turn while it has bytes
                    // waiting, which only `WouldBlock` tells for sure.
                    if short && !drain && !self.read_closed {
                        self.read_ready = false;
                    }
                } else if self.transport.in_preamble() {
                    self.header_read(&scratch[..n], policy, now, out);
                } else {
                    self.received = true;
                    self.conn.handle_read(&scratch[..n], now, out);
                }
                true
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                self.read_ready = false;
                false
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => true,
            Err(e) => {
                match self.transport.failure_reason(&e) {
                    Some(reason) => {
                        self.received = true; // a TLS failure means bytes came
                        let reason = match reason {
                            CloseReason::Io(_) if !self.conn.is_started() => {
                                CloseReason::TlsHandshake
                            }
                            reason => reason,
                        };
                        self.conn.handle_start_failed(reason, out);
                    }
                    None => self.conn.handle_io_error(e.kind(), out),
                }
                true
            }
        };
        // A layer may make progress that a read does not report: TLS bytes that followed the
        // PROXY header in its segment are handshake input whose answer (the ServerHello) waits
        // in the session while the next socket read says WouldBlock. Edge-triggered, no event
        // would come for it: flush it now.
        progress || (self.write_ready && self.transport.wants_flush())
    }

    /// Feeds bytes to the PROXY header. Once it is complete the header's source becomes the
    /// peer (checked against the allow-list), and the bytes after it go to the connection, or
    /// to the TLS session that follows.
    fn header_read(
        &mut self,
        bytes: &[u8],
        policy: &Mutex<Arc<Policy>>,
        now: Instant,
        out: &mut Vec<Event>,
    ) {
        let (header, rest) = match self.transport.feed_preamble(bytes) {
            Preambled::Partial => {
                self.received = true;
                return;
            }
            Preambled::Failed => {
                self.received = true;
                self.conn.handle_start_failed(CloseReason::ProxyHeader, out);
                return;
            }
            Preambled::Done(header, rest, more) => {
                // A header alone (HAProxy's checks send one, LOCAL or not) is not the stream:
                // a close now is a health check.
                self.received = more;
                (header, rest)
            }
        };
        // A LOCAL header (a balancer's health check) names no client: the socket's peer stands.
        if let Some(source) = header.source() {
            self.peer = source.into();
        }
        let policy = Arc::clone(&lock(policy));
        if !admits(&policy, false, self.peer.ip) {
            self.conn.handle_start_failed(CloseReason::NotAllowed, out);
            return;
        }
        if self.transport.ready() {
            self.conn.handle_started(now);
            self.conn.handle_read(&rest, now, out);
        }
        // Else TLS follows the header: the connection starts when its handshake is done.
    }

    /// Whether the connection has just started serving MLLP (its PROXY header and TLS
    /// handshake are done); true once.
    pub(crate) fn poll_started(&mut self, now: Instant) -> bool {
        if self.announced {
            return false;
        }
        if !self.conn.is_started()
            && !self.conn.is_closed()
            && !self.transport.in_preamble()
            && self.transport.ready()
        {
            // The TLS handshake is done: the connection serves MLLP from now on.
            self.conn.handle_started(now);
        }
        self.announced = self.conn.is_started();
        self.announced
    }

    /// Takes the "a handler call was abandoned at its deadline" signal.
    pub(crate) fn take_abandoned(&mut self) -> bool {
        self.conn.take_abandoned()
    }

    /// Whether another pass over the link could do nothing: it has started, its connection
    /// is at rest (see [`Connection::is_at_rest`]), the socket has nothing to read and
    /// nothing waits to be written. The pass after a reply was written and the socket found
    /// empty, the usual end of a visit, is then skipped.
    pub(crate) fn is_spent(&self) -> bool {
        self.announced && self.conn.is_at_rest() && !self.read_ready && !self.wants_write()
    }

    /// A spent link ([`is_spent`](Self::is_spent)) lets go of what only a frame needs: its
    /// connection's empty read buffer goes back to the thread's pool.
    pub(crate) fn rest(&mut self) {
        self.conn.release_at_rest();
    }

    /// Whether a frame is being received or read ahead (bytes not yet decoded).
    pub(crate) fn in_frame(&self) -> bool {
        self.conn.buffered_len() > 0
    }

    /// Whether a message is with the handler or its reply not yet written.
    pub(crate) fn in_flight(&self) -> bool {
        self.conn.in_flight()
    }

    /// Whether the connection has closed (see [`closed`](Self::closed) for how).
    pub(crate) fn is_closed(&self) -> bool {
        self.conn.is_closed()
    }

    /// The earliest deadline that matters now.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        self.conn.poll_timeout()
    }

    /// A deadline may have passed. `unread`: the peer has bytes waiting that the memory
    /// budget keeps us from reading, so it is neither idle nor slow.
    pub(crate) fn handle_timeout(&mut self, now: Instant, unread: bool, out: &mut Vec<Event>) {
        if unread && self.wants_read() {
            self.conn.handle_unread_input(now);
        }
        self.conn.handle_timeout(now, out);
    }

    /// The server is shutting down: close when idle, else after the messages in flight.
    pub(crate) fn handle_shutdown(&mut self, out: &mut Vec<Event>) {
        self.conn.handle_shutdown(out);
    }

    /// Releases the layer's buffers when the connection holds nothing; returns whether it
    /// may have (the memory count is then stale). Plain TCP has no layer: nothing to release
    /// and no recount (callgrind, S1: about 15 instructions per message).
    pub(crate) fn release_idle_buffers(&mut self) -> bool {
        !self.conn.in_flight()
            && self.conn.buffered_len() == 0
            && self.transport.release_idle_buffers()
    }

    /// Heap bytes the link holds that vary with traffic, for the memory budget: the
    /// connection's buffers and the transport's (a PROXY header, TLS).
    pub(crate) fn buffered(&self) -> usize {
        self.conn.buffered() + self.transport.buffered()
    }

    /// Whether the link must still complete a TLS handshake before it serves MLLP (it then
    /// needs a handshake slot to read).
    pub(crate) fn handshakes(&self) -> bool {
        !self.conn.is_started() && self.transport.handshakes()
    }

    /// How the link ended, once it has; `None` while open.
    pub(crate) fn closed(&self) -> Option<Closed> {
        let reason = match self.conn.close_reason()? {
            // Nothing came, and it ended: a health check or a port scan, not a fault.
            CloseReason::PeerClosed
            | CloseReason::Io(_)
            | CloseReason::ProxyHeader
            | CloseReason::TlsHandshake
                if !self.received =>
            {
                CloseReason::Probe
            }
            reason => reason,
        };
        let rejected = (!self.conn.is_started()).then(|| self.before_start(reason));
        Some(Closed {
            reason: rejected.map_or(reason, RejectReason::close_reason),
            rejected,
        })
    }

    /// Why a connection that never started was rejected: an end (or a reset) blames the
    /// stage it was in, a deadline is the handshake's.
    fn before_start(&self, reason: CloseReason) -> RejectReason {
        RejectReason::before_start(reason, self.transport.in_preamble())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_address_keeps_what_a_peer_is_reported_with() {
        for text in [
            "127.0.0.1:2575",
            "[::1]:2575",
            "[fe80::1%7]:40000",
            "[::ffff:10.0.0.1]:1",
            "0.0.0.0:0",
        ] {
            let addr: SocketAddr = text.parse().unwrap();
            assert_eq!(SocketAddr::from(PeerAddr::from(addr)), addr, "{text}");
        }
        // Flow information is not kept (it describes a flow, not the peer).
        let flowing = SocketAddr::V6(SocketAddrV6::new(std::net::Ipv6Addr::LOCALHOST, 1, 5, 0));
        let kept = SocketAddr::from(PeerAddr::from(flowing));
        assert_eq!((kept.ip(), kept.port()), (flowing.ip(), flowing.port()));
    }
}
