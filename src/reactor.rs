//! One mio poll loop serving a listener and its connections; a server runs one or more of
//! these, each on its own thread. It accepts sockets, wraps each in a [`Link`] (the
//! per-connection seam: transport, connection, peer), and drives the links; `server.rs` only
//! binds the listening socket and starts threads, and `pool.rs` only runs handlers.
//!
//! Thin: the reactor polls, routes readiness, completions and timers to links, applies the
//! memory budget (whether a link may read), hands messages to the [`Dispatcher`] (the handler
//! inline, or the [`Pool`]), and reports events to [`Telemetry`]. What a read or a write means (the PROXY
//! header, the allow-list, TLS, close reasons) is the link's business, and MLLP is the
//! [`Connection`](crate::connection::Connection)'s.
//!
//! Sockets are registered once for `READABLE | WRITABLE` (edge-triggered) and never
//! re-registered: the link remembers readiness and acts on it when the connection wants to,
//! so pausing reads (read-ahead full, memory budget) costs no syscall.

use std::io::{self, ErrorKind};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, Sender};
use std::time::{Duration, Instant, SystemTime};

use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Poll, Token};
use slab::Slab;

use crate::completion::{Completion, CompletionSink, Notifier};
use crate::connection::{Event, Limits, deadline_after};
use crate::control::{Command, ShutdownReport};
use crate::dispatch::{Dispatcher, Message};
use crate::handler::{Dispatch, Handler};
use crate::heartbeat::HEARTBEAT_INTERVAL;
use crate::link::{self, Link, Rested};
use crate::outcome::ConnectionId;
use crate::pool::Pool;
use crate::reason::{CloseReason, RejectReason};
use crate::sync::lock;
use crate::telemetry::{Peer, Tally, Telemetry};
use crate::timer::{DEFAULT_SLOTS, DEFAULT_TICK, TimerWheel};
use crate::transport::{Acceptors, Transport};

mod handshakes;
mod ready;
mod shared;
use crate::link::HandshakeSlot as Slot;
use handshakes::Handshakes;
use ready::{Ready, Waiter};
pub(crate) use shared::{Budget, Inbox, Shared};

/// Token of the listening socket; slab keys (connections) use the tokens below it.
pub(crate) const LISTENER: Token = Token(usize::MAX - 1);
/// Token of the waker that workers, reply handles and the server handle use.
pub(crate) const WAKER: Token = Token(usize::MAX - 2);

/// Slab keys of one reactor stay below this, so a [`ConnectionId`]'s index holds the reactor
/// number in its top 8 bits: ids are unique across the reactors of a server.
pub(crate) const MAX_KEYS_PER_REACTOR: usize = 1 << 24;

/// Bytes read per `read` call into the reactor's scratch buffer: 64 KiB takes a full socket
/// buffer's worth in few syscalls while staying in L2 cache; one such buffer per reactor (not
/// per connection). Plain TCP connections that serve MLLP read straight into their own buffer
/// (`Connection::read_with`, the same 64 KiB per read at most); the scratch buffer serves the
/// PROXY header, TLS records and a lingering close's discarded input.
const READ_CHUNK: usize = 64 * 1024;

/// Bytes read per connection per visit before the reactor serves others (then the connection
/// goes on the pending list and is resumed next turn): a message of up to 1 MiB, with its
/// framing and wherever its first byte falls in a read, needs no extra turn; one flooding
/// peer cannot hold the loop for more than about a millisecond. In bytes, not reads: a budget
/// of 16 reads of 64 KiB, 1 MiB exactly, made every 1 MiB message wait a turn behind the
/// other busy connections for its last 2 bytes.
const READ_BUDGET: usize = (1 << 20) + READ_CHUNK;

/// Events taken from the kernel per `poll` call.
const EVENTS_CAPACITY: usize = 1024;

/// When `accept` fails for lack of resources (EMFILE, ENFILE, ENOBUFS), retry after this long
/// rather than spin: edge-triggered readiness would not report the waiting connections again.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// A busy reactor stamps its heartbeat at most this often (an idle one at each wake-up, at
/// least every [`HEARTBEAT_INTERVAL`]): a stamp then lags the last poll turn by at most 10 ms,
/// nothing against the seconds a health check allows, and a turn that stamps nothing pays one
/// comparison instead of a clock subtraction and a store (callgrind, S1: about 70
/// instructions per message).
const BEAT_EVERY: Duration = Duration::from_millis(10);

/// [`HEARTBEAT_INTERVAL`] and [`BEAT_EVERY`] as the wait's timeout, in milliseconds.
const HEARTBEAT_MS: u32 = HEARTBEAT_INTERVAL.as_millis() as u32;
const BEAT_EVERY_MS: u32 = BEAT_EVERY.as_millis() as u32;

/// Connections per reactor that may keep their pooled buffers between messages (see
/// `Loop::end_visit`); beyond them a connection gives its buffers back as soon as it is idle. The
/// pool's own bound: the buffers that listed connections keep are at most as many as the
/// pool keeps.
const HOLDING: usize = 32;

/// Everything a reactor needs, built by the server builder.
pub(crate) struct Reactor {
    pub(crate) index: u8,
    pub(crate) poll: Poll,
    pub(crate) listener: Option<TcpListener>,
    pub(crate) local_addr: SocketAddr,
    pub(crate) limits: Arc<Limits>,
    pub(crate) dispatch: Dispatch,
    /// The layers on each accepted socket (PROXY header, TLS).
    pub(crate) acceptors: Acceptors,
    /// This reactor's share of `max_handshakes`.
    pub(crate) max_handshakes: usize,
    pub(crate) inline_slow: Duration,
    pub(crate) handler: Arc<dyn Handler>,
    pub(crate) sink: Arc<CompletionSink>,
    pub(crate) commands: Receiver<Command>,
    pub(crate) telemetry: Telemetry,
    pub(crate) shared: Arc<Shared>,
    /// The other reactors' command channels (on the accepting reactor only): it forwards
    /// the shutdown once it has stopped accepting.
    pub(crate) followers: Vec<(Sender<Command>, Arc<Notifier>)>,
}

