//! Latency bookkeeping and the sweep's verdict. Pure: tested on synthetic timestamps.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::Serialize;

/// A latency histogram in microseconds, 1 µs to 10 min, 3 significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    // The bounds are constants that hdrhistogram accepts; failure would be a programming error.
    Histogram::new_with_bounds(1, 600_000_000, 3)
        .unwrap_or_else(|e| panic!("histogram bounds: {e}"))
}

/// Records `micros`, clamped into the histogram's range.
pub fn record(histogram: &mut Histogram<u64>, micros: u64) {
    histogram.saturating_record(micros.max(1));
}

/// Percentiles of a histogram, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

pub fn summarize(histogram: &Histogram<u64>) -> LatencySummary {
    if histogram.is_empty() {
        return LatencySummary::default();
    }
    let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    LatencySummary {
        count: histogram.len(),
        p50_ms: ms(0.50),
        p90_ms: ms(0.90),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        max_ms: histogram.max() as f64 / 1000.0,
    }
}

/// One rate of the sweep.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StepResult {
    /// Orders per second the driver was told to send.
    pub target_rate: f64,
    /// How long orders were sent, in seconds.
    pub duration_s: f64,
    pub sent: u64,
    pub accepted: u64,
    /// Accepted orders seen final in the projection.
    pub completed: u64,
    /// Accepted orders held for a fraud reviewer (`fraud_review`): ended as far as the
    /// pipeline goes, a person decides the rest. Not errors, and not in the latencies.
    pub held_for_review: u64,
    /// Orders that ended (final or held for review) per second, from the first scheduled send
    /// to the last of them.
    pub achieved_rate: f64,
    /// Errors by kind (HTTP status, timeout, not final in time, ...).
    pub errors: BTreeMap<String, u64>,
    /// Scheduled send → `202` (includes any queueing in the driver: open loop).
    pub accept: LatencySummary,
    /// Scheduled send → the projection wrote the final status.
    pub end_to_end: LatencySummary,
    /// CPU seconds the pipeline processes used during the step.
    pub pipeline_cpu_s: f64,
    /// The same by process (`orderflow`, the broker; each role with `--setup embedded-roles`).
    pub cpu_by_process: Vec<(String, f64)>,
    /// The pipeline's peak resident memory so far, MiB.
    pub pipeline_peak_rss_mib: f64,
    /// The pipeline sampled at a fixed interval while the step ran (its drain included): what
    /// a long run needs to show flat memory and throughput.
    pub timeline: Vec<TimelinePoint>,
}

/// One sample of a step's timeline.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct TimelinePoint {
    /// Seconds since the step began.
    pub at_s: f64,
    /// The pipeline processes' resident memory now, MiB.
    pub rss_mib: f64,
    /// Orders that became final per second since the previous sample.
    pub final_per_s: f64,
    /// The pipeline's CPU use since the previous sample, in cores (1.0 = one core busy).
    pub cpu_cores: f64,
}

/// At most `columns` points for a report: consecutive points merged, each merged point
/// carrying its group's last time and memory and its mean final orders/s and CPU (every
/// sample counts the same span, so means of rates are rates).
pub fn downsample(points: &[TimelinePoint], columns: usize) -> Vec<TimelinePoint> {
    if columns == 0 || points.len() <= columns {
        return points.to_vec();
    }
    let per = points.len().div_ceil(columns);
    points
        .chunks(per)
        .filter_map(|group| {
            let last = group.last()?;
            let n = group.len() as f64;
            Some(TimelinePoint {
                at_s: last.at_s,
                rss_mib: last.rss_mib,
                final_per_s: group.iter().map(|p| p.final_per_s).sum::<f64>() / n,
                cpu_cores: group.iter().map(|p| p.cpu_cores).sum::<f64>() / n,
            })
        })
        .collect()
}

/// How memory moved over a timeline: the last sample's RSS against the first's, in MiB, and
/// the final-orders rate of the second half against the first (1.0 = no decay). `None` below
/// four samples.
pub fn timeline_drift(points: &[TimelinePoint]) -> Option<(f64, f64)> {
    if points.len() < 4 {
        return None;
    }
    let (first, last) = (points.first()?, points.last()?);
    let half = points.len() / 2;
    let mean = |p: &[TimelinePoint]| p.iter().map(|x| x.final_per_s).sum::<f64>() / p.len() as f64;
    let (early, late) = (mean(&points[..half]), mean(&points[half..]));
    let ratio = if early > 0.0 { late / early } else { 1.0 };
    Some((last.rss_mib - first.rss_mib, ratio))
}

impl StepResult {
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Sustained: no errors, every order final, the rate achieved (within 5 %) and p99 end to
    /// end under the threshold.
    pub fn sustained(&self, p99_threshold_ms: f64) -> bool {
        self.error_count() == 0
            && self.completed + self.held_for_review == self.sent
            && self.achieved_rate >= 0.95 * self.target_rate
            && self.end_to_end.p99_ms <= p99_threshold_ms
    }
}

/// The highest target rate that was sustained. Rates above a failed one do not count: a
/// sweep is only trusted up to its first failure.
pub fn sustainable_rate(steps: &[StepResult], p99_threshold_ms: f64) -> Option<f64> {
    let mut sorted: Vec<&StepResult> = steps.iter().collect();
    sorted.sort_by(|a, b| a.target_rate.total_cmp(&b.target_rate));
    let mut best = None;
    for step in sorted {
        if !step.sustained(p99_threshold_ms) {
            break;
        }
        best = Some(step.target_rate);
    }
    best
}

