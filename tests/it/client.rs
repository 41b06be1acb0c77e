//! The blocking client against our server and against small scripted fake servers (plain
//! `std::net` on 127.0.0.1:0, one thread each). Every blocking step has a bound: sockets get
//! [`IO_TIMEOUT`] timeouts, accepts are polled up to [`IO_TIMEOUT`], and test threads hand
//! each other signals over channels read with `recv_timeout` (at most [`WAIT`]).

use std::io::{ErrorKind, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use mllp_reactor::ack::{self, AckCode};
use mllp_reactor::{Backoff, Client, ClientConfig, ClientError, Reply, Server, handler_fn};

use crate::support::{
    self, IO_TIMEOUT, Peer, SHORT, TestServer, WAIT, control_id, frame, message, start,
};

/// The AA our server would send for message `id`, framed.
fn framed_ack(id: &str) -> Vec<u8> {
    frame(&ack::accept(&message(id)))
}

fn config() -> ClientConfig {
    ClientConfig::default()
        .connect_timeout(IO_TIMEOUT)
        .response_timeout(IO_TIMEOUT)
}

/// Our server: AA, except AE for control ids starting with `E` and AR for those with `R`.
fn start_server() -> TestServer {
    let handler = handler_fn(|m, _| {
        Ok(Reply::Send(match control_id(m).chars().next() {
            Some('E') => ack::nak(m, AckCode::AE, "rejected by test"),
            Some('R') => ack::nak(m, AckCode::AR, "refused by test"),
            _ => ack::accept(m),
        }))
    });
    start(Server::builder(handler))
}

/// A fake server: `script` runs on its own thread with the listener.
fn fake(script: impl FnOnce(TcpListener) + Send + 'static) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind fake server");
    let addr = listener.local_addr().expect("fake server address");
    (addr, support::spawn(move || script(listener)))
}

/// Accepts one connection within [`IO_TIMEOUT`] (std's `accept` has no timeout, so it is
/// polled).
#[track_caller]
fn accept(listener: &TcpListener) -> Peer {
    listener
        .set_nonblocking(true)
        .expect("nonblocking listener");
    let give_up = Instant::now() + IO_TIMEOUT;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).expect("blocking stream");
                return Peer::from_stream(stream);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < give_up => {
                thread::sleep(Duration::from_millis(2));
            }
            Err(e) => panic!("no connection within {IO_TIMEOUT:?}: {e}"),
        }
    }
}

#[track_caller]
fn expect_closed(client: &mut Client) {
    match client.send(&message("AFTER")) {
        Err(ClientError::Closed) => {}
        other => panic!("expected Closed, got {other:?}"),
    }
    assert!(!client.is_connected());
}

#[test]
fn accepted_messages_get_their_own_aa_on_one_connection() {
    let server = start_server();
    let mut client = Client::connect(server.addr, config()).unwrap();
    assert_eq!(client.peer_addr(), Some(server.addr));
    for id in ["MSG1", "MSG2", "MSG3"] {
        let ack = client.send(&message(id)).unwrap();
        assert_eq!(ack.code, AckCode::AA);
        assert_eq!(ack.control_id, id);
        assert_eq!(ack.text, None);
        assert!(ack.is_accept());
        assert_eq!(ack::parse(&ack.raw).unwrap().control_id, id.as_bytes());
        assert!(client.is_connected());
    }
    client.close();
    expect_closed(&mut client);
    server.stop();
}

#[test]
fn ae_and_ar_are_returned_as_acks_not_errors() {
    let server = start_server();
    let mut client = Client::connect(server.addr, config()).unwrap();
    let ae = client.send(&message("E1")).unwrap();
    assert_eq!((ae.code, ae.control_id.as_str()), (AckCode::AE, "E1"));
    assert_eq!(ae.text.as_deref(), Some("rejected by test"));
    assert!(!ae.is_accept());
    let ar = client.send(&message("R2")).unwrap();
    assert_eq!((ar.code, ar.control_id.as_str()), (AckCode::AR, "R2"));
    assert_eq!(ar.text.as_deref(), Some("refused by test"));
    // A NAK is an answer: the connection is kept.
    assert_eq!(client.send(&message("OK3")).unwrap().code, AckCode::AA);
    server.stop();
}