/// A link and what the reactor keeps beside it: where it sits in the wheel, the pending
/// list and the budget.
struct Entry {
    link: Link,
    /// Index into `Loop::locals`: servers see one or two local addresses, so an index saves
    /// 30 bytes per connection over a `SocketAddr`.
    local: u16,
    /// On the pending list (read budget ran out with bytes left, a handshake slot came
    /// free, or completions arrived): driven again before the turn ends.
    pending: bool,
    /// Nanoseconds since `Loop::epoch` at accept (8 bytes instead of an `Instant`'s 16).
    accepted_at: u64,
    /// The earliest deadline this connection has in the timer wheel, as nanoseconds since
    /// `Loop::epoch` plus one; 0 when none.
    armed: u64,
    /// What this connection last reported to the memory budget (saturating: one connection
    /// holding 4 GiB is far over any budget anyway): at least what it holds, at most twice
    /// that (see `recount`).
    counted: u32,
    /// It finished a frame above the budget: no more reads until the budget allows them.
    drew: bool,
}

impl Entry {
    /// Whether the connection may read under the handshake cap: a TLS connection that has
    /// not started needs one of the reactor's handshake slots (see
    /// [`Builder::max_handshakes`](crate::Builder::max_handshakes)); without one it waits.
    fn may_handshake(&mut self, handshakes: &mut Handshakes) -> bool {
        if self.link.handshake == Slot::None && self.link.handshakes() {
            self.link.handshake = handshakes.request(self.link.id);
        }
        self.link.handshake != Slot::Waiting
    }

    /// Inserts the connection's deadline into `wheel` if it is earlier than what is armed
    /// (`next_timer`: `Loop::next_timer`, asked again after an insert). Later deadlines (the
    /// idle timer restarted by a read) are left to the armed entry: when it fires early the
    /// connection ignores it and the real deadline is armed then. Inline: a call saved and
    /// restored registers at every visit (callgrind, S1: about 20 instructions).
    #[inline]
    fn arm(
        &mut self,
        wheel: &mut TimerWheel<ConnectionId>,
        next_timer: &mut Option<Option<Instant>>,
        epoch: Instant,
    ) {
        let Some(deadline) = self.link.poll_timeout() else {
            return;
        };
        // Usually the idle deadline, pushed back by the last read: no earlier than the armed
        // entry, and told so without a subtraction.
        if self.armed != 0 && deadline >= epoch + Duration::from_nanos(self.armed - 1) {
            return;
        }
        wheel.insert(deadline, self.link.id);
        self.armed = nanos_since(epoch, deadline) + 1;
        *next_timer = None;
    }

    /// Updates the connection's memory count (its buffers and its transport's, TLS);
    /// returns the change, for `Loop::budget_delta`.
    ///
    /// A growth counts at once; a shrink only once the bytes held fell to half the count
    /// or less (to nothing included), so the count is never below what the connection
    /// holds and at most twice it. The read buffer's capacity, most of the count, shrinks
    /// by each frame split off it until a read reclaims the room (every message at one in
    /// flight): counted exactly, every turn changed the budget (an atomic addition and the
    /// gauge; callgrind, S1: about 227 000 of 249 503 turns), for a count below what the
    /// buffer's allocation takes anyway.
    fn recount(&mut self) -> isize {
        let buffered = u32::try_from(self.link.buffered()).unwrap_or(u32::MAX);
        if buffered <= self.counted && buffered > self.counted / 2 {
            return 0;
        }
        let delta = buffered as isize - self.counted as isize;
        self.counted = buffered;
        delta
    }
}

// An idle connection costs its slab entry and its timer entry (16 bytes) and nothing else on
// our heap (its buffers and decoder are released): keep that well under 256 bytes (project
// goal; measured as RSS in BENCHMARKS.md, heap counted by `tests/idle_cost.rs`).
// (mio adds 8 bytes to a socket in debug builds.)
const _: () =
    assert!(std::mem::size_of::<Entry>() <= 168 + if cfg!(debug_assertions) { 8 } else { 0 });

struct Drain {
    deadline: Instant,
    report: ShutdownReport,
}

/// The running loop's state.
struct Loop {
    r: Reactor,
    dispatcher: Dispatcher,
    conns: Slab<Entry>,
    wheel: TimerWheel<ConnectionId>,
    scratch: Box<[u8]>,
    events: Vec<Event>,
    fired: Vec<ConnectionId>,
    pending: Vec<usize>,
    completions: Vec<Completion>,
    next_generation: u32,
    accept_retry_at: Option<Instant>,
    drain: Option<Drain>,
    /// Distinct local addresses connections were accepted on (see `Entry::local`).
    locals: Vec<SocketAddr>,
    epoch: Instant,
    /// The latest clock reading: the turn's `now` (read once, after `poll`), then each later
    /// reading of the turn (an inline handler's end, a report after a write). The next
    /// `poll`'s timeout is taken from it instead of a read of its own: it can only be older,
    /// so the wait can only end late, by the work done since it (the wheel's tick is 10 ms).
    clock: Instant,
    /// This turn's wall-clock time, read once at its first message (`Context::received_time`,
    /// `MessageStart::system_time`, and so the ACK's MSH-7); `None` until then.
    wall: Option<SystemTime>,
    /// Change in buffered bytes this turn, published to the budget once per turn.
    budget_delta: isize,
    /// Reading is paused by the memory budget.
    paused: bool,
    /// TLS handshakes in progress, capped.
    handshakes: Handshakes,
    /// While paused: the one connection allowed to read (see `holder`).
    holder: Option<ConnectionId>,
    /// While paused: the one connection whose frame may go past its first
    /// [`LARGE_FRAME`](crate::connection::LARGE_FRAME) bytes, until that frame's message is
    /// answered (see `holder`).
    finishing: Option<ConnectionId>,
    /// This turn's per-message counts, added to the metrics at the turn's end.
    tally: Tally,
    /// The wheel's next deadline as last asked (`TimerWheel::next_deadline`), kept between
    /// turns: most turns change nothing in the wheel (a read pushes the idle deadline back
    /// without a new entry), and asking walks its bitmaps. `None` inside: ask again.
    next_timer: Option<Option<Instant>>,
    /// When the heartbeat is stamped next (see [`BEAT_EVERY`]); the sweep runs then too.
    beat_due: Instant,
    /// The last stamp's time plus [`HEARTBEAT_INTERVAL`]: a deadline at or after it is
    /// waited for with the heartbeat's timeout (see `poll_timeout`).
    wake_by: Instant,
    /// Connections that keep the thread's pooled buffers (read buffer, decoder, slot queue)
    /// between messages (`Link::rested`), at most [`HOLDING`]: each sweep gives back those
    /// of every one it finds idle (see `sweep`).
    holding: Vec<ConnectionId>,
    /// The next sweep has something to do (a connection is listed, or the pools kept more
    /// than they keep when idle): an idle reactor wakes for it.
    sweep_due: bool,
    /// Sweep periods so far (wrapping): when a connection last gave its buffers back.
    period: u8,
}

