//! [`Server::builder`] → [`Builder`] (documented defaults) → [`Server`] (bound) →
//! [`ServerHandle`] (running) → [`ServerHandle::shutdown`] (graceful).

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use mio::net::TcpListener;
use mio::{Interest, Poll, Waker};

use crate::cidr::AllowList;
use crate::completion::{CompletionSink, Notifier};
use crate::connection::{Limits, NakPolicy, WallClock};
use crate::control::{Command, ShutdownReport};
use crate::error::{ConfigError, Error};
use crate::handler::{Dispatch, Handler};
use crate::limits::*;
use crate::link::Policy;
use crate::pool::{Pool, PoolConfig};
use crate::proxy::ProxyMode;
use crate::reactor::{Budget, Inbox, LISTENER, MAX_KEYS_PER_REACTOR, Reactor, Shared, WAKER};
use crate::sync::lock;
use crate::telemetry::{Metrics, Observer, Telemetry};
use crate::transport::Acceptors;

/// Configures a server. Every option has a documented default; see [`Server::builder`].
pub struct Builder {
    handler: Arc<dyn Handler>,
    idle_timeout: Duration,
    frame_timeout: Duration,
    handler_timeout: Duration,
    write_timeout: Duration,
    max_message_size: usize,
    read_ahead: usize,
    workers: Option<usize>,
    max_extra_workers: Option<usize>,
    max_connections: usize,
    nak_policy: NakPolicy,
    observer: Option<Arc<dyn Observer>>,
    listener_name: String,
    dispatch: Dispatch,
    reactors: usize,
    /// The layers on every accepted socket: PROXY header, TLS.
    acceptors: Acceptors,
    handshake_timeout: Duration,
    max_handshakes: usize,
    proxy_sources: Option<AllowList>,
    allow: Option<AllowList>,
    max_in_flight: Option<usize>,
    inline_slow_threshold: Duration,
    max_memory: usize,
    expose_handler_errors: bool,
    timing_histograms: bool,
}

impl std::fmt::Debug for Builder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder")
            .field("idle_timeout", &self.idle_timeout)
            .field("frame_timeout", &self.frame_timeout)
            .field("handler_timeout", &self.handler_timeout)
            .field("write_timeout", &self.write_timeout)
            .field("max_message_size", &self.max_message_size)
            .field("max_connections", &self.max_connections)
            .field("workers", &self.workers)
            .field("nak_policy", &self.nak_policy)
            .field("listener_name", &self.listener_name)
            .field("dispatch", &self.dispatch)
            .field("max_in_flight", &self.max_in_flight)
            .field("max_memory", &self.max_memory)
            .field("max_handshakes", &self.max_handshakes)
            .finish_non_exhaustive()
    }
}

