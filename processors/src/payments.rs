//! The payment worker: carries out `payments.requests` (keyed by order) at the gateway and
//! answers on the orders topic.
//!
//! Exactly once without state of its own: the charge's idempotency key is the order id and the
//! refund's is derived from it, and the gateway answers a key with its first answer forever. So a
//! request processed again — after a crash, a rebalance, a zombie — gets the same answer, and the
//! worker emits the same event, byte for byte (id derived from the request, sequence the
//! request's + 1, time the request's).
//!
//! Calls: for every batch, [`Step::prepare`] calls the gateway for all requests at once, bounded
//! by `payment.concurrency`; one order's requests run one after another, never overlapping. Each
//! call has a timeout and is retried with exponential backoff and full jitter, through a circuit
//! breaker (failsafe) that stops calling a failing gateway for `breaker_open_ms`. When a charge
//! has no definitive answer and its request is older than `payment_timeout_ms` (event time
//! against the wall clock), the worker voids the key — which fixes its answer as declined unless
//! the gateway had already answered — and reports that answer. An order never gets an answer
//! the gateway did not give.
//!
//! Answers are classified per request, and one order's trouble never holds up the others:
//!
//! - an answer (authorized, declined, refunded) is emitted;
//! - a refusal (a `4xx` other than `408`/`409`/`425`/`429`: the request can never succeed) of a
//!   charge is a decline with the gateway's reason, so the order is cancelled and its stock
//!   released; of a refund, a dead letter with the reason (the saga's refund deadline then ends
//!   the order, for an operator to refund by hand);
//! - "not now" for one key (`408`, `409`, `425`, `429`, an unreadable answer) after the call's
//!   own retries leaves that request unanswered *for now*: nothing is emitted for it and the
//!   batch commits. The saga sends an unanswered request again every `saga.payment_resend_ms`,
//!   byte for byte, which retries that key alone;
//! - the gateway itself failing (timeouts, `5xx`, unreachable, the breaker open) fails the batch,
//!   which is retried with backoff — every order is held up alike then, and retrying soon is
//!   what brings them through a blip — but only while the request is younger than
//!   `payment_timeout_ms`. Past that a charge is voided (its answer fixed), and a request whose
//!   gateway call still fails is left unanswered like a "not now", so one key the gateway keeps
//!   failing holds the partition up for `payment_timeout_ms` at most; past
//!   `saga.payment_deadline_ms` the saga ends the order itself.

use std::{collections::HashMap, sync::Arc, time::Duration};

use backon::{ExponentialBuilder, Retryable};
use failsafe::{
    backoff::{self, Constant},
    failure_policy::{self, ConsecutiveFailures},
    Config, Instrument, StateMachine,
};
use orderflow_gateway::{Answer, ChargeRequest, GatewayClient, GatewayError, RefundRequest};
use orderflow_platform::config::PaymentSettings;
use orderflow_schemas::{
    ids::derived_event_id, Envelope, EventKind, OrderEvent, PaymentAuthorized, PaymentDeclined,
    PaymentRefunded,
};
use prometheus_client::metrics::gauge::Gauge;
use tokio::{sync::Semaphore, task::JoinSet};
use tracing::{debug, warn};
use uuid::Uuid;

use crate::{
    metrics::{GatewayCallLabels, GatewayMetrics},
    runtime::{Outputs, Step, StepError},
    state::NoState,
};

/// Roles of the answers, fed into their derived ids. Never rename.
const ROLE_AUTHORIZED: &str = "payments/authorized";
const ROLE_DECLINED: &str = "payments/declined";
const ROLE_REFUNDED: &str = "payments/refunded";

/// Keeps the breaker's state visible as a gauge.
#[derive(Debug, Clone)]
pub struct BreakerGauge(Gauge);

impl Instrument for BreakerGauge {
    fn on_call_rejected(&self) {}
    fn on_open(&self) {
        warn!("Payment gateway circuit breaker opened.");
        self.0.set(1);
    }
    fn on_half_open(&self) {}
    fn on_closed(&self) {
        self.0.set(0);
    }
}

type Breaker = StateMachine<ConsecutiveFailures<Constant>, BreakerGauge>;