impl Reactor {
    /// Runs until shut down, handing messages to the handler inline or to `pool` (which is
    /// `Some` exactly in [`Dispatch::Pool`] mode). Returns this reactor's part of the shutdown
    /// report and the end of its grace period.
    pub(crate) fn run(self, pool: Option<Arc<Pool>>) -> io::Result<(ShutdownReport, Instant)> {
        let now = Instant::now();
        let dispatcher = Dispatcher::new(
            self.dispatch,
            Arc::clone(&self.handler),
            pool,
            Arc::clone(&self.sink),
            self.inline_slow,
            self.telemetry.metrics.clone(),
        );
        let handshakes = Handshakes::new(self.max_handshakes);
        let mut lp = Loop {
            dispatcher,
            conns: Slab::with_capacity(self.shared.max_connections.min(4096)),
            r: self,
            wheel: TimerWheel::new(DEFAULT_TICK, DEFAULT_SLOTS, now),
            scratch: vec![0; READ_CHUNK].into_boxed_slice(),
            events: Vec::new(),
            fired: Vec::new(),
            pending: Vec::new(),
            completions: Vec::new(),
            next_generation: 0,
            accept_retry_at: None,
            drain: None,
            locals: Vec::new(),
            epoch: now,
            clock: now,
            wall: None,
            budget_delta: 0,
            paused: false,
            handshakes,
            holder: None,
            finishing: None,
            next_timer: None,
            beat_due: now,
            wake_by: now + HEARTBEAT_INTERVAL,
            holding: Vec::new(),
            sweep_due: false,
            period: 0,
            tally: Tally::default(),
        };
        let result = lp.run();
        // Whatever happened, release what this reactor still counts in the shared state.
        for _ in 0..lp.conns.len() {
            lp.forget_one();
        }
        let counted: usize = lp.conns.iter().map(|(_, e)| e.counted as usize).sum();
        lp.r.shared.budget.apply(lp.budget_delta - counted as isize);
        result
    }
}

impl Loop {
    fn run(&mut self) -> io::Result<(ShutdownReport, Instant)> {
        let mut waiter = Waiter::new(EVENTS_CAPACITY);
        loop {
            let timeout = self.poll_timeout(self.clock);
            if let Err(e) = waiter.wait(&mut self.r.poll, timeout) {
                if e.kind() == ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            // The turn's one clock reading, handed down to everything the turn does.
            let now = Instant::now();
            self.clock = now;
            self.wall = None;
            if now >= self.beat_due {
                self.r.shared.heartbeat.beat(usize::from(self.r.index), now);
                self.beat_due = now + BEAT_EVERY;
                self.wake_by = now + HEARTBEAT_INTERVAL;
                self.period = self.period.wrapping_add(1);
                if self.sweep_due {
                    self.sweep();
                }
            }
            for Ready {
                token,
                readable,
                writable,
                read_closed,
            } in waiter.iter()
            {
                match token {
                    LISTENER => self.accept(now),
                    WAKER => {}
                    Token(key) => {
                        // Sporadic events for closed (or reused) slots are harmless: the entry is
                        // gone or the new one just sees a readiness hint.
                        let Some(entry) = self.conns.get_mut(key) else {
                            continue;
                        };
                        entry.link.handle_readiness(readable, writable, read_closed);
                        // A writable edge alone for a link with nothing to write: a visit
                        // would find nothing to do (`Link::is_spent`), as its last one left
                        // it. The kernel reports such edges now and then after a reply left
                        // (sockets stay registered for both directions); more of them, the
                        // busier the machine.
                        if !readable && !read_closed && entry.link.is_spent() {
                            continue;
                        }
                        self.drive(key, now);
                    }
                }
            }
            let woken = self.r.sink.notifier().reset();
            self.adopt(now);
            if woken {
                self.completions(now);
            }
            self.resume_pending(now);
            if self.accept_retry_at.is_some_and(|t| t <= now) {
                self.accept_retry_at = None;
                self.accept(now);
            }
            self.timers(now);
            self.commands(now);
            self.dispatcher.flush();
            self.publish_budget(now);
            let done = self.finish_drain(now);
            self.tally.flush(&self.r.telemetry.metrics);
            if let Some(done) = done {
                return Ok(done);
            }
        }
    }

    /// How long the next wait may take, in milliseconds: until the earliest deadline (the
    /// wheel's, an accept retry, the end of a drain), at most [`HEARTBEAT_INTERVAL`], and at
    /// most [`BEAT_EVERY`] while a sweep is due; 0 with connections pending.
    fn poll_timeout(&mut self, now: Instant) -> u32 {
        if !self.pending.is_empty() {
            return 0;
        }
        // Asked again when the wheel changed, or when the answer has come (it may be a lower
        // bound that `timers` found nothing at: asking again moves on).
        let timer = match self.next_timer {
            Some(next) if next.is_none_or(|t| t > now) => next,
            _ => {
                let next = self.wheel.next_deadline();
                self.next_timer = Some(next);
                next
            }
        };
        let next = if self.accept_retry_at.is_none() && self.drain.is_none() {
            timer // the usual case: no minimum to take
        } else {
            [
                timer,
                self.accept_retry_at,
                self.drain.as_ref().map(|d| d.deadline),
            ]
            .into_iter()
            .flatten()
            .min()
        };
        // An idle reactor still wakes to stamp its heartbeat. A deadline at or after
        // `wake_by` (an idle timeout, the usual case) needs no clock subtraction: it is at
        // least the heartbeat's interval away, less the time since the last stamp (under
        // [`BEAT_EVERY`] at the turn's start, plus the turn's own work), so waiting the
        // interval wakes at most that late for it: about the wheel's own tick of lateness.
        let timeout = match next {
            Some(t) if t < self.wake_by => millis_until(now, t).min(HEARTBEAT_MS),
            _ => HEARTBEAT_MS,
        };
        // A due sweep runs at the first turn after `beat_due`: waking a sweep period after
        // this turn is soon enough, and needs no clock subtraction.
        if self.sweep_due {
            timeout.min(BEAT_EVERY_MS)
        } else {
            timeout
        }
    }

    fn accept(&mut self, now: Instant) {
        loop {
            let Some(listener) = &self.r.listener else {
                return;
            };
            match listener.accept() {
                Ok((socket, peer)) => self.place(socket, peer, now),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e)
                    if e.kind() == ErrorKind::Interrupted
                        || e.kind() == ErrorKind::ConnectionAborted => {}
                Err(_) => {
                    // Out of file descriptors or memory: connections wait in the backlog.
                    self.accept_retry_at = Some(now + ACCEPT_RETRY);
                    return;
                }
            }
        }
    }

