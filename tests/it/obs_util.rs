//! Helpers for the metrics and observer tests: a bounded MLLP client, an observer that
//! forwards owned copies of its events into a channel, and a reader that checks one
//! `DebuggingRecorder` snapshot metric by metric.
//!
//! Every network wait is bounded by [`WAIT`]; every channel wait too. Nothing here sleeps.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, SystemTime};

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use mllp_reactor::ack::{self, AckCode};
use mllp_reactor::telemetry::names;
use mllp_reactor::{
    Builder, CloseReason, ConnectionId, ConnectionStart, ConnectionStop, ExceptionReason,
    MessageException, MessageStart, MessageStop, Observer, ServerHandle, ShutdownReport,
};

/// Bound on every blocking read and channel receive: generous for a loaded 2-core machine.
pub(crate) const WAIT: Duration = Duration::from_secs(5);

/// Grace period for shutdowns in tests where nothing is in flight.
pub(crate) const GRACE: Duration = Duration::from_secs(2);

/// The `listener` label every test server gets.
pub(crate) const LISTENER: &str = "t";

/// A small ORU^R01 payload (unframed) whose MSH-10 is `control_id`.
pub(crate) fn message(control_id: &str) -> Vec<u8> {
    format!(
        "MSH|^~\\&|LAB|HOSP|EHR|HOSP|20260101120000||ORU^R01|{control_id}|P|2.5.1\r\
         PID|1||12345^^^HOSP||DOE^JANE\r"
    )
    .into_bytes()
}

/// `0x0B` payload `0x1C 0x0D`.
pub(crate) fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 3);
    out.push(0x0B);
    out.extend_from_slice(payload);
    out.extend_from_slice(&[0x1C, 0x0D]);
    out
}

/// MSA-1 and MSA-2 of an acknowledgment payload.
#[track_caller]
pub(crate) fn ack_of(payload: &[u8]) -> (AckCode, String) {
    let parsed = ack::parse(payload).expect("the server's reply parses as an ACK");
    (
        parsed.code,
        String::from_utf8_lossy(parsed.control_id).into_owned(),
    )
}

/// A blocking loopback client whose every read and write times out after [`WAIT`].
#[derive(Debug)]
pub(crate) struct Client {
    stream: TcpStream,
    /// Bytes read past the last frame returned.
    buf: Vec<u8>,
}

impl Client {
    #[track_caller]
    pub(crate) fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).expect("connect to the test server");
        stream.set_read_timeout(Some(WAIT)).expect("read timeout");
        stream.set_write_timeout(Some(WAIT)).expect("write timeout");
        Self {
            stream,
            buf: Vec::new(),
        }
    }

    /// The client's own address: the peer address the server reports.
    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.stream.local_addr().expect("client local address")
    }

    #[track_caller]
    pub(crate) fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write to the server");
    }

    /// Reads one frame and returns its payload (unframed).
    #[track_caller]
    pub(crate) fn read_frame(&mut self) -> Vec<u8> {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == [0x1C, 0x0D]) {
                assert_eq!(self.buf[0], 0x0B, "the server sent bytes outside a frame");
                let payload = self.buf[1..end].to_vec();
                self.buf.drain(..end + 2);
                return payload;
            }
            let n = self.read_some();
            assert!(n > 0, "the server closed before a complete frame");
        }
    }

    /// Reads until the server closes; returns every byte not yet returned as a frame.
    #[track_caller]
    pub(crate) fn read_to_eof(&mut self) -> Vec<u8> {
        while self.read_some() > 0 {}
        std::mem::take(&mut self.buf)
    }

    /// Half-closes (the server sees EOF), then reads until the server closes. Asserts the
    /// server sent nothing more.
    #[track_caller]
    pub(crate) fn finish(mut self) {
        self.stream
            .shutdown(Shutdown::Write)
            .expect("half-close the client");
        let rest = self.read_to_eof();
        assert!(rest.is_empty(), "unexpected bytes before EOF: {rest:?}");
    }

    /// Waits (bounded) until at least one byte from the server is in the socket's receive
    /// buffer, without consuming it.
    #[track_caller]
    pub(crate) fn wait_readable(&self) {
        let mut byte = [0u8; 1];
        let n = self.stream.peek(&mut byte).expect("peek timed out");
        assert_eq!(n, 1, "the server closed instead of replying");
    }

    /// The socket, for tests that need to drop it in a particular state.
    pub(crate) fn into_stream(self) -> TcpStream {
        self.stream
    }

    #[track_caller]
    fn read_some(&mut self) -> usize {
        let mut chunk = [0u8; 64 * 1024];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return n;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => panic!("read from the server failed (timeout is {WAIT:?}): {e}"),
            }
        }
    }
}

/// An owned copy of a [`MessageException`].
#[derive(Clone, Debug)]
pub(crate) struct Exception {
    pub(crate) connection: ConnectionId,
    pub(crate) peer: SocketAddr,
    pub(crate) local: SocketAddr,
    pub(crate) sequence: Option<u64>,
    pub(crate) duration: Duration,
    pub(crate) message_size: usize,
    pub(crate) reason: ExceptionReason,
    pub(crate) detail: Option<String>,
}

