//! `orderflow replay`: a projection rebuilt from the log into fresh tables and swapped in, on
//! SQLite and on PostgreSQL, while the pipeline runs and queries are answered.
//!
//! 1. Quiet: after the orders are final the tables are tampered with; the replay restores every
//!    table of both projections to exactly what it was (checksums), and queries answered `200`
//!    all along. The inventory is replayed over the admin API (`POST
//!    /v1/projections/inventory/replay`), once refused while another holder has the replay lock.
//! 2. Busy: orders keep arriving during a replay; afterwards `reconcile` finds the tables equal
//!    to the fold of the log — nothing the live writer applied meanwhile was lost or doubled.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use orderflow::pipeline::{self, Role};
use orderflow_platform::kafka::KafkaClients;
use orderflow_projections::{
    inventory::InventoryProjection,
    orders::OrdersProjection,
    replay::{checksum, latest_snapshot, replay, take_snapshot, ReplayFrom, ReplayLock},
    Database as Db, Projection,
};
use orderflow_testkit::{
    apply_topics, order_json, place_order, restock, test_settings, wait_final, Broker, Database,
};
use serde_json::Value;

async fn checksums(db: &Db) -> BTreeMap<&'static str, (usize, u64)> {
    let mut sums = BTreeMap::new();
    for table in OrdersProjection
        .tables()
        .iter()
        .chain(InventoryProjection.tables())
    {
        sums.insert(*table, checksum(db, table).await.expect("checksum"));
    }
    sums
}

async fn place(client: &reqwest::Client, ingest: &str, customer: &str) -> (String, String) {
    let accepted = place_order(client, ingest, &order_json(customer)).await;
    (
        accepted["order_id"].as_str().expect("id").to_owned(),
        accepted["status_url"].as_str().expect("url").to_owned(),
    )
}

/// `POST /v1/projections/{projection}/replay` on the admin listener, then its status until the
/// run ends; returns the finished run.
async fn replay_over_http(client: &reqwest::Client, admin: &str, projection: &str) -> Value {
    let url = format!("{admin}/v1/projections/{projection}/replay");
    let started = client.post(&url).send().await.expect("start replay");
    assert_eq!(started.status(), 202);
    assert_eq!(
        started
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok()),
        Some(format!("/v1/projections/{projection}/replay").as_str())
    );
    orderflow_testkit::eventually(Duration::from_secs(120), "the replay to end", || async {
        let run: Value = client.get(&url).send().await.ok()?.json().await.ok()?;
        (run["state"] != "running").then_some(run)
    })
    .await
}

