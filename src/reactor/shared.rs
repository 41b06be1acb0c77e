//! What the reactors of one server share: the connection count, the memory budget, the
//! accepting reactor's hand-off inboxes, and the reloadable admission policy.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use mio::net::TcpStream;

use crate::completion::Notifier;
use crate::link::Policy;

/// What the reactors of one server share.
#[derive(Debug)]
pub(crate) struct Shared {
    /// Connections open across all reactors (`max_connections` is server-wide).
    pub(crate) open: AtomicUsize,
    pub(crate) max_connections: usize,
    pub(crate) budget: Budget,
    /// One per reactor, by index: how the acceptor hands it connections.
    pub(crate) reactors: Vec<Inbox>,
    /// Who may connect; replaced whole on reload, read once per accepted connection.
    pub(crate) policy: Mutex<Arc<Policy>>,
    /// Each reactor's last poll turn.
    pub(crate) heartbeat: crate::heartbeat::Heartbeat,
}

/// A reactor's inbox for accepted connections, and its load.
///
/// One reactor (index 0) accepts and hands each connection to the reactor with the fewest
/// open connections. MLLP connections are few and live for days, so a placement lasts the
/// connection's life: balancing by load at accept time beats `SO_REUSEPORT`'s hashing, which
/// ignores load (and would need a dependency for the socket option).
#[derive(Debug)]
pub(crate) struct Inbox {
    pub(crate) accepted: Mutex<Vec<(TcpStream, SocketAddr)>>,
    /// Set after a push to `accepted`: the reactor takes the lock only then, not every turn.
    pub(crate) handed: AtomicBool,
    pub(crate) notifier: Arc<Notifier>,
    /// Connections open on this reactor.
    pub(crate) load: AtomicUsize,
}

impl Inbox {
    pub(crate) fn new(notifier: Arc<Notifier>) -> Self {
        Self {
            accepted: Mutex::new(Vec::new()),
            handed: AtomicBool::new(false),
            notifier,
            load: AtomicUsize::new(0),
        }
    }
}

/// The server-wide memory budget: every buffered byte (partial frames, read-ahead, messages
/// in flight, replies not yet written) counts against `limit`. Above it reading stops, except
/// for one connection per reactor at a time finishing the frame it is in (so frames complete
/// and memory drains, rather than every connection waiting for every other), of which one
/// frame per reactor at a time may grow past its first 64 KiB (see `Loop::holder`); below ¾
/// of the limit reading resumes. TCP pushes back on the senders meanwhile.
#[derive(Debug)]
pub(crate) struct Budget {
    pub(crate) limit: usize,
    pub(crate) used: AtomicUsize,
    pub(crate) over: AtomicBool,
}

impl Budget {
    /// A budget of `limit` bytes, saturated at `isize::MAX` (no process holds more, and the
    /// reactors add signed per-turn changes to it).
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            limit: limit.min(isize::MAX as usize),
            used: AtomicUsize::new(0),
            over: AtomicBool::new(false),
        }
    }

    /// Applies a reactor's change in buffered bytes; returns whether reading is paused.
    pub(crate) fn apply(&self, delta: isize) -> bool {
        let used = if delta >= 0 {
            self.used.fetch_add(delta.unsigned_abs(), Ordering::AcqRel) + delta.unsigned_abs()
        } else {
            self.used.fetch_sub(delta.unsigned_abs(), Ordering::AcqRel) - delta.unsigned_abs()
        };
        let over = self.over.load(Ordering::Acquire);
        if !over && used > self.limit {
            self.over.store(true, Ordering::Release);
        } else if over && used < self.limit / 4 * 3 {
            self.over.store(false, Ordering::Release);
        }
        self.over.load(Ordering::Acquire)
    }
}
