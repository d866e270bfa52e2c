//! The order saga: validate → score fraud (review holds the order for an admin decision) →
//! reserve inventory per SKU (all or nothing) → request payment → confirm, or cancel with
//! compensation. Customer cancellations and step deadlines are inputs like any other.
//!
//! The saga reads one topic, `orders.events` (keyed by customer): orders, its own timeline
//! events (ignored), the inventory processor's per-line replies, the payment worker's answers,
//! cancellation requests, review decisions and its own timers. One input partition in log order
//! is what makes the outputs a function of the log (rule 1): ids derived from the input's id and
//! the output's role, sequences from the order's state, time from the input's `occurred_at`.
//!
//! Idempotent application (rule 2): every input is checked against the order's stage — a second
//! `OrderPlaced`, a reply to a request the order is no longer waiting for, a decision on an order
//! not under review, all change nothing and emit nothing.
//!
//! Sequences: the saga numbers the order's timeline. When it requests a payment or a refund at
//! sequence `n`, it keeps `n + 1` for the payment worker's answer and emits nothing else for the
//! order until that answer came. Inputs from outside the saga carry sequence 0.

pub mod fraud;
pub mod validation;

use std::collections::{BTreeMap, HashMap, HashSet};

use orderflow_platform::config::SagaSettings;
use orderflow_schemas::{
    ids::derived_event_id, Envelope, EventKind, FraudDecision, FraudReviewDecided, FraudScored,
    InventoryRejected, InventoryReleaseRequested, InventoryReleased, InventoryReservationRequested,
    InventoryReserved, OrderCancelled, OrderConfirmed, OrderEvent, OrderPlaced, OrderRejected,
    OrderStepTimedOut, OrderValidated, PaymentRefundRequested, PaymentRequested, Reason,
    ReviewDecision, SkuQuantity, SkuShortage,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use self::fraud::{CustomerState, SharedModel};
use crate::{
    runtime::{Outputs, Step, StepError},
    state::{ChangelogRecord, PartitionState, Store},
};

/// Where the saga writes: the order timeline, the inventory commands, the payment requests.
#[derive(Debug, Clone, Copy)]
pub struct SagaTopics {
    pub orders: &'static str,
    pub inventory_commands: &'static str,
    pub payment_requests: &'static str,
}

/// The saga's state of one `orders.events` partition.
#[derive(Debug)]
pub struct SagaState {
    orders: Store<OrderState>,
    customers: Store<CustomerState>,
}

impl Default for SagaState {
    fn default() -> Self {
        Self {
            orders: Store::new("o:"),
            customers: Store::new("c:"),
        }
    }
}

impl SagaState {
    pub fn order(&self, order_id: &str) -> Option<&OrderState> {
        self.orders.get(order_id)
    }
}

impl PartitionState for SagaState {
    fn restore(&mut self, key: &str, value: Option<&[u8]>) -> Result<(), String> {
        if self.orders.owns(key) {
            self.orders.restore(key, value)
        } else if self.customers.owns(key) {
            self.customers.restore(key, value)
        } else {
            Err(format!("unknown saga state key {key:?}"))
        }
    }

    fn changes(&mut self) -> Vec<ChangelogRecord> {
        let mut out = Vec::new();
        self.orders.changes_into(&mut out);
        self.customers.changes_into(&mut out);
        out
    }

    fn note_written_at(&mut self, key: &str, written_at_ms: i64) {
        self.orders.note_written_at(key, written_at_ms);
    }
}

/// Where an order stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "stage", rename_all = "snake_case")]
pub enum Stage {
    /// Held for an admin's decision.
    Review {
        scored_event_id: String,
    },
    /// Waiting for the inventory's answer per SKU: the command id per SKU still pending.
    Reserving {
        request_id: String,
        pending: BTreeMap<String, String>,
        reserved: BTreeMap<String, i32>,
        shortages: Vec<(String, i32, i32)>,
    },
    /// Waiting for the payment worker's answer to `request_id`. `cause_id` is the request's
    /// causation id, kept to send the request again byte for byte (empty in states written
    /// before it was kept: such a request is not sent again).
    Paying {
        request_id: String,
        #[serde(default)]
        cause_id: String,
    },
    Confirmed,
    /// Waiting for the refund of a confirmed order the customer cancelled.
    Refunding {
        request_id: String,
        #[serde(default)]
        cause_id: String,
    },
    /// `rejected` or `cancelled`.
    Done {
        status: String,
    },
}

/// The saga's state of one order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderState {
    pub customer_id: String,
    pub currency: String,
    pub total_minor: i64,
    /// Quantity per SKU, lines of one SKU merged, sorted by SKU.
    pub lines: Vec<(String, i32)>,
    pub payment_token: String,
    /// Sequence of the last timeline event (or the slot kept for an awaited answer).
    pub sequence: i64,
    /// Event time the current stage started; deadlines run from it.
    pub since: i64,
    pub stage: Stage,
    /// A cancellation that arrived while a payment was in flight: applied on its answer.
    pub cancel_requested: Option<String>,
}