async fn replay_keeps_the_tables_and_the_queries(db: Database) {
    let Some(broker) = Broker::embedded() else {
        return;
    };
    let settings = test_settings(Some(&db.url));
    apply_topics(&broker, &settings).await;
    let running = pipeline::start(&settings, &broker.bootstrap(), &Role::ALL)
        .await
        .expect("pipeline");
    let client = reqwest::Client::new();
    let ingest = format!("http://{}", running.ingest_addr.expect("ingest"));
    let query = format!("http://{}", running.query_addr.expect("query"));
    restock(
        &client,
        &format!("http://{}", running.admin_addr.expect("admin")),
        &[("SKU-00001", 1000)],
    )
    .await;
    let mut orders = Vec::new();
    for i in 0..20 {
        orders.push(place(&client, &ingest, &format!("replay-{}", i % 5)).await);
    }
    for (_, url) in &orders {
        wait_final(&client, url).await;
    }
    let live = Db::connect(db.url.as_str(), 2).await.expect("connect");
    let clients = KafkaClients::new(&settings.kafka, broker.bootstrap());
    // The inventory projection is a separate group: let it finish the last answers.
    orderflow_testkit::eventually(Duration::from_secs(60), "stock projected", || async {
        let level: Value = client
            .get(format!("{query}/v1/inventory/SKU-00001"))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (level["reserved"] == 40).then_some(())
    })
    .await;
    let before = checksums(&live).await;
    assert!(before["orders"].0 == 20 && before["order_events"].0 > 20);

    // Tamper with both projections' tables.
    for statement in [
        "UPDATE orders SET status = 'tampered' WHERE customer_id = 'replay-0'",
        "DELETE FROM customer_stats",
        "UPDATE inventory_levels SET available = -5",
        "DELETE FROM inventory_movements WHERE kind = 'restocked'",
    ] {
        sqlx::query(statement)
            .execute(live.pool())
            .await
            .expect("tamper");
    }
    assert_ne!(checksums(&live).await, before);

    // Queries all through the replay.
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicUsize::new(0));
    let prober = tokio::spawn({
        let (client, stop, answered) = (client.clone(), stop.clone(), answered.clone());
        let urls: Vec<String> = orders
            .iter()
            .map(|(id, _)| format!("{query}/v1/orders/{id}"))
            .chain([
                format!("{query}/v1/customers/replay-1/orders"),
                format!("{query}/v1/inventory/SKU-00001"),
                format!("{query}/v1/analytics/status-counts"),
            ])
            .collect();
        async move {
            let mut failures = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                for url in &urls {
                    match client.get(url).send().await {
                        Ok(r) if r.status() == 200 => {
                            answered.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(r) => failures.push(format!("{url}: {}", r.status())),
                        Err(e) => failures.push(format!("{url}: {e}")),
                    }
                }
            }
            failures
        }
    });
    let report = replay(
        OrdersProjection,
        &live,
        &clients,
        &settings.projection,
        ReplayFrom::Beginning,
    )
    .await
    .expect("replay orders");
    assert_eq!(report.rows["orders"], 20, "{report}");
    // The inventory over the admin API, as an operator would, first while someone else holds
    // the replay lock (another instance, the CLI): that run is refused and changes nothing.
    let admin = format!("http://{}", running.admin_addr.expect("admin"));
    let held = ReplayLock::acquire(&live, "inventory")
        .await
        .expect("the replay lock is free");
    let refused = replay_over_http(&client, &admin, "inventory").await;
    assert_eq!(refused["state"], "failed", "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .is_some_and(|e| e.contains("already running")),
        "{refused}"
    );
    held.release().await.expect("released");
    let done = replay_over_http(&client, &admin, "inventory").await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["rows"]["inventory_levels"], 1, "{done}");
    stop.store(true, Ordering::SeqCst);
    let failures = prober.await.expect("prober");
    assert!(
        failures.is_empty(),
        "queries failed during the replay: {failures:?}"
    );
    assert!(answered.load(Ordering::SeqCst) > 0);
    assert_eq!(
        checksums(&live).await,
        before,
        "the replayed tables equal the live ones before the tampering"
    );

    // Busy: orders arrive while the projection is replayed.
    let placing = tokio::spawn({
        let (client, ingest) = (client.clone(), ingest.clone());
        async move {
            let mut placed = Vec::new();
            for i in 0..30 {
                placed.push(place(&client, &ingest, &format!("busy-{}", i % 7)).await);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            placed
        }
    });
    replay(
        OrdersProjection,
        &live,
        &clients,
        &settings.projection,
        ReplayFrom::Beginning,
    )
    .await
    .expect("replay while busy");
    replay(
        InventoryProjection,
        &live,
        &clients,
        &settings.projection,
        ReplayFrom::Beginning,
    )
    .await
    .expect("inventory replay while busy");
    for (_, url) in placing.await.expect("placing") {
        wait_final(&client, &url).await;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default();
    let report = orderflow_projections::reconcile::reconcile(
        &live,
        &clients,
        orderflow_topics::names::ORDERS_EVENTS,
        Duration::from_secs(300),
        now,
    )
    .await
    .expect("reconcile");
    assert!(report.is_clean(), "{report}");
    assert_eq!(report.orders_checked, 50, "{report}");

    // Snapshots: a replay folds only the log after the latest one.
    assert_eq!(latest_snapshot(&live, "orders").await.expect("read"), None);
    let snapshot = take_snapshot(&OrdersProjection, &live)
        .await
        .expect("snapshot");
    assert_eq!(snapshot.rows["orders"], 50, "{snapshot}");
    assert_eq!(
        latest_snapshot(&live, "orders").await.expect("read"),
        Some(snapshot.clone())
    );
    let at_snapshot: i64 = snapshot.positions.values().sum();
    let mut tail = Vec::new();
    for i in 0..10 {
        tail.push(place(&client, &ingest, &format!("tail-{}", i % 3)).await);
    }
    for (_, url) in &tail {
        wait_final(&client, url).await;
    }
    let orders_tables = |sums: BTreeMap<&'static str, (usize, u64)>| {
        sums.into_iter()
            .filter(|(table, _)| OrdersProjection.tables().contains(table))
            .collect::<BTreeMap<_, _>>()
    };
    let before = orders_tables(checksums(&live).await);
    assert_eq!(before["orders"].0, 60);
    for statement in [
        "UPDATE orders SET status = 'tampered' WHERE customer_id = 'tail-1'",
        "DELETE FROM customer_stats",
    ] {
        sqlx::query(statement)
            .execute(live.pool())
            .await
            .expect("tamper");
    }
    let now_at: i64 = sqlx::query_scalar(
        "SELECT CAST(SUM(next_offset) AS BIGINT) FROM projection_offsets WHERE projection = 'orders'",
    )
    .fetch_one(live.pool())
    .await
    .expect("positions");
    let from_snapshot = replay(
        OrdersProjection,
        &live,
        &clients,
        &settings.projection,
        ReplayFrom::LatestSnapshot,
    )
    .await
    .expect("replay from the snapshot");
    assert_eq!(
        from_snapshot.from_snapshot,
        Some(snapshot.taken_at_ms),
        "{from_snapshot}"
    );
    assert_eq!(
        from_snapshot.records as i64,
        now_at - at_snapshot,
        "only the records after the snapshot are folded: {from_snapshot}"
    );
    assert_eq!(orders_tables(checksums(&live).await), before);
    let whole = replay(
        OrdersProjection,
        &live,
        &clients,
        &settings.projection,
        ReplayFrom::Beginning,
    )
    .await
    .expect("replay from the beginning");
    assert_eq!(whole.from_snapshot, None);
    assert_eq!(whole.records as i64, now_at, "{whole}");
    assert_eq!(orders_tables(checksums(&live).await), before);

    running
        .shutdown(Duration::from_secs(30))
        .await
        .expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_on_sqlite() {
    replay_keeps_the_tables_and_the_queries(Database::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_on_postgres() {
    let Some(db) = Database::postgres().await else {
        return;
    };
    replay_keeps_the_tables_and_the_queries(db).await;
}
