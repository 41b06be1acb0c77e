//! The only I/O in the crate: one mio poll loop serving a listener and its connections.
//!
//! Thin glue: protocol decisions live in [`Connection`]; this file moves bytes between sockets
//! and connections, jobs to the [`Pool`], deadlines through the [`TimerWheel`], and effects to
//! metrics and the observer.
//!
//! Sockets are registered once for `READABLE | WRITABLE` (edge-triggered) and never
//! re-registered: the reactor remembers readiness in `read_ready`/`write_ready` and acts on it
//! when the connection wants to, so pausing reads (read-ahead full) costs no syscall.

use std::io::{self, ErrorKind, IoSlice, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender};
use std::time::{Duration, Instant, SystemTime};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use crate::ack::AckCode;
use crate::connection::{Connection, Effect, FrameRejection, Limits};
use crate::error::{CloseReason, ExceptionReason};
use crate::handler::{ConnectionId, Context};
use crate::pool::{Completion, Job, Notifier, Pool};
use crate::server::ShutdownReport;
use crate::telemetry::{
    ConnectionStart, ConnectionStop, MessageException, MessageStart, MessageStop, Metrics, Observer,
};
use crate::timer::{DEFAULT_SLOTS, DEFAULT_TICK, TimerWheel};

/// Token of the listening socket; slab keys (connections) use the tokens below it.
pub(crate) const LISTENER: Token = Token(usize::MAX - 1);
/// Token of the waker that workers and the server handle use.
pub(crate) const WAKER: Token = Token(usize::MAX - 2);

/// Bytes read per `read` call: 64 KiB takes a full socket buffer's worth in few syscalls while
/// staying in L2 cache; one such buffer per reactor (not per connection).
const READ_CHUNK: usize = 64 * 1024;

/// Reads per connection per readiness event before the reactor serves others (then the
/// connection goes on the pending list and is resumed next turn): 16 × 64 KiB = 1 MiB, enough
/// that a 1 MiB message needs no extra turn, small enough that one flooding peer cannot hold
/// the loop for more than about a millisecond.
const READ_BUDGET: usize = 16;

/// Events taken from the kernel per `poll` call.
const EVENTS_CAPACITY: usize = 1024;

/// When `accept` fails for lack of resources (EMFILE, ENFILE, ENOBUFS), retry after this long
/// rather than spin: edge-triggered readiness would not report the waiting connections again.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// A request from the server handle.
#[derive(Debug)]
pub(crate) enum Command {
    Shutdown {
        grace: Duration,
        done: Sender<ShutdownReport>,
    },
}

/// Everything a reactor needs, built by the server builder.
pub(crate) struct Reactor {
    pub(crate) poll: Poll,
    pub(crate) listener: Option<TcpListener>,
    pub(crate) local_addr: SocketAddr,
    pub(crate) limits: Arc<Limits>,
    pub(crate) max_connections: usize,
    pub(crate) notifier: Arc<Notifier>,
    pub(crate) completions: Receiver<Completion>,
    pub(crate) commands: Receiver<Command>,
    pub(crate) metrics: Metrics,
    pub(crate) observer: Option<Arc<dyn Observer>>,
}

struct Entry {
    id: ConnectionId,
    socket: TcpStream,
    conn: Connection,
    peer: SocketAddr,
    /// Index into `Loop::locals`: servers see one or two local addresses, so an index saves
    /// 30 bytes per connection over a `SocketAddr`.
    local: u16,
    /// Nanoseconds since `Loop::epoch` (8 bytes instead of an `Instant`'s 16).
    accepted_at: u64,
    /// The earliest deadline this connection has in the timer wheel, as nanoseconds since
    /// `Loop::epoch` plus one; 0 when none.
    armed: u64,
    read_ready: bool,
    write_ready: bool,
    /// On the pending list (read budget ran out with bytes left).
    pending: bool,
}

// An idle connection costs its slab entry and nothing else on our heap (its read buffer is
// released): keep that at most 256 bytes (project goal; measured as RSS in BENCHMARKS.md).
const _: () = assert!(std::mem::size_of::<Entry>() <= 256);

