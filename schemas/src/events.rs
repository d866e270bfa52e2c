//! One Rust type per Avro schema in `avro/`, field for field. Field names and types must match
//! the schema exactly; `codec` tests round-trip every type through its schema.

use serde::{Deserialize, Serialize};

/// Carried by every event (see `avro/*.avsc`, record `Envelope`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// UUID of this event, derived from its cause (see [`crate::ids`]).
    pub event_id: String,
    pub order_id: String,
    /// Partition key of `orders.events`.
    pub customer_id: String,
    /// Event time in milliseconds since the Unix epoch.
    pub occurred_at: i64,
    /// Id of the event that caused this one; `None` for events entering from outside.
    pub causation_id: Option<String>,
    /// Per-order version: 1 for `OrderPlaced`, +1 per later event of the order.
    pub sequence: i64,
    pub schema_version: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderLine {
    pub sku: String,
    pub quantity: i32,
    pub unit_price_minor: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Address {
    pub name: String,
    pub line1: String,
    pub line2: Option<String>,
    pub city: String,
    pub postal_code: String,
    pub country: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reason {
    pub code: String,
    pub field: Option<String>,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkuQuantity {
    pub sku: String,
    pub quantity: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkuShortage {
    pub sku: String,
    pub requested: i32,
    pub available: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderPlaced {
    pub envelope: Envelope,
    pub currency: String,
    pub lines: Vec<OrderLine>,
    pub shipping_address: Address,
    pub payment_token: String,
    pub subtotal_minor: i64,
    pub shipping_minor: i64,
    pub tax_minor: i64,
    pub total_minor: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderValidated {
    pub envelope: Envelope,
    pub currency: String,
    pub total_minor: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderRejected {
    pub envelope: Envelope,
    /// Saga step that rejected the order: `validation`, `fraud` or `inventory`.
    pub stage: String,
    pub reasons: Vec<Reason>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum FraudDecision {
    Approve,
    Review,
    Reject,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FraudScored {
    pub envelope: Envelope,
    pub score: f64,
    pub decision: FraudDecision,
    pub reasons: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryReservationRequested {
    pub envelope: Envelope,
    pub lines: Vec<SkuQuantity>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryReserved {
    pub envelope: Envelope,
    pub lines: Vec<SkuQuantity>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryRejected {
    pub envelope: Envelope,
    pub shortages: Vec<SkuShortage>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryReleased {
    pub envelope: Envelope,
    pub lines: Vec<SkuQuantity>,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentRequested {
    pub envelope: Envelope,
    pub amount_minor: i64,
    pub currency: String,
    pub payment_token: String,
    pub idempotency_key: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentAuthorized {
    pub envelope: Envelope,
    pub amount_minor: i64,
    pub currency: String,
    pub authorization_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentDeclined {
    pub envelope: Envelope,
    pub amount_minor: i64,
    pub currency: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentRefunded {
    pub envelope: Envelope,
    pub amount_minor: i64,
    pub currency: String,
    pub refund_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderConfirmed {
    pub envelope: Envelope,
    pub total_minor: i64,
    pub currency: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderCancelled {
    pub envelope: Envelope,
    pub reason: String,
    /// `customer`, `timeout`, `payment` or `inventory`.
    pub initiated_by: String,
}

/// Decision of an admin on an order held for fraud review.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ReviewDecision {
    Approve,
    Reject,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderCancellationRequested {
    pub envelope: Envelope,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FraudReviewDecided {
    pub envelope: Envelope,
    pub decision: ReviewDecision,
    pub reviewer: String,
    pub note: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderStepTimedOut {
    pub envelope: Envelope,
    /// `review` or `inventory`.
    pub step: String,
    pub stage_event_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryRestocked {
    pub envelope: Envelope,
    pub sku: String,
    pub quantity: i32,
    pub source: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryLineReserved {
    pub envelope: Envelope,
    pub sku: String,
    pub quantity: i32,
    pub available_after: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryLineRejected {
    pub envelope: Envelope,
    pub sku: String,
    pub requested: i32,
    pub available: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryLineReleased {
    pub envelope: Envelope,
    pub sku: String,
    pub quantity: i32,
    pub available_after: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryReleaseRequested {
    pub envelope: Envelope,
    pub sku: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentRefundRequested {
    pub envelope: Envelope,
    pub amount_minor: i64,
    pub currency: String,
    pub idempotency_key: String,
    pub charge_idempotency_key: String,
}

/// The saga's outcome-deciding configuration from this position of an `orders.events`
/// partition on (a control record: not part of any order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SagaRulesChanged {
    pub envelope: Envelope,
    /// JSON: `{"validation": …, "fraud": …, "deadlines": …}`.
    pub rules: String,
    /// A UUIDv5 of `rules`.
    pub digest: String,
}

/// Every event of an order's life, as it travels on the event topics.
#[derive(Debug, Clone, PartialEq)]
pub enum OrderEvent {
    OrderPlaced(OrderPlaced),
    OrderValidated(OrderValidated),
    OrderRejected(OrderRejected),
    FraudScored(FraudScored),
    InventoryReservationRequested(InventoryReservationRequested),
    InventoryReserved(InventoryReserved),
    InventoryRejected(InventoryRejected),
    InventoryReleased(InventoryReleased),
    PaymentRequested(PaymentRequested),
    PaymentAuthorized(PaymentAuthorized),
    PaymentDeclined(PaymentDeclined),
    PaymentRefunded(PaymentRefunded),
    OrderConfirmed(OrderConfirmed),
    OrderCancelled(OrderCancelled),
    OrderCancellationRequested(OrderCancellationRequested),
    FraudReviewDecided(FraudReviewDecided),
    OrderStepTimedOut(OrderStepTimedOut),
    InventoryRestocked(InventoryRestocked),
    InventoryLineReserved(InventoryLineReserved),
    InventoryLineRejected(InventoryLineRejected),
    InventoryLineReleased(InventoryLineReleased),
    InventoryReleaseRequested(InventoryReleaseRequested),
    PaymentRefundRequested(PaymentRefundRequested),
    SagaRulesChanged(SagaRulesChanged),
}

impl OrderEvent {
    /// The envelope every event carries.
    pub fn envelope(&self) -> &Envelope {
        match self {
            Self::OrderPlaced(e) => &e.envelope,
            Self::OrderValidated(e) => &e.envelope,
            Self::OrderRejected(e) => &e.envelope,
            Self::FraudScored(e) => &e.envelope,
            Self::InventoryReservationRequested(e) => &e.envelope,
            Self::InventoryReserved(e) => &e.envelope,
            Self::InventoryRejected(e) => &e.envelope,
            Self::InventoryReleased(e) => &e.envelope,
            Self::PaymentRequested(e) => &e.envelope,
            Self::PaymentAuthorized(e) => &e.envelope,
            Self::PaymentDeclined(e) => &e.envelope,
            Self::PaymentRefunded(e) => &e.envelope,
            Self::OrderConfirmed(e) => &e.envelope,
            Self::OrderCancelled(e) => &e.envelope,
            Self::OrderCancellationRequested(e) => &e.envelope,
            Self::FraudReviewDecided(e) => &e.envelope,
            Self::OrderStepTimedOut(e) => &e.envelope,
            Self::InventoryRestocked(e) => &e.envelope,
            Self::InventoryLineReserved(e) => &e.envelope,
            Self::InventoryLineRejected(e) => &e.envelope,
            Self::InventoryLineReleased(e) => &e.envelope,
            Self::InventoryReleaseRequested(e) => &e.envelope,
            Self::PaymentRefundRequested(e) => &e.envelope,
            Self::SagaRulesChanged(e) => &e.envelope,
        }
    }

    /// Which schema this event is written with.
    pub fn kind(&self) -> crate::EventKind {
        use crate::EventKind as K;
        match self {
            Self::OrderPlaced(_) => K::OrderPlaced,
            Self::OrderValidated(_) => K::OrderValidated,
            Self::OrderRejected(_) => K::OrderRejected,
            Self::FraudScored(_) => K::FraudScored,
            Self::InventoryReservationRequested(_) => K::InventoryReservationRequested,
            Self::InventoryReserved(_) => K::InventoryReserved,
            Self::InventoryRejected(_) => K::InventoryRejected,
            Self::InventoryReleased(_) => K::InventoryReleased,
            Self::PaymentRequested(_) => K::PaymentRequested,
            Self::PaymentAuthorized(_) => K::PaymentAuthorized,
            Self::PaymentDeclined(_) => K::PaymentDeclined,
            Self::PaymentRefunded(_) => K::PaymentRefunded,
            Self::OrderConfirmed(_) => K::OrderConfirmed,
            Self::OrderCancelled(_) => K::OrderCancelled,
            Self::OrderCancellationRequested(_) => K::OrderCancellationRequested,
            Self::FraudReviewDecided(_) => K::FraudReviewDecided,
            Self::OrderStepTimedOut(_) => K::OrderStepTimedOut,
            Self::InventoryRestocked(_) => K::InventoryRestocked,
            Self::InventoryLineReserved(_) => K::InventoryLineReserved,
            Self::InventoryLineRejected(_) => K::InventoryLineRejected,
            Self::InventoryLineReleased(_) => K::InventoryLineReleased,
            Self::InventoryReleaseRequested(_) => K::InventoryReleaseRequested,
            Self::PaymentRefundRequested(_) => K::PaymentRefundRequested,
            Self::SagaRulesChanged(_) => K::SagaRulesChanged,
        }
    }
}

/// What is written the same way for every variant (each variant is named after its
/// [`crate::EventKind`]): the envelope to change, and the event as JSON for people (the
/// dead-letter tool shows an event as JSON and takes a corrected one back).
macro_rules! every_variant {
    ($($variant:ident),* $(,)?) => {
        impl OrderEvent {
            /// The envelope, to change (a redriven event gets a new id).
            pub fn envelope_mut(&mut self) -> &mut Envelope {
                match self {
                    $(Self::$variant(e) => &mut e.envelope,)*
                }
            }

            /// The event's fields as JSON (its kind is [`OrderEvent::kind`]).
            pub fn to_json(&self) -> Result<serde_json::Value, serde_json::Error> {
                match self {
                    $(Self::$variant(e) => serde_json::to_value(e),)*
                }
            }

            /// An event of `kind` from its fields as JSON, as [`OrderEvent::to_json`] writes
            /// them; the error names the first field that is missing or of the wrong type.
            pub fn from_json(
                kind: crate::EventKind,
                value: serde_json::Value,
            ) -> Result<Self, serde_json::Error> {
                match kind {
                    $(crate::EventKind::$variant => serde_json::from_value(value).map(Self::$variant),)*
                }
            }
        }
    };
}

every_variant!(
    OrderPlaced,
    OrderValidated,
    OrderRejected,
    FraudScored,
    InventoryReservationRequested,
    InventoryReserved,
    InventoryRejected,
    InventoryReleased,
    PaymentRequested,
    PaymentAuthorized,
    PaymentDeclined,
    PaymentRefunded,
    OrderConfirmed,
    OrderCancelled,
    OrderCancellationRequested,
    FraudReviewDecided,
    OrderStepTimedOut,
    InventoryRestocked,
    InventoryLineReserved,
    InventoryLineRejected,
    InventoryLineReleased,
    InventoryReleaseRequested,
    PaymentRefundRequested,
    SagaRulesChanged,
);
