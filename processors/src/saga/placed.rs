//! The first stages of an order: validation (schema and business rules) and fraud scoring,
//! both keyed by customer, so they run in one step rather than one topic hop each.

use std::collections::BTreeMap;

use orderflow_schemas::{
    EventKind, FraudDecision, FraudScored, OrderEvent, OrderPlaced, OrderValidated, Reason,
};

use super::{
    cause_of,
    emitter::Emitter,
    fraud, role,
    rules::ActiveRules,
    state::{OrderState, SagaState, Stage},
    Saga,
};
use crate::runtime::{Outputs, StepError};

impl Saga {
    pub(super) fn on_placed(
        &self,
        state: &mut SagaState,
        placed: &OrderPlaced,
        rules: &ActiveRules,
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
            timed_out_payment: None,
        };
        let mut em = Emitter::for_input(out, self.topics, envelope, cause);
        let problems = rules.validation.check(placed);
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

        let model = rules.fraud();
        let customer = state
            .customers
            .get(&envelope.customer_id)
            .cloned()
            .unwrap_or_default();
        let assessment = fraud::assess(model, placed, &customer);
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
}
