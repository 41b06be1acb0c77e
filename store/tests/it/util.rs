//! Helpers shared by the store tests: temporary directories, records, bounded waits, and a
//! gated backend that holds the writer inside a commit until the test lets it go.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use mllp_store::fault::{FaultSwitch, FaultyBackend};
use mllp_store::{Backend, Origin, Record, SqliteOptions, StoreError, StoreOutcome, StoredRecord};

/// Upper bound for every wait on the writer: far above what a passing test needs.
pub(crate) const WAIT: Duration = Duration::from_secs(20);

pub(crate) use mllp_test_support::TempDir;

/// A v2.5 message from `app`/`facility` with MSH-10 `control_id`.
pub(crate) fn message_from(app: &str, facility: &str, control_id: &str) -> Bytes {
    Bytes::from(format!(
        "MSH|^~\\&|{app}|{facility}|EHR|HOSP|20260101120000||ADT^A01^ADT_A01|{control_id}|P|2.5.1\r\
         PID|1||PATID1234^^^HOSP^MR||EVERYMAN^ADAM\r"
    ))
}

pub(crate) fn message(control_id: &str) -> Bytes {
    message_from("LAB", "HOSP", control_id)
}

pub(crate) fn origin(connection_id: u64, sequence: u64) -> Origin {
    Origin {
        received_at: SystemTime::now(),
        peer: SocketAddr::from(([10, 0, 0, 7], 40_000 + connection_id as u16)),
        local: "[::1]:2575".parse().unwrap(),
        connection_id,
        sequence,
    }
}

pub(crate) fn record(control_id: &str) -> Record {
    Record::new(message(control_id), origin(1, 0))
}

/// What a store callback receives.
pub(crate) type Outcome = Result<StoreOutcome, StoreError>;

/// A callback that sends the result on a channel, and the receiving end.
pub(crate) fn channel() -> (Sender<Outcome>, Receiver<Outcome>) {
    mpsc::channel()
}

pub(crate) fn done(tx: &Sender<Outcome>) -> mllp_store::Done {
    let tx = tx.clone();
    Box::new(move |r| {
        let _ = tx.send(r);
    })
}

#[track_caller]
pub(crate) fn recv(
    rx: &Receiver<Result<StoreOutcome, StoreError>>,
) -> Result<StoreOutcome, StoreError> {
    rx.recv_timeout(WAIT).expect("no completion within WAIT")
}

/// Every record in the store at `path`, read through a read-only connection.
#[track_caller]
pub(crate) fn read_all(path: &Path) -> Vec<StoredRecord> {
    let backend = mllp_store::SqliteBackend::open_read_only(path, &SqliteOptions::default())
        .expect("open read-only");
    mllp_store::export::Export::new(backend, 0)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// A backend that holds every commit until the test sends on [`Gate::release`] (or drops it),
/// after reporting the batch size on [`Gate::entered`].
pub(crate) type GatedBackend<B> = FaultyBackend<B>;

/// The test's ends of a [`GatedBackend`].
pub(crate) struct Gate {
    pub(crate) entered: Receiver<usize>,
    pub(crate) release: Sender<()>,
}

impl Gate {
    /// Waits until the writer is inside a commit; returns that batch's size.
    #[track_caller]
    pub(crate) fn wait_entered(&self) -> usize {
        self.entered
            .recv_timeout(WAIT)
            .expect("writer did not start a commit")
    }

    pub(crate) fn open_one(&self) {
        let _ = self.release.send(());
    }
}

pub(crate) fn gated<B: Backend>(inner: B) -> (GatedBackend<B>, Gate) {
    let (entered_tx, entered_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let backend = FaultyBackend::new(inner, FaultSwitch::new()).before_commit(move |n| {
        let _ = entered_tx.send(n);
        // Bounded: a failing test must not leave the writer blocked forever.
        let _ = release_rx.recv_timeout(WAIT);
    });
    (
        backend,
        Gate {
            entered: entered_rx,
            release: release_tx,
        },
    )
}

/// Commits a record with a client certificate to `backend`, whose one row is from before the
/// `client_cert` column, and checks both read back: NULL for the old row, the certificate's
/// one-line form for the new. Returns the certificate's identity.
pub(crate) fn commit_with_client_cert_after_an_old_row(
    backend: &mut impl Backend,
) -> std::sync::Arc<mllp_reactor::PeerIdentity> {
    let client = std::sync::Arc::new(mllp_reactor::PeerIdentity::from_der(b"a client"));
    let with_cert = Record {
        client_cert: Some(std::sync::Arc::clone(&client)),
        ..record("CERT1")
    };
    backend.commit_batch(&[with_cert]).unwrap();
    let all = backend.read_after(0, i64::MAX, 10, usize::MAX).unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].client_cert, None);
    assert_eq!(
        all[1].client_cert.as_deref(),
        Some(client.to_string().as_str())
    );
    client
}

/// The search latency benchmarks' measurement (BENCHMARKS.md, SQLite and PostgreSQL): 50
/// searches spread over the `rows` ids from `first`, each of which must find something;
/// returns the median and the slowest, in milliseconds.
pub(crate) fn time_searches(rows: u64, first: u64, search: impl Fn(u64) -> bool) -> (f64, f64) {
    let mut times: Vec<Duration> = (0..50u64)
        .map(|k| {
            let i = first + (k * 7_919_993) % rows;
            let start = Instant::now();
            let found = search(i);
            let took = start.elapsed();
            assert!(found, "the search for {i} found nothing");
            took
        })
        .collect();
    times.sort();
    (times[25].as_secs_f64() * 1e3, times[49].as_secs_f64() * 1e3)
}