#[test]
fn message_without_control_id_is_refused_unless_allowed() {
    let server = start_server();
    let no_id = b"MSH|^~\\&|LAB|HOSP|EHR|WARD|20260101120000||ORU^R01||P|2.5.1\r";
    let mut client = Client::connect(server.addr, config()).unwrap();
    assert!(matches!(client.send(no_id), Err(ClientError::NoControlId)));
    assert!(matches!(
        client.send(b"not hl7"),
        Err(ClientError::NoControlId)
    ));
    // Nothing was sent, so the connection is still clean and usable.
    assert!(client.is_connected());
    assert_eq!(client.send(&message("MSG1")).unwrap().control_id, "MSG1");

    let mut lenient =
        Client::connect(server.addr, config().allow_missing_control_id(true)).unwrap();
    // Our server rejects a message it cannot identify: AR with an empty MSA-2.
    let ack = lenient.send(no_id).unwrap();
    assert_eq!((ack.code, ack.control_id.as_str()), (AckCode::AR, ""));
    // Messages that have an id are still correlated.
    assert_eq!(lenient.send(&message("MSG2")).unwrap().control_id, "MSG2");
    server.stop();
}

#[test]
fn stale_frame_waiting_before_a_send_is_desync() {
    let (sent_tx, sent_rx) = mpsc::channel();
    let (addr, fake) = fake(move |listener| {
        let mut stream = accept(&listener);
        // An ACK nobody asked for, e.g. the late answer to a message of an earlier session.
        stream.send(&framed_ack("OLD"));
        sent_tx.send(()).unwrap();
        stream.discard_until_closed();
    });
    let mut client = Client::connect(addr, config()).unwrap();
    sent_rx.recv_timeout(WAIT).unwrap();
    assert!(matches!(
        client.send(&message("MSG1")),
        Err(ClientError::Desync)
    ));
    expect_closed(&mut client);
    fake.join().unwrap();
}

#[test]
fn extra_frame_after_an_ack_is_desync_on_the_next_send() {
    let (addr, fake) = fake(|listener| {
        let mut stream = accept(&listener);
        stream.read_frame();
        // The right ACK and a stray one, in one write (one segment): both arrive together.
        let mut reply = framed_ack("MSG1");
        reply.extend(framed_ack("STRAY"));
        stream.send(&reply);
        stream.discard_until_closed();
    });
    let mut client = Client::connect(addr, config()).unwrap();
    assert_eq!(client.send(&message("MSG1")).unwrap().control_id, "MSG1");
    assert!(matches!(
        client.send(&message("MSG2")),
        Err(ClientError::Desync)
    ));
    expect_closed(&mut client);
    fake.join().unwrap();
}

#[test]
fn partial_frame_then_silence_times_out() {
    let (addr, fake) = fake(|listener| {
        let mut stream = accept(&listener);
        stream.read_frame();
        let ack = framed_ack("MSG1");
        stream.send(&ack[..ack.len() / 2]);
        stream.discard_until_closed();
    });
    let mut client = Client::connect(addr, config().response_timeout(SHORT)).unwrap();
    let start = Instant::now();
    assert!(matches!(
        client.send(&message("MSG1")),
        Err(ClientError::Timeout)
    ));
    let elapsed = start.elapsed();
    assert!(
        elapsed >= SHORT && elapsed < IO_TIMEOUT / 2,
        "timed out after {elapsed:?}"
    );
    expect_closed(&mut client);
    fake.join().unwrap();
}

#[test]
fn wrong_msa_2_is_mismatch() {
    let (addr, fake) = fake(|listener| {
        let mut stream = accept(&listener);
        stream.read_frame();
        stream.send(&framed_ack("OTHER"));
        stream.discard_until_closed();
    });
    let mut client = Client::connect(addr, config()).unwrap();
    match client.send(&message("MSG1")) {
        Err(ClientError::Mismatch { expected, got }) => {
            assert_eq!((expected.as_str(), got.as_str()), ("MSG1", "OTHER"));
        }
        other => panic!("expected a mismatch, got {other:?}"),
    }
    expect_closed(&mut client);
    fake.join().unwrap();
}

#[test]
fn dribbling_server_cannot_stretch_the_deadline() {
    let dribbled = Arc::new(AtomicUsize::new(0));
    let stop_dribble = Arc::new(AtomicBool::new(false));
    let (count, stop_flag) = (Arc::clone(&dribbled), Arc::clone(&stop_dribble));
    let (addr, fake) = fake(move |listener| {
        let mut stream = accept(&listener);
        stream.read_frame();
        // A whole, correct ACK, one byte every 50 ms: every read the client makes succeeds
        // well within any per-read timeout, but the ACK takes seconds to complete.
        for byte in framed_ack("MSG1") {
            if stop_flag.load(Ordering::Relaxed) || stream.stream.write_all(&[byte]).is_err() {
                return;
            }
            count.fetch_add(1, Ordering::Relaxed);
            thread::sleep(Duration::from_millis(50));
        }
    });
    let mut client = Client::connect(addr, config().response_timeout(SHORT)).unwrap();
    let start = Instant::now();
    assert!(matches!(
        client.send(&message("MSG1")),
        Err(ClientError::Timeout)
    ));
    let elapsed = start.elapsed();
    stop_dribble.store(true, Ordering::Relaxed);
    assert!(
        elapsed >= SHORT && elapsed < Duration::from_secs(1),
        "timed out after {elapsed:?}"
    );
    assert!(
        dribbled.load(Ordering::Relaxed) >= 2,
        "the server was dribbling"
    );
    expect_closed(&mut client);
    fake.join().unwrap();
}