struct Drain {
    deadline: Instant,
    done: Sender<ShutdownReport>,
    report: ShutdownReport,
}

/// The running loop's state.
struct Loop {
    r: Reactor,
    pool: Pool,
    conns: Slab<Entry>,
    wheel: TimerWheel<ConnectionId>,
    scratch: Box<[u8]>,
    effects: Vec<Effect>,
    fired: Vec<ConnectionId>,
    pending: Vec<usize>,
    next_generation: u32,
    accept_retry_at: Option<Instant>,
    drain: Option<Drain>,
    /// Distinct local addresses connections were accepted on (see `Entry::local`).
    locals: Vec<SocketAddr>,
    epoch: Instant,
}

impl Reactor {
    /// Runs until shut down. Returns the shutdown report.
    pub(crate) fn run(self, pool: Pool) -> io::Result<ShutdownReport> {
        let now = Instant::now();
        let mut lp = Loop {
            conns: Slab::with_capacity(self.max_connections.min(4096)),
            r: self,
            pool,
            wheel: TimerWheel::new(DEFAULT_TICK, DEFAULT_SLOTS, now),
            scratch: vec![0; READ_CHUNK].into_boxed_slice(),
            effects: Vec::new(),
            fired: Vec::new(),
            pending: Vec::new(),
            next_generation: 0,
            accept_retry_at: None,
            drain: None,
            locals: Vec::new(),
            epoch: now,
        };
        lp.run()
    }
}

