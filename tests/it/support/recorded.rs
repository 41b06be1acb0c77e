//! The metrics side of the harness: a reader that keeps the running totals of a test server's
//! `DebuggingRecorder`, and [`Expected`], an exact expectation of every metric.

use std::sync::Mutex;

use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use mllp_reactor::CloseReason;
use mllp_reactor::telemetry::names::*;

use super::{LISTENER, closed};

/// Every metric the server registers.
pub(crate) const ALL_NAMES: [&str; 26] = [
    CONNECTIONS_ACCEPTED,
    CONNECTIONS_REJECTED,
    CONNECTIONS_CLOSED,
    CONNECTIONS_ACTIVE,
    CONNECTION_DURATION,
    MESSAGES_RECEIVED,
    MESSAGES_HANDLED,
    MESSAGE_SIZE,
    RESPONSE_SIZE,
    HANDLER_QUEUE,
    HANDLER_DURATION,
    RESPONSE_LATENCY,
    BYTES_RECEIVED,
    BYTES_SENT,
    JUNK_BYTES,
    FRAMES_REJECTED,
    NAKS_SENT,
    LATE_RESULTS,
    WORKERS_REPLACED,
    WORKERS_BUSY,
    SOCKET_WRITES,
    JOBS_DROPPED,
    INLINE_SLOW,
    OBSERVER_PANICS,
    BUFFERED_BYTES,
    READ_PAUSES,
];

/// Metrics that [`Recorded::assert_exactly`] leaves alone unless a test expects a value:
/// performance counters whose value depends on timing (how many replies share a write).
const TIMING_DEPENDENT: [&str; 1] = [SOCKET_WRITES];

/// The running totals of one recorder. A `DebuggingRecorder` snapshot drains what it reports
/// (counters and gauges are swapped to zero, histograms cleared), so every read adds the
/// snapshot to the totals kept here: counters and gauges are summed (the server increments
/// and decrements its gauges, except `mllp_buffered_bytes`, which it sets: for that one see
/// [`gauge_peak`](Self::gauge_peak)), histogram samples appended.
#[derive(Debug)]
pub(super) struct Recorder {
    snapshotter: Snapshotter,
    totals: Mutex<Vec<Metric>>,
    /// Per gauge name, the largest value one snapshot reported.
    peaks: Mutex<Vec<(String, f64)>>,
}

impl Recorder {
    pub(super) fn new(recorder: &DebuggingRecorder) -> Self {
        Self {
            snapshotter: recorder.snapshotter(),
            totals: Mutex::new(Vec::new()),
            peaks: Mutex::new(Vec::new()),
        }
    }

    /// The largest value gauge `name` was seen at by any read so far, this one included. For
    /// a gauge the server sets (`mllp_buffered_bytes`), the largest value it was set to at
    /// the reads: a snapshot swaps a gauge to zero, so its total is no value it had.
    pub(super) fn gauge_peak(&self, name: &str) -> f64 {
        self.read();
        let peaks = self.peaks.lock().unwrap();
        peaks
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0.0, |(_, v)| *v)
    }

    /// Every metric's total so far.
    pub(super) fn read(&self) -> Recorded {
        let mut totals = self.totals.lock().unwrap();
        for (key, unit, description, value) in self.snapshotter.snapshot().into_vec() {
            let (_, key) = key.into_parts();
            let mut listener = None;
            let mut labels = Vec::new();
            for label in key.labels() {
                if label.key() == "listener" {
                    listener = Some(label.value().to_owned());
                } else {
                    labels.push((label.key().to_owned(), label.value().to_owned()));
                }
            }
            labels.sort();
            let value = match value {
                DebugValue::Counter(n) => Value::Counter(n),
                DebugValue::Gauge(v) => {
                    let v = v.into_inner();
                    let mut peaks = self.peaks.lock().unwrap();
                    match peaks.iter_mut().find(|(n, _)| n == key.name()) {
                        Some((_, peak)) => *peak = peak.max(v),
                        None => peaks.push((key.name().to_owned(), v)),
                    }
                    Value::Gauge(v)
                }
                DebugValue::Histogram(samples) => {
                    Value::Histogram(samples.into_iter().map(|s| s.into_inner()).collect())
                }
            };
            let metric = Metric {
                name: key.name().to_owned(),
                labels,
                listener,
                has_description: description.is_some(),
                unit,
                value,
            };
            // Each registration is its own entry, so a duplicate registration stays visible.
            match totals.iter_mut().find(|m| m.same_series(&metric)) {
                Some(total) => total.value.add(metric.value),
                None => totals.push(metric),
            }
        }
        Recorded(totals.clone())
    }
}

/// One metric's value.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Value {
    Counter(u64),
    Gauge(f64),
    Histogram(Vec<f64>),
}

