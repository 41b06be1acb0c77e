//! The slot queue of one connection: its messages in flight, in sequence order (see the
//! connection's module docs).

use std::time::Instant;

use super::Slot;

/// The slot queue, held only while messages are in flight: an idle connection holds
/// neither the queue nor its buffer (8 bytes instead of 48). Queues come from and go back to
/// the thread's pool (`super::pool`), so a busy connection does not allocate one per message.
#[derive(Debug, Default)]
pub(super) struct Slots(Option<Box<SlotQueue>>);

#[derive(Debug, Default)]
pub(super) struct SlotQueue {
    q: std::collections::VecDeque<Slot>,
    /// Set while replies wait to be written: the peer must take some of them by then.
    stall_deadline: Option<Instant>,
}

impl SlotQueue {
    pub(super) fn capacity(&self) -> usize {
        self.q.capacity()
    }

    /// Empties the queue, keeping its memory.
    pub(super) fn reset(&mut self) {
        self.q.clear();
        self.stall_deadline = None;
    }
}

impl Slots {
    pub(super) fn stall(&self) -> Option<Instant> {
        self.0.as_ref()?.stall_deadline
    }

    pub(super) fn set_stall(&mut self, deadline: Option<Instant>) {
        if let Some(q) = self.0.as_mut() {
            q.stall_deadline = deadline;
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the connection holds a queue (even an empty one, kept for the next message).
    pub(super) fn is_held(&self) -> bool {
        self.0.is_some()
    }

    pub(super) fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |q| q.q.len())
    }

    pub(super) fn front(&self) -> Option<&Slot> {
        self.0.as_ref()?.q.front()
    }

    pub(super) fn get(&self, index: usize) -> Option<&Slot> {
        self.0.as_ref()?.q.get(index)
    }

    pub(super) fn push_back(&mut self, slot: Slot) {
        self.0
            .get_or_insert_with(super::pool::take_queue)
            .q
            .push_back(slot);
    }

    pub(super) fn pop_front(&mut self) -> Option<Slot> {
        self.0.as_mut()?.q.pop_front()
    }

    /// Drops every slot and gives the queue back to the thread's pool (an empty queue stays
    /// with its connection until then: see `Connection::release_idle`).
    pub(super) fn clear(&mut self) {
        if let Some(queue) = self.0.take() {
            super::pool::put_queue(queue);
        }
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &Slot> {
        self.0.iter().flat_map(|q| q.q.iter())
    }

    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = &mut Slot> {
        self.0.iter_mut().flat_map(|q| q.q.iter_mut())
    }
}

impl std::ops::Index<usize> for Slots {
    type Output = Slot;
    fn index(&self, index: usize) -> &Slot {
        &self.0.as_ref().expect("index into empty slots").q[index]
    }
}

impl std::ops::IndexMut<usize> for Slots {
    fn index_mut(&mut self, index: usize) -> &mut Slot {
        &mut self.0.as_mut().expect("index into empty slots").q[index]
    }
}
