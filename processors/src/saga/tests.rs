use std::collections::VecDeque;

use orderflow_platform::config::{FraudSettings, Overrides, Settings, ValidationSettings};
use orderflow_schemas::{
    Address, Codec, InventoryRestocked, OrderCancellationRequested, OrderLine, PaymentAuthorized,
    PaymentDeclined, PaymentRefunded,
};

use orderflow_schemas::{
    ids::derived_event_id, Envelope, EventKind, FraudDecision, FraudReviewDecided, OrderPlaced,
    ReviewDecision,
};

use super::*;
use crate::{
    inventory::{Inventory, InventoryState},
    state::PartitionState,
};

fn validation_settings() -> ValidationSettings {
    ValidationSettings {
        currencies: vec!["EUR".into(), "USD".into()],
        max_lines: 10,
        max_quantity_per_line: 100,
    }
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

const TOPICS: SagaTopics = SagaTopics {
    orders: "orders.events",
    inventory_commands: "inventory.commands",
    payment_requests: "payments.requests",
};

fn defaults() -> Settings {
    Settings::from_defaults(&Overrides::default()).expect("default settings")
}

fn fraud() -> FraudSettings {
    defaults().fraud
}

/// The saga's rules: the defaults with [`rules`]' validation.
fn saga_rules(fraud: FraudSettings, retention_ms: i64) -> (SagaRules, i64) {
    let defaults = defaults();
    (
        SagaRules {
            validation: validation_settings(),
            fraud,
            deadlines: defaults.saga,
        },
        retention_ms,
    )
}

fn saga_with(fraud: FraudSettings, retention_ms: i64) -> Saga {
    let (rules, retention) = saga_rules(fraud, retention_ms);
    Saga::new(rules, TOPICS, retention)
}

fn saga() -> Saga {
    saga_with(fraud(), defaults().state.retention_ms)
}

fn order(n: u128, customer: &str, lines: &[(&str, i32)]) -> OrderPlaced {
    let mut o = placed();
    o.envelope.event_id = Uuid::from_u128(0x1000 + n).to_string();
    o.envelope.order_id = Uuid::from_u128(0x2000 + n).to_string();
    o.envelope.customer_id = customer.to_owned();
    o.lines = lines
        .iter()
        .map(|(sku, quantity)| OrderLine {
            sku: (*sku).to_owned(),
            quantity: *quantity,
            unit_price_minor: 1000,
        })
        .collect();
    o.subtotal_minor = o.lines.iter().map(|l| i64::from(l.quantity) * 1000).sum();
    o.total_minor = o.subtotal_minor + o.shipping_minor + o.tax_minor;
    o
}

/// How the simulated payment gateway answers.
#[derive(Clone, Copy, PartialEq)]
enum Pay {
    Authorize,
    Decline,
    /// Never answers (the request stays in `payments`).
    Hold,
}

/// The saga, the inventory processor and a payment worker stand-in, wired by in-memory queues.
struct World {
    saga: Saga,
    saga_state: SagaState,
    inventory: Inventory,
    stock: InventoryState,
    pay: Pay,
    /// Everything written to the orders topic, in order.
    log: Vec<OrderEvent>,
    orders: VecDeque<OrderEvent>,
    commands: VecDeque<OrderEvent>,
    payments: VecDeque<OrderEvent>,
    /// Deliver every record twice (a redelivery after a crash, an aborted batch shown).
    twice: bool,
}

impl World {
    fn new() -> Self {
        Self {
            saga: saga(),
            saga_state: SagaState::default(),
            inventory: Inventory::new("orders.events", defaults().state.retention_ms),
            stock: InventoryState::default(),
            pay: Pay::Authorize,
            log: Vec::new(),
            orders: VecDeque::new(),
            commands: VecDeque::new(),
            payments: VecDeque::new(),
            twice: false,
        }
    }

    fn restock(&mut self, sku: &str, quantity: i32, n: u128) {
        let id = Uuid::from_u128(0x9000 + n).to_string();
        self.commands
            .push_back(OrderEvent::InventoryRestocked(InventoryRestocked {
                envelope: Envelope {
                    event_id: id.clone(),
                    order_id: id,
                    customer_id: String::new(),
                    occurred_at: 0,
                    causation_id: None,
                    sequence: 0,
                    schema_version: 1,
                },
                sku: sku.to_owned(),
                quantity,
                source: "test".into(),
            }));
        self.run();
    }

    fn place(&mut self, order: OrderPlaced) {
        let event = OrderEvent::OrderPlaced(order);
        self.log.push(event.clone());
        self.orders.push_back(event);
    }

    fn input(&mut self, event: OrderEvent) {
        self.log.push(event.clone());
        self.orders.push_back(event);
    }

    fn route(&mut self, out: &mut Outputs) {
        for record in out.drain() {
            match record.topic {
                "orders.events" => {
                    self.log.push(record.event.clone());
                    self.orders.push_back(record.event);
                }
                "inventory.commands" => self.commands.push_back(record.event),
                "payments.requests" => self.payments.push_back(record.event),
                other => panic!("unexpected topic {other}"),
            }
        }
    }

    fn answer_payment(&self, request: &OrderEvent) -> Option<OrderEvent> {
        let envelope = |role: &str, kind: EventKind| {
            let e = request.envelope();
            Envelope {
                event_id: derived_event_id(Uuid::parse_str(&e.event_id).expect("uuid"), role)
                    .to_string(),
                order_id: e.order_id.clone(),
                customer_id: e.customer_id.clone(),
                occurred_at: e.occurred_at,
                causation_id: Some(e.event_id.clone()),
                sequence: e.sequence + 1,
                schema_version: kind.schema_version(),
            }
        };
        match (request, self.pay) {
            (_, Pay::Hold) => None,
            (OrderEvent::PaymentRequested(p), Pay::Authorize) => {
                Some(OrderEvent::PaymentAuthorized(PaymentAuthorized {
                    envelope: envelope("payments/authorized", EventKind::PaymentAuthorized),
                    amount_minor: p.amount_minor,
                    currency: p.currency.clone(),
                    authorization_id: format!("auth-{}", p.idempotency_key),
                }))
            }
            (OrderEvent::PaymentRequested(p), Pay::Decline) => {
                Some(OrderEvent::PaymentDeclined(PaymentDeclined {
                    envelope: envelope("payments/declined", EventKind::PaymentDeclined),
                    amount_minor: p.amount_minor,
                    currency: p.currency.clone(),
                    reason: "insufficient funds".into(),
                }))
            }
            (OrderEvent::PaymentRefundRequested(r), _) => {
                Some(OrderEvent::PaymentRefunded(PaymentRefunded {
                    envelope: envelope("payments/refunded", EventKind::PaymentRefunded),
                    amount_minor: r.amount_minor,
                    currency: r.currency.clone(),
                    refund_id: format!("ref-{}", r.idempotency_key),
                }))
            }
            _ => None,
        }
    }

    /// Runs until every queue is empty (held payments stay queued).
    fn run(&mut self) {
        let mut held = VecDeque::new();
        loop {
            let mut out = Outputs::default();
            if let Some(event) = self.orders.pop_front() {
                for _ in 0..if self.twice { 2 } else { 1 } {
                    self.saga
                        .handle(&mut self.saga_state, &event, &mut out)
                        .expect("saga handles");
                }
            } else if let Some(event) = self.commands.pop_front() {
                for _ in 0..if self.twice { 2 } else { 1 } {
                    self.inventory
                        .handle(&mut self.stock, &event, &mut out)
                        .expect("inventory handles");
                }
            } else if let Some(request) = self.payments.pop_front() {
                match self.answer_payment(&request) {
                    Some(answer) => {
                        for _ in 0..if self.twice { 2 } else { 1 } {
                            out.push("orders.events", String::new(), answer.clone());
                        }
                    }
                    None => held.push_back(request),
                }
            } else {
                break;
            }
            self.route(&mut out);
        }
        self.payments = held;
    }

    /// The order's timeline as the projection sees it: distinct events by id, sequenced ones.
    fn timeline(&self, order_id: &str) -> Vec<(i64, &'static str)> {
        let mut seen = HashSet::new();
        self.log
            .iter()
            .filter(|e| e.envelope().order_id == order_id && e.envelope().sequence > 0)
            .filter(|e| seen.insert(e.envelope().event_id.clone()))
            .map(|e| (e.envelope().sequence, e.kind().name()))
            .collect()
    }

    fn kinds(&self, order_id: &str) -> Vec<&'static str> {
        self.timeline(order_id)
            .into_iter()
            .map(|(_, k)| k)
            .collect()
    }

    fn status(&self, order_id: &str) -> String {
        match &self.saga_state.order(order_id).expect("order known").stage {
            Stage::Done { status } => status.clone(),
            Stage::Confirmed => "confirmed".into(),
            other => format!("{other:?}"),
        }
    }

    fn available(&self, sku: &str) -> i64 {
        self.stock.sku(sku).map_or(0, |s| s.available)
    }
}

