//! Timers: step deadlines and payment resends. A due deadline becomes an `OrderStepTimedOut`
//! event written back to the saga's own input partition, and is applied like any other input
//! (so a timeout and a late answer are ordered by the log, and a re-run sees the same). Only
//! orders in flight are visited.
//!
//! What the timers remember between ticks (which timeouts were written, which requests resent)
//! is this process's bookkeeping, not state: it is forgotten whenever a partition is (re)assigned,
//! which includes every restart after a failed batch, so a timer whose batch failed is written
//! again (same id, same bytes: a repeat the saga drops).

use std::collections::HashSet;

use orderflow_schemas::{
    ids::derived_event_id, Envelope, EventKind, OrderEvent, OrderStepTimedOut,
};
use uuid::Uuid;

use super::{
    cause_of,
    emitter::{charge_request, refund_request, Emitter},
    role,
    rules::ActiveRules,
    state::{OrderState, SagaState, Stage},
    Saga, STEP_INVENTORY, STEP_PAYMENT, STEP_REFUND, STEP_REVIEW,
};
use crate::runtime::{Outputs, StepError};
use orderflow_platform::config::SagaSettings;

impl Saga {
    pub(super) fn on_timeout(
        &self,
        state: &mut SagaState,
        timed_out: &OrderStepTimedOut,
        rules: &ActiveRules,
        out: &mut Outputs,
    ) -> Result<(), StepError> {
        let envelope = &timed_out.envelope;
        let Some(order) = state.orders.get(&envelope.order_id) else {
            return Ok(());
        };
        let current = deadline(rules.deadlines(), order).map(|(_, step, id)| (step, id));
        if current != Some((timed_out.step.as_str(), timed_out.stage_event_id.as_str())) {
            return Ok(()); // the step answered in time, or this is a repeat
        }
        let cause = cause_of(envelope)?;
        let Some(order) = state.orders.get_mut(&envelope.order_id) else {
            return Ok(());
        };
        let mut em = Emitter::for_input(out, self.topics, envelope, cause);
        let reason = format!("no answer from the {} step in time", timed_out.step);
        match timed_out.step.as_str() {
            STEP_INVENTORY => {
                em.release_all(order, &reason);
                em.cancel(order, &reason, "timeout");
            }
            STEP_PAYMENT => {
                // The slot kept for the worker's answer is not coming: the timeline goes on
                // from it. A late authorization is refunded (`payment`).
                order.sequence -= 1;
                let request = timed_out.stage_event_id.clone();
                let reason = format!("{reason}; a late authorization is refunded");
                em.release_all(order, &reason);
                em.cancel(order, &reason, "timeout");
                order.timed_out_payment = Some(request);
            }
            STEP_REFUND => {
                // The customer cancelled a confirmed order; the refund was never confirmed.
                // The order ends (stock released) and reconcile reports the payment still
                // standing for an operator to refund by hand.
                order.sequence -= 1;
                let asked = order
                    .cancel_requested
                    .clone()
                    .unwrap_or_else(|| "cancelled by the customer".to_owned());
                em.release_all(order, "order cancelled");
                em.cancel(
                    order,
                    &format!("{asked}; {reason}: refund by hand"),
                    "timeout",
                );
            }
            _ => em.cancel(order, &reason, "timeout"),
        }
        Ok(())
    }

    /// The timers of one partition (see [`Step::tick`](crate::runtime::Step::tick)): due step
    /// deadlines become `OrderStepTimedOut` inputs; unanswered payment requests are sent again.
    pub(super) fn run_timers(
        &mut self,
        partition: i32,
        state: &SagaState,
        now_ms: i64,
        out: &mut Outputs,
    ) {
        let mut due = HashSet::new();
        let mut pending = HashSet::new();
        let sent = self.timers_sent.entry(partition).or_default();
        let first_seen = self.first_seen.entry(partition).or_default();
        let resent = self.resent.entry(partition).or_default();
        // The partition's rules; the configured ones until its first input adopts them.
        let rules = state.rules().unwrap_or(&self.configured).clone();
        let timeouts = rules.deadlines();
        let resend_ms = timeouts.payment_resend_ms;
        for (order_id, order) in state.active() {
            let Some((deadline, step, stage_event_id)) = deadline(timeouts, order) else {
                continue;
            };
            pending.insert(stage_event_id.to_owned());
            if let Some(request_id) = order.awaited_payment() {
                // Waiting on a payment or refund answer: until its deadline, the request is
                // sent to the worker again, byte for byte, every `payment_resend_ms` (in event
                // time since the request, and waited that long in this process). A request or
                // an answer the broker lost then still gets its answer, and a request the
                // gateway could not answer is tried again (one key at a time); one that was
                // only slow gets the same answer twice, which the saga drops.
                let seen = *first_seen
                    .entry(request_id.to_owned())
                    .or_insert_with(|| waiting_since(state, order_id, now_ms));
                let last = resent.get(request_id).copied().unwrap_or(seen);
                let resend_due = order.since + resend_ms <= now_ms && now_ms - last >= resend_ms;
                if resend_due && deadline > now_ms {
                    if let Some(request) = pending_payment_request(order_id, order) {
                        resent.insert(request_id.to_owned(), now_ms);
                        tracing::warn!(order_id = %order_id, kind = request.kind().name(), "No payment answer in time; sending the request again.");
                        out.push(self.topics.payment_requests, order_id.clone(), request);
                    }
                }
            }
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

    /// Forgets what this process wrote for `partition`'s timers: it was (re)assigned, and a
    /// timer written by a batch that failed must be written again.
    pub(super) fn forget_timers(&mut self, partition: i32) {
        self.timers_sent.remove(&partition);
        self.resent.remove(&partition);
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
    let (timeout, step, id) = match &order.stage {
        Stage::Review { scored_event_id } => {
            (timeouts.review_timeout_ms, STEP_REVIEW, scored_event_id)
        }
        Stage::Reserving { request_id, .. } => {
            (timeouts.inventory_timeout_ms, STEP_INVENTORY, request_id)
        }
        Stage::Paying { request_id, .. } => {
            (timeouts.payment_deadline_ms, STEP_PAYMENT, request_id)
        }
        Stage::Refunding { request_id, .. } => {
            (timeouts.refund_deadline_ms, STEP_REFUND, request_id)
        }
        Stage::Confirmed | Stage::Done { .. } => return None,
    };
    Some((order.since + timeout, step, id.as_str()))
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
        EventKind::PaymentRequested => charge_request(order_id, order, envelope),
        _ => refund_request(order_id, order, envelope),
    })
}
