//! Hashed timer wheel holding every connection deadline of a reactor.
//!
//! The reactor keeps one [`TimerWheel`] for all of its deadlines (idle timeout, frame deadline,
//! handler deadline, write-stall deadline). Like the rest of the sans-IO core it never reads the
//! clock: every call takes the current [`Instant`] as a parameter, so tests drive it with a
//! virtual clock and never sleep.
//!
//! # Layout
//!
//! Time is cut into ticks counted from the `start` instant given to [`TimerWheel::new`]. An entry
//! whose deadline falls in tick `t` lives in slot `t % slots`, together with its absolute tick, so
//! entries more than one rotation ahead share a slot with nearer ones and are skipped until their
//! round comes. A bitmap of `u64` words records which slots are occupied, so advancing the wheel
//! and [`TimerWheel::next_deadline`] skip empty slots 64 at a time.
//!
//! ```text
//!  tick:   t0   t0+1  t0+2  ...                     t0+slots-1
//!  slot:  [ 5 ][ 6 ][ 7 ] ...  [ 3 ][ 4 ]   (slot = tick % slots)
//!            |
//!            +-> Vec<(absolute tick, item)>   e.g. (t0+1, a), (t0+1+slots, b)
//!                                              b waits one more rotation
//! ```
//!
//! # Defaults
//!
//! As tokio documents its wheel levels, here are the defaults and how they were chosen:
//!
//! | Setting           | Value     | Why                                                   |
//! |-------------------|-----------|-------------------------------------------------------|
//! | [`DEFAULT_TICK`]  | 10 ms     | lateness ≤ 10 ms: < 1 % of any deadline ≥ 1 s         |
//! | [`DEFAULT_SLOTS`] | 4096      | one rotation = 40.96 s: a 60 s idle entry wraps once  |
//! | memory per wheel  | ≈ 129 KiB | 4096 × 32 B slots (`Vec` + cached min) + 512 B bitmap |
//! | memory per entry  | 8 B + `T` | absolute tick + item: 16 B for a `ConnectionId`       |
//!
//! The reactor's deadlines run from hundreds of milliseconds (frame, handler, write stall) to
//! 60 s (idle), so a finer tick would buy no precision a peer could notice, only more slot
//! visits per second; a coarser one would make sub-second deadlines visibly late. The slot count
//! trades fixed memory against how often long entries are passed over: 4096 keeps the wheel
//! small while the longest common deadline wraps at most once.
//!
//! # Guarantees
//!
//! * **Never early.** An entry fires in tick `ceil((deadline - start) / tick)`, and
//!   [`TimerWheel::expired`] only processes ticks up to `floor((now - start) / tick)`, so an item
//!   is never returned while `now < deadline`. Deadlines before `start` count as `start`.
//! * **At most one tick late.** Once `now` reaches the end of the deadline's tick, the next
//!   `expired(now)` returns it.
//! * **Exactly once.** Each inserted item is returned by exactly one `expired` call.
//! * **Time may stand still or go backwards.** Repeating a `now`, or passing one older than the
//!   last, processes nothing new and loses nothing.
//! * **Bounded work.** [`TimerWheel::insert`] is O(1) amortised. `expired` touches each occupied
//!   slot in the elapsed range once, and visits every slot at most once even when `now` jumps many
//!   rotations ahead.
//!
//! # Lazy cancellation
//!
//! There is no `remove`: the caller ignores stale entries when they fire (a connection's
//! `handle_timeout(now)` checks its own deadlines). To keep stale entries from piling up, insert
//! a new entry only when a deadline moves *earlier* than the one already queued; when a deadline
//! moves later (an idle timer pushed back by traffic), let the old entry fire and re-arm then.

use std::cell::Cell;
use std::fmt;
use std::time::{Duration, Instant};

/// Distance from bit `from` to the first set bit of the `nbits`-bit ring `words`, if any.
fn first_set_cyclic(words: &[u64], nbits: usize, from: usize) -> Option<usize> {
    let mut position = from % nbits;
    let mut distance = 0;
    while distance < nbits {
        let bit = position % 64;
        let span = (64 - bit).min(nbits - position).min(nbits - distance);
        let window = if span == 64 {
            u64::MAX
        } else {
            (1 << span) - 1
        };
        let bits = (words[position / 64] >> bit) & window;
        if bits != 0 {
            return Some(distance + bits.trailing_zeros() as usize);
        }
        distance += span;
        position = (position + span) % nbits;
    }
    None
}

