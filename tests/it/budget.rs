//! The memory budget through the server: who may read above it (peak RSS is measured in the
//! test binaries of their own, `tests/budget*.rs`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use mllp_reactor::ack::{self, AckCode};
use mllp_reactor::telemetry::names::{BUFFERED_BYTES, READ_PAUSES};
use mllp_reactor::{Builder, Dispatch, Reply, ReplyHandle, Server, handler_fn};

use crate::support::{
    HOLD, IO_TIMEOUT, Peer, TestServer, WAIT, accepting, assert_ack, message, start, test_reactors,
};

/// Issue 18 defect 9: peers that each sent most of a frame and stopped filled the budget; the
/// connection allowed to read above it was the largest of those stalled frames, so an honest
/// 80-byte message waited for the stalled frames' deadline. The one allowed to read must have
/// bytes waiting: the honest message is answered at once (the frame deadline is a minute, the
/// reply wait 10 s).
#[test]
fn issue_9_a_stalled_frame_does_not_hold_up_the_budget() {
    const MAX_MESSAGE: usize = 2 << 20;
    const STALLED: usize = 6;
    let server = start(
        Server::builder(accepting())
            .max_message_size(MAX_MESSAGE)
            .max_memory(4 * MAX_MESSAGE)
            .frame_timeout(Duration::from_secs(60)),
    );
    // 6 × 1.9 MiB of unfinished frames against an 8 MiB budget.
    let mut partial = vec![0x0b];
    partial.extend_from_slice(b"MSH|^~\\&|A|B|C|D|20260101||ADT^A01|STALL|P|2.5.1\rNTE|");
    partial.resize(MAX_MESSAGE - (100 << 10), b'x');
    let stalled: Vec<_> = (0..STALLED)
        .map(|_| {
            let peer = server.connect();
            // The server may stop reading before taking all of it: send from a thread.
            let mut stream = peer.stream.try_clone().expect("clone the stream");
            let bytes = partial.clone();
            std::thread::spawn(move || {
                let _ = stream.write_all(&bytes);
            });
            peer.stream
                .set_read_timeout(Some(Duration::from_secs(1)))
                .unwrap();
            peer
        })
        .collect();
    assert!(
        server.wait_counter(READ_PAUSES, &[], 1) >= 1,
        "the stalled frames filled the budget"
    );
    let mut honest = server.connect();
    assert_ack(&honest.roundtrip(&message("HONEST")), AckCode::AA, "HONEST");
    drop(stalled);
    server.stop();
}

/// Issue 18 defect 8: a budget above `isize::MAX` (here `usize::MAX`) read as negative, so the
/// server accepted connections and never read. It saturates now.
#[test]
fn issue_8_a_budget_above_isize_max_saturates() {
    let mut server = start(Server::builder(accepting()).max_memory(usize::MAX));
    let mut peer = server.connect();
    assert_ack(&peer.roundtrip(&message("HUGE")), AckCode::AA, "HUGE");
    drop(peer);
    server.events.wait("the connection", |e| {
        matches!(e, crate::support::Event::ConnectionStart(_))
    });
    server.stop();
}

