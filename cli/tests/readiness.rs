//! `/readyz`: not ready while a dependency is down or a consumer has not joined its group,
//! ready again once it is back; the reason names what is wrong.

use std::time::Duration;

use orderflow::pipeline::{self, Role, Running};
use orderflow_projections::Database as ProjectionDb;
use orderflow_testkit::{apply_topics, eventually, test_settings, Broker, Database};
use serde_json::Value;
use sqlx::{Connection, Executor};

const DEADLINE: Duration = Duration::from_secs(60);

async fn start(broker: &Broker, db: &Database, roles: &[Role]) -> Running {
    let settings = test_settings(Some(&db.url));
    apply_topics(broker, &settings).await;
    pipeline::start(&settings, &broker.bootstrap(), roles)
        .await
        .expect("pipeline")
}

/// Waits until `/readyz` answers `status` and its report satisfies `check`.
async fn readyz_until(
    running: &Running,
    status: u16,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    let url = format!("http://{}/readyz", running.ops_addr);
    let client = reqwest::Client::new();
    eventually(DEADLINE, what, || {
        let client = client.clone();
        let url = url.clone();
        let check = &check;
        async move {
            let response = client.get(&url).send().await.ok()?;
            let code = response.status().as_u16();
            let body: Value = response.json().await.ok()?;
            (code == status && check(&body)).then_some(body)
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_while_the_broker_is_down() {
    let broker = Broker::mock();
    let db = Database::sqlite();
    let running = start(&broker, &db, &Role::ALL).await;
    let ready = readyz_until(&running, 200, "ready", |_| true).await;
    for component in ["broker", "database", "processor saga", "projection orders"] {
        assert_eq!(ready["components"][component], "ready", "{ready}");
    }

    let cluster = broker.as_mock().expect("mock").cluster();
    cluster.broker_down(1).expect("down");
    // The reason is librdkafka's last connection failure (here, the refused connection).
    let down = readyz_until(&running, 503, "not ready with the broker down", |b| {
        b["components"]["broker"]
            .as_str()
            .is_some_and(|reason| reason.starts_with("broker unreachable: "))
    })
    .await;
    assert_eq!(down["ready"], false);
    let reason = down["components"]["broker"].as_str().unwrap_or_default();
    assert!(
        reason.contains("Connect") || reason.contains("down"),
        "the reason names the failure: {reason}"
    );

    cluster.broker_up(1).expect("up");
    readyz_until(&running, 200, "ready again with the broker back", |_| true).await;
    running
        .shutdown(Duration::from_secs(30))
        .await
        .expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_while_the_database_is_down_or_unmigrated() {
    let Some(db) = Database::postgres().await else {
        return;
    };
    let Some(broker) = Broker::embedded() else {
        return;
    };
    let running = start(&broker, &db, &[Role::Query]).await;
    readyz_until(&running, 200, "ready", |b| {
        b["components"]["database"] == "ready"
    })
    .await;

    let (server, name) = db.url.rsplit_once('/').expect("database URL");
    let name = name.split('?').next().unwrap_or(name);
    let admin_url = format!("{server}/postgres");
    let mut admin = sqlx::PgConnection::connect(&admin_url)
        .await
        .expect("admin");
    admin
        .execute(format!("DROP DATABASE {name} WITH (FORCE)").as_str())
        .await
        .expect("drop");
    readyz_until(&running, 503, "not ready without the database", |b| {
        b["components"]["database"]
            .as_str()
            .is_some_and(|r| r != "ready")
    })
    .await;

    // Back, but empty: reachable, yet the migrations are missing.
    admin
        .execute(format!("CREATE DATABASE {name}").as_str())
        .await
        .expect("create");
    readyz_until(&running, 503, "not ready before migrations", |b| {
        b["components"]["database"]
            .as_str()
            .is_some_and(|r| r.starts_with("migrations not applied"))
    })
    .await;

    let migrate = ProjectionDb::connect(db.url.as_str(), 1)
        .await
        .expect("connect");
    migrate.migrate().await.expect("migrate");
    readyz_until(&running, 200, "ready after migrations", |_| true).await;
    running
        .shutdown(Duration::from_secs(30))
        .await
        .expect("shutdown");
}