/// Default tick: the wheel's resolution, and the most an entry can fire late.
///
/// The reactor's deadlines are hundreds of milliseconds (frame, handler, write stall) to 60 s
/// (idle), so 10 ms of lateness is under 1 % of the shortest of them. A finer tick buys nothing
/// a peer could notice and costs more slot visits per second of wall time.
pub(crate) const DEFAULT_TICK: Duration = Duration::from_millis(10);

/// Default number of slots: 4096 slots of [`DEFAULT_TICK`] make one rotation 40.96 s.
///
/// With the 60 s default idle timeout an idle entry is passed over at most once (one extra
/// comparison of its slot's cached minimum) before it fires. The slot array costs 4096 × 32 B =
/// 128 KiB per reactor, which is fixed and independent of the number of connections.
pub(crate) const DEFAULT_SLOTS: usize = 4096;

/// Fewest slots a wheel has: one bitmap word, so a word never straddles the wrap.
const MIN_SLOTS: usize = 64;

/// A slot that empties while holding more capacity than this many entries gives its memory back.
///
/// A burst (thousands of connections accepted in one tick) can grow one slot far past the few
/// entries a slot normally holds. Smaller slots keep their capacity so the steady state
/// allocates nothing; the bound caps what the wheel can hold on to at `slots × 32` entries
/// (2 MiB for 4096 slots of 16-byte entries) however large the bursts were.
const SLOT_RETAINED_CAPACITY: usize = 32;

/// Occupied slots [`TimerWheel::next_deadline`] looks into before settling for a lower bound.
///
/// Usually the first occupied slot holds an entry due in this rotation and the search stops
/// there; the bound only matters when many slots hold entries for later rounds. Answering early
/// costs at most a spurious wake-up, which callers must tolerate anyway.
const NEXT_DEADLINE_SLOT_BUDGET: usize = 8;

const NANOS_PER_SEC: u64 = 1_000_000_000;

/// A hashed timer wheel: items keyed by deadline, returned once their deadline has passed.
///
/// See the [module documentation](self) for the layout, guarantees and defaults. `T` is the
/// item the caller gets back when a deadline passes; the reactor stores a connection id.
pub(crate) struct TimerWheel<T> {
    /// Tick length in nanoseconds. INVARIANT: > 0.
    tick_nanos: u64,
    /// Instant of tick 0; every tick is counted from here.
    start: Instant,
    /// `slots.len() - 1`; `slots.len()` is a power of two, at least [`MIN_SLOTS`].
    mask: u64,
    slots: Box<[Slot<T>]>,
    /// Bit `s % 64` of word `s / 64` is set iff `slots[s]` holds at least one entry.
    occupied: Box<[u64]>,
    /// Bit `w % 64` of word `w / 64` is set iff `occupied[w]` is non-zero: lets the search
    /// skip 4 096 empty slots at a time (a 30 s handler deadline is ~50 empty words away).
    summary: Box<[u64]>,
    /// First tick that `expired` has not processed yet.
    /// INVARIANT: every entry in `slots` has tick >= `next_tick`.
    next_tick: u64,
    /// Entries inserted with a tick the wheel had already passed (deadline in the past). They
    /// cannot go in their slot, which is not visited again until a rotation later.
    /// INVARIANT: every tick here is < `next_tick`.
    overdue: Vec<(u64, T)>,
    /// Smallest tick in `overdue`, `u64::MAX` when it is empty.
    overdue_min: u64,
    /// Entries in `slots` and `overdue` together.
    len: usize,
    /// The last answer of the slot search in [`next_deadline`](Self::next_deadline), as a
    /// tick and its instant, while it is still one: no later than every slot entry's tick
    /// (an insert of an earlier one clears it), not yet elapsed (checked against
    /// `next_tick`), and nothing fired since (which clears it, so the next answer is
    /// tight again). The reactor asks once per poll turn and the answer rarely changes, so
    /// this saves the bitmap search per turn (about 260 instructions per message at S1,
    /// callgrind).
    next: Cell<Option<(u64, Instant)>>,
    /// Slots whose entries `expired` examined, so tests can prove large jumps stay bounded.
    #[cfg(test)]
    slot_visits: usize,
}

/// One slot: the entries whose tick is congruent to the slot index, from any round.
struct Slot<T> {
    /// `(absolute firing tick, item)`, unordered.
    entries: Vec<(u64, T)>,
    /// Smallest tick in `entries`, `u64::MAX` when empty. Lets `expired` skip a slot whose
    /// entries all belong to later rounds, and lets `next_deadline` avoid scanning entries.
    min_tick: u64,
}

