//! Payment: the payment worker's answers confirm the order, or cancel it with its stock
//! released; a refund (a confirmed order the customer cancelled) cancels it after the refund.

use orderflow_schemas::{EventKind, OrderConfirmed, OrderEvent};

use super::{
    cause_of,
    emitter::Emitter,
    role,
    state::{SagaState, Stage},
    Saga,
};
use crate::runtime::{Outputs, StepError};

impl Saga {
    pub(super) fn on_payment_answer(
        &self,
        state: &mut SagaState,
        event: &OrderEvent,
        out: &mut Outputs,
    ) -> Result<(), StepError> {
        let envelope = event.envelope();
        let Some(order) = state.orders.get(&envelope.order_id) else {
            return Ok(());
        };
        if let (Some(timed_out), OrderEvent::PaymentAuthorized(_)) =
            (&order.timed_out_payment, event)
        {
            if envelope.causation_id.as_deref() == Some(timed_out.as_str()) {
                // Authorized after the payment deadline cancelled the order: give it back.
                let cause = cause_of(envelope)?;
                let Some(order) = state.orders.get_mut(&envelope.order_id) else {
                    return Ok(());
                };
                order.timed_out_payment = None;
                Emitter::for_input(out, self.topics, envelope, cause)
                    .refund_late_authorization(order);
                return Ok(());
            }
        }
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
                    order.since = em.occurred_at;
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
}
