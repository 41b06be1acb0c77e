//! The blocking client against our server and against small scripted fake servers (plain
//! `std::net` on 127.0.0.1:0, one thread each). Every blocking step has a bound: sockets get
//! [`LIMIT`] timeouts, accepts are polled up to [`LIMIT`], and test threads hand each other
//! signals over channels read with `recv_timeout`.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use mllp_reactor::ack::{self, AckCode};
use mllp_reactor::codec::{FrameDecoder, encode_frame};
use mllp_reactor::{
    Backoff, Client, ClientConfig, ClientError, Reply, Server, ServerHandle, handler_fn,
};

/// Bound on any single blocking step in these tests.
const LIMIT: Duration = Duration::from_secs(5);

/// The response timeout of the tests that provoke a timeout: short to keep them fast, long
/// enough that a loaded 2-core machine still answers in time where an answer is expected.
const SHORT: Duration = Duration::from_millis(300);

fn msg(id: &str) -> Vec<u8> {
    format!("MSH|^~\\&|LAB|HOSP|EHR|WARD|20260101120000||ORU^R01|{id}|P|2.5.1\rPID|1\r")
        .into_bytes()
}

fn framed(payload: &[u8]) -> Vec<u8> {
    let mut out = BytesMut::new();
    encode_frame(payload, &mut out);
    out.to_vec()
}

/// The AA our server would send for message `id`, framed.
fn framed_ack(id: &str) -> Vec<u8> {
    framed(&ack::accept(&msg(id)))
}

fn config() -> ClientConfig {
    ClientConfig::default()
        .connect_timeout(LIMIT)
        .response_timeout(LIMIT)
}

/// Our server: AA, except AE for control ids starting with `E` and AR for those with `R`.
fn start_server() -> ServerHandle {
    let handler = handler_fn(|m, _| {
        let id = mllp_reactor::msh::Msh::parse(m)
            .ok()
            .and_then(|msh| msh.control_id())
            .unwrap_or_default();
        Ok(Reply::Send(match id.first() {
            Some(b'E') => ack::nak(m, AckCode::AE, "rejected by test"),
            Some(b'R') => ack::nak(m, AckCode::AR, "refused by test"),
            _ => ack::accept(m),
        }))
    });
    crate::util::with_test_reactors(Server::builder(handler))
        .bind("127.0.0.1:0")
        .expect("bind")
        .spawn()
        .expect("spawn")
}

fn stop(server: ServerHandle) {
    server.shutdown(LIMIT).expect("clean shutdown");
}

/// A fake server: `script` runs on its own thread with the listener.
fn fake(script: impl FnOnce(TcpListener) + Send + 'static) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind fake server");
    let addr = listener.local_addr().expect("fake server address");
    (addr, thread::spawn(move || script(listener)))
}

/// Accepts one connection within [`LIMIT`] (std's `accept` has no timeout, so it is polled).
#[track_caller]
fn accept(listener: &TcpListener) -> TcpStream {
    listener
        .set_nonblocking(true)
        .expect("nonblocking listener");
    let give_up = Instant::now() + LIMIT;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).expect("blocking stream");
                stream.set_read_timeout(Some(LIMIT)).expect("read timeout");
                stream
                    .set_write_timeout(Some(LIMIT))
                    .expect("write timeout");
                return stream;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < give_up => {
                thread::sleep(Duration::from_millis(2));
            }
            Err(e) => panic!("no connection within {LIMIT:?}: {e}"),
        }
    }
}

/// Reads one frame's payload (the stream has [`LIMIT`] timeouts).
#[track_caller]
fn read_frame(stream: &mut TcpStream) -> Vec<u8> {
    read_frames(stream, 1).remove(0)
}

/// Reads `n` frames' payloads, however they are split across reads.
#[track_caller]
fn read_frames(stream: &mut TcpStream, n: usize) -> Vec<Vec<u8>> {
    let mut decoder = FrameDecoder::new(1 << 20);
    let mut buf = BytesMut::new();
    let mut chunk = [0u8; 4096];
    let mut frames = Vec::new();
    while frames.len() < n {
        if let Some(frame) = decoder.decode(&mut buf).expect("frame within limit") {
            frames.push(frame.to_vec());
            continue;
        }
        let read = stream.read(&mut chunk).expect("frame from the client");
        assert_ne!(read, 0, "client closed before a whole frame");
        buf.extend_from_slice(&chunk[..read]);
    }
    assert!(buf.is_empty(), "more than {n} frames");
    frames
}