macro_rules! setter {
    ($(#[$doc:meta])* $name:ident: $ty:ty) => {
        $(#[$doc])*
        pub fn $name(mut self, value: $ty) -> Self {
            self.$name = value;
            self
        }
    };
}

impl Builder {
    setter!(
        /// Closes a connection that receives nothing for this long (default 60 s). Not running
        /// while the connection's message is with the handler.
        idle_timeout: Duration
    );
    setter!(
        /// Closes a connection whose started frame is not complete within this long
        /// (default 120 s).
        frame_timeout: Duration
    );
    setter!(
        /// Gives up on a handler call after this long (default 60 s): the sender gets an AE
        /// NAK, the connection goes on, a late result is discarded.
        handler_timeout: Duration
    );
    setter!(
        /// Closes a connection that accepts none of our reply for this long (default 30 s).
        write_timeout: Duration
    );
    setter!(
        /// Largest payload accepted, in bytes (default 10 485 760). A larger frame is answered
        /// with an AR NAK (if its MSH-10 is readable) and the connection is closed.
        max_message_size: usize
    );
    setter!(
        /// Undecoded bytes buffered per connection while its message is with the handler
        /// (default 64 KiB).
        read_ahead: usize
    );
    setter!(
        /// Most connections open at once (default 10 000); more are accepted and closed at once.
        max_connections: usize
    );
    setter!(
        /// NAKs on failures (default [`NakPolicy::Send`]).
        nak_policy: NakPolicy
    );
    setter!(
        /// Where the handler runs (default [`Dispatch::Pool`]); see [`Dispatch`].
        dispatch: Dispatch
    );
    setter!(
        /// How long a connection may take to start: its PROXY header and TLS handshake
        /// (default 10 s). A connection that has not started by then is closed and counted in
        /// `mllp_connections_rejected_total{reason="handshake_timeout"}`. Separate from the
        /// frame deadline: a peer that connects and never speaks is not a slow sender.
        handshake_timeout: Duration
    );
    setter!(
        /// Most TLS handshakes in progress at once, server-wide (default 256; values below 1
        /// count as 1), shared evenly among the reactors. A TLS connection accepted over the
        /// cap is not closed: it waits, unread (its bytes stay in the kernel), until a
        /// handshake in progress completes or fails, then starts its own; `handshake_timeout`
        /// counts from accept all along. With the per-handshake cap on what a client may send
        /// (`tls::MAX_HANDSHAKE_BYTES`), this bounds the memory handshakes hold; their buffers
        /// also count in `max_memory`. Has no effect without TLS.
        max_handshakes: usize
    );

    /// Requires every connection to start with a PROXY protocol header (v1, v2 or either),
    /// as sent by HAProxy's `send-proxy`/`send-proxy-v2` (default: off). The header's source
    /// becomes the peer everywhere (context, events, allow-list). Needs
    /// [`proxy_sources`](Self::proxy_sources): without it [`bind`](Self::bind) fails with
    /// [`ConfigError::ProxySourcesRequired`]. A connection without a
    /// valid header within `handshake_timeout` is closed and counted in
    /// `mllp_connections_rejected_total{reason="proxy_header"}`; there is no guessing whether
    /// a header is present, as the protocol's specification demands. A v2 `LOCAL` header (a
    /// health check) is served with the socket's peer.
    pub fn proxy_protocol(mut self, mode: ProxyMode) -> Self {
        self.acceptors.proxy = Some(mode);
        self
    }

    /// With [`proxy_protocol`](Self::proxy_protocol): accept connections (and so headers)
    /// only from these sources, the balancers. Others are closed before a byte is read and
    /// counted with `reason="not_allowed"`. Required with PROXY protocol: a header names the
    /// client, so a header from anyone would let anyone claim any address (past the
    /// allow-list, and into the records). To trust every source, say so:
    /// `0.0.0.0/0` and `::/0`.
    pub fn proxy_sources(mut self, sources: AllowList) -> Self {
        self.proxy_sources = Some(sources);
        self
    }

    /// Serves TLS (and mutual TLS when the acceptor's configuration has a client CA) with
    /// sessions from `acceptor` (feature `tls`). The handshake must complete within
    /// `handshake_timeout`; failures are counted in `mllp_connections_rejected_total` by
    /// reason (`tls_plaintext`, `tls_no_client_cert`, `tls_bad_client_cert`,
    /// `tls_handshake`). Reload certificates through a clone of the acceptor
    /// ([`TlsAcceptor::reload`](crate::tls::TlsAcceptor::reload)): new connections get the new
    /// configuration, established ones keep theirs. With PROXY protocol the header comes first,
    /// in the clear, then TLS.
    #[cfg(feature = "tls")]
    pub fn tls(mut self, acceptor: crate::tls::TlsAcceptor) -> Self {
        self.acceptors.tls = Some(acceptor);
        self
    }

    /// Accept connections only from peers in `allow` (IPv4 and IPv6 CIDRs; default: from
    /// anyone). Checked when the connection is accepted, before a byte is read. With PROXY
    /// protocol it is checked twice: the balancer (the socket's peer) when the connection is
    /// accepted, and the client once the header names it, so behind a balancer the list must
    /// hold the balancers' addresses as well as the clients'. Others are closed at once and counted in
    /// `mllp_connections_rejected_total{reason="not_allowed"}`. Replaceable while running
    /// with [`Reloader::set_allow_list`].
    pub fn allow(mut self, allow: AllowList) -> Self {
        self.allow = Some(allow);
        self
    }

    setter!(
        /// Reactor threads (default 1), each a poll loop with its own connections and timers.
        /// The first also accepts, and hands each new connection to the reactor with the fewest
        /// open connections. One reactor serves tens of thousands of messages per second on one
        /// core; add reactors when it saturates a core (see BENCHMARKS.md).
        reactors: usize
    );
    setter!(
        /// Inline calls longer than this count in `mllp_inline_handler_slow_total`
        /// (default 1 ms).
        inline_slow_threshold: Duration
    );
    setter!(
        /// Whether each message is timed for the histograms `mllp_handler_queue_seconds`,
        /// `mllp_handler_duration_seconds` and `mllp_response_latency_seconds` (default
        /// true). With `false` they stay empty, and a message costs no clock reading or
        /// subtraction for them: for a server with no metrics recorder, where they would
        /// record nothing anyway (about 140 instructions per message of `serve --no-store`'s
        /// 5 700, callgrind). Counters, size histograms and observer events (a message stop
        /// still carries its duration) do not change, and inline calls are still checked
        /// against `inline_slow_threshold`.
        ///
        /// ```
        /// use mllp_reactor::{ack, handler_fn, Reply, Server};
        ///
        /// // No metrics recorder is installed: nobody would read the timings.
        /// let handler = handler_fn(|msg, _| Ok(Reply::Send(ack::accept(msg))));
        /// let server = Server::builder(handler).timing_histograms(false).bind("127.0.0.1:0")?;
        /// # drop(server);
        /// # Ok::<(), mllp_reactor::Error>(())
        /// ```
        timing_histograms: bool
    );
    setter!(
        /// Server-wide budget for buffered bytes (default 512 MiB): partial frames (one past
        /// its first 64 KiB counts as `max_message_size`: its rest is unknown), read-ahead,
        /// messages in flight and replies not yet written. Above it the server stops reading,
        /// except that a connection may finish the frame it is in and a connection with no
        /// message in flight may receive one frame (one connection per reactor at a time,
        /// one with bytes waiting; a frame not yet counted in full goes past its first 64 KiB
        /// only as its reactor's one finishing frame, until that frame's message is answered),
        /// and resumes below three quarters of it; the exact bound is in the crate docs
        /// ("Bounded memory"). Must be at least twice `max_message_size`, so
        /// a message of the largest size always fits; values above `isize::MAX` count as
        /// `isize::MAX`.
        max_memory: usize
    );
    setter!(
        /// Put the handler's error text (or panic message) into the AE NAK's MSA-3 and ERR
        /// (default false: the sender sees "application error"; the text goes to the
        /// message-exception event either way). A handler can always return its own NAK.
        expose_handler_errors: bool
    );

    /// Messages per connection dispatched and not yet answered on the wire (default 64 with
    /// [`Dispatch::Inline`], 1 with [`Dispatch::Pool`]). Above 1, a connection reads, decodes
    /// and hands over its next messages while earlier replies are pending (deferred) or being
    /// written; handler calls still never overlap and replies still leave in order. At the
    /// cap, reading stops once `read_ahead` bytes wait. Worst-case memory per connection:
    /// `max_in_flight` × `max_message_size`, bounded server-wide by `max_memory`.
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = Some(n);
        self
    }

    /// Handler threads of the pool (default: available parallelism). Only [`Dispatch::Pool`]
    /// starts a pool; with [`Dispatch::Inline`] no handler thread exists and this is checked
    /// but unused.
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = Some(n);
        self
    }

    /// Extra threads the pool may start to replace workers stuck past `handler_timeout`
    /// (default: as many as `workers`).
    pub fn max_extra_workers(mut self, n: usize) -> Self {
        self.max_extra_workers = Some(n);
        self
    }

    /// Receives the server's events (see [`Observer`]).
    pub fn observer(mut self, observer: impl Observer) -> Self {
        self.observer = Some(Arc::new(observer));
        self
    }

    /// The `listener` label on every metric (default `mllp`).
    pub fn listener_name(mut self, name: impl Into<String>) -> Self {
        self.listener_name = name.into();
        self
    }

    /// Checks the options, binds the listening socket and registers the metric handles with
    /// the current `metrics` recorder. No thread starts until [`Server::spawn`] or
    /// [`Server::run`].
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for an option out of range, [`Error::Bind`] if the address cannot be
    /// bound, [`Error::Io`] if the poll cannot be created.
    pub fn bind(self, addr: impl ToSocketAddrs) -> Result<Server, Error> {
        for (name, d) in [
            ("idle_timeout", self.idle_timeout),
            ("frame_timeout", self.frame_timeout),
            ("handler_timeout", self.handler_timeout),
            ("write_timeout", self.write_timeout),
        ] {
            if d.is_zero() {
                return Err(ConfigError::ZeroDuration(name).into());
            }
        }
        if self.max_message_size == 0 || self.max_message_size > MAX_MESSAGE_SIZE_LIMIT {
            return Err(ConfigError::MaxMessageSize(self.max_message_size).into());
        }
        if self.max_connections == 0 || self.max_connections >= MAX_KEYS_PER_REACTOR {
            return Err(ConfigError::MaxConnections(self.max_connections).into());
        }
        let workers = self
            .workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(4, |n| n.get()));
        if workers == 0 {
            return Err(ConfigError::NoWorkers.into());
        }
        if workers > MAX_WORKERS {
            return Err(ConfigError::TooManyWorkers(workers).into());
        }
        let max_in_flight = self
            .max_in_flight
            .unwrap_or(self.dispatch.default_max_in_flight());
        if max_in_flight == 0 || max_in_flight > MAX_IN_FLIGHT_LIMIT {
            return Err(ConfigError::MaxInFlight(max_in_flight).into());
        }
        if self.acceptors.proxy.is_some() && self.proxy_sources.is_none() {
            return Err(ConfigError::ProxySourcesRequired.into());
        }
        if self.max_memory < self.max_message_size.saturating_mul(2) {
            return Err(ConfigError::MaxMemory(self.max_memory).into());
        }
        let addr = addr
            .to_socket_addrs()
            .map_err(Error::Bind)?
            .next()
            .ok_or(ConfigError::NoAddress)?;
        if self.reactors == 0 || self.reactors > MAX_REACTORS {
            return Err(ConfigError::Reactors(self.reactors).into());
        }
        let mut listener = TcpListener::bind(addr).map_err(Error::Bind)?;
        let local_addr = listener.local_addr().map_err(Error::Bind)?;
        let limits = Arc::new(Limits {
            idle_timeout: self.idle_timeout,
            frame_timeout: self.frame_timeout,
            handler_timeout: self.handler_timeout,
            write_timeout: self.write_timeout,
            handshake_timeout: self.handshake_timeout,
            max_message_size: self.max_message_size,
            read_ahead: self.read_ahead.max(1),
            max_in_flight,
            nak_policy: self.nak_policy,
            expose_errors: self.expose_handler_errors,
            wall_clock: WallClock::now(),
        });
        let mut metrics = Metrics::register(&self.listener_name);
        metrics.timings = self.timing_histograms;
        let pool_config = PoolConfig {
            workers,
            max_extra_workers: self.max_extra_workers.unwrap_or(workers),
        };
        // One poll, waker and command channel per reactor; reactor 0 also owns the listener.
        let mut polls = Vec::with_capacity(self.reactors);
        let mut notifiers = Vec::with_capacity(self.reactors);
        let mut commands = Vec::with_capacity(self.reactors);
        for index in 0..self.reactors {
            let poll = Poll::new().map_err(Error::Io)?;
            if index == 0 {
                poll.registry()
                    .register(&mut listener, LISTENER, Interest::READABLE)
                    .map_err(Error::Io)?;
            }
            let waker = Waker::new(poll.registry(), WAKER).map_err(Error::Io)?;
            polls.push(poll);
            notifiers.push(Arc::new(Notifier::new(waker)));
            commands.push(mpsc::channel());
        }
        let shared = Arc::new(Shared {
            open: std::sync::atomic::AtomicUsize::new(0),
            max_connections: self.max_connections,
            budget: Budget::new(self.max_memory),
            reactors: notifiers
                .iter()
                .map(|n| Inbox::new(Arc::clone(n)))
                .collect(),
            policy: Mutex::new(Arc::new(Policy {
                allow: self.allow,
                proxy_sources: self.proxy_sources,
            })),
            heartbeat: crate::heartbeat::Heartbeat::new(notifiers.len()),
        });
        let policy_shared = Arc::clone(&shared);
        let control = Arc::new(Control {
            reactors: commands
                .iter()
                .zip(&notifiers)
                .map(|((tx, _), n)| (tx.clone(), Arc::clone(n)))
                .collect(),
            waiters: Mutex::new(Vec::new()),
            report: Mutex::new(None),
            shared: policy_shared,
        });
        let telemetry = Telemetry::new(metrics, self.observer);
        let mut listener = Some(listener);
        let reactors = polls
            .into_iter()
            .zip(notifiers)
            .zip(commands)
            .enumerate()
            .map(|(index, ((poll, notifier), (_, commands)))| Reactor {
                followers: if index == 0 {
                    control.reactors[1..].to_vec()
                } else {
                    Vec::new()
                },
                index: index as u8,
                poll,
                listener: listener.take(),
                local_addr,
                limits: Arc::clone(&limits),
                dispatch: self.dispatch,
                acceptors: self.acceptors.clone(),
                max_handshakes: self.max_handshakes.max(1).div_ceil(self.reactors),
                inline_slow: self.inline_slow_threshold,
                handler: Arc::clone(&self.handler),
                sink: Arc::new(CompletionSink::new(notifier)),
                commands,
                telemetry: telemetry.clone(),
                shared: Arc::clone(&shared),
            })
            .collect();
        Ok(Server {
            reactors,
            local_addr,
            handler: self.handler,
            metrics: telemetry.metrics,
            pool_config,
            trigger: ShutdownTrigger { control },
        })
    }
}