/// Completed orders per second over `[first_scheduled_ms, last_completed_ms]`.
pub fn achieved_rate(completed: u64, first_scheduled_ms: i64, last_completed_ms: i64) -> f64 {
    let span_s = (last_completed_ms - first_scheduled_ms) as f64 / 1000.0;
    if completed == 0 || span_s <= 0.0 {
        0.0
    } else {
        completed as f64 / span_s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_synthetic_latencies() {
        let mut h = latency_histogram();
        // 1..=1000 ms, one sample each.
        for ms in 1..=1000u64 {
            record(&mut h, ms * 1000);
        }
        let s = summarize(&h);
        assert_eq!(s.count, 1000);
        let close = |got: f64, want: f64| (got - want).abs() <= want * 0.002 + 0.01;
        assert!(close(s.p50_ms, 500.0), "{s:?}");
        assert!(close(s.p90_ms, 900.0), "{s:?}");
        assert!(close(s.p99_ms, 990.0), "{s:?}");
        assert!(close(s.p999_ms, 999.0), "{s:?}");
        assert!(close(s.max_ms, 1000.0), "{s:?}");
    }

    #[test]
    fn an_empty_histogram_summarizes_to_zero() {
        assert_eq!(summarize(&latency_histogram()), LatencySummary::default());
    }

    #[test]
    fn out_of_range_values_are_clamped_not_lost() {
        let mut h = latency_histogram();
        record(&mut h, 0);
        record(&mut h, u64::MAX);
        assert_eq!(h.len(), 2);
    }

    #[test]
    fn timeline_drift_compares_the_ends_and_the_halves() {
        let point = |at_s: f64, rss_mib: f64, final_per_s: f64| TimelinePoint {
            at_s,
            rss_mib,
            final_per_s,
            cpu_cores: 0.5,
        };
        let flat: Vec<_> = (0..6).map(|i| point(f64::from(i), 100.0, 50.0)).collect();
        assert_eq!(timeline_drift(&flat), Some((0.0, 1.0)));
        let decaying = vec![
            point(0.0, 100.0, 50.0),
            point(1.0, 110.0, 50.0),
            point(2.0, 120.0, 25.0),
            point(3.0, 130.0, 25.0),
        ];
        assert_eq!(timeline_drift(&decaying), Some((30.0, 0.5)));
        assert_eq!(timeline_drift(&flat[..3]), None);
    }

    #[test]
    fn downsampling_keeps_the_last_memory_and_the_mean_rates() {
        let points: Vec<TimelinePoint> = (1..=10)
            .map(|i| TimelinePoint {
                at_s: f64::from(i),
                rss_mib: f64::from(100 + i),
                final_per_s: f64::from(i),
                cpu_cores: 1.0,
            })
            .collect();
        let merged = downsample(&points, 4);
        assert_eq!(merged.len(), 4, "{merged:?}");
        assert_eq!(merged[0].at_s, 3.0);
        assert_eq!(merged[0].rss_mib, 103.0);
        assert_eq!(merged[0].final_per_s, 2.0);
        assert_eq!(merged[3].at_s, 10.0);
        assert_eq!(merged[3].final_per_s, 10.0);
        assert_eq!(downsample(&points, 20), points);
    }

    #[test]
    fn achieved_rate_spans_first_send_to_last_completion() {
        assert_eq!(achieved_rate(100, 0, 2_000), 50.0);
        assert_eq!(achieved_rate(0, 0, 2_000), 0.0);
        assert_eq!(achieved_rate(10, 5, 5), 0.0);
    }

    fn step(rate: f64, p99: f64, errors: u64) -> StepResult {
        let mut s = StepResult {
            target_rate: rate,
            sent: 100,
            accepted: 100,
            completed: 100,
            achieved_rate: rate,
            ..StepResult::default()
        };
        s.end_to_end.p99_ms = p99;
        if errors > 0 {
            s.errors.insert("HTTP 503".into(), errors);
        }
        s
    }

    #[test]
    fn the_sustainable_rate_stops_at_the_first_failure() {
        let steps = vec![
            step(400.0, 300.0, 0), // too slow
            step(100.0, 20.0, 0),
            step(200.0, 80.0, 0),
            step(800.0, 90.0, 0), // above a failure: not trusted
        ];
        assert_eq!(sustainable_rate(&steps, 250.0), Some(200.0));
        assert_eq!(sustainable_rate(&[step(100.0, 20.0, 1)], 250.0), None);
        let mut slow = step(100.0, 20.0, 0);
        slow.achieved_rate = 80.0;
        assert!(
            !slow.sustained(250.0),
            "achieving 80 of 100/s is not sustaining 100/s"
        );
        let mut lost = step(100.0, 20.0, 0);
        lost.completed = 99;
        assert!(!lost.sustained(250.0));
        let mut held = step(100.0, 20.0, 0);
        held.completed = 97;
        held.held_for_review = 3;
        assert!(
            held.sustained(250.0),
            "orders held for review are an outcome, not a loss"
        );
    }
}