impl OrderState {
    fn sku_lines(&self) -> Vec<SkuQuantity> {
        self.lines
            .iter()
            .map(|(sku, quantity)| SkuQuantity {
                sku: sku.clone(),
                quantity: *quantity,
            })
            .collect()
    }
}

/// Roles of the outputs, fed into their derived ids. Never rename: ids depend on them.
mod role {
    pub(super) const VALIDATED: &str = "saga/validated";
    pub(super) const REJECTED: &str = "saga/rejected";
    pub(super) const SCORED: &str = "saga/fraud-scored";
    pub(super) const RESERVE: &str = "saga/reserve";
    pub(super) const RESERVED: &str = "saga/reserved";
    pub(super) const INVENTORY_REJECTED: &str = "saga/inventory-rejected";
    pub(super) const RELEASED: &str = "saga/released";
    pub(super) const RELEASE: &str = "saga/release";
    pub(super) const PAYMENT: &str = "saga/payment";
    pub(super) const REFUND: &str = "saga/refund";
    pub(super) const CONFIRMED: &str = "saga/confirmed";
    pub(super) const CANCELLED: &str = "saga/cancelled";
    pub(super) const TIMEOUT: &str = "saga/timeout";
}

/// The step names of `OrderStepTimedOut`.
pub const STEP_REVIEW: &str = "review";
pub const STEP_INVENTORY: &str = "inventory";

pub struct Saga {
    rules: validation::Rules,
    fraud: SharedModel,
    timeouts: SagaSettings,
    topics: SagaTopics,
    /// Timer events already written by this process, so a due timer is written once, not once
    /// per tick (a repeat after a restart is harmless: same id, same bytes).
    timers_sent: HashMap<i32, HashSet<String>>,
    /// Since when each pending step has waited (wall clock, by the id of the event that started
    /// it): when this process first saw it, or, for an order restored from the changelog and
    /// not changed since, when its changelog record was written (the step started then or
    /// earlier). A deadline is due when it passed in event time *and* the step has waited that
    /// long in wall time: a backlog (orders placed long before they are processed) does not
    /// time out steps that were never given their time, and restarts, however frequent, do not
    /// hold a timeout back. Not state; every estimate is late, which only ever delays a timeout.
    first_seen: HashMap<i32, HashMap<String, i64>>,
    /// When this process last sent a still unanswered payment request again (wall clock, by
    /// request id).
    resent: HashMap<i32, HashMap<String, i64>>,
}

impl Saga {
    pub fn new(
        rules: validation::Rules,
        fraud: SharedModel,
        timeouts: SagaSettings,
        topics: SagaTopics,
    ) -> Self {
        Self {
            rules,
            fraud,
            timeouts,
            topics,
            timers_sent: HashMap::new(),
            first_seen: HashMap::new(),
            resent: HashMap::new(),
        }
    }
}

/// Emits the events one input causes, numbering the order's timeline.
struct Emitter<'a> {
    out: &'a mut Outputs,
    topics: SagaTopics,
    cause: Uuid,
    cause_id: &'a str,
    occurred_at: i64,
    order_id: &'a str,
}

impl<'a> Emitter<'a> {
    /// The emitter of what `input` (whose id parsed as `cause`) causes.
    fn for_input(
        out: &'a mut Outputs,
        topics: SagaTopics,
        input: &'a Envelope,
        cause: Uuid,
    ) -> Self {
        Self {
            out,
            topics,
            cause,
            cause_id: &input.event_id,
            occurred_at: input.occurred_at,
            order_id: &input.order_id,
        }
    }