impl<T: Copy> TimerWheel<T> {
    /// Creates an empty wheel whose tick 0 starts at `start`.
    ///
    /// `slots` is rounded up to a power of two, and to at least 64 (one bitmap word). Use
    /// [`DEFAULT_TICK`] and [`DEFAULT_SLOTS`] unless a measurement says otherwise.
    ///
    /// # Panics
    ///
    /// Panics if `tick` is zero or longer than `u64::MAX` nanoseconds (about 584 years), or if
    /// `slots` rounded up to a power of two overflows `usize`.
    pub(crate) fn new(tick: Duration, slots: usize, start: Instant) -> Self {
        assert!(!tick.is_zero(), "timer wheel tick must be non-zero");
        let tick_nanos = u64::try_from(tick.as_nanos()).expect("timer wheel tick too long");
        let slots = slots
            .max(MIN_SLOTS)
            .checked_next_power_of_two()
            .expect("timer wheel slot count too large");
        Self {
            tick_nanos,
            start,
            mask: slots as u64 - 1,
            slots: (0..slots)
                .map(|_| Slot {
                    entries: Vec::new(),
                    min_tick: u64::MAX,
                })
                .collect(),
            occupied: vec![0; slots / 64].into_boxed_slice(),
            summary: vec![0; (slots / 64).div_ceil(64)].into_boxed_slice(),
            next_tick: 0,
            overdue: Vec::new(),
            overdue_min: u64::MAX,
            len: 0,
            next: Cell::new(None),
            #[cfg(test)]
            slot_visits: 0,
        }
    }

    /// Queues `item` to be returned by the first [`expired`](Self::expired) call whose `now` is
    /// at or past the end of `deadline`'s tick.
    ///
    /// O(1) amortised. A deadline the wheel has already passed fires on the next `expired` call
    /// (whose `now`, if it did not go backwards, is past the deadline).
    pub(crate) fn insert(&mut self, deadline: Instant, item: T) {
        let since_start = deadline.saturating_duration_since(self.start);
        // Rounding up is what makes the wheel never fire early.
        let tick = nanos(since_start).div_ceil(self.tick_nanos);
        if tick < self.next_tick {
            self.overdue.push((tick, item));
            self.overdue_min = self.overdue_min.min(tick);
        } else {
            if self.next.get().is_some_and(|(next, _)| tick < next) {
                self.next.set(None);
            }
            let index = self.slot_index(tick);
            let slot = &mut self.slots[index];
            slot.entries.push((tick, item));
            slot.min_tick = slot.min_tick.min(tick);
            self.occupied[index / 64] |= 1 << (index % 64);
            self.summary[index / 4096] |= 1 << (index / 64 % 64);
        }
        self.len += 1;
    }

    /// Appends to `out` every item whose deadline is at or before `now`, once the tick holding
    /// that deadline has fully elapsed, and removes them from the wheel.
    ///
    /// Never returns an item early, and returns it at most one tick late. Items come out in no
    /// particular order. A `now` earlier than a previous call's is harmless: it processes no new
    /// ticks. Work is proportional to the occupied slots in the elapsed ticks, and each slot is
    /// visited at most once however far `now` jumped.
    pub(crate) fn expired(&mut self, now: Instant, out: &mut Vec<T>) {
        // Before `start` no tick has elapsed, not even tick 0.
        let Some(since_start) = now.checked_duration_since(self.start) else {
            return;
        };
        let now_tick = nanos(since_start) / self.tick_nanos;

        if self.overdue_min <= now_tick {
            let (fired, min) = fire_due(&mut self.overdue, now_tick, out);
            self.overdue_min = min;
            self.len -= fired;
            release_if_large(&mut self.overdue);
        }

        if now_tick < self.next_tick {
            return;
        }
        // Ticks next_tick..=now_tick elapsed; past one rotation every slot is due for a visit,
        // and one visit per slot is enough because it fires every entry with tick <= now_tick.
        let elapsed = (now_tick - self.next_tick).saturating_add(1);
        let count = usize::try_from(elapsed).map_or(self.slots.len(), |e| e.min(self.slots.len()));
        let from = self.slot_index(self.next_tick);
        let mut done = 0;
        while let Some(offset) = self.next_occupied(from + done, count - done) {
            let index = (from + done + offset) & (self.slots.len() - 1);
            self.fire_slot(index, now_tick, out);
            done += offset + 1;
        }
        self.next_tick = now_tick.saturating_add(1);
    }

