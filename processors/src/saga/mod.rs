//! The order saga. Today: validate, then confirm or reject. Fraud scoring, inventory and payment
//! steps slot in between validation and confirmation as they land (DESIGN.md "Saga").
//!
//! Every output is a function of the input event alone: ids derived from the input's id and the
//! output's role, sequence numbers following the input's, time taken from the input's
//! `occurred_at`. Re-processing an `OrderPlaced` re-emits byte-identical events, which every
//! consumer drops by `event_id` or `sequence`.

pub mod validation;

use orderflow_schemas::{
    ids::derived_event_id, Envelope, EventKind, OrderConfirmed, OrderEvent, OrderPlaced,
    OrderRejected, OrderValidated,
};
use uuid::Uuid;

use crate::runtime::{Outputs, Step, StepError};

/// Roles of the outputs, fed into their derived ids. Never rename: ids depend on them.
const ROLE_VALIDATED: &str = "saga/validated";
const ROLE_REJECTED: &str = "saga/rejected";
const ROLE_CONFIRMED: &str = "saga/confirmed";

pub struct Saga {
    rules: validation::Rules,
    /// Where the saga's events go (the orders topic, keyed by customer).
    output_topic: &'static str,
}

impl Saga {
    pub fn new(rules: validation::Rules, output_topic: &'static str) -> Self {
        Self {
            rules,
            output_topic,
        }
    }

    fn on_placed(&self, placed: &OrderPlaced, out: &mut Outputs) -> Result<(), StepError> {
        let cause = Uuid::parse_str(&placed.envelope.event_id).map_err(|_| {
            StepError::Poison(format!(
                "OrderPlaced has a malformed event_id {:?}",
                placed.envelope.event_id
            ))
        })?;
        let key = placed.envelope.customer_id.clone();
        let problems = self.rules.check(placed);
        if !problems.is_empty() {
            let rejected = OrderRejected {
                envelope: next_envelope(
                    &placed.envelope,
                    cause,
                    ROLE_REJECTED,
                    EventKind::OrderRejected,
                    1,
                ),
                stage: "validation".to_owned(),
                reasons: problems,
            };
            out.push(self.output_topic, key, OrderEvent::OrderRejected(rejected));
            return Ok(());
        }
        let validated = OrderValidated {
            envelope: next_envelope(
                &placed.envelope,
                cause,
                ROLE_VALIDATED,
                EventKind::OrderValidated,
                1,
            ),
            currency: placed.currency.clone(),
            total_minor: placed.total_minor,
        };
        let mut confirmed_envelope = next_envelope(
            &placed.envelope,
            cause,
            ROLE_CONFIRMED,
            EventKind::OrderConfirmed,
            2,
        );
        confirmed_envelope.causation_id = Some(validated.envelope.event_id.clone());
        let confirmed = OrderConfirmed {
            envelope: confirmed_envelope,
            total_minor: placed.total_minor,
            currency: placed.currency.clone(),
        };
        out.push(
            self.output_topic,
            key.clone(),
            OrderEvent::OrderValidated(validated),
        );
        out.push(
            self.output_topic,
            key,
            OrderEvent::OrderConfirmed(confirmed),
        );
        Ok(())
    }
}

/// The envelope of an event `steps` after `input` in the order's sequence, caused by it.
fn next_envelope(
    input: &Envelope,
    cause: Uuid,
    role: &str,
    kind: EventKind,
    steps: i64,
) -> Envelope {
    Envelope {
        event_id: derived_event_id(cause, role).to_string(),
        order_id: input.order_id.clone(),
        customer_id: input.customer_id.clone(),
        occurred_at: input.occurred_at,
        causation_id: Some(input.event_id.clone()),
        sequence: input.sequence + steps,
        schema_version: kind.schema_version(),
    }
}

impl Step for Saga {
    fn handle(&mut self, event: &OrderEvent, out: &mut Outputs) -> Result<(), StepError> {
        match event {
            OrderEvent::OrderPlaced(placed) => self.on_placed(placed, out),
            // The saga's own outputs come back on the same topic; nothing to do for them yet.
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests;