    fn envelope(&self, role: &str, kind: EventKind, customer_id: &str, sequence: i64) -> Envelope {
        Envelope {
            event_id: derived_event_id(self.cause, role).to_string(),
            order_id: self.order_id.to_owned(),
            customer_id: customer_id.to_owned(),
            occurred_at: self.occurred_at,
            causation_id: Some(self.cause_id.to_owned()),
            sequence,
            schema_version: kind.schema_version(),
        }
    }

    /// The next event of the order's timeline, on the orders topic. Returns its id.
    fn timeline(
        &mut self,
        order: &mut OrderState,
        role: &str,
        kind: EventKind,
        build: impl FnOnce(Envelope) -> OrderEvent,
    ) -> String {
        order.sequence += 1;
        let envelope = self.envelope(role, kind, &order.customer_id, order.sequence);
        let id = envelope.event_id.clone();
        self.out.push(
            self.topics.orders,
            order.customer_id.clone(),
            build(envelope),
        );
        id
    }

    /// Releases every line of the order: one command per SKU (releasing what was never reserved
    /// changes nothing) and `InventoryReleased` on the timeline.
    fn release_all(&mut self, order: &mut OrderState, reason: &str) {
        for (sku, _) in &order.lines {
            let envelope = self.envelope(
                &format!("{}/{sku}", role::RELEASE),
                EventKind::InventoryReleaseRequested,
                &order.customer_id,
                order.sequence + 1,
            );
            self.out.push(
                self.topics.inventory_commands,
                sku.clone(),
                OrderEvent::InventoryReleaseRequested(InventoryReleaseRequested {
                    envelope,
                    sku: sku.clone(),
                    reason: reason.to_owned(),
                }),
            );
        }
        let lines = order.sku_lines();
        self.timeline(
            order,
            role::RELEASED,
            EventKind::InventoryReleased,
            |envelope| {
                OrderEvent::InventoryReleased(InventoryReleased {
                    envelope,
                    lines,
                    reason: reason.to_owned(),
                })
            },
        );
    }

    fn cancel(&mut self, order: &mut OrderState, reason: &str, initiated_by: &str) {
        self.timeline(
            order,
            role::CANCELLED,
            EventKind::OrderCancelled,
            |envelope| {
                OrderEvent::OrderCancelled(OrderCancelled {
                    envelope,
                    reason: reason.to_owned(),
                    initiated_by: initiated_by.to_owned(),
                })
            },
        );
        finish(order, "cancelled");
    }

    fn reject(&mut self, order: &mut OrderState, stage: &str, reasons: Vec<Reason>) {
        self.timeline(
            order,
            role::REJECTED,
            EventKind::OrderRejected,
            |envelope| {
                OrderEvent::OrderRejected(OrderRejected {
                    envelope,
                    stage: stage.to_owned(),
                    reasons,
                })
            },
        );
        finish(order, "rejected");
    }

    /// `InventoryReservationRequested` on the timeline and one single-line command per SKU.
    fn reserve(&mut self, order: &mut OrderState) {
        let lines = order.sku_lines();
        let request_id = self.timeline(
            order,
            role::RESERVE,
            EventKind::InventoryReservationRequested,
            |envelope| {
                OrderEvent::InventoryReservationRequested(InventoryReservationRequested {
                    envelope,
                    lines,
                })
            },
        );
        let mut pending = BTreeMap::new();
        for line in order.sku_lines() {
            let mut envelope = self.envelope(
                &format!("{}/{}", role::RESERVE, line.sku),
                EventKind::InventoryReservationRequested,
                &order.customer_id,
                order.sequence,
            );
            envelope.causation_id = Some(request_id.clone());
            pending.insert(line.sku.clone(), envelope.event_id.clone());
            self.out.push(
                self.topics.inventory_commands,
                line.sku.clone(),
                OrderEvent::InventoryReservationRequested(InventoryReservationRequested {
                    envelope,
                    lines: vec![line],
                }),
            );
        }
        order.since = self.occurred_at;
        order.stage = Stage::Reserving {
            request_id,
            pending,
            reserved: BTreeMap::new(),
            shortages: Vec::new(),
        };
    }

