//! The open-loop driver: sends orders on a fixed schedule — order `i` at `start + i / rate` —
//! whether or not earlier ones were answered, so a slow system shows up as latency, not as a
//! lower offered load (no coordinated omission). Latencies are measured from the scheduled
//! time: accept latency until the `202`, end-to-end latency until the projection wrote the
//! order's final status (`orders.projected_at`, same machine's clock).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use orderflow::loadgen::{random_order, LoadgenArgs};
use rand::{rngs::StdRng, SeedableRng};
use sqlx::{AnyPool, Row};
use tokio::{sync::Semaphore, task::JoinSet};

use crate::stats::{achieved_rate, latency_histogram, record, summarize, StepResult};

#[derive(Debug, Clone)]
pub struct StepConfig {
    pub ingest_url: String,
    pub admin_url: String,
    /// Orders per second.
    pub rate: f64,
    /// How long to send.
    pub duration: Duration,
    /// Requests in flight at most; a send due while all are busy counts as an error
    /// (`driver saturated`) instead of waiting, which would close the loop.
    pub max_in_flight: usize,
    /// How long after the last send to wait for orders to become final.
    pub drain: Duration,
    pub seed: u64,
    /// Customers the orders come from.
    pub customers: u32,
    /// SKUs the orders buy (2 for the hot-key scenario: every order on the same two SKUs).
    pub skus: u32,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// How an order's automated path ended, as the projection shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// Confirmed, rejected or cancelled.
    Final,
    /// Held for a fraud reviewer (`fraud_review`): a legitimate outcome that only a person
    /// ends, counted apart rather than as "not final in time".
    Held,
}

/// Accepted orders waiting to be seen ended, and ended rows seen before their `202` arrived.
#[derive(Default)]
struct Completion {
    /// order id → scheduled send time (wall clock, ms).
    pending: HashMap<String, i64>,
    /// order id → (projected_at, how), for orders ended before the driver learned their id.
    early: HashMap<String, (i64, Ending)>,
    end_to_end: Option<Histogram<u64>>,
    completed: u64,
    held: u64,
    last_completed_ms: i64,
}

impl Completion {
    fn complete(&mut self, scheduled_ms: i64, projected_at: i64, ending: Ending) {
        // Either way the pipeline has done its part: the order counts toward the rate.
        self.last_completed_ms = self.last_completed_ms.max(projected_at);
        if ending == Ending::Held {
            self.held += 1;
            return;
        }
        if let Some(h) = self.end_to_end.as_mut() {
            record(h, ((projected_at - scheduled_ms).max(0) as u64) * 1000);
        }
        self.completed += 1;
    }

    fn accepted(&mut self, order_id: String, scheduled_ms: i64) {
        match self.early.remove(&order_id) {
            Some((projected_at, ending)) => self.complete(scheduled_ms, projected_at, ending),
            None => {
                self.pending.insert(order_id, scheduled_ms);
            }
        }
    }

    fn seen_ended(&mut self, order_id: &str, projected_at: i64, ending: Ending) {
        match self.pending.remove(order_id) {
            Some(scheduled_ms) => self.complete(scheduled_ms, projected_at, ending),
            None => {
                self.early
                    .insert(order_id.to_owned(), (projected_at, ending));
            }
        }
    }
}

/// Polls the projection for orders that ended (final, or held for review) since `since` (with
/// a margin: a batch's `projected_at` is taken before its commit, so rows can appear with
/// slightly older times).
async fn poll_ended(db: &AnyPool, since: i64) -> Result<Vec<(String, i64, Ending)>> {
    let rows = sqlx::query(
        "SELECT order_id, projected_at, status FROM orders WHERE projected_at >= $1 \
         AND status IN ('confirmed', 'rejected', 'cancelled', 'fraud_review')",
    )
    .bind(since)
    .fetch_all(db)
    .await?;
    rows.into_iter()
        .map(|r| {
            let status: String = r.try_get(2)?;
            let ending = if status == "fraud_review" {
                Ending::Held
            } else {
                Ending::Final
            };
            Ok((r.try_get(0)?, r.try_get(1)?, ending))
        })
        .collect()
}