    /// Returns an instant at or before the earliest firing time in the wheel, or `None` when the
    /// wheel is empty.
    ///
    /// Meant for the reactor's poll timeout. A firing time is a deadline rounded up to the end
    /// of its tick; with one entry the answer is exactly that. With several it may be earlier
    /// than the earliest firing time (a spurious wake-up, which callers must tolerate), but
    /// never later. For an entry whose deadline has already passed it is in the past: poll with
    /// a zero timeout. Cheap: walks the occupancy bitmap and looks at a few slots' cached minima,
    /// never at their entries.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        if self.len == 0 {
            return None;
        }
        // Overdue ticks are all < next_tick <= every slot entry's tick.
        if !self.overdue.is_empty() {
            return Some(self.tick_instant(self.overdue_min));
        }
        if let Some((tick, at)) = self.next.get()
            && tick >= self.next_tick
        {
            return Some(at);
        }
        let len = self.slots.len();
        let from = self.slot_index(self.next_tick);
        let mut best = u64::MAX;
        let mut done = 0;
        let mut looked = 0;
        while let Some(offset) = self.next_occupied(from + done, len - done) {
            // Every slot not looked at yet has entries no earlier than its tick in this rotation.
            let tick = self.next_tick.saturating_add((done + offset) as u64);
            if tick >= best {
                break;
            }
            if looked == NEXT_DEADLINE_SLOT_BUDGET {
                best = tick;
                break;
            }
            let index = (from + done + offset) & (len - 1);
            best = best.min(self.slots[index].min_tick);
            looked += 1;
            done += offset + 1;
        }
        let at = self.tick_instant(best);
        self.next.set(Some((best, at)));
        Some(at)
    }

    /// Returns the number of queued entries, stale ones included.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Returns `true` when no entries are queued.
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn slot_index(&self, tick: u64) -> usize {
        // The mask is below slots.len(), so the result fits in usize.
        (tick & self.mask) as usize
    }

    /// Moves every entry of slot `index` with tick <= `now_tick` to `out`; keeps the rest.
    fn fire_slot(&mut self, index: usize, now_tick: u64, out: &mut Vec<T>) {
        let slot = &mut self.slots[index];
        if slot.min_tick > now_tick {
            // Everything here belongs to a later round.
            return;
        }
        #[cfg(test)]
        {
            self.slot_visits += 1;
        }
        let (fired, min) = fire_due(&mut slot.entries, now_tick, out);
        slot.min_tick = min;
        self.len -= fired;
        if fired > 0 {
            self.next.set(None);
        }
        if slot.entries.is_empty() {
            release_if_large(&mut slot.entries);
            self.occupied[index / 64] &= !(1 << (index % 64));
            if self.occupied[index / 64] == 0 {
                self.summary[index / 4096] &= !(1 << (index / 64 % 64));
            }
        }
    }

    /// Distance from slot `from` (taken modulo the slot count) to the first occupied slot among
    /// the next `limit` slots: the rest of `from`'s bitmap word, then the next non-empty word
    /// found through the summary.
    fn next_occupied(&self, from: usize, limit: usize) -> Option<usize> {
        let slots = self.slots.len();
        let position = from & (slots - 1);
        let bit = position % 64;
        // The slot count is a multiple of 64, so a word never straddles the wrap.
        let span = (64 - bit).min(limit);
        if span == 0 {
            return None;
        }
        let window = if span == 64 {
            u64::MAX
        } else {
            (1 << span) - 1
        };
        let bits = (self.occupied[position / 64] >> bit) & window;
        if bits != 0 {
            return Some(bits.trailing_zeros() as usize);
        }
        // Whole words from here on; the search may come back round to `position`'s word,
        // whose bits before `bit` are then past `limit` or checked below.
        let words = self.occupied.len();
        let word = (position / 64 + 1) % words;
        let skip = first_set_cyclic(&self.summary, words, word)?;
        let found = (word + skip) % words;
        let distance = span + skip * 64 + self.occupied[found].trailing_zeros() as usize;
        (distance < limit).then_some(distance)
    }

    /// The instant at which `tick` has fully elapsed.
    fn tick_instant(&self, tick: u64) -> Instant {
        let total = u128::from(tick) * u128::from(self.tick_nanos);
        let nanos_per_sec = u128::from(NANOS_PER_SEC);
        let secs = u64::try_from(total / nanos_per_sec).unwrap_or(u64::MAX);
        // The remainder is below one second, so it fits in u32.
        let offset = Duration::new(secs, (total % nanos_per_sec) as u32);
        // A firing tick comes from a representable deadline that lies less than one tick before
        // it, so if the tick's end is not representable, one tick earlier is (and is earlier than
        // the deadline, which is all next_deadline promises). `start` is the last resort.
        self.start
            .checked_add(offset)
            .or_else(|| self.start.checked_add(offset.saturating_sub(self.tick())))
            .unwrap_or(self.start)
    }

    fn tick(&self) -> Duration {
        Duration::from_nanos(self.tick_nanos)
    }
}

