//! `projection-bench`: how fast the orders projection folds the log into the database, and how
//! fast the query API answers an order from its cache and from the database.
//!
//! 1. Writes `--orders` orders (placed, validated, confirmed: three events each) to
//!    `orders.events` on the embedded broker.
//! 2. Runs the orders projection writer (the real one, batches and positions) from offset 0
//!    and times it until its stored positions reach the end of the log: events per second.
//! 3. Serves the query API over the tables (with its cache) and requests `--queries` distinct
//!    orders twice over HTTP: the first request of each is a cache miss (read from the
//!    database), the second a hit. Latency p50/p99/max of each, from the client.
//!
//! `--database sqlite` (a temporary file) or `--database postgres` (a fresh database on the
//! server at `TEST_DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/postgres`).
//! See BENCHMARKS.md.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use orderflow_platform::{http::Server, kafka::KafkaClients};
use orderflow_projections::{
    cache::{CacheMetrics, OrderCache},
    orders::OrdersProjection,
    query, ProjectionMetrics, ProjectionWriter,
};
use orderflow_schemas::Codec;
use orderflow_testkit::{
    apply_topics,
    log::{now_ms, order_placed, short_timeline},
    test_settings, Broker, Database,
};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::Row;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Parser, Debug)]
#[command(name = "projection-bench")]
struct Args {
    #[arg(long, value_enum, default_value = "sqlite")]
    database: Backend,
    /// Orders to write (three events each).
    #[arg(long, default_value_t = 20_000)]
    orders: usize,
    /// Distinct orders to query (each once cold, once warm).
    #[arg(long, default_value_t = 2_000)]
    queries: usize,
}

fn summary(h: &Histogram<u64>) -> String {
    let ms = |v: u64| v as f64 / 1000.0;
    format!(
        "{:.2} / {:.2} / {:.2}",
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.99)),
        ms(h.max())
    )
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let db = match args.database {
        Backend::Sqlite => Database::sqlite(),
        Backend::Postgres => match Database::postgres().await {
            Some(db) => db,
            None => bail!("PostgreSQL is not reachable at TEST_DATABASE_URL"),
        },
    };
    let Some(broker) = Broker::embedded() else {
        bail!("the embedded broker is not installed: orderflow broker --install-only");
    };
    let settings = test_settings(Some(&db.url));
    apply_topics(&broker, &settings).await;
    let clients = KafkaClients::new(&settings.kafka, broker.bootstrap());
    let codec = Arc::new(Codec::new()?);

    // 1. The log.
    let producer: FutureProducer = clients.idempotent_producer("bench").create()?;
    let now = now_ms();
    let mut ids = Vec::with_capacity(args.orders);
    let mut deliveries = Vec::new();
    let mut events = 0usize;
    for i in 0..args.orders {
        let customer = format!("customer-{}", i % 1000);
        let placed = order_placed(&customer, &[("SKU-00001", 1)], "tok_ok", now + i as i64);
        ids.push(placed.envelope.order_id.clone());
        for event in short_timeline(&placed, true) {
            let bytes = codec.encode(&event)?;
            loop {
                match producer.send_result(
                    FutureRecord::to(orderflow_topics::names::ORDERS_EVENTS)
                        .key(&customer)
                        .payload(&bytes),
                ) {
                    Ok(d) => {
                        deliveries.push(d);
                        break;
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
            events += 1;
        }
    }
    for d in deliveries {
        d.await.context("delivery cancelled")?.map_err(|(e, _)| e)?;
    }
    eprintln!("{events} events written");

    // 2. The fold.
    let live = orderflow_projections::Database::connect(db.url.as_str(), 8).await?;
    live.migrate().await?;
    let writer = ProjectionWriter::new(
        OrdersProjection,
        live.clone(),
        clients.clone(),
        &settings.projection,
        codec.clone(),
        ProjectionMetrics::unregistered(),
    );
    let cancel = CancellationToken::new();
    let started = Instant::now();
    let running = tokio::spawn(writer.run(cancel.clone()));
    loop {
        let applied: i64 = sqlx::query(
            "SELECT CAST(COALESCE(SUM(next_offset), 0) AS BIGINT) FROM projection_offsets WHERE projection = 'orders'",
        )
        .fetch_one(live.pool())
        .await?
        .try_get(0)?;
        if applied as usize >= events {
            break;
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("the projection did not catch up in 600 s ({applied} of {events})");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = started.elapsed();
    cancel.cancel();
    let _ = running.await;

    // 3. Queries: a miss, then a hit, for each order.
    let cache = OrderCache::new(
        args.queries as u64 * 2,
        Duration::from_secs(600),
        CacheMetrics::default(),
    );
    let server = Server::bind(
        "127.0.0.1:0".parse()?,
        query::router(
            live.clone(),
            cache,
            orderflow_auth::Authenticator::disabled(),
            orderflow_auth::limits::RateLimits::default(),
        ),
    )
    .await?;
    let url = format!("http://{}", server.local_addr()?);
    let stop = CancellationToken::new();
    tokio::spawn(server.run(stop.clone()));
    let client = reqwest::Client::new();
    let mut miss = Histogram::<u64>::new(3)?;
    let mut hit = Histogram::<u64>::new(3)?;
    for round in [&mut miss, &mut hit] {
        for id in ids.iter().take(args.queries) {
            let t = Instant::now();
            let response = client.get(format!("{url}/v1/orders/{id}")).send().await?;
            let status = response.status();
            response.bytes().await?;
            if status != 200 {
                bail!("GET order {id}: {status}");
            }
            round.record(t.elapsed().as_micros() as u64)?;
        }
    }
    stop.cancel();

    println!(
        "| {:?} | {} | {:.1} | {:.0} | {} | {} |",
        args.database,
        events,
        took.as_secs_f64(),
        events as f64 / took.as_secs_f64(),
        summary(&miss),
        summary(&hit)
    );
    Ok(())
}
