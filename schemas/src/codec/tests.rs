use super::*;
use crate::events::*;

fn envelope(sequence: i64) -> Envelope {
    Envelope {
        event_id: "7d1c8c4e-2f7a-5c1e-9a57-0b0e0f6c1a01".into(),
        order_id: "0192f0c2-3b4a-7cde-8f01-23456789abcd".into(),
        customer_id: "customer-17".into(),
        occurred_at: 1_764_000_000_123,
        causation_id: (sequence > 1).then(|| "0192f0c2-0000-7000-8000-000000000001".into()),
        sequence,
        schema_version: 1,
    }
}

fn lines() -> Vec<SkuQuantity> {
    vec![
        SkuQuantity {
            sku: "SKU-00001".into(),
            quantity: 2,
        },
        SkuQuantity {
            sku: "SKU-00042".into(),
            quantity: 1,
        },
    ]
}

/// One realistic value of every event kind, in [`EventKind::ALL`] order.
fn samples() -> Vec<OrderEvent> {
    vec![
        OrderEvent::OrderPlaced(OrderPlaced {
            envelope: envelope(1),
            currency: "EUR".into(),
            lines: vec![
                OrderLine {
                    sku: "SKU-00001".into(),
                    quantity: 2,
                    unit_price_minor: 1999,
                },
                OrderLine {
                    sku: "SKU-00042".into(),
                    quantity: 1,
                    unit_price_minor: 500,
                },
            ],
            shipping_address: Address {
                name: "Ada Lovelace".into(),
                line1: "12 St James's Square".into(),
                line2: None,
                city: "London".into(),
                postal_code: "SW1Y 4JH".into(),
                country: "GB".into(),
            },
            payment_token: "tok_visa_4242".into(),
            subtotal_minor: 4498,
            shipping_minor: 499,
            tax_minor: 0,
            total_minor: 4997,
        }),
        OrderEvent::OrderValidated(OrderValidated {
            envelope: envelope(2),
            currency: "EUR".into(),
            total_minor: 4997,
        }),
        OrderEvent::OrderRejected(OrderRejected {
            envelope: envelope(2),
            stage: "validation".into(),
            reasons: vec![Reason {
                code: "total_mismatch".into(),
                field: Some("total_minor".into()),
                message: "total 1 is not subtotal + shipping + tax = 4997".into(),
            }],
        }),
        OrderEvent::FraudScored(FraudScored {
            envelope: envelope(3),
            score: 0.125,
            decision: FraudDecision::Review,
            reasons: vec!["first_order".into()],
        }),
        OrderEvent::InventoryReservationRequested(InventoryReservationRequested {
            envelope: envelope(4),
            lines: lines(),
        }),
        OrderEvent::InventoryReserved(InventoryReserved {
            envelope: envelope(5),
            lines: lines(),
        }),
        OrderEvent::InventoryRejected(InventoryRejected {
            envelope: envelope(5),
            shortages: vec![SkuShortage {
                sku: "SKU-00042".into(),
                requested: 1,
                available: 0,
            }],
        }),
        OrderEvent::InventoryReleased(InventoryReleased {
            envelope: envelope(8),
            lines: lines(),
            reason: "payment_declined".into(),
        }),
        OrderEvent::PaymentRequested(PaymentRequested {
            envelope: envelope(6),
            amount_minor: 4997,
            currency: "EUR".into(),
            payment_token: "tok_visa_4242".into(),
            idempotency_key: "order-0192f0c2".into(),
        }),
        OrderEvent::PaymentAuthorized(PaymentAuthorized {
            envelope: envelope(7),
            amount_minor: 4997,
            currency: "EUR".into(),
            authorization_id: "auth_123".into(),
        }),
        OrderEvent::PaymentDeclined(PaymentDeclined {
            envelope: envelope(7),
            amount_minor: 4997,
            currency: "EUR".into(),
            reason: "insufficient_funds".into(),
        }),
        OrderEvent::PaymentRefunded(PaymentRefunded {
            envelope: envelope(9),
            amount_minor: 4997,
            currency: "EUR".into(),
            refund_id: "refund_9".into(),
        }),
        OrderEvent::OrderConfirmed(OrderConfirmed {
            envelope: envelope(8),
            total_minor: 4997,
            currency: "EUR".into(),
        }),
        OrderEvent::OrderCancelled(OrderCancelled {
            envelope: envelope(9),
            reason: "customer asked".into(),
            initiated_by: "customer".into(),
        }),
        OrderEvent::OrderCancellationRequested(OrderCancellationRequested {
            envelope: envelope(0),
            reason: "changed my mind".into(),
        }),
        OrderEvent::FraudReviewDecided(FraudReviewDecided {
            envelope: envelope(0),
            decision: ReviewDecision::Approve,
            reviewer: "ops-alice".into(),
            note: "known customer".into(),
        }),
        OrderEvent::OrderStepTimedOut(OrderStepTimedOut {
            envelope: envelope(0),
            step: "inventory".into(),
            stage_event_id: "7d1c8c4e-2f7a-5c1e-9a57-0b0e0f6c1a02".into(),
        }),
        OrderEvent::InventoryRestocked(InventoryRestocked {
            envelope: envelope(0),
            sku: "SKU-00001".into(),
            quantity: 25,
            source: "stock.csv".into(),
        }),
        OrderEvent::InventoryLineReserved(InventoryLineReserved {
            envelope: envelope(0),
            sku: "SKU-00001".into(),
            quantity: 2,
            available_after: 23,
        }),
        OrderEvent::InventoryLineRejected(InventoryLineRejected {
            envelope: envelope(0),
            sku: "SKU-00042".into(),
            requested: 3,
            available: 1,
        }),
        OrderEvent::InventoryLineReleased(InventoryLineReleased {
            envelope: envelope(0),
            sku: "SKU-00001".into(),
            quantity: 2,
            available_after: 25,
        }),
        OrderEvent::InventoryReleaseRequested(InventoryReleaseRequested {
            envelope: envelope(6),
            sku: "SKU-00001".into(),
            reason: "payment declined".into(),
        }),
        OrderEvent::PaymentRefundRequested(PaymentRefundRequested {
            envelope: envelope(10),
            amount_minor: 4997,
            currency: "EUR".into(),
            idempotency_key: "refund-0192f0c2".into(),
            charge_idempotency_key: "0192f0c2-3b4a-7cde-8f01-23456789abcd".into(),
        }),
        OrderEvent::SagaRulesChanged(SagaRulesChanged {
            envelope: Envelope {
                order_id: String::new(),
                customer_id: String::new(),
                ..envelope(0)
            },
            rules: "{\"validation\": {}}".into(),
            digest: "3f2b7f0e-4c1d-5a6b-8e9f-0a1b2c3d4e5f".into(),
        }),
    ]
}

