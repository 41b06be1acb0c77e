//! The cap on TLS handshakes in progress on one reactor (`Builder::max_handshakes`, split
//! evenly among the reactors). A connection over the cap waits, unread, for a slot; a slot
//! given back passes to the longest waiter still waiting.

use std::collections::VecDeque;

use crate::link::HandshakeSlot as Slot;
use crate::outcome::ConnectionId;

/// The reactor's handshake slots and the connections waiting for one.
#[derive(Debug)]
pub(super) struct Handshakes {
    cap: usize,
    held: usize,
    /// In arrival order. May hold connections that closed while waiting: the caller skips
    /// them when it takes the next waiter.
    waiters: VecDeque<ConnectionId>,
}

impl Handshakes {
    pub(super) fn new(cap: usize) -> Self {
        Self {
            cap: cap.max(1),
            held: 0,
            waiters: VecDeque::new(),
        }
    }

    /// Asks for a slot for connection `id`: `Held` if one was free, else `Waiting` (queued).
    pub(super) fn request(&mut self, id: ConnectionId) -> Slot {
        if self.held < self.cap {
            self.held += 1;
            Slot::Held
        } else {
            self.waiters.push_back(id);
            Slot::Waiting
        }
    }

    /// The next waiter, to hand a returning slot to (the caller checks it is still waiting).
    pub(super) fn next_waiter(&mut self) -> Option<ConnectionId> {
        self.waiters.pop_front()
    }

    /// A slot is given back and no waiter takes it.
    pub(super) fn free_one(&mut self) {
        self.held -= 1;
    }

    /// Slots held now.
    #[cfg(test)]
    pub(super) fn held(&self) -> usize {
        self.held
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(index: u32) -> ConnectionId {
        ConnectionId {
            index,
            generation: 0,
        }
    }

    #[test]
    fn over_the_cap_waits_in_order() {
        let mut h = Handshakes::new(2);
        assert_eq!(h.request(id(1)), Slot::Held);
        assert_eq!(h.request(id(2)), Slot::Held);
        assert_eq!(h.request(id(3)), Slot::Waiting);
        assert_eq!(h.request(id(4)), Slot::Waiting);
        assert_eq!(h.next_waiter(), Some(id(3)));
        assert_eq!(h.next_waiter(), Some(id(4)));
        assert_eq!(h.next_waiter(), None);
        h.free_one();
        assert_eq!(h.held(), 1);
        assert_eq!(h.request(id(5)), Slot::Held);
    }
}
