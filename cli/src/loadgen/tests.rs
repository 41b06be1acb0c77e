use std::io::Write;
use std::net::TcpListener;

use super::*;

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = vec![START_BLOCK];
    out.extend_from_slice(payload);
    out.extend_from_slice(&[END_BLOCK, CARRIAGE_RETURN]);
    out
}

fn ack(code: &str, id: &str) -> Vec<u8> {
    format!(
        "MSH|^~\\&|MLLP|REACTOR|LOADGEN|BENCH|20260101120000||ACK|ACK1|P|2.5.1\rMSA|{code}|{id}\r"
    )
    .into_bytes()
}

/// Drains every complete frame currently available.
fn take_frames(deframer: &mut AckDeframer, out: &mut Vec<Vec<u8>>) {
    while let Some(range) = deframer.next_frame() {
        out.push(deframer.payload(range).to_vec());
    }
}

/// Junk, a normal ACK, a payload with an inner SB and a lone EB, an empty frame, junk between
/// frames and a trailing partial frame.
fn sample_stream() -> (Vec<u8>, Vec<Vec<u8>>, u64) {
    let payloads = vec![
        ack("AA", "1-0000000000"),
        b"MSH|x\x0by\x1cz\rMSA|AA|2\r".to_vec(),
        Vec::new(),
        ack("AE", "3-0000000007"),
    ];
    let mut stream = b"junk".to_vec();
    stream.extend(frame(&payloads[0]));
    stream.extend(frame(&payloads[1]));
    stream.extend(b"\x1c\r");
    stream.extend(frame(&payloads[2]));
    stream.extend(frame(&payloads[3]));
    stream.extend(b"\x0bMSH|partial\x1c");
    (stream, payloads, 4 + 2)
}

#[test]
fn deframer_split_at_every_byte() {
    let (stream, expected, expected_junk) = sample_stream();
    for split in 0..=stream.len() {
        let mut deframer = AckDeframer::new(1024);
        let mut frames = Vec::new();
        assert!(deframer.push(&stream[..split]));
        take_frames(&mut deframer, &mut frames);
        assert!(deframer.push(&stream[split..]));
        take_frames(&mut deframer, &mut frames);
        assert_eq!(frames, expected, "split at {split}");
        assert_eq!(deframer.take_junk(), expected_junk, "split at {split}");
    }
}

#[test]
fn deframer_byte_by_byte_with_compaction() {
    let (stream, expected, expected_junk) = sample_stream();
    // Barely larger than the largest frame, so the buffer compacts many times.
    let largest = expected.iter().map(Vec::len).max().unwrap_or(0);
    let mut deframer = AckDeframer::new(largest + 3);
    let mut frames = Vec::new();
    for &byte in &stream {
        assert!(deframer.push(&[byte]));
        take_frames(&mut deframer, &mut frames);
    }
    assert_eq!(frames, expected);
    assert_eq!(deframer.take_junk(), expected_junk);
}

#[test]
fn deframer_rejects_frame_larger_than_capacity() {
    for (payload_len, fits) in [(14, true), (15, false), (32, false)] {
        let wire = frame(&vec![b'x'; payload_len]);
        let mut deframer = AckDeframer::new(16);
        let mut frames = Vec::new();
        let mut fed = 0;
        while fed < wire.len() {
            take_frames(&mut deframer, &mut frames);
            let Some(spare) = deframer.spare() else { break };
            let n = spare.len().min(wire.len() - fed);
            spare[..n].copy_from_slice(&wire[fed..fed + n]);
            deframer.filled(n);
            fed += n;
        }
        take_frames(&mut deframer, &mut frames);
        assert_eq!(frames.len(), usize::from(fits), "payload of {payload_len}");
        assert_eq!(fed == wire.len(), fits, "payload of {payload_len}");
    }
}

#[test]
fn verify_ack_accepts_matching_aa() {
    assert_eq!(
        verify_ack(&ack("AA", "7-0000000042"), b"7-0000000042"),
        Ok(())
    );
}

#[test]
fn verify_ack_rejects_wrong_msa2() {
    let payload = ack("AA", "7-0000000041");
    assert_eq!(
        verify_ack(&payload, b"7-0000000042"),
        Err(AckError::Mismatch)
    );
    assert_eq!(
        verify_ack(&payload, b"7-000000004"),
        Err(AckError::Mismatch)
    );
    assert_eq!(
        verify_ack(&ack("AA", ""), b"7-0000000042"),
        Err(AckError::Mismatch)
    );
}

#[test]
fn verify_ack_rejects_nak_and_malformed() {
    assert_eq!(verify_ack(&ack("AE", "1-0"), b"1-0"), Err(AckError::Nak));
    assert_eq!(verify_ack(&ack("CA", "1-0"), b"1-0"), Err(AckError::Nak));
    assert_eq!(
        verify_ack(b"MSH|^~\\&|A\r", b"1-0"),
        Err(AckError::Malformed)
    );
    assert_eq!(
        verify_ack(b"MSA|AA|1-0\r", b"1-0"),
        Err(AckError::Malformed)
    );
    assert_eq!(verify_ack(b"", b"1-0"), Err(AckError::Malformed));
}

#[test]
fn each_connection_has_its_own_patient() {
    let a = MessageTemplate::for_patient(1024, 0, 1);
    let b = MessageTemplate::for_patient(1024, 7, 1);
    assert_eq!(a.payload_len, b.payload_len);
    let (mut wa, mut wb) = (Vec::new(), Vec::new());
    a.write(&mut wa, b"0-1").unwrap();
    b.write(&mut wb, b"7-1").unwrap();
    assert!(String::from_utf8_lossy(&wa).contains("PID|1||100001^^^BENCH^MR"));
    assert!(String::from_utf8_lossy(&wb).contains("PID|1||100008^^^BENCH^MR"));
}

