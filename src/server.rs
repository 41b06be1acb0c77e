//! [`Server::builder`] → [`Builder`] (documented defaults) → [`Server`] (bound) →
//! [`ServerHandle`] (running) → [`ServerHandle::shutdown`] (graceful).

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::JoinHandle;
use std::time::Duration;

use mio::net::TcpListener;
use mio::{Interest, Poll, Waker};

use crate::connection::{Limits, NakPolicy};
use crate::error::{ConfigError, Error};
use crate::handler::Handler;
use crate::pool::{Completion, Notifier, Pool, PoolConfig};
use crate::reactor::{Command, LISTENER, Reactor, WAKER};
use crate::telemetry::{Metrics, Observer};

/// Default idle timeout: 60 s, the reference's `timeout`.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default handler timeout: 60 s, the reference's `handler_timeout`.
pub const DEFAULT_HANDLER_TIMEOUT: Duration = Duration::from_secs(60);
/// Default frame deadline: a started frame must complete within 120 s. The reference has
/// none (a peer dripping a byte a minute holds a connection forever); 120 s lets a 10 MiB
/// message cross a 1 Mbit/s link (84 s) with room to spare.
pub const DEFAULT_FRAME_TIMEOUT: Duration = Duration::from_secs(120);
/// Default write-stall deadline: a peer that reads none of our reply for 30 s is closed.
/// ACKs are a few hundred bytes and fit any socket buffer, so only a peer that stopped reading
/// altogether (and keeps sending) can stall.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default connection cap: 10 000, below the 20 000 open files a process commonly may hold, and
/// close to the reference's effective cap (about 10 240).
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Default read-ahead: 64 KiB of undecoded pipelined bytes per connection while its message is
/// with the handler; past it reading stops and TCP pushes back. 64 KiB holds dozens of typical
/// (1–2 KiB) pipelined messages.
pub const DEFAULT_READ_AHEAD: usize = 64 * 1024;
/// Largest accepted `max_message_size`: 1 GiB. Beyond it one connection could exhaust memory.
pub const MAX_MESSAGE_SIZE_LIMIT: usize = 1 << 30;

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

    /// Handler threads (default: available parallelism).
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
        if self.max_connections == 0 || self.max_connections >= WAKER.0 {
            return Err(ConfigError::MaxConnections(self.max_connections).into());
        }
        let workers = self
            .workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(4, |n| n.get()));
        if workers == 0 {
            return Err(ConfigError::NoWorkers.into());
        }
        let addr = addr
            .to_socket_addrs()
            .map_err(Error::Bind)?
            .next()
            .ok_or(ConfigError::NoAddress)?;
        let mut listener = TcpListener::bind(addr).map_err(Error::Bind)?;
        let local_addr = listener.local_addr().map_err(Error::Bind)?;
        let poll = Poll::new().map_err(Error::Io)?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)
            .map_err(Error::Io)?;
        let waker = Waker::new(poll.registry(), WAKER).map_err(Error::Io)?;
        let notifier = Arc::new(Notifier::new(waker));
        let (completions_tx, completions) = mpsc::channel();
        let (commands_tx, commands) = mpsc::channel();
        let limits = Arc::new(Limits {
            idle_timeout: self.idle_timeout,
            frame_timeout: self.frame_timeout,
            handler_timeout: self.handler_timeout,
            write_timeout: self.write_timeout,
            max_message_size: self.max_message_size,
            read_ahead: self.read_ahead.max(1),
            nak_policy: self.nak_policy,
        });
        let metrics = Metrics::register(&self.listener_name);
        let pool_config = PoolConfig {
            workers,
            max_extra_workers: self.max_extra_workers.unwrap_or(workers),
            nak_policy: self.nak_policy,
        };
        Ok(Server {
            reactor: Reactor {
                poll,
                listener: Some(listener),
                local_addr,
                limits,
                max_connections: self.max_connections,
                notifier: Arc::clone(&notifier),
                completions,
                commands,
                metrics,
                observer: self.observer,
            },
            handler: self.handler,
            pool_config,
            completions_tx,
            trigger: ShutdownTrigger {
                commands: commands_tx,
                notifier,
            },
        })
    }
}

/// A bound server, not yet running.
pub struct Server {
    reactor: Reactor,
    handler: Arc<dyn Handler>,
    pool_config: PoolConfig,
    completions_tx: Sender<Completion>,
    trigger: ShutdownTrigger,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("local_addr", &self.reactor.local_addr)
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
    /// | `workers` | available parallelism |
    /// | `max_extra_workers` | = `workers` |
    /// | `nak_policy` | [`NakPolicy::Send`] |
    /// | `listener_name` | `mllp` |
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
        }
    }

    /// The address the server listens on (with the OS-assigned port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.reactor.local_addr
    }

    /// A handle that stops this server from any thread (for signal handlers).
    pub fn shutdown_trigger(&self) -> ShutdownTrigger {
        self.trigger.clone()
    }

    /// Runs the server on this thread until it is shut down through a [`ShutdownTrigger`].
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if a worker thread cannot be started or the poll fails.
    pub fn run(self) -> Result<ShutdownReport, Error> {
        let pool = Pool::start(
            self.pool_config,
            self.handler,
            self.completions_tx,
            Arc::clone(&self.reactor.notifier),
            self.reactor.metrics.clone(),
        )
        .map_err(Error::Io)?;
        self.reactor.run(pool).map_err(Error::Io)
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
            thread,
        })
    }
}

/// A running server.
#[derive(Debug)]
pub struct ServerHandle {
    local_addr: SocketAddr,
    trigger: ShutdownTrigger,
    thread: JoinHandle<Result<ShutdownReport, Error>>,
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
    pub fn join(self) -> Result<ShutdownReport, Error> {
        self.thread.join().map_err(|_| Error::Stopped)?
    }
}

/// Starts a server's graceful shutdown from any thread. Cloneable.
#[derive(Clone, Debug)]
pub struct ShutdownTrigger {
    commands: Sender<Command>,
    notifier: Arc<Notifier>,
}

impl ShutdownTrigger {
    /// Asks the server to drain within `grace` and stop. Returns a receiver of the report
    /// (dropping it is fine). Calling it again, or after the server stopped, does nothing.
    pub fn shutdown(&self, grace: Duration) -> Receiver<ShutdownReport> {
        let (done, report) = mpsc::channel();
        let _ = self.commands.send(Command::Shutdown { grace, done });
        self.notifier.notify();
        report
    }
}

/// What a graceful shutdown did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Connections with a message in flight when the shutdown began.
    pub in_flight: usize,
    /// Connections closed during the shutdown.
    pub closed: usize,
    /// Connections still busy at the end of the grace period, closed anyway.
    pub forced: usize,
    /// Workers still stuck in a handler when the server stopped (detached).
    pub workers_stuck: usize,
}
