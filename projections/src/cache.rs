//! The query API's cache of orders, and how it learns of changes.
//!
//! [`OrderCache`] is a moka cache in front of `GET /v1/orders/{id}`, read-through. Entries
//! carry the row's version, and a change is known by the version it produced:
//!
//! - the projection writer publishes every `(order id, version)` it committed on a
//!   [`ChangeFeed`]: in-process at once after the commit (the embedded mode, and a process that
//!   runs both roles), and on PostgreSQL also through `NOTIFY` inside the write transaction, so
//!   other query replicas hear of exactly the committed changes ([`listen`]);
//! - a change marks the entry "at least version v" unless it already holds v or newer, and a
//!   read-through fill never puts back a row older than that mark — so a read racing a write
//!   cannot cache the row the write just replaced;
//! - when the `LISTEN` connection is lost, notifications may have been missed: the cache is
//!   cleared when it reconnects, and every entry expires after `query.cache_ttl_ms` anyway;
//! - a replay that swaps the tables (crate::replay) notifies [`RESET`]: every replica clears
//!   its cache. (With SQLite, whose changes are announced only in-process, a replay run by
//!   another process reaches the cache through the time to live.)

use std::{sync::Arc, time::Duration};

use orderflow_platform::restart::Restarts;

use moka::{ops::compute::Op, sync::Cache};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::orders::OrderRow;

/// The PostgreSQL channel the projection writer notifies on.
pub const CHANNEL: &str = "orderflow_order_changes";
/// The payload that tells every replica to drop its whole cache (after a replay swapped the
/// tables).
pub const RESET: &str = "reset";
/// Changes per notification: a payload must stay under PostgreSQL's 8000 bytes.
const CHANGES_PER_NOTIFY: usize = 100;

/// An order the projection changed, and the version it now has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderChange {
    #[serde(rename = "o")]
    pub order_id: String,
    #[serde(rename = "v")]
    pub version: i64,
}

/// The payloads of the notifications announcing `changes`, each small enough for `NOTIFY`.
pub fn notify_payloads(changes: &[OrderChange]) -> Vec<String> {
    changes
        .chunks(CHANGES_PER_NOTIFY)
        .filter_map(|chunk| serde_json::to_string(chunk).ok())
        .collect()
}

/// Where committed changes are announced inside this process.
#[derive(Clone)]
pub struct ChangeFeed {
    sender: broadcast::Sender<Arc<Vec<OrderChange>>>,
}

impl Default for ChangeFeed {
    fn default() -> Self {
        Self::new()
    }
}

impl ChangeFeed {
    pub fn new() -> Self {
        let (sender, _) = broadcast::channel(1024);
        Self { sender }
    }