#[test]
fn every_kind_has_a_sample_in_id_order() {
    let kinds: Vec<_> = samples().iter().map(OrderEvent::kind).collect();
    assert_eq!(kinds, EventKind::ALL);
    for (index, kind) in EventKind::ALL.iter().enumerate() {
        assert_eq!(kind.schema_id() as usize, index + 1, "{}", kind.name());
    }
}

#[test]
fn every_event_round_trips_through_its_schema() {
    let codec = Codec::new().expect("compiled-in schemas parse");
    for event in samples() {
        let bytes = codec.encode(&event).expect("encodes");
        assert_eq!(bytes[0], MAGIC_BYTE);
        assert_eq!(
            u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]),
            event.kind().schema_id()
        );
        let back = codec.decode(&bytes).expect("decodes");
        assert_eq!(back, event, "{} did not round-trip", event.kind().name());
    }
}

/// The encoder writes each body straight from serde against its schema. Replayed outputs are
/// compared byte for byte, so its bytes must be exactly those of Avro's generic path
/// (`to_value`, then the validating writer) — for every kind, and with every optional field
/// both absent and present.
#[test]
fn the_direct_encoder_writes_the_bytes_of_the_generic_one() {
    let codec = Codec::new().expect("compiled-in schemas parse");
    let mut events = samples();
    for event in samples() {
        let mut varied = event.clone();
        match &mut varied {
            OrderEvent::OrderPlaced(e) => {
                e.shipping_address.line2 = Some("Flat 3, ünïcode".into());
                e.lines.clear();
                e.envelope.occurred_at = -1;
            }
            OrderEvent::OrderRejected(e) => {
                for reason in &mut e.reasons {
                    reason.field = None;
                }
            }
            _ => {}
        }
        let envelope = varied.envelope_mut();
        envelope.causation_id = match envelope.causation_id {
            Some(_) => None,
            None => Some("0192f0c2-0000-7000-8000-000000000002".into()),
        };
        events.push(varied);
    }
    for event in &events {
        let direct = codec.encode(event).expect("direct");
        let generic = codec.encode_generic(event).expect("generic");
        assert_eq!(direct, generic, "{}: {event:?}", event.kind().name());
        assert_eq!(&codec.decode(&direct).expect("decodes"), event);
    }
}

