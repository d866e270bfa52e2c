//! Restoring a saga partition from its changelog (`processors::state::Restorer`): the work a
//! processor does per changelog record when a partition is assigned to it, after reading the
//! record from the broker (whose read rate `scripts/bench` measures as the consume ceiling).
//!
//! The changelog is the one a real saga writes for 1,000,000 orders of one partition, placed
//! 10 ms apart in event time (2.8 hours) and each finished at once (rejected by a strict fraud
//! model), in batches of 500 with their position records, with `state.retention_ms` at one
//! hour: every order written, then tombstoned once the horizon passes it. The benchmark prints
//! the records restored and the entries held after the restore — bounded by the horizon's
//! traffic (360,000 orders), not by the 1,000,000 of the history.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use orderflow_benches::sample_order;
use orderflow_platform::{config::Overrides, Settings};
use orderflow_processors::{
    saga::SagaState,
    state::{ChangelogRecord, PartitionState, Restorer, POSITION_KEY},
    Outputs, Step,
};
use orderflow_schemas::OrderEvent;
use uuid::Uuid;

const ORDERS: u64 = 1_000_000;
const HOUR_MS: i64 = 3_600_000;

fn changelog() -> Vec<ChangelogRecord> {
    let mut settings = Settings::from_defaults(&Overrides::default()).expect("settings");
    settings.state.retention_ms = HOUR_MS;
    settings.fraud.review_threshold = 0.000_001;
    settings.fraud.reject_threshold = 0.000_001;
    let mut saga = orderflow_processors::saga_step(&settings);
    let mut state = SagaState::default();
    let mut records = Vec::new();
    let template = sample_order(2);
    let start = template.envelope.occurred_at;
    for n in 0..ORDERS {
        let mut order = template.clone();
        order.envelope.event_id = Uuid::from_u64_pair(1, n).to_string();
        order.envelope.order_id = Uuid::from_u64_pair(2, n).to_string();
        order.envelope.customer_id = format!("customer-{}", n % 10_000);
        order.envelope.occurred_at = start + n as i64 * 10;
        let mut out = Outputs::default();
        saga.handle(&mut state, &OrderEvent::OrderPlaced(order), &mut out)
            .expect("handled");
        if n % 500 == 499 {
            records.extend(state.changes());
            records.push((
                POSITION_KEY.to_owned(),
                Some((n + 1).to_string().into_bytes()),
            ));
        }
    }
    records
}

fn restore(records: &[ChangelogRecord]) -> SagaState {
    let mut restorer = Restorer::<SagaState>::default();
    for (key, value) in records {
        restorer
            .record(key, value.as_deref(), 1, None)
            .expect("restores");
    }
    restorer.finish().state
}

fn restore_a_long_history(c: &mut Criterion) {
    let records = changelog();
    let restored = restore(&records);
    println!(
        "restore: {} changelog records of {ORDERS} finished orders -> {} orders, {} customers, {} entries held",
        records.len(),
        restored.orders(),
        restored.customers(),
        restored.entries(),
    );
    let mut group = c.benchmark_group("restore");
    group.sample_size(10);
    group.throughput(Throughput::Elements(records.len() as u64));
    group.bench_function("saga_partition_1m_finished_orders", |b| {
        b.iter(|| restore(black_box(&records)))
    });
    group.finish();
}

criterion_group!(benches, restore_a_long_history);
criterion_main!(benches);