#[test]
fn oversize_reply_is_response_too_large() {
    let (addr, fake) = fake(|listener| {
        let mut stream = accept(&listener);
        stream.read_frame();
        let mut big = ack::accept(&message("MSG1")).to_vec();
        big.extend(std::iter::repeat_n(b'X', 4096));
        stream.send(&frame(&big));
        stream.discard_until_closed();
    });
    let mut client = Client::connect(addr, config().max_response_size(1024)).unwrap();
    assert!(matches!(
        client.send(&message("MSG1")),
        Err(ClientError::ResponseTooLarge { limit: 1024 })
    ));
    expect_closed(&mut client);
    fake.join().unwrap();
}

#[test]
fn server_closing_before_its_ack_is_io_then_closed() {
    let (addr, fake) = fake(|listener| {
        let mut stream = accept(&listener);
        stream.read_frame();
        // Dropped without an answer.
    });
    let mut client = Client::connect(addr, config()).unwrap();
    match client.send(&message("MSG1")) {
        Err(ClientError::Io(e)) => {
            assert!(
                matches!(
                    e.kind(),
                    ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset
                ),
                "{e}"
            );
        }
        other => panic!("expected an i/o error, got {other:?}"),
    }
    expect_closed(&mut client);
    fake.join().unwrap();
}

#[test]
fn server_closing_an_idle_connection_is_closed_without_sending() {
    let (closed_tx, closed_rx) = mpsc::channel();
    let (addr, fake) = fake(move |listener| {
        drop(accept(&listener));
        closed_tx.send(()).unwrap();
    });
    let mut client = Client::connect(addr, config()).unwrap();
    closed_rx.recv_timeout(WAIT).unwrap();
    fake.join().unwrap();
    // The close is seen before anything is written.
    assert!(matches!(
        client.send(&message("MSG1")),
        Err(ClientError::Closed)
    ));
}

/// The classic client mis-pairing: message 1 times out, its ACK arrives late, and is returned as
/// the answer to message 2. Here the timed-out connection is gone, so it cannot be.
#[test]
fn late_ack_after_a_timeout_is_never_returned_for_the_next_message() {
    let (late_tx, late_rx) = mpsc::channel::<()>();
    let (done_tx, done_rx) = mpsc::channel();
    let (addr, fake) = fake(move |listener| {
        let mut stream = accept(&listener);
        stream.read_frame();
        late_rx.recv_timeout(WAIT).unwrap();
        // The client may already have reset the connection; the ACK is late either way.
        let _ = stream.stream.write_all(&framed_ack("MSG1"));
        done_tx.send(()).unwrap();
    });
    let mut client = Client::connect(addr, config().response_timeout(SHORT)).unwrap();
    assert!(matches!(
        client.send(&message("MSG1")),
        Err(ClientError::Timeout)
    ));
    late_tx.send(()).unwrap();
    done_rx.recv_timeout(WAIT).unwrap();
    // Not `Ok(ack of MSG1)`.
    expect_closed(&mut client);
    fake.join().unwrap();
}

#[test]
fn late_ack_after_a_timeout_with_reconnect_the_next_message_gets_its_own_ack() {
    let (late_tx, late_rx) = mpsc::channel::<()>();
    let (addr, fake) = fake(move |listener| {
        let mut first = accept(&listener);
        assert_eq!(first.read_frame(), message("MSG1"));
        late_rx.recv_timeout(WAIT).unwrap();
        let _ = first.stream.write_all(&framed_ack("MSG1"));
        // The client's next send must come on a new connection.
        let mut second = accept(&listener);
        assert_eq!(second.read_frame(), message("MSG2"));
        second.send(&framed_ack("MSG2"));
        second.discard_until_closed();
    });
    let backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(50), 3);
    let config = config().response_timeout(SHORT).reconnect(Some(backoff));
    let mut client = Client::connect(addr, config).unwrap();
    assert!(matches!(
        client.send(&message("MSG1")),
        Err(ClientError::Timeout)
    ));
    assert!(!client.is_connected());
    late_tx.send(()).unwrap();
    let ack = client.send(&message("MSG2")).unwrap();
    assert_eq!(ack.control_id, "MSG2");
    drop(client);
    fake.join().unwrap();
}

