//! Readiness and durability of a PostgreSQL store seen from outside: `/readyz`'s decision
//! turns to "not ready" when the database goes away, even with no traffic, and back when it
//! returns; and an AA leaves only after the server answered the batch's `COMMIT` (issue 21,
//! item 4).

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use mllp_reactor::{Dispatch, Server};
use mllp_store::readiness::{NotReady, ready};
use mllp_store::{Health, Store, StoreConfig, StoreThenAck};

use super::{cluster::PgCluster, options};
use crate::util::{WAIT, message};

/// The next health the store reports, within `WAIT`.
fn next(changes: &mpsc::Receiver<Health>) -> Health {
    changes
        .recv_timeout(WAIT)
        .expect("a health change within WAIT")
}

#[test]
fn readiness_follows_the_database_connection_without_traffic() {
    let Some(pg) = PgCluster::start() else { return };
    let url = pg.create_db("ready");
    let store = Store::open_postgres(&url, &options(), StoreConfig::default()).unwrap();
    let (tx, changes) = mpsc::channel();
    store.on_health_change(move |health, _| {
        let _ = tx.send(health);
    });
    assert!(ready(false, Some(&store), None).is_ok());

    // Nothing is sent: the idle writer's probe finds the database gone.
    pg.stop();
    assert_eq!(next(&changes), Health::Disconnected);
    let why = ready(false, Some(&store), None).unwrap_err();
    assert!(
        matches!(why, NotReady::Store(Health::Disconnected)),
        "{why}"
    );
    assert_eq!(why.as_str(), "store");
    assert!(why.to_string().contains("not connected"), "{why}");

    pg.restart();
    assert_eq!(next(&changes), Health::Ok);
    assert!(ready(false, Some(&store), None).is_ok());

    // A session ended by the server while idle is replaced by the probe itself: the store
    // stays ready (one probe later it has a new backend).
    let before = pg.sql(
        "ready",
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'mllp-reactor'",
    );
    assert_eq!(before, "1");
    pg.sql(
        "ready",
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'mllp-reactor'",
    );
    let deadline = Instant::now() + WAIT;
    while pg.sql(
        "ready",
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'mllp-reactor'",
    ) != "1"
    {
        assert!(Instant::now() < deadline, "no new session");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(changes.try_recv().is_err(), "the store never left Ok");
    store.close(WAIT).unwrap();
}

/// Issue 21 item 4 for PostgreSQL: with a synchronous standby configured that does not exist,
/// every `COMMIT` waits (`SyncRep`) after the local flush. The message's AA must not leave
/// while its `COMMIT` waits, and must leave once it returns.
#[test]
fn the_aa_follows_the_commits_reply() {
    let Some(pg) = PgCluster::start() else { return };
    let url = pg.create_db("acks");
    assert_eq!(
        aa_while_the_standby_is_missing(&pg, &url, &options()),
        None,
        "an AA left before its COMMIT returned"
    );
}

/// The negative control: with `synchronous_commit=off` (accepted only with
/// `allow_async_commit`) `COMMIT` returns before the WAL is flushed or replicated, and the
/// same check sees the AA arrive while the standby is still missing.
#[test]
fn with_synchronous_commit_off_the_aa_does_not_wait() {
    let Some(pg) = PgCluster::start() else { return };
    let url = pg.create_db("async");
    pg.sql("async", "ALTER DATABASE async SET synchronous_commit = off");
    let early = aa_while_the_standby_is_missing(&pg, &url, &options().allow_async_commit(true));
    assert!(
        early
            .as_deref()
            .is_some_and(|ack| ack.contains("MSA|AA|held")),
        "{early:?}"
    );
}

/// Serves `url` with store-then-ACK, configures a synchronous standby that does not exist,
/// sends one message and returns the ACK that arrived while the standby was missing (`None`:
/// none did, its `COMMIT` was seen waiting). Then removes the standby and checks that the
/// AA arrives.
fn aa_while_the_standby_is_missing(
    pg: &PgCluster,
    url: &str,
    options: &mllp_store::PostgresOptions,
) -> Option<String> {
    let store = Arc::new(Store::open_postgres(url, options, StoreConfig::default()).unwrap());
    let server = Server::builder(StoreThenAck::new(Arc::clone(&store)))
        .dispatch(Dispatch::Inline)
        .bind("127.0.0.1:0")
        .unwrap()
        .spawn()
        .unwrap();
    let mut peer = TcpStream::connect(server.local_addr()).unwrap();
    let frame = |id: &str| [&b"\x0b"[..], &message(id), b"\x1c\r"].concat();
    let mut reply = Vec::new();
    peer.set_read_timeout(Some(WAIT)).unwrap();
    peer.write_all(&frame("before")).unwrap();
    assert!(read_ack(&mut peer, &mut reply), "no AA before the standby");
    assert!(String::from_utf8_lossy(&reply).contains("MSA|AA|before"));
    reply.clear();

    pg.sql("postgres", "CREATE TABLE syncrep_probe (x int)");
    pg.sql(
        "postgres",
        "ALTER SYSTEM SET synchronous_standby_names = 'nobody'",
    );
    pg.sql("postgres", "SELECT pg_reload_conf()");
    let waiting = || -> usize {
        pg.sql(
            "postgres",
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'",
        )
        .parse()
        .unwrap()
    };
    let deadline = Instant::now() + WAIT;
    let early = std::thread::scope(|scope| {
        // The reload reaches the commits through the checkpointer, some time after it
        // returns: a transaction of our own that waits for the standby shows it has.
        let probe = scope.spawn(|| pg.sql("postgres", "INSERT INTO syncrep_probe VALUES (1)"));
        while waiting() == 0 {
            assert!(Instant::now() < deadline, "the standby setting never took");
            std::thread::sleep(Duration::from_millis(20));
        }
        peer.write_all(&frame("held")).unwrap();
        // Either the batch's COMMIT waits for the standby too (then no AA may have left, nor
        // leave while it waits), or the AA arrives although nothing could be replicated.
        peer.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let mut early = None;
        while waiting() < 2 {
            if read_ack(&mut peer, &mut reply) {
                early = Some(String::from_utf8_lossy(&reply).into_owned());
                break;
            }
            assert!(
                Instant::now() < deadline,
                "neither a waiting COMMIT nor an AA"
            );
        }
        if early.is_none() {
            peer.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            if read_ack(&mut peer, &mut reply) {
                early = Some(String::from_utf8_lossy(&reply).into_owned());
            }
        }
        pg.sql("postgres", "ALTER SYSTEM RESET synchronous_standby_names");
        pg.sql("postgres", "SELECT pg_reload_conf()");
        probe.join().unwrap();
        early
    });
    if early.is_none() {
        peer.set_read_timeout(Some(WAIT)).unwrap();
        assert!(
            read_ack(&mut peer, &mut reply),
            "no AA after the COMMIT returned"
        );
        let ack = String::from_utf8_lossy(&reply);
        assert!(ack.contains("MSA|AA|held"), "{ack:?}");
    }
    server.shutdown(WAIT).unwrap();
    early
}

/// Reads until a whole frame is in `reply` (`true`), or the read timeout passes (`false`).
fn read_ack(peer: &mut TcpStream, reply: &mut Vec<u8>) -> bool {
    let mut buf = [0u8; 512];
    loop {
        match peer.read(&mut buf) {
            Ok(0) => panic!("the server closed the connection"),
            Ok(n) => {
                reply.extend_from_slice(&buf[..n]);
                if reply.ends_with(b"\x1c\r") {
                    return true;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false;
            }
            Err(e) => panic!("{e}"),
        }
    }
}