impl Value {
    fn is_zero(&self) -> bool {
        match self {
            Self::Counter(n) => *n == 0,
            Self::Gauge(v) => *v == 0.0,
            Self::Histogram(samples) => samples.is_empty(),
        }
    }

    fn add(&mut self, more: Self) {
        match (self, more) {
            (Self::Counter(n), Self::Counter(m)) => *n += m,
            (Self::Gauge(v), Self::Gauge(w)) => *v += w,
            (Self::Histogram(s), Self::Histogram(t)) => s.extend(t),
            (this, more) => panic!("metric changed kind: {this:?} then {more:?}"),
        }
    }
}

/// One metric series.
#[derive(Clone, Debug)]
pub(crate) struct Metric {
    pub(crate) name: String,
    /// Labels other than `listener`, sorted.
    pub(crate) labels: Vec<(String, String)>,
    /// The `listener` label, if it was there.
    pub(crate) listener: Option<String>,
    pub(crate) has_description: bool,
    pub(crate) unit: Option<::metrics::Unit>,
    pub(crate) value: Value,
}

impl Metric {
    fn same_series(&self, other: &Self) -> bool {
        self.name == other.name && self.labels == other.labels && self.listener == other.listener
    }
}

/// Every metric of a test server, as totals since `bind()`.
#[derive(Debug)]
pub(crate) struct Recorded(pub(crate) Vec<Metric>);

/// What a test expects of one metric.
#[derive(Clone, Debug)]
enum Want {
    /// A counter's exact value.
    Counter(u64),
    /// A gauge's exact value.
    Gauge(f64),
    /// A histogram's exact samples, in recording order.
    Samples(Vec<f64>),
    /// A histogram of durations: this many samples, each finite and non-negative.
    Durations(usize),
}

/// Labels other than `listener`, sorted by key.
type Labels = Vec<(String, String)>;

fn sorted_labels(labels: &[(&str, &str)]) -> Labels {
    let mut out: Labels = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    out.sort();
    out
}

