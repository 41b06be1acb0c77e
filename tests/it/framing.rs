//! Framing over a real socket: frames split and batched every way TCP can
//! deliver them, junk, empty frames, and the size limit.

use std::io::{ErrorKind, Write};
use std::time::Duration;

use mllp_reactor::ack::AckCode;
use mllp_reactor::{CloseReason, ExceptionReason};

use crate::util::{
    self, CR, EB, Event, Peer, SB, accept, ack_msg, assert_ack, echo, frame, pause, start,
    start_observed, stop,
};

#[test]
fn frame_split_over_two_sends() {
    let server = start(echo());
    let mut peer = Peer::connect(server.local_addr());
    let payload = ack_msg("SPLIT");
    let framed = frame(&payload);
    let (head, tail) = framed.split_at(framed.len() / 2);
    peer.send(head);
    pause();
    peer.send(tail);
    assert_eq!(peer.read_frame(), payload);
    stop(server);
}

#[test]
fn two_frames_in_one_packet() {
    let server = start(accept());
    let mut peer = Peer::connect(server.local_addr());
    let mut both = frame(&ack_msg("TWO1"));
    both.extend(frame(&ack_msg("TWO2")));
    peer.send(&both);
    assert_ack(&peer.read_frame(), AckCode::AA, "TWO1");
    assert_ack(&peer.read_frame(), AckCode::AA, "TWO2");
    stop(server);
}

#[test]
fn hundred_frames_in_one_write_are_answered_in_order() {
    let server = start(accept());
    let mut peer = Peer::connect(server.local_addr());
    let batch: Vec<u8> = (0..100)
        .flat_map(|i| frame(&ack_msg(&format!("B{i}"))))
        .collect();
    peer.send(&batch);
    for i in 0..100 {
        assert_ack(&peer.read_frame(), AckCode::AA, &format!("B{i}"));
    }
    stop(server);
}

#[test]
fn one_byte_per_write() {
    let server = start(echo());
    let mut peer = Peer::connect(server.local_addr());
    let payload = ack_msg("DRIP");
    for byte in frame(&payload) {
        peer.send(&[byte]);
    }
    assert_eq!(peer.read_frame(), payload);
    // The connection is in a clean state afterwards.
    assert_eq!(peer.roundtrip(b"MSH|^~\\&|NEXT"), b"MSH|^~\\&|NEXT");
    stop(server);
}

#[test]
fn split_between_end_block_and_carriage_return() {
    let server = start(echo());
    let mut peer = Peer::connect(server.local_addr());
    let payload = ack_msg("EBCR");
    let mut head = vec![SB];
    head.extend_from_slice(&payload);
    head.push(EB);
    peer.send(&head);
    // 1C alone ends nothing: no reply may come until the 0D.
    peer.stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut byte = [0u8; 1];
    let early = std::io::Read::read(&mut peer.stream, &mut byte);
    assert!(
        matches!(&early, Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)),
        "reply before the frame was complete: {early:?}"
    );
    peer.stream
        .set_read_timeout(Some(util::IO_TIMEOUT))
        .unwrap();
    peer.send(&[CR]);
    assert_eq!(peer.read_frame(), payload);
    stop(server);
}

#[test]
fn end_block_without_carriage_return_is_payload() {
    let server = start(echo());
    let mut peer = Peer::connect(server.local_addr());
    let payload = b"MSH|^~\\&|A\x1cB\x1c\x1c\x0bC".to_vec();
    assert_eq!(peer.roundtrip(&payload), payload);
    stop(server);
}

#[test]
fn junk_before_and_between_frames_is_dropped() {
    let (server, mut events) = start_observed(echo(), |b| b);
    let mut peer = Peer::connect(server.local_addr());
    let mut wire = b"GET / HTTP/1.1\r\n\x1c\x0d".to_vec(); // junk, and a lone EB CR
    wire.extend(frame(b"MSH|^~\\&|ONE"));
    wire.extend(b"\r\n\x00\xff between \x1c\x0d");
    wire.extend(frame(b"MSH|^~\\&|TWO"));
    peer.send(&wire);
    pause();
    peer.send(b"trailing junk, then a frame split: \x0bMSH|^~\\&|TH");
    pause();
    peer.send(b"REE\x1c\x0d");
    assert_eq!(peer.read_frame(), b"MSH|^~\\&|ONE");
    assert_eq!(peer.read_frame(), b"MSH|^~\\&|TWO");
    assert_eq!(peer.read_frame(), b"MSH|^~\\&|THREE");
    let me = peer.local_addr();
    drop(peer);
    events.expect_close(me, CloseReason::PeerClosed);
    // Exactly three messages reached the handler.
    assert_eq!(
        events.count(|e| matches!(e, Event::MsgStart { .. }) && e.peer() == me),
        3
    );
    stop(server);
}