    /// Checks the server-wide cap, then serves the connection here or hands it to the
    /// least-loaded reactor.
    fn place(&mut self, socket: TcpStream, peer: SocketAddr, now: Instant) {
        let shared = &self.r.shared;
        if shared.open.fetch_add(1, Ordering::AcqRel) >= shared.max_connections {
            shared.open.fetch_sub(1, Ordering::AcqRel);
            let local = socket.local_addr().unwrap_or(self.r.local_addr);
            self.reject(peer, local, CloseReason::Rejected);
            return; // dropping the socket closes it
        }
        let target = shared
            .reactors
            .iter()
            .enumerate()
            .min_by_key(|(_, r)| r.load.load(Ordering::Acquire))
            .map_or(0, |(i, _)| i);
        shared.reactors[target].load.fetch_add(1, Ordering::AcqRel);
        if target == usize::from(self.r.index) {
            self.admit(socket, peer, now);
        } else {
            let inbox = &shared.reactors[target];
            lock(&inbox.accepted).push((socket, peer));
            inbox.handed.store(true, Ordering::Release);
            inbox.notifier.notify();
        }
    }

    /// Admits the connections the accepting reactor handed over.
    fn adopt(&mut self, now: Instant) {
        let inbox = &self.r.shared.reactors[usize::from(self.r.index)];
        // Cleared before the lock is taken: a hand-off after this swap sets it again.
        if !inbox.handed.swap(false, Ordering::AcqRel) {
            return;
        }
        let accepted = std::mem::take(&mut *lock(&inbox.accepted));
        for (socket, peer) in accepted {
            if self.drain.is_some() {
                // Too late: the server is stopping. Closing it loses nothing (nothing read).
                self.forget_one();
                continue;
            }
            self.admit(socket, peer, now);
        }
    }

    /// Releases the counts `place` took for one connection of this reactor.
    fn forget_one(&self) {
        self.r.shared.open.fetch_sub(1, Ordering::AcqRel);
        self.r.shared.reactors[usize::from(self.r.index)]
            .load
            .fetch_sub(1, Ordering::AcqRel);
    }

    /// Reports a connection closed at once, never served (over `max_connections`, not
    /// allowed).
    fn reject(&mut self, peer: SocketAddr, local: SocketAddr, reason: CloseReason) {
        let reject = RejectReason::before_start(reason, false);
        self.r.telemetry.metrics.rejected(reject).increment(1);
        // A proper id: the slot the next connection will take, with a generation of its own
        // (so the id is unique, and shaped like every other).
        let p = Peer {
            connection: ConnectionId {
                index: (u32::from(self.r.index) << 24) | self.conns.vacant_key() as u32,
                generation: self.generation(),
            },
            peer,
            local,
            identity: None,
        };
        self.r.telemetry.connection_start(&p);
        self.r.telemetry.connection_stop(&p, Duration::ZERO, reason);
    }

    /// Registers a connection `place` counted and serves it on this reactor.
    fn admit(&mut self, socket: TcpStream, peer: SocketAddr, now: Instant) {
        let local = socket.local_addr().unwrap_or(self.r.local_addr);
        if self.conns.len() >= MAX_KEYS_PER_REACTOR - 1 {
            self.forget_one();
            self.reject(peer, local, CloseReason::Rejected);
            return;
        }
        let policy = Arc::clone(&lock(&self.r.shared.policy));
        if !link::admits(&policy, self.r.acceptors.proxy.is_some(), peer.ip()) {
            self.forget_one();
            self.reject(peer, local, CloseReason::NotAllowed);
            return;
        }
        let local_index = self.local_index(local);
        let generation = self.generation();
        // Replies are small and latency-bound: never wait for Nagle.
        let _ = socket.set_nodelay(true);
        let mut transport = match Transport::accept(socket, &self.r.acceptors) {
            Ok(transport) => transport,
            Err(reason) => {
                self.forget_one();
                self.reject(peer, local, reason);
                return;
            }
        };
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        if self
            .r
            .poll
            .registry()
            .register(
                transport.socket(),
                Token(key),
                Interest::READABLE | Interest::WRITABLE,
            )
            .is_err()
        {
            self.forget_one();
            return;
        }
        let id = ConnectionId {
            index: (u32::from(self.r.index) << 24) | key as u32,
            generation,
        };
        let mut link = Link::new(id, transport, peer, Arc::clone(&self.r.limits), now);
        let started = link.poll_started(now);
        entry.insert(Entry {
            link,
            local: local_index,
            pending: false,
            accepted_at: nanos_since(self.epoch, now),
            armed: 0,
            counted: 0,
            drew: false,
        });
        if started {
            self.start(key);
        }
        // No drain check: draining closes the listener, so nothing is admitted after it.
        self.schedule(key);
    }

    /// The connection serves MLLP from now on: count it and report its start.
    fn start(&mut self, key: usize) {
        let m = &self.r.telemetry.metrics;
        m.accepted.increment(1);
        m.active.increment(1.0);
        let p = self.peer(&self.conns[key]);
        self.r.telemetry.connection_start(&p);
    }

