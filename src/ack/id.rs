//! The control ids the builder generates for its own MSH-10: a per-process prefix, then a
//! process-wide counter in decimal.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Hex digits of per-process prefix at the start of every id.
const PREFIX_LEN: usize = 8;

/// A generated control id: [`PREFIX_LEN`] hex digits of per-process prefix, then a decimal
/// counter.
///
/// Up to 10¹² ACKs per process the id fits the 20 characters HL7 v2.5 allows MSH-10; the
/// buffer holds the full `u64` range.
#[derive(Clone, Copy, Debug)]
pub(crate) struct GeneratedId {
    bytes: [u8; 28],
    len: usize,
}

impl GeneratedId {
    /// No id: what a thread's last id is before it generates one.
    const NONE: Self = Self {
        bytes: [0; 28],
        len: 0,
    };

    /// The id of counter value `n`.
    fn new(n: u64) -> Self {
        let prefix = ID_PREFIX.get_or_init(process_prefix);
        let mut bytes = [0; 28];
        bytes[..PREFIX_LEN].copy_from_slice(prefix);
        let len = PREFIX_LEN + put_decimal(n, &mut bytes[PREFIX_LEN..]);
        Self { bytes, len }
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    /// Adds one to the counter's digits in place; false when they were all nines (the id
    /// grows a digit, and is formatted anew instead).
    fn increment(&mut self) -> bool {
        for digit in self.bytes[PREFIX_LEN..self.len].iter_mut().rev() {
            if *digit == b'9' {
                *digit = b'0';
            } else {
                *digit += 1;
                return true;
            }
        }
        false
    }
}

/// Next value of the process-wide ACK counter. `Relaxed`: only uniqueness matters, and
/// `fetch_add` gives that under any ordering.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// The per-process prefix, fixed on first use.
static ID_PREFIX: OnceLock<[u8; PREFIX_LEN]> = OnceLock::new();

/// The last id a thread generated, to make the next one from: when the value the thread
/// draws from the shared counter follows the one it drew last (one thread serving, or bursts
/// on one thread), the new id is the last one with its decimal digits counted up in place
/// instead of formatted anew (callgrind, S1: about 100 instructions per message for the
/// formatting, 20 for the increment).
#[derive(Debug)]
pub(crate) struct Ids {
    /// The counter value of `last` (`u64::MAX` before the first).
    counter: u64,
    last: GeneratedId,
}

impl Ids {
    pub(crate) const fn new() -> Self {
        Self {
            counter: u64::MAX,
            last: GeneratedId::NONE,
        }
    }

    /// A new id, unique within the process.
    #[inline]
    pub(crate) fn next(&mut self) -> &[u8] {
        let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        if self.counter.wrapping_add(1) != n || !self.last.increment() {
            self.last = GeneratedId::new(n);
        }
        self.counter = n;
        self.last.as_bytes()
    }
}

/// 32 bits mixed from the start time and the pid, as hex: the counter restarts at 1 with the
/// process, and the prefix keeps ids from a new process off the old one's (1 in 2³² chance of
/// a clash per restart).
fn process_prefix() -> [u8; PREFIX_LEN] {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mixed = splitmix64(nanos ^ splitmix64(u64::from(std::process::id())));
    let mut hex = [0; PREFIX_LEN];
    for (i, digit) in hex.iter_mut().enumerate() {
        *digit = b"0123456789ABCDEF"[(mixed >> (60 - 4 * i)) as usize & 0xF];
    }
    hex
}

/// SplitMix64's finaliser: spreads every input bit over the output.
fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Writes `n` in decimal at the start of `out` (which must hold 20 bytes), returning the length.
/// Two digits per division, from a table: the counter has 8 or more digits in a busy process.
pub(crate) fn put_decimal(mut n: u64, out: &mut [u8]) -> usize {
    const PAIRS: &[u8; 200] = b"0001020304050607080910111213141516171819\
        2021222324252627282930313233343536373839\
        4041424344454647484950515253545556575859\
        6061626364656667686970717273747576777879\
        8081828384858687888990919293949596979899";
    let mut digits = [0; 20];
    let mut i = digits.len();
    while n >= 100 {
        let pair = (n % 100) as usize * 2;
        n /= 100;
        i -= 2;
        digits[i..i + 2].copy_from_slice(&PAIRS[pair..pair + 2]);
    }
    if n >= 10 {
        let pair = n as usize * 2;
        i -= 2;
        digits[i..i + 2].copy_from_slice(&PAIRS[pair..pair + 2]);
    } else {
        i -= 1;
        digits[i] = b'0' + n as u8;
    }
    let len = digits.len() - i;
    out[..len].copy_from_slice(&digits[i..]);
    len
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counting up in place gives the digits formatting gives, across every carry, including
    /// the one that grows the id by a digit.
    #[test]
    fn the_in_place_increment_matches_formatting() {
        for start in [1, 8, 9, 98, 99, 999, 1_099, 99_999_999, 123_456_789] {
            let mut id = GeneratedId::new(start);
            for n in start + 1..start + 30 {
                if !id.increment() {
                    id = GeneratedId::new(n);
                }
                assert_eq!(id.as_bytes(), GeneratedId::new(n).as_bytes(), "{n}");
            }
        }
    }

    /// Ids never repeat, however two threads draw from the counter in between each other.
    #[test]
    fn ids_are_unique_across_threads() {
        let draw = || {
            let mut ids = Ids::new();
            let mut all: Vec<_> = (0..2_000).map(|_| ids.next().to_vec()).collect();
            // A fresh `Ids` each time, as `build_into` has.
            all.extend((0..100).map(|_| Ids::new().next().to_vec()));
            all
        };
        let others = std::thread::spawn(draw);
        let mut all = draw();
        all.extend(others.join().unwrap());
        let count = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), count);
    }
}
