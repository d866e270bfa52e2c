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
//!
//! Layout: [`state`] (what is kept per order and customer, and for how long), [`emitter`] (how
//! an input's outputs are built), one module per stage ([`placed`]: validation and fraud
//! scoring, [`review`], [`reservation`], [`payment`], [`cancellation`]) and [`timers`].

pub mod cancellation;
pub mod emitter;
pub mod fraud;
pub mod payment;
pub mod placed;
pub mod reservation;
pub mod review;
pub mod rules;
pub mod state;
pub mod timers;
pub mod validation;

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use orderflow_schemas::{Envelope, EventKind, OrderEvent};
use uuid::Uuid;

pub use self::rules::{ActiveRules, SagaRules};
pub use self::state::{OrderState, SagaState, Stage};
use crate::runtime::{Outputs, Step, StepError};

/// Where the saga writes: the order timeline, the inventory commands, the payment requests.
#[derive(Debug, Clone, Copy)]
pub struct SagaTopics {
    pub orders: &'static str,
    pub inventory_commands: &'static str,
    pub payment_requests: &'static str,
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
    pub(super) const LATE_REFUND: &str = "saga/late-refund";
}

/// The step names of `OrderStepTimedOut`.
pub const STEP_REVIEW: &str = "review";
pub const STEP_INVENTORY: &str = "inventory";
pub const STEP_PAYMENT: &str = "payment";
pub const STEP_REFUND: &str = "refund";

pub struct Saga {
    /// The process's configured rules: adopted by a partition that has none yet
    /// ([`rules`]); after that, the partition's own rules decide.
    configured: Arc<ActiveRules>,
    topics: SagaTopics,
    /// `state.retention_ms`: how long finished orders and idle customers are kept.
    retention_ms: i64,
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
    /// A shadow ([`Saga::shadow`]): its configured rules only, no timers of its own.
    shadow: bool,
}

impl Saga {
    pub fn new(rules: SagaRules, topics: SagaTopics, retention_ms: i64) -> Self {
        Self {
            configured: ActiveRules::new(rules),
            topics,
            retention_ms,
            timers_sent: HashMap::new(),
            first_seen: HashMap::new(),
            resent: HashMap::new(),
            shadow: false,
        }
    }

    /// A shadow of the live saga (`orderflow process --shadow`): it reads the live log, answers
    /// included, and writes to its own topics. Its configured rules decide throughout (the live
    /// log's rules records are the live saga's, not its own), and it writes no timers: the live
    /// saga's timeouts are in the log it reads, with the ids its own would have had.
    pub fn shadow(mut self) -> Self {
        self.shadow = true;
        self
    }
}

/// The kinds of event the saga writes to the orders topic (its timeline): what a shadow's
/// output is compared on (`orderflow shadow diff`).
pub const TIMELINE_KINDS: [EventKind; 11] = [
    EventKind::OrderValidated,
    EventKind::FraudScored,
    EventKind::InventoryReservationRequested,
    EventKind::InventoryReserved,
    EventKind::InventoryRejected,
    EventKind::InventoryReleased,
    EventKind::PaymentRequested,
    EventKind::PaymentRefundRequested,
    EventKind::OrderConfirmed,
    EventKind::OrderRejected,
    EventKind::OrderCancelled,
];

fn cause_of(envelope: &Envelope) -> Result<Uuid, StepError> {
    Uuid::parse_str(&envelope.event_id).map_err(|_| {
        StepError::Poison(format!(
            "{} has a malformed event_id {:?}",
            envelope.order_id, envelope.event_id
        ))
    })
}

impl Step for Saga {
    type State = SagaState;

    fn handle(
        &mut self,
        state: &mut SagaState,
        event: &OrderEvent,
        out: &mut Outputs,
    ) -> Result<(), StepError> {
        let envelope = event.envelope();
        state.advance(envelope.occurred_at, self.retention_ms);
        let rules = state.rules_or_adopt(&self.configured);
        let handled = match event {
            // A shadow keeps its own rules (see `shadow`).
            OrderEvent::SagaRulesChanged(_) if self.shadow => return Ok(()),
            OrderEvent::SagaRulesChanged(changed) => {
                let rules = SagaRules::from_json(&changed.rules).map_err(StepError::Poison)?;
                if state.set_rules(ActiveRules::new(rules)) {
                    tracing::info!(digest = %changed.digest, "Saga rules changed.");
                }
                return Ok(());
            }
            OrderEvent::OrderPlaced(placed) => self.on_placed(state, placed, &rules, out),
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
            OrderEvent::OrderStepTimedOut(t) => self.on_timeout(state, t, &rules, out),
            // The saga's own timeline events and the inventory's release receipts.
            _ => Ok(()),
        };
        state.track(
            &envelope.order_id,
            &envelope.customer_id,
            envelope.occurred_at,
        );
        handled
    }

    fn tick(&mut self, partition: i32, state: &SagaState, now_ms: i64, out: &mut Outputs) {
        if !self.shadow {
            self.run_timers(partition, state, now_ms, out);
        }
    }

    fn on_assigned(&mut self, partition: i32) {
        self.forget_timers(partition);
    }
}

#[cfg(test)]
mod tests;
