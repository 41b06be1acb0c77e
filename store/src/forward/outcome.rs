//! What one delivery attempt came to ([`Outcome`]) and what to do about it ([`Action`],
//! [`RetryPolicy`]).

use std::time::Duration;

use mllp_reactor::ClientError;
use mllp_reactor::ack::AckCode;
use mllp_reactor::client::Ack;

/// Default of [`RetryPolicy::max_attempts`]: 5 attempts answered AE/CE, then a dead letter.
///
/// An AE says the receiver understood the message but could not process it now (a lock, a
/// missing master record that another feed is about to create). A few spaced retries ride
/// that out (with the default backoff, 1 + 2 + 4 + 8 s ≈ 15 s); more only hold the lane's
/// later messages back for an error that is not going away.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;

/// Default of [`RetryPolicy::initial_backoff`]: 1 s before the first retry.
pub const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_secs(1);

/// Default of [`RetryPolicy::max_backoff`]: 60 s, the longest pause between two attempts.
///
/// A downstream back from maintenance is found within a minute, while a downstream that is
/// down for hours costs one connection attempt per lane per minute.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(60);

/// What an attempt came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// AA or CA with the right MSA-2.
    Accepted(AckCode),
    /// AE or CE with the right MSA-2.
    Error(AckCode),
    /// AR or CR with the right MSA-2.
    Rejected(AckCode),
    /// No complete ACK within the response timeout.
    Timeout,
    /// No connection could be made (refused, unreachable, name did not resolve, TLS failed).
    Refused,
    /// The connection failed or was closed before the ACK came.
    Reset,
    /// A reply that is not a readable ACK (garbage, too large, unsolicited bytes).
    Invalid,
    /// An ACK whose MSA-2 is not the message's MSH-10.
    Mismatch,
    /// The message has no MSH-10, so no ACK can be verified against it; nothing was sent.
    NoControlId,
}

impl Outcome {
    /// Classifies a client result.
    pub(crate) fn of(result: &Result<Ack, ClientError>) -> Self {
        match result {
            Ok(ack) => match ack.code {
                AckCode::AA | AckCode::CA => Self::Accepted(ack.code),
                AckCode::AE | AckCode::CE => Self::Error(ack.code),
                AckCode::AR | AckCode::CR => Self::Rejected(ack.code),
            },
            Err(ClientError::Connect(_)) => Self::Refused,
            Err(ClientError::Io(_) | ClientError::Closed) => Self::Reset,
            Err(ClientError::Timeout) => Self::Timeout,
            Err(ClientError::Mismatch { .. }) => Self::Mismatch,
            Err(ClientError::NoControlId) => Self::NoControlId,
            Err(_) => Self::Invalid,
        }
    }

    /// The `outcome` label of `mllp_forward_attempts_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Accepted(_) => "delivered",
            Self::Error(_) => "error",
            Self::Rejected(_) => "rejected",
            Self::Timeout => "timeout",
            Self::Refused => "refused",
            Self::Reset => "reset",
            Self::Invalid => "invalid",
            Self::Mismatch => "mismatch",
            Self::NoControlId => "no_control_id",
        }
    }

    /// Every label, for registering the counters once.
    pub(crate) const LABELS: [&'static str; 9] = [
        "delivered",
        "error",
        "rejected",
        "timeout",
        "refused",
        "reset",
        "invalid",
        "mismatch",
        "no_control_id",
    ];

    /// Index of [`as_str`](Self::as_str) in [`LABELS`](Self::LABELS).
    pub(crate) fn index(self) -> usize {
        match self {
            Self::Accepted(_) => 0,
            Self::Error(_) => 1,
            Self::Rejected(_) => 2,
            Self::Timeout => 3,
            Self::Refused => 4,
            Self::Reset => 5,
            Self::Invalid => 6,
            Self::Mismatch => 7,
            Self::NoControlId => 8,
        }
    }

    /// Whether the downstream answered (an ACK for this message, whatever its code).
    pub(crate) fn is_answer(self) -> bool {
        matches!(self, Self::Accepted(_) | Self::Error(_) | Self::Rejected(_))
    }

    /// Whether the downstream could not be talked to at all (the destination is down).
    pub(crate) fn is_transport(self) -> bool {
        matches!(self, Self::Timeout | Self::Refused | Self::Reset)
    }
}

/// What to do after an attempt that did not deliver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Dead-letter the message at once: it leaves its lane, which goes on with the next one.
    DeadLetter,
    /// Retry with backoff; after [`RetryPolicy::max_attempts`] such attempts, dead-letter.
    Retry,
    /// Retry with backoff for as long as it takes; the lane waits.
    RetryForever,
}

impl std::str::FromStr for Action {
    type Err = UnknownAction;

    fn from_str(s: &str) -> Result<Self, UnknownAction> {
        match s {
            "dead-letter" => Ok(Self::DeadLetter),
            "retry" => Ok(Self::Retry),
            "retry-forever" => Ok(Self::RetryForever),
            _ => Err(UnknownAction),
        }
    }
}

/// An action name other than `dead-letter`, `retry` or `retry-forever`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnknownAction;