    /// `PaymentRequested` on the timeline and to the payment worker; keeps the next sequence
    /// for the worker's answer.
    fn request_payment(&mut self, order: &mut OrderState) {
        order.sequence += 1;
        let envelope = self.envelope(
            role::PAYMENT,
            EventKind::PaymentRequested,
            &order.customer_id,
            order.sequence,
        );
        let request_id = envelope.event_id.clone();
        let event = OrderEvent::PaymentRequested(PaymentRequested {
            envelope,
            amount_minor: order.total_minor,
            currency: order.currency.clone(),
            payment_token: order.payment_token.clone(),
            idempotency_key: self.order_id.to_owned(),
        });
        self.out
            .push(self.topics.orders, order.customer_id.clone(), event.clone());
        self.out.push(
            self.topics.payment_requests,
            self.order_id.to_owned(),
            event,
        );
        order.sequence += 1; // the worker's answer
        order.since = self.occurred_at;
        order.stage = Stage::Paying {
            request_id,
            cause_id: self.cause_id.to_owned(),
        };
    }

    fn request_refund(&mut self, order: &mut OrderState) {
        order.sequence += 1;
        let envelope = self.envelope(
            role::REFUND,
            EventKind::PaymentRefundRequested,
            &order.customer_id,
            order.sequence,
        );
        let request_id = envelope.event_id.clone();
        let event = OrderEvent::PaymentRefundRequested(PaymentRefundRequested {
            envelope,
            amount_minor: order.total_minor,
            currency: order.currency.clone(),
            idempotency_key: format!("refund-{}", self.order_id),
            charge_idempotency_key: self.order_id.to_owned(),
        });
        self.out
            .push(self.topics.orders, order.customer_id.clone(), event.clone());
        self.out.push(
            self.topics.payment_requests,
            self.order_id.to_owned(),
            event,
        );
        order.sequence += 1; // the worker's answer
        order.since = self.occurred_at;
        order.stage = Stage::Refunding {
            request_id,
            cause_id: self.cause_id.to_owned(),
        };
    }
}

/// The id of the payment or refund request an order is waiting on.
fn awaited_payment(order: &OrderState) -> Option<&str> {
    match &order.stage {
        Stage::Paying { request_id, .. } | Stage::Refunding { request_id, .. } => Some(request_id),
        _ => None,
    }
}

/// The payment or refund request an order is waiting on, exactly as it was emitted (same id,
/// time, cause, sequence and content), to send it again; `None` when it is not waiting on one.
fn pending_payment_request(order_id: &str, order: &OrderState) -> Option<OrderEvent> {
    let (request_id, cause_id, kind) = match &order.stage {
        Stage::Paying {
            request_id,
            cause_id,
        } => (request_id, cause_id, EventKind::PaymentRequested),
        Stage::Refunding {
            request_id,
            cause_id,
        } => (request_id, cause_id, EventKind::PaymentRefundRequested),
        _ => return None,
    };
    if cause_id.is_empty() {
        return None;
    }
    let envelope = Envelope {
        event_id: request_id.clone(),
        order_id: order_id.to_owned(),
        customer_id: order.customer_id.clone(),
        occurred_at: order.since,
        causation_id: Some(cause_id.clone()),
        // The request's; the slot after it is kept for the answer.
        sequence: order.sequence - 1,
        schema_version: kind.schema_version(),
    };
    Some(match kind {
        EventKind::PaymentRequested => OrderEvent::PaymentRequested(PaymentRequested {
            envelope,
            amount_minor: order.total_minor,
            currency: order.currency.clone(),
            payment_token: order.payment_token.clone(),
            idempotency_key: order_id.to_owned(),
        }),
        _ => OrderEvent::PaymentRefundRequested(PaymentRefundRequested {
            envelope,
            amount_minor: order.total_minor,
            currency: order.currency.clone(),
            idempotency_key: format!("refund-{order_id}"),
            charge_idempotency_key: order_id.to_owned(),
        }),
    })
}

/// A final stage; what only the running saga needed is dropped.
fn finish(order: &mut OrderState, status: &str) {
    order.stage = Stage::Done {
        status: status.to_owned(),
    };
    order.payment_token.clear();
    order.cancel_requested = None;
}

fn cause_of(envelope: &Envelope) -> Result<Uuid, StepError> {
    Uuid::parse_str(&envelope.event_id).map_err(|_| {
        StepError::Poison(format!(
            "{} has a malformed event_id {:?}",
            envelope.order_id, envelope.event_id
        ))
    })
}