/// A bound server, not yet running.
pub struct Server {
    reactors: Vec<Reactor>,
    local_addr: SocketAddr,
    handler: Arc<dyn Handler>,
    metrics: Metrics,
    pool_config: PoolConfig,
    trigger: ShutdownTrigger,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("local_addr", &self.local_addr)
            .field("reactors", &self.reactors.len())
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Starts configuring a server around `handler`.
    ///
    /// | option | default |
    /// |---|---|
    /// | `idle_timeout` | 60 s |
    /// | `frame_timeout` | 120 s |
    /// | `handler_timeout` | 60 s |
    /// | `write_timeout` | 30 s |
    /// | `max_message_size` | 10 485 760 bytes |
    /// | `read_ahead` | 64 KiB |
    /// | `max_connections` | 10 000 |
    /// | `workers` | available parallelism (pool mode only) |
    /// | `max_extra_workers` | = `workers` |
    /// | `nak_policy` | [`NakPolicy::Send`] |
    /// | `listener_name` | `mllp` |
    /// | `dispatch` | [`Dispatch::Pool`] |
    /// | `reactors` | 1 |
    /// | `max_in_flight` | 64 inline, 1 pool |
    /// | `inline_slow_threshold` | 1 ms |
    /// | `timing_histograms` | true |
    /// | `max_memory` | 512 MiB |
    /// | `max_handshakes` | 256 |
    /// | `expose_handler_errors` | false |
    pub fn builder(handler: impl Handler) -> Builder {
        Builder {
            handler: Arc::new(handler),
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            frame_timeout: DEFAULT_FRAME_TIMEOUT,
            handler_timeout: DEFAULT_HANDLER_TIMEOUT,
            write_timeout: DEFAULT_WRITE_TIMEOUT,
            max_message_size: crate::codec::DEFAULT_MAX_MESSAGE_SIZE,
            read_ahead: DEFAULT_READ_AHEAD,
            workers: None,
            max_extra_workers: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            nak_policy: NakPolicy::Send,
            observer: None,
            listener_name: "mllp".to_owned(),
            dispatch: Dispatch::Pool,
            reactors: 1,
            acceptors: Acceptors::default(),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
            proxy_sources: None,
            allow: None,
            max_in_flight: None,
            inline_slow_threshold: DEFAULT_INLINE_SLOW_THRESHOLD,
            timing_histograms: true,
            max_memory: DEFAULT_MAX_MEMORY,
            expose_handler_errors: false,
        }
    }

