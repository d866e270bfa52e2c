//! A simulated payment gateway: `orderflow gateway` runs it alone, `orderflow dev` in-process.
//!
//! Every call waits `latency_ms`. With probability `failure_rate` a call answers `500` and
//! records nothing; with probability `slow_rate` it records its answer but sends it only after
//! `slow_ms` (the caller times out and retries, and gets the recorded answer). Whether a charge
//! is declined is decided per idempotency key (a hash below `decline_rate`), so even the first
//! answer is repeatable. Faults can be changed while it runs (`PUT /v1/faults`), which is how
//! tests break and heal it.
//!
//! Payment tokens decide outright, as payment providers' test tokens do: `tok_visa…` is always
//! authorized and `tok_decline…` always declined, whatever `decline_rate` says (the random rate
//! is for load tests; a walkthrough with `tok_visa` ends the same way every time). Tokens also
//! pick refusals, for the worker's classification of answers:
//! `tok_invalid…` charges answer `422` (a request that can never succeed); `tok_busy…` keys
//! answer `409` to every charge and void (a call for the key forever "in progress": the order can
//! only end by the saga's payment deadline); `tok_throttle…` keys answer `429` with `Retry-After`
//! to their first two charges, then as usual.
//!
//! Every authorization it issues is recorded (`GET /v1/charges` reports how many each key got),
//! so a test can tell a key charged twice, whatever the ledger's own bookkeeping says.

use std::{
    collections::BTreeMap,
    hash::{Hash, Hasher},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    extract::{Path, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{post, put},
    Json, Router,
};
use orderflow_platform::{
    config::GatewaySettings,
    http::{BindError, Problem, Server},
};
use rand::Rng;
use tokio_util::sync::CancellationToken;

use crate::protocol::{Answer, ChargeRecord, ChargeRequest, Faults, RefundRequest, Report};

#[derive(Debug, Default)]
struct Ledger {
    charges: BTreeMap<String, Charge>,
    refunds: BTreeMap<String, Answer>,
}

#[derive(Debug)]
struct Charge {
    amount_minor: i64,
    answer: Option<Answer>,
    voided: bool,
    refunded: bool,
    attempts: u32,
    /// Authorizations issued for the key (one, unless idempotency broke).
    authorizations: u32,
    /// `tok_busy…`: every call for the key answers `409`.
    busy: bool,
}

impl Charge {
    /// A key not answered yet.
    fn new(amount_minor: i64) -> Self {
        Self {
            amount_minor,
            answer: None,
            voided: false,
            refunded: false,
            attempts: 0,
            authorizations: 0,
            busy: false,
        }
    }
}

/// A `4xx` the simulator answers for a refusing payment token.
fn refusal(status: StatusCode, kind: &str, title: &str) -> Response {
    let mut response = Problem::new(status, kind, title).into_response();
    if status == StatusCode::TOO_MANY_REQUESTS {
        response.headers_mut().insert(
            axum::http::header::RETRY_AFTER,
            axum::http::HeaderValue::from_static("1"),
        );
    }
    response
}

#[derive(Clone)]
struct Sim {
    ledger: Arc<Mutex<Ledger>>,
    faults: Arc<Mutex<Faults>>,
}

impl Sim {
    fn faults(&self) -> Faults {
        match self.faults.lock() {
            Ok(f) => f.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        match self.ledger.lock() {
            Ok(l) => l,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Latency, then maybe a failure. `Err` is the failure's response.
    async fn before(&self) -> Result<Faults, Response> {
        let faults = self.faults();
        if faults.latency_ms > 0 {
            tokio::time::sleep(Duration::from_millis(faults.latency_ms)).await;
        }
        if faults.failure_rate > 0.0 && rand::rng().random_bool(faults.failure_rate.min(1.0)) {
            return Err(Problem::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "simulated-failure",
                "Simulated gateway failure",
            )
            .into_response());
        }
        Ok(faults)
    }

    async fn after(&self, faults: &Faults) {
        if faults.slow_rate > 0.0 && rand::rng().random_bool(faults.slow_rate.min(1.0)) {
            tokio::time::sleep(Duration::from_millis(faults.slow_ms)).await;
        }
    }
}

fn faults_of(settings: &GatewaySettings) -> Faults {
    Faults {
        latency_ms: settings.latency_ms,
        decline_rate: settings.decline_rate,
        failure_rate: settings.failure_rate,
        slow_rate: settings.slow_rate,
        slow_ms: settings.slow_ms,
    }
}

/// A value in [0, 1) fixed by the key.
fn key_fraction(key: &str) -> f64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut hasher);
    (hasher.finish() % 1_000_000) as f64 / 1_000_000.0
}

/// The gateway's routes.
pub fn router(settings: &GatewaySettings) -> Router {
    let sim = Sim {
        ledger: Arc::default(),
        faults: Arc::new(Mutex::new(faults_of(settings))),
    };
    Router::new()
        .route("/v1/charges", post(charge).get(report))
        .route("/v1/charges/{key}/void", post(void))
        .route("/v1/refunds", post(refund))
        .route("/v1/faults", put(set_faults).get(get_faults))
        .with_state(sim)
}

async fn charge(State(sim): State<Sim>, Json(request): Json<ChargeRequest>) -> Response {
    let faults = match sim.before().await {
        Ok(f) => f,
        Err(response) => {
            // A failed call records no answer, but it was a call for the key.
            let mut ledger = sim.ledger();
            ledger
                .charges
                .entry(request.idempotency_key.clone())
                .or_insert_with(|| Charge::new(request.amount_minor))
                .attempts += 1;
            return response;
        }
    };
    if request.payment_token.starts_with("tok_invalid") {
        return refusal(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-payment-token",
            "The payment token is not valid",
        );
    }
    let answer = {
        let mut ledger = sim.ledger();
        let charge = ledger
            .charges
            .entry(request.idempotency_key.clone())
            .or_insert_with(|| Charge::new(request.amount_minor));
        charge.attempts += 1;
        if request.payment_token.starts_with("tok_busy") {
            charge.busy = true;
        }
        if charge.busy {
            return refusal(
                StatusCode::CONFLICT,
                "in-progress",
                "A call for this key is in progress",
            );
        }
        if request.payment_token.starts_with("tok_throttle") && charge.attempts <= 2 {
            return refusal(
                StatusCode::TOO_MANY_REQUESTS,
                "throttled",
                "Too many requests",
            );
        }
        match &charge.answer {
            Some(answer) => answer.clone(),
            None => {
                let token = request.payment_token.as_str();
                let declined = token.starts_with("tok_decline")
                    || (!token.starts_with("tok_visa")
                        && key_fraction(&request.idempotency_key) < faults.decline_rate);
                let answer = if declined {
                    Answer::Declined {
                        reason: "insufficient funds".to_owned(),
                    }
                } else {
                    charge.authorizations += 1;
                    Answer::Authorized {
                        authorization_id: format!("auth_{}", uuid::Uuid::new_v4().simple()),
                    }
                };
                charge.answer = Some(answer.clone());
                answer
            }
        }
    };
    sim.after(&faults).await;
    Json(answer).into_response()
}

async fn void(State(sim): State<Sim>, Path(key): Path<String>) -> Response {
    let faults = match sim.before().await {
        Ok(f) => f,
        Err(response) => return response,
    };
    let answer = {
        let mut ledger = sim.ledger();
        let charge = ledger.charges.entry(key).or_insert_with(|| Charge::new(0));
        if charge.busy {
            return refusal(
                StatusCode::CONFLICT,
                "in-progress",
                "A call for this key is in progress",
            );
        }
        match &charge.answer {
            Some(answer) => answer.clone(),
            None => {
                let answer = Answer::Declined {
                    reason: "voided: no answer in time".to_owned(),
                };
                charge.voided = true;
                charge.answer = Some(answer.clone());
                answer
            }
        }
    };
    sim.after(&faults).await;
    Json(answer).into_response()
}

async fn refund(State(sim): State<Sim>, Json(request): Json<RefundRequest>) -> Response {
    let faults = match sim.before().await {
        Ok(f) => f,
        Err(response) => return response,
    };
    let answer = {
        let mut guard = sim.ledger();
        let ledger = &mut *guard;
        if let Some(answer) = ledger.refunds.get(&request.idempotency_key) {
            answer.clone()
        } else {
            match ledger.charges.get_mut(&request.charge_idempotency_key) {
                Some(charge) if matches!(charge.answer, Some(Answer::Authorized { .. })) => {
                    charge.refunded = true;
                    let answer = Answer::Refunded {
                        refund_id: format!("ref_{}", uuid::Uuid::new_v4().simple()),
                    };
                    ledger
                        .refunds
                        .insert(request.idempotency_key.clone(), answer.clone());
                    answer
                }
                _ => {
                    return Problem::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "not-authorized",
                        "Nothing to refund",
                    )
                    .detail(format!(
                        "charge {} was not authorized",
                        request.charge_idempotency_key
                    ))
                    .into_response()
                }
            }
        }
    };
    sim.after(&faults).await;
    Json(answer).into_response()
}