impl Saga {
    fn on_placed(
        &self,
        state: &mut SagaState,
        placed: &OrderPlaced,
        out: &mut Outputs,
    ) -> Result<(), StepError> {
        let envelope = &placed.envelope;
        if state.orders.get(&envelope.order_id).is_some() {
            return Ok(()); // a repeat: the order is under way or done
        }
        let cause = cause_of(envelope)?;
        let mut lines: BTreeMap<String, i32> = BTreeMap::new();
        for line in &placed.lines {
            *lines.entry(line.sku.clone()).or_default() += line.quantity;
        }
        let mut order = OrderState {
            customer_id: envelope.customer_id.clone(),
            currency: placed.currency.clone(),
            total_minor: placed.total_minor,
            lines: lines.into_iter().collect(),
            payment_token: placed.payment_token.clone(),
            sequence: envelope.sequence,
            since: envelope.occurred_at,
            stage: Stage::Done {
                status: "placed".to_owned(),
            },
            cancel_requested: None,
        };
        let mut em = Emitter::for_input(out, self.topics, envelope, cause);
        let problems = self.rules.check(placed);
        if !problems.is_empty() {
            em.reject(&mut order, "validation", problems);
            state.orders.put(envelope.order_id.clone(), order);
            return Ok(());
        }
        let (currency, total) = (placed.currency.clone(), placed.total_minor);
        em.timeline(
            &mut order,
            role::VALIDATED,
            EventKind::OrderValidated,
            |envelope| {
                OrderEvent::OrderValidated(OrderValidated {
                    envelope,
                    currency,
                    total_minor: total,
                })
            },
        );

        let model = self.fraud.current();
        let customer = state
            .customers
            .get(&envelope.customer_id)
            .cloned()
            .unwrap_or_default();
        let assessment = fraud::assess(&model, placed, &customer);
        let mut customer = customer;
        customer.record(placed, model.velocity_window_ms);
        state.customers.put(envelope.customer_id.clone(), customer);
        let reasons = assessment.reasons.clone();
        let scored_id = em.timeline(
            &mut order,
            role::SCORED,
            EventKind::FraudScored,
            |envelope| {
                OrderEvent::FraudScored(FraudScored {
                    envelope,
                    score: assessment.score,
                    decision: assessment.decision,
                    reasons,
                })
            },
        );
        match assessment.decision {
            FraudDecision::Approve => em.reserve(&mut order),
            FraudDecision::Review => {
                order.since = envelope.occurred_at;
                order.stage = Stage::Review {
                    scored_event_id: scored_id,
                };
            }
            FraudDecision::Reject => {
                let reasons = assessment
                    .reasons
                    .iter()
                    .map(|r| Reason {
                        code: "fraud_suspected".to_owned(),
                        field: None,
                        message: r.clone(),
                    })
                    .collect();
                em.reject(&mut order, "fraud", reasons);
            }
        }
        state.orders.put(envelope.order_id.clone(), order);
        Ok(())
    }

    fn on_review(
        &self,
        state: &mut SagaState,
        decided: &FraudReviewDecided,
        out: &mut Outputs,
    ) -> Result<(), StepError> {
        let envelope = &decided.envelope;
        let Some(order) = state.orders.get(&envelope.order_id) else {
            return Ok(());
        };
        if !matches!(order.stage, Stage::Review { .. }) {
            return Ok(());
        }
        let cause = cause_of(envelope)?;
        let Some(order) = state.orders.get_mut(&envelope.order_id) else {
            return Ok(());
        };
        let mut em = Emitter::for_input(out, self.topics, envelope, cause);
        match decided.decision {
            ReviewDecision::Approve => em.reserve(order),
            ReviewDecision::Reject => em.reject(
                order,
                "fraud",
                vec![Reason {
                    code: "fraud_review_rejected".to_owned(),
                    field: None,
                    message: if decided.note.is_empty() {
                        format!("rejected on review by {}", decided.reviewer)
                    } else {
                        format!(
                            "rejected on review by {}: {}",
                            decided.reviewer, decided.note
                        )
                    },
                }],
            ),
        }
        Ok(())
    }