/// The gateway with the worker's resilience around it.
#[derive(Clone)]
struct Caller {
    client: GatewayClient,
    settings: PaymentSettings,
    breaker: Breaker,
    metrics: GatewayMetrics,
}

/// What went wrong with one request, after retries.
#[derive(Debug)]
enum CallFailure {
    /// The gateway itself is failing (timeouts, `5xx`, unreachable, the breaker open): every
    /// order is affected alike.
    Gateway(String),
    /// Not now for this key (`408`, `409`, `425`, `429`, an unreadable answer).
    NotNow(String),
    /// The gateway refused the request: retrying cannot help.
    Refused(String),
}

/// What became of one request in this batch.
#[derive(Debug, Clone)]
enum Outcome {
    Answered(Answer),
    /// A refund the gateway refused: a dead letter.
    Refused(String),
    /// No answer for now (module docs): nothing is emitted.
    Deferred(String),
}

impl Caller {
    /// One operation, retried with backoff through the breaker.
    async fn call<F, Fut>(
        &self,
        operation: &'static str,
        attempt: F,
    ) -> Result<Answer, GatewayError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<Answer, GatewayError>>,
    {
        let s = &self.settings;
        let policy = ExponentialBuilder::new()
            .with_min_delay(Duration::from_millis(s.backoff_initial_ms))
            .with_max_delay(Duration::from_millis(s.backoff_max_ms))
            .with_max_times(s.max_attempts.saturating_sub(1) as usize)
            .with_jitter();
        (|| async {
            if !self.breaker.is_call_permitted() {
                self.count(operation, "rejected", None);
                return Err(GatewayError::Unreachable("circuit breaker open".to_owned()));
            }
            let started = std::time::Instant::now();
            let result = attempt().await;
            let outcome = match &result {
                Ok(Answer::Authorized { .. }) => "authorized",
                Ok(Answer::Declined { .. }) => "declined",
                Ok(Answer::Refunded { .. }) => "refunded",
                Err(e) if e.is_transient() => "error",
                Err(_) => "refused",
            };
            self.count(operation, outcome, Some(started.elapsed()));
            // Only the gateway failing opens the breaker: one key's 409 or 429 must not stop
            // every other order's calls.
            match &result {
                Err(e) if e.is_gateway_failure() => self.breaker.on_error(),
                _ => self.breaker.on_success(),
            }
            result
        })
        .retry(policy)
        .when(GatewayError::is_transient)
        .notify(|e, after| {
            self.metrics.retries.inc();
            debug!(operation, error = %e, retry_in = ?after, "Gateway call failed; retrying.");
        })
        .await
    }

    fn count(&self, operation: &str, outcome: &str, took: Option<Duration>) {
        let labels = GatewayCallLabels {
            operation: operation.to_owned(),
            outcome: outcome.to_owned(),
        };
        self.metrics.calls.get_or_create(&labels).inc();
        if let Some(took) = took {
            self.metrics
                .call_seconds
                .get_or_create(&labels)
                .observe(took.as_secs_f64());
        }
    }