/// One observer call, owned.
#[derive(Clone, Debug)]
pub(crate) enum Event {
    ConnectionStart(ConnectionStart),
    ConnectionStop(ConnectionStop),
    MessageStart(MessageStart),
    MessageStop(MessageStop),
    MessageException(Exception),
}

/// Forwards every event into a channel (the observer runs on the reactor thread and must not
/// block: an unbounded send never does).
#[derive(Debug)]
pub(crate) struct Forward(Sender<Event>);

impl Observer for Forward {
    fn connection_start(&self, e: &ConnectionStart) {
        let _ = self.0.send(Event::ConnectionStart(e.clone()));
    }
    fn connection_stop(&self, e: &ConnectionStop) {
        let _ = self.0.send(Event::ConnectionStop(e.clone()));
    }
    fn message_start(&self, e: &MessageStart) {
        let _ = self.0.send(Event::MessageStart(e.clone()));
    }
    fn message_stop(&self, e: &MessageStop) {
        let _ = self.0.send(Event::MessageStop(e.clone()));
    }
    fn message_exception(&self, e: &MessageException<'_>) {
        let _ = self.0.send(Event::MessageException(Exception {
            connection: e.connection,
            peer: e.peer,
            local: e.local,
            sequence: e.sequence,
            duration: e.duration,
            message_size: e.message_size,
            reason: e.reason,
            detail: e.detail.map(str::to_owned),
        }));
    }
}

/// The receiving end of a [`Forward`] observer.
#[derive(Debug)]
pub(crate) struct Events(Receiver<Event>);

pub(crate) fn observer() -> (Forward, Events) {
    let (tx, rx) = mpsc::channel();
    (Forward(tx), Events(rx))
}

macro_rules! expect_event {
    ($name:ident, $variant:ident, $ty:ty) => {
        #[track_caller]
        pub(crate) fn $name(&self) -> $ty {
            match self.next() {
                Event::$variant(e) => e,
                other => panic!(
                    concat!("expected ", stringify!($variant), ", got {:?}"),
                    other
                ),
            }
        }
    };
}

impl Events {
    /// The next event, waiting at most [`WAIT`].
    #[track_caller]
    pub(crate) fn next(&self) -> Event {
        match self.0.recv_timeout(WAIT) {
            Ok(event) => event,
            Err(RecvTimeoutError::Timeout) => panic!("no observer event within {WAIT:?}"),
            Err(RecvTimeoutError::Disconnected) => panic!("the server stopped; no more events"),
        }
    }

    expect_event!(connection_start, ConnectionStart, ConnectionStart);
    expect_event!(connection_stop, ConnectionStop, ConnectionStop);
    expect_event!(message_start, MessageStart, MessageStart);
    expect_event!(message_stop, MessageStop, MessageStop);
    expect_event!(message_exception, MessageException, Exception);

    /// Events already delivered and not yet taken. After `ServerHandle::shutdown` returned,
    /// the reactor thread is gone, so this is everything it will ever report.
    pub(crate) fn rest(&self) -> Vec<Event> {
        self.0.try_iter().collect()
    }

    /// Asserts that no event is left (call after shutdown).
    #[track_caller]
    pub(crate) fn assert_drained(&self) {
        let rest = self.rest();
        assert!(rest.is_empty(), "unexpected extra events: {rest:#?}");
    }
}

/// A running test server with an observer and, for the metrics tests, a recorder that
/// captured its handles at `bind()`.
#[derive(Debug)]
pub(crate) struct TestServer {
    pub(crate) addr: SocketAddr,
    pub(crate) events: Events,
    pub(crate) recorder: DebuggingRecorder,
    handle: ServerHandle,
}

impl TestServer {
    /// Binds on loopback port 0 inside `with_local_recorder` (so every handle lands in this
    /// test's recorder, whatever thread later updates it) and spawns the server.
    #[track_caller]
    pub(crate) fn start(builder: Builder) -> Self {
        let recorder = DebuggingRecorder::new();
        let (forward, events) = observer();
        let server = ::metrics::with_local_recorder(&recorder, || {
            crate::util::with_test_reactors(builder)
                .listener_name(LISTENER)
                .observer(forward)
                .bind("127.0.0.1:0")
        })
        .expect("bind the test server");
        let handle = server.spawn().expect("spawn the test server");
        Self {
            addr: handle.local_addr(),
            events,
            recorder,
            handle,
        }
    }

    #[track_caller]
    pub(crate) fn connect(&self) -> Client {
        Client::connect(self.addr)
    }

    /// Shuts down (returns after the drain) and takes the one snapshot of the metrics.
    #[track_caller]
    pub(crate) fn stop(self, grace: Duration) -> Stopped {
        let report = self.handle.shutdown(grace).expect("graceful shutdown");
        let metrics = Recorded::take(&self.recorder);
        Stopped {
            report,
            metrics,
            events: self.events,
        }
    }
}