    /// The address the server listens on (with the OS-assigned port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A handle that stops this server from any thread (for signal handlers).
    pub fn shutdown_trigger(&self) -> ShutdownTrigger {
        self.trigger.clone()
    }

    /// The reactors' heartbeats, for a liveness check (`/healthz`).
    pub fn heartbeat(&self) -> crate::Heartbeat {
        self.trigger.control.shared.heartbeat.clone()
    }

    /// A handle that changes the server's configuration while it runs (for SIGHUP).
    pub fn reloader(&self) -> Reloader {
        Reloader {
            control: Arc::clone(&self.trigger.control),
        }
    }

    /// Runs the server on this thread until it is shut down through a [`ShutdownTrigger`].
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if a worker thread cannot be started or the poll fails.
    pub fn run(self) -> Result<ShutdownReport, Error> {
        let Self {
            reactors,
            handler,
            metrics,
            pool_config,
            trigger,
            ..
        } = self;
        // Reactors 1.. on threads of their own, reactor 0 (the acceptor) on this one.
        let mut reactors = reactors.into_iter();
        let first = reactors.next().ok_or(Error::Stopped)?;
        // The pool's threads exist only in pool mode: inline, the reactors call the handler.
        let pool = match first.dispatch {
            Dispatch::Pool => Some(Arc::new(
                Pool::start(pool_config, handler, metrics).map_err(Error::Io)?,
            )),
            Dispatch::Inline => None,
        };
        let mut threads = Vec::new();
        for reactor in reactors {
            let shared_pool = pool.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("mllp-reactor-{}", reactor.index))
                .spawn(move || reactor.run(shared_pool));
            match spawned {
                Ok(thread) => threads.push(thread),
                Err(e) => {
                    // Stop the ones already running before reporting.
                    trigger.shutdown_all();
                    for thread in threads {
                        let _ = thread.join();
                    }
                    if let Some(pool) = &pool {
                        pool.close();
                    }
                    return Err(Error::Io(e));
                }
            }
        }
        let mut result = first.run(pool.clone());
        if result.is_err() {
            trigger.shutdown_all();
        }
        for thread in threads {
            let other = thread
                .join()
                .map_err(|_| std::io::Error::other("a reactor thread panicked"))
                .and_then(|r| r);
            result = match (result, other) {
                (Ok((mut a, da)), Ok((b, db))) => {
                    a.in_flight += b.in_flight;
                    a.closed += b.closed;
                    a.forced += b.forced;
                    Ok((a, da.max(db)))
                }
                (Err(e), _) | (_, Err(e)) => Err(e),
            };
        }
        // Stop the workers whatever happened: queued jobs are dropped (never answered, so
        // senders resend), running handlers finish.
        if let Some(pool) = &pool {
            pool.close();
        }
        let (mut report, deadline) = result.map_err(Error::Io)?;
        if let Some(pool) = &pool {
            report.workers_stuck = pool.join(deadline + Duration::from_millis(100));
        }
        trigger.control.finish(&report);
        Ok(report)
    }

    /// Runs the server on its own threads and returns a handle to it.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if a thread cannot be started.
    pub fn spawn(self) -> Result<ServerHandle, Error> {
        let local_addr = self.local_addr();
        let trigger = self.shutdown_trigger();
        let thread = std::thread::Builder::new()
            .name("mllp-reactor".to_owned())
            .spawn(move || self.run())
            .map_err(Error::Io)?;
        Ok(ServerHandle {
            local_addr,
            trigger,
            thread: Some(thread),
        })
    }
}