    fn on_inventory_answer(
        &self,
        state: &mut SagaState,
        envelope: &Envelope,
        sku: &str,
        answer: Result<i32, (i32, i32)>,
        out: &mut Outputs,
    ) -> Result<(), StepError> {
        let Some(order) = state.orders.get(&envelope.order_id) else {
            return Ok(());
        };
        let Stage::Reserving { pending, .. } = &order.stage else {
            return Ok(());
        };
        if pending.get(sku).map(String::as_str) != envelope.causation_id.as_deref() {
            return Ok(()); // a repeat, or the answer to another request
        }
        let cause = cause_of(envelope)?;
        let Some(order) = state.orders.get_mut(&envelope.order_id) else {
            return Ok(());
        };
        let Stage::Reserving {
            pending,
            reserved,
            shortages,
            ..
        } = &mut order.stage
        else {
            return Ok(());
        };
        pending.remove(sku);
        match answer {
            Ok(quantity) => {
                reserved.insert(sku.to_owned(), quantity);
            }
            Err((requested, available)) => shortages.push((sku.to_owned(), requested, available)),
        }
        if !pending.is_empty() {
            return Ok(());
        }
        let shortages = std::mem::take(shortages);
        let any_reserved = !reserved.is_empty();
        let mut em = Emitter::for_input(out, self.topics, envelope, cause);
        if shortages.is_empty() {
            let lines = order.sku_lines();
            em.timeline(
                order,
                role::RESERVED,
                EventKind::InventoryReserved,
                |envelope| OrderEvent::InventoryReserved(InventoryReserved { envelope, lines }),
            );
            em.request_payment(order);
            return Ok(());
        }
        let reasons = shortages
            .iter()
            .map(|(sku, requested, available)| Reason {
                code: "out_of_stock".to_owned(),
                field: Some(format!("lines[sku={sku}]")),
                message: format!("{requested} requested, {available} available"),
            })
            .collect();
        let shortages = shortages
            .into_iter()
            .map(|(sku, requested, available)| SkuShortage {
                sku,
                requested,
                available,
            })
            .collect();
        em.timeline(
            order,
            role::INVENTORY_REJECTED,
            EventKind::InventoryRejected,
            |envelope| {
                OrderEvent::InventoryRejected(InventoryRejected {
                    envelope,
                    shortages,
                })
            },
        );
        if any_reserved {
            em.release_all(order, "another line is out of stock");
        }
        em.reject(order, "inventory", reasons);
        Ok(())
    }

    /// Answers of the payment worker: `PaymentAuthorized`, `PaymentDeclined`, `PaymentRefunded`.
    fn on_payment_answer(
        &self,
        state: &mut SagaState,
        event: &OrderEvent,
        out: &mut Outputs,
    ) -> Result<(), StepError> {
        let envelope = event.envelope();
        let Some(order) = state.orders.get(&envelope.order_id) else {
            return Ok(());
        };
        let awaited = match (&order.stage, event) {
            (Stage::Paying { request_id, .. }, OrderEvent::PaymentAuthorized(_))
            | (Stage::Paying { request_id, .. }, OrderEvent::PaymentDeclined(_))
            | (Stage::Refunding { request_id, .. }, OrderEvent::PaymentRefunded(_)) => {
                envelope.causation_id.as_deref() == Some(request_id.as_str())
            }
            _ => false,
        };
        if !awaited {
            return Ok(());
        }
        let cause = cause_of(envelope)?;
        let Some(order) = state.orders.get_mut(&envelope.order_id) else {
            return Ok(());
        };
        let mut em = Emitter::for_input(out, self.topics, envelope, cause);
        match event {
            OrderEvent::PaymentAuthorized(_) => match order.cancel_requested.clone() {
                Some(_) => em.request_refund(order),
                None => {
                    let (total_minor, currency) = (order.total_minor, order.currency.clone());
                    em.timeline(
                        order,
                        role::CONFIRMED,
                        EventKind::OrderConfirmed,
                        |envelope| {
                            OrderEvent::OrderConfirmed(OrderConfirmed {
                                envelope,
                                total_minor,
                                currency,
                            })
                        },
                    );
                    order.stage = Stage::Confirmed;
                    order.payment_token.clear();
                }
            },
            OrderEvent::PaymentDeclined(declined) => {
                let reason = format!("payment declined: {}", declined.reason);
                em.release_all(order, &reason);
                match order.cancel_requested.clone() {
                    Some(asked) => em.cancel(order, &asked, "customer"),
                    None => em.cancel(order, &reason, "payment"),
                }
            }
            OrderEvent::PaymentRefunded(_) => {
                let reason = order
                    .cancel_requested
                    .clone()
                    .unwrap_or_else(|| "cancelled by the customer".to_owned());
                em.release_all(order, "order cancelled");
                em.cancel(order, &reason, "customer");
            }
            _ => {}
        }
        Ok(())
    }