impl std::fmt::Display for UnknownAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("unknown action (use dead-letter, retry or retry-forever)")
    }
}

impl std::error::Error for UnknownAction {}

/// What a destination does with each reply that is not AA/CA.
///
/// AA and CA always deliver. Timeouts, refused connections and resets always retry forever
/// (the downstream is down or slow: giving up would lose messages by the thousand). A message
/// without MSH-10 is always dead-lettered: no ACK can be verified against it.
///
/// ```
/// use std::time::Duration;
/// use mllp_store::forward::{Action, RetryPolicy};
///
/// let policy = RetryPolicy::default();
/// assert_eq!(policy.on_error, Action::Retry);
/// assert_eq!(policy.on_reject, Action::DeadLetter);
/// assert_eq!(policy.on_invalid, Action::RetryForever);
/// assert_eq!(policy.max_attempts, 5);
/// let fast = policy.backoff(Duration::from_millis(10), Duration::from_millis(100));
/// assert_eq!(fast.max_backoff, Duration::from_millis(100));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetryPolicy {
    /// On AE or CE (default [`Action::Retry`]).
    pub on_error: Action,
    /// On AR or CR (default [`Action::DeadLetter`]).
    pub on_reject: Action,
    /// On a reply that is not a readable ACK, or an ACK for another message (default
    /// [`Action::RetryForever`], as Mirth queues them: the cause is usually a broken
    /// connection or a misconfigured peer, not the message).
    pub on_invalid: Action,
    /// Attempts whose outcome's action is [`Action::Retry`] before the message is
    /// dead-lettered (default [`DEFAULT_MAX_ATTEMPTS`]); 0 counts as 1.
    pub max_attempts: u32,
    /// Pause before the first retry (default [`DEFAULT_INITIAL_BACKOFF`]); it doubles with
    /// every further failed attempt up to [`max_backoff`](Self::max_backoff), and each pause is
    /// jittered to between half and all of it, so that lanes do not retry in lockstep.
    pub initial_backoff: Duration,
    /// The longest pause (default [`DEFAULT_MAX_BACKOFF`]).
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            on_error: Action::Retry,
            on_reject: Action::DeadLetter,
            on_invalid: Action::RetryForever,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            initial_backoff: DEFAULT_INITIAL_BACKOFF,
            max_backoff: DEFAULT_MAX_BACKOFF,
        }
    }
}

impl RetryPolicy {
    /// Sets both backoff bounds.
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.initial_backoff = initial;
        self.max_backoff = max;
        self
    }

    /// Sets [`max_attempts`](Self::max_attempts).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n;
        self
    }

    /// The action for an outcome; `None` for a delivery.
    pub fn action(&self, outcome: Outcome) -> Option<Action> {
        match outcome {
            Outcome::Accepted(_) => None,
            Outcome::Error(_) => Some(self.on_error),
            Outcome::Rejected(_) => Some(self.on_reject),
            Outcome::Invalid | Outcome::Mismatch => Some(self.on_invalid),
            Outcome::Timeout | Outcome::Refused | Outcome::Reset => Some(Action::RetryForever),
            Outcome::NoControlId => Some(Action::DeadLetter),
        }
    }

    /// The pause before the retry after `failures` consecutive failed attempts (1 or more),
    /// before jitter: `initial × 2^(failures-1)`, capped at the maximum.
    pub fn pause(&self, failures: u32) -> Duration {
        let doubling = failures.saturating_sub(1).min(30);
        self.initial_backoff
            .saturating_mul(1 << doubling)
            .min(self.max_backoff)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_up_to_the_cap() {
        let p = RetryPolicy::default();
        assert_eq!(p.pause(1), Duration::from_secs(1));
        assert_eq!(p.pause(2), Duration::from_secs(2));
        assert_eq!(p.pause(6), Duration::from_secs(32));
        assert_eq!(p.pause(7), Duration::from_secs(60));
        assert_eq!(p.pause(u32::MAX), Duration::from_secs(60));
    }

    #[test]
    fn default_actions() {
        let p = RetryPolicy::default();
        assert_eq!(p.action(Outcome::Accepted(AckCode::CA)), None);
        assert_eq!(p.action(Outcome::Error(AckCode::CE)), Some(Action::Retry));
        assert_eq!(
            p.action(Outcome::Rejected(AckCode::AR)),
            Some(Action::DeadLetter)
        );
        assert_eq!(p.action(Outcome::Mismatch), Some(Action::RetryForever));
        assert_eq!(p.action(Outcome::Timeout), Some(Action::RetryForever));
        for (i, label) in Outcome::LABELS.iter().enumerate() {
            let o = [
                Outcome::Accepted(AckCode::AA),
                Outcome::Error(AckCode::AE),
                Outcome::Rejected(AckCode::AR),
                Outcome::Timeout,
                Outcome::Refused,
                Outcome::Reset,
                Outcome::Invalid,
                Outcome::Mismatch,
                Outcome::NoControlId,
            ][i];
            assert_eq!(o.as_str(), *label);
            assert_eq!(o.index(), i);
        }
    }
}