#[test]
fn template_hits_size_and_carries_id() {
    for size in [0, 100, 1024, 1 << 20] {
        let template = MessageTemplate::new(size, 0xab);
        let mut id = Vec::new();
        template.write_id(12, 345, &mut id);
        assert_eq!(id, b"000000ab-12-0000000345");
        let mut wire = Vec::new();
        template.write(&mut wire, &id).unwrap();
        assert_eq!(wire.len(), template.framed_len(id.len()));

        let mut deframer = AckDeframer::new(wire.len());
        assert!(deframer.push(&wire));
        let range = deframer.next_frame().expect("one frame");
        let payload = deframer.payload(range).to_vec();
        assert_eq!(payload.len(), template.payload_len);
        if size > 400 {
            assert!(
                payload.len().abs_diff(size) <= 1,
                "{} for {size}",
                payload.len()
            );
        }
        assert_eq!(msh10(&payload), b"000000ab-12-0000000345");
        assert!(!payload.contains(&END_BLOCK));
    }
}

fn msh10(payload: &[u8]) -> &[u8] {
    payload.split(|&b| b == b'|').nth(9).unwrap_or_default()
}

#[derive(Clone, Copy)]
enum Answer {
    Correct,
    WrongId,
}

/// A thread-per-connection test server on 127.0.0.1:0 that ACKs every frame. Its threads end
/// when their client disconnects; the accept thread lives until the test binary exits.
fn spawn_test_server(answer: Answer) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            thread::spawn(move || {
                let mut deframer = AckDeframer::new(1 << 16);
                loop {
                    let Some(spare) = deframer.spare() else {
                        return;
                    };
                    match stream.read(spare) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => deframer.filled(n),
                    }
                    while let Some(range) = deframer.next_frame() {
                        let id =
                            String::from_utf8_lossy(msh10(deframer.payload(range))).into_owned();
                        let id = match answer {
                            Answer::Correct => id,
                            Answer::WrongId => format!("X{id}"),
                        };
                        if stream.write_all(&frame(&ack("AA", &id))).is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

fn config(addr: SocketAddr) -> LoadConfig {
    LoadConfig {
        addr,
        conns: 2,
        pipeline: 4,
        size: 512,
        duration: Duration::from_millis(300),
        warmup: Duration::from_millis(100),
        idle_conns: 0,
        server_pid: None,
        tls: None,
        interrupt: None,
    }
}

#[test]
fn run_against_correct_server_counts_messages_without_errors() {
    let addr = spawn_test_server(Answer::Correct);
    let cfg = LoadConfig {
        idle_conns: 20,
        // The test server lives in this process, so its RSS is ours.
        server_pid: Some(std::process::id()),
        ..config(addr)
    };
    let report = run(&cfg, None).unwrap();
    assert!(report.messages > 0, "{report}");
    assert_eq!(report.errors, 0, "{report}");
    assert_eq!(report.error_counts, ErrorCounts::default());
    assert!(report.rss_per_idle_conn.is_some());
    assert!(report.rss_total_per_idle_conn.is_some());
    assert_eq!(report.idle_closed, 0);
    assert!(report.p50_us > 0.0 && report.p50_us <= report.max_us);
    let json = report.to_json();
    assert_eq!(json["messages"], report.messages);
    assert_eq!(json["errors"], 0);
}

#[test]
fn run_counts_msa2_mismatches_as_errors() {
    let addr = spawn_test_server(Answer::WrongId);
    let report = run(&config(addr), None).unwrap();
    assert_eq!(report.messages, 0, "{report}");
    assert!(report.error_counts.mismatch > 0, "{report}");
    assert_eq!(report.errors, report.error_counts.mismatch);
}

#[test]
fn run_fails_fast_when_nothing_listens() {
    // Bind then drop to get a loopback port with (almost certainly) no listener.
    let addr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    match run(&config(addr), None) {
        Err(LoadError::Connect { .. }) => {}
        other => panic!("expected a connect error, got {other:?}"),
    }
}

#[test]
fn run_rejects_invalid_config() {
    let addr = "127.0.0.1:9".parse().unwrap();
    for cfg in [
        LoadConfig {
            conns: 0,
            ..config(addr)
        },
        LoadConfig {
            pipeline: 0,
            ..config(addr)
        },
        LoadConfig {
            duration: Duration::ZERO,
            ..config(addr)
        },
        LoadConfig {
            size: MAX_SIZE + 1,
            ..config(addr)
        },
        LoadConfig {
            idle_conns: MAX_CONNECTIONS,
            ..config(addr)
        },
    ] {
        assert!(matches!(run(&cfg, None), Err(LoadError::InvalidConfig(_))));
    }
}

#[test]
fn count_closed_sees_server_side_close() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let clients = [connect(addr).unwrap(), connect(addr).unwrap()];
    let (kept, _) = listener.accept().unwrap();
    let (closed, _) = listener.accept().unwrap();
    assert_eq!(count_closed(&clients), 0);
    drop(closed);
    // The FIN crosses loopback within the close call in practice; allow 1 s anyway.
    let deadline = Instant::now() + Duration::from_secs(1);
    while count_closed(&clients) != 1 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(count_closed(&clients), 1);
    drop(kept);
}