    /// The index of `local` in `locals`, adding it if new.
    fn local_index(&mut self, local: SocketAddr) -> u16 {
        if let Some(i) = self.locals.iter().position(|l| *l == local) {
            return i as u16;
        }
        if self.locals.len() >= usize::from(u16::MAX) {
            return 0; // 65 535 distinct local addresses: report the first (never seen in practice)
        }
        self.locals.push(local);
        (self.locals.len() - 1) as u16
    }

    fn generation(&mut self) -> u32 {
        self.next_generation = self.next_generation.wrapping_add(1);
        self.next_generation
    }

    fn peer(&self, entry: &Entry) -> Peer {
        peer_of(&self.locals, entry)
    }

    /// Moves bytes and messages for one connection until it can make no more progress (or its
    /// read budget for this turn is spent), reports its events, and re-arms its deadline.
    /// Removes the connection if it closed.
    fn drive(&mut self, key: usize, now: Instant) {
        // Sporadic calls for a closed slot do nothing. Inside the loop the entry stays until
        // `report` removes it, which ends the visit.
        if !self.conns.contains(key) {
            return;
        }
        let mut budget = READ_BUDGET;
        loop {
            let mut progress = self.dispatch(key, now);
            // Read before writing, and write only once the socket has no more bytes waiting
            // (or the read budget or the memory budget stops reading): a read after this
            // visit's replies would find the peer's answer to them, and serving it now would
            // let one quick peer take turn after turn while the other ready connections wait
            // (at 50 connections one message each, p99 5.8 ms against the limit's 1.1 ms).
            // Its next message waits for the next turn, after everyone ready now.
            let mut reading = false;
            // A PROXY header is outside the memory budget (it is a few bytes, and the
            // connection holds nothing else yet) and the handshake cap.
            let entry = &mut self.conns[key];
            let wants_read = entry.link.wants_read()
                && (entry.link.reads_header()
                    || (entry.may_handshake(&mut self.handshakes) && self.may_read(key)));
            if self.paused && wants_read {
                // Above the budget, how far the holder's frame may go (see `room`); the rest
                // of this visit's read budget is given up.
                budget = budget.min(self.room(key));
            }
            // One look-up for the rest of the pass (`may_read` may look at every entry).
            let entry = &mut self.conns[key];
            if wants_read {
                if budget == 0 {
                    if !entry.pending {
                        entry.pending = true;
                        self.pending.push(key);
                    }
                } else {
                    // Above the budget the holder reads until `WouldBlock` (see `holder`).
                    let read = entry.link.read(
                        &mut self.scratch,
                        &mut budget,
                        self.paused,
                        &self.r.shared.policy,
                        &self.r.telemetry,
                        now,
                        &mut self.events,
                    );
                    // No `WouldBlock` yet: more may be waiting.
                    reading = entry.link.read_ready;
                    if read && !reading {
                        // The socket is empty (a short read or its end): what came is
                        // dispatched first, then written and reported in the same pass, as
                        // a pass with nothing read would (one write attempt and one report
                        // per message instead of two: callgrind, S1).
                        continue;
                    }
                    progress |= read;
                }
            }
            if !reading {
                progress |= entry.link.write(&self.r.telemetry, now, &mut self.events);
            }
            if entry.link.poll_started(now) {
                if std::mem::take(&mut entry.link.handshake) == Slot::Held {
                    self.release_handshake();
                }
                self.start(key);
                progress = true;
            }
            if self.report(key) {
                return; // closed and removed
            }
            if !progress {
                break;
            }
            let link = &mut self.conns[key].link;
            if link.is_spent() {
                // The pass skipped here is the one that found nothing and gave the read
                // buffer back; give it back now, or every idle connection keeps one
                // (`tests/idle_cost.rs`).
                link.rest();
                break;
            }
        }
        self.end_visit(key);
    }

    /// The end of a visit to connection `key` (still open), with one look-up of its entry:
    /// its layer's idle buffers go back, its pooled buffers are held or given back (see
    /// below), and its deadline is armed.
    ///
    /// It keeps the pooled buffers it holds (read buffer, decoder, slot queue) if it is in
    /// use: it gave them back earlier in this sweep period, so it is likely to take them
    /// again soon (at one message in flight, every message would otherwise give them back
    /// and take them again: callgrind, S1). It is then listed (at most [`HOLDING`]) for the
    /// sweep. Otherwise, idle, it gives them back now, as a connection that sends one
    /// message and rests (a thousand such in a burst take no more buffers than one).
    /// Listed, it costs one comparison per visit.
    fn end_visit(&mut self, key: usize) {
        let entry = &mut self.conns[key];
        if entry.link.release_idle_buffers() {
            self.budget_delta += entry.recount();
        }
        let link = &mut entry.link;
        if link.rested != Rested::Listed && link.conn.holds_buffers() {
            if link.rested == Rested::At(self.period) && self.holding.len() < HOLDING {
                link.rested = Rested::Listed;
                self.holding.push(link.id);
                self.sweep_due = true;
            } else if !link.conn.release_idle() {
                link.rested = Rested::At(self.period);
                self.budget_delta += entry.recount();
            }
            // Else in use: decided again at its next visit.
        }
        entry.arm(&mut self.wheel, &mut self.next_timer, self.epoch);
    }

    /// The periodic sweep (every [`BEAT_EVERY`] while it has work, from the turn that stamps
    /// the heartbeat): every listed connection found idle gives its pooled buffers back and
    /// leaves the list, and the pools return what nobody took since the last sweep. Its work
    /// is the listed connections (at most [`HOLDING`]), not all of them; a connection in use
    /// gives its buffers back at most once per sweep period (at one message in flight, once
    /// in some hundreds of messages instead of every message).
    fn sweep(&mut self) {
        let mut holding = std::mem::take(&mut self.holding);
        holding.retain(|&id| {
            let Some(key) = self.key_of(id) else {
                return false; // closed
            };
            if self.conns[key].link.conn.release_idle() {
                return true;
            }
            self.conns[key].link.rested = Rested::At(self.period);
            self.count(key);
            false
        });
        self.holding = holding;
        self.sweep_due = crate::connection::trim_pools() || !self.holding.is_empty();
    }