impl Loop {
    fn run(&mut self) -> io::Result<ShutdownReport> {
        let mut events = Events::with_capacity(EVENTS_CAPACITY);
        loop {
            let timeout = self.poll_timeout(Instant::now());
            if let Err(e) = self.r.poll.poll(&mut events, timeout) {
                if e.kind() == ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let now = Instant::now();
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(now),
                    WAKER => {}
                    Token(key) => {
                        // Sporadic events for closed (or reused) slots are harmless: the entry is
                        // gone or the new one just sees a readiness hint.
                        let Some(entry) = self.conns.get_mut(key) else {
                            continue;
                        };
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            entry.read_ready = true;
                        }
                        if event.is_writable() || event.is_write_closed() || event.is_error() {
                            entry.write_ready = true;
                        }
                        self.drive(key, now);
                    }
                }
            }
            self.r.notifier.reset();
            self.completions(now);
            self.resume_pending(now);
            if self.accept_retry_at.is_some_and(|t| t <= now) {
                self.accept_retry_at = None;
                self.accept(now);
            }
            self.timers(now);
            self.commands(now);
            if let Some(report) = self.finish_drain(now) {
                return Ok(report);
            }
        }
    }

    fn poll_timeout(&self, now: Instant) -> Option<Duration> {
        if !self.pending.is_empty() {
            return Some(Duration::ZERO);
        }
        [
            self.wheel.next_deadline(),
            self.accept_retry_at,
            self.drain.as_ref().map(|d| d.deadline),
        ]
        .into_iter()
        .flatten()
        .min()
        .map(|t| t.saturating_duration_since(now))
    }

    fn accept(&mut self, now: Instant) {
        loop {
            let Some(listener) = &self.r.listener else {
                return;
            };
            match listener.accept() {
                Ok((socket, peer)) => self.admit(socket, peer, now),
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

    fn admit(&mut self, mut socket: TcpStream, peer: SocketAddr, now: Instant) {
        let local = socket.local_addr().unwrap_or(self.r.local_addr);
        if self.conns.len() >= self.r.max_connections {
            self.r.metrics.rejected_max_connections.increment(1);
            let id = ConnectionId {
                index: u32::MAX,
                generation: self.generation(),
            };
            if let Some(o) = &self.r.observer {
                o.connection_start(&ConnectionStart {
                    connection: id,
                    peer,
                    local,
                    system_time: SystemTime::now(),
                });
                o.connection_stop(&ConnectionStop {
                    connection: id,
                    peer,
                    local,
                    duration: Duration::ZERO,
                    reason: CloseReason::Rejected,
                });
            }
            return; // dropping the socket closes it
        }
        let local_index = self.local_index(local);
        let generation = self.generation();
        // Replies are small and latency-bound: never wait for Nagle.
        let _ = socket.set_nodelay(true);
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        let token = Token(key);
        if self
            .r
            .poll
            .registry()
            .register(&mut socket, token, Interest::READABLE | Interest::WRITABLE)
            .is_err()
        {
            return;
        }
        let id = ConnectionId {
            index: key as u32,
            generation,
        };
        entry.insert(Entry {
            id,
            socket,
            conn: Connection::new(Arc::clone(&self.r.limits), now),
            peer,
            local: local_index,
            accepted_at: nanos_since(self.epoch, now),
            armed: 0,
            read_ready: false,
            write_ready: false,
            pending: false,
        });
        self.r.metrics.accepted.increment(1);
        self.r.metrics.active.increment(1.0);
        if let Some(o) = &self.r.observer {
            o.connection_start(&ConnectionStart {
                connection: id,
                peer,
                local,
                system_time: SystemTime::now(),
            });
        }
        // No drain check: draining closes the listener, so nothing is admitted after it.
        self.schedule(key);
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

    /// Moves bytes for one connection until it can make no more progress (or its read budget
    /// for this turn is spent), then applies the effects and re-arms its deadline.
    fn drive(&mut self, key: usize, now: Instant) {
        let mut budget = READ_BUDGET;
        let mut effects = std::mem::take(&mut self.effects);
        while let Some(entry) = self.conns.get_mut(key) {
            let mut progress = false;
            if entry.write_ready && entry.conn.transmit().is_some() {
                progress |= write(entry, &self.r.metrics, now, &mut effects);
            }
            if entry.read_ready && entry.conn.wants_read() {
                if budget == 0 {
                    if !entry.pending {
                        entry.pending = true;
                        self.pending.push(key);
                    }
                } else {
                    budget -= 1;
                    progress |= read(entry, &mut self.scratch, &self.r.metrics, now, &mut effects);
                }
            }
            self.effects = std::mem::take(&mut effects);
            if self.apply(key, now) {
                return; // closed and removed
            }
            effects = std::mem::take(&mut self.effects);
            if !progress {
                break;
            }
        }
        self.effects = effects;
        self.schedule(key);
    }

    /// Applies `self.effects` of connection `key`; returns true if the connection closed (its
    /// entry is then removed).
    fn apply(&mut self, key: usize, now: Instant) -> bool {
        let mut closed = None;
        let mut effects = std::mem::take(&mut self.effects);
        let Some(entry) = self.conns.get(key) else {
            return true;
        };
        let local = self.locals[usize::from(entry.local)];
        let m = &self.r.metrics;
        let observer = self.r.observer.as_deref();
        for effect in effects.drain(..) {
            match effect {
                Effect::Dispatch {
                    seq,
                    payload,
                    received_at,
                    deadline,
                } => {
                    m.received.increment(1);
                    m.message_size.record(payload.len() as f64);
                    let system_time = SystemTime::now();
                    if let Some(o) = observer {
                        o.message_start(&MessageStart {
                            connection: entry.id,
                            peer: entry.peer,
                            local,
                            sequence: seq,
                            message_size: payload.len(),
                            system_time,
                        });
                    }
                    let cx = Context {
                        peer: entry.peer,
                        local,
                        connection: entry.id,
                        sequence: seq,
                        received_at,
                        received_time: system_time,
                    };
                    self.pool.submit(Job {
                        id: entry.id,
                        seq,
                        payload,
                        cx,
                        deadline,
                    });
                }
                Effect::Junk(n) => m.junk.increment(n),
                Effect::Handled(outcome) => m.handled(outcome).increment(1),
                Effect::MessageStop {
                    seq,
                    response_size,
                    received_at,
                } => {
                    let duration = now.saturating_duration_since(received_at);
                    if let Some(size) = response_size {
                        m.response_size.record(size as f64);
                    }
                    m.response_latency.record(duration.as_secs_f64());
                    if let Some(o) = observer {
                        o.message_stop(&MessageStop {
                            connection: entry.id,
                            peer: entry.peer,
                            local,
                            sequence: seq,
                            duration,
                            response_size,
                        });
                    }
                }
                Effect::MessageException {
                    seq,
                    reason,
                    message_size,
                    detail,
                    received_at,
                } => {
                    if reason == ExceptionReason::HandlerTimeout {
                        self.pool.on_handler_timeout(now);
                    }
                    if let Some(o) = observer {
                        o.message_exception(&MessageException {
                            connection: entry.id,
                            peer: entry.peer,
                            local,
                            sequence: seq,
                            duration: received_at
                                .map_or(Duration::ZERO, |t| now.saturating_duration_since(t)),
                            message_size,
                            reason,
                            detail: detail.as_deref(),
                        });
                    }
                }
                Effect::NakQueued(AckCode::AR) => m.naks_ar.increment(1),
                Effect::NakQueued(_) => m.naks_ae.increment(1),
                Effect::LateResult => m.late_results.increment(1),
                Effect::FrameRejected(FrameRejection::TooLarge) => m.frames_too_large.increment(1),
                Effect::FrameRejected(FrameRejection::Timeout) => m.frames_timed_out.increment(1),
                Effect::Closed(reason) => closed = Some(reason),
            }
        }
        self.effects = effects;
        let Some(reason) = closed else { return false };
        let entry = self.conns.remove(key);
        debug_assert_eq!(entry.conn.close_reason(), Some(reason));
        if let Some(drain) = &mut self.drain {
            drain.report.closed += 1;
        }
        m.closed(reason).increment(1);
        m.active.decrement(1.0);
        let duration =
            Duration::from_nanos(nanos_since(self.epoch, now).saturating_sub(entry.accepted_at));
        m.connection_duration.record(duration.as_secs_f64());
        if let Some(o) = observer {
            o.connection_stop(&ConnectionStop {
                connection: entry.id,
                peer: entry.peer,
                local,
                duration,
                reason,
            });
        }
        true // dropping `entry` closes the socket and deregisters it
    }

    /// Inserts the connection's deadline into the wheel if it is earlier than what is armed.
    /// Later deadlines (the idle timer restarted by a read) are left to the armed entry: when
    /// it fires early the connection ignores it and the real deadline is armed then.
    fn schedule(&mut self, key: usize) {
        let Some(entry) = self.conns.get_mut(key) else {
            return;
        };
        let Some(deadline) = entry.conn.poll_timeout() else {
            return;
        };
        let at = nanos_since(self.epoch, deadline) + 1;
        if entry.armed == 0 || at < entry.armed {
            self.wheel.insert(deadline, entry.id);
            entry.armed = at;
        }
    }

    fn timers(&mut self, now: Instant) {
        let mut fired = std::mem::take(&mut self.fired);
        self.wheel.expired(now, &mut fired);
        for id in fired.drain(..) {
            let key = id.index as usize;
            let Some(entry) = self.conns.get_mut(key) else {
                continue;
            };
            if entry.id != id {
                continue; // the slot was reused: a stale timer of a closed connection
            }
            if entry.armed != 0 && entry.armed <= nanos_since(self.epoch, now) + 1 {
                entry.armed = 0; // this is (or overtook) the armed entry: re-arm below
            }
            entry.conn.handle_timeout(now, &mut self.effects);
            self.drive_after(key, now);
        }
        self.fired = fired;
    }

    fn completions(&mut self, now: Instant) {
        while let Ok(Completion { id, seq, outcome }) = self.r.completions.try_recv() {
            let key = id.index as usize;
            match self.conns.get_mut(key) {
                Some(entry) if entry.id == id => {
                    entry
                        .conn
                        .handle_completion(seq, outcome, now, &mut self.effects);
                    self.drive_after(key, now);
                }
                // The connection is gone: nobody to answer.
                _ => self.r.metrics.late_results.increment(1),
            }
        }
    }

    /// After an input that may have produced effects and bytes to write.
    fn drive_after(&mut self, key: usize, now: Instant) {
        if !self.apply(key, now) {
            self.drive(key, now);
        }
    }

    fn resume_pending(&mut self, now: Instant) {
        let pending = std::mem::take(&mut self.pending);
        for key in pending {
            if let Some(entry) = self.conns.get_mut(key) {
                entry.pending = false;
                self.drive(key, now);
            }
        }
    }

    fn commands(&mut self, now: Instant) {
        while let Ok(command) = self.r.commands.try_recv() {
            match command {
                Command::Shutdown { grace, done } => self.start_drain(grace, done, now),
            }
        }
    }

    fn start_drain(&mut self, grace: Duration, done: Sender<ShutdownReport>, now: Instant) {
        if self.drain.is_some() {
            return;
        }
        // Stop accepting: closing the listener makes new connections fail at once.
        if let Some(mut listener) = self.r.listener.take() {
            let _ = self.r.poll.registry().deregister(&mut listener);
        }
        let mut report = ShutdownReport::default();
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        report.in_flight = self
            .conns
            .iter()
            .filter(|(_, e)| e.conn.in_flight())
            .count();
        self.drain = Some(Drain {
            deadline: now + grace,
            done,
            report,
        });
        for key in keys {
            if let Some(entry) = self.conns.get_mut(key) {
                entry.conn.handle_shutdown(&mut self.effects);
                self.drive_after(key, now);
            }
        }
    }

    /// Ends the loop once every connection is closed or the grace period is over.
    fn finish_drain(&mut self, now: Instant) -> Option<ShutdownReport> {
        let drain = self.drain.as_ref()?;
        if !self.conns.is_empty() && now < drain.deadline {
            return None;
        }
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        let forced = keys.len();
        for key in keys {
            if let Some(entry) = self.conns.get_mut(key) {
                entry
                    .conn
                    .force_close(CloseReason::Shutdown, &mut self.effects);
                self.apply(key, now);
            }
        }
        self.pool.close();
        let drain = self.drain.take()?;
        let mut report = drain.report;
        report.forced = forced;
        report.workers_stuck = self
            .pool
            .join(now.max(drain.deadline) + Duration::from_millis(100));
        let _ = drain.done.send(report.clone());
        Some(report)
    }
}

/// `t` as nanoseconds since `epoch` (0 for earlier times); 2⁶⁴ ns is 584 years.
fn nanos_since(epoch: Instant, t: Instant) -> u64 {
    t.saturating_duration_since(epoch).as_nanos() as u64
}

/// Writes as much of the connection's reply as the socket takes. Returns whether any
/// progress was made (bytes written or the connection failed).
fn write(entry: &mut Entry, metrics: &Metrics, now: Instant, effects: &mut Vec<Effect>) -> bool {
    let mut progress = false;
    while let Some(frame) = entry.conn.transmit() {
        let mut slices = [IoSlice::new(&[]); 3];
        let n = frame.io_slices(&mut slices);
        match entry.socket.write_vectored(&slices[..n]) {
            Ok(0) => {
                entry.conn.handle_io_error(ErrorKind::WriteZero, effects);
                return true;
            }
            Ok(written) => {
                metrics.bytes_sent.increment(written as u64);
                entry.conn.handle_written(written, now, effects);
                progress = true;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                entry.write_ready = false;
                return progress;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                entry.conn.handle_io_error(e.kind(), effects);
                return true;
            }
        }
    }
    progress
}

/// One read into the reactor's scratch buffer, handed to the connection. Returns whether any
/// progress was made.
fn read(
    entry: &mut Entry,
    scratch: &mut [u8],
    metrics: &Metrics,
    now: Instant,
    effects: &mut Vec<Effect>,
) -> bool {
    match entry.socket.read(scratch) {
        Ok(0) => {
            entry.read_ready = false;
            entry.conn.handle_eof(now, effects);
            true
        }
        Ok(n) => {
            metrics.bytes_received.increment(n as u64);
            entry.conn.handle_read(&scratch[..n], now, effects);
            true
        }
        Err(e) if e.kind() == ErrorKind::WouldBlock => {
            entry.read_ready = false;
            false
        }
        Err(e) if e.kind() == ErrorKind::Interrupted => true,
        Err(e) => {
            entry.conn.handle_io_error(e.kind(), effects);
            true
        }
    }
}