/// A running server. Dropping it without [`shutdown`](Self::shutdown) starts a graceful
/// shutdown with a 5 s grace period and detaches: the server's threads end
/// within that bound plus the time stuck handlers take.
#[derive(Debug)]
pub struct ServerHandle {
    local_addr: SocketAddr,
    trigger: ShutdownTrigger,
    thread: Option<JoinHandle<Result<ShutdownReport, Error>>>,
}

impl ServerHandle {
    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A handle that starts the shutdown from any thread.
    pub fn shutdown_trigger(&self) -> ShutdownTrigger {
        self.trigger.clone()
    }

    /// A handle that changes the server's configuration while it runs.
    pub fn reloader(&self) -> Reloader {
        Reloader {
            control: Arc::clone(&self.trigger.control),
        }
    }

    /// Stops gracefully: stops accepting, closes idle connections, lets messages already with
    /// the handler finish and their replies flush, closes whatever remains after `grace`, then
    /// returns what happened.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the poll loop failed, [`Error::Stopped`] if its thread panicked.
    pub fn shutdown(self, grace: Duration) -> Result<ShutdownReport, Error> {
        self.trigger.shutdown(grace);
        self.join()
    }

    /// Waits for the server to stop (after a [`ShutdownTrigger::shutdown`]).
    ///
    /// # Errors
    ///
    /// As [`shutdown`](Self::shutdown).
    pub fn join(mut self) -> Result<ShutdownReport, Error> {
        match self.thread.take() {
            Some(thread) => thread.join().map_err(|_| Error::Stopped)?,
            None => Err(Error::Stopped),
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.trigger.shutdown(DROP_GRACE);
        }
    }
}

