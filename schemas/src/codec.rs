//! The Confluent wire format: `0x00 | schema id (u32, big-endian) | Avro binary body`.
//!
//! Standard consumers and schema registries read this framing. The embedded mode has no schema
//! registry, so ids come from a fixed table compiled in here ([`EventKind::schema_id`]); a
//! deployment with a registry registers the same `.avsc` files under the same ids. Ids are never
//! reused: a new schema version gets a new id.
//!
//! Decoding is total: a short payload, a wrong magic byte, an unknown id or a body that does not
//! match its schema is a [`CodecError`], never a panic.
//!
//! Encoding is deterministic: the same event gives the same bytes, which replays and the
//! deterministic outputs of the processors rely on. Bodies are written straight from serde
//! against their schema (`Encoder`), byte for byte what Avro's generic path writes.

use std::io::Cursor;

use apache_avro::Schema;
use serde::{de::DeserializeOwned, Serialize};

use crate::events::OrderEvent;

/// First byte of every Confluent-framed value.
pub const MAGIC_BYTE: u8 = 0;
/// Magic byte plus the 4-byte schema id.
pub const HEADER_LEN: usize = 5;
/// The content type of a framed value, as sent in the `content-type` Kafka header.
pub const CONTENT_TYPE: &str = "application/vnd.orderflow.avro";
/// Largest single allocation the Avro decoder may make for one value (a corrupt length prefix
/// must not make it reserve gigabytes).
const MAX_ALLOCATION_BYTES: usize = 16 * 1024 * 1024;

/// Why a value could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("payload is {len} bytes, shorter than the 5-byte wire-format header")]
    Truncated { len: usize },
    #[error("wrong magic byte {found:#04x}, expected 0x00 (Confluent wire format)")]
    BadMagic { found: u8 },
    #[error("unknown schema id {id}")]
    UnknownSchemaId { id: u32 },
    #[error("body does not decode as {schema}: {source}")]
    Body {
        schema: &'static str,
        #[source]
        source: Box<apache_avro::Error>,
    },
    #[error("body of {schema} has {extra} trailing bytes after the record")]
    TrailingBytes { schema: &'static str, extra: usize },
    #[error("{schema} does not match its schema: {source}")]
    Encode {
        schema: &'static str,
        #[source]
        source: Box<apache_avro::Error>,
    },
    #[error("compiled-in schema {schema} does not parse: {source}")]
    Schema {
        schema: &'static str,
        #[source]
        source: Box<apache_avro::Error>,
    },
}

pub type Result<T, E = CodecError> = std::result::Result<T, E>;

/// Every schema orderflow writes, with its fixed id and its `.avsc` source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EventKind {
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
}

impl EventKind {
    /// All kinds, in schema-id order.
    pub const ALL: [EventKind; 24] = [
        Self::OrderPlaced,
        Self::OrderValidated,
        Self::OrderRejected,
        Self::FraudScored,
        Self::InventoryReservationRequested,
        Self::InventoryReserved,
        Self::InventoryRejected,
        Self::InventoryReleased,
        Self::PaymentRequested,
        Self::PaymentAuthorized,
        Self::PaymentDeclined,
        Self::PaymentRefunded,
        Self::OrderConfirmed,
        Self::OrderCancelled,
        Self::OrderCancellationRequested,
        Self::FraudReviewDecided,
        Self::OrderStepTimedOut,
        Self::InventoryRestocked,
        Self::InventoryLineReserved,
        Self::InventoryLineRejected,
        Self::InventoryLineReleased,
        Self::InventoryReleaseRequested,
        Self::PaymentRefundRequested,
        Self::SagaRulesChanged,
    ];

