//! Per-event work on each hop: wire-format encode and decode, saga validation (with its
//! outputs), and the projection's fold of an event into a row change.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use orderflow_benches::sample_order;
use orderflow_platform::{config::Overrides, Settings};
use orderflow_processors::{saga::SagaState, Outputs, Step};
use orderflow_projections::orders::change_for;
use orderflow_schemas::{Codec, OrderEvent};

fn codec(c: &mut Criterion) {
    let codec = Codec::new().expect("schemas parse");
    let mut group = c.benchmark_group("codec");
    for lines in [1, 4, 20] {
        let event = OrderEvent::OrderPlaced(sample_order(lines));
        let bytes = codec.encode(&event).expect("encodes");
        group.throughput(Throughput::Bytes(bytes.len() as u64));
        group.bench_with_input(
            BenchmarkId::new("encode_order_placed", lines),
            &event,
            |b, e| b.iter(|| codec.encode(black_box(e)).expect("encodes")),
        );
        group.bench_with_input(
            BenchmarkId::new("decode_order_placed", lines),
            &bytes,
            |b, bytes| b.iter(|| codec.decode(black_box(bytes)).expect("decodes")),
        );
    }
    group.finish();
}

fn saga(c: &mut Criterion) {
    let settings = Settings::from_defaults(&Overrides::default()).expect("settings");
    let mut saga = orderflow_processors::saga_step(&settings);
    let event = OrderEvent::OrderPlaced(sample_order(4));
    // A fresh partition state per order: validation, fraud scoring and the reservation request.
    c.bench_function("saga/validate_score_reserve_4_lines", |b| {
        b.iter(|| {
            let mut state = SagaState::default();
            let mut out = Outputs::default();
            saga.handle(&mut state, black_box(&event), &mut out)
                .expect("handled");
            out
        })
    });
}

fn fold(c: &mut Criterion) {
    let event = OrderEvent::OrderPlaced(sample_order(4));
    c.bench_function("projection/fold_order_placed", |b| {
        b.iter(|| change_for(black_box(&event)))
    });
}

criterion_group!(benches, codec, saga, fold);
criterion_main!(benches);