#[test]
fn empty_frame_reaches_the_handler() {
    let (server, mut events) = start_observed(echo(), |b| b);
    let mut peer = Peer::connect(server.local_addr());
    peer.send(&[SB, EB, CR]);
    assert_eq!(peer.read_frame(), b"");
    let me = peer.local_addr();
    events.wait("empty message", |e| {
        matches!(
            e,
            Event::MsgStart {
                size: 0,
                seq: 0,
                ..
            }
        ) && e.peer() == me
    });
    assert_eq!(peer.roundtrip(b"MSH|^~\\&|AFTER"), b"MSH|^~\\&|AFTER");
    stop(server);
}

#[test]
fn message_of_exactly_the_limit_passes() {
    let server = util::start_with(echo(), |b| b.max_message_size(1024));
    let mut peer = Peer::connect(server.local_addr());
    let mut payload = ack_msg("EXACT");
    payload.resize(1024, b'x');
    assert_eq!(peer.roundtrip(&payload), payload);
    stop(server);
}

#[test]
fn oversize_frame_gets_an_ar_nak_then_close() {
    let (server, mut events) = start_observed(accept(), |b| b.max_message_size(1024));
    let mut peer = Peer::connect(server.local_addr());
    let mut payload = ack_msg("TOOBIG");
    payload.resize(1025, b'x');
    peer.send_frame(&payload);
    assert_ack(&peer.read_frame(), AckCode::AR, "TOOBIG");
    peer.expect_closed();
    let me = peer.local_addr();
    events.expect_close(me, CloseReason::MessageTooLarge);
    let exception = events.wait("oversize exception", |e| {
        matches!(e, Event::MsgException { .. }) && e.peer() == me
    });
    assert!(matches!(
        exception,
        Event::MsgException {
            seq: None,
            reason: ExceptionReason::MessageTooLarge,
            ..
        }
    ));
    // The handler never saw it.
    assert_eq!(
        events.count(|e| matches!(e, Event::MsgStart { .. }) && e.peer() == me),
        0
    );
    // Other connections go on.
    let mut other = Peer::connect(server.local_addr());
    assert_ack(&other.roundtrip(&ack_msg("SMALL")), AckCode::AA, "SMALL");
    stop(server);
}

#[test]
fn endless_frame_is_cut_off_at_the_limit() {
    const LIMIT: usize = 64 * 1024;
    // Past this many bytes written the server has clearly failed to stop us: the limit, one
    // read of the server, and every socket buffer between us (loopback buffers grow to a few
    // MiB) fit in it many times over.
    const CAP: usize = 64 << 20;
    let (server, mut events) = start_observed(accept(), |b| b.max_message_size(LIMIT));
    let mut peer = Peer::connect(server.local_addr());
    let me = peer.local_addr();
    let mut writer = peer.stream.try_clone().unwrap();
    let flood = util::spawn(move || {
        let mut head = vec![SB];
        head.extend(ack_msg("ENDLESS"));
        writer.write_all(&head).unwrap();
        let chunk = vec![b'x'; 16 * 1024];
        let mut written = head.len();
        while written < CAP {
            match writer.write(&chunk) {
                Ok(n) => written += n,
                Err(e) if util::is_reset(&e) => return written,
                Err(e) => panic!("write failed with {e} after {written} bytes"),
            }
        }
        panic!("the server took {written} bytes of one frame without closing");
    });
    assert_ack(&peer.read_frame(), AckCode::AR, "ENDLESS");
    peer.expect_closed();
    let written = flood.join().expect("the server closed the connection");
    assert!(
        written > LIMIT,
        "closed after {written} bytes, before the limit"
    );
    events.expect_close(me, CloseReason::MessageTooLarge);
    let Event::MsgException { size, .. } = events.wait("oversize exception", |e| {
        matches!(e, Event::MsgException { .. }) && e.peer() == me
    }) else {
        unreachable!()
    };
    // Memory stayed bounded: rejected as soon as the excess was seen (within one 64 KiB read).
    assert!(
        size > LIMIT && size <= LIMIT + 64 * 1024,
        "rejected at {size} bytes"
    );
    stop(server);
}
