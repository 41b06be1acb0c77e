//! Framing over a real socket: frames split and batched every way TCP can
//! deliver them, junk, empty frames, and the size limit.

use std::io::{ErrorKind, Write};
use std::time::Duration;

use mllp_reactor::ack::AckCode;
use mllp_reactor::telemetry::names::{
    BYTES_RECEIVED, BYTES_SENT, FRAMES_REJECTED, JUNK_BYTES, NAKS_SENT,
};
use mllp_reactor::{CloseReason, ExceptionReason, Server};

use crate::support::{
    self, CR, EB, Event, Expected, SB, Stopped, accepting, assert_ack, echo, frame, message, pause,
    start,
};

#[test]
fn frame_split_over_two_sends() {
    let server = start(Server::builder(echo()));
    let mut peer = server.connect();
    let payload = message("SPLIT");
    let framed = frame(&payload);
    let (head, tail) = framed.split_at(framed.len() / 2);
    peer.send(head);
    pause();
    peer.send(tail);
    assert_eq!(peer.read_frame(), payload);
    server.stop();
}

#[test]
fn hundred_frames_in_one_write_are_answered_in_order() {
    let server = start(Server::builder(accepting()));
    let mut peer = server.connect();
    let payloads: Vec<Vec<u8>> = (0..100).map(|i| message(&format!("B{i}"))).collect();
    let batch: Vec<u8> = payloads.iter().flat_map(|p| frame(p)).collect();
    peer.send(&batch);
    let mut replies = Vec::new();
    for i in 0..100 {
        let reply = peer.read_frame();
        assert_ack(&reply, AckCode::AA, &format!("B{i}"));
        replies.push(reply);
    }
    peer.finish();
    let Stopped { mut events, .. } = server.stop();

    // Each message is started and stopped before the next one starts, in sequence order.
    let id = events.connection_start().connection;
    for (i, (payload, reply)) in payloads.iter().zip(&replies).enumerate() {
        events.answered(id, i as u64, payload.len(), Some(reply.len()));
    }
    events.stopped(id, CloseReason::PeerClosed);
    events.assert_drained();
}

#[test]
fn one_byte_per_write() {
    let server = start(Server::builder(echo()));
    let mut peer = server.connect();
    let payload = message("DRIP");
    for byte in frame(&payload) {
        peer.send(&[byte]);
    }
    assert_eq!(peer.read_frame(), payload);
    // The connection is in a clean state afterwards.
    assert_eq!(peer.roundtrip(b"MSH|^~\\&|NEXT"), b"MSH|^~\\&|NEXT");
    server.stop();
}

#[test]
fn split_between_end_block_and_carriage_return() {
    let server = start(Server::builder(echo()));
    let mut peer = server.connect();
    let payload = message("EBCR");
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
        .set_read_timeout(Some(support::IO_TIMEOUT))
        .unwrap();
    peer.send(&[CR]);
    assert_eq!(peer.read_frame(), payload);
    server.stop();
}

#[test]
fn end_block_without_carriage_return_is_payload() {
    let server = start(Server::builder(echo()));
    let mut peer = server.connect();
    let payload = b"MSH|^~\\&|A\x1cB\x1c\x1c\x0bC".to_vec();
    assert_eq!(peer.roundtrip(&payload), payload);
    server.stop();
}

#[test]
fn junk_before_and_between_frames_is_dropped_and_counted() {
    let mut server = start(Server::builder(echo()));
    let mut peer = server.connect();
    let (one, two, three) = (b"MSH|^~\\&|ONE", b"MSH|^~\\&|TWO", b"MSH|^~\\&|THREE");
    // Junk, and a lone EB CR; junk between frames; junk after a frame, then a frame split
    // across writes; junk after the last frame, up to the close.
    let junk: [&[u8]; 4] = [
        b"GET / HTTP/1.1\r\n\x1c\x0d",
        b"\r\n\x00\xff between \x1c\x0d",
        b"trailing junk, then a frame split: ",
        b"tail!",
    ];
    let mut wire = junk[0].to_vec();
    wire.extend(frame(one));
    wire.extend(junk[1]);
    wire.extend(frame(two));
    peer.send(&wire);
    pause();
    let mut split = junk[2].to_vec();
    split.extend(b"\x0bMSH|^~\\&|TH");
    peer.send(&split);
    pause();
    let mut end = b"REE\x1c\x0d".to_vec();
    end.extend(junk[3]);
    peer.send(&end);
    let replies = [peer.read_frame(), peer.read_frame(), peer.read_frame()];
    assert_eq!(replies, [&one[..], &two[..], &three[..]]);
    let me = peer.local_addr();
    peer.finish();
    server.events.expect_close(me, CloseReason::PeerClosed);
    // Exactly three messages reached the handler.
    assert_eq!(
        server
            .events
            .count(|e| matches!(e, Event::MessageStart(_)) && e.peer() == me),
        3
    );
    let junk_bytes: usize = junk.iter().map(|j| j.len()).sum();
    let mut expected = Expected::new()
        .accepted(1)
        .counter(JUNK_BYTES, &[], junk_bytes as u64)
        .counter(BYTES_RECEIVED, &[], junk_bytes as u64)
        .closed(CloseReason::PeerClosed, 1);
    for payload in [&one[..], &two[..], &three[..]] {
        expected = expected.replied(payload, payload);
    }
    server.stop().metrics.assert_exactly(&expected);
}

