//! Projections and queries: the writers that fold the event log into tables ([`orders`]), the
//! database they write ([`db`]: PostgreSQL, or SQLite when embedded, with migrations), and the
//! query API that serves those tables over HTTP ([`query`]) through a cache kept fresh by the
//! writers' change announcements ([`cache`]).
//!
//! Each projection is a consumer group writing one set of tables; its consumed offsets are
//! stored in the same database transaction as its rows (`projection_offsets`), so the tables
//! are exactly what the log says whatever crashes in between.

pub mod cache;
pub mod inventory;
pub mod log_start;
pub mod metrics;
pub mod orders;
pub mod query;
pub mod reconcile;
pub mod replay;
pub mod writer;

pub use writer::{Projection, ProjectionWriter};

pub use orderflow_db::{Backend, Database, DbError};

/// The database (its own crate, shared with the ingest edge).
pub mod db {
    pub use orderflow_db::*;
}
pub use metrics::ProjectionMetrics;
