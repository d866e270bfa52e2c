//! `orderflow loadgen`: posts realistic random orders to a running instance at a set rate, then
//! reads every accepted order back from its status URL until it is final, and reports.
//!
//! Orders: customers and SKUs drawn from fixed pools, 1–4 lines, prices in minor units, mostly
//! EUR, shipping and 19 % tax; a configurable share is deliberately invalid (a wrong total or an
//! unaccepted currency) so rejections show up too.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::task::JoinSet;

#[derive(Debug, Clone, clap::Args)]
pub struct LoadgenArgs {
    /// Base URL of the ingest edge.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Base URL of the admin listener (restocks).
    #[arg(long, default_value = "http://127.0.0.1:8083")]
    pub admin_url: String,
    /// An API key or token sent with every request (an admin key can do all of them; `orderflow
    /// dev` prints one).
    #[arg(long, env = "LOADGEN_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// How many orders to post.
    #[arg(long, short = 'n', default_value_t = 200)]
    pub orders: u32,
    /// Orders per second (open loop: the schedule does not slow down for the server).
    #[arg(long, default_value_t = 50.0)]
    pub rate: f64,
    /// Size of the customer pool (a small pool trips the fraud model's velocity rule).
    #[arg(long, default_value_t = 1000)]
    pub customers: u32,
    /// Size of the SKU pool.
    #[arg(long, default_value_t = 100)]
    pub skus: u32,
    /// Share of deliberately invalid orders, 0.0–1.0.
    #[arg(long, default_value_t = 0.05)]
    pub invalid_ratio: f64,
    /// Requests in flight at most.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// How long to wait for accepted orders to become final, in seconds.
    #[arg(long, default_value_t = 60)]
    pub wait_secs: u64,
    /// Seed of the random orders (same seed, same orders).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Units of every SKU of the pool to restock (POST /v1/inventory) before sending orders;
    /// 0: none.
    #[arg(long, default_value_t = 100_000)]
    pub stock_per_sku: u32,
}

/// What a run saw.
#[derive(Debug, Default)]
pub struct Report {
    pub sent: u32,
    pub accepted: u32,
    /// Refusals and failures by HTTP status or transport error.
    pub refused: BTreeMap<String, u32>,
    /// Final statuses of accepted orders (and `in flight` for any not final in time).
    pub statuses: BTreeMap<String, u32>,
    pub not_final: u32,
    pub elapsed: Duration,
    /// Accept latency (request sent → 202) percentiles in ms: p50, p99, max.
    pub accept_ms: (u64, u64, u64),
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "sent      {}", self.sent)?;
        writeln!(f, "accepted  {} (202)", self.accepted)?;
        for (why, n) in &self.refused {
            writeln!(f, "refused   {n} ({why})")?;
        }
        writeln!(
            f,
            "accept latency ms: p50 {} p99 {} max {}",
            self.accept_ms.0, self.accept_ms.1, self.accept_ms.2
        )?;
        writeln!(f, "final status of accepted orders:")?;
        for (status, n) in &self.statuses {
            writeln!(f, "  {status:<12} {n}")?;
        }
        writeln!(f, "not final in time: {}", self.not_final)?;
        write!(f, "elapsed   {:.1} s", self.elapsed.as_secs_f64())
    }
}

/// One random order body.
pub fn random_order(rng: &mut StdRng, args: &LoadgenArgs) -> Value {
    let customer = rng.random_range(0..args.customers.max(1));
    let lines: Vec<Value> = (0..rng.random_range(1..=4))
        .map(|_| {
            json!({
                "sku": format!("SKU-{:05}", rng.random_range(0..args.skus.max(1))),
                "quantity": rng.random_range(1..=3),
                "unit_price_minor": rng.random_range(199..=9_999),
            })
        })
        .collect();
    let subtotal: i64 = lines
        .iter()
        .map(|l| l["quantity"].as_i64().unwrap_or(0) * l["unit_price_minor"].as_i64().unwrap_or(0))
        .sum();
    let shipping = if subtotal > 5_000 { 0 } else { 499 };
    let tax = subtotal * 19 / 100;
    let mut currency = match rng.random_range(0..10) {
        0 => "USD",
        1 => "GBP",
        _ => "EUR",
    };
    let mut total = subtotal + shipping + tax;
    if rng.random_bool(args.invalid_ratio.clamp(0.0, 1.0)) {
        if rng.random_bool(0.5) {
            total += 1;
        } else {
            currency = "XXX";
        }
    }
    json!({
        "customer_id": format!("customer-{customer:04}"),
        "currency": currency,
        "lines": lines,
        "shipping_address": {
            "name": format!("Customer {customer}"),
            "line1": format!("{} Market Street", rng.random_range(1..200)),
            "city": "Berlin",
            "postal_code": format!("10{:03}", rng.random_range(0..1000)),
            "country": "DE"
        },
        // Letters only: a long run of digits could pass the Luhn check and be refused as card data.
        "payment_token": format!(
            "tok_{}",
            (0..16).map(|_| char::from(b'a' + rng.random_range(0..26u8))).collect::<String>()
        ),
        "subtotal_minor": subtotal,
        "shipping_minor": shipping,
        "tax_minor": tax,
        "total_minor": total,
    })
}

#[derive(Debug, Deserialize)]
struct Accepted {
    status_url: String,
}