/// The price of the finishing turn, bounded: a peer that stops inside its reactor's finishing
/// frame holds up no small message, and a large frame waiting at the 64 KiB mark takes the
/// turn once the stopped frame's connection closes (its peer goes, or its frame deadline
/// passes). 40 messages of 60 KiB, held by the handler, fill a 2 MiB budget; a peer sends
/// 164 KiB of a 1 MiB frame (the turn's frame: nothing else is past the mark) and stops. An
/// 80-byte message is answered at once (the frame deadline is a minute, the reply wait 10 s);
/// a 1 MiB frame is answered once the stopped peer has gone.
#[test]
fn a_peer_stopped_in_the_finishing_frame_holds_up_no_small_message() {
    const MAX_MESSAGE: usize = 1 << 20;
    const FILLERS: usize = 40;
    let handled = Arc::new(AtomicUsize::new(0));
    let held: Arc<Mutex<Vec<ReplyHandle>>> = Arc::default();
    let handler = {
        let (handled, held) = (Arc::clone(&handled), Arc::clone(&held));
        handler_fn(move |msg, cx| {
            handled.fetch_add(1, Ordering::SeqCst);
            if msg.windows(5).take(64).any(|w| w == b"|HOLD") {
                held.lock().unwrap().push(cx.defer());
                return Ok(Reply::Deferred);
            }
            Ok(Reply::Send(ack::accept(msg)))
        })
    };
    let server = start(
        Server::builder(handler)
            .dispatch(Dispatch::Inline)
            .max_message_size(MAX_MESSAGE)
            .max_memory(2 * MAX_MESSAGE)
            .frame_timeout(Duration::from_secs(60)),
    );
    let padded = |control_id: &str, len: usize| {
        let mut payload =
            format!("MSH|^~\\&|A|B|C|D|20260101||ADT^A01|{control_id}|P|2.5.1\rNTE|").into_bytes();
        payload.resize(len, b'x');
        crate::support::frame(&payload)
    };

    let fillers: Vec<Peer> = (0..FILLERS)
        .map(|_| {
            let mut peer = server.connect();
            peer.send(&padded("HOLD", 60 << 10));
            peer
        })
        .collect();
    assert!(
        server.wait_counter(READ_PAUSES, &[], 1) >= 1,
        "reading paused"
    );
    crate::support::wait_until("every held message handed over", || {
        handled.load(Ordering::SeqCst) >= FILLERS
    });

    // The stopped frame takes the finishing turn: it comes to count in full.
    let before = server.gauge_peak(BUFFERED_BYTES) as usize;
    let mut stopped = server.connect();
    stopped.send(&padded("STOP", MAX_MESSAGE - 1024)[..164 << 10]);
    crate::support::wait_until("the stopped frame read past its first 64 KiB", || {
        server.gauge_peak(BUFFERED_BYTES) as usize >= before + MAX_MESSAGE / 2
    });

    let mut small = server.connect();
    assert_ack(&small.roundtrip(&message("SMALL")), AckCode::AA, "SMALL");
    let mut large = server.connect();
    let wire = padded("LARGE", MAX_MESSAGE - 1024);
    let mut stream = large.stream.try_clone().expect("clone");
    let writer = std::thread::spawn(move || stream.write_all(&wire).expect("send the frame"));
    drop(stopped);
    assert_ack(&large.read_frame(), AckCode::AA, "LARGE");
    writer.join().expect("the writer");
    // Dropped reply handles answer the held messages (AE), so the server stops at once.
    held.lock().unwrap().clear();
    drop(fillers);
    server.stop();
}

/// Frames begun below the budget finish above it one per reactor at a time, not one per
/// connection. 24 senders each send the first 56 KiB of a 1 MiB frame (a frame's first 64 KiB
/// count at their size: its rest is unknown), 6 more send whole frames that fill a 2 MiB
/// budget, and the handler holds every message (its replies deferred), so nothing drains;
/// then the 24 send the rest. Each of them used to be allowed to finish its frame above the
/// budget in turn (one connection per reactor at a time, but every one in the end): all 30
/// messages handed over and 30 720–31 744 KiB counted against the 2 MiB budget, with one
/// reactor or two. Now a frame goes past its first 64 KiB above the budget only as its
/// reactor's one such frame, and the next waits until that one's message is answered: 2
/// messages and 5 631–6 655 KiB with one reactor, 4 and 7 423–9 471 KiB with two. Once the
/// held messages are answered, every sender is answered (the frames waiting for their turn
/// are not stalled).
#[test]
fn frames_begun_below_the_budget_finish_above_it_one_per_reactor_at_a_time() {
    begun_frames_finish_one_per_reactor_at_a_time(|b| b, plain, 0);
}

