//! The query API against real databases (SQLite and PostgreSQL): keyset pagination returns
//! every order exactly once while new orders arrive, read-your-writes waits until the order
//! reaches the asked state (bounded), reads are cached and a committed change refreshes them
//! (`ETag`, `304`), and bad queries are problems.

use std::{collections::BTreeSet, time::Duration};

use orderflow_platform::http::Server;
use orderflow_projections::{
    cache::{CacheMetrics, ChangeFeed, OrderCache, OrderChange},
    orders::{apply_change, Change, OrderRow},
    query, Database,
};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

struct Api {
    url: String,
    db: Database,
    cancel: CancellationToken,
    /// What the projection writer announces after each commit.
    changes: ChangeFeed,
    cache_metrics: CacheMetrics,
}

impl Drop for Api {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn start(url: &str) -> Api {
    let db = Database::connect(url, 4).await.expect("connect");
    db.migrate().await.expect("migrate");
    let cache_metrics = CacheMetrics::default();
    let cache = OrderCache::new(1000, Duration::from_secs(600), cache_metrics.clone());
    let changes = ChangeFeed::new();
    let cancel = CancellationToken::new();
    tokio::spawn(cache.clone().follow(changes.clone(), cancel.clone()));
    let server = Server::bind(
        "127.0.0.1:0".parse().expect("addr"),
        query::router(
            db.clone(),
            cache,
            orderflow_auth::Authenticator::disabled(),
            orderflow_auth::limits::RateLimits::default(),
        ),
    )
    .await
    .expect("bind");
    let url = format!("http://{}", server.local_addr().expect("addr"));
    tokio::spawn(server.run(cancel.clone()));
    Api {
        url,
        db,
        cancel,
        changes,
        cache_metrics,
    }
}

async fn apply(db: &Database, change: Change) {
    let mut conn = db.pool().acquire().await.expect("connection");
    apply_change(&mut conn, &change, 0).await.expect("apply");
}

async fn place(db: &Database, customer: &str, placed_at: i64) -> String {
    let order_id = uuid::Uuid::now_v7().to_string();
    apply(
        db,
        Change::Insert(OrderRow {
            order_id: order_id.clone(),
            customer_id: customer.to_owned(),
            status: "placed".into(),
            version: 1,
            currency: "EUR".into(),
            total_minor: 100,
            line_count: 1,
            reasons: None,
            placed_at,
            updated_at: placed_at,
            last_event_id: uuid::Uuid::new_v4().to_string(),
        }),
    )
    .await;
    order_id
}

async fn confirm(db: &Database, order_id: &str) {
    apply(
        db,
        Change::Advance {
            order_id: order_id.to_owned(),
            version: 3,
            status: Some("confirmed"),
            reasons: None,
            updated_at: 5,
            event_id: uuid::Uuid::new_v4().to_string(),
        },
    )
    .await;
}

async fn get(url: String) -> (u16, reqwest::header::HeaderMap, Value) {
    let response = reqwest::get(url).await.expect("get");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    (
        status,
        headers,
        response.json().await.unwrap_or(Value::Null),
    )
}

async fn pages_return_every_order_once_while_orders_arrive(url: &str) {
    let api = start(url).await;
    let mut initial = BTreeSet::new();
    // Two orders share a placed_at: the order id breaks the tie.
    for at in [
        1_000, 1_001, 1_002, 1_003, 1_003, 1_004, 1_005, 1_006, 1_007, 1_008,
    ] {
        initial.insert(place(&api.db, "alice", at).await);
    }
    place(&api.db, "bob", 1_004).await;

    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    let mut newer = 2_000;
    loop {
        let mut url = format!("{}/v1/customers/alice/orders?limit=3", api.url);
        if let Some(cursor) = &after {
            url.push_str(&format!("&after={cursor}"));
        }
        let (status, _, page) = get(url).await;
        assert_eq!(status, 200, "{page}");
        let orders = page["orders"].as_array().expect("orders");
        assert!(orders.len() <= 3);
        seen.extend(
            orders
                .iter()
                .map(|o| o["order_id"].as_str().expect("id").to_owned()),
        );
        // New orders arrive between pages.
        place(&api.db, "alice", newer).await;
        newer += 1;
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => break,
        }
    }
    let unique: BTreeSet<String> = seen.iter().cloned().collect();
    assert_eq!(unique.len(), seen.len(), "an order came twice: {seen:?}");
    assert_eq!(
        unique, initial,
        "every order placed before paging began, exactly once"
    );