#[derive(Debug, Deserialize)]
struct OrderView {
    status: String,
    #[serde(rename = "final")]
    is_final: bool,
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

pub async fn run(args: &LoadgenArgs) -> Result<Report> {
    if !args.rate.is_finite() || args.rate <= 0.0 {
        bail!("--rate must be a positive number of orders per second");
    }
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(key) = &args.api_key {
        let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {key}"))
            .context("--api-key: not a valid header value")?;
        value.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(args.concurrency)
        .default_headers(headers)
        .build()
        .context("building the HTTP client")?;
    let endpoint = format!("{}/v1/orders", args.url.trim_end_matches('/'));
    if args.stock_per_sku > 0 {
        let items: Vec<Value> = (0..args.skus.max(1))
            .map(|i| json!({"sku": format!("SKU-{i:05}"), "quantity": args.stock_per_sku}))
            .collect();
        for chunk in items.chunks(200) {
            let response = client
                .post(format!(
                    "{}/v1/inventory",
                    args.admin_url.trim_end_matches('/')
                ))
                .json(&chunk)
                .send()
                .await
                .context("restocking the SKU pool")?;
            if !response.status().is_success() {
                bail!(
                    "restocking the SKU pool: HTTP {}: {}",
                    response.status(),
                    response.text().await.unwrap_or_default()
                );
            }
        }
    }
    let mut rng = StdRng::seed_from_u64(args.seed);
    let started = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / args.rate);
    let semaphore = std::sync::Arc::new(tokio::sync::Semaphore::new(args.concurrency.max(1)));
    let mut posts = JoinSet::new();
    for i in 0..args.orders {
        let due = started + interval * i;
        tokio::time::sleep_until(due.into()).await;
        let body = random_order(&mut rng, args);
        let client = client.clone();
        let endpoint = endpoint.clone();
        let permit = semaphore.clone().acquire_owned().await?;
        posts.spawn(async move {
            let _permit = permit;
            let sent = Instant::now();
            let result = client.post(&endpoint).json(&body).send().await;
            let latency = sent.elapsed();
            match result {
                Ok(response) if response.status() == reqwest::StatusCode::ACCEPTED => {
                    match response.json::<Accepted>().await {
                        Ok(a) => Ok((a.status_url, latency)),
                        Err(e) => Err(format!("bad 202 body: {e}")),
                    }
                }
                Ok(response) => Err(format!("HTTP {}", response.status().as_u16())),
                Err(e) if e.is_timeout() => Err("timeout".to_owned()),
                Err(e) if e.is_connect() => Err("connection refused".to_owned()),
                Err(_) => Err("transport error".to_owned()),
            }
        });
    }
    let mut report = Report {
        sent: args.orders,
        ..Report::default()
    };
    let mut accepted = Vec::new();
    let mut latencies = Vec::new();
    while let Some(joined) = posts.join_next().await {
        match joined.context("a request task failed")? {
            Ok((url, latency)) => {
                accepted.push(url);
                latencies.push(latency.as_millis() as u64);
            }
            Err(why) => *report.refused.entry(why).or_default() += 1,
        }
    }
    report.accepted = accepted.len() as u32;
    latencies.sort_unstable();
    report.accept_ms = (
        percentile(&latencies, 50.0),
        percentile(&latencies, 99.0),
        latencies.last().copied().unwrap_or(0),
    );

    // Read every accepted order back until it is final or the wait is over.
    let deadline = Instant::now() + Duration::from_secs(args.wait_secs);
    let mut pending = accepted;
    while !pending.is_empty() {
        let mut still = Vec::new();
        for url in pending {
            let view = match client.get(&url).send().await {
                Ok(r) if r.status().is_success() => r.json::<OrderView>().await.ok(),
                _ => None,
            };
            match view {
                Some(v) if v.is_final => *report.statuses.entry(v.status).or_default() += 1,
                _ => still.push(url),
            }
        }
        pending = still;
        if pending.is_empty() || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    report.not_final = pending.len() as u32;
    if report.not_final > 0 {
        report
            .statuses
            .insert("in flight".to_owned(), report.not_final);
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: LoadgenArgs,
    }

    #[test]
    fn valid_random_orders_add_up() {
        let args = Wrapper::parse_from(["x", "--invalid-ratio", "0"]).args;
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..100 {
            let o = random_order(&mut rng, &args);
            let lines = o["lines"].as_array().expect("lines");
            let subtotal: i64 = lines
                .iter()
                .map(|l| {
                    l["quantity"].as_i64().unwrap_or(0)
                        * l["unit_price_minor"].as_i64().unwrap_or(0)
                })
                .sum();
            assert_eq!(o["subtotal_minor"].as_i64(), Some(subtotal));
            assert_eq!(
                o["total_minor"].as_i64(),
                Some(
                    subtotal
                        + o["shipping_minor"].as_i64().unwrap_or(-1)
                        + o["tax_minor"].as_i64().unwrap_or(-1)
                )
            );
            assert!((1..=4).contains(&lines.len()));
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_orders() {
        let args = Wrapper::parse_from(["x"]).args;
        let a: Vec<_> = {
            let mut rng = StdRng::seed_from_u64(1);
            (0..10).map(|_| random_order(&mut rng, &args)).collect()
        };
        let b: Vec<_> = {
            let mut rng = StdRng::seed_from_u64(1);
            (0..10).map(|_| random_order(&mut rng, &args)).collect()
        };
        assert_eq!(a, b);
    }

    #[test]
    fn valid_random_orders_pass_the_ingest_edge() {
        let args = Wrapper::parse_from(["x", "--invalid-ratio", "0"]).args;
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..5_000 {
            let order = random_order(&mut rng, &args);
            if let Err(e) = orderflow_ingest::request::parse(order.to_string().as_bytes()) {
                panic!("the edge refuses a generated order ({e}): {order}");
            }
        }
    }

    #[test]
    fn percentiles_of_sorted_samples() {
        let samples: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&samples, 50.0), 51);
        assert_eq!(percentile(&samples, 99.0), 99);
        assert_eq!(percentile(&[], 50.0), 0);
    }
}
