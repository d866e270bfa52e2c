//! Requests and answers of the gateway's HTTP API.
//!
//! - `POST /v1/charges` with a [`ChargeRequest`] → [`Answer`] (`authorized` or `declined`).
//! - `POST /v1/charges/{key}/void` → the key's [`Answer`]; a key with no answer yet gets
//!   `declined` ("voided") for good.
//! - `POST /v1/refunds` with a [`RefundRequest`] → `refunded` (or `422` when the charge was not
//!   authorized).
//! - `GET /v1/charges` → [`Report`]: every key, its answer and how often it was asked.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChargeRequest {
    pub idempotency_key: String,
    pub amount_minor: i64,
    pub currency: String,
    pub payment_token: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefundRequest {
    pub idempotency_key: String,
    pub charge_idempotency_key: String,
    pub amount_minor: i64,
}

/// The gateway's answer to a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Answer {
    Authorized { authorization_id: String },
    Declined { reason: String },
    Refunded { refund_id: String },
}

/// What the gateway knows about one charge key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChargeRecord {
    pub idempotency_key: String,
    pub amount_minor: i64,
    /// `authorized`, `declined`, `voided` or `refunded`.
    pub status: String,
    /// Charge calls received for this key (retries and repeats included).
    pub attempts: u32,
    /// Authorizations the gateway issued for this key: 0 or 1 unless idempotency broke (the
    /// simulator counts every one it issues).
    pub charges: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub charges: Vec<ChargeRecord>,
}

/// Fault settings of the simulator, changeable while it runs (`PUT /v1/faults`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Faults {
    pub latency_ms: u64,
    pub decline_rate: f64,
    pub failure_rate: f64,
    pub slow_rate: f64,
    pub slow_ms: u64,
}