const HAPPY: [&str; 8] = [
    "OrderPlaced",
    "OrderValidated",
    "FraudScored",
    "InventoryReservationRequested",
    "InventoryReserved",
    "PaymentRequested",
    "PaymentAuthorized",
    "OrderConfirmed",
];

#[test]
fn a_valid_order_runs_the_whole_saga_and_is_confirmed() {
    let mut world = World::new();
    world.restock("SKU-1", 10, 1);
    let o = order(1, "c-1", &[("SKU-1", 3)]);
    let id = o.envelope.order_id.clone();
    world.place(o);
    world.run();
    assert_eq!(world.kinds(&id), HAPPY);
    let sequences: Vec<i64> = world.timeline(&id).iter().map(|(s, _)| *s).collect();
    assert_eq!(
        sequences,
        (1..=8).collect::<Vec<_>>(),
        "one version per event"
    );
    assert_eq!(world.status(&id), "confirmed");
    assert_eq!(world.available("SKU-1"), 7);
}

#[test]
fn outputs_are_deterministic() {
    let codec = Codec::new().expect("codec");
    let run = || {
        let mut world = World::new();
        world.restock("SKU-1", 10, 1);
        world.place(order(1, "c-1", &[("SKU-1", 3), ("SKU-2", 1)]));
        world.restock("SKU-2", 1, 2);
        world.run();
        world
            .log
            .iter()
            .map(|e| codec.encode(e).expect("encodes"))
            .collect::<Vec<_>>()
    };
    assert_eq!(run(), run());
}