#[test]
fn reconnects_with_backoff_after_the_server_drops_the_connection() {
    let (gone_tx, gone_rx) = mpsc::channel();
    let (addr, first) = fake(move |listener| {
        let mut stream = accept(&listener);
        stream.read_frame();
        stream.send(&framed_ack("MSG1"));
        // Connection and listener gone: the server went down.
        drop(stream);
        drop(listener);
        gone_tx.send(()).unwrap();
    });
    // Delays before jitter 20, 40, 40 ms; after it at least 10 + 20 + 20 = 50 ms in all.
    let backoff = Backoff::new(Duration::from_millis(20), Duration::from_millis(40), 4);
    let mut client = Client::connect(addr, config().reconnect(Some(backoff))).unwrap();
    assert_eq!(client.send(&message("MSG1")).unwrap().control_id, "MSG1");
    gone_rx.recv_timeout(WAIT).unwrap();
    first.join().unwrap();

    // While the server is down: every attempt refused, with backoff between them.
    let start = Instant::now();
    match client.send(&message("MSG2")) {
        Err(ClientError::Connect(e)) => assert_eq!(e.kind(), ErrorKind::ConnectionRefused),
        other => panic!("expected a connect error, got {other:?}"),
    }
    let elapsed = start.elapsed();
    assert!(
        elapsed >= Duration::from_millis(50) && elapsed < IO_TIMEOUT / 2,
        "{elapsed:?}"
    );

    // The server is back on the same address: the next send reconnects.
    let listener = TcpListener::bind(addr).expect("rebind the same address");
    let second = thread::spawn(move || {
        let mut stream = accept(&listener);
        assert_eq!(stream.read_frame(), message("MSG3"));
        stream.send(&framed_ack("MSG3"));
        stream.discard_until_closed();
    });
    assert_eq!(client.send(&message("MSG3")).unwrap().control_id, "MSG3");
    drop(client);
    second.join().unwrap();
}

#[test]
fn pipelined_50_messages_window_8_are_all_correlated() {
    let server = start_server();
    let mut client = Client::connect(server.addr, config()).unwrap();
    let messages: Vec<Vec<u8>> = (0..50).map(|i| message(&format!("P{i}"))).collect();
    let acks = client.send_pipelined(&messages, 8).unwrap();
    assert_eq!(acks.len(), 50);
    for (i, ack) in acks.iter().enumerate() {
        assert_eq!(ack.code, AckCode::AA);
        assert_eq!(ack.control_id, format!("P{i}"));
    }
    // Nothing left over: the connection goes on serving plain sends and more batches.
    assert_eq!(client.send(&message("AFTER")).unwrap().control_id, "AFTER");
    let refs: Vec<&[u8]> = messages.iter().map(Vec::as_slice).collect();
    assert_eq!(client.send_pipelined(&refs[..3], 0).unwrap().len(), 3);
    assert!(client.send_pipelined::<&[u8]>(&[], 8).unwrap().is_empty());
    server.stop();
}

#[test]
fn pipelined_refuses_the_whole_batch_if_any_control_id_is_missing() {
    let server = start_server();
    let mut client = Client::connect(server.addr, config()).unwrap();
    let batch = [message("P0"), b"garbage".to_vec(), message("P2")];
    assert!(matches!(
        client.send_pipelined(&batch, 4),
        Err(ClientError::NoControlId)
    ));
    // Nothing was sent: no ACK is waiting to be mistaken for the next one.
    assert!(client.is_connected());
    assert_eq!(client.send(&message("P3")).unwrap().control_id, "P3");
    server.stop();
}

#[test]
fn pipelined_acks_out_of_order_are_a_mismatch() {
    let (addr, fake) = fake(|listener| {
        let mut stream = accept(&listener);
        assert_eq!(
            [stream.read_frame(), stream.read_frame()],
            [message("P0"), message("P1")]
        );
        assert!(stream.buffered().is_empty(), "more than 2 frames");
        let mut reply = framed_ack("P1");
        reply.extend(framed_ack("P0"));
        stream.send(&reply);
        stream.discard_until_closed();
    });
    let mut client = Client::connect(addr, config()).unwrap();
    let mut acks = Vec::new();
    match client.send_pipelined_into(&[message("P0"), message("P1")], 2, &mut acks) {
        Err(ClientError::Mismatch { expected, got }) => {
            assert_eq!((expected.as_str(), got.as_str()), ("P0", "P1"));
        }
        other => panic!("expected a mismatch, got {other:?}"),
    }
    assert!(acks.is_empty());
    expect_closed(&mut client);
    fake.join().unwrap();
}

#[test]
fn connect_fails_when_nothing_listens() {
    let addr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    match Client::connect(addr, config()) {
        Err(ClientError::Connect(e)) => assert_eq!(e.kind(), ErrorKind::ConnectionRefused),
        other => panic!("expected a connect error, got {other:?}"),
    }
}