/// The same over TLS: the session's buffers count too (its 32 KiB ciphertext buffer per
/// connection), and plaintext comes through the reactor's scratch buffer, not straight into
/// the connection's. Before: 30 messages, 53 183 KiB counted; now 1–2 and 5 903–7 583 KiB.
#[cfg(feature = "tls")]
#[test]
fn over_tls_frames_begun_below_the_budget_finish_above_it_one_per_reactor_at_a_time() {
    use mllp_reactor::tls::__plumbing::INCOMING_CHUNK;
    use mllp_reactor::tls::{TlsAcceptor, TlsConfig};
    let server = &mllp_test_support::tls::pki().server;
    let acceptor = TlsAcceptor::new(TlsConfig::from_pem(
        server.cert.as_str(),
        server.key.as_str(),
    ))
    .unwrap();
    begun_frames_finish_one_per_reactor_at_a_time(|b| b.tls(acceptor), tls, INCOMING_CHUNK);
}

/// A client's byte stream: plain TCP, or TLS over it.
trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

fn plain(addr: SocketAddr) -> Box<dyn Stream> {
    let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT).expect("connect");
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    // The writers block once the server stops reading.
    stream.set_write_timeout(Some(HOLD)).unwrap();
    Box::new(stream)
}

#[cfg(feature = "tls")]
fn tls(addr: SocketAddr) -> Box<dyn Stream> {
    let config = mllp_test_support::tls::rustls_client(&[&rustls::version::TLS13], None);
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(config, name).unwrap();
    let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT).expect("connect");
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(HOLD)).unwrap();
    Box::new(rustls::StreamOwned::new(conn, stream))
}