    // Bad page queries are problems.
    for query in ["limit=0", "limit=101", "after=garbage", "colour=red"] {
        let (status, _, problem) =
            get(format!("{}/v1/customers/alice/orders?{query}", api.url)).await;
        assert_eq!(status, 400, "{query}: {problem}");
        assert_eq!(problem["type"], "urn:orderflow:problem:invalid-query");
    }
}

async fn reads_wait_for_the_asked_state(url: &str) {
    let api = start(url).await;
    let order = place(&api.db, "carol", 1_000).await;

    // The projection confirms the order while a reader waits for it to be final.
    let db = api.db.clone();
    let writer_order = order.clone();
    let writer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        confirm(&db, &writer_order).await;
    });
    let (status, headers, view) =
        get(format!("{}/v1/orders/{order}?wait_for=final", api.url)).await;
    writer.await.expect("writer");
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["status"], "confirmed");
    assert_eq!(view["version"], 3);
    assert_eq!(headers["orderflow-wait"], "satisfied");

    // A version it never reaches: the wait ends, bounded, with the current state.
    let (status, headers, view) = get(format!(
        "{}/v1/orders/{order}?min_version=9&wait_ms=100",
        api.url
    ))
    .await;
    assert_eq!(status, 200);
    assert_eq!(view["version"], 3);
    assert_eq!(headers["orderflow-wait"], "timeout");

    // Already there: no waiting needed.
    let (_, headers, _) = get(format!("{}/v1/orders/{order}?min_version=2", api.url)).await;
    assert_eq!(headers["orderflow-wait"], "satisfied");

    let unknown = uuid::Uuid::new_v4();
    let (status, _, _) = get(format!(
        "{}/v1/orders/{unknown}?wait_for=final&wait_ms=50",
        api.url
    ))
    .await;
    assert_eq!(status, 404);
    let (status, _, problem) = get(format!("{}/v1/orders/{order}?wait_for=soon", api.url)).await;
    assert_eq!(status, 400, "{problem}");

    let (status, _, counts) = get(format!("{}/v1/analytics/status-counts", api.url)).await;
    assert_eq!(status, 200);
    assert_eq!(counts["counts"]["confirmed"], 1);
}

fn cache_count(api: &Api, result: &str) -> u64 {
    api.cache_metrics
        .requests
        .get_or_create(&orderflow_projections::cache::CacheLabels {
            cache: "orders".into(),
            result: result.into(),
        })
        .get()
}

async fn get_with(url: &str, if_none_match: Option<&str>) -> reqwest::Response {
    let client = reqwest::Client::new();
    let mut request = client.get(url);
    if let Some(tag) = if_none_match {
        request = request.header("if-none-match", tag);
    }
    request.send().await.expect("get")
}

async fn reads_are_cached_and_a_committed_change_refreshes_them(url: &str) {
    let api = start(url).await;
    let order = place(&api.db, "dave", 1_000).await;
    let order_url = format!("{}/v1/orders/{order}", api.url);

    // A miss reads the store and fills the cache; the next read is a hit.
    let first = get_with(&order_url, None).await;
    assert_eq!(first.status(), 200);
    let etag = first.headers()["etag"].to_str().expect("etag").to_owned();
    assert_eq!(etag, "\"1\"");
    assert_eq!(first.headers()["cache-control"], "no-cache");
    let hits = cache_count(&api, "hit");
    let again = get_with(&order_url, None).await;
    assert_eq!(again.status(), 200);
    assert_eq!(
        cache_count(&api, "hit"),
        hits + 1,
        "the second read is a hit"
    );

    // A conditional read with the current ETag: 304, no body.
    let not_modified = get_with(&order_url, Some(&etag)).await;
    assert_eq!(not_modified.status(), 304);
    assert_eq!(not_modified.headers()["etag"], etag.as_str());
    assert!(not_modified.bytes().await.expect("body").is_empty());

    // The store changes: until the change is announced the cache answers (that is what it is
    // for); once the writer announces it, the next read has the new version.
    confirm(&api.db, &order).await;
    let (_, _, view) = get(order_url.clone()).await;
    assert_eq!(view["version"], 1, "served from the cache");
    api.changes.publish(vec![OrderChange {
        order_id: order.clone(),
        version: 3,
    }]);
    let view =
        orderflow_testkit::eventually(Duration::from_secs(5), "the announced version", || async {
            let (_, _, view) = get(order_url.clone()).await;
            (view["version"] == 3).then_some(view)
        })
        .await;
    assert_eq!(view["status"], "confirmed");
    // The old ETag no longer matches.
    let changed = get_with(&order_url, Some(&etag)).await;
    assert_eq!(changed.status(), 200);
    assert_eq!(changed.headers()["etag"], "\"3\"");
}