impl<T> fmt::Debug for TimerWheel<T> {
    // Summary only: dumping thousands of slots would drown a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TimerWheel")
            .field("tick", &Duration::from_nanos(self.tick_nanos))
            .field("slots", &self.slots.len())
            .field("next_tick", &self.next_tick)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

/// Saturating nanoseconds of a duration (u64 nanoseconds last 584 years).
fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// Moves every entry due at `now_tick` from `entries` to `out`. Returns how many fired and the
/// smallest tick left (`u64::MAX` if none).
fn fire_due<T: Copy>(entries: &mut Vec<(u64, T)>, now_tick: u64, out: &mut Vec<T>) -> (usize, u64) {
    let before = entries.len();
    let mut min = u64::MAX;
    entries.retain(|&(tick, item)| {
        if tick <= now_tick {
            out.push(item);
            false
        } else {
            min = min.min(tick);
            true
        }
    });
    (before - entries.len(), min)
}

/// Frees an emptied vector's memory if a burst grew it past [`SLOT_RETAINED_CAPACITY`].
fn release_if_large<E>(entries: &mut Vec<E>) {
    if entries.is_empty() && entries.capacity() > SLOT_RETAINED_CAPACITY {
        *entries = Vec::new();
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    /// The module's example: insert, look at the next deadline, fire.
    #[test]
    fn example_insert_and_fire() {
        let t0 = Instant::now();
        let mut wheel = TimerWheel::new(DEFAULT_TICK, DEFAULT_SLOTS, t0);
        wheel.insert(t0 + Duration::from_secs(60), 7_u32);
        assert_eq!(wheel.next_deadline(), Some(t0 + Duration::from_secs(60)));
        let mut fired = Vec::new();
        wheel.expired(t0 + Duration::from_secs(59), &mut fired);
        assert!(fired.is_empty());
        wheel.expired(t0 + Duration::from_secs(60), &mut fired);
        assert_eq!(fired, [7]);
        assert!(wheel.is_empty());
    }

    const MS: Duration = Duration::from_millis(1);
    const NS: Duration = Duration::from_nanos(1);

    /// A 64-slot wheel of 10 ms ticks: one rotation is 640 ms, small enough to cross often.
    fn small(start: Instant) -> TimerWheel<u32> {
        TimerWheel::new(10 * MS, 64, start)
    }

    #[track_caller]
    fn fire(wheel: &mut TimerWheel<u32>, now: Instant) -> Vec<u32> {
        let mut out = Vec::new();
        wheel.expired(now, &mut out);
        out.sort_unstable();
        out
    }

    #[test]
    fn slots_round_up_to_a_power_of_two_of_at_least_one_word() {
        let t0 = Instant::now();
        assert_eq!(TimerWheel::<u32>::new(MS, 0, t0).slots.len(), 64);
        assert_eq!(TimerWheel::<u32>::new(MS, 65, t0).slots.len(), 128);
        assert_eq!(
            TimerWheel::<u32>::new(MS, DEFAULT_SLOTS, t0).slots.len(),
            4096
        );
    }

    #[test]
    #[should_panic(expected = "non-zero")]
    fn zero_tick_panics() {
        TimerWheel::<u32>::new(Duration::ZERO, 64, Instant::now());
    }

    #[test]
    fn never_early_on_a_tick_boundary() {
        let t0 = Instant::now();
        let mut wheel = small(t0);
        let deadline = t0 + 30 * MS;
        wheel.insert(deadline, 1);
        assert_eq!(fire(&mut wheel, deadline - NS), Vec::<u32>::new());
        assert_eq!(fire(&mut wheel, deadline), [1]);
        assert!(wheel.is_empty());
    }

    #[test]
    fn never_early_between_ticks() {
        let t0 = Instant::now();
        let mut wheel = small(t0);
        let deadline = t0 + 25 * MS;
        wheel.insert(deadline, 1);
        assert_eq!(fire(&mut wheel, deadline - NS), Vec::<u32>::new());
        // Rounded up to the end of its tick: not yet at the deadline itself.
        assert_eq!(fire(&mut wheel, deadline), Vec::<u32>::new());
        assert_eq!(fire(&mut wheel, t0 + 30 * MS), [1]);
    }

    #[test]
    fn at_most_one_tick_late() {
        let t0 = Instant::now();
        for offset_us in [
            0, 1, 4_999, 9_999, 10_000, 10_001, 123_456, 639_999, 640_000, 1_000_001,
        ] {
            let mut wheel = small(t0);
            let deadline = t0 + Duration::from_micros(offset_us);
            wheel.insert(deadline, 1);
            // Step the clock 1 µs at a time from just before the deadline.
            let mut now = deadline
                .checked_sub(Duration::from_micros(50))
                .unwrap_or(t0);
            loop {
                if fire(&mut wheel, now) == [1] {
                    break;
                }
                assert!(
                    now < deadline + 10 * MS,
                    "deadline +{offset_us} µs not fired by {now:?}"
                );
                now += Duration::from_micros(1);
            }
            assert!(now >= deadline, "deadline +{offset_us} µs fired early");
            assert!(
                now < deadline + 10 * MS,
                "deadline +{offset_us} µs fired late"
            );
        }
    }

    #[test]
    fn same_slot_different_rounds_fire_in_their_own_round() {
        let t0 = Instant::now();
        let mut wheel = small(t0);
        let rotation = 640 * MS;
        // Ticks 5, 69 and 133 all hash to slot 5.
        for round in 0..3_u32 {
            wheel.insert(t0 + 50 * MS + rotation * round, round);
        }
        let mut fired = BTreeMap::new();
        let mut now = t0;
        while now <= t0 + 3 * rotation {
            for item in fire(&mut wheel, now) {
                assert!(fired.insert(item, now).is_none(), "item {item} fired twice");
            }
            now += MS;
        }
        for round in 0..3_u32 {
            assert_eq!(
                fired[&round],
                t0 + 50 * MS + rotation * round,
                "round {round}"
            );
        }
    }

    #[test]
    fn jump_over_several_rotations_visits_each_slot_once() {
        let t0 = Instant::now();
        let mut wheel = small(t0);
        // Two entries per slot for ten rotations: 1280 entries, all due after the jump.
        for tick in 1..=640_u32 {
            wheel.insert(t0 + 10 * MS * tick, tick);
            wheel.insert(t0 + 10 * MS * tick - NS, 1000 + tick);
        }
        // And some that stay beyond the jump.
        wheel.insert(t0 + 10 * MS * 700, 5000);
        wheel.insert(t0 + Duration::from_secs(3600), 5001);
        let fired = fire(&mut wheel, t0 + 10 * MS * 640);
        assert_eq!(fired.len(), 1280);
        fired
            .windows(2)
            .for_each(|w| assert_ne!(w[0], w[1], "fired twice"));
        assert!(wheel.slot_visits <= 64, "{} slot visits", wheel.slot_visits);
        assert_eq!(wheel.len(), 2);
        assert_eq!(fire(&mut wheel, t0 + 10 * MS * 699), Vec::<u32>::new());
        assert_eq!(fire(&mut wheel, t0 + 10 * MS * 700), [5000]);
        // A jump of 2^40 ticks finishes at once and still never visits a slot twice.
        let visits = wheel.slot_visits;
        assert_eq!(
            fire(&mut wheel, t0 + (10 * MS) * (1 << 20) * (1 << 20)),
            [5001]
        );
        assert!(wheel.slot_visits - visits <= 64);
        assert!(wheel.is_empty());
    }

    #[test]
    fn insert_in_the_past_fires_on_the_next_call() {
        let t0 = Instant::now();
        let mut wheel = small(t0);
        let now = t0 + Duration::from_secs(1);
        assert_eq!(fire(&mut wheel, now), Vec::<u32>::new());
        wheel.insert(t0 + 100 * MS, 1);
        wheel.insert(now, 2);
        wheel.insert(t0.checked_sub(Duration::from_secs(1)).unwrap(), 3);
        assert!(wheel.next_deadline().unwrap() <= now);
        // Same `now` again: the wheel processes no new tick but the overdue entries fire.
        assert_eq!(fire(&mut wheel, now), [1, 2, 3]);
        assert!(wheel.is_empty());
        assert_eq!(wheel.next_deadline(), None);
    }

    #[test]
    fn deadline_before_start_fires_at_start() {
        let t0 = Instant::now();
        let mut wheel = small(t0);
        wheel.insert(t0.checked_sub(Duration::from_secs(5)).unwrap(), 1);
        assert_eq!(wheel.next_deadline(), Some(t0));
        assert_eq!(fire(&mut wheel, t0 - NS), Vec::<u32>::new());
        assert_eq!(fire(&mut wheel, t0), [1]);
    }

    #[test]
    fn now_going_backwards_is_harmless() {
        let t0 = Instant::now();
        let mut wheel = small(t0);
        wheel.insert(t0 + 200 * MS, 1);
        wheel.insert(t0 + 900 * MS, 2);
        assert_eq!(fire(&mut wheel, t0 + 500 * MS), [1]);
        // An older `now` fires nothing new, loses nothing, and does not rewind the wheel.
        assert_eq!(fire(&mut wheel, t0 + 100 * MS), Vec::<u32>::new());
        // Overdue relative to the wheel but not to this older `now`: must not fire early.
        wheel.insert(t0 + 300 * MS, 3);
        assert_eq!(fire(&mut wheel, t0 + 250 * MS), Vec::<u32>::new());
        assert_eq!(fire(&mut wheel, t0 + 300 * MS), [3]);
        assert_eq!(fire(&mut wheel, t0 + 899 * MS), Vec::<u32>::new());
        assert_eq!(fire(&mut wheel, t0 + 900 * MS), [2]);
        assert!(wheel.is_empty());
    }

    #[test]
    fn next_occupied_finds_what_a_slot_by_slot_scan_finds() {
        // Wheels of one, two and 128 bitmap words (the summary's single partial word, and
        // two summary words), occupied slots around the wrap and word edges.
        for slots in [64, 128, 8192] {
            let t0 = Instant::now();
            let mut wheel: TimerWheel<u32> = TimerWheel::new(MS, slots, t0);
            let mut occupied = vec![false; slots];
            for index in [0, 1, 63, 64, 65, 127, slots / 2, slots - 64, slots - 1] {
                let index = index % slots;
                occupied[index] = true;
                wheel.occupied[index / 64] |= 1 << (index % 64);
                wheel.summary[index / 4096] |= 1 << (index / 64 % 64);
                for from in (0..slots).step_by(7).chain([slots - 1, slots + 5]) {
                    for limit in [0, 1, 5, 64, 65, slots / 2, slots] {
                        let naive = (0..limit).find(|d| occupied[(from + d) % slots]);
                        assert_eq!(
                            wheel.next_occupied(from, limit),
                            naive,
                            "slots {slots}, from {from}, limit {limit}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn next_deadline_of_an_empty_wheel_is_none() {
        let t0 = Instant::now();
        let mut wheel = small(t0);
        assert_eq!(wheel.next_deadline(), None);
        wheel.insert(t0 + MS, 1);
        fire(&mut wheel, t0 + 10 * MS);
        assert_eq!(wheel.next_deadline(), None);
    }

    #[test]
    fn next_deadline_of_one_item_is_its_deadline_rounded_up() {
        let t0 = Instant::now();
        let mut wheel = small(t0);
        // Within this rotation, a later rotation, and exactly on a tick.
        for (deadline, expected) in [
            (t0 + 25 * MS, t0 + 30 * MS),
            (
                t0 + Duration::from_millis(60_001),
                t0 + Duration::from_millis(60_010),
            ),
            (t0 + Duration::from_secs(2), t0 + Duration::from_secs(2)),
        ] {
            wheel.insert(deadline, 1);
            assert_eq!(wheel.next_deadline(), Some(expected));
            assert_eq!(fire(&mut wheel, expected - NS), Vec::<u32>::new());
            assert_eq!(wheel.next_deadline(), Some(expected));
            assert_eq!(fire(&mut wheel, expected), [1]);
        }
    }

    #[test]
    fn next_deadline_is_never_after_the_earliest() {
        let t0 = Instant::now();
        let mut wheel = small(t0);
        // The far entry sits in an earlier slot than the near one.
        wheel.insert(t0 + 10 * MS + 640 * MS * 3, 1);
        wheel.insert(t0 + 305 * MS, 2);
        assert_eq!(wheel.next_deadline(), Some(t0 + 310 * MS));
        wheel.insert(t0 + 95 * MS, 3);
        assert_eq!(wheel.next_deadline(), Some(t0 + 100 * MS));
        // Many slots full of later-round entries: the answer may be early, never late.
        let mut wheel = small(t0);
        for tick in 1..64_u32 {
            wheel.insert(t0 + 10 * MS * (tick + 640), tick);
        }
        wheel.insert(t0 + 10 * MS * 700, 99);
        let next = wheel.next_deadline().unwrap();
        assert!(next <= t0 + 10 * MS * 641, "{next:?}");
    }

    #[test]
    fn emptied_slots_release_burst_capacity() {
        let t0 = Instant::now();
        let mut wheel = small(t0);
        for item in 0..1000 {
            wheel.insert(t0 + 10 * MS, item);
        }
        for item in 0..4 {
            wheel.insert(t0 + 20 * MS, item);
        }
        assert_eq!(fire(&mut wheel, t0 + 20 * MS).len(), 1004);
        assert_eq!(wheel.slots[1].entries.capacity(), 0);
        // Small slots keep their capacity for reuse.
        assert!(wheel.slots[2].entries.capacity() >= 4);
        assert_eq!(wheel.occupied[0], 0);
    }

    /// One step of the property test: insert at an offset from start, or move the clock.
    #[derive(Debug, Clone)]
    enum Op {
        /// Deadline at `start + nanos - 1 s` (so some fall before start).
        Insert(u64),
        /// Move `now` by this many nanoseconds (negative goes back in time).
        Advance(i64),
    }

    fn op() -> impl Strategy<Value = Op> {
        const SEC: u64 = NANOS_PER_SEC;
        prop_oneof![
            4 => (0..6 * SEC).prop_map(Op::Insert),
            // Near-tick offsets, where rounding mistakes show.
            2 => (0..600_u64, 0..3_u64).prop_map(|(t, e)| Op::Insert(SEC + t * 10_000_000 + e - 1)),
            3 => (0..30_000_000_i64).prop_map(Op::Advance),
            1 => (0..3 * SEC as i64).prop_map(Op::Advance),
            1 => (-(SEC as i64)..0).prop_map(Op::Advance),
        ]
    }

    proptest! {
        /// Every `expired` fires exactly the unfired items whose deadline has passed and whose
        /// tick has elapsed: nothing early, nothing lost, nothing twice, at most one tick late.
        #[test]
        fn matches_a_sorted_reference(ops in prop::collection::vec(op(), 1..300)) {
            const TICK: u64 = 10_000_000;
            let base = Instant::now();
            let start = base + Duration::from_secs(1);
            let mut wheel = TimerWheel::new(Duration::from_nanos(TICK), 64, start);
            // (firing tick, deadline, item), kept sorted; what the wheel should still hold.
            let mut pending: Vec<(u64, Instant, u32)> = Vec::new();
            // Clock as nanoseconds since `base`, so it can sit before `start`.
            let mut clock: i64 = 0;
            for (item, op) in (0_u32..).zip(ops) {
                match op {
                    Op::Insert(offset) => {
                        let deadline = base + Duration::from_nanos(offset);
                        let tick = offset.saturating_sub(NANOS_PER_SEC).div_ceil(TICK);
                        wheel.insert(deadline, item);
                        let at = pending.partition_point(|p| p.0 <= tick);
                        pending.insert(at, (tick, deadline, item));
                    }
                    Op::Advance(delta) => {
                        clock = (clock + delta).max(0);
                        let now = base + Duration::from_nanos(clock as u64);
                        let mut fired = Vec::new();
                        wheel.expired(now, &mut fired);
                        fired.sort_unstable();
                        let mut expected = Vec::new();
                        if let Some(elapsed) = now.checked_duration_since(start) {
                            let now_tick = nanos(elapsed) / TICK;
                            let due = pending.partition_point(|p| p.0 <= now_tick);
                            for (_, deadline, item) in pending.drain(..due) {
                                prop_assert!(deadline <= now);
                                expected.push(item);
                            }
                        }
                        expected.sort_unstable();
                        prop_assert_eq!(fired, expected);
                    }
                }
                prop_assert_eq!(wheel.len(), pending.len());
                let next = wheel.next_deadline();
                match pending.first() {
                    None => prop_assert_eq!(next, None),
                    Some(&(tick, _, _)) => {
                        let earliest = start + Duration::from_nanos(tick * TICK);
                        prop_assert!(next.is_some_and(|n| n <= earliest));
                        if pending.len() == 1 {
                            prop_assert_eq!(next, Some(earliest));
                        }
                    }
                }
            }
        }
    }
}
