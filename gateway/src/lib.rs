//! The payment gateway as orderflow sees it: the HTTP protocol ([`protocol`]), a client for it
//! ([`client`]) and a simulated gateway ([`simulator`]) with configurable latency, declines and
//! failures, for `dev`, tests and benchmarks.
//!
//! The protocol's one promise, which the payment worker's exactly-once rests on: an idempotency
//! key gets one answer, forever. A repeated charge returns the first answer; a void fixes the
//! answer of a key that has none yet (as declined) and returns whatever the key's answer is.

pub mod client;
pub mod protocol;
pub mod simulator;

pub use client::{GatewayClient, GatewayError};
pub use protocol::{Answer, ChargeRequest, RefundRequest};
