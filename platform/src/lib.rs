//! What every orderflow role shares, and nothing else: configuration ([`config`]), telemetry
//! setup ([`telemetry`]), Kafka client setup ([`kafka`]) and the HTTP conventions every server
//! follows ([`http`]: problem+json errors, health, graceful serving). Role logic lives in the role crates;
//! if something here is used by one role only, it belongs in that role.

pub mod config;
pub mod gaps;
pub mod group_commits;
pub mod health;
pub mod http;
pub mod kafka;
pub mod metrics;
pub mod openapi;
pub mod restart;
pub mod shape;
pub mod switches;
pub mod telemetry;
pub mod tls;
pub mod transactions;

pub use config::{ConfigError, Settings};