    /// Tells the dispatcher of a handler call the connection abandoned at its deadline, then
    /// hands every message the connection can dispatch now to the handler: inline, or into
    /// this turn's job batch for the pool. Returns whether any was dispatched.
    fn dispatch(&mut self, key: usize, now: Instant) -> bool {
        let mut any = false;
        // One look-up for the whole visit: everything below but the entry is another field
        // of `self` (a look-up per use was three bounds checks per message: callgrind, S1).
        let entry = &mut self.conns[key];
        if entry.link.take_abandoned() {
            self.dispatcher.abandoned(entry.link.id, now);
        }
        loop {
            let Some(d) = entry.link.conn.poll_dispatch(now, &mut self.events) else {
                return any;
            };
            any = true;
            if d.payload.len() > crate::connection::LARGE_FRAME {
                // A large frame's freed buffers go back to the system at the next sweep (the
                // connection noted it for the pool's trim by the same measure).
                self.sweep_due = true;
            }
            if self.paused && self.holder == Some(entry.link.id) {
                // Its frame is complete: above the budget, no more (see `holder`).
                entry.drew = true;
            }
            // Events of earlier messages first (a no-reply's stop comes before the next start).
            // They came from the previous message's completion: the latest reading (its
            // inline handler's end) is when they happened. Who they are about is built only
            // for the observer.
            let (shared, locals) = (&*entry, &self.locals);
            let peer = || peer_of(locals, shared);
            if !self.events.is_empty() {
                for event in &self.events {
                    self.r
                        .telemetry
                        .report(&peer, event, self.clock, &mut self.tally);
                }
                self.events.clear();
            }
            let system_time = *self.wall.get_or_insert_with(SystemTime::now);
            self.r.telemetry.message_start(
                &peer,
                d.seq,
                d.payload.len(),
                system_time,
                &mut self.tally,
            );
            let seq = d.seq;
            let message = Message {
                link: &shared.link,
                local: self.locals[usize::from(shared.local)],
                d,
                received_time: system_time,
            };
            // Inline, the outcome is here now; from the pool it comes as a completion.
            if let Some((outcome, done)) = self.dispatcher.dispatch(message, self.clock) {
                self.clock = done;
                entry
                    .link
                    .conn
                    .handle_completion(seq, outcome, now, &mut self.events);
            }
        }
    }

    /// A handshake slot is given back: it passes to the longest waiter still waiting, which
    /// resumes next turn.
    fn release_handshake(&mut self) {
        while let Some(id) = self.handshakes.next_waiter() {
            if let Some(key) = self.key_of(id)
                && self.conns[key].link.handshake == Slot::Waiting
            {
                let entry = &mut self.conns[key];
                entry.link.handshake = Slot::Held;
                if !entry.pending {
                    entry.pending = true;
                    self.pending.push(key);
                }
                return;
            }
        }
        self.handshakes.free_one();
    }

    /// Updates connection `key`'s memory count: the connection's buffers and its transport's
    /// (TLS).
    fn count(&mut self, key: usize) {
        self.budget_delta += self.conns[key].recount();
    }

    /// Whether connection `key` may read under the memory budget: always below it. Above it
    /// one connection per reactor at a time (the holder), to finish the frame it is in and no
    /// more (see [`holder`](Self::holder)).
    fn may_read(&mut self, key: usize) -> bool {
        if !self.paused {
            // This turn's reads count at once, not at the turn's end: one turn can read from
            // hundreds of connections.
            let budget = &self.r.shared.budget;
            let used = budget.used.load(Ordering::Acquire) as isize + self.budget_delta;
            if used <= budget.limit as isize {
                return true;
            }
            self.pause_reads();
        }
        self.holder() == Some(key)
    }

    /// Stops reading at the budget (a new pause).
    fn pause_reads(&mut self) {
        self.paused = true;
        self.holder = None;
        self.finishing = None;
        self.r.telemetry.metrics.read_pauses.increment(1);
    }

    /// The connection that may read while paused, one per reactor at a time: each connection
    /// may finish the frame it is in and no more (a pipelining sender does not go on to its
    /// next frame, and its next, each held while the handler works). It keeps the right until
    /// that frame is complete or it has no bytes waiting (a peer that stalls mid-frame must
    /// not hold everyone up until its frame deadline; its partial frame stays counted). A
    /// holder must have bytes waiting, must not have finished a frame in this pause, and must
    /// be in a frame or have no message in flight (a sender waiting on nothing, such as a new
    /// one: its one frame is all it can add); one in a frame first, so frames complete and
    /// their memory can drain, then in key order after the last holder, so each gets its
    /// turn. With none, memory drains as handlers answer the messages in flight, and reading
    /// resumes at the low mark.
    ///
    /// What a holder adds is bounded by [`room`](Self::room): a frame past its first
    /// [`LARGE_FRAME`](crate::connection::LARGE_FRAME) bytes already counts as the largest
    /// frame allowed, so finishing it adds one read past its end at most; any other frame may
    /// grow up to that mark (a small message completes), and past it only as the reactor's
    /// one *finishing* frame: the next may follow once that frame's message is answered and
    /// its reply written, or its connection closed (a peer that stops in its finishing frame
    /// keeps the turn until its frame deadline; small messages and frames counted in full do
    /// not wait for it). A frame waiting at the mark is not a holder. So per reactor at most
    /// one frame at a time grows from its first 64 KiB to a full frame above the budget,
    /// whatever the handler's pace: without the mark, every connection that had at most
    /// 64 KiB of a frame in when reading paused finished a whole frame above the budget in
    /// turn, while a slow handler held them all.
    ///
    /// No deadlock: a frame counted in full reads whenever it has bytes waiting; the
    /// finishing turn frees once its message is answered and written (bounded by the
    /// handler and write deadlines) or its frame deadline closes a peer that stopped in it;
    /// then the next frame at the mark takes it. A newly picked holder has no readiness
    /// event coming (edge-triggered): it goes on the pending list.
    fn holder(&mut self) -> Option<usize> {
        let finishing = self.finishing;
        let free = self.finishing_free();
        let room = |e: &Entry| {
            free || finishing == Some(e.link.id)
                || e.link.conn.buffered_len() < crate::connection::LARGE_FRAME
                || e.link.conn.frame_counted_in_full()
        };
        let in_frame = |e: &Entry| e.link.in_frame();
        let eligible = |e: &Entry| {
            !e.drew && e.link.wants_read() && (in_frame(e) || !e.link.in_flight()) && room(e)
        };
        let last = self.holder.and_then(|id| self.key_of(id));
        if let Some(key) = last
            && eligible(&self.conns[key])
        {
            return Some(key);
        }
        let after = self.holder.map_or(0, |id| self.key_of_slot(id) + 1);
        let pick = |want_frame: bool| {
            let later = self.conns.iter().filter(|(k, _)| *k >= after);
            let earlier = self.conns.iter().filter(|(k, _)| *k < after);
            later
                .chain(earlier)
                .find(|(_, e)| eligible(e) && (!want_frame || in_frame(e)))
                .map(|(k, _)| k)
        };
        let key = pick(true).or_else(|| pick(false));
        self.holder = key.map(|k| self.conns[k].link.id);
        if let Some(key) = key
            && last != Some(key)
            && !self.conns[key].pending
        {
            self.conns[key].pending = true;
            self.pending.push(key);
        }
        key
    }

