//! A step's timeline: the pipeline sampled at a fixed interval while the driver runs —
//! resident memory, orders that became final per second, CPU in cores — so a long run shows
//! whether memory and throughput stay flat as the log grows.

use std::time::{Duration, Instant};

use sqlx::AnyPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{procstat, setup::Pipeline, stats::TimelinePoint};

/// The sampler of one step; [`Timeline::stop`] ends it and hands over the samples.
pub struct Timeline {
    stop: CancellationToken,
    task: JoinHandle<Vec<TimelinePoint>>,
}

/// Orders with a final status in the projection (what the driver counts as completed).
async fn final_orders(db: &AnyPool) -> Option<i64> {
    sqlx::query_scalar(
        "SELECT COUNT(*) FROM orders WHERE status IN ('confirmed', 'rejected', 'cancelled')",
    )
    .fetch_one(db)
    .await
    .ok()
}

impl Timeline {
    /// Samples `pipeline`'s processes and `db` now and then every `every`.
    pub fn start(pipeline: &Pipeline, db: AnyPool, every: Duration, ticks: f64) -> Self {
        let pids: Vec<u32> = pipeline.processes.iter().map(|(_, pid)| *pid).collect();
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let read = |pids: &[u32]| {
                pids.iter()
                    .filter_map(|pid| procstat::sample(*pid, ticks))
                    .fold((0.0, 0.0), |(cpu, rss), s| (cpu + s.cpu_s, rss + s.rss_mib))
            };
            let began = Instant::now();
            let mut points = Vec::new();
            let mut last = (began, read(&pids).0, final_orders(&db).await.unwrap_or(0));
            let mut ticker = tokio::time::interval(every);
            ticker.tick().await;
            loop {
                tokio::select! {
                    _ = stopped.cancelled() => break,
                    _ = ticker.tick() => {}
                }
                let now = Instant::now();
                let (cpu, rss) = read(&pids);
                let Some(finals) = final_orders(&db).await else {
                    continue;
                };
                let span = now.duration_since(last.0).as_secs_f64().max(1e-3);
                points.push(TimelinePoint {
                    at_s: now.duration_since(began).as_secs_f64(),
                    rss_mib: rss,
                    final_per_s: (finals - last.2) as f64 / span,
                    cpu_cores: (cpu - last.1) / span,
                });
                last = (now, cpu, finals);
            }
            points
        });
        Self { stop, task }
    }

    /// Ends the sampling; the samples taken (none if the task failed).
    pub async fn stop(self) -> Vec<TimelinePoint> {
        self.stop.cancel();
        self.task.await.unwrap_or_default()
    }
}