/// What a stopped server left behind.
#[derive(Debug)]
pub(crate) struct Stopped {
    pub(crate) report: ShutdownReport,
    pub(crate) metrics: Recorded,
    pub(crate) events: Events,
}

/// Every metric the server registers.
pub(crate) const ALL_NAMES: [&str; 20] = [
    names::CONNECTIONS_ACCEPTED,
    names::CONNECTIONS_REJECTED,
    names::CONNECTIONS_CLOSED,
    names::CONNECTIONS_ACTIVE,
    names::CONNECTION_DURATION,
    names::MESSAGES_RECEIVED,
    names::MESSAGES_HANDLED,
    names::MESSAGE_SIZE,
    names::RESPONSE_SIZE,
    names::HANDLER_QUEUE,
    names::HANDLER_DURATION,
    names::RESPONSE_LATENCY,
    names::BYTES_RECEIVED,
    names::BYTES_SENT,
    names::JUNK_BYTES,
    names::FRAMES_REJECTED,
    names::NAKS_SENT,
    names::LATE_RESULTS,
    names::WORKERS_REPLACED,
    names::WORKERS_BUSY,
];

/// One metric's value in a snapshot.
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
}

/// One metric of a snapshot.
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

/// One snapshot of a `DebuggingRecorder`. Taking it drains the recorder (counters and gauges
/// are swapped to zero, histograms cleared), so a test takes exactly one, after shutdown.
#[derive(Debug)]
pub(crate) struct Recorded(pub(crate) Vec<Metric>);

/// What a test expects of one metric.
#[derive(Clone, Debug)]
pub(crate) enum Want {
    /// A counter's exact value.
    Counter(u64),
    /// A gauge's exact value.
    Gauge(f64),
    /// A histogram's exact samples, in recording order.
    Samples(Vec<f64>),
    /// A histogram of durations: this many samples, each finite and non-negative.
    Durations(usize),
}

/// The metrics a scenario expects to have moved; every other one must read zero.
#[derive(Debug, Default)]
pub(crate) struct Expected(Vec<(&'static str, Labels, Want)>);

/// Labels other than `listener`, sorted by key.
type Labels = Vec<(String, String)>;

fn sorted_labels(labels: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    out.sort();
    out
}

impl Expected {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    pub(crate) fn counter(mut self, name: &'static str, labels: &[(&str, &str)], n: u64) -> Self {
        self.0.push((name, sorted_labels(labels), Want::Counter(n)));
        self
    }

    pub(crate) fn gauge(mut self, name: &'static str, value: f64) -> Self {
        self.0.push((name, Vec::new(), Want::Gauge(value)));
        self
    }

    pub(crate) fn samples(mut self, name: &'static str, samples: &[f64]) -> Self {
        self.0
            .push((name, Vec::new(), Want::Samples(samples.to_vec())));
        self
    }

    pub(crate) fn durations(mut self, name: &'static str, count: usize) -> Self {
        self.0.push((name, Vec::new(), Want::Durations(count)));
        self
    }

    /// The timing histograms of `n` messages the handler ran to completion: queue wait and
    /// run time, one sample each per message.
    pub(crate) fn handled_timings(self, n: usize) -> Self {
        self.durations(names::HANDLER_QUEUE, n)
            .durations(names::HANDLER_DURATION, n)
    }
}

impl Recorded {
    pub(crate) fn take(recorder: &DebuggingRecorder) -> Self {
        let metrics = recorder
            .snapshotter()
            .snapshot()
            .into_vec()
            .into_iter()
            .map(|(key, unit, description, value)| {
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
                    DebugValue::Gauge(v) => Value::Gauge(v.into_inner()),
                    DebugValue::Histogram(samples) => {
                        Value::Histogram(samples.into_iter().map(|s| s.into_inner()).collect())
                    }
                };
                Metric {
                    name: key.name().to_owned(),
                    labels,
                    listener,
                    has_description: description.is_some(),
                    unit,
                    value,
                }
            })
            .collect();
        Self(metrics)
    }

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
    /// (counters and gauges 0, histograms without samples).
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
                // A performance counter: how many replies share a write depends on timing.
                (None, _) if m.name == names::SOCKET_WRITES => true,
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

/// Seconds as `f64`, for comparing with duration histograms.
pub(crate) fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Asserts a wall-clock time is within a few seconds of now (not a tight bound: it only
/// proves the field was filled in with the current time).
#[track_caller]
pub(crate) fn assert_recent(t: SystemTime) {
    let now = SystemTime::now();
    let diff = now.duration_since(t).unwrap_or_else(|e| e.duration());
    assert!(
        diff < Duration::from_secs(60),
        "system_time {t:?} is not near now {now:?}"
    );
}

/// A close reason's label value, for `connections_closed_total`.
pub(crate) fn closed(reason: CloseReason) -> [(&'static str, &'static str); 1] {
    [("reason", reason.as_str())]
}
