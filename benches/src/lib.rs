//! Benchmarks of orderflow.
//!
//! - `cargo bench -p orderflow-benches` runs the criterion micro benchmarks in `benches/`: the
//!   codec, saga validation and the projection fold — the work done per event on every hop.
//! - `orderflow-bench` (`src/main.rs`) is the end-to-end harness: an open-loop driver
//!   ([`driver`]) at rising rates against a pipeline it starts ([`setup`]) or a running one, the
//!   broker's own ceiling on the same broker ([`ceiling`]), the pipeline's CPU and memory
//!   ([`procstat`]) and over time ([`timeline`]), and the report ([`stats`], [`report`]).
//!   BENCHMARKS.md has the figures.
//! - `ingest-bench` (`src/bin/ingest-bench.rs`) measures the ingest edge alone against the raw
//!   produce ceiling of the same broker; `projection-bench` the projection and query API.
//!
//! [`sample_order`] is the event the micro benchmarks and the ceiling share.

pub mod ceiling;
pub mod driver;
pub mod procstat;
pub mod report;
pub mod setup;
pub mod stats;
pub mod timeline;

use orderflow_schemas::{Address, Envelope, OrderLine, OrderPlaced};

/// A realistic `OrderPlaced` with `lines` lines.
pub fn sample_order(lines: usize) -> OrderPlaced {
    let lines: Vec<OrderLine> = (0..lines)
        .map(|i| OrderLine {
            sku: format!("SKU-{i:05}"),
            quantity: 1 + (i % 3) as i32,
            unit_price_minor: 999 + i as i64 * 10,
        })
        .collect();
    let subtotal = lines
        .iter()
        .map(|l| i64::from(l.quantity) * l.unit_price_minor)
        .sum::<i64>();
    OrderPlaced {
        envelope: Envelope {
            event_id: "0192f0c2-0000-7000-8000-000000000001".into(),
            order_id: "0192f0c2-3b4a-7cde-8f01-23456789abcd".into(),
            customer_id: "customer-0001".into(),
            occurred_at: 1_764_000_000_000,
            causation_id: None,
            sequence: 1,
            schema_version: 1,
        },
        currency: "EUR".into(),
        lines,
        shipping_address: Address {
            name: "Ada Lovelace".into(),
            line1: "12 St James's Square".into(),
            line2: None,
            city: "London".into(),
            postal_code: "SW1Y 4JH".into(),
            country: "GB".into(),
        },
        payment_token: "tok_visa_4242".into(),
        subtotal_minor: subtotal,
        shipping_minor: 499,
        tax_minor: 0,
        total_minor: subtotal + 499,
    }
}
