//! `orderflow-bench`: the end-to-end benchmark. Starts the pipeline (or targets a running one),
//! sweeps rising open-loop rates, measures the broker's ceiling on the same broker, and prints
//! a Markdown report (also written with a JSON twin to `--out`). See BENCHMARKS.md.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use clap::Parser;
use orderflow_benches::{
    ceiling,
    driver::{run_step, StepConfig},
    procstat,
    report::{BenchReport, IdleCpu, Machine},
    setup::{Pipeline, SetupKind},
    stats::sustainable_rate,
    timeline::Timeline,
};

#[derive(Parser, Debug)]
#[command(name = "orderflow-bench", about = "End-to-end benchmark of orderflow")]
struct Args {
    /// Which pipeline to start: the embedded default or Tansu + PostgreSQL.
    #[arg(long, value_enum, default_value = "embedded")]
    setup: SetupKind,
    /// The orderflow binary to start (default: next to this one).
    #[arg(long)]
    orderflow: Option<PathBuf>,
    /// Target a running instance's ingest URL instead of starting one (with --database-url
    /// and --kafka-brokers).
    #[arg(long, requires_all = ["database_url", "kafka_brokers"])]
    target: Option<String>,
    /// The running instance's admin listener (restocks), with --target.
    #[arg(long, default_value = "http://127.0.0.1:8083")]
    admin_target: String,
    /// The running instance's database, to see orders become final.
    #[arg(long)]
    database_url: Option<String>,
    /// The running instance's broker, for the ceiling.
    #[arg(long)]
    kafka_brokers: Option<String>,
    /// Process ids of a running instance, for CPU and memory (repeatable).
    #[arg(long)]
    pid: Vec<u32>,
    /// Rates to sweep, orders per second.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "50,100,200,400,800,1600,3200"
    )]
    rates: Vec<f64>,
    /// Customers the orders come from (each customer's orders count toward its fraud velocity:
    /// keep it well above rate × duration / fraud.max_orders_per_window).
    #[arg(long, default_value_t = 1000)]
    customers: u32,
    /// SKUs the orders buy; 2 is the hot-key scenario (every order on the same two SKUs).
    #[arg(long, default_value_t = 500)]
    skus: u32,
    /// Seconds to send at each rate.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// The end-to-end p99 a rate must stay under to count as sustained.
    #[arg(long, default_value_t = 250.0)]
    p99_threshold_ms: f64,
    /// Seconds between the samples of each step's timeline (memory, final orders/s, CPU);
    /// 0 picks a tenth of --duration (at least 1 s).
    #[arg(long, default_value_t = 0)]
    sample_every: u64,
    /// Records for the broker ceiling (0 skips it).
    #[arg(long, default_value_t = 20_000)]
    ceiling_messages: u64,
    /// Stop the sweep at the first rate not sustained.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    stop_at_first_failure: bool,
    /// Seconds to hold the pipeline idle after the warm-up, measuring what each process costs
    /// with nothing to do (0 skips it).
    #[arg(long, default_value_t = 10)]
    idle_seconds: u64,
    /// Directory for report.json and report.md.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let began = Instant::now();
    let progress = |what: &str| eprintln!("[{:>6.1} s] {what}", began.elapsed().as_secs_f64());
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let mut pipeline = match &args.target {
        Some(url) => Pipeline::running(
            url.clone(),
            args.admin_target.clone(),
            args.database_url.clone().unwrap_or_default(),
            args.kafka_brokers.clone().unwrap_or_default(),
            args.pid
                .iter()
                .map(|p| ("process".to_owned(), *p))
                .collect(),
        ),
        None => {
            let orderflow = match &args.orderflow {
                Some(path) => path.clone(),
                None => std::env::current_exe()?
                    .parent()
                    .context("bench binary has no directory")?
                    .join("orderflow"),
            };
            progress(&format!("Starting orderflow dev ({:?}).", args.setup));
            Pipeline::start(args.setup, &orderflow).await?
        }
    };
    sqlx::any::install_default_drivers();
    let db = sqlx::any::AnyPoolOptions::new()
        .max_connections(2)
        .connect(&pipeline.database_url)
        .await
        .with_context(|| format!("connecting to {}", pipeline.database_url))?;

    let ticks = procstat::clock_ticks();
    // Each process's CPU seconds so far, and the sum of their peak memory.
    let sample_all = |pipeline: &Pipeline| -> (Vec<(String, f64)>, f64) {
        let samples: Vec<_> = pipeline
            .processes
            .iter()
            .filter_map(|(name, pid)| Some((name.clone(), procstat::sample(*pid, ticks)?)))
            .collect();
        let peak = samples.iter().map(|(_, s)| s.peak_rss_mib).sum();
        (
            samples
                .into_iter()
                .map(|(name, s)| (name, s.cpu_s))
                .collect(),
            peak,
        )
    };

    // Warm-up: the first orders pay for connections and group joins.
    let warm = StepConfig {
        ingest_url: pipeline.ingest_url.clone(),
        admin_url: pipeline.admin_url.clone(),
        rate: 20.0,
        duration: Duration::from_secs(2),
        max_in_flight: 512,
        drain: Duration::from_secs(60),
        seed: 1,
        customers: args.customers,
        skus: args.skus,
    };
    progress("Warming up.");
    run_step(&warm, &db).await?;

    // Idle: every order of the warm-up has ended, and nothing is sent for a while.
    let idle = if args.idle_seconds > 0 {
        progress(&format!("Measuring idle CPU for {} s.", args.idle_seconds));
        let (before, _) = sample_all(&pipeline);
        let window = Instant::now();
        tokio::time::sleep(Duration::from_secs(args.idle_seconds)).await;
        let (after, _) = sample_all(&pipeline);
        Some(IdleCpu::between(
            &before,
            &after,
            window.elapsed().as_secs_f64(),
        ))
    } else {
        None
    };

    let mut steps = Vec::new();
    for (i, rate) in args.rates.iter().enumerate() {
        let config = StepConfig {
            rate: *rate,
            duration: Duration::from_secs(args.duration),
            seed: 100 + i as u64,
            ..warm.clone()
        };
        // scripts/profile starts recording on this line.
        progress(&format!("Sending {rate} orders/s for {} s.", args.duration));
        let (cpu_before, _) = sample_all(&pipeline);
        let every = Duration::from_secs(if args.sample_every > 0 {
            args.sample_every
        } else {
            (args.duration / 10).max(1)
        });
        let sampler = Timeline::start(&pipeline, db.clone(), every, ticks);
        let step = run_step(&config, &db).await;
        let timeline = sampler.stop().await;
        let mut step = step?;
        step.timeline = timeline;
        let (cpu_after, peak) = sample_all(&pipeline);
        step.cpu_by_process = cpu_after
            .into_iter()
            .map(|(name, after)| {
                let before = cpu_before
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map_or(0.0, |(_, cpu)| *cpu);
                (name, after - before)
            })
            .collect();
        step.pipeline_cpu_s = step.cpu_by_process.iter().map(|(_, cpu)| cpu).sum();
        step.pipeline_peak_rss_mib = peak;
        progress(&format!(
            "Rate {rate}/s: achieved {:.1}/s, end-to-end p99 {:.1} ms, errors {}.",
            step.achieved_rate,
            step.end_to_end.p99_ms,
            step.error_count()
        ));
        let sustained = step.sustained(args.p99_threshold_ms);
        steps.push(step);
        if !sustained && args.stop_at_first_failure {
            break;
        }
    }
    let sustainable = sustainable_rate(&steps, args.p99_threshold_ms);

    let ceiling = if args.ceiling_messages > 0 && !pipeline.bootstrap.is_empty() {
        progress(&format!(
            "Measuring the broker ceiling ({} records).",
            args.ceiling_messages
        ));
        Some(ceiling::measure(&pipeline.bootstrap, args.ceiling_messages).await?)
    } else {
        None
    };
    // A pipeline that fails to stop cleanly fails the run, but only after the report of what
    // it did is written: a long run's figures are not thrown away with it.
    let stopped = if args.target.is_none() {
        progress("Stopping the pipeline.");
        pipeline.stop()
    } else {
        Ok(())
    };

    let report = BenchReport {
        setup: args.target.is_none().then_some(args.setup),
        command,
        machine: Machine::this(),
        orderflow_version: env!("CARGO_PKG_VERSION").to_owned(),
        librdkafka_version: rdkafka::util::get_rdkafka_version().1,
        p99_threshold_ms: args.p99_threshold_ms,
        efficiency: BenchReport::efficiency(sustainable, ceiling.as_ref()),
        sustainable_rate: sustainable,
        ceiling,
        steps,
        idle,
    };
    let markdown = report.to_markdown();
    println!("{markdown}");
    std::fs::create_dir_all(&args.out)?;
    let stem = report.setup.map_or("target", SetupKind::name);
    std::fs::write(
        args.out.join(format!("{stem}.json")),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(args.out.join(format!("{stem}.md")), markdown)?;
    eprintln!("Wrote {}/{stem}.json and .md", args.out.display());
    stopped.context("stopping the pipeline after the report")
}