async fn report(State(sim): State<Sim>) -> Json<Report> {
    let ledger = sim.ledger();
    Json(Report {
        charges: ledger
            .charges
            .iter()
            .map(|(key, c)| ChargeRecord {
                idempotency_key: key.clone(),
                amount_minor: c.amount_minor,
                status: match (&c.answer, c.voided, c.refunded) {
                    (_, true, _) => "voided",
                    (_, _, true) => "refunded",
                    (Some(Answer::Authorized { .. }), _, _) => "authorized",
                    (Some(_), _, _) => "declined",
                    (None, _, _) => "unanswered",
                }
                .to_owned(),
                attempts: c.attempts,
                charges: c.authorizations,
            })
            .collect(),
    })
}

async fn set_faults(State(sim): State<Sim>, Json(faults): Json<Faults>) -> Response {
    for rate in [faults.decline_rate, faults.failure_rate, faults.slow_rate] {
        if !(0.0..=1.0).contains(&rate) {
            return Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid-rate",
                "Invalid rate",
            )
            .detail("rates are in 0..=1")
            .into_response();
        }
    }
    match sim.faults.lock() {
        Ok(mut f) => *f = faults.clone(),
        Err(poisoned) => *poisoned.into_inner() = faults.clone(),
    }
    Json(faults).into_response()
}

async fn get_faults(State(sim): State<Sim>) -> Json<Faults> {
    Json(sim.faults())
}

/// A simulated gateway listening on `settings.listen` (port 0: any free port).
pub struct Simulator {
    server: Server,
}

impl Simulator {
    /// Binds `settings.listen`, with HTTPS when `settings.tls` names a certificate.
    pub async fn bind(settings: &GatewaySettings) -> Result<Self, BindError> {
        Ok(Self {
            server: Server::bind_tls(settings.listen, router(settings), &settings.tls).await?,
        })
    }

    /// The base URL clients use: `https://` when the listener speaks TLS.
    pub fn base_url(&self) -> std::io::Result<String> {
        let scheme = if self.server.is_tls() {
            "https"
        } else {
            "http"
        };
        Ok(format!("{scheme}://{}", self.local_addr()?))
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.server.local_addr()
    }

    pub async fn run(self, cancel: CancellationToken) -> std::io::Result<()> {
        self.server.run(cancel).await
    }
}
