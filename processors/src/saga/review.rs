//! Fraud review: an order held for an admin's decision is reserved on approval and rejected
//! on rejection.

use orderflow_schemas::{FraudReviewDecided, Reason, ReviewDecision};

use super::{
    cause_of,
    emitter::Emitter,
    state::{SagaState, Stage},
    Saga,
};
use crate::runtime::{Outputs, StepError};

impl Saga {
    pub(super) fn on_review(
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
}
