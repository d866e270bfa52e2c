//! The ingest edge: `POST /v1/orders` turns a producer's JSON order into an `OrderPlaced` event
//! on `orders.events` and answers `202` only once the broker acknowledged it.
//!
//! - [`request`] parses and checks a request body (shape, required fields, no card data) and
//!   builds the event. Business rules (accepted currencies, totals, limits) are the saga's
//!   validation step: an accepted order can still be rejected, with reasons, at its status URL.
//! - [`publish`] owns the idempotent producer (`acks=all`) and the bounded wait for the ack.
//! - [`routes`] is the HTTP surface and its problem+json errors.
//! - [`commands`] turns cancellations, review decisions and restocks into events.
//! - [`idempotency`] stores answers by `Idempotency-Key`, so a retried request writes nothing
//!   twice.
//! - [`keys`] is API key management over HTTP (the admin listener).
//! - [`replays`] starts and reports projection replays over HTTP (the admin listener).
//! - [`deadletters`] lists, shows, redrives and discards dead letters over HTTP (the admin
//!   listener).

pub mod commands;
pub mod deadletters;
pub mod idempotency;
pub mod keys;
pub mod metrics;
pub mod publish;
pub mod replays;
pub mod request;
pub mod routes;

pub use commands::{OrderDirectory, OrderLocation, SharedDirectory};
pub use metrics::IngestMetrics;
pub use orderflow_auth::limits::RateLimits;
pub use publish::{PublishError, Publisher};
pub use routes::{admin_router, router, IngestState};