#[test]
fn an_invalid_order_is_rejected_with_every_reason() {
    let mut o = placed();
    o.currency = "JPY".into();
    o.lines[0].quantity = 0;
    o.total_minor = 1;
    o.shipping_address.city = " ".into();
    o.payment_token = "4242 4242 4242 4242".into();
    let mut world = World::new();
    world.place(o);
    world.run();
    let rejected: Vec<_> = world
        .log
        .iter()
        .filter_map(|e| match e {
            OrderEvent::OrderRejected(r) => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(rejected.len(), 1);
    let rejected = rejected[0];
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
    assert!(
        !format!("{rejected:?}").contains("4242 4242"),
        "the card number must not be repeated"
    );
}

#[test]
fn every_input_delivered_twice_changes_nothing_and_re_emits_the_same_events() {
    let scenario = |twice: bool| {
        let mut world = World::new();
        world.twice = twice;
        world.restock("SKU-1", 4, 1);
        world.restock("SKU-1", 4, 1); // the same restock event again
        for n in 0..6 {
            world.place(order(n, &format!("c-{}", n % 2), &[("SKU-1", 2)]));
        }
        world.run();
        let mut distinct: Vec<_> = world
            .log
            .iter()
            .map(|e| e.envelope().event_id.clone())
            .collect();
        distinct.sort();
        distinct.dedup();
        (distinct, world.available("SKU-1"), world.log.clone())
    };
    let (once, stock_once, _) = scenario(false);
    let (twice, stock_twice, log_twice) = scenario(true);
    assert_eq!(once, twice, "the same events, by id");
    assert_eq!(stock_once, 0);
    assert_eq!(stock_twice, stock_once);
    // A repeated id is a re-emission: byte-identical.
    let codec = Codec::new().expect("codec");
    let mut by_id: HashMap<String, Vec<u8>> = HashMap::new();
    for event in &log_twice {
        let bytes = codec.encode(event).expect("encodes");
        let first = by_id
            .entry(event.envelope().event_id.clone())
            .or_insert(bytes.clone());
        assert_eq!(*first, bytes, "conflicting events with one id");
    }
}

#[test]
fn competing_orders_never_oversell() {
    let mut world = World::new();
    world.restock("HOT", 7, 1);
    let ids: Vec<String> = (0..20)
        .map(|n| {
            let o = order(n, &format!("c-{n}"), &[("HOT", 1)]);
            let id = o.envelope.order_id.clone();
            world.place(o);
            id
        })
        .collect();
    world.run();
    let confirmed = ids
        .iter()
        .filter(|id| world.status(id) == "confirmed")
        .count();
    assert_eq!(confirmed, 7, "min(demand 20, stock 7)");
    assert_eq!(
        ids.iter()
            .filter(|id| world.status(id) == "rejected")
            .count(),
        13
    );
    assert_eq!(world.available("HOT"), 0);
}

#[test]
fn a_short_line_releases_the_lines_already_reserved() {
    let mut world = World::new();
    world.restock("A", 5, 1);
    world.restock("B", 1, 2);
    let o = order(1, "c-1", &[("A", 2), ("B", 3)]);
    let id = o.envelope.order_id.clone();
    world.place(o);
    world.run();
    assert_eq!(
        world.kinds(&id),
        [
            "OrderPlaced",
            "OrderValidated",
            "FraudScored",
            "InventoryReservationRequested",
            "InventoryRejected",
            "InventoryReleased",
            "OrderRejected"
        ]
    );
    assert_eq!(world.available("A"), 5, "A was reserved, then released");
    assert_eq!(world.available("B"), 1);
}

#[test]
fn a_declined_payment_releases_stock_and_cancels() {
    let mut world = World::new();
    world.pay = Pay::Decline;
    world.restock("A", 5, 1);
    let o = order(1, "c-1", &[("A", 2)]);
    let id = o.envelope.order_id.clone();
    world.place(o);
    world.run();
    assert_eq!(
        world.kinds(&id)[5..],
        [
            "PaymentRequested",
            "PaymentDeclined",
            "InventoryReleased",
            "OrderCancelled"
        ]
    );
    assert_eq!(world.status(&id), "cancelled");
    assert_eq!(world.available("A"), 5);
}

fn cancel_request(id: &str, customer: &str, n: u128) -> OrderEvent {
    OrderEvent::OrderCancellationRequested(OrderCancellationRequested {
        envelope: Envelope {
            event_id: Uuid::from_u128(0x5000 + n).to_string(),
            order_id: id.to_owned(),
            customer_id: customer.to_owned(),
            occurred_at: 1_764_000_001_000,
            causation_id: None,
            sequence: 0,
            schema_version: 1,
        },
        reason: "changed my mind".into(),
    })
}

#[test]
fn cancellation_while_reserving_releases_and_cancels() {
    let mut world = World::new();
    world.restock("A", 5, 1);
    let o = order(1, "c-1", &[("A", 2)]);
    let id = o.envelope.order_id.clone();
    world.place(o);
    // Only the saga's first step: the reservation command waits in the inventory's queue.
    let placed = world.orders.pop_front().expect("placed");
    let mut out = Outputs::default();
    world
        .saga
        .handle(&mut world.saga_state, &placed, &mut out)
        .expect("handled");
    world.route(&mut out);
    world.orders.clear(); // its own timeline events: nothing to do
    world.input(cancel_request(&id, "c-1", 1));
    world.run();
    assert_eq!(world.status(&id), "cancelled");
    assert_eq!(
        world.available("A"),
        5,
        "reserved after the cancel arrived, then released"
    );
    assert!(world
        .kinds(&id)
        .ends_with(&["InventoryReleased", "OrderCancelled"]));
}

#[test]
fn cancellation_while_paying_waits_for_the_answer_then_refunds() {
    let mut world = World::new();
    world.pay = Pay::Hold;
    world.restock("A", 5, 1);
    let o = order(1, "c-1", &[("A", 2)]);
    let id = o.envelope.order_id.clone();
    world.place(o);
    world.run();
    assert_eq!(world.payments.len(), 1, "the payment is in flight");
    world.input(cancel_request(&id, "c-1", 1));
    world.run();
    assert!(
        world.kinds(&id).ends_with(&["PaymentRequested"]),
        "nothing until the answer"
    );
    world.pay = Pay::Authorize;
    world.run();
    assert_eq!(
        world.kinds(&id)[5..],
        [
            "PaymentRequested",
            "PaymentAuthorized",
            "PaymentRefundRequested",
            "PaymentRefunded",
            "InventoryReleased",
            "OrderCancelled"
        ]
    );
    assert_eq!(world.available("A"), 5);
}

#[test]
fn cancellation_after_confirmation_refunds_and_releases() {
    let mut world = World::new();
    world.restock("A", 5, 1);
    let o = order(1, "c-1", &[("A", 2)]);
    let id = o.envelope.order_id.clone();
    world.place(o);
    world.run();
    assert_eq!(world.status(&id), "confirmed");
    world.input(cancel_request(&id, "c-1", 1));
    world.input(cancel_request(&id, "c-1", 2)); // a second request changes nothing
    world.run();
    assert_eq!(world.status(&id), "cancelled");
    assert_eq!(
        world.kinds(&id)[7..],
        [
            "OrderConfirmed",
            "PaymentRefundRequested",
            "PaymentRefunded",
            "InventoryReleased",
            "OrderCancelled"
        ]
    );
    assert_eq!(world.available("A"), 5);
}

fn big_order(n: u128) -> OrderPlaced {
    // Total at or above the review amount (10 000.00): held for review.
    let mut o = order(n, "c-big", &[("A", 1)]);
    o.lines[0].unit_price_minor = 1_000_000;
    o.subtotal_minor = 1_000_000;
    o.total_minor = o.subtotal_minor + o.shipping_minor + o.tax_minor;
    o
}

fn decision(id: &str, decision: ReviewDecision, n: u128) -> OrderEvent {
    OrderEvent::FraudReviewDecided(FraudReviewDecided {
        envelope: Envelope {
            event_id: Uuid::from_u128(0x7000 + n).to_string(),
            order_id: id.to_owned(),
            customer_id: "c-big".into(),
            occurred_at: 1_764_000_002_000,
            causation_id: None,
            sequence: 0,
            schema_version: 1,
        },
        decision,
        reviewer: "ops".into(),
        note: String::new(),
    })
}

#[test]
fn review_holds_the_order_until_an_admin_decides() {
    for (choice, status) in [
        (ReviewDecision::Approve, "confirmed"),
        (ReviewDecision::Reject, "rejected"),
    ] {
        let mut world = World::new();
        world.restock("A", 2000, 1);
        let o = big_order(1);
        let id = o.envelope.order_id.clone();
        world.place(o);
        world.run();
        assert!(matches!(
            world.saga_state.order(&id).expect("known").stage,
            Stage::Review { .. }
        ));
        world.input(decision(&id, choice, 1));
        world.input(decision(&id, ReviewDecision::Reject, 2)); // too late: ignored
        world.run();
        assert_eq!(world.status(&id), status);
    }
}

#[test]
fn a_step_with_no_answer_times_out_and_cancels() {
    let mut world = World::new();
    let o = big_order(1);
    let id = o.envelope.order_id.clone();
    let placed_at = o.envelope.occurred_at;
    world.place(o);
    world.run();
    let review_timeout = defaults().saga.review_timeout_ms;
    let mut out = Outputs::default();
    // First seen by this process at placement time; due a full timeout later.
    world.saga.tick(3, &world.saga_state, placed_at, &mut out);
    world.saga.tick(
        3,
        &world.saga_state,
        placed_at + review_timeout - 1,
        &mut out,
    );
    assert!(out.is_empty(), "not due yet");
    world
        .saga
        .tick(3, &world.saga_state, placed_at + review_timeout, &mut out);
    assert_eq!(out.records().len(), 1);
    assert_eq!(
        out.records()[0].partition,
        Some(3),
        "back to its own partition"
    );
    let mut again = Outputs::default();
    world.saga.tick(
        3,
        &world.saga_state,
        placed_at + review_timeout + 1000,
        &mut again,
    );
    assert!(again.is_empty(), "a due timer is written once");
    world.route(&mut out);
    world.run();
    assert_eq!(world.status(&id), "cancelled");
    let OrderEvent::OrderCancelled(cancelled) = world.log.last().expect("events") else {
        panic!("expected OrderCancelled last");
    };
    assert_eq!(cancelled.initiated_by, "timeout");
}

#[test]
fn a_restored_step_counts_its_time_from_when_it_was_written() {
    let mut world = World::new();
    let o = big_order(1);
    let placed_at = o.envelope.occurred_at;
    world.place(o);
    world.run();
    let review_timeout = defaults().saga.review_timeout_ms;
    // The partition's changelog as the runtime writes it, restored by a new process (a
    // restart), with or without the records' timestamps.
    let records = world.saga_state.changes();
    let restore = |written_at: Option<i64>| {
        let mut state = SagaState::default();
        for (key, value) in &records {
            state.restore(key, value.as_deref()).expect("restores");
            if let Some(at) = written_at {
                state.note_written_at(key, at);
            }
        }
        state.restored();
        state
    };
    // Written when the order entered review: due a timeout after that, however recently this
    // process started.
    let mut out = Outputs::default();
    saga().tick(
        3,
        &restore(Some(placed_at)),
        placed_at + review_timeout,
        &mut out,
    );
    assert_eq!(out.records().len(), 1, "due on the first tick");
    // Not yet due before then.
    let mut early = Outputs::default();
    saga().tick(
        3,
        &restore(Some(placed_at)),
        placed_at + review_timeout - 1,
        &mut early,
    );
    assert!(early.is_empty());
    // With no time known the step gets its full time in this process.
    let mut unknown = Outputs::default();
    saga().tick(3, &restore(None), placed_at + review_timeout, &mut unknown);
    assert!(unknown.is_empty());
}

#[test]
fn an_unanswered_payment_request_is_sent_again_byte_for_byte() {
    let mut world = World::new();
    world.pay = Pay::Hold;
    world.restock("A", 5, 1);
    let o = order(1, "c-1", &[("A", 2)]);
    let id = o.envelope.order_id.clone();
    world.place(o);
    world.run();
    // The request reached the worker's topic; the broker then loses it (or its answer).
    let original = world.payments.pop_front().expect("a payment request");
    assert!(world.payments.is_empty());
    let requested_at = original.envelope().occurred_at;
    let resend = defaults().saga.payment_resend_ms;
    let tick = |world: &mut World, now: i64| {
        let mut out = Outputs::default();
        world.saga.tick(0, &world.saga_state, now, &mut out);
        out.drain()
            .filter(|r| r.topic == "payments.requests")
            .map(|r| r.event)
            .collect::<Vec<_>>()
    };
    assert!(
        tick(&mut world, requested_at).is_empty(),
        "nothing before its time"
    );
    assert!(
        tick(&mut world, requested_at + resend - 1).is_empty(),
        "nothing before payment_resend_ms"
    );
    // Waited its time in event time and here: sent again, exactly as first sent.
    let again = tick(&mut world, requested_at + 2 * resend);
    assert_eq!(again, vec![original.clone()]);
    assert!(
        tick(&mut world, requested_at + 2 * resend + 1).is_empty(),
        "once per interval"
    );
    assert_eq!(tick(&mut world, requested_at + 3 * resend), vec![original]);
    // The worker answers the resent request; the order goes on as if nothing happened.
    world.pay = Pay::Authorize;
    world.payments.extend(again);
    world.run();
    assert_eq!(world.status(&id), "confirmed");
    assert_eq!(world.kinds(&id), HAPPY);
    // Answered: never sent again.
    assert!(tick(&mut world, requested_at + 10 * resend).is_empty());
}

#[test]
fn an_unanswered_refund_request_is_sent_again_byte_for_byte() {
    let mut world = World::new();
    world.restock("A", 5, 1);
    let o = order(1, "c-1", &[("A", 2)]);
    let id = o.envelope.order_id.clone();
    world.place(o);
    world.run();
    assert_eq!(world.status(&id), "confirmed");
    world.pay = Pay::Hold;
    world.input(cancel_request(&id, "c-1", 1));
    world.run();
    let original = world.payments.pop_front().expect("a refund request");
    assert!(matches!(original, OrderEvent::PaymentRefundRequested(_)));
    let at = original.envelope().occurred_at;
    let resend = defaults().saga.payment_resend_ms;
    let mut out = Outputs::default();
    world.saga.tick(0, &world.saga_state, at, &mut out);
    world
        .saga
        .tick(0, &world.saga_state, at + 2 * resend, &mut out);
    let again: Vec<OrderEvent> = out.drain().map(|r| r.event).collect();
    assert_eq!(again, vec![original]);
    world.pay = Pay::Authorize;
    world.payments.extend(again);
    world.run();
    assert_eq!(world.status(&id), "cancelled");
    assert_eq!(world.available("A"), 5);
}

#[test]
fn an_inventory_timeout_releases_everything() {
    let mut world = World::new();
    world.restock("A", 5, 1);
    let o = order(1, "c-1", &[("A", 2)]);
    let id = o.envelope.order_id.clone();
    let placed_at = o.envelope.occurred_at;
    world.place(o);
    let placed = world.orders.pop_front().expect("placed");
    let mut out = Outputs::default();
    world
        .saga
        .handle(&mut world.saga_state, &placed, &mut out)
        .expect("handled");
    world.route(&mut out);
    world.orders.clear();
    let mut timers = Outputs::default();
    let timeout = defaults().saga.inventory_timeout_ms;
    // A backlog: first seen long after the deadline passed in event time; not due until the
    // step has waited its full time here.
    world
        .saga
        .tick(0, &world.saga_state, placed_at + 10 * timeout, &mut timers);
    assert!(
        timers.is_empty(),
        "a step is given its time in this process"
    );
    world
        .saga
        .tick(0, &world.saga_state, placed_at + 11 * timeout, &mut timers);
    assert_eq!(timers.records().len(), 1);
    world.route(&mut timers);
    world.run();
    assert_eq!(world.status(&id), "cancelled");
    assert_eq!(
        world.available("A"),
        5,
        "reserved late, released by the timeout's release"
    );
}

#[test]
fn fraud_rejects_a_burst_of_orders_from_one_customer() {
    let mut world = World::new();
    world.restock("A", 1000, 1);
    let burst = fraud().max_orders_per_window as u128 + 5;
    let ids: Vec<String> = (0..burst)
        .map(|n| {
            let mut o = order(n, "c-burst", &[("A", 1)]);
            o.envelope.occurred_at += n as i64;
            let id = o.envelope.order_id.clone();
            world.place(o);
            id
        })
        .collect();
    world.run();
    let last = ids.last().expect("orders");
    assert_eq!(world.status(last), "rejected");
    let scored = world.log.iter().rev().find_map(|e| match e {
        OrderEvent::FraudScored(s) if s.envelope.order_id == *last => Some(s.clone()),
        _ => None,
    });
    let scored = scored.expect("scored");
    assert_eq!(scored.decision, FraudDecision::Reject);
    assert!(
        scored.reasons.iter().any(|r| r.contains("rule:")),
        "{:?}",
        scored.reasons
    );
}

#[test]
fn a_malformed_event_id_is_poison() {
    let mut o = placed();
    o.envelope.event_id = "not-a-uuid".into();
    let mut saga = saga();
    let mut state = SagaState::default();
    let mut out = Outputs::default();
    let err = saga
        .handle(&mut state, &OrderEvent::OrderPlaced(o), &mut out)
        .expect_err("poison");
    assert!(matches!(err, StepError::Poison(_)));
    assert!(err.to_string().contains("event_id"));
    assert!(out.records().is_empty());
}

#[test]
fn state_survives_a_changelog_round_trip() {
    let mut world = World::new();
    world.restock("A", 5, 1);
    world.place(order(1, "c-1", &[("A", 2)]));
    world.run();
    let records = world.saga_state.changes();
    let mut restored = SagaState::default();
    for (key, value) in &records {
        restored.restore(key, value.as_deref()).expect("restores");
    }
    let id = Uuid::from_u128(0x2001).to_string();
    assert_eq!(restored.order(&id), world.saga_state.order(&id));
    assert!(restored.changes().is_empty());
    let stock = world.stock.changes();
    let mut restored_stock = InventoryState::default();
    for (key, value) in &stock {
        restored_stock
            .restore(key, value.as_deref())
            .expect("restores");
    }
    assert_eq!(restored_stock.sku("A"), world.stock.sku("A"));
}

/// 100,000 orders from one customer (a marketplace sending under one id) over almost three
/// hours of event time, with a one-hour horizon: the customer's value stays a few hundred bytes,
/// finished orders are dropped once the horizon passes them, and no changelog value nears the
/// limit.
#[test]
fn a_hot_customer_keeps_small_values_and_bounded_state() {
    const HOUR: i64 = 3_600_000;
    let mut model = fraud();
    // Score every order, reject each: finished at once, the customer recorded every time.
    model.reject_threshold = 0.000_001;
    model.review_threshold = 0.000_001;
    let mut saga = saga_with(model, HOUR);
    let mut state = SagaState::default();
    let start = 1_764_000_000_000;
    let orders = 100_000u128;
    let mut largest = 0;
    let mut most_orders = 0;
    let mut changelog = Vec::new();
    for n in 0..orders {
        let mut o = order(n, "c-hot", &[("A", 1)]);
        o.envelope.occurred_at = start + n as i64 * 100;
        let mut out = Outputs::default();
        saga.handle(&mut state, &OrderEvent::OrderPlaced(o), &mut out)
            .expect("handled");
        if n % 500 == 499 {
            for (key, value) in state.changes() {
                let size = value.as_ref().map_or(0, |v| v.len());
                assert!(size < crate::state::MAX_VALUE_BYTES, "{key}: {size} bytes");
                largest = largest.max(size);
                changelog.push((key, value));
            }
            changelog.push((
                crate::state::POSITION_KEY.to_owned(),
                Some((n + 1).to_string().into_bytes()),
            ));
            most_orders = most_orders.max(state.orders());
        }
    }
    // The whole history restores to the same bounded state.
    let mut restorer = crate::state::Restorer::<SagaState>::default();
    for (key, value) in &changelog {
        restorer
            .record(key, value.as_deref(), 1, None)
            .expect("restores");
    }
    let restored = restorer.finish();
    assert_eq!(restored.position, Some(orders as i64));
    assert_eq!(restored.state.orders(), state.orders());
    assert_eq!(restored.state.customer("c-hot"), state.customer("c-hot"));
    assert_eq!(restored.state.entries(), state.entries());
    assert!(largest < 1024, "largest changelog value: {largest} bytes");
    let customer = state.customer("c-hot").expect("customer kept");
    assert_eq!(customer.orders_seen, orders as u64);
    assert!(customer.buckets.len() <= fraud::VELOCITY_BUCKETS);
    let per_hour = (HOUR / 100) as usize;
    assert!(
        most_orders <= per_hour + 500,
        "orders held peaked at {most_orders}: bounded by the horizon's {per_hour}"
    );
    assert!(
        state.entries() <= 2 * per_hour + 1000,
        "{} entries",
        state.entries()
    );
    // Within the horizon a repeat is still recognised; past it the order is gone.
    let recent = Uuid::from_u128(0x2000 + orders - 1).to_string();
    assert!(state.order(&recent).is_some());
    assert!(state.order(&Uuid::from_u128(0x2000).to_string()).is_none());
}

/// A finished order is dropped with a tombstone once the horizon passes, an order in flight
/// never is, and the customer goes once idle that long.
#[test]
fn finished_orders_and_idle_customers_expire_orders_in_flight_do_not() {
    const HOUR: i64 = 3_600_000;
    let mut saga = saga_with(fraud(), HOUR);
    let mut state = SagaState::default();
    let mut out = Outputs::default();
    // Order 1 is invalid (rejected at once), order 2 is held for review (in flight).
    let mut invalid = order(1, "c-1", &[("A", 1)]);
    invalid.currency = "XXX".into();
    let held = big_order(2);
    let (invalid_id, held_id) = (
        invalid.envelope.order_id.clone(),
        held.envelope.order_id.clone(),
    );
    for o in [invalid, held] {
        saga.handle(&mut state, &OrderEvent::OrderPlaced(o), &mut out)
            .expect("handled");
    }
    state.changes();
    // Two hours later, an order of someone else moves the partition's clock.
    let mut later = order(3, "c-3", &[("A", 1)]);
    later.envelope.occurred_at += 2 * HOUR;
    saga.handle(&mut state, &OrderEvent::OrderPlaced(later), &mut out)
        .expect("handled");
    assert!(state.order(&invalid_id).is_none(), "finished: dropped");
    assert!(state.order(&held_id).is_some(), "in flight: kept");
    assert!(state.customer("c-big").is_none(), "idle customer dropped");
    let tombstones: Vec<String> = state
        .changes()
        .into_iter()
        .filter(|(_, v)| v.is_none())
        .map(|(k, _)| k)
        .collect();
    assert!(
        tombstones.contains(&format!("o:{invalid_id}")),
        "{tombstones:?}"
    );
    assert!(tombstones.contains(&"c:c-big".to_owned()), "{tombstones:?}");
}

/// A timeout written by a batch that then failed is written again after the partition is
/// restored (the runtime calls `on_assigned` then), byte for byte; without a restore, once.
#[test]
fn a_timer_whose_batch_failed_is_written_again() {
    let mut world = World::new();
    let o = big_order(1);
    let placed_at = o.envelope.occurred_at;
    world.place(o);
    world.run();
    let due = placed_at + defaults().saga.review_timeout_ms;
    let mut first = Outputs::default();
    world.saga.tick(3, &world.saga_state, placed_at, &mut first);
    world.saga.tick(3, &world.saga_state, due, &mut first);
    assert_eq!(first.records().len(), 1, "due");
    let mut again = Outputs::default();
    world
        .saga
        .tick(3, &world.saga_state, due + 1000, &mut again);
    assert!(again.is_empty(), "written once while its batch stands");
    // The batch carrying it failed: the session restarts and restores the partition.
    world.saga.on_assigned(3);
    world
        .saga
        .tick(3, &world.saga_state, due + 2000, &mut again);
    assert_eq!(
        again.records(),
        first.records(),
        "the same timer, byte for byte"
    );
}

/// A payment the worker never answers ends the order at `saga.payment_deadline_ms`: stock
/// released, cancelled, the timeline contiguous; an authorization that still arrives is refunded.
#[test]
fn a_payment_never_answered_ends_the_order_and_a_late_authorization_is_refunded() {
    let mut world = World::new();
    world.pay = Pay::Hold;
    world.restock("A", 5, 1);
    let o = order(1, "c-1", &[("A", 2)]);
    let id = o.envelope.order_id.clone();
    world.place(o);
    world.run();
    assert_eq!(world.available("A"), 3);
    let request = world.payments.pop_front().expect("a payment request");
    let requested_at = request.envelope().occurred_at;
    let deadline = requested_at + defaults().saga.payment_deadline_ms;
    let mut out = Outputs::default();
    world
        .saga
        .tick(0, &world.saga_state, requested_at, &mut out);
    world
        .saga
        .tick(0, &world.saga_state, deadline - 1, &mut out);
    assert!(
        out.records()
            .iter()
            .all(|r| matches!(r.event, OrderEvent::PaymentRequested(_))),
        "only resends before the deadline"
    );
    out.drain();
    world.saga.tick(0, &world.saga_state, deadline, &mut out);
    let timeouts: Vec<_> = out
        .records()
        .iter()
        .filter(|r| matches!(r.event, OrderEvent::OrderStepTimedOut(_)))
        .collect();
    assert_eq!(timeouts.len(), 1, "due at the deadline");
    world.route(&mut out);
    world.run();
    assert_eq!(world.status(&id), "cancelled");
    assert_eq!(world.available("A"), 5, "stock released");
    let timeline = world.timeline(&id);
    let sequences: Vec<i64> = timeline.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        sequences,
        (1..=sequences.len() as i64).collect::<Vec<_>>(),
        "contiguous: {timeline:?}"
    );
    assert_eq!(
        world.kinds(&id)[world.kinds(&id).len() - 2..],
        ["InventoryReleased", "OrderCancelled"]
    );
    // The gateway authorized after all: the saga asks for the money back, once.
    world.pay = Pay::Authorize;
    let late = world.answer_payment(&request).expect("an answer");
    let mut out = Outputs::default();
    for _ in 0..2 {
        world
            .saga
            .handle(&mut world.saga_state, &late, &mut out)
            .expect("handled");
    }
    let refunds: Vec<_> = out
        .records()
        .iter()
        .filter(|r| r.topic == "payments.requests")
        .map(|r| r.event.clone())
        .collect();
    assert_eq!(refunds.len(), 1, "one refund request: {refunds:?}");
    let OrderEvent::PaymentRefundRequested(refund) = &refunds[0] else {
        panic!("expected a refund request: {refunds:?}");
    };
    assert_eq!(refund.charge_idempotency_key, id);
    assert_eq!(world.status(&id), "cancelled");
}

/// A refund never answered ends the cancelled order at `saga.refund_deadline_ms`, with its
/// stock released and the reason naming the refund.
#[test]
fn a_refund_never_answered_ends_the_order() {
    let mut world = World::new();
    world.restock("A", 5, 1);
    let o = order(1, "c-1", &[("A", 2)]);
    let id = o.envelope.order_id.clone();
    world.place(o);
    world.run();
    assert_eq!(world.status(&id), "confirmed");
    world.pay = Pay::Hold;
    world.input(cancel_request(&id, "c-1", 1));
    world.run();
    assert!(matches!(
        world.saga_state.order(&id).map(|o| &o.stage),
        Some(Stage::Refunding { .. })
    ));
    let request = world.payments.pop_front().expect("a refund request");
    let requested_at = request.envelope().occurred_at;
    let deadline = requested_at + defaults().saga.refund_deadline_ms;
    let mut out = Outputs::default();
    world
        .saga
        .tick(0, &world.saga_state, requested_at, &mut out);
    world
        .saga
        .tick(0, &world.saga_state, deadline - 1, &mut out);
    world.saga.tick(0, &world.saga_state, deadline, &mut out);
    world.route(&mut out);
    world.run();
    assert_eq!(world.status(&id), "cancelled");
    assert_eq!(world.available("A"), 5);
    let cancelled = world.log.iter().rev().find_map(|e| match e {
        OrderEvent::OrderCancelled(c) if c.envelope.order_id == id => Some(c.clone()),
        _ => None,
    });
    let cancelled = cancelled.expect("cancelled");
    assert_eq!(cancelled.initiated_by, "timeout");
    assert!(
        cancelled.reason.contains("refund by hand"),
        "{}",
        cancelled.reason
    );
}

/// A stricter fraud model reloaded between a crash and the re-run of the batch the crash cut
/// short: the re-run emits exactly the first run's bytes (the partition's rules are part of its
/// state), and the new model decides from its control record on.
#[test]
fn a_reload_between_a_crash_and_the_re_run_changes_no_outcome() {
    let codec = Codec::new().expect("codec");
    let retention = defaults().state.retention_ms;
    let mut lenient = saga_with(fraud(), retention);
    let mut state = SagaState::default();
    let mut out = Outputs::default();
    // Batch 1: order 1, committed with its state.
    lenient
        .handle(
            &mut state,
            &OrderEvent::OrderPlaced(order(1, "c-1", &[("A", 1)])),
            &mut out,
        )
        .expect("handled");
    let committed = state.changes();
    // Batch 2: order 2; its outputs are written, then the process crashes before its state.
    let second = OrderEvent::OrderPlaced(order(2, "c-2", &[("A", 1)]));
    let mut first_run = Outputs::default();
    lenient
        .handle(&mut state, &second, &mut first_run)
        .expect("handled");
    let bytes = |out: &Outputs| -> Vec<Vec<u8>> {
        out.records()
            .iter()
            .map(|r| codec.encode(&r.event).expect("encodes"))
            .collect()
    };
    assert!(
        first_run.records().iter().any(|r| matches!(
            &r.event,
            OrderEvent::FraudScored(s) if s.decision == FraudDecision::Approve
        )),
        "approved at first"
    );

    // The operator reloads a model that rejects everything; the processor restarts with it.
    let mut strict_model = fraud();
    strict_model.review_threshold = 0.000_001;
    strict_model.reject_threshold = 0.000_001;
    let mut strict = saga_with(strict_model.clone(), retention);
    let mut restored = SagaState::default();
    for (key, value) in &committed {
        restored.restore(key, value.as_deref()).expect("restores");
    }
    restored.restored();
    let mut re_run = Outputs::default();
    strict
        .handle(&mut restored, &second, &mut re_run)
        .expect("handled");
    assert_eq!(
        bytes(&re_run),
        bytes(&first_run),
        "the re-run emits the same bytes"
    );

    // The reload's control record, behind batch 2 in the log: from here on, the strict model.
    let (rules, _) = saga_rules(strict_model, retention);
    strict
        .handle(
            &mut restored,
            &rules.changed_event(0, 1_764_000_100_000),
            &mut Outputs::default(),
        )
        .expect("handled");
    let mut third = Outputs::default();
    strict
        .handle(
            &mut restored,
            &OrderEvent::OrderPlaced(order(3, "c-3", &[("A", 1)])),
            &mut third,
        )
        .expect("handled");
    assert!(
        third.records().iter().any(|r| matches!(
            &r.event,
            OrderEvent::FraudScored(s) if s.decision == FraudDecision::Reject
        )),
        "rejected under the new rules"
    );
    // The rules travel with the state: a restore keeps them.
    let mut again = SagaState::default();
    for (key, value) in committed.iter().chain(restored.changes().iter()) {
        again.restore(key, value.as_deref()).expect("restores");
    }
    again.restored();
    assert_eq!(
        again.rules().map(|r| r.fraud().reject_threshold),
        Some(0.000_001)
    );
    // A control record that does not parse is poison, and changes nothing.
    let OrderEvent::SagaRulesChanged(mut broken) = rules.changed_event(0, 1) else {
        panic!("a control record");
    };
    broken.rules = "{\"nope\": 1}".into();
    let err = strict
        .handle(
            &mut again,
            &OrderEvent::SagaRulesChanged(broken),
            &mut Outputs::default(),
        )
        .expect_err("poison");
    assert!(matches!(err, StepError::Poison(_)));
    assert_eq!(
        again.rules().map(|r| r.fraud().reject_threshold),
        Some(0.000_001)
    );
}