/// The reactors' command channels and the shutdown report's waiters.
#[derive(Debug)]
struct Control {
    reactors: Vec<(Sender<Command>, Arc<Notifier>)>,
    shared: Arc<Shared>,
    waiters: Mutex<Vec<Sender<ShutdownReport>>>,
    /// Set once the server stopped, for triggers that ask afterwards.
    report: Mutex<Option<ShutdownReport>>,
}

impl Control {
    fn finish(&self, report: &ShutdownReport) {
        *lock(&self.report) = Some(report.clone());
        for waiter in lock(&self.waiters).drain(..) {
            let _ = waiter.send(report.clone());
        }
    }
}

/// Starts a server's graceful shutdown from any thread. Cloneable.
#[derive(Clone, Debug)]
pub struct ShutdownTrigger {
    control: Arc<Control>,
}

impl ShutdownTrigger {
    /// Asks the server to drain within `grace` and stop. Returns a receiver of the report
    /// (dropping it is fine). Calling it again, or after the server stopped, does nothing
    /// more (the receiver still gets the report).
    pub fn shutdown(&self, grace: Duration) -> Receiver<ShutdownReport> {
        let (done, report) = mpsc::channel();
        if let Some(r) = lock(&self.control.report).as_ref() {
            let _ = done.send(r.clone());
            return report;
        }
        lock(&self.control.waiters).push(done);
        // The first reactor owns the listener: it stops accepting, then tells the others, so
        // any sign of the drain means new connections are already refused.
        if let Some((commands, notifier)) = self.control.reactors.first() {
            let _ = commands.send(Command::Shutdown { grace });
            notifier.command_sent();
        }
        report
    }