#[test]
fn schema_record_names_match_kinds_and_embed_the_same_envelope() {
    let codec = Codec::new().expect("compiled-in schemas parse");
    let canonical = serde_json::json!({
        "event_id": "string", "order_id": "string", "customer_id": "string",
        "occurred_at": "long", "causation_id": "[null,string]", "sequence": "long",
        "schema_version": "int"
    });
    for kind in EventKind::ALL {
        let json: serde_json::Value = serde_json::from_str(kind.avsc()).expect("valid JSON");
        assert_eq!(json["name"], kind.name());
        assert_eq!(json["fields"][0]["name"], "envelope", "{}", kind.name());
        let fields = json["fields"][0]["type"]["fields"]
            .as_array()
            .expect("envelope is defined inline");
        let mut shape = serde_json::Map::new();
        for field in fields {
            let ty = match &field["type"] {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Object(o) => o["type"].as_str().unwrap_or_default().into(),
                serde_json::Value::Array(a) => format!(
                    "[{}]",
                    a.iter()
                        .filter_map(|v| v.as_str())
                        .collect::<Vec<_>>()
                        .join(",")
                ),
                other => other.to_string(),
            };
            shape.insert(field["name"].as_str().unwrap_or_default().into(), ty.into());
        }
        assert_eq!(
            serde_json::Value::Object(shape),
            canonical,
            "{}",
            kind.name()
        );
        // And the parsed schema is a record of that name.
        assert!(matches!(codec.schema(kind), Schema::Record(r) if r.name.name == kind.name()));
    }
}

#[test]
fn garbage_is_a_typed_error() {
    let codec = Codec::new().expect("compiled-in schemas parse");
    assert!(matches!(
        codec.decode(&[]),
        Err(CodecError::Truncated { len: 0 })
    ));
    assert!(matches!(
        codec.decode(&[0, 0, 0]),
        Err(CodecError::Truncated { len: 3 })
    ));
    assert!(matches!(
        codec.decode(&[1, 0, 0, 0, 1, 2]),
        Err(CodecError::BadMagic { found: 1 })
    ));
    assert!(matches!(
        codec.decode(&[0, 0, 0, 0, 99, 2]),
        Err(CodecError::UnknownSchemaId { id: 99 })
    ));
    assert!(matches!(
        codec.decode(b"{\"order_id\": 1}"),
        Err(CodecError::BadMagic { found: b'{' })
    ));
    // A valid OrderConfirmed with a byte appended.
    let mut bytes = codec.encode(&samples()[12]).expect("encodes");
    bytes.push(0);
    assert!(matches!(
        codec.decode(&bytes),
        Err(CodecError::TrailingBytes { extra: 1, .. })
    ));
}

#[test]
fn every_truncation_of_every_event_is_an_error_not_a_panic() {
    let codec = Codec::new().expect("compiled-in schemas parse");
    for event in samples() {
        let bytes = codec.encode(&event).expect("encodes");
        for len in 0..bytes.len() {
            assert!(
                codec.decode(&bytes[..len]).is_err(),
                "{} truncated to {len} bytes decoded",
                event.kind().name()
            );
        }
    }
}

#[test]
fn corrupted_bodies_never_panic() {
    // A fixed xorshift sequence: deterministic, so a failure reproduces.
    let codec = Codec::new().expect("compiled-in schemas parse");
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for event in samples() {
        let clean = codec.encode(&event).expect("encodes");
        for _ in 0..500 {
            let mut bytes = clean.clone();
            let flips = 1 + next() % 4;
            for _ in 0..flips {
                let at = HEADER_LEN + (next() as usize) % (bytes.len() - HEADER_LEN);
                bytes[at] ^= (next() % 255 + 1) as u8;
            }
            // Either outcome is fine; reaching the next iteration is the assertion.
            let _ = codec.decode(&bytes);
        }
    }
}

#[test]
fn unknown_kinds_and_round_trip_of_ids() {
    assert_eq!(EventKind::from_schema_id(0), None);
    assert_eq!(EventKind::from_schema_id(25), None);
    for kind in EventKind::ALL {
        assert_eq!(EventKind::from_schema_id(kind.schema_id()), Some(kind));
    }
}