    async fn carry_out(&self, request: &OrderEvent, now_ms: i64) -> Result<Answer, CallFailure> {
        let timeout = Duration::from_millis(self.settings.attempt_timeout_ms);
        let failed = |e: GatewayError| match e {
            GatewayError::Refused { .. } if !e.is_transient() => {
                CallFailure::Refused(e.to_string())
            }
            GatewayError::BadAnswer(_) => {
                tracing::error!(error = %e, "The payment gateway's answer does not parse; the request stays unanswered.");
                CallFailure::NotNow(e.to_string())
            }
            e if e.is_gateway_failure() => CallFailure::Gateway(e.to_string()),
            e => CallFailure::NotNow(e.to_string()),
        };
        match request {
            OrderEvent::PaymentRequested(p) => {
                let charge = ChargeRequest {
                    idempotency_key: p.idempotency_key.clone(),
                    amount_minor: p.amount_minor,
                    currency: p.currency.clone(),
                    payment_token: p.payment_token.clone(),
                };
                match self
                    .call("charge", || self.client.charge(&charge, timeout))
                    .await
                {
                    Ok(answer) => Ok(answer),
                    Err(e)
                        if e.is_transient()
                            && now_ms
                                > p.envelope.occurred_at + self.settings.payment_timeout_ms =>
                    {
                        warn!(order_id = %p.envelope.order_id, error = %e, "No answer to the charge in time; voiding it.");
                        let key = p.idempotency_key.clone();
                        self.call("void", || self.client.void(&key, timeout))
                            .await
                            .map_err(failed)
                    }
                    Err(e) => match failed(e) {
                        // A charge the gateway refuses for good is declined, with its reason.
                        CallFailure::Refused(reason) => Ok(Answer::Declined {
                            reason: format!("refused by the payment gateway: {reason}"),
                        }),
                        other => Err(other),
                    },
                }
            }
            OrderEvent::PaymentRefundRequested(r) => {
                let refund = RefundRequest {
                    idempotency_key: r.idempotency_key.clone(),
                    charge_idempotency_key: r.charge_idempotency_key.clone(),
                    amount_minor: r.amount_minor,
                };
                self.call("refund", || self.client.refund(&refund, timeout))
                    .await
                    .map_err(failed)
            }
            other => Err(CallFailure::Refused(format!(
                "{} is not a payment request",
                other.kind().name()
            ))),
        }
    }
}

pub struct PaymentWorker {
    caller: Caller,
    /// Where answers go (the orders topic, keyed by customer).
    replies: &'static str,
    /// This batch's outcomes, by request event id.
    answers: HashMap<String, Outcome>,
    clock: fn() -> i64,
}

impl PaymentWorker {
    pub fn new(
        client: GatewayClient,
        settings: &PaymentSettings,
        metrics: GatewayMetrics,
        replies: &'static str,
    ) -> Self {
        let policy = failure_policy::consecutive_failures(
            settings.breaker_failures.max(1),
            backoff::constant(Duration::from_millis(settings.breaker_open_ms)),
        );
        let breaker = Config::new()
            .failure_policy(policy)
            .instrument(BreakerGauge(metrics.circuit_open.clone()))
            .build();
        Self {
            caller: Caller {
                client,
                settings: settings.clone(),
                breaker,
                metrics,
            },
            replies,
            answers: HashMap::new(),
            clock: wall_clock_ms,
        }
    }
}

fn wall_clock_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

fn answer_envelope(request: &Envelope, role: &str, kind: EventKind) -> Result<Envelope, StepError> {
    let cause = Uuid::parse_str(&request.event_id)
        .map_err(|_| StepError::Poison(format!("malformed event_id {:?}", request.event_id)))?;
    Ok(Envelope {
        event_id: derived_event_id(cause, role).to_string(),
        order_id: request.order_id.clone(),
        customer_id: request.customer_id.clone(),
        occurred_at: request.occurred_at,
        causation_id: Some(request.event_id.clone()),
        sequence: request.sequence + 1,
        schema_version: kind.schema_version(),
    })
}

impl Step for PaymentWorker {
    type State = NoState;

