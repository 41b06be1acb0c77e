//! Durable baseline for the end-to-end benchmark (`benches/e2e.sh`, `MODE=durable`).
//!
//! The smallest correct store-then-ACK server: one thread with one mio `Poll` reads frames and
//! hands each message to one writer thread; the writer commits everything queued in one
//! transaction (group commit: while one commit syncs, the next batch grows), then hands the
//! ACKs back and wakes the reactor once per batch. An ACK leaves only after its message's
//! commit returned; a failed commit answers AE. Same schema, columns, index and duplicate
//! lookup as `serve --store FILE` (the schema is created by `mllp_store` itself, and every
//! column `serve` fills is filled here too, PID-3.1 for the patient index included, parsed by
//! the same [`mllp_store::Header`]), SQLite WAL with `synchronous=FULL`. The patient index
//! (`messages_patient`) is kept inline, updated by every commit, as `serve` did before it
//! moved that index off the commit path into a file of its own (`mllp_store::search_index`):
//! the straightforward server with the same search ability.
//!
//! Checkpoints (`--checkpoint`, default `auto`):
//! - `auto`: SQLite's default automatic checkpoint, inside the commit that takes the WAL past
//!   1 000 pages: "the defaults baseline" that the store's own checkpointing is measured
//!   against (issue #21: S3 at least 1.3× this).
//! - `off`: no checkpoints at all, so the WAL grows for the whole run: the ceiling of a commit
//!   path without checkpoint work (not a configuration anyone could run for long).
//!
//! ```text
//! cargo run --release -p mllp-reactor-cli --example durable_baseline -- STORE.db 127.0.0.1:0 [--checkpoint auto|off]
//! listening on 127.0.0.1:40123
//! ```
//!
//! Prints exactly one line, `listening on <ADDR>`, to stdout, then serves until killed.
//! Not for production: no limits (the queue and the write buffers are unbounded), no timers.
// A binary (or test/example root): `pub` inside it only ever means crate-visible.
#![allow(unreachable_pub)]

use std::collections::VecDeque;
use std::io::{self, ErrorKind, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token, Waker};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use slab::Slab;

#[path = "support/wire.rs"]
mod wire;

use wire::{AckWriter, Conn, READ_CHUNK, accept_all};

/// The listener's token; connections use their slab key, which never reaches these values.
const LISTENER: Token = Token(usize::MAX);
/// The writer wakes the reactor through this token once per committed batch.
const WAKER: Token = Token(usize::MAX - 1);
const EVENTS_CAPACITY: usize = 1024;
/// Most messages per transaction, as the store's default.
const MAX_BATCH: usize = 1024;
/// The store's default duplicate window: 7 days.
const DUPLICATE_WINDOW_US: i64 = 7 * 24 * 3600 * 1_000_000;

const FIND_ORIGINAL: &str = "
SELECT id FROM messages
WHERE control_id = ?1 AND sending_application IS ?2 AND sending_facility IS ?3
  AND received_at_us >= ?4 AND duplicate_of IS NULL
ORDER BY received_at_us, id LIMIT 1";

const INSERT: &str = "
INSERT INTO messages (received_at_us, peer, local, connection_id, sequence,
    sending_application, sending_facility, message_type, control_id, size, duplicate_of, payload,
    client_cert, patient_id)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, NULL, ?13)";

/// The patient index (search by PID-3.1), updated by every commit.
const PATIENT_INDEX: &str = "CREATE INDEX IF NOT EXISTS messages_patient ON messages (patient_id) WHERE patient_id IS NOT NULL";

/// One message on its way to the writer, with its ACK already built (code `AA`, patched to
/// `AE` if the commit fails).
struct Job {
    key: usize,
    conn_id: u64,
    sequence: u64,
    received_at_us: i64,
    peer: Arc<str>,
    local: Arc<str>,
    payload: Vec<u8>,
    ack: Vec<u8>,
    code_at: usize,
}

/// A committed (or failed) message's ACK, back to the reactor.
struct Done {
    key: usize,
    conn_id: u64,
    ack: Vec<u8>,
}

#[derive(Default)]
struct Queues {
    jobs: Mutex<VecDeque<Job>>,
    more: Condvar,
    done: Mutex<Vec<Done>>,
}