/// Waits until the client closes its end (EOF or reset), within [`LIMIT`].
#[track_caller]
fn wait_closed(stream: &mut TcpStream) {
    let mut sink = [0u8; 4096];
    loop {
        match stream.read(&mut sink) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return,
            Err(e) => panic!("client did not close its connection: {e}"),
        }
    }
}

#[track_caller]
fn expect_closed(client: &mut Client) {
    match client.send(&msg("AFTER")) {
        Err(ClientError::Closed) => {}
        other => panic!("expected Closed, got {other:?}"),
    }
    assert!(!client.is_connected());
}

#[test]
fn accepted_messages_get_their_own_aa_on_one_connection() {
    let server = start_server();
    let mut client = Client::connect(server.local_addr(), config()).unwrap();
    assert_eq!(client.peer_addr(), Some(server.local_addr()));
    for id in ["MSG1", "MSG2", "MSG3"] {
        let ack = client.send(&msg(id)).unwrap();
        assert_eq!(ack.code, AckCode::AA);
        assert_eq!(ack.control_id, id);
        assert_eq!(ack.text, None);
        assert!(ack.is_accept());
        assert_eq!(ack::parse(&ack.raw).unwrap().control_id, id.as_bytes());
        assert!(client.is_connected());
    }
    client.close();
    expect_closed(&mut client);
    stop(server);
}

#[test]
fn ae_and_ar_are_returned_as_acks_not_errors() {
    let server = start_server();
    let mut client = Client::connect(server.local_addr(), config()).unwrap();
    let ae = client.send(&msg("E1")).unwrap();
    assert_eq!((ae.code, ae.control_id.as_str()), (AckCode::AE, "E1"));
    assert_eq!(ae.text.as_deref(), Some("rejected by test"));
    assert!(!ae.is_accept());
    let ar = client.send(&msg("R2")).unwrap();
    assert_eq!((ar.code, ar.control_id.as_str()), (AckCode::AR, "R2"));
    assert_eq!(ar.text.as_deref(), Some("refused by test"));
    // A NAK is an answer: the connection is kept.
    assert_eq!(client.send(&msg("OK3")).unwrap().code, AckCode::AA);
    stop(server);
}

#[test]
fn message_without_control_id_is_refused_unless_allowed() {
    let server = start_server();
    let no_id = b"MSH|^~\\&|LAB|HOSP|EHR|WARD|20260101120000||ORU^R01||P|2.5.1\r";
    let mut client = Client::connect(server.local_addr(), config()).unwrap();
    assert!(matches!(client.send(no_id), Err(ClientError::NoControlId)));
    assert!(matches!(
        client.send(b"not hl7"),
        Err(ClientError::NoControlId)
    ));
    // Nothing was sent, so the connection is still clean and usable.
    assert!(client.is_connected());
    assert_eq!(client.send(&msg("MSG1")).unwrap().control_id, "MSG1");

    let mut lenient =
        Client::connect(server.local_addr(), config().allow_missing_control_id(true)).unwrap();
    // Our server rejects a message it cannot identify: AR with an empty MSA-2.
    let ack = lenient.send(no_id).unwrap();
    assert_eq!((ack.code, ack.control_id.as_str()), (AckCode::AR, ""));
    // Messages that have an id are still correlated.
    assert_eq!(lenient.send(&msg("MSG2")).unwrap().control_id, "MSG2");
    stop(server);
}

#[test]
fn stale_frame_waiting_before_a_send_is_desync() {
    let (sent_tx, sent_rx) = mpsc::channel();
    let (addr, fake) = fake(move |listener| {
        let mut stream = accept(&listener);
        // An ACK nobody asked for, e.g. the late answer to a message of an earlier session.
        stream.write_all(&framed_ack("OLD")).unwrap();
        sent_tx.send(()).unwrap();
        wait_closed(&mut stream);
    });
    let mut client = Client::connect(addr, config()).unwrap();
    sent_rx.recv_timeout(LIMIT).unwrap();
    assert!(matches!(
        client.send(&msg("MSG1")),
        Err(ClientError::Desync)
    ));
    expect_closed(&mut client);
    fake.join().unwrap();
}

#[test]
fn extra_frame_after_an_ack_is_desync_on_the_next_send() {
    let (addr, fake) = fake(|listener| {
        let mut stream = accept(&listener);
        read_frame(&mut stream);
        // The right ACK and a stray one, in one write (one segment): both arrive together.
        let mut reply = framed_ack("MSG1");
        reply.extend(framed_ack("STRAY"));
        stream.write_all(&reply).unwrap();
        wait_closed(&mut stream);
    });
    let mut client = Client::connect(addr, config()).unwrap();
    assert_eq!(client.send(&msg("MSG1")).unwrap().control_id, "MSG1");
    assert!(matches!(
        client.send(&msg("MSG2")),
        Err(ClientError::Desync)
    ));
    expect_closed(&mut client);
    fake.join().unwrap();
}