#[test]
fn empty_frame_reaches_the_handler() {
    let mut server = start(Server::builder(echo()));
    let mut peer = server.connect();
    peer.send(&[SB, EB, CR]);
    assert_eq!(peer.read_frame(), b"");
    let me = peer.local_addr();
    server.events.wait("empty message", |e| {
        matches!(e, Event::MessageStart(m) if m.message_size == 0 && m.sequence == 0)
            && e.peer() == me
    });
    assert_eq!(peer.roundtrip(b"MSH|^~\\&|AFTER"), b"MSH|^~\\&|AFTER");
    server.stop();
}

#[test]
fn message_of_exactly_the_limit_passes() {
    let server = start(Server::builder(echo()).max_message_size(1024));
    let mut peer = server.connect();
    let mut payload = message("EXACT");
    payload.resize(1024, b'x');
    assert_eq!(peer.roundtrip(&payload), payload);
    server.stop();
}

#[test]
fn oversize_frame_gets_an_ar_nak_then_close() {
    const MAX: usize = 1024;
    let mut server = start(Server::builder(accepting()).max_message_size(MAX));
    let addr = server.addr;
    let mut peer = server.connect();
    let me = peer.local_addr();
    let mut payload = message("TOOBIG");
    payload.resize(MAX + 1, b'x');
    let framed = frame(&payload);
    peer.send(&framed);
    let nak = peer.read_frame();
    assert_ack(&nak, AckCode::AR, "TOOBIG");
    // A clean close: the server read the whole frame before it answered.
    assert!(peer.read_to_eof().is_empty());
    server.events.expect_close(me, CloseReason::MessageTooLarge);
    // Other connections go on.
    let mut other = server.connect();
    let small = message("SMALL");
    let reply = other.roundtrip(&small);
    assert_ack(&reply, AckCode::AA, "SMALL");
    let other_addr = other.local_addr();
    other.finish();
    let Stopped {
        metrics,
        mut events,
        ..
    } = server.stop();

    // The handler never saw it: an exception without a message start, then the stop.
    let id = events.started(me, addr).connection;
    let failed = events.message_exception();
    assert_eq!(failed.connection, id);
    assert_eq!((failed.peer, failed.local), (me, addr));
    assert_eq!(failed.reason, ExceptionReason::MessageTooLarge);
    assert_eq!(
        failed.sequence, None,
        "an oversize frame is never dispatched"
    );
    assert_eq!(failed.duration, Duration::ZERO);
    assert!(
        failed.message_size > MAX && failed.message_size <= payload.len(),
        "message_size {} is the payload received when rejected",
        failed.message_size
    );
    assert_eq!(failed.detail, None);
    events.stopped(id, CloseReason::MessageTooLarge);
    let other_id = events.started(other_addr, addr).connection;
    assert_ne!(other_id, id);
    events.answered(other_id, 0, small.len(), Some(reply.len()));
    events.stopped(other_id, CloseReason::PeerClosed);
    events.assert_drained();

    // The rest of the rejected frame is discarded with the connection: not counted as junk.
    let expected = Expected::new()
        .accepted(2)
        .counter(BYTES_RECEIVED, &[], framed.len() as u64)
        .counter(BYTES_SENT, &[], nak.len() as u64 + 3)
        .counter(FRAMES_REJECTED, &[("reason", "too_large")], 1)
        .counter(NAKS_SENT, &[("code", "AR")], 1)
        .closed(CloseReason::MessageTooLarge, 1)
        .replied(&small, &reply)
        .closed(CloseReason::PeerClosed, 1);
    metrics.assert_exactly(&expected);
}

#[test]
fn endless_frame_is_cut_off_at_the_limit() {
    const LIMIT: usize = 64 * 1024;
    // Past this many bytes written the server has clearly failed to stop us: the limit, one
    // read of the server, and every socket buffer between us (loopback buffers grow to a few
    // MiB) fit in it many times over.
    const CAP: usize = 64 << 20;
    let mut server = start(Server::builder(accepting()).max_message_size(LIMIT));
    let mut peer = server.connect();
    let me = peer.local_addr();
    let mut writer = peer.stream.try_clone().unwrap();
    let flood = support::spawn(move || {
        let mut head = vec![SB];
        head.extend(message("ENDLESS"));
        writer.write_all(&head).unwrap();
        let chunk = vec![b'x'; 16 * 1024];
        let mut written = head.len();
        while written < CAP {
            match writer.write(&chunk) {
                Ok(n) => written += n,
                Err(e) if support::is_reset(&e) => return written,
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
    server.events.expect_close(me, CloseReason::MessageTooLarge);
    let Event::MessageException(exception) = server.events.wait("oversize exception", |e| {
        matches!(e, Event::MessageException(_)) && e.peer() == me
    }) else {
        unreachable!()
    };
    let size = exception.message_size;
    // Memory stayed bounded: rejected as soon as the excess was seen (within one 64 KiB read).
    assert!(
        size > LIMIT && size <= LIMIT + 64 * 1024,
        "rejected at {size} bytes"
    );
    server.stop();
}
