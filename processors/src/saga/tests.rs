use orderflow_platform::config::ValidationSettings;
use orderflow_schemas::{Address, OrderLine};

use super::*;

fn rules() -> validation::Rules {
    validation::Rules::from_settings(&ValidationSettings {
        currencies: vec!["EUR".into(), "USD".into()],
        max_lines: 10,
        max_quantity_per_line: 100,
    })
}

fn placed() -> OrderPlaced {
    OrderPlaced {
        envelope: Envelope {
            event_id: "0192f0c2-0000-7000-8000-000000000001".into(),
            order_id: "0192f0c2-3b4a-7cde-8f01-23456789abcd".into(),
            customer_id: "customer-1".into(),
            occurred_at: 1_764_000_000_000,
            causation_id: None,
            sequence: 1,
            schema_version: 1,
        },
        currency: "EUR".into(),
        lines: vec![
            OrderLine {
                sku: "SKU-00001".into(),
                quantity: 2,
                unit_price_minor: 1000,
            },
            OrderLine {
                sku: "SKU-00002".into(),
                quantity: 1,
                unit_price_minor: 550,
            },
        ],
        shipping_address: Address {
            name: "Grace Hopper".into(),
            line1: "1 Navy Way".into(),
            line2: None,
            city: "Arlington".into(),
            postal_code: "22202".into(),
            country: "US".into(),
        },
        payment_token: "tok_abc".into(),
        subtotal_minor: 2550,
        shipping_minor: 450,
        tax_minor: 0,
        total_minor: 3000,
    }
}

fn run(event: OrderEvent) -> Vec<OrderEvent> {
    let mut saga = Saga::new(rules(), "orders.events");
    let mut out = Outputs::default();
    saga.handle(&event, &mut out).expect("handled");
    out.drain().map(|r| r.event).collect()
}

#[test]
fn a_valid_order_is_validated_then_confirmed() {
    let outputs = run(OrderEvent::OrderPlaced(placed()));
    assert_eq!(outputs.len(), 2);
    let OrderEvent::OrderValidated(validated) = &outputs[0] else {
        panic!("expected OrderValidated, got {:?}", outputs[0]);
    };
    let OrderEvent::OrderConfirmed(confirmed) = &outputs[1] else {
        panic!("expected OrderConfirmed, got {:?}", outputs[1]);
    };
    assert_eq!(validated.envelope.sequence, 2);
    assert_eq!(confirmed.envelope.sequence, 3);
    assert_eq!(
        validated.envelope.causation_id.as_deref(),
        Some(placed().envelope.event_id.as_str())
    );
    assert_eq!(
        confirmed.envelope.causation_id.as_deref(),
        Some(validated.envelope.event_id.as_str())
    );
    assert_eq!(confirmed.total_minor, 3000);
    assert_eq!(
        confirmed.envelope.occurred_at,
        placed().envelope.occurred_at
    );
    assert_ne!(validated.envelope.event_id, confirmed.envelope.event_id);
}

#[test]
fn outputs_are_deterministic() {
    let first = run(OrderEvent::OrderPlaced(placed()));
    let second = run(OrderEvent::OrderPlaced(placed()));
    assert_eq!(first, second);
    let codec = orderflow_schemas::Codec::new().expect("codec");
    for (a, b) in first.iter().zip(&second) {
        assert_eq!(codec.encode(a).expect("a"), codec.encode(b).expect("b"));
    }
}

#[test]
fn an_invalid_order_is_rejected_with_every_reason() {
    let mut order = placed();
    order.currency = "JPY".into();
    order.lines[0].quantity = 0;
    order.total_minor = 1;
    order.shipping_address.city = " ".into();
    order.payment_token = "4242 4242 4242 4242".into();
    let outputs = run(OrderEvent::OrderPlaced(order));
    assert_eq!(outputs.len(), 1);
    let OrderEvent::OrderRejected(rejected) = &outputs[0] else {
        panic!("expected OrderRejected, got {:?}", outputs[0]);
    };
    assert_eq!(rejected.envelope.sequence, 2);
    assert_eq!(rejected.stage, "validation");
    let codes: Vec<_> = rejected.reasons.iter().map(|r| r.code.as_str()).collect();
    for code in [
        "currency_not_accepted",
        "invalid_quantity",
        "subtotal_mismatch",
        "total_mismatch",
        "incomplete_address",
        "card_data_in_token",
    ] {
        assert!(codes.contains(&code), "{code} missing from {codes:?}");
    }
    let text = format!("{rejected:?}");
    assert!(
        !text.contains("4242 4242"),
        "the card number must not be repeated"
    );
}

#[test]
fn later_events_produce_nothing() {
    let outputs = run(OrderEvent::OrderPlaced(placed()));
    for event in outputs {
        assert!(run(event).is_empty());
    }
}

#[test]
fn a_malformed_event_id_is_poison() {
    let mut order = placed();
    order.envelope.event_id = "not-a-uuid".into();
    let mut saga = Saga::new(rules(), "orders.events");
    let mut out = Outputs::default();
    let err = saga
        .handle(&OrderEvent::OrderPlaced(order), &mut out)
        .expect_err("poison");
    assert!(err.to_string().contains("event_id"));
    assert!(out.records().is_empty());
}