#[test]
fn partial_frame_then_silence_times_out() {
    let (addr, fake) = fake(|listener| {
        let mut stream = accept(&listener);
        read_frame(&mut stream);
        let ack = framed_ack("MSG1");
        stream.write_all(&ack[..ack.len() / 2]).unwrap();
        wait_closed(&mut stream);
    });
    let mut client = Client::connect(addr, config().response_timeout(SHORT)).unwrap();
    let start = Instant::now();
    assert!(matches!(
        client.send(&msg("MSG1")),
        Err(ClientError::Timeout)
    ));
    let elapsed = start.elapsed();
    assert!(
        elapsed >= SHORT && elapsed < LIMIT / 2,
        "timed out after {elapsed:?}"
    );
    expect_closed(&mut client);
    fake.join().unwrap();
}

#[test]
fn wrong_msa_2_is_mismatch() {
    let (addr, fake) = fake(|listener| {
        let mut stream = accept(&listener);
        read_frame(&mut stream);
        stream.write_all(&framed_ack("OTHER")).unwrap();
        wait_closed(&mut stream);
    });
    let mut client = Client::connect(addr, config()).unwrap();
    match client.send(&msg("MSG1")) {
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
        read_frame(&mut stream);
        // A whole, correct ACK, one byte every 50 ms: every read the client makes succeeds
        // well within any per-read timeout, but the ACK takes seconds to complete.
        for byte in framed_ack("MSG1") {
            if stop_flag.load(Ordering::Relaxed) || stream.write_all(&[byte]).is_err() {
                return;
            }
            count.fetch_add(1, Ordering::Relaxed);
            thread::sleep(Duration::from_millis(50));
        }
    });
    let mut client = Client::connect(addr, config().response_timeout(SHORT)).unwrap();
    let start = Instant::now();
    assert!(matches!(
        client.send(&msg("MSG1")),
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
        read_frame(&mut stream);
        let mut big = ack::accept(&msg("MSG1")).to_vec();
        big.extend(std::iter::repeat_n(b'X', 4096));
        stream.write_all(&framed(&big)).unwrap();
        wait_closed(&mut stream);
    });
    let mut client = Client::connect(addr, config().max_response_size(1024)).unwrap();
    assert!(matches!(
        client.send(&msg("MSG1")),
        Err(ClientError::ResponseTooLarge { limit: 1024 })
    ));
    expect_closed(&mut client);
    fake.join().unwrap();
}

#[test]
fn server_closing_before_its_ack_is_io_then_closed() {
    let (addr, fake) = fake(|listener| {
        let mut stream = accept(&listener);
        read_frame(&mut stream);
        // Dropped without an answer.
    });
    let mut client = Client::connect(addr, config()).unwrap();
    match client.send(&msg("MSG1")) {
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
    closed_rx.recv_timeout(LIMIT).unwrap();
    fake.join().unwrap();
    // The close is seen before anything is written.
    assert!(matches!(
        client.send(&msg("MSG1")),
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
        read_frame(&mut stream);
        late_rx.recv_timeout(LIMIT).unwrap();
        // The client may already have reset the connection; the ACK is late either way.
        let _ = stream.write_all(&framed_ack("MSG1"));
        done_tx.send(()).unwrap();
    });
    let mut client = Client::connect(addr, config().response_timeout(SHORT)).unwrap();
    assert!(matches!(
        client.send(&msg("MSG1")),
        Err(ClientError::Timeout)
    ));
    late_tx.send(()).unwrap();
    done_rx.recv_timeout(LIMIT).unwrap();
    // Not `Ok(ack of MSG1)`.
    expect_closed(&mut client);
    fake.join().unwrap();
}

#[test]
fn late_ack_after_a_timeout_with_reconnect_the_next_message_gets_its_own_ack() {
    let (late_tx, late_rx) = mpsc::channel::<()>();
    let (addr, fake) = fake(move |listener| {
        let mut first = accept(&listener);
        assert_eq!(read_frame(&mut first), msg("MSG1"));
        late_rx.recv_timeout(LIMIT).unwrap();
        let _ = first.write_all(&framed_ack("MSG1"));
        // The client's next send must come on a new connection.
        let mut second = accept(&listener);
        assert_eq!(read_frame(&mut second), msg("MSG2"));
        second.write_all(&framed_ack("MSG2")).unwrap();
        wait_closed(&mut second);
    });
    let backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(50), 3);
    let config = config().response_timeout(SHORT).reconnect(Some(backoff));
    let mut client = Client::connect(addr, config).unwrap();
    assert!(matches!(
        client.send(&msg("MSG1")),
        Err(ClientError::Timeout)
    ));
    assert!(!client.is_connected());
    late_tx.send(()).unwrap();
    let ack = client.send(&msg("MSG2")).unwrap();
    assert_eq!(ack.control_id, "MSG2");
    drop(client);
    fake.join().unwrap();
}