    /// How many bytes holder `key` may read now, above the budget (see
    /// [`holder`](Self::holder)): any number for a frame counted in full, the finishing
    /// frame, or a PROXY header; up to the mark for any other frame; at the mark (where
    /// `holder` picked it only with the finishing turn free) it takes the turn.
    #[cold]
    fn room(&mut self, key: usize) -> usize {
        let link = &self.conns[key].link;
        if link.reads_header()
            || link.conn.frame_counted_in_full()
            || self.finishing == Some(link.id)
        {
            return usize::MAX;
        }
        let len = link.conn.buffered_len();
        if len < crate::connection::LARGE_FRAME {
            return crate::connection::LARGE_FRAME - len;
        }
        self.finishing = Some(link.id);
        usize::MAX
    }

    /// Whether a frame may take the finishing turn (see [`holder`](Self::holder)): nobody
    /// has it, its connection closed, or it has nothing in flight and no frame under way of
    /// the turn's (bytes of a next frame, read past the end of the one it finished, are
    /// not).
    fn finishing_free(&self) -> bool {
        let Some(key) = self.finishing.and_then(|id| self.key_of(id)) else {
            return true;
        };
        let entry = &self.conns[key];
        !entry.link.in_flight() && (entry.drew || !entry.link.in_frame())
    }

    /// Reports the connection's events, updates its memory count, and removes it if it
    /// closed. Returns true if it was removed.
    fn report(&mut self, key: usize) -> bool {
        let entry = &mut self.conns[key];
        self.budget_delta += entry.recount();
        if self.events.is_empty() && !entry.link.is_closed() {
            return false;
        }
        // A fresh clock for latencies: `now` of the turn is older than the write that
        // finished these messages. Only when a latency is wanted (`timing_histograms`, or
        // an observer of message stops).
        let fresh = if self.r.telemetry.times_stops() {
            self.clock = Instant::now();
            self.clock
        } else {
            self.clock
        };
        // Who the events are about, built only for an observer (metrics do not need it).
        let (entry, locals) = (&*entry, &self.locals);
        let peer = || peer_of(locals, entry);
        for event in &self.events {
            self.r
                .telemetry
                .report(&peer, event, fresh, &mut self.tally);
        }
        self.events.clear();
        let Some(closed) = entry.link.closed() else {
            return false;
        };
        let p = peer_of(locals, entry);
        let reason = closed.reason;
        let entry = self.conns.remove(key);
        self.budget_delta -= entry.counted as isize;
        if entry.link.handshake == Slot::Held {
            self.release_handshake();
        }
        self.forget_one();
        self.dispatcher.cancel(entry.link.id);
        if let Some(drain) = &mut self.drain {
            drain.report.closed += 1;
        }
        if closed.rejected.is_some() {
            // Never served (no valid PROXY header, not allowed, no handshake in time).
            if let Some(reject) = closed.rejected {
                self.r.telemetry.metrics.rejected(reject).increment(1);
            }
            self.r.telemetry.connection_start(&p);
            self.r.telemetry.connection_stop(&p, Duration::ZERO, reason);
            return true;
        }
        let m = &self.r.telemetry.metrics;
        m.closed(reason).increment(1);
        m.active.decrement(1.0);
        let duration =
            Duration::from_nanos(nanos_since(self.epoch, fresh).saturating_sub(entry.accepted_at));
        m.connection_duration.record(duration.as_secs_f64());
        self.r.telemetry.connection_stop(&p, duration, reason);
        true // dropping `entry` closes the socket and deregisters it
    }

    /// Publishes this turn's change in buffered bytes, pausing or resuming reads at the
    /// budget's marks.
    fn publish_budget(&mut self, now: Instant) {
        if self.budget_delta == 0 && !self.paused {
            return;
        }
        let delta = std::mem::take(&mut self.budget_delta);
        let budget = &self.r.shared.budget;
        let over = budget.apply(delta);
        let m = &self.r.telemetry.metrics;
        m.buffered_bytes
            .set(budget.used.load(Ordering::Relaxed) as f64);
        let above_resume = budget.used.load(Ordering::Acquire) > budget.limit / 4 * 3;
        if over && !self.paused {
            self.pause_reads();
        }
        if over || (self.paused && above_resume) {
            // Edge-triggered: the holder may have changed (the last one completed its frame,
            // or reading has just paused) and the new one has no event coming.
            if let Some(key) = self.holder() {
                self.drive(key, now);
            }
        } else if self.paused {
            self.paused = false;
            self.holder = None;
            self.finishing = None;
            // Edge-triggered: connections that became readable while paused were not read.
            let mut keys = Vec::new();
            for (key, entry) in &mut self.conns {
                entry.drew = false;
                if entry.link.wants_read() {
                    keys.push(key);
                }
            }
            for key in keys {
                self.drive(key, now);
            }
        }
    }

