//! Store and forward: each kind of downstream reply takes its action, dead letters leave the
//! lane, requeue delivers them, order holds per lane, and a restart resumes at the cursor.

use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use bytes::Bytes;
use mllp_reactor::ClientConfig;
use mllp_reactor::ack::AckCode;
use mllp_store::forward::{
    Destination, ForwardConfig, ForwardEvent, Forwarder, LaneKey, Observer, Requeue, RetryPolicy,
    requeue_sqlite, status_sqlite,
};
use mllp_store::{Record, SqliteOptions, Store, StoreConfig};
use mllp_test_support::downstream::{Answer, Downstream, RefusingPort, Script};

use crate::util::{TempDir, WAIT, origin};

/// Fast retries, so that the tests take milliseconds per retry.
fn fast(name: &str, downstream: &Downstream) -> Destination {
    Destination::new(name, downstream.addr.to_string())
        .client(
            ClientConfig::default()
                .connect_timeout(Duration::from_secs(2))
                .response_timeout(Duration::from_millis(300)),
        )
        .policy(
            RetryPolicy::default()
                .backoff(Duration::from_millis(5), Duration::from_millis(40))
                .max_attempts(3),
        )
}

fn msg(id: &str, patient: &str) -> Bytes {
    Bytes::from(format!(
        "MSH|^~\\&|LAB|HOSP|EHR|HOSP|20260101120000||ADT^A01|{id}|P|2.5.1\rPID|1||{patient}^^^H^MR\r"
    ))
}

/// A store with a forwarder on it; stores messages and waits for their commits.
struct Rig {
    dir: TempDir,
    store: Store,
    forwarder: Option<Forwarder>,
    events: mpsc::Receiver<String>,
}

impl Rig {
    fn new(name: &str, destinations: Vec<Destination>) -> Self {
        let dir = TempDir::new(name);
        let store = Store::open_sqlite(
            dir.join("store.db"),
            &SqliteOptions::default(),
            StoreConfig::default(),
        )
        .unwrap();
        let (tx, events) = mpsc::channel();
        let mut rig = Self {
            dir,
            store,
            forwarder: None,
            events,
        };
        rig.start(destinations, tx);
        rig
    }

    fn start(&mut self, destinations: Vec<Destination>, tx: mpsc::Sender<String>) {
        let tx = std::sync::Mutex::new(tx);
        let observer: Observer = Arc::new(move |e: &ForwardEvent<'_>| {
            let line = match e {
                ForwardEvent::State { state, .. } => format!("state {}", state.as_str()),
                ForwardEvent::DeadLetter { message_id, .. } => format!("dead {message_id}"),
                other => format!("{other:?}"),
            };
            let _ = tx.lock().unwrap().send(line);
        });
        let config = ForwardConfig::default().poll_interval(Duration::from_millis(10));
        self.forwarder = Some(
            Forwarder::start_sqlite(self.path(), destinations, config, Some(observer)).unwrap(),
        );
    }

    fn path(&self) -> std::path::PathBuf {
        self.dir.join("store.db")
    }

    /// Stores the messages, in this order, and waits for their commits.
    fn store(&self, messages: &[Bytes]) {
        let (tx, rx) = mpsc::channel();
        for (i, m) in messages.iter().enumerate() {
            let tx = tx.clone();
            self.store
                .submit(
                    Record::new(m.clone(), origin(1, i as u64)),
                    Box::new(move |r| {
                        let _ = tx.send(r);
                    }),
                )
                .unwrap();
        }
        for _ in messages {
            rx.recv_timeout(WAIT).unwrap().unwrap();
        }
    }

    fn stop(&mut self) {
        if let Some(f) = self.forwarder.take() {
            assert!(f.stop(WAIT), "lanes did not stop");
        }
    }
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

fn script(f: impl Fn(&str, usize) -> Answer + Send + Sync + 'static) -> Script {
    Arc::new(f)
}