    /// The record name, also sent as the `event_type` Kafka header.
    pub fn name(self) -> &'static str {
        match self {
            Self::OrderPlaced => "OrderPlaced",
            Self::OrderValidated => "OrderValidated",
            Self::OrderRejected => "OrderRejected",
            Self::FraudScored => "FraudScored",
            Self::InventoryReservationRequested => "InventoryReservationRequested",
            Self::InventoryReserved => "InventoryReserved",
            Self::InventoryRejected => "InventoryRejected",
            Self::InventoryReleased => "InventoryReleased",
            Self::PaymentRequested => "PaymentRequested",
            Self::PaymentAuthorized => "PaymentAuthorized",
            Self::PaymentDeclined => "PaymentDeclined",
            Self::PaymentRefunded => "PaymentRefunded",
            Self::OrderConfirmed => "OrderConfirmed",
            Self::OrderCancelled => "OrderCancelled",
            Self::OrderCancellationRequested => "OrderCancellationRequested",
            Self::FraudReviewDecided => "FraudReviewDecided",
            Self::OrderStepTimedOut => "OrderStepTimedOut",
            Self::InventoryRestocked => "InventoryRestocked",
            Self::InventoryLineReserved => "InventoryLineReserved",
            Self::InventoryLineRejected => "InventoryLineRejected",
            Self::InventoryLineReleased => "InventoryLineReleased",
            Self::InventoryReleaseRequested => "InventoryReleaseRequested",
            Self::PaymentRefundRequested => "PaymentRefundRequested",
            Self::SagaRulesChanged => "SagaRulesChanged",
        }
    }

    /// The wire-format schema id. Fixed forever for version 1 of each schema.
    pub fn schema_id(self) -> u32 {
        match self {
            Self::OrderPlaced => 1,
            Self::OrderValidated => 2,
            Self::OrderRejected => 3,
            Self::FraudScored => 4,
            Self::InventoryReservationRequested => 5,
            Self::InventoryReserved => 6,
            Self::InventoryRejected => 7,
            Self::InventoryReleased => 8,
            Self::PaymentRequested => 9,
            Self::PaymentAuthorized => 10,
            Self::PaymentDeclined => 11,
            Self::PaymentRefunded => 12,
            Self::OrderConfirmed => 13,
            Self::OrderCancelled => 14,
            Self::OrderCancellationRequested => 15,
            Self::FraudReviewDecided => 16,
            Self::OrderStepTimedOut => 17,
            Self::InventoryRestocked => 18,
            Self::InventoryLineReserved => 19,
            Self::InventoryLineRejected => 20,
            Self::InventoryLineReleased => 21,
            Self::InventoryReleaseRequested => 22,
            Self::PaymentRefundRequested => 23,
            Self::SagaRulesChanged => 24,
        }
    }

    /// The schema version written into each envelope's `schema_version`.
    pub fn schema_version(self) -> i32 {
        1
    }

    /// The `.avsc` source, compiled in.
    pub fn avsc(self) -> &'static str {
        match self {
            Self::OrderPlaced => include_str!("../avro/order_placed.avsc"),
            Self::OrderValidated => include_str!("../avro/order_validated.avsc"),
            Self::OrderRejected => include_str!("../avro/order_rejected.avsc"),
            Self::FraudScored => include_str!("../avro/fraud_scored.avsc"),
            Self::InventoryReservationRequested => {
                include_str!("../avro/inventory_reservation_requested.avsc")
            }
            Self::InventoryReserved => include_str!("../avro/inventory_reserved.avsc"),
            Self::InventoryRejected => include_str!("../avro/inventory_rejected.avsc"),
            Self::InventoryReleased => include_str!("../avro/inventory_released.avsc"),
            Self::PaymentRequested => include_str!("../avro/payment_requested.avsc"),
            Self::PaymentAuthorized => include_str!("../avro/payment_authorized.avsc"),
            Self::PaymentDeclined => include_str!("../avro/payment_declined.avsc"),
            Self::PaymentRefunded => include_str!("../avro/payment_refunded.avsc"),
            Self::OrderConfirmed => include_str!("../avro/order_confirmed.avsc"),
            Self::OrderCancelled => include_str!("../avro/order_cancelled.avsc"),
            Self::OrderCancellationRequested => {
                include_str!("../avro/order_cancellation_requested.avsc")
            }
            Self::FraudReviewDecided => include_str!("../avro/fraud_review_decided.avsc"),
            Self::OrderStepTimedOut => include_str!("../avro/order_step_timed_out.avsc"),
            Self::InventoryRestocked => include_str!("../avro/inventory_restocked.avsc"),
            Self::InventoryLineReserved => include_str!("../avro/inventory_line_reserved.avsc"),
            Self::InventoryLineRejected => include_str!("../avro/inventory_line_rejected.avsc"),
            Self::InventoryLineReleased => include_str!("../avro/inventory_line_released.avsc"),
            Self::InventoryReleaseRequested => {
                include_str!("../avro/inventory_release_requested.avsc")
            }
            Self::PaymentRefundRequested => include_str!("../avro/payment_refund_requested.avsc"),
            Self::SagaRulesChanged => include_str!("../avro/saga_rules_changed.avsc"),
        }
    }

    pub fn from_schema_id(id: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.schema_id() == id)
    }
}

/// Encodes and decodes [`OrderEvent`]s. Parse the schemas once ([`Codec::new`]) and share it.
#[derive(Debug, Clone)]
pub struct Codec {
    /// Parsed schemas, indexed like [`EventKind::ALL`].
    schemas: Vec<Schema>,
}