#[test]
fn reconnects_with_backoff_after_the_server_drops_the_connection() {
    let (gone_tx, gone_rx) = mpsc::channel();
    let (addr, first) = fake(move |listener| {
        let mut stream = accept(&listener);
        read_frame(&mut stream);
        stream.write_all(&framed_ack("MSG1")).unwrap();
        // Connection and listener gone: the server went down.
        drop(stream);
        drop(listener);
        gone_tx.send(()).unwrap();
    });
    // Delays before jitter 20, 40, 40 ms; after it at least 10 + 20 + 20 = 50 ms in all.
    let backoff = Backoff::new(Duration::from_millis(20), Duration::from_millis(40), 4);
    let mut client = Client::connect(addr, config().reconnect(Some(backoff))).unwrap();
    assert_eq!(client.send(&msg("MSG1")).unwrap().control_id, "MSG1");
    gone_rx.recv_timeout(LIMIT).unwrap();
    first.join().unwrap();

    // While the server is down: every attempt refused, with backoff between them.
    let start = Instant::now();
    match client.send(&msg("MSG2")) {
        Err(ClientError::Connect(e)) => assert_eq!(e.kind(), ErrorKind::ConnectionRefused),
        other => panic!("expected a connect error, got {other:?}"),
    }
    let elapsed = start.elapsed();
    assert!(
        elapsed >= Duration::from_millis(50) && elapsed < LIMIT / 2,
        "{elapsed:?}"
    );

    // The server is back on the same address: the next send reconnects.
    let listener = TcpListener::bind(addr).expect("rebind the same address");
    let second = thread::spawn(move || {
        let mut stream = accept(&listener);
        assert_eq!(read_frame(&mut stream), msg("MSG3"));
        stream.write_all(&framed_ack("MSG3")).unwrap();
        wait_closed(&mut stream);
    });
    assert_eq!(client.send(&msg("MSG3")).unwrap().control_id, "MSG3");
    drop(client);
    second.join().unwrap();
}

#[test]
fn pipelined_50_messages_window_8_are_all_correlated() {
    let server = start_server();
    let mut client = Client::connect(server.local_addr(), config()).unwrap();
    let messages: Vec<Vec<u8>> = (0..50).map(|i| msg(&format!("P{i}"))).collect();
    let acks = client.send_pipelined(&messages, 8).unwrap();
    assert_eq!(acks.len(), 50);
    for (i, ack) in acks.iter().enumerate() {
        assert_eq!(ack.code, AckCode::AA);
        assert_eq!(ack.control_id, format!("P{i}"));
    }
    // Nothing left over: the connection goes on serving plain sends and more batches.
    assert_eq!(client.send(&msg("AFTER")).unwrap().control_id, "AFTER");
    let refs: Vec<&[u8]> = messages.iter().map(Vec::as_slice).collect();
    assert_eq!(client.send_pipelined(&refs[..3], 0).unwrap().len(), 3);
    assert!(client.send_pipelined::<&[u8]>(&[], 8).unwrap().is_empty());
    stop(server);
}

#[test]
fn pipelined_refuses_the_whole_batch_if_any_control_id_is_missing() {
    let server = start_server();
    let mut client = Client::connect(server.local_addr(), config()).unwrap();
    let batch = [msg("P0"), b"garbage".to_vec(), msg("P2")];
    assert!(matches!(
        client.send_pipelined(&batch, 4),
        Err(ClientError::NoControlId)
    ));
    // Nothing was sent: no ACK is waiting to be mistaken for the next one.
    assert!(client.is_connected());
    assert_eq!(client.send(&msg("P3")).unwrap().control_id, "P3");
    stop(server);
}

#[test]
fn pipelined_acks_out_of_order_are_a_mismatch() {
    let (addr, fake) = fake(|listener| {
        let mut stream = accept(&listener);
        assert_eq!(read_frames(&mut stream, 2), [msg("P0"), msg("P1")]);
        let mut reply = framed_ack("P1");
        reply.extend(framed_ack("P0"));
        stream.write_all(&reply).unwrap();
        wait_closed(&mut stream);
    });
    let mut client = Client::connect(addr, config()).unwrap();
    let mut acks = Vec::new();
    match client.send_pipelined_into(&[msg("P0"), msg("P1")], 2, &mut acks) {
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