#[test]
fn delivers_every_message_in_store_order_and_moves_the_cursor() {
    let ds = Downstream::start(script(|_, _| Answer::Ack(AckCode::AA)));
    let rig = Rig::new("fifo", vec![fast("ds", &ds)]);
    let want = ids("M", 50);
    rig.store(&want.iter().map(|i| msg(i, "P1")).collect::<Vec<_>>());
    let got = ds.wait_until("50 messages", |log| log.len() >= 50);
    assert_eq!(got, want);
    // The cursor reaches the last id soon after the last ACK.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let status = status_sqlite(rig.path()).unwrap();
        assert_eq!(status.len(), 1);
        if status[0].delivered_through == 50 {
            assert_eq!(status[0].after_cursor, 0);
            assert_eq!(status[0].dead_letters, 0);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{status:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn ae_is_retried_up_to_max_attempts_then_dead_lettered_without_blocking_the_lane() {
    let ds = Downstream::start(script(|id, _| {
        if id == "BAD" {
            Answer::Ack(AckCode::AE)
        } else {
            Answer::Ack(AckCode::AA)
        }
    }));
    let mut rig = Rig::new("ae", vec![fast("ds", &ds)]);
    rig.store(&[msg("A", "P"), msg("BAD", "P"), msg("B", "P")]);
    let got = ds.wait_until("B", |log| log.contains(&"B".to_owned()));
    assert_eq!(
        got,
        ["A", "BAD", "BAD", "BAD", "B"],
        "3 attempts, then the lane goes on"
    );
    let status = status_sqlite(rig.path()).unwrap();
    assert_eq!(status[0].dead_letters, 1);
    assert!(status[0].last_error.as_deref().unwrap().starts_with("AE"));
    assert!(rig.events.iter().any(|e| e == "dead 2"));
    rig.stop();
}

#[test]
fn ar_is_dead_lettered_at_once_and_requeue_delivers_it() {
    let reject = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let flag = Arc::clone(&reject);
    let ds = Downstream::start(script(move |id, _| {
        if id == "NO" && flag.load(std::sync::atomic::Ordering::SeqCst) {
            Answer::Ack(AckCode::AR)
        } else {
            Answer::Ack(AckCode::AA)
        }
    }));
    let rig = Rig::new("ar", vec![fast("ds", &ds)]);
    rig.store(&[msg("NO", "P"), msg("YES", "P")]);
    assert_eq!(
        ds.wait_until("YES", |log| log.contains(&"YES".to_owned())),
        ["NO", "YES"]
    );
    assert_eq!(status_sqlite(rig.path()).unwrap()[0].dead_letters, 1);
    // An id that is not a dead letter is skipped.
    assert_eq!(
        requeue_sqlite(rig.path(), &Requeue::Ids(vec![2, 99]), None).unwrap(),
        0
    );
    reject.store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        requeue_sqlite(rig.path(), &Requeue::AllDead, Some("ds")).unwrap(),
        1
    );
    ds.wait_count("NO", 2);
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let s = &status_sqlite(rig.path()).unwrap()[0];
        if s.dead_letters == 0 && s.requeued == 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{s:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(ds.received(), ["NO", "YES", "NO"]);
}

#[test]
fn garbage_wrong_msa2_slow_ack_and_close_are_retried_until_accepted() {
    let ds = Downstream::start(script(|id, seen| match (id, seen) {
        ("G", 0) => Answer::Garbage,
        ("W", 0) => Answer::WrongId,
        ("S", 0) => Answer::Slow(Duration::from_millis(800)),
        ("C", 0 | 1) => Answer::Close,
        _ => Answer::Ack(AckCode::AA),
    }));
    let rig = Rig::new("transport", vec![fast("ds", &ds)]);
    rig.store(&[
        msg("G", "P"),
        msg("W", "P"),
        msg("S", "P"),
        msg("C", "P"),
        msg("Z", "P"),
    ]);
    let got = ds.wait_until("Z", |log| log.contains(&"Z".to_owned()));
    assert_eq!(got, ["G", "G", "W", "W", "S", "S", "C", "C", "C", "Z"]);
    assert_eq!(status_sqlite(rig.path()).unwrap()[0].dead_letters, 0);
}

#[test]
fn a_down_destination_is_retried_forever_and_drains_in_order_when_back() {
    // Held bound, not listening: refused until the downstream starts there, and no other
    // test's server can be given the port meanwhile.
    let reserved = RefusingPort::new();
    let addr = reserved.addr;
    let dest = Destination::new("ds", addr.to_string())
        .client(ClientConfig::default().connect_timeout(Duration::from_millis(500)))
        .policy(
            RetryPolicy::default().backoff(Duration::from_millis(5), Duration::from_millis(20)),
        );
    let rig = Rig::new("down", vec![dest]);
    let want = ids("D", 20);
    rig.store(&want.iter().map(|i| msg(i, "P")).collect::<Vec<_>>());
    // Refused for a while: the destination is reported down, nothing is dead-lettered.
    let first = rig.events.recv_timeout(WAIT).unwrap();
    assert_eq!(first, "state down");
    let s = &status_sqlite(rig.path()).unwrap()[0];
    assert_eq!(
        (s.delivered_through, s.after_cursor, s.dead_letters),
        (0, 20, 0)
    );
    assert!(
        s.last_error.as_deref().unwrap().starts_with("refused"),
        "{s:?}"
    );
    let ds = Downstream::start_on(reserved.listen(), script(|_, _| Answer::Ack(AckCode::AA)));
    assert_eq!(ds.wait_until("all", |log| log.len() >= 20), want);
    assert_eq!(rig.events.recv_timeout(WAIT).unwrap(), "state up");
}

#[test]
fn a_restart_resumes_after_the_cursor_without_gaps() {
    let ds = Downstream::start(script(|_, _| Answer::Ack(AckCode::AA)));
    let mut rig = Rig::new("restart", vec![fast("ds", &ds)]);
    let first = ids("R", 10);
    rig.store(&first.iter().map(|i| msg(i, "P")).collect::<Vec<_>>());
    ds.wait_until("first 10", |log| log.len() >= 10);
    rig.stop();
    let second = ids("S", 10);
    rig.store(&second.iter().map(|i| msg(i, "P")).collect::<Vec<_>>());
    let (tx, _rx) = mpsc::channel();
    rig.start(vec![fast("ds", &ds)], tx);
    let got = ds.wait_until("all 20", |log| log.len() >= 20);
    let want: Vec<String> = first.into_iter().chain(second).collect();
    assert_eq!(got, want);
}

#[test]
fn lanes_keep_order_per_key_and_an_erroring_lane_does_not_hold_the_others() {
    // Patient P0's messages get AE twice each; the other patients' go straight through.
    let ds = Downstream::start(script(|id, seen| {
        if id.starts_with("P0-") && seen < 2 {
            Answer::Ack(AckCode::AE)
        } else {
            Answer::Ack(AckCode::AA)
        }
    }));
    let dest = fast("ds", &ds).lanes(4).key(LaneKey::Pid3);
    let rig = Rig::new("lanes", vec![dest]);
    let mut messages = Vec::new();
    for n in 0..10 {
        for p in 0..6 {
            messages.push(msg(&format!("P{p}-{n}"), &format!("P{p}")));
        }
    }
    rig.store(&messages);
    let got = ds.wait_until("all delivered", |log| {
        let unique: std::collections::HashSet<_> = log.iter().collect();
        unique.len() >= 60
    });
    for p in 0..6 {
        let mine: Vec<&String> = got
            .iter()
            .filter(|id| id.starts_with(&format!("P{p}-")))
            .collect();
        let mut dedup = mine.clone();
        dedup.dedup();
        let want: Vec<String> = (0..10).map(|n| format!("P{p}-{n}")).collect();
        assert_eq!(
            dedup,
            want.iter().collect::<Vec<_>>(),
            "patient P{p} out of order"
        );
    }
    // Some other patient's last message arrived before P0's last: lanes run in parallel.
    let p0_last = got.iter().position(|id| id == "P0-9").unwrap();
    let any_other_done_first = (1..6)
        .filter(|p| {
            LaneKey::Pid3.lane(&msg("x", &format!("P{p}")), 4)
                != LaneKey::Pid3.lane(&msg("x", "P0"), 4)
        })
        .any(|p| got.iter().position(|id| *id == format!("P{p}-9")).unwrap() < p0_last);
    assert!(any_other_done_first, "{got:?}");
    // Every lane's cursor ends at (or past its own) last message; four rows.
    let status = status_sqlite(rig.path()).unwrap();
    assert_eq!(status.len(), 4);
    assert!(status.iter().all(|s| s.dead_letters == 0));
}

#[test]
fn configuration_errors_are_typed() {
    let dir = TempDir::new("config");
    let path = dir.join("store.db");
    drop(Store::open_sqlite(&path, &SqliteOptions::default(), StoreConfig::default()).unwrap());
    let start = |d: Vec<Destination>| {
        Forwarder::start_sqlite(&path, d, ForwardConfig::default(), None).map(drop)
    };
    assert!(matches!(
        start(vec![]),
        Err(mllp_store::forward::ForwardError::NoDestinations)
    ));
    assert!(matches!(
        start(vec![Destination::new("a b", "x:1")]),
        Err(mllp_store::forward::ForwardError::InvalidName(_))
    ));
    assert!(matches!(
        start(vec![
            Destination::new("a", "x:1"),
            Destination::new("a", "y:1")
        ]),
        Err(mllp_store::forward::ForwardError::DuplicateName(_))
    ));
    assert!(matches!(
        start(vec![Destination::new("a", "x:1").lanes(0)]),
        Err(mllp_store::forward::ForwardError::Lanes { .. })
    ));
    let missing = Forwarder::start_sqlite(
        dir.join("nope.db"),
        vec![Destination::new("a", "x:1")],
        ForwardConfig::default(),
        None,
    );
    assert!(missing.is_err());
}

/// A server whose handler is [`ack_after_forwarded`] over a fresh store and forwarder.
struct AfterRig {
    _dir: TempDir,
    server: Option<mllp_reactor::ServerHandle>,
    forwarder: Option<Forwarder>,
}

impl AfterRig {
    fn new(name: &str, destination: Destination, timeout: Duration) -> Self {
        let dir = TempDir::new(name);
        let store = Arc::new(
            Store::open_sqlite(
                dir.join("store.db"),
                &SqliteOptions::default(),
                StoreConfig::default(),
            )
            .unwrap(),
        );
        let config = ForwardConfig::default().poll_interval(Duration::from_millis(5));
        let forwarder =
            Forwarder::start_sqlite(dir.join("store.db"), vec![destination], config, None).unwrap();
        let handler = mllp_store::forward::ack_after_forwarded(store, forwarder.watcher(), timeout);
        let server = mllp_reactor::Server::builder(handler)
            .bind("127.0.0.1:0")
            .unwrap()
            .spawn()
            .unwrap();
        Self {
            _dir: dir,
            server: Some(server),
            forwarder: Some(forwarder),
        }
    }

    fn client(&self) -> mllp_reactor::Client {
        let addr = self.server.as_ref().unwrap().local_addr();
        mllp_reactor::Client::connect(addr, ClientConfig::default().response_timeout(WAIT)).unwrap()
    }
}

impl Drop for AfterRig {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            let _ = server.shutdown(Duration::from_secs(5));
        }
        if let Some(f) = self.forwarder.take() {
            f.stop(Duration::from_secs(5));
        }
    }
}

#[test]
fn ack_after_forwarded_passes_on_the_downstream_answer() {
    let ds = Downstream::start(script(|id, _| match id {
        "NO" => Answer::Ack(AckCode::AE),
        "REJ" => Answer::Ack(AckCode::AR),
        _ => Answer::Ack(AckCode::AA),
    }));
    let rig = AfterRig::new("after", fast("ds", &ds), WAIT);
    let mut client = rig.client();
    let ack = client.send(&msg("YES", "P")).unwrap();
    assert_eq!(ack.code, AckCode::AA);
    // The AA came after the downstream had it.
    assert!(ds.received().contains(&"YES".to_owned()));
    let ack = client.send(&msg("NO", "P")).unwrap();
    assert_eq!(ack.code, AckCode::AE, "{ack:?}");
    let text = ack.text.unwrap();
    assert!(text.contains("destination ds answered AE"), "{text}");
    let ack = client.send(&msg("REJ", "P")).unwrap();
    assert_eq!(ack.code, AckCode::AE, "{ack:?}");
}

#[test]
fn ack_after_forwarded_times_out_with_ae_and_the_message_stays_queued() {
    let reserved = RefusingPort::new();
    let addr = reserved.addr;
    let dest = Destination::new("ds", addr.to_string())
        .client(ClientConfig::default().connect_timeout(Duration::from_millis(200)))
        .policy(
            RetryPolicy::default().backoff(Duration::from_millis(5), Duration::from_millis(20)),
        );
    let rig = AfterRig::new("after-timeout", dest, Duration::from_millis(300));
    let ack = rig.client().send(&msg("LATE", "P")).unwrap();
    assert_eq!(ack.code, AckCode::AE, "{ack:?}");
    let text = ack.text.unwrap();
    assert!(text.contains("not forwarded within 0.3s"), "{text}");
    let ds = Downstream::start_on(reserved.listen(), script(|_, _| Answer::Ack(AckCode::AA)));
    ds.wait_count("LATE", 1);
}