    async fn prepare(&mut self, inputs: &[OrderEvent]) -> Result<(), StepError> {
        self.answers.clear();
        // One order's requests, in order; orders side by side.
        let mut by_order: Vec<(String, Vec<OrderEvent>)> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        for event in inputs {
            if !matches!(
                event,
                OrderEvent::PaymentRequested(_) | OrderEvent::PaymentRefundRequested(_)
            ) {
                continue;
            }
            let order_id = event.envelope().order_id.clone();
            let at = *index.entry(order_id.clone()).or_insert_with(|| {
                by_order.push((order_id, Vec::new()));
                by_order.len() - 1
            });
            by_order[at].1.push(event.clone());
        }
        let permits = Arc::new(Semaphore::new(self.caller.settings.concurrency.max(1)));
        let now_ms = (self.clock)();
        let mut calls = JoinSet::new();
        for (_, requests) in by_order {
            let caller = self.caller.clone();
            let permits = permits.clone();
            calls.spawn(async move {
                let _permit = permits.acquire_owned().await;
                let mut answers = Vec::new();
                for request in requests {
                    let answer = caller.carry_out(&request, now_ms).await;
                    let stop = answer.is_err();
                    let envelope = request.envelope();
                    answers.push((envelope.event_id.clone(), envelope.occurred_at, answer));
                    if stop {
                        break; // later requests of this order wait for this one
                    }
                }
                answers
            });
        }
        let mut retry_batch = None;
        while let Some(joined) = calls.join_next().await {
            let answers =
                joined.map_err(|e| StepError::Retry(format!("gateway call task: {e}")))?;
            for (id, occurred_at, answer) in answers {
                let outcome = match answer {
                    Ok(answer) => Outcome::Answered(answer),
                    Err(CallFailure::Refused(reason)) => Outcome::Refused(reason),
                    Err(CallFailure::NotNow(reason)) => Outcome::Deferred(reason),
                    Err(CallFailure::Gateway(reason))
                        if now_ms - occurred_at < self.caller.settings.payment_timeout_ms =>
                    {
                        retry_batch = Some(reason.clone());
                        Outcome::Deferred(reason)
                    }
                    Err(CallFailure::Gateway(reason)) => {
                        warn!(%reason, "The payment gateway keeps failing a request older than payment.payment_timeout_ms; it stays unanswered for now and the saga sends it again.");
                        Outcome::Deferred(reason)
                    }
                };
                self.answers.insert(id, outcome);
            }
        }
        match retry_batch {
            Some(reason) => Err(StepError::Retry(format!(
                "payment gateway: {reason}; the batch is retried"
            ))),
            None => Ok(()),
        }
    }

    fn handle(
        &mut self,
        _state: &mut NoState,
        event: &OrderEvent,
        out: &mut Outputs,
    ) -> Result<(), StepError> {
        let envelope = event.envelope();
        if !matches!(
            event,
            OrderEvent::PaymentRequested(_) | OrderEvent::PaymentRefundRequested(_)
        ) {
            return Err(StepError::Poison(format!(
                "{} is not a payment request",
                event.kind().name()
            )));
        }
        let answer = match self.answers.get(&envelope.event_id) {
            Some(Outcome::Answered(answer)) => answer.clone(),
            Some(Outcome::Refused(reason)) => {
                return Err(StepError::Poison(format!("the gateway refused: {reason}")))
            }
            // An earlier request of the same order failed in this batch (this one waits), or
            // this one had no answer: the saga sends it again.
            deferred => {
                let reason = match deferred {
                    Some(Outcome::Deferred(reason)) => reason.as_str(),
                    _ => "an earlier request of the order is unanswered",
                };
                warn!(order_id = %envelope.order_id, kind = event.kind().name(), %reason, "No payment answer for now; the saga sends the request again.");
                self.caller.metrics.deferred.inc();
                return Ok(());
            }
        };
        let reply = match (event, answer) {
            (OrderEvent::PaymentRequested(p), Answer::Authorized { authorization_id }) => {
                OrderEvent::PaymentAuthorized(PaymentAuthorized {
                    envelope: answer_envelope(
                        envelope,
                        ROLE_AUTHORIZED,
                        EventKind::PaymentAuthorized,
                    )?,
                    amount_minor: p.amount_minor,
                    currency: p.currency.clone(),
                    authorization_id,
                })
            }
            (OrderEvent::PaymentRequested(p), Answer::Declined { reason }) => {
                OrderEvent::PaymentDeclined(PaymentDeclined {
                    envelope: answer_envelope(envelope, ROLE_DECLINED, EventKind::PaymentDeclined)?,
                    amount_minor: p.amount_minor,
                    currency: p.currency.clone(),
                    reason,
                })
            }
            (OrderEvent::PaymentRefundRequested(r), Answer::Refunded { refund_id }) => {
                OrderEvent::PaymentRefunded(PaymentRefunded {
                    envelope: answer_envelope(envelope, ROLE_REFUNDED, EventKind::PaymentRefunded)?,
                    amount_minor: r.amount_minor,
                    currency: r.currency.clone(),
                    refund_id,
                })
            }
            (event, answer) => {
                return Err(StepError::Poison(format!(
                    "the gateway answered {answer:?} to {}",
                    event.kind().name()
                )))
            }
        };
        out.push(self.replies, envelope.customer_id.clone(), reply);
        Ok(())
    }
}