impl Codec {
    /// Parses every compiled-in schema.
    pub fn new() -> Result<Self> {
        // Set-once global; a later call with the same value is harmless and ignored.
        apache_avro::util::max_allocation_bytes(MAX_ALLOCATION_BYTES);
        let schemas = EventKind::ALL
            .iter()
            .map(|kind| {
                Schema::parse_str(kind.avsc()).map_err(|e| CodecError::Schema {
                    schema: kind.name(),
                    source: Box::new(e),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { schemas })
    }

    /// The parsed schema of `kind`.
    pub fn schema(&self, kind: EventKind) -> &Schema {
        // ALL is indexed by schema id - 1, and `new` parsed one schema per entry of ALL.
        &self.schemas[kind.schema_id() as usize - 1]
    }

    /// Frames `event` in the wire format.
    pub fn encode(&self, event: &OrderEvent) -> Result<Vec<u8>> {
        self.frame(event, Encoder::Direct)
    }

    /// [`Codec::encode`] through Avro's generic `Value` path: the reference the direct
    /// encoder's bytes are held to (tests).
    #[cfg(test)]
    fn encode_generic(&self, event: &OrderEvent) -> Result<Vec<u8>> {
        self.frame(event, Encoder::Generic)
    }

    fn frame(&self, event: &OrderEvent, encoder: Encoder) -> Result<Vec<u8>> {
        let kind = event.kind();
        let mut out = Vec::with_capacity(FRAME_CAPACITY);
        out.push(MAGIC_BYTE);
        out.extend_from_slice(&kind.schema_id().to_be_bytes());
        let out_ref = &mut out;
        match event {
            OrderEvent::OrderPlaced(e) => self.body(kind, e, encoder, out_ref),
            OrderEvent::OrderValidated(e) => self.body(kind, e, encoder, out_ref),
            OrderEvent::OrderRejected(e) => self.body(kind, e, encoder, out_ref),
            OrderEvent::FraudScored(e) => self.body(kind, e, encoder, out_ref),
            OrderEvent::InventoryReservationRequested(e) => self.body(kind, e, encoder, out_ref),
            OrderEvent::InventoryReserved(e) => self.body(kind, e, encoder, out_ref),
            OrderEvent::InventoryRejected(e) => self.body(kind, e, encoder, out_ref),
            OrderEvent::InventoryReleased(e) => self.body(kind, e, encoder, out_ref),
            OrderEvent::PaymentRequested(e) => self.body(kind, e, encoder, out_ref),
            OrderEvent::PaymentAuthorized(e) => self.body(kind, e, encoder, out_ref),
            OrderEvent::PaymentDeclined(e) => self.body(kind, e, encoder, out_ref),
            OrderEvent::PaymentRefunded(e) => self.body(kind, e, encoder, out_ref),
            OrderEvent::OrderConfirmed(e) => self.body(kind, e, encoder, out_ref),
            OrderEvent::OrderCancelled(e) => self.body(kind, e, encoder, out_ref),
            OrderEvent::OrderCancellationRequested(e) => self.body(kind, e, encoder, out_ref),
            OrderEvent::FraudReviewDecided(e) => self.body(kind, e, encoder, out_ref),
            OrderEvent::OrderStepTimedOut(e) => self.body(kind, e, encoder, out_ref),
            OrderEvent::InventoryRestocked(e) => self.body(kind, e, encoder, out_ref),
            OrderEvent::InventoryLineReserved(e) => self.body(kind, e, encoder, out_ref),
            OrderEvent::InventoryLineRejected(e) => self.body(kind, e, encoder, out_ref),
            OrderEvent::InventoryLineReleased(e) => self.body(kind, e, encoder, out_ref),
            OrderEvent::InventoryReleaseRequested(e) => self.body(kind, e, encoder, out_ref),
            OrderEvent::PaymentRefundRequested(e) => self.body(kind, e, encoder, out_ref),
            OrderEvent::SagaRulesChanged(e) => self.body(kind, e, encoder, out_ref),
        }?;
        Ok(out)
    }

    /// Reads the schema id of a framed value without decoding the body.
    pub fn peek_kind(bytes: &[u8]) -> Result<EventKind> {
        let header: &[u8; HEADER_LEN] = bytes
            .get(..HEADER_LEN)
            .and_then(|h| h.try_into().ok())
            .ok_or(CodecError::Truncated { len: bytes.len() })?;
        if header[0] != MAGIC_BYTE {
            return Err(CodecError::BadMagic { found: header[0] });
        }
        let id = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
        EventKind::from_schema_id(id).ok_or(CodecError::UnknownSchemaId { id })
    }

    /// Decodes a framed value.
    pub fn decode(&self, bytes: &[u8]) -> Result<OrderEvent> {
        let kind = Self::peek_kind(bytes)?;
        let body = &bytes[HEADER_LEN..];
        Ok(match kind {
            EventKind::OrderPlaced => OrderEvent::OrderPlaced(self.read(kind, body)?),
            EventKind::OrderValidated => OrderEvent::OrderValidated(self.read(kind, body)?),
            EventKind::OrderRejected => OrderEvent::OrderRejected(self.read(kind, body)?),
            EventKind::FraudScored => OrderEvent::FraudScored(self.read(kind, body)?),
            EventKind::InventoryReservationRequested => {
                OrderEvent::InventoryReservationRequested(self.read(kind, body)?)
            }
            EventKind::InventoryReserved => OrderEvent::InventoryReserved(self.read(kind, body)?),
            EventKind::InventoryRejected => OrderEvent::InventoryRejected(self.read(kind, body)?),
            EventKind::InventoryReleased => OrderEvent::InventoryReleased(self.read(kind, body)?),
            EventKind::PaymentRequested => OrderEvent::PaymentRequested(self.read(kind, body)?),
            EventKind::PaymentAuthorized => OrderEvent::PaymentAuthorized(self.read(kind, body)?),
            EventKind::PaymentDeclined => OrderEvent::PaymentDeclined(self.read(kind, body)?),
            EventKind::PaymentRefunded => OrderEvent::PaymentRefunded(self.read(kind, body)?),
            EventKind::OrderConfirmed => OrderEvent::OrderConfirmed(self.read(kind, body)?),
            EventKind::OrderCancelled => OrderEvent::OrderCancelled(self.read(kind, body)?),
            EventKind::OrderCancellationRequested => {
                OrderEvent::OrderCancellationRequested(self.read(kind, body)?)
            }
            EventKind::FraudReviewDecided => OrderEvent::FraudReviewDecided(self.read(kind, body)?),
            EventKind::OrderStepTimedOut => OrderEvent::OrderStepTimedOut(self.read(kind, body)?),
            EventKind::InventoryRestocked => OrderEvent::InventoryRestocked(self.read(kind, body)?),
            EventKind::InventoryLineReserved => {
                OrderEvent::InventoryLineReserved(self.read(kind, body)?)
            }
            EventKind::InventoryLineRejected => {
                OrderEvent::InventoryLineRejected(self.read(kind, body)?)
            }
            EventKind::InventoryLineReleased => {
                OrderEvent::InventoryLineReleased(self.read(kind, body)?)
            }
            EventKind::InventoryReleaseRequested => {
                OrderEvent::InventoryReleaseRequested(self.read(kind, body)?)
            }
            EventKind::PaymentRefundRequested => {
                OrderEvent::PaymentRefundRequested(self.read(kind, body)?)
            }
            EventKind::SagaRulesChanged => OrderEvent::SagaRulesChanged(self.read(kind, body)?),
        })
    }

    /// Appends `value`'s Avro body to `out`.
    fn body<T: Serialize>(
        &self,
        kind: EventKind,
        value: &T,
        encoder: Encoder,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        let encode_error = |e| CodecError::Encode {
            schema: kind.name(),
            source: Box::new(e),
        };
        match encoder {
            Encoder::Direct => {
                apache_avro::write_avro_datum_ref(self.schema(kind), value, out)
                    .map_err(encode_error)?;
            }
            #[cfg(test)]
            Encoder::Generic => {
                let value = apache_avro::to_value(value).map_err(encode_error)?;
                out.extend(
                    apache_avro::to_avro_datum(self.schema(kind), value).map_err(encode_error)?,
                );
            }
        }
        Ok(())
    }

    fn read<T: DeserializeOwned>(&self, kind: EventKind, body: &[u8]) -> Result<T> {
        let body_error = |e| CodecError::Body {
            schema: kind.name(),
            source: Box::new(e),
        };
        let mut cursor = Cursor::new(body);
        let value = apache_avro::from_avro_datum(self.schema(kind), &mut cursor, None)
            .map_err(body_error)?;
        let extra = body.len() - cursor.position() as usize;
        if extra != 0 {
            return Err(CodecError::TrailingBytes {
                schema: kind.name(),
                extra,
            });
        }
        apache_avro::from_value(&value).map_err(body_error)
    }
}

/// How a body is written. `Direct` serialises the value against its schema in one pass
/// (`write_avro_datum_ref`); Avro's generic path first builds a `Value` tree (`to_value`), then
/// validates and writes it, which cost twice the time per event (BENCHMARKS.md). The schemas
/// name no type by reference, which the direct writer cannot look up (it is given no names).
#[derive(Clone, Copy)]
enum Encoder {
    Direct,
    #[cfg(test)]
    Generic,
}

/// A frame's starting capacity: the header and a typical body (an order with a few lines is
/// about 200 bytes), so most events are written without growing the buffer.
const FRAME_CAPACITY: usize = 256;

#[cfg(test)]
mod tests;