    /// Announces committed changes (no receiver: nothing to do).
    pub fn publish(&self, changes: Vec<OrderChange>) {
        if !changes.is_empty() {
            let _ = self.sender.send(Arc::new(changes));
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Vec<OrderChange>>> {
        self.sender.subscribe()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    pub cache: String,
    /// `hit` or `miss`.
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheNameLabels {
    pub cache: String,
}

/// Cache lookups and invalidations (registered with the projection metrics).
#[derive(Clone, Debug, Default)]
pub struct CacheMetrics {
    pub requests: Family<CacheLabels, Counter>,
    pub invalidations: Family<CacheNameLabels, Counter>,
}

#[derive(Debug, Clone)]
enum Cached {
    Row(Arc<OrderRow>),
    /// The store holds this version or a newer one; the row itself is not cached.
    AtLeast(i64),
}

/// Orders by id, each with its version.
#[derive(Clone)]
pub struct OrderCache {
    entries: Cache<String, Cached>,
    metrics: CacheMetrics,
}

const NAME: &str = "orders";

impl OrderCache {
    pub fn new(capacity: u64, ttl: Duration, metrics: CacheMetrics) -> Self {
        Self {
            entries: Cache::builder()
                .max_capacity(capacity)
                .time_to_live(ttl)
                .build(),
            metrics,
        }
    }

    fn count(&self, result: &str) {
        self.metrics
            .requests
            .get_or_create(&CacheLabels {
                cache: NAME.to_owned(),
                result: result.to_owned(),
            })
            .inc();
    }

    /// The cached row, if there is one that no known change has overtaken.
    pub fn get(&self, order_id: &str) -> Option<Arc<OrderRow>> {
        match self.entries.get(order_id) {
            Some(Cached::Row(row)) => {
                self.count("hit");
                Some(row)
            }
            _ => {
                self.count("miss");
                None
            }
        }
    }

    /// Caches a row read from the store, unless the cache knows of a newer version.
    pub fn fill(&self, row: &OrderRow) {
        let version = row.version;
        let row = Arc::new(row.clone());
        self.entries
            .entry(row.order_id.clone())
            .and_compute_with(|current| match current.map(|e| e.into_value()) {
                Some(Cached::Row(cached)) if cached.version >= version => Op::Nop,
                Some(Cached::AtLeast(newer)) if newer > version => Op::Nop,
                _ => Op::Put(Cached::Row(row)),
            });
    }

    /// Applies a committed change: the entry is dropped unless it already holds that version.
    pub fn invalidate(&self, change: &OrderChange) {
        let version = change.version;
        let result = self
            .entries
            .entry(change.order_id.clone())
            .and_compute_with(|current| match current.map(|e| e.into_value()) {
                Some(Cached::Row(cached)) if cached.version >= version => Op::Nop,
                Some(Cached::AtLeast(known)) if known >= version => Op::Nop,
                _ => Op::Put(Cached::AtLeast(version)),
            });
        if !matches!(result, moka::ops::compute::CompResult::Unchanged(_)) {
            self.metrics
                .invalidations
                .get_or_create(&CacheNameLabels {
                    cache: NAME.to_owned(),
                })
                .inc();
        }
    }

    /// Forgets everything (changes may have been missed).
    pub fn clear(&self) {
        self.entries.invalidate_all();
    }

    /// Applies the changes announced on `feed` until cancelled.
    pub async fn follow(self, feed: ChangeFeed, cancel: CancellationToken) {
        let mut changes = feed.subscribe();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                received = changes.recv() => match received {
                    Ok(changes) => changes.iter().for_each(|c| self.invalidate(c)),
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        warn!(missed, "The cache fell behind the change feed; clearing it.");
                        self.clear();
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    }
}

/// Applies the changes other processes' projection writers announce with `NOTIFY` on
/// PostgreSQL at `url`, until cancelled. Reconnects with backoff; clears the cache on every
/// (re)connect, since notifications sent while not listening are lost.
pub async fn listen(url: SecretString, cache: OrderCache, cancel: CancellationToken) {
    let mut restarts = Restarts::new("order cache listener");
    loop {
        restarts.session_started();
        let session = async {
            let mut listener = sqlx::postgres::PgListener::connect(url.expose_secret()).await?;
            listener.listen(CHANNEL).await?;
            cache.clear();
            info!(channel = CHANNEL, "Listening for order changes.");
            loop {
                let notification = listener.recv().await?;
                if notification.payload() == RESET {
                    info!("The order tables were replaced; clearing the cache.");
                    cache.clear();
                    continue;
                }
                match serde_json::from_str::<Vec<OrderChange>>(notification.payload()) {
                    Ok(changes) => changes.iter().for_each(|c| cache.invalidate(c)),
                    Err(e) => {
                        debug!(error = %e, "Unreadable change notification; clearing the cache.");
                        cache.clear();
                    }
                }
            }
            #[allow(unreachable_code)]
            Ok::<(), sqlx::Error>(())
        };
        let failure = tokio::select! {
            _ = cancel.cancelled() => return,
            result = session => match result {
                Ok(()) => return,
                Err(e) => e,
            },
        };
        if !restarts.failed(&failure, &cancel).await {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(version: i64) -> OrderRow {
        OrderRow {
            order_id: "o".into(),
            customer_id: "c".into(),
            status: "placed".into(),
            version,
            currency: "EUR".into(),
            total_minor: 1,
            line_count: 1,
            reasons: None,
            placed_at: 0,
            updated_at: 0,
            last_event_id: "e".into(),
        }
    }

    fn cache() -> OrderCache {
        OrderCache::new(100, Duration::from_secs(60), CacheMetrics::default())
    }

    fn change(version: i64) -> OrderChange {
        OrderChange {
            order_id: "o".into(),
            version,
        }
    }

    #[test]
    fn a_fill_is_served_until_a_newer_version_is_announced() {
        let cache = cache();
        assert!(cache.get("o").is_none());
        cache.fill(&row(2));
        assert_eq!(cache.get("o").map(|r| r.version), Some(2));
        // A change the entry already holds keeps it.
        cache.invalidate(&change(2));
        assert_eq!(cache.get("o").map(|r| r.version), Some(2));
        cache.invalidate(&change(3));
        assert!(cache.get("o").is_none());
    }

    #[test]
    fn a_read_that_raced_a_write_cannot_cache_the_older_row() {
        let cache = cache();
        // The writer committed version 5 while a reader still held version 4 from the store.
        cache.invalidate(&change(5));
        cache.fill(&row(4));
        assert!(cache.get("o").is_none(), "the stale row was not cached");
        cache.fill(&row(5));
        assert_eq!(cache.get("o").map(|r| r.version), Some(5));
        // An older fill never replaces a newer row either.
        cache.fill(&row(4));
        assert_eq!(cache.get("o").map(|r| r.version), Some(5));
    }

    #[test]
    fn hits_misses_and_invalidations_are_counted() {
        let metrics = CacheMetrics::default();
        let cache = OrderCache::new(100, Duration::from_secs(60), metrics.clone());
        cache.get("o");
        cache.fill(&row(1));
        cache.get("o");
        cache.get("o");
        cache.invalidate(&change(2));
        cache.invalidate(&change(2));
        let count = |result: &str| {
            metrics
                .requests
                .get_or_create(&CacheLabels {
                    cache: NAME.into(),
                    result: result.into(),
                })
                .get()
        };
        assert_eq!((count("hit"), count("miss")), (2, 1));
        let invalidations = metrics
            .invalidations
            .get_or_create(&CacheNameLabels { cache: NAME.into() })
            .get();
        assert_eq!(invalidations, 1, "a repeated change changes nothing");
    }

    #[test]
    fn notifications_stay_small() {
        let changes: Vec<OrderChange> = (0..250)
            .map(|i| OrderChange {
                order_id: uuid::Uuid::new_v4().to_string(),
                version: i,
            })
            .collect();
        let payloads = notify_payloads(&changes);
        assert_eq!(payloads.len(), 3);
        assert!(payloads.iter().all(|p| p.len() < 8000));
        let back: Vec<OrderChange> = payloads
            .iter()
            .flat_map(|p| serde_json::from_str::<Vec<OrderChange>>(p).expect("json"))
            .collect();
        assert_eq!(back, changes);
    }
}