    /// Arms connection `key`'s deadline (see [`Entry::arm`]).
    fn schedule(&mut self, key: usize) {
        if let Some(entry) = self.conns.get_mut(key) {
            entry.arm(&mut self.wheel, &mut self.next_timer, self.epoch);
        }
    }

    fn timers(&mut self, now: Instant) {
        // Nothing fires before the wheel's next deadline as last asked (kept up to date by
        // every insert): most turns skip the wheel (callgrind, S1: about 100 instructions per
        // message).
        if let Some(next) = self.next_timer
            && next.is_none_or(|t| t > now)
        {
            return;
        }
        let mut fired = std::mem::take(&mut self.fired);
        self.wheel.expired(now, &mut fired);
        if !fired.is_empty() {
            self.next_timer = None;
        }
        for id in fired.drain(..) {
            let Some(key) = self.key_of(id) else {
                continue; // the slot was reused: a stale timer of a closed connection
            };
            let entry = &mut self.conns[key];
            if entry.armed != 0 && entry.armed <= nanos_since(self.epoch, now) + 1 {
                entry.armed = 0; // this is (or overtook) the armed entry: re-arm below
            }
            entry
                .link
                .handle_timeout(now, self.paused, &mut self.events);
            self.drive(key, now);
        }
        self.fired = fired;
    }

    /// The slab slot connection `id` has or had.
    fn key_of_slot(&self, id: ConnectionId) -> usize {
        (id.index & (MAX_KEYS_PER_REACTOR as u32 - 1)) as usize
    }

    /// The slab key of connection `id`, if it is still open on this reactor.
    fn key_of(&self, id: ConnectionId) -> Option<usize> {
        let key = self.key_of_slot(id);
        match self.conns.get(key) {
            Some(entry) if entry.link.id == id => Some(key),
            _ => None,
        }
    }

    fn completions(&mut self, now: Instant) {
        let mut completions = std::mem::take(&mut self.completions);
        self.r.sink.drain_into(&mut completions);
        for Completion { id, seq, outcome } in completions.drain(..) {
            match self.key_of(id) {
                Some(key) => {
                    let entry = &mut self.conns[key];
                    entry
                        .link
                        .conn
                        .handle_completion(seq, outcome, now, &mut self.events);
                    // Driven once after the whole drain (`resume_pending`, next in the turn),
                    // not once per completion: a store's group commit completes many
                    // messages of one connection at once, and their replies then leave in
                    // one write instead of one write each.
                    if !entry.pending {
                        entry.pending = true;
                        self.pending.push(key);
                    }
                }
                // The connection is gone: nobody to answer.
                None => self.r.telemetry.metrics.late_results.increment(1),
            }
        }
        self.completions = completions;
    }

    /// Drives the connections on the pending list. The list's allocation is kept for the
    /// next turn (it was dropped and grown again at every turn with completions: an
    /// allocation per turn in pool mode); what the visits add to it waits for the next turn.
    fn resume_pending(&mut self, now: Instant) {
        if self.pending.is_empty() {
            return;
        }
        let mut pending = std::mem::take(&mut self.pending);
        for &key in &pending {
            if let Some(entry) = self.conns.get_mut(key) {
                entry.pending = false;
                self.drive(key, now);
            }
        }
        pending.clear();
        pending.append(&mut self.pending);
        self.pending = pending;
    }

    fn commands(&mut self, now: Instant) {
        if !self.r.sink.notifier().take_commands() {
            return;
        }
        while let Ok(command) = self.r.commands.try_recv() {
            match command {
                Command::Shutdown { grace } => self.start_drain(grace, now),
            }
        }
    }

    fn start_drain(&mut self, grace: Duration, now: Instant) {
        if self.drain.is_some() {
            return;
        }
        // Stop accepting: closing the listener makes new connections fail at once.
        if let Some(mut listener) = self.r.listener.take() {
            let _ = self.r.poll.registry().deregister(&mut listener);
        }
        for (commands, notifier) in &self.r.followers {
            let _ = commands.send(Command::Shutdown { grace });
            notifier.command_sent();
        }
        let mut report = ShutdownReport::default();
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        report.in_flight = self
            .conns
            .iter()
            .filter(|(_, e)| e.link.in_flight())
            .count();
        self.drain = Some(Drain {
            deadline: deadline_after(now, grace),
            report,
        });
        for key in keys {
            if let Some(entry) = self.conns.get_mut(key) {
                entry.link.handle_shutdown(&mut self.events);
                self.drive(key, now);
            }
        }
    }

    /// Ends the loop once every connection is closed or the grace period is over.
    fn finish_drain(&mut self, now: Instant) -> Option<(ShutdownReport, Instant)> {
        let drain = self.drain.as_ref()?;
        if !self.conns.is_empty() && now < drain.deadline {
            return None;
        }
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        let forced = keys.len();
        for key in keys {
            self.conns[key]
                .link
                .conn
                .force_close(CloseReason::Shutdown, &mut self.events);
            self.report(key);
        }
        let drain = self.drain.take()?;
        let mut report = drain.report;
        report.forced = forced;
        Some((report, now.max(drain.deadline)))
    }
}

/// Who `entry`'s events are about; `locals` as in `Loop::locals`.
fn peer_of(locals: &[SocketAddr], entry: &Entry) -> Peer {
    Peer {
        connection: entry.link.id,
        peer: entry.link.peer(),
        local: locals[usize::from(entry.local)],
        identity: entry.link.identity(),
    }
}

/// Milliseconds from `now` until `t`, rounded up (0 if `t` has passed; a deadline a
/// fraction of a millisecond away is waited for, not polled for); saturating.
fn millis_until(now: Instant, t: Instant) -> u32 {
    let d = t.saturating_duration_since(now);
    let ms = d
        .as_secs()
        .saturating_mul(1000)
        .saturating_add(u64::from(d.subsec_nanos().div_ceil(1_000_000)));
    u32::try_from(ms).unwrap_or(u32::MAX)
}

/// `t` as nanoseconds since `epoch` (0 for earlier times). Deadlines are at most ~31 years
/// out (`deadline_after`), far below the 584 years 2⁶⁴ ns hold.
fn nanos_since(epoch: Instant, t: Instant) -> u64 {
    t.saturating_duration_since(epoch).as_nanos() as u64
}
