//! The harness's output: one JSON document for machines, one Markdown report for people.

use std::fmt::Write as _;

use serde::Serialize;

use crate::{
    ceiling::Ceiling,
    setup::SetupKind,
    stats::{downsample, timeline_drift, StepResult, TimelinePoint},
};

/// Records a confirmed order of k SKUs writes through the full saga: on `orders.events` placed,
/// validated, fraud-scored, reservation requested, k line reservations, reserved, payment
/// requested, authorized, confirmed (8 + k); k reservation commands on `inventory.commands`; one
/// request on `payments.requests`: 9 + 2k, here for the harness's orders of 1–4 lines (k = 2.5 on
/// average). Changelog writes are not counted.
pub const MESSAGES_PER_ORDER: f64 = 14.0;

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub memory_gib: f64,
    pub kernel: String,
}

impl Machine {
    pub fn this() -> Self {
        let memory_kib: f64 = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.split_whitespace().next())
                    .and_then(|v| v.parse().ok())
            })
            .unwrap_or(0.0);
        Self {
            cores: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            memory_gib: (memory_kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_default(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Efficiency {
    pub messages_per_order: f64,
    /// Sustained orders/s × messages per order ÷ the consume → produce ceiling of the mode the
    /// pipeline runs in on this broker.
    pub vs_consume_produce: f64,
    /// The same ÷ the raw produce ceiling.
    pub vs_produce: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub setup: Option<SetupKind>,
    pub command: String,
    pub machine: Machine,
    pub orderflow_version: String,
    pub librdkafka_version: String,
    pub p99_threshold_ms: f64,
    pub steps: Vec<StepResult>,
    /// Highest rate sustained (orders/s), if any.
    pub sustainable_rate: Option<f64>,
    pub ceiling: Option<Ceiling>,
    pub efficiency: Option<Efficiency>,
    /// CPU with nothing to do, after the warm-up and before the first rate (`--idle-seconds`).
    pub idle: Option<IdleCpu>,
}

/// What each process costs with nothing to do: its CPU over a quiet window, in % of one core.
#[derive(Debug, Clone, Default, Serialize)]
pub struct IdleCpu {
    pub seconds: f64,
    pub percent_of_a_core: Vec<(String, f64)>,
}

impl IdleCpu {
    /// From each process's CPU seconds at the start and the end of a `seconds`-long window; a
    /// process missing from either reading is left out.
    pub fn between(before: &[(String, f64)], after: &[(String, f64)], seconds: f64) -> Self {
        let percent_of_a_core = after
            .iter()
            .filter_map(|(name, end)| {
                let (_, start) = before.iter().find(|(n, _)| n == name)?;
                Some((name.clone(), (end - start) / seconds * 100.0))
            })
            .collect();
        Self {
            seconds,
            percent_of_a_core,
        }
    }

    /// The report's line: each process, then all of them together.
    pub fn to_markdown(&self) -> String {
        let each: Vec<String> = self
            .percent_of_a_core
            .iter()
            .map(|(name, percent)| format!("{name} {percent:.1} %"))
            .collect();
        let all: f64 = self.percent_of_a_core.iter().map(|(_, p)| p).sum();
        format!(
            "\n**Idle** (nothing sent for {:.0} s, after the warm-up): {}; all {all:.1} % of a \
             core.\n",
            self.seconds,
            each.join(", ")
        )
    }
}

impl BenchReport {
    pub fn efficiency(sustainable: Option<f64>, ceiling: Option<&Ceiling>) -> Option<Efficiency> {
        let (rate, ceiling) = (sustainable?, ceiling?);
        Some(Efficiency {
            messages_per_order: MESSAGES_PER_ORDER,
            vs_consume_produce: rate * MESSAGES_PER_ORDER / ceiling.pipeline_rate,
            vs_produce: rate * MESSAGES_PER_ORDER / ceiling.produce_rate,
        })
    }

    pub fn to_markdown(&self) -> String {
        let mut out = String::new();
        let setup = match self.setup {
            Some(SetupKind::Embedded) => "embedded broker (Tansu + SQLite storage) + SQLite",
            Some(SetupKind::TansuPostgres) => "Tansu + PostgreSQL",
            Some(SetupKind::EmbeddedRoles) => {
                "embedded broker (Tansu + SQLite storage) + SQLite, each role its own process"
            }
            None => "running instance",
        };
        let _ = writeln!(out, "### {setup}\n");
        let _ = writeln!(
            out,
            "Machine: {} cores, {} GiB, Linux {}; orderflow {}, librdkafka {}.  \nCommand: `{}`\n",
            self.machine.cores,
            self.machine.memory_gib,
            self.machine.kernel,
            self.orderflow_version,
            self.librdkafka_version,
            self.command
        );
        out.push_str(
            "| target/s | achieved/s | sent | final | held for review | errors | accept p50 / p99 ms | end-to-end p50 / p90 / p99 / p99.9 / max ms | CPU s | peak RSS MiB |\n\
             |---|---|---|---|---|---|---|---|---|---|\n",
        );
        for s in &self.steps {
            let errors = if s.errors.is_empty() {
                "0".to_owned()
            } else {
                s.errors
                    .iter()
                    .map(|(k, v)| format!("{v} {k}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let e = &s.end_to_end;
            let _ = writeln!(
                out,
                "| {:.0} | {:.1} | {} | {} | {} | {} | {:.1} / {:.1} | {:.1} / {:.1} / {:.1} / {:.1} / {:.1} | {:.1} | {:.0} |",
                s.target_rate,
                s.achieved_rate,
                s.sent,
                s.completed,
                s.held_for_review,
                errors,
                s.accept.p50_ms,
                s.accept.p99_ms,
                e.p50_ms,
                e.p90_ms,
                e.p99_ms,
                e.p999_ms,
                e.max_ms,
                s.pipeline_cpu_s,
                s.pipeline_peak_rss_mib
            );
        }
        out.push_str(&cpu_per_order_markdown(&self.steps));
        if let Some(idle) = &self.idle {
            out.push_str(&idle.to_markdown());
        }
        for s in self.steps.iter().filter(|s| !s.timeline.is_empty()) {
            out.push_str(&timeline_markdown(s));
        }
        let _ = writeln!(
            out,
            "\n**Sustainable throughput** (p99 end to end ≤ {} ms, no errors): {}",
            self.p99_threshold_ms,
            self.sustainable_rate
                .map(|r| format!("{r:.0} orders/s"))
                .unwrap_or_else(|| "none of the rates tried".to_owned())
        );
        if let Some(c) = &self.ceiling {
            let transactional = c.transactional_rate.map_or_else(
                || "the broker has no transactions".to_owned(),
                |r| format!("{r:.0}/s with transactions"),
            );
            let _ = writeln!(
                out,
                "\n**Broker ceiling** ({} records of {} bytes, same broker): produce {:.0}/s, \
                 consume {:.0}/s, consume→produce {:.0}/s without transactions, {transactional}.",
                c.messages, c.message_bytes, c.produce_rate, c.consume_rate, c.idempotent_rate
            );
            let hop = &c.produce_to_consume;
            let _ = writeln!(
                out,
                "\n**The broker's own latency** (one record at a time, {} records): produce → \
                 consume p50 {:.1} / p99 {:.1} ms; an order crosses six consumer hops.",
                hop.count, hop.p50_ms, hop.p99_ms
            );
        }
        if let Some(e) = &self.efficiency {
            let _ = writeln!(
                out,
                "\n**Efficiency**: sustained rate × {} messages per order = {:.1}% of the \
                 consume→produce ceiling in the pipeline's mode, {:.1}% of the raw produce \
                 ceiling.",
                e.messages_per_order,
                e.vs_consume_produce * 100.0,
                e.vs_produce * 100.0
            );
        }
        out
    }
}

/// CPU milliseconds per order that ended, by process, for each step: what one order costs each
/// role (with `--setup embedded-roles`) and the broker. Empty when no step has CPU readings.
fn cpu_per_order_markdown(steps: &[StepResult]) -> String {
    let mut names: Vec<&str> = Vec::new();
    for step in steps {
        for (name, _) in &step.cpu_by_process {
            if !names.contains(&name.as_str()) {
                names.push(name);
            }
        }
    }
    if names.is_empty() {
        return String::new();
    }
    let mut out = String::from(
        "
CPU per order that ended, ms (CPU during the step ÷ orders final or held):

",
    );
    let _ = writeln!(out, "| target/s | {} | all |", names.join(" | "));
    let _ = writeln!(out, "|---|{}---|", "---|".repeat(names.len()));
    for step in steps {
        let ended = (step.completed + step.held_for_review) as f64;
        let per_order = |cpu_s: f64| {
            if ended > 0.0 {
                format!("{:.2}", cpu_s * 1000.0 / ended)
            } else {
                "–".to_owned()
            }
        };
        let cells: Vec<String> = names
            .iter()
            .map(|name| {
                step.cpu_by_process
                    .iter()
                    .find(|(n, _)| n == name)
                    .map_or_else(|| "–".to_owned(), |(_, cpu)| per_order(*cpu))
            })
            .collect();
        let _ = writeln!(
            out,
            "| {:.0} | {} | {} |",
            step.target_rate,
            cells.join(" | "),
            per_order(step.pipeline_cpu_s)
        );
    }
    out
}

/// Columns of a timeline table at most (longer timelines are merged: [`downsample`]).
const TIMELINE_COLUMNS: usize = 15;

/// A step's timeline as one table (time across, what was sampled down), and the drift of its
/// memory and throughput from the first samples to the last.
fn timeline_markdown(step: &StepResult) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nOver time at {:.0} orders/s (sampled while sending and draining):\n",
        step.target_rate
    );
    let points = downsample(&step.timeline, TIMELINE_COLUMNS);
    let row = |name: &str, cell: &dyn Fn(&TimelinePoint) -> String| {
        let cells: Vec<String> = points.iter().map(cell).collect();
        format!("| {name} | {} |\n", cells.join(" | "))
    };
    out.push_str(&row("s", &|p| format!("{:.0}", p.at_s)));
    out.push_str(&format!("|---|{}\n", "---|".repeat(points.len())));
    out.push_str(&row("RSS MiB", &|p| format!("{:.0}", p.rss_mib)));
    out.push_str(&row("final/s", &|p| format!("{:.1}", p.final_per_s)));
    out.push_str(&row("CPU cores", &|p| format!("{:.2}", p.cpu_cores)));
    if let Some((rss, ratio)) = timeline_drift(&step.timeline) {
        let _ = writeln!(
            out,
            "\nMemory moved {rss:+.0} MiB from the first sample to the last; the second half's \
             final orders/s were {:.0}% of the first half's.",
            ratio * 100.0
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_per_order_divides_each_processs_cpu_by_the_orders_that_ended() {
        let step = StepResult {
            target_rate: 50.0,
            completed: 490,
            held_for_review: 10,
            cpu_by_process: vec![("ingest".into(), 1.0), ("embedded broker".into(), 4.0)],
            pipeline_cpu_s: 5.0,
            ..StepResult::default()
        };
        let table = cpu_per_order_markdown(&[step]);
        assert!(
            table.contains("| target/s | ingest | embedded broker | all |"),
            "{table}"
        );
        assert!(table.contains("| 50 | 2.00 | 8.00 | 10.00 |"), "{table}");
        assert_eq!(cpu_per_order_markdown(&[StepResult::default()]), "");
    }

    #[test]
    fn idle_cpu_is_each_processs_cpu_over_the_window_in_percent_of_a_core() {
        let before = [("orderflow".to_owned(), 10.0), ("broker".to_owned(), 4.0)];
        let after = [
            ("orderflow".to_owned(), 10.05),
            ("broker".to_owned(), 4.2),
            ("started later".to_owned(), 1.0),
        ];
        let idle = IdleCpu::between(&before, &after, 10.0);
        let line = idle.to_markdown();
        assert!(
            line.contains("orderflow 0.5 %, broker 2.0 %; all 2.5 % of a core"),
            "{line}"
        );
        assert!(!line.contains("started later"), "{line}");
    }

    #[test]
    fn efficiency_divides_the_message_rate_by_the_ceiling() {
        let ceiling = Ceiling {
            messages: 1000,
            message_bytes: 200,
            produce_rate: 4.0 * 500.0 * MESSAGES_PER_ORDER,
            consume_rate: 9000.0,
            idempotent_rate: 3.0 * 500.0 * MESSAGES_PER_ORDER,
            transactional_rate: Some(2.0 * 500.0 * MESSAGES_PER_ORDER),
            pipeline_rate: 2.0 * 500.0 * MESSAGES_PER_ORDER,
            produce_to_consume: crate::stats::LatencySummary::default(),
        };
        let e = BenchReport::efficiency(Some(500.0), Some(&ceiling)).expect("both known");
        assert!((e.vs_consume_produce - 0.5).abs() < 1e-9);
        assert!((e.vs_produce - 0.25).abs() < 1e-9);
        assert!(BenchReport::efficiency(None, Some(&ceiling)).is_none());
    }
}
