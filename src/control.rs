//! How a server handle talks to its reactors: the [`Command`]s it sends and the
//! [`ShutdownReport`] a drain returns. Plain data, below both the server and the reactor.

use std::time::Duration;

/// A request from the server handle.
#[derive(Debug)]
pub(crate) enum Command {
    Shutdown { grace: Duration },
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
