//! The open-loop driver against a real pipeline (embedded broker, SQLite): every order it
//! sends is accounted for — accepted and seen final, with one end-to-end sample each. No speed
//! is asserted.

use std::time::Duration;

use orderflow::pipeline::{self, Role};
use orderflow_benches::driver::{run_step, StepConfig};
use orderflow_testkit::{apply_topics, test_settings, Broker, Database};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sent_order_is_accounted_for() {
    let Some(broker) = Broker::embedded() else {
        return;
    };
    let db = Database::sqlite();
    let settings = test_settings(Some(&db.url));
    apply_topics(&broker, &settings).await;
    let running = pipeline::start(&settings, &broker.bootstrap(), &Role::ALL)
        .await
        .expect("pipeline");

    sqlx::any::install_default_drivers();
    let pool = sqlx::any::AnyPoolOptions::new()
        .max_connections(1)
        .connect(&db.url)
        .await
        .expect("database");
    let config = StepConfig {
        ingest_url: format!("http://{}", running.ingest_addr.expect("ingest")),
        admin_url: format!("http://{}", running.admin_addr.expect("admin")),
        rate: 40.0,
        duration: Duration::from_secs(1),
        max_in_flight: 64,
        drain: Duration::from_secs(60),
        seed: 9,
        customers: 1000,
        skus: 500,
    };
    let step = run_step(&config, &pool).await.expect("step");
    assert_eq!(step.sent, 40);
    assert_eq!(step.accepted, 40, "{:?}", step.errors);
    assert_eq!(step.completed, 40, "{:?}", step.errors);
    assert!(step.errors.is_empty(), "{:?}", step.errors);
    assert_eq!(step.end_to_end.count, 40);
    assert_eq!(step.accept.count, 40);
    assert!(step.end_to_end.p50_ms >= step.accept.p50_ms.floor() - 1.0);
    assert!(step.achieved_rate > 0.0);
    running
        .shutdown(Duration::from_secs(30))
        .await
        .expect("shutdown");
}