    /// Tells every reactor at once (when the first may be gone: a failed start or reactor).
    fn shutdown_all(&self) {
        for (commands, notifier) in &self.control.reactors {
            let _ = commands.send(Command::Shutdown {
                grace: Duration::ZERO,
            });
            notifier.command_sent();
        }
    }
}

/// Changes a running server's configuration from any thread. Cloneable. New connections see
/// the change; established ones go on undisturbed.
///
/// ```
/// use mllp_reactor::cidr::AllowList;
/// use mllp_reactor::{handler_fn, Reply, Server};
///
/// let server = Server::builder(handler_fn(|_, _| Ok(Reply::NoReply))).bind("127.0.0.1:0")?;
/// let reloader = server.reloader();
/// let running = server.spawn()?;
/// let allow: AllowList = ["127.0.0.0/8".parse()?, "::1/128".parse()?].into_iter().collect();
/// reloader.set_allow_list(Some(allow));
/// running.shutdown(std::time::Duration::from_secs(1))?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug)]
pub struct Reloader {
    control: Arc<Control>,
}

impl Reloader {
    /// Replaces the allow-list (`None`: anyone may connect).
    pub fn set_allow_list(&self, allow: Option<AllowList>) {
        let mut policy = lock(&self.control.shared.policy);
        let mut next = Policy::clone(&policy);
        next.allow = allow;
        *policy = Arc::new(next);
    }

    /// Replaces the sources allowed to send PROXY headers (`0.0.0.0/0` and `::/0`: any).
    pub fn set_proxy_sources(&self, sources: AllowList) {
        let mut policy = lock(&self.control.shared.policy);
        let mut next = Policy::clone(&policy);
        next.proxy_sources = Some(sources);
        *policy = Arc::new(next);
    }
}
