//! ACK builder and parser cost per message (target: a typical ACK in ≤ 500 ns).
//!
//! `cargo bench --bench ack`. Inputs are built outside the timed closures; `build` includes the
//! one allocation of the output, `build_into` reuses a buffer to show the cost without it.

use std::hint::black_box;

use criterion::Criterion;
use mllp_reactor::ack::{self, Ack, AckCode};

/// A typical ADT^A01 (≈ 420 bytes, 6 segments); only its MSH is read.
const ADT_A01: &[u8] = b"MSH|^~\\&|ADT1|GOOD HEALTH HOSPITAL|GHH LAB, INC.|GOOD HEALTH HOSPITAL|\
20260322120000||ADT^A01^ADT_A01|MSG00001|P|2.5.1|||AL|NE||UNICODE UTF-8\r\
EVN|A01|20260322120000|||\r\
PID|1||PATID1234^^^GOOD HEALTH HOSPITAL^MR||EVERYMAN^ADAM^A^III||19610615|M||C|\
2222 HOME STREET^^GREENSBORO^NC^27401-1020|GL|(555) 555-2004|(555)555-2004||S||PATID12345001^2^M10^ADT1^AN^A|\r\
NK1|1|NUCLEAR^NELDA^W|SPO^SPOUSE||||NK^NEXT OF KIN\r\
PV1|1|I|2000^2012^01||||004777^ATTEND^AARON^A|||SUR||||ADM|A0|\r\
AL1|1||^ASPIRIN\r";

fn bench_ack(c: &mut Criterion) {
    let mut group = c.benchmark_group("ack");
    group.bench_function("build AA (accept)", |b| {
        b.iter(|| ack::accept(black_box(ADT_A01)))
    });
    group.bench_function("build AA into reused buffer", |b| {
        let mut out = Vec::with_capacity(512);
        b.iter(|| {
            out.clear();
            Ack::new(AckCode::AA).build_into(black_box(ADT_A01), &mut out);
            black_box(out.len())
        })
    });
    group.bench_function("build AE nak with text", |b| {
        b.iter(|| {
            ack::nak(
                black_box(ADT_A01),
                AckCode::AE,
                black_box("handler failed: database timeout after 5 s (pool exhausted)"),
            )
        })
    });
    let reply = ack::nak(ADT_A01, AckCode::AE, "handler failed: database timeout");
    group.bench_function("parse ACK", |b| {
        b.iter(|| ack::parse(black_box(&reply)).map(|p| p.code))
    });
    group.finish();
}

// Spelled out rather than `criterion_group!`, whose generated `pub fn` trips `missing_docs`.
fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench_ack(&mut c);
    c.final_summary();
}
