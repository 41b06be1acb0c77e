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
    /// Set while replies wait to be written: when they began to wait (the peer must take some
    /// of them within the write timeout). The moment, not the deadline: at one message in
    /// flight the stall is armed and disarmed once per message and its deadline is almost
    /// never asked for, so the sum is left to the asking (`Connection::stall_deadline`).
    stall_since: Option<Instant>,
}

impl SlotQueue {
    pub(super) fn capacity(&self) -> usize {
        self.q.capacity()
    }

    /// Empties the queue, keeping its memory.
    pub(super) fn reset(&mut self) {
        self.q.clear();
        self.stall_since = None;
    }
}

// Inline: each is a few instructions on the per-message path (callgrind, S1: the index
// alone was a call of 16 instructions, twice per completion).
impl Slots {
    /// When the replies now waiting to be written began to wait, if any wait.
    #[inline]
    pub(super) fn stall_since(&self) -> Option<Instant> {
        self.0.as_ref()?.stall_since
    }

    #[inline]
    pub(super) fn set_stall_since(&mut self, since: Option<Instant>) {
        if let Some(q) = self.0.as_mut() {
            q.stall_since = since;
        }
    }

    /// Arms the stall at `now` unless replies already wait (the front holds a reply to
    /// write).
    #[inline]
    pub(super) fn stall_from(&mut self, now: Instant) {
        if let Some(q) = self.0.as_mut()
            && q.stall_since.is_none()
        {
            q.stall_since = Some(now);
        }
    }

    /// Waiting slot `seq` and its position, if it is still waiting.
    #[inline]
    pub(super) fn waiting_mut(&mut self, seq: u64) -> Option<(usize, &mut Slot)> {
        let q = &mut self.0.as_mut()?.q;
        let first = q.front()?.seq;
        let index = usize::try_from(seq.checked_sub(first)?).ok()?;
        let slot = q.get_mut(index)?;
        (slot.seq == seq && matches!(slot.state, super::SlotState::Waiting { .. }))
            .then_some((index, slot))
    }

    #[inline]
    pub(super) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the connection holds a queue (even an empty one, kept for the next message).
    #[inline]
    pub(super) fn is_held(&self) -> bool {
        self.0.is_some()
    }

    #[inline]
    pub(super) fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |q| q.q.len())
    }

    #[inline]
    pub(super) fn front(&self) -> Option<&Slot> {
        self.0.as_ref()?.q.front()
    }

    #[inline]
    pub(super) fn front_mut(&mut self) -> Option<&mut Slot> {
        self.0.as_mut()?.q.front_mut()
    }

    #[inline]
    pub(super) fn get(&self, index: usize) -> Option<&Slot> {
        self.0.as_ref()?.q.get(index)
    }

    #[inline]
    pub(super) fn push_back(&mut self, slot: Slot) {
        self.0
            .get_or_insert_with(super::pool::take_queue)
            .q
            .push_back(slot);
    }

    #[inline]
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

    // The deque's own iterators (an empty one without a queue): a `flat_map` over the
    // `Option` costs a state machine per step.
    #[inline]
    pub(super) fn iter(&self) -> std::collections::vec_deque::Iter<'_, Slot> {
        self.0
            .as_ref()
            .map_or_else(Default::default, |q| q.q.iter())
    }

    #[inline]
    pub(super) fn iter_mut(&mut self) -> std::collections::vec_deque::IterMut<'_, Slot> {
        self.0
            .as_mut()
            .map_or_else(Default::default, |q| q.q.iter_mut())
    }
}

impl std::ops::Index<usize> for Slots {
    type Output = Slot;
    #[inline]
    fn index(&self, index: usize) -> &Slot {
        &self.0.as_ref().expect("index into empty slots").q[index]
    }
}

impl std::ops::IndexMut<usize> for Slots {
    #[inline]
    fn index_mut(&mut self, index: usize) -> &mut Slot {
        &mut self.0.as_mut().expect("index into empty slots").q[index]
    }
}