/// The scenario of the tests above; `layer` adds the transport's layer to the server,
/// `connect` opens a client's stream, and `per_connection` is what the layer's buffers may
/// count per connection beyond the connection's own.
fn begun_frames_finish_one_per_reactor_at_a_time(
    layer: impl FnOnce(Builder) -> Builder,
    connect: fn(SocketAddr) -> Box<dyn Stream>,
    per_connection: usize,
) {
    const MAX_MESSAGE: usize = 1 << 20;
    const BUDGET: usize = 2 * MAX_MESSAGE;
    const PAYLOAD: usize = MAX_MESSAGE - 1024;
    const BEGUN: usize = 24;
    const FILLERS: usize = 6;
    /// What a begun frame sends before the budget fills: under the 64 KiB counted at size.
    const HEAD: usize = 56 << 10;
    /// A reactor's read, and the part of a frame counted at its size.
    const READ: usize = 64 << 10;
    let reactors = test_reactors();
    // The documented bound (crate docs, "Bounded memory"): per reactor the frame that tipped
    // the budget and the one frame finishing above it, each with one read past its end; per
    // connection at most a frame's first 64 KiB. The count takes buffers' capacities, which
    // grow by doubling: up to twice the bytes.
    let connections = BEGUN + FILLERS;
    let bound = BUDGET
        + 2 * (2 * reactors * (MAX_MESSAGE + READ) + connections * READ)
        + connections * per_connection;
    // Each message handed over is held with its payload (about 1 MiB): what the budget holds,
    // and per reactor the frame that tipped it and the one finishing above it.
    let max_handled = BUDGET / PAYLOAD + 2 * reactors;

    // `Some`: hold every message's reply; `None` (once the test has measured): answer at once.
    type Held = Option<Vec<(ReplyHandle, Reply)>>;
    let held: Arc<Mutex<Held>> = Arc::new(Mutex::new(Some(Vec::new())));
    let handled = Arc::new(AtomicUsize::new(0));
    let handler = {
        let (held, handled) = (Arc::clone(&held), Arc::clone(&handled));
        handler_fn(move |msg, cx| {
            handled.fetch_add(1, Ordering::SeqCst);
            let ack = Reply::Send(ack::accept(msg));
            match held.lock().unwrap().as_mut() {
                Some(held) => {
                    held.push((cx.defer(), ack));
                    Ok(Reply::Deferred)
                }
                None => Ok(ack),
            }
        })
    };
    let server = start(layer(
        Server::builder(handler)
            .dispatch(Dispatch::Inline)
            .max_message_size(MAX_MESSAGE)
            .max_memory(BUDGET),
    ));
    let addr = server.addr;
    let wire = Arc::new(mllp_test_support::memory::large_frame(PAYLOAD));
    // Sampled: the count is published at each reactor turn's end.
    let counted = |server: &TestServer| server.gauge_peak(BUFFERED_BYTES) as usize;

    // Each client a thread: it sends its frame (a begun one in two parts, the second on a
    // signal), then reads its ACK.
    let client = |head: usize, go: Option<mpsc::Receiver<()>>, sent: mpsc::Sender<()>| {
        let wire = Arc::clone(&wire);
        std::thread::spawn(move || {
            let mut stream = connect(addr);
            stream
                .write_all(&wire[..head])
                .expect("send a frame's start");
            stream.flush().expect("send a frame's start");
            let _ = sent.send(());
            if let Some(go) = go {
                go.recv_timeout(HOLD).expect("the signal to send the rest");
            }
            stream.write_all(&wire[head..]).expect("send the frame");
            stream.flush().expect("send the frame");
            let mut reply = Vec::new();
            let mut buf = [0u8; 1024];
            while !reply.ends_with(&[0x1c, 0x0d]) {
                let n = stream.read(&mut buf).expect("read the ACK");
                assert!(n > 0, "closed before the ACK");
                reply.extend_from_slice(&buf[..n]);
            }
            reply
        })
    };

    // The begun frames' first 56 KiB, read while the budget has room.
    let (sent, heads) = mpsc::channel();
    let (gos, begun): (Vec<_>, Vec<_>) = (0..BEGUN)
        .map(|_| {
            let (go, wait) = mpsc::channel();
            (go, client(HEAD, Some(wait), sent.clone()))
        })
        .unzip();
    for _ in 0..BEGUN {
        heads
            .recv_timeout(WAIT)
            .expect("a begun frame's start sent");
    }
    let deadline = Instant::now() + WAIT;
    while counted(&server) < BEGUN * HEAD && Instant::now() < deadline {
        // No event marks the count's update: poll, bounded by the deadline.
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        counted(&server) >= BEGUN * HEAD,
        "the begun frames were read: {} bytes counted",
        counted(&server)
    );

    // Whole frames fill the budget. Then the begun frames' rest.
    let fillers: Vec<_> = (0..FILLERS)
        .map(|_| client(0, None, sent.clone()))
        .collect();
    assert!(
        server.wait_counter(READ_PAUSES, &[], 1) >= 1,
        "reading paused"
    );
    for go in gos {
        go.send(()).expect("a begun frame's sender");
    }

    // Wait until the server has read what it will: the messages handed over and the count
    // hold still for a second (bounded).
    let deadline = Instant::now() + HOLD;
    let (mut last, mut since) = ((usize::MAX, usize::MAX), Instant::now());
    while Instant::now() < deadline {
        let now = (handled.load(Ordering::SeqCst), counted(&server));
        if now != last {
            (last, since) = (now, Instant::now());
        } else if since.elapsed() >= Duration::from_secs(1) {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let (messages, peak) = (handled.load(Ordering::SeqCst), counted(&server));
    println!(
        "{messages} messages of 1 MiB handed over, at most {} KiB counted (budget {} KiB, \
         bound {} KiB, {reactors} reactor(s))",
        peak >> 10,
        BUDGET >> 10,
        bound >> 10
    );

    // Answer the held messages: every sender is answered, the begun frames included.
    let answered = held.lock().unwrap().take().expect("held");
    for (handle, ack) in answered {
        handle.send(ack);
    }
    for client in begun.into_iter().chain(fillers) {
        let reply = client.join().expect("a client");
        assert_ack(&reply[1..reply.len() - 2], AckCode::AA, "CID");
    }
    server.stop();

    assert!(
        peak <= bound,
        "{} KiB counted against a budget of {} KiB (bound {} KiB)",
        peak >> 10,
        BUDGET >> 10,
        bound >> 10
    );
    assert!(
        messages <= max_handled,
        "{messages} messages of 1 MiB handed over with a 2 MiB budget (at most {max_handled})"
    );
}