    fn on_cancel_request(
        &self,
        state: &mut SagaState,
        envelope: &Envelope,
        reason: &str,
        out: &mut Outputs,
    ) -> Result<(), StepError> {
        let Some(order) = state.orders.get(&envelope.order_id) else {
            return Ok(());
        };
        if matches!(order.stage, Stage::Done { .. } | Stage::Refunding { .. })
            || (matches!(order.stage, Stage::Paying { .. }) && order.cancel_requested.is_some())
        {
            return Ok(());
        }
        let cause = cause_of(envelope)?;
        let Some(order) = state.orders.get_mut(&envelope.order_id) else {
            return Ok(());
        };
        let reason = if reason.is_empty() {
            "cancelled by the customer"
        } else {
            reason
        };
        let mut em = Emitter::for_input(out, self.topics, envelope, cause);
        match &order.stage {
            Stage::Review { .. } => em.cancel(order, reason, "customer"),
            Stage::Reserving { .. } => {
                em.release_all(order, "order cancelled");
                em.cancel(order, reason, "customer");
            }
            // The payment may already have moved money: decide on its answer.
            Stage::Paying { .. } => order.cancel_requested = Some(reason.to_owned()),
            Stage::Confirmed => {
                order.cancel_requested = Some(reason.to_owned());
                em.request_refund(order);
            }
            Stage::Refunding { .. } | Stage::Done { .. } => {}
        }
        Ok(())
    }

    fn on_timeout(
        &self,
        state: &mut SagaState,
        timed_out: &OrderStepTimedOut,
        out: &mut Outputs,
    ) -> Result<(), StepError> {
        let envelope = &timed_out.envelope;
        let Some(order) = state.orders.get(&envelope.order_id) else {
            return Ok(());
        };
        let current = match &order.stage {
            Stage::Review { scored_event_id } => Some((STEP_REVIEW, scored_event_id)),
            Stage::Reserving { request_id, .. } => Some((STEP_INVENTORY, request_id)),
            _ => None,
        };
        if current != Some((timed_out.step.as_str(), &timed_out.stage_event_id)) {
            return Ok(()); // the step answered in time, or this is a repeat
        }
        let cause = cause_of(envelope)?;
        let Some(order) = state.orders.get_mut(&envelope.order_id) else {
            return Ok(());
        };
        let mut em = Emitter::for_input(out, self.topics, envelope, cause);
        let reason = format!("no answer from the {} step in time", timed_out.step);
        if timed_out.step == STEP_INVENTORY {
            em.release_all(order, &reason);
        }
        em.cancel(order, &reason, "timeout");
        Ok(())
    }
}

/// Since when (wall clock) an order's step has waited at the latest, as far as this process can
/// tell: when its restored changelog record was written, or now.
fn waiting_since(state: &SagaState, order_id: &str, now_ms: i64) -> i64 {
    state
        .orders
        .written_at(order_id)
        .map_or(now_ms, |written| written.min(now_ms))
}

/// The deadline of an order's current step, with the step and the event that started it.
fn deadline<'a>(
    timeouts: &SagaSettings,
    order: &'a OrderState,
) -> Option<(i64, &'static str, &'a str)> {
    {
        match &order.stage {
            Stage::Review { scored_event_id } => Some((
                order.since + timeouts.review_timeout_ms,
                STEP_REVIEW,
                scored_event_id,
            )),
            Stage::Reserving { request_id, .. } => Some((
                order.since + timeouts.inventory_timeout_ms,
                STEP_INVENTORY,
                request_id,
            )),
            _ => None,
        }
    }
}

impl Step for Saga {
    type State = SagaState;

