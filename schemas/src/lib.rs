//! The event contract of orderflow: Avro schemas, the Rust event types derived from them, and the
//! Confluent wire-format codec. No I/O, no async: every other crate builds on this one.
//!
//! Layout:
//! - `avro/*.avsc` (beside this crate's `src/`) are the contract. Each file is self-contained
//!   (the shared `Envelope`, `OrderLine`, ... records are defined inline) so any Avro tool or
//!   schema registry can read it without references.
//! - [`events`] holds one Rust struct per schema and [`OrderEvent`], the sum of them.
//! - [`codec`] maps each event kind to its compiled-in schema and a fixed schema id, and encodes
//!   and decodes values as `0x00 | schema id (u32 BE) | Avro body`.
//! - [`ids`] derives event ids from their cause (UUIDv5), rule 1 of docs/architecture.md.

pub mod codec;
pub mod events;
pub mod ids;
pub mod pan;

pub use codec::{Codec, CodecError, EventKind};
pub use events::{
    Address, Envelope, FraudDecision, FraudReviewDecided, FraudScored, InventoryLineRejected,
    InventoryLineReleased, InventoryLineReserved, InventoryRejected, InventoryReleaseRequested,
    InventoryReleased, InventoryReservationRequested, InventoryReserved, InventoryRestocked,
    OrderCancellationRequested, OrderCancelled, OrderConfirmed, OrderEvent, OrderLine, OrderPlaced,
    OrderRejected, OrderStepTimedOut, OrderValidated, PaymentAuthorized, PaymentDeclined,
    PaymentRefundRequested, PaymentRefunded, PaymentRequested, Reason, ReviewDecision,
    SagaRulesChanged, SkuQuantity, SkuShortage,
};

/// A SKU is 1–64 characters of ASCII letters, digits, `-` and `_` (the one definition; the
/// ingest edge, the saga and the inventory tools all check it).
pub fn is_valid_sku(sku: &str) -> bool {
    (1..=64).contains(&sku.len())
        && sku
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Names of the Kafka headers orderflow writes. Values are UTF-8.
pub mod headers {
    /// The record name of the value's schema, e.g. `OrderPlaced`.
    pub const EVENT_TYPE: &str = "event_type";
    /// [`crate::codec::CONTENT_TYPE`] for orderflow events.
    pub const CONTENT_TYPE: &str = "content-type";
    /// W3C trace context of the request or event that caused this record.
    pub const TRACEPARENT: &str = "traceparent";
    /// Dead letters: why the record could not be processed.
    pub const DLQ_REASON: &str = "dlq.reason";
    /// Dead letters: where the record was read from.
    pub const DLQ_SOURCE_TOPIC: &str = "dlq.source.topic";
    pub const DLQ_SOURCE_PARTITION: &str = "dlq.source.partition";
    pub const DLQ_SOURCE_OFFSET: &str = "dlq.source.offset";
    /// Dead letters: the consumer (processor or projection) that gave up on the record.
    pub const DLQ_CONSUMER: &str = "dlq.consumer";
    /// A redriven record: the dead letter it was redriven from, `TOPIC/PARTITION/OFFSET`. Not
    /// `dlq.`-prefixed: a dead letter keeps it (it drops the `dlq.` headers of its source).
    pub const REDRIVEN_FROM: &str = "redriven.from";
    /// Sequenced dead letters (docs/architecture.md, "Sequenced dead letters"): the chain a
    /// letter belongs to — the source position of the record that parked its key,
    /// `TOPIC/PARTITION/OFFSET` — and the letter's place in it (0 is the record that parked the
    /// key). A consumer writes them on each letter of a parked key.
    pub const DLQ_CHAIN: &str = "dlq.chain";
    pub const DLQ_SEQUENCE: &str = "dlq.sequence";
    /// `true` on a letter that was held only because its key was parked (nothing is wrong with
    /// it; it is released once the letters before it are resolved), `false` on one that failed.
    pub const DLQ_HELD: &str = "dlq.held";
    /// A release of a sequenced letter back on its source topic: the letter's chain and place.
    /// A redriven event carries them; a discard writes a *release marker*, a record with these
    /// headers and no value, so the consumer that parked the key moves past the letter. Every
    /// consumer skips a record without a value (a marker) that is not its own to release.
    pub const RELEASE_CHAIN: &str = "orderflow.release.chain";
    pub const RELEASE_SEQUENCE: &str = "orderflow.release.sequence";
}
