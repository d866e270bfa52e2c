//! Emits the events one input causes: ids derived from the input's id and the output's role,
//! the order's timeline numbered by its sequence, time from the input's `occurred_at` (rule 1),
//! and the stage changes that go with each request.

use std::collections::BTreeMap;

use orderflow_schemas::{
    ids::derived_event_id, Envelope, EventKind, InventoryReleaseRequested, InventoryReleased,
    InventoryReservationRequested, OrderCancelled, OrderEvent, OrderRejected,
    PaymentRefundRequested, PaymentRequested, Reason,
};
use uuid::Uuid;

use super::{
    role,
    state::{OrderState, Stage},
    SagaTopics,
};
use crate::runtime::Outputs;

/// Emits the events one input causes, numbering the order's timeline.
pub(super) struct Emitter<'a> {
    out: &'a mut Outputs,
    topics: SagaTopics,
    cause: Uuid,
    cause_id: &'a str,
    pub(super) occurred_at: i64,
    order_id: &'a str,
}

impl<'a> Emitter<'a> {
    /// The emitter of what `input` (whose id parsed as `cause`) causes.
    pub(super) fn for_input(
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

    pub(super) fn envelope(
        &self,
        role: &str,
        kind: EventKind,
        customer_id: &str,
        sequence: i64,
    ) -> Envelope {
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
    pub(super) fn timeline(
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
    pub(super) fn release_all(&mut self, order: &mut OrderState, reason: &str) {
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

    pub(super) fn cancel(&mut self, order: &mut OrderState, reason: &str, initiated_by: &str) {
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
        self.finish(order, "cancelled");
    }

    pub(super) fn reject(&mut self, order: &mut OrderState, stage: &str, reasons: Vec<Reason>) {
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
        self.finish(order, "rejected");
    }

    /// `InventoryReservationRequested` on the timeline and one single-line command per SKU.
    pub(super) fn reserve(&mut self, order: &mut OrderState) {
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
    pub(super) fn request_payment(&mut self, order: &mut OrderState) {
        order.sequence += 1;
        let envelope = self.envelope(
            role::PAYMENT,
            EventKind::PaymentRequested,
            &order.customer_id,
            order.sequence,
        );
        let request_id = envelope.event_id.clone();
        let event = charge_request(self.order_id, order, envelope);
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

    pub(super) fn request_refund(&mut self, order: &mut OrderState) {
        order.sequence += 1;
        let envelope = self.envelope(
            role::REFUND,
            EventKind::PaymentRefundRequested,
            &order.customer_id,
            order.sequence,
        );
        let request_id = envelope.event_id.clone();
        let event = refund_request(self.order_id, order, envelope);
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

    /// A refund of an authorization that came after the payment deadline had cancelled the
    /// order: to the payment worker only, off the order's timeline (sequence 0, like other
    /// compensations from outside it), under the refund key a customer's refund would use.
    pub(super) fn refund_late_authorization(&mut self, order: &OrderState) {
        let envelope = self.envelope(
            role::LATE_REFUND,
            EventKind::PaymentRefundRequested,
            &order.customer_id,
            0,
        );
        self.out.push(
            self.topics.payment_requests,
            self.order_id.to_owned(),
            refund_request(self.order_id, order, envelope),
        );
    }

    /// A final stage, from this input's time on; what only the running saga needed is dropped.
    pub(super) fn finish(&self, order: &mut OrderState, status: &str) {
        order.stage = Stage::Done {
            status: status.to_owned(),
        };
        order.since = self.occurred_at;
        order.payment_token.clear();
        order.cancel_requested = None;
    }
}

/// The charge request of an order: its idempotency key is the order id, so every repeat, from
/// any instance, gets the gateway's first answer.
pub(super) fn charge_request(order_id: &str, order: &OrderState, envelope: Envelope) -> OrderEvent {
    OrderEvent::PaymentRequested(PaymentRequested {
        envelope,
        amount_minor: order.total_minor,
        currency: order.currency.clone(),
        payment_token: order.payment_token.clone(),
        idempotency_key: order_id.to_owned(),
    })
}

/// The refund request of an order's charge, under the one refund key of the order.
pub(super) fn refund_request(order_id: &str, order: &OrderState, envelope: Envelope) -> OrderEvent {
    OrderEvent::PaymentRefundRequested(PaymentRefundRequested {
        envelope,
        amount_minor: order.total_minor,
        currency: order.currency.clone(),
        idempotency_key: format!("refund-{order_id}"),
        charge_idempotency_key: order_id.to_owned(),
    })
}