    fn handle(
        &mut self,
        state: &mut SagaState,
        event: &OrderEvent,
        out: &mut Outputs,
    ) -> Result<(), StepError> {
        match event {
            OrderEvent::OrderPlaced(placed) => self.on_placed(state, placed, out),
            OrderEvent::FraudReviewDecided(decided) => self.on_review(state, decided, out),
            OrderEvent::InventoryLineReserved(r) => {
                self.on_inventory_answer(state, &r.envelope, &r.sku, Ok(r.quantity), out)
            }
            OrderEvent::InventoryLineRejected(r) => self.on_inventory_answer(
                state,
                &r.envelope,
                &r.sku,
                Err((r.requested, r.available)),
                out,
            ),
            OrderEvent::PaymentAuthorized(_)
            | OrderEvent::PaymentDeclined(_)
            | OrderEvent::PaymentRefunded(_) => self.on_payment_answer(state, event, out),
            OrderEvent::OrderCancellationRequested(c) => {
                self.on_cancel_request(state, &c.envelope, &c.reason, out)
            }
            OrderEvent::OrderStepTimedOut(t) => self.on_timeout(state, t, out),
            // The saga's own timeline events and the inventory's release receipts.
            _ => Ok(()),
        }
    }

    fn tick(&mut self, partition: i32, state: &SagaState, now_ms: i64, out: &mut Outputs) {
        let mut due = HashSet::new();
        let mut pending = HashSet::new();
        let sent = self.timers_sent.entry(partition).or_default();
        let first_seen = self.first_seen.entry(partition).or_default();
        let resent = self.resent.entry(partition).or_default();
        let resend_ms = self.timeouts.payment_resend_ms;
        for (order_id, order) in state.orders.iter() {
            let Some((deadline, step, stage_event_id)) = deadline(&self.timeouts, order) else {
                // Waiting on a payment or refund answer instead: the request is sent to the
                // worker again, byte for byte, every `payment_resend_ms` (in event time since
                // the request, and waited that long in this process). A request or an answer
                // the broker lost then still gets its answer; one that was only slow gets the
                // same answer twice, which the saga drops.
                let Some(request_id) = awaited_payment(order) else {
                    continue;
                };
                pending.insert(request_id.to_owned());
                let seen = *first_seen
                    .entry(request_id.to_owned())
                    .or_insert_with(|| waiting_since(state, order_id, now_ms));
                let last = resent.get(request_id).copied().unwrap_or(seen);
                if order.since + resend_ms > now_ms || now_ms - last < resend_ms {
                    continue;
                }
                let Some(request) = pending_payment_request(order_id, order) else {
                    continue;
                };
                resent.insert(request_id.to_owned(), now_ms);
                tracing::warn!(order_id = %order_id, kind = request.kind().name(), "No payment answer in time; sending the request again.");
                out.push(self.topics.payment_requests, order_id.clone(), request);
                continue;
            };
            pending.insert(stage_event_id.to_owned());
            let seen = *first_seen
                .entry(stage_event_id.to_owned())
                .or_insert_with(|| waiting_since(state, order_id, now_ms));
            let timeout = deadline - order.since;
            if deadline > now_ms || now_ms - seen < timeout {
                continue;
            }
            let Ok(stage_event) = Uuid::parse_str(stage_event_id) else {
                continue;
            };
            let event_id = derived_event_id(stage_event, role::TIMEOUT).to_string();
            due.insert(event_id.clone());
            if !sent.insert(event_id.clone()) {
                continue;
            }
            out.push_to_partition(
                self.topics.orders,
                partition,
                order.customer_id.clone(),
                OrderEvent::OrderStepTimedOut(OrderStepTimedOut {
                    envelope: Envelope {
                        event_id,
                        order_id: order_id.clone(),
                        customer_id: order.customer_id.clone(),
                        occurred_at: deadline,
                        causation_id: Some(stage_event_id.to_owned()),
                        sequence: 0,
                        schema_version: EventKind::OrderStepTimedOut.schema_version(),
                    },
                    step: step.to_owned(),
                    stage_event_id: stage_event_id.to_owned(),
                }),
            );
        }
        // Forget timers and resends whose order moved on.
        sent.retain(|id| due.contains(id));
        first_seen.retain(|id, _| pending.contains(id));
        resent.retain(|id, _| pending.contains(id));
    }
}

#[cfg(test)]
mod tests;
