//! Customer cancellation: before payment it releases and cancels; while a payment is in flight
//! it waits for the answer; after confirmation it refunds, then releases and cancels.

use orderflow_schemas::Envelope;

use super::{
    cause_of,
    emitter::Emitter,
    state::{SagaState, Stage},
    Saga,
};
use crate::runtime::{Outputs, StepError};

impl Saga {
    pub(super) fn on_cancel_request(
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
}