/// Per-connection state beside the socket.
struct Peer {
    id: u64,
    sequence: u64,
    peer: Arc<str>,
    local: Arc<str>,
}

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let autocheckpoint = match args.iter().position(|a| a == "--checkpoint") {
        Some(at) if at + 1 < args.len() => {
            let mode = args.remove(at + 1);
            args.remove(at);
            match mode.as_str() {
                "auto" => true,
                "off" => false,
                _ => {
                    eprintln!("error: --checkpoint must be auto or off, got {mode:?}");
                    return ExitCode::from(2);
                }
            }
        }
        Some(_) => {
            eprintln!("error: --checkpoint needs a value (auto or off)");
            return ExitCode::from(2);
        }
        None => true,
    };
    let (store, addr) = match args.as_slice() {
        [store] => (store.clone(), "127.0.0.1:0".to_owned()),
        [store, addr] => (store.clone(), addr.clone()),
        _ => {
            eprintln!(
                "usage: durable_baseline STORE.db [LISTEN_ADDR] [--checkpoint auto|off]   (default 127.0.0.1:0, auto)"
            );
            return ExitCode::from(2);
        }
    };
    let Ok(addr) = addr.parse::<SocketAddr>() else {
        eprintln!("error: invalid listen address {addr:?}");
        return ExitCode::from(2);
    };
    match serve(Path::new(&store), addr, autocheckpoint) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(
    store: &Path,
    addr: SocketAddr,
    autocheckpoint: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    // The store crate creates the schema (and checks an existing one), so it is the same;
    // without its patient search index follower, since this server keeps that index inline.
    let mut options = mllp_store::SqliteOptions::default();
    options.bench_without_patient_index = true;
    drop(mllp_store::SqliteBackend::open(store, &options)?);
    let db = Connection::open(store)?;
    // The patient index inside the commit, as `serve` kept it before it moved off the commit
    // path into a file of its own (issue #21): the straightforward "same schema" server.
    db.execute_batch(PATIENT_INDEX)?;
    let mode: String = db.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(format!("journal mode is {mode}, not WAL").into());
    }
    db.pragma_update(None, "synchronous", "FULL")?;
    if !autocheckpoint {
        db.pragma_update(None, "wal_autocheckpoint", 0)?;
    }

    let mut poll = Poll::new()?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
    let queues = Arc::new(Queues::default());
    {
        let queues = Arc::clone(&queues);
        let waker = Arc::clone(&waker);
        let path = store.to_owned();
        std::thread::Builder::new()
            .name("writer".into())
            .spawn(move || writer(db, &queues, &waker, &path))?;
    }

    let mut listener = TcpListener::bind(addr)?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    {
        let mut out = io::stdout().lock();
        writeln!(out, "listening on {}", listener.local_addr()?)?;
        out.flush()?;
    }

    let mut events = Events::with_capacity(EVENTS_CAPACITY);
    let mut connections: Slab<(Conn, Peer)> = Slab::new();
    let mut scratch = vec![0u8; READ_CHUNK];
    let mut acks = AckWriter::new();
    let mut next_conn_id = 0u64;
    let mut batch: Vec<Job> = Vec::new();
    let mut completed: Vec<Done> = Vec::new();
    let mut touched: Vec<usize> = Vec::new();

    loop {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(e.into());
        }
        acks.refresh_timestamp();
        let now_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as i64);
        for event in events.iter() {
            match event.token() {
                LISTENER => {
                    accept_all(&poll, &listener, &mut connections, |stream| {
                        next_conn_id += 1;
                        let text = |a: io::Result<SocketAddr>| {
                            a.map_or_else(|_| Arc::from("?"), |a| Arc::from(a.to_string()))
                        };
                        Peer {
                            id: next_conn_id,
                            sequence: 0,
                            peer: text(stream.peer_addr()),
                            local: text(stream.local_addr()),
                        }
                    });
                }
                WAKER => {
                    std::mem::swap(&mut completed, &mut *queues.done.lock().unwrap());
                    for done in completed.drain(..) {
                        if let Some((conn, peer)) = connections.get_mut(done.key)
                            && peer.id == done.conn_id
                        {
                            conn.wbuf.extend_from_slice(&done.ack);
                            touched.push(done.key);
                        }
                    }
                    touched.sort_unstable();
                    touched.dedup();
                    for key in touched.drain(..) {
                        let (conn, _) = &mut connections[key];
                        if !(conn.flush() && conn.update_interest(&poll, key).is_ok()) {
                            close(&poll, &mut connections, key);
                        }
                    }
                }
                Token(key) => {
                    let Some((conn, peer)) = connections.get_mut(key) else {
                        continue;
                    };
                    let mut open = true;
                    if event.is_readable() || event.is_read_closed() {
                        open = conn.read_frames(&mut scratch, |payload, _| {
                            peer.sequence += 1;
                            let mut ack = Vec::with_capacity(128);
                            let code_at = acks.append_ack(payload, b"AA", &mut ack);
                            batch.push(Job {
                                key,
                                conn_id: peer.id,
                                sequence: peer.sequence,
                                received_at_us: now_us,
                                peer: Arc::clone(&peer.peer),
                                local: Arc::clone(&peer.local),
                                payload: payload.to_vec(),
                                ack,
                                code_at,
                            });
                        });
                    }
                    if open && event.is_writable() {
                        open = conn.flush() && conn.update_interest(&poll, key).is_ok();
                    }
                    if !open {
                        close(&poll, &mut connections, key);
                    }
                }
            }
        }
        if !batch.is_empty() {
            queues.jobs.lock().unwrap().extend(batch.drain(..));
            queues.more.notify_one();
        }
    }
}

