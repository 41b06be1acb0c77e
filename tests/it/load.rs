//! Many connections: thousands open at once, and thousands of short-lived ones that must leave
//! nothing behind (no connection, no file descriptor).

use std::net::SocketAddr;
use std::sync::{Arc, Barrier, Mutex, MutexGuard};

use mllp_reactor::Server;
use mllp_reactor::ack::AckCode;

use crate::support::{self, Event, Peer, Sockets, accepting, assert_ack, message, start};

/// The tests here each hold thousands of descriptors, and one counts the process's: they run
/// one at a time (other tests, a few descriptors each, may run beside them).
static HEAVY: Mutex<()> = Mutex::new(());

fn heavy() -> MutexGuard<'static, ()> {
    HEAVY
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Client threads: enough to keep the reactor busy on 2 cores, few enough to be cheap.
const THREADS: usize = 4;

#[test]
fn two_thousand_concurrent_connections_are_all_answered() {
    const CONNECTIONS: usize = 2_000; // × 2 descriptors (both ends) in this process
    let _heavy = heavy();
    let mut server = start(Server::builder(accepting()));
    let addr = server.addr;
    let port = addr.port();
    let connected = Arc::new(Barrier::new(THREADS + 1));
    let go = Arc::new(Barrier::new(THREADS + 1));
    let clients: Vec<_> = (0..THREADS)
        .map(|t| {
            let (connected, go) = (Arc::clone(&connected), Arc::clone(&go));
            support::spawn(move || {
                let mut peers: Vec<Peer> = (0..CONNECTIONS / THREADS)
                    .map(|_| Peer::connect(addr))
                    .collect();
                connected.wait();
                go.wait();
                for (i, peer) in peers.iter_mut().enumerate() {
                    peer.send_frame(&message(&format!("T{t}C{i}")));
                }
                for (i, peer) in peers.iter_mut().enumerate() {
                    assert_ack(&peer.read_frame(), AckCode::AA, &format!("T{t}C{i}"));
                }
                peers
                    .iter()
                    .map(Peer::local_addr)
                    .collect::<Vec<SocketAddr>>()
            })
        })
        .collect();
    connected.wait();
    // All of them are open on the server at the same time before any message is sent.
    server
        .events
        .wait_count("connection start", CONNECTIONS, |e| {
            matches!(e, Event::ConnectionStart(_))
        });
    let all_open = Sockets {
        server: CONNECTIONS,
        client: CONNECTIONS,
    };
    support::wait_until("4,000 sockets open", || {
        support::connection_sockets(port) == all_open
    });
    go.wait();
    let mut answered = 0;
    for client in clients {
        answered += client.join().expect("every client got its ACKs").len();
    }
    assert_eq!(answered, CONNECTIONS);
    server
        .events
        .wait_count("connection stop", CONNECTIONS, |e| {
            matches!(e, Event::ConnectionStop(_))
        });
    assert_eq!(
        server.events.count(|e| matches!(e, Event::MessageStop(_))),
        CONNECTIONS
    );
    // The reactor closes each socket just after reporting its stop.
    let none = Sockets {
        server: 0,
        client: 0,
    };
    support::wait_until("every socket closed", || {
        support::connection_sockets(port) == none
    });
    let report = server.stop().report;
    assert_eq!(report.closed, 0, "no connection was left for the shutdown");
}

#[test]
fn five_thousand_short_connections_leave_nothing_behind() {
    const CYCLES: usize = 5_000;
    let _heavy = heavy();
    let mut server = start(Server::builder(accepting()));
    let addr = server.addr;
    let fds_before = support::open_fds();
    let clients: Vec<_> = (0..THREADS)
        .map(|t| {
            support::spawn(move || {
                for i in 0..CYCLES / THREADS {
                    let mut peer = Peer::connect(addr);
                    let id = format!("T{t}N{i}");
                    peer.send_frame(&message(&id));
                    // Half of the peers read their ACK; the others hang up without waiting.
                    if i % 2 == 0 {
                        assert_ack(&peer.read_frame(), AckCode::AA, &id);
                    }
                }
            })
        })
        .collect();
    for client in clients {
        client.join().expect("client passed");
    }
    let stopped = |e: &Event| matches!(e, Event::ConnectionStop(_));
    server.events.wait_count("connection stop", CYCLES, stopped);
    assert_eq!(
        server
            .events
            .count(|e| matches!(e, Event::ConnectionStart(_))),
        CYCLES
    );
    assert_eq!(server.events.count(stopped), CYCLES);
    // No connection is left on the server ...
    let report = server.stop().report;
    assert_eq!(report.closed, 0, "no connection was left for the shutdown");
    // ... and none of the 10,000 descriptors (both ends) is still open, counted exactly ...
    let none = Sockets {
        server: 0,
        client: 0,
    };
    support::wait_until("every socket closed", || {
        support::connection_sockets(addr.port()) == none
    });
    // ... nor, counted roughly, in the whole process: tests running beside this one hold a
    // few descriptors (up to 4,000 for a 2,000-connection test), one leaked per cycle would
    // add 5,000.
    let fds_after = support::open_fds();
    assert!(
        fds_after < fds_before + CYCLES,
        "{fds_before} descriptors before, {fds_after} after"
    );
}