/// Runs one rate and reports it (without the process readings, which the caller adds).
pub async fn run_step(config: &StepConfig, db: &AnyPool) -> Result<StepResult> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(config.max_in_flight)
        .build()?;
    let endpoint = format!("{}/v1/orders", config.ingest_url.trim_end_matches('/'));
    let args = LoadgenArgs {
        url: config.ingest_url.clone(),
        admin_url: config.admin_url.clone(),
        api_key: None,
        orders: 0,
        rate: config.rate,
        customers: config.customers,
        skus: config.skus,
        invalid_ratio: 0.0,
        concurrency: config.max_in_flight,
        wait_secs: 0,
        seed: config.seed,
        stock_per_sku: 0,
    };
    // Enough stock for every order of the step, so the saga's inventory step never refuses.
    let stock: Vec<serde_json::Value> = (0..args.skus)
        .map(|i| serde_json::json!({"sku": format!("SKU-{i:05}"), "quantity": 1_000_000}))
        .collect();
    for chunk in stock.chunks(100) {
        let response = client
            .post(format!(
                "{}/v1/inventory",
                config.admin_url.trim_end_matches('/')
            ))
            .json(&chunk)
            .send()
            .await?;
        anyhow::ensure!(
            response.status().is_success(),
            "restocking answered {}",
            response.status()
        );
    }
    let total = (config.rate * config.duration.as_secs_f64()).round() as u64;
    let completion = Arc::new(Mutex::new(Completion {
        end_to_end: Some(latency_histogram()),
        ..Completion::default()
    }));
    let accept = Arc::new(Mutex::new(latency_histogram()));
    let errors: Arc<Mutex<std::collections::BTreeMap<String, u64>>> = Arc::default();
    let error = {
        let errors = errors.clone();
        move |kind: String| {
            if let Ok(mut e) = errors.lock() {
                *e.entry(kind).or_default() += 1;
            }
        }
    };

    // The completion watcher.
    let stop_watching = tokio_util::sync::CancellationToken::new();
    let watcher = {
        let db = db.clone();
        let completion = completion.clone();
        let stop = stop_watching.clone();
        let mut since = now_ms() - 1_000;
        tokio::spawn(async move {
            loop {
                if let Ok(rows) = poll_ended(&db, since).await {
                    let newest = rows.iter().map(|(_, at, _)| *at).max();
                    if let Ok(mut c) = completion.lock() {
                        for (order_id, projected_at, ending) in rows {
                            c.seen_ended(&order_id, projected_at, ending);
                        }
                    }
                    if let Some(newest) = newest {
                        since = since.max(newest - 2_000);
                    }
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(5)) => {}
                }
            }
        })
    };

    let mut rng = StdRng::seed_from_u64(config.seed);
    let slots = Arc::new(Semaphore::new(config.max_in_flight.max(1)));
    let start = Instant::now();
    let start_ms = now_ms();
    let interval = Duration::from_secs_f64(1.0 / config.rate);
    let mut sends = JoinSet::new();
    for i in 0..total {
        let offset = interval.mul_f64(i as f64);
        tokio::time::sleep_until((start + offset).into()).await;
        let scheduled = start + offset;
        let scheduled_ms = start_ms + offset.as_millis() as i64;
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            error("driver saturated".to_owned());
            continue;
        };
        let body = random_order(&mut rng, &args);
        let client = client.clone();
        let endpoint = endpoint.clone();
        let completion = completion.clone();
        let accept = accept.clone();
        let error = error.clone();
        sends.spawn(async move {
            let _permit = permit;
            match client.post(&endpoint).json(&body).send().await {
                Ok(response) if response.status() == reqwest::StatusCode::ACCEPTED => {
                    let latency = scheduled.elapsed();
                    let order_id = response
                        .json::<serde_json::Value>()
                        .await
                        .ok()
                        .and_then(|v| v["order_id"].as_str().map(str::to_owned));
                    match order_id {
                        Some(id) => {
                            if let Ok(mut h) = accept.lock() {
                                record(&mut h, latency.as_micros() as u64);
                            }
                            if let Ok(mut c) = completion.lock() {
                                c.accepted(id, scheduled_ms);
                            }
                        }
                        None => error("202 without order id".to_owned()),
                    }
                }
                Ok(response) => error(format!("HTTP {}", response.status().as_u16())),
                Err(e) if e.is_timeout() => error("timeout".to_owned()),
                Err(_) => error("transport error".to_owned()),
            }
        });
    }
    while sends.join_next().await.is_some() {}

    // Drain: wait for every accepted order to become final.
    let deadline = Instant::now() + config.drain;
    loop {
        let left = completion.lock().map(|c| c.pending.len()).unwrap_or(0);
        if left == 0 || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop_watching.cancel();
    watcher.await.context("completion watcher")?;

    let mut c = completion
        .lock()
        .map_err(|_| anyhow::anyhow!("completion state poisoned"))?;
    let not_final = c.pending.len() as u64;
    let mut errors = errors
        .lock()
        .map_err(|_| anyhow::anyhow!("error counts poisoned"))?
        .clone();
    if not_final > 0 {
        errors.insert("not final in time".to_owned(), not_final);
    }
    let accepted = c.completed + c.held + not_final;
    let end_to_end = c.end_to_end.take().unwrap_or_else(latency_histogram);
    let accept = accept
        .lock()
        .map_err(|_| anyhow::anyhow!("accept histogram poisoned"))?;
    Ok(StepResult {
        target_rate: config.rate,
        duration_s: config.duration.as_secs_f64(),
        sent: total,
        accepted,
        completed: c.completed,
        held_for_review: c.held,
        achieved_rate: achieved_rate(c.completed + c.held, start_ms, c.last_completed_ms),
        errors,
        accept: summarize(&accept),
        end_to_end: summarize(&end_to_end),
        pipeline_cpu_s: 0.0,
        cpu_by_process: Vec::new(),
        pipeline_peak_rss_mib: 0.0,
        timeline: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completion_matches_orders_in_either_order() {
        let mut c = Completion {
            end_to_end: Some(latency_histogram()),
            ..Completion::default()
        };
        // Accepted, then final 40 ms after its scheduled send.
        c.accepted("a".into(), 1_000);
        c.seen_ended("a", 1_040, Ending::Final);
        // Final before the driver saw its 202.
        c.seen_ended("b", 2_100, Ending::Final);
        c.accepted("b".into(), 2_000);
        // Seen final twice (the watcher's overlap): counted once.
        c.seen_ended("a", 1_040, Ending::Final);
        assert_eq!(c.completed, 2);
        assert!(c.pending.is_empty());
        assert_eq!(c.last_completed_ms, 2_100);
        let s = summarize(c.end_to_end.as_ref().expect("histogram"));
        assert_eq!(s.count, 2);
        assert!((s.max_ms - 100.0).abs() < 0.2, "{s:?}");
        assert!((s.p50_ms - 40.0).abs() < 0.1, "{s:?}");
    }

    #[test]
    fn an_order_held_for_review_ends_apart_from_the_final_ones() {
        let mut c = Completion {
            end_to_end: Some(latency_histogram()),
            ..Completion::default()
        };
        c.accepted("held".into(), 1_000);
        c.seen_ended("held", 1_030, Ending::Held);
        c.seen_ended("early-held", 2_030, Ending::Held);
        c.accepted("early-held".into(), 2_000);
        assert_eq!((c.completed, c.held), (0, 2));
        assert!(c.pending.is_empty(), "a held order is not waited for");
        assert!(c.end_to_end.as_ref().is_some_and(|h| h.is_empty()));
    }
}