async fn analytics_answer_over_a_range(url: &str) {
    let api = start(url).await;
    let hour = 3_600_000;
    for (sku, h, units, revenue) in [
        ("SKU-1", 0, 2, 200),
        ("SKU-1", 1, 1, 100),
        ("SKU-2", 1, 5, 1_000),
        ("SKU-3", 5, 9, 9_000),
    ] {
        sqlx::query(
            "INSERT INTO sales_per_product_hour (sku, hour, currency, units, revenue_minor, orders) \
             VALUES ($1, $2, 'EUR', $3, $4, 1)",
        )
        .bind(sku)
        .bind(h * hour)
        .bind(units)
        .bind(revenue)
        .execute(api.db.pool())
        .await
        .expect("insert");
    }
    let (status, _, sales) = get(format!(
        "{}/v1/analytics/sales?from=0&to={}",
        api.url,
        2 * hour
    ))
    .await;
    assert_eq!(status, 200, "{sales}");
    let rows: Vec<(String, i64)> = sales["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| {
            (
                r["sku"].as_str().unwrap_or_default().to_owned(),
                r["units"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("SKU-1".to_owned(), 2),
            ("SKU-1".to_owned(), 1),
            ("SKU-2".to_owned(), 5)
        ]
    );
    let (_, _, one) = get(format!(
        "{}/v1/analytics/sales?from=0&to={}&sku=SKU-2",
        api.url,
        2 * hour
    ))
    .await;
    assert_eq!(one["rows"].as_array().map(Vec::len), Some(1));

    let (status, _, top) = get(format!(
        "{}/v1/analytics/top-products?from=0&to={}&limit=2",
        api.url,
        6 * hour
    ))
    .await;
    assert_eq!(status, 200, "{top}");
    let ranked: Vec<(&str, i64)> = top["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| {
            (
                r["sku"].as_str().unwrap_or_default(),
                r["revenue_minor"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    assert_eq!(ranked, [("SKU-3", 9_000), ("SKU-2", 1_000)]);

    for bad in [
        "from=10&to=5",
        "from=0&to=99999999999",
        "from=0",
        "from=0&to=10&colour=red",
    ] {
        let (status, _, problem) = get(format!("{}/v1/analytics/sales?{bad}", api.url)).await;
        assert_eq!(status, 400, "{bad}: {problem}");
    }
}

mod sqlite {
    #[tokio::test]
    async fn analytics_answer_over_a_range() {
        let db = orderflow_testkit::Database::sqlite();
        super::analytics_answer_over_a_range(&db.url).await;
    }

    #[tokio::test]
    async fn pages_return_every_order_once_while_orders_arrive() {
        let db = orderflow_testkit::Database::sqlite();
        super::pages_return_every_order_once_while_orders_arrive(&db.url).await;
    }

    #[tokio::test]
    async fn reads_wait_for_the_asked_state() {
        let db = orderflow_testkit::Database::sqlite();
        super::reads_wait_for_the_asked_state(&db.url).await;
    }

    #[tokio::test]
    async fn reads_are_cached_and_a_committed_change_refreshes_them() {
        let db = orderflow_testkit::Database::sqlite();
        super::reads_are_cached_and_a_committed_change_refreshes_them(&db.url).await;
    }
}

mod postgres {
    #[tokio::test]
    async fn analytics_answer_over_a_range() {
        let Some(db) = orderflow_testkit::Database::postgres().await else {
            return;
        };
        super::analytics_answer_over_a_range(&db.url).await;
    }

    #[tokio::test]
    async fn pages_return_every_order_once_while_orders_arrive() {
        let Some(db) = orderflow_testkit::Database::postgres().await else {
            return;
        };
        super::pages_return_every_order_once_while_orders_arrive(&db.url).await;
    }

    #[tokio::test]
    async fn reads_wait_for_the_asked_state() {
        let Some(db) = orderflow_testkit::Database::postgres().await else {
            return;
        };
        super::reads_wait_for_the_asked_state(&db.url).await;
    }

    #[tokio::test]
    async fn reads_are_cached_and_a_committed_change_refreshes_them() {
        let Some(db) = orderflow_testkit::Database::postgres().await else {
            return;
        };
        super::reads_are_cached_and_a_committed_change_refreshes_them(&db.url).await;
    }
}