/// The metrics a scenario expects to have moved; every other one must read zero. Adding to a
/// metric already expected adds up: counts are summed, samples appended in order.
#[derive(Debug, Default)]
pub(crate) struct Expected(Vec<(&'static str, Labels, Want)>);

impl Expected {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    fn add(mut self, name: &'static str, labels: &[(&str, &str)], want: Want) -> Self {
        let labels = sorted_labels(labels);
        match self
            .0
            .iter_mut()
            .find(|(n, l, _)| *n == name && *l == labels)
        {
            Some((_, _, have)) => match (have, want) {
                (Want::Counter(a), Want::Counter(b)) => *a += b,
                (Want::Gauge(a), Want::Gauge(b)) => *a += b,
                (Want::Samples(a), Want::Samples(b)) => a.extend(b),
                (Want::Durations(a), Want::Durations(b)) => *a += b,
                (have, want) => panic!("{name}: expected {have:?} and {want:?}"),
            },
            None => self.0.push((name, labels, want)),
        }
        self
    }

    pub(crate) fn counter(self, name: &'static str, labels: &[(&str, &str)], n: u64) -> Self {
        self.add(name, labels, Want::Counter(n))
    }

    pub(crate) fn gauge(self, name: &'static str, value: f64) -> Self {
        self.add(name, &[], Want::Gauge(value))
    }

    pub(crate) fn samples(self, name: &'static str, samples: &[f64]) -> Self {
        self.add(name, &[], Want::Samples(samples.to_vec()))
    }

    pub(crate) fn durations(self, name: &'static str, count: usize) -> Self {
        self.add(name, &[], Want::Durations(count))
    }

    /// The timing histograms of `n` messages the handler ran to completion: queue wait and
    /// run time, one sample each per message.
    pub(crate) fn handled_timings(self, n: usize) -> Self {
        self.durations(HANDLER_QUEUE, n)
            .durations(HANDLER_DURATION, n)
    }

    /// `n` connections accepted.
    pub(crate) fn accepted(self, n: u64) -> Self {
        self.counter(CONNECTIONS_ACCEPTED, &[], n)
    }

    /// `n` connections closed for `reason`, each with its lifetime.
    pub(crate) fn closed(self, reason: CloseReason, n: u64) -> Self {
        self.counter(CONNECTIONS_CLOSED, &closed(reason), n)
            .durations(CONNECTION_DURATION, n as usize)
    }

    /// `message` received whole (framed) and handed to the handler.
    pub(crate) fn received(self, message: &[u8]) -> Self {
        self.counter(MESSAGES_RECEIVED, &[], 1)
            .counter(BYTES_RECEIVED, &[], message.len() as u64 + 3)
            .samples(MESSAGE_SIZE, &[message.len() as f64])
    }

    /// `message` received, handled, and answered with `reply` (both unframed): one message
    /// stop, with its response size and latency.
    pub(crate) fn replied(self, message: &[u8], reply: &[u8]) -> Self {
        self.received(message)
            .counter(MESSAGES_HANDLED, &[("outcome", "reply")], 1)
            .handled_timings(1)
            .counter(BYTES_SENT, &[], reply.len() as u64 + 3)
            .samples(RESPONSE_SIZE, &[reply.len() as f64])
            .durations(RESPONSE_LATENCY, 1)
    }

    /// `message` received and answered with an AE `nak` for handler outcome `outcome`: a NAK
    /// is not a reply (no message stop, so no response size or latency). The handler's run
    /// is not included: a timed-out handler's run time is recorded only when it returns.
    pub(crate) fn naked(self, message: &[u8], nak: &[u8], outcome: &str) -> Self {
        self.received(message)
            .counter(MESSAGES_HANDLED, &[("outcome", outcome)], 1)
            .counter(NAKS_SENT, &[("code", "AE")], 1)
            .counter(BYTES_SENT, &[], nak.len() as u64 + 3)
    }
}

impl Recorded {
    #[track_caller]
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> &Value {
        let labels = sorted_labels(labels);
        let found: Vec<&Metric> = self
            .0
            .iter()
            .filter(|m| m.name == name && m.labels == labels)
            .collect();
        match found.as_slice() {
            [m] => &m.value,
            [] => panic!("metric {name}{labels:?} is not registered"),
            _ => panic!(
                "metric {name}{labels:?} is registered {} times",
                found.len()
            ),
        }
    }

    #[track_caller]
    pub(crate) fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        match self.get(name, labels) {
            Value::Counter(n) => *n,
            other => panic!("{name} is not a counter: {other:?}"),
        }
    }

    #[track_caller]
    pub(crate) fn gauge(&self, name: &str) -> f64 {
        match self.get(name, &[]) {
            Value::Gauge(v) => *v,
            other => panic!("{name} is not a gauge: {other:?}"),
        }
    }

    #[track_caller]
    pub(crate) fn histogram(&self, name: &str) -> Vec<f64> {
        match self.get(name, &[]) {
            Value::Histogram(samples) => samples.clone(),
            other => panic!("{name} is not a histogram: {other:?}"),
        }
    }

    /// Asserts that every metric is registered once per label set with `listener="t"`, that
    /// the expected ones hold exactly the expected values, and that every other one is zero
    /// (counters and gauges 0, histograms without samples), the timing-dependent ones aside.
    #[track_caller]
    pub(crate) fn assert_exactly(&self, expected: &Expected) {
        for name in ALL_NAMES {
            assert!(
                self.0.iter().any(|m| m.name == name),
                "{name} is not registered"
            );
        }
        let mut failures = Vec::new();
        for m in &self.0 {
            if m.listener.as_deref() != Some(LISTENER) {
                failures.push(format!(
                    "{}{:?}: listener label is {:?}, want {LISTENER:?}",
                    m.name, m.labels, m.listener
                ));
            }
            let duplicates = self
                .0
                .iter()
                .filter(|o| o.name == m.name && o.labels == m.labels)
                .count();
            if duplicates != 1 {
                failures.push(format!(
                    "{}{:?} registered {duplicates} times",
                    m.name, m.labels
                ));
            }
            let want = expected
                .0
                .iter()
                .find(|(name, labels, _)| *name == m.name && *labels == m.labels)
                .map(|(_, _, want)| want);
            let ok = match (want, &m.value) {
                (None, _) if TIMING_DEPENDENT.contains(&m.name.as_str()) => true,
                (None, value) => value.is_zero(),
                (Some(Want::Counter(n)), Value::Counter(v)) => n == v,
                (Some(Want::Gauge(g)), Value::Gauge(v)) => g == v,
                (Some(Want::Samples(s)), Value::Histogram(v)) => s == v,
                (Some(Want::Durations(n)), Value::Histogram(v)) => {
                    v.len() == *n && v.iter().all(|d| d.is_finite() && *d >= 0.0)
                }
                (Some(_), _) => false,
            };
            if !ok {
                failures.push(format!(
                    "{}{:?} = {:?}, want {:?}",
                    m.name,
                    m.labels,
                    m.value,
                    want.cloned().unwrap_or(Want::Counter(0))
                ));
            }
        }
        for (name, labels, _) in &expected.0 {
            if !self
                .0
                .iter()
                .any(|m| m.name == *name && m.labels == *labels)
            {
                failures.push(format!("{name}{labels:?} expected but not registered"));
            }
        }
        assert!(
            failures.is_empty(),
            "metrics differ from the expectation:\n  {}",
            failures.join("\n  ")
        );
    }
}