fn close(poll: &Poll, connections: &mut Slab<(Conn, Peer)>, key: usize) {
    let (mut conn, _) = connections.remove(key);
    // Deregistering a socket that is about to be dropped cannot usefully fail.
    let _ = poll.registry().deregister(&mut conn.stream);
}

/// The writer thread: takes up to `MAX_BATCH` queued jobs, commits them in one transaction,
/// hands their ACKs back, wakes the reactor; forever.
fn writer(mut db: Connection, queues: &Queues, waker: &Waker, path: &Path) {
    let mut jobs: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    loop {
        {
            let mut queue = queues.jobs.lock().unwrap();
            while queue.is_empty() {
                queue = queues.more.wait(queue).unwrap();
            }
            let n = queue.len().min(MAX_BATCH);
            jobs.extend(queue.drain(..n));
        }
        let ok = match commit(&mut db, &jobs) {
            Ok(()) => true,
            Err(e) => {
                eprintln!("commit to {} failed: {e}", path.display());
                false
            }
        };
        {
            let mut done = queues.done.lock().unwrap();
            for mut job in jobs.drain(..) {
                if !ok {
                    job.ack[job.code_at..job.code_at + 2].copy_from_slice(b"AE");
                }
                done.push(Done {
                    key: job.key,
                    conn_id: job.conn_id,
                    ack: job.ack,
                });
            }
        }
        if let Err(e) = waker.wake() {
            eprintln!("wake: {e}");
        }
    }
}

/// A header field as TEXT, as the store writes it.
fn text(field: Option<&[u8]>) -> Option<std::borrow::Cow<'_, str>> {
    field.map(String::from_utf8_lossy)
}

/// Inserts `jobs` in one IMMEDIATE transaction, each after its duplicate lookup.
fn commit(db: &mut Connection, jobs: &[Job]) -> rusqlite::Result<()> {
    let tx = db.transaction_with_behavior(TransactionBehavior::Immediate)?;
    {
        let mut find = tx.prepare_cached(FIND_ORIGINAL)?;
        let mut insert = tx.prepare_cached(INSERT)?;
        for job in jobs {
            let header = mllp_store::Header::parse(&job.payload);
            let (app, facility, control) = (
                text(header.sending_application),
                text(header.sending_facility),
                text(header.control_id),
            );
            let duplicate_of: Option<i64> = match &control {
                Some(control) => find
                    .query_row(
                        params![
                            control,
                            app,
                            facility,
                            job.received_at_us - DUPLICATE_WINDOW_US
                        ],
                        |r| r.get(0),
                    )
                    .optional()?,
                None => None,
            };
            insert.execute(params![
                job.received_at_us,
                &*job.peer,
                &*job.local,
                job.conn_id as i64,
                job.sequence as i64,
                app,
                facility,
                text(header.message_type),
                control,
                job.payload.len() as i64,
                duplicate_of,
                &job.payload[..],
                text(header.patient_id),
            ])?;
        }
    }
    tx.commit()
}
