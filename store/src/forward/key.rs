//! Which lane a message goes to: [`LaneKey`] picks the field, a stable hash picks the lane.

use mllp_reactor::msh::Msh;

/// The field whose value chooses a message's lane when a destination has several.
///
/// Messages with the same value always go to the same lane, so they stay in store order
/// among themselves. A message without the field (or without a readable MSH) goes to the
/// lane of the empty value. The hash is FNV-1a over the raw bytes (escape sequences not
/// decoded), fixed forever, so a restart maps every message to the same lane as before.
///
/// ```
/// use mllp_store::forward::LaneKey;
///
/// let a = b"MSH|^~\\&|LAB|HOSP|EHR|H|20260101||ADT^A01|1|P|2.5\rPID|1||P42^^^H^MR~X9\r";
/// let b = b"MSH|^~\\&|RAD|HOSP|EHR|H|20260101||ADT^A08|2|P|2.5\rPID|1||P42^^^OTHER\r";
/// assert_eq!(LaneKey::Pid3.value(a), Some(&b"P42"[..]));
/// assert_eq!(LaneKey::Pid3.lane(a, 8), LaneKey::Pid3.lane(b, 8)); // same patient
/// assert_eq!(LaneKey::Msh3.value(a), Some(&b"LAB"[..]));
/// assert_eq!(LaneKey::Msh4.lane(a, 1), 0);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LaneKey {
    /// PID-3.1: the first component of the first repetition of the patient identifier list
    /// (per patient FIFO, as Medplum's `PID-3.1` channel key).
    #[default]
    Pid3,
    /// MSH-4, the sending facility (all components).
    Msh4,
    /// MSH-3, the sending application (all components).
    Msh3,
}

impl LaneKey {
    /// The name used in the store and on the command line: `pid3`, `msh4` or `msh3`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pid3 => "pid3",
            Self::Msh4 => "msh4",
            Self::Msh3 => "msh3",
        }
    }

    /// The key's raw value in `message`, if present and not empty.
    pub fn value(self, message: &[u8]) -> Option<&[u8]> {
        let msh = Msh::parse(message).ok()?;
        let value = match self {
            Self::Msh3 => msh.field(3),
            Self::Msh4 => msh.field(4),
            Self::Pid3 => pid3(message, &msh),
        };
        value.filter(|v| !v.is_empty())
    }

    /// The lane (`0..lanes`) of `message`; always 0 for one lane, without reading it.
    pub fn lane(self, message: &[u8], lanes: u16) -> u16 {
        if lanes <= 1 {
            return 0;
        }
        let hash = fnv1a(self.value(message).unwrap_or_default());
        (hash % u64::from(lanes)) as u16
    }
}

impl std::str::FromStr for LaneKey {
    type Err = UnknownLaneKey;

    fn from_str(s: &str) -> Result<Self, UnknownLaneKey> {
        match s {
            "pid3" => Ok(Self::Pid3),
            "msh4" => Ok(Self::Msh4),
            "msh3" => Ok(Self::Msh3),
            _ => Err(UnknownLaneKey),
        }
    }
}

/// A lane key name other than `pid3`, `msh4` or `msh3`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnknownLaneKey;

impl std::fmt::Display for UnknownLaneKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("unknown lane key (use pid3, msh4 or msh3)")
    }
}

impl std::error::Error for UnknownLaneKey {}

/// PID-3.1 of the first PID segment.
fn pid3<'a>(message: &'a [u8], msh: &Msh<'a>) -> Option<&'a [u8]> {
    let enc = msh.encoding();
    let start = message
        .windows(4)
        .position(|w| (w[0] == b'\r' || w[0] == b'\n') && &w[1..] == b"PID")?
        + 1;
    let segment = &message[start..];
    let segment = &segment[..segment
        .iter()
        .position(|&b| b == b'\r' || b == b'\n')
        .unwrap_or(segment.len())];
    if segment.get(3) != Some(&enc.field) {
        return None;
    }
    let field = segment.split(|&b| b == enc.field).nth(3)?;
    let first = field.split(|&b| b == enc.repetition).next()?;
    first.split(|&b| b == enc.component).next()
}

/// 64-bit FNV-1a: tiny, good enough to spread keys, and the same on every platform and run.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid3_edge_cases() {
        let msh = "MSH|^~\\&|A|F|R|R|20260101||ADT^A01|1|P|2.5";
        let with = |rest: &str| format!("{msh}\r{rest}\r");
        assert_eq!(LaneKey::Pid3.value(with("PID|1||").as_bytes()), None);
        assert_eq!(LaneKey::Pid3.value(with("PID|1").as_bytes()), None);
        assert_eq!(
            LaneKey::Pid3.value(with("PID|1||A&B^C").as_bytes()),
            Some(&b"A&B"[..])
        );
        assert_eq!(LaneKey::Pid3.value(with("PIDX|1||Z").as_bytes()), None);
        assert_eq!(LaneKey::Pid3.value(msh.as_bytes()), None);
        assert_eq!(LaneKey::Pid3.value(b"garbage"), None);
    }

    #[test]
    fn lanes_spread_and_are_stable() {
        // Fixed forever: a change would remap a running store's backlog.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        let mut seen = [0u32; 8];
        for i in 0..800 {
            let m = format!("MSH|^~\\&|A|F|R|R|1||ADT^A01|{i}|P|2.5\rPID|1||P{i}\r");
            seen[LaneKey::Pid3.lane(m.as_bytes(), 8) as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n > 50), "{seen:?}");
    }
}
