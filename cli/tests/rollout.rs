//! Safe rollouts (docs/runbooks/deploy.md): only `orderflow migrate` changes the schema; a role
//! refuses a database behind it, naming the command that fixes it, and runs on a database one
//! additive migration ahead of it (the expand step of the next release, which a rollback leaves
//! in place). `orderflow migrate` of the older release passes over that migration too.

use std::{process::Command, time::Duration};

use orderflow::pipeline::{self, Role};
use orderflow_db::Database as Db;
use orderflow_testkit::{
    apply_topics, order_json, place_order, restock, test_settings, wait_final, Broker, Database,
};

const BIN: &str = env!("CARGO_BIN_EXE_orderflow");

/// The next release's expand step: an additive change (a nullable column, a new table) that
/// this release does not know.
const NEXT_VERSION: i64 = 99_991_231_000_000;

fn orderflow(bootstrap: &str, database_url: &str, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .args(["--kafka-brokers", bootstrap, "--database-url", database_url])
        .args([
            "--set",
            "query.listen=\"127.0.0.1:0\"",
            "--set",
            "telemetry.listen=\"127.0.0.1:0\"",
        ])
        .args(args)
        .output()
        .expect("orderflow runs")
}

async fn expand_one_release_ahead(url: &str) {
    let db = Db::connect(url, 1).await.expect("connect");
    for statement in [
        "ALTER TABLE orders ADD COLUMN gift_note TEXT",
        "CREATE TABLE gift_wraps (order_id TEXT PRIMARY KEY, paper TEXT NOT NULL)",
    ] {
        sqlx::query(statement)
            .execute(db.pool())
            .await
            .expect("expand step");
    }
    // What sqlx records for a migration it applied (a checksum of the next release's file).
    let insert = match db.backend() {
        orderflow_db::Backend::Postgres => {
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
             VALUES ($1, 'gift notes', TRUE, decode('00ff', 'hex'), 1)"
        }
        orderflow_db::Backend::Sqlite => {
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
             VALUES ($1, 'gift notes', TRUE, x'00ff', 1)"
        }
    };
    sqlx::query(insert)
        .bind(NEXT_VERSION)
        .execute(db.pool())
        .await
        .expect("record the expand step");
    db.pool().close().await;
}

async fn rollout(broker: Broker, db: Database) {
    let bootstrap = broker.bootstrap();
    let settings = test_settings(Some(&db.url));
    apply_topics(&broker, &settings).await;

    // A role on an empty database: refused, naming the step that is missing.
    let refused = orderflow(&bootstrap, &db.url, &["query"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "query ran unmigrated: {stderr}");
    assert!(
        stderr.contains("migrations not applied") && stderr.contains("orderflow migrate"),
        "{stderr}"
    );
    let migrated = orderflow(&bootstrap, &db.url, &["migrate"]);
    assert!(
        migrated.status.success(),
        "{}",
        String::from_utf8_lossy(&migrated.stderr)
    );
    // The role did not migrate by itself: only `migrate` created the table.
    let live = Db::connect(db.url.as_str(), 1).await.expect("connect");
    let known = live.known_migrations();
    let compatible = live
        .check_schema()
        .await
        .expect("asked")
        .expect("compatible after migrate");
    assert!(compatible.newer.is_empty());

    // The next release migrates (expand), then is rolled back: this release's migration Job
    // runs again and passes over the newer migration, and every role runs on the schema.
    expand_one_release_ahead(&db.url).await;
    let again = orderflow(&bootstrap, &db.url, &["migrate"]);
    assert!(
        again.status.success(),
        "migrate of the older release on a newer schema: {}",
        String::from_utf8_lossy(&again.stderr)
    );
    let compatible = live
        .check_schema()
        .await
        .expect("asked")
        .expect("one release ahead is compatible");
    assert_eq!(compatible.newer.len(), 1, "{compatible:?}");
    assert_eq!(compatible.newer[0].version, NEXT_VERSION);
    assert_eq!(live.known_migrations(), known);

    let running = pipeline::start(&settings, &bootstrap, &Role::ALL)
        .await
        .expect("every role starts on a schema one migration ahead");
    let client = reqwest::Client::new();
    let ingest = format!("http://{}", running.ingest_addr.expect("ingest"));
    let admin = format!("http://{}", running.admin_addr.expect("admin"));
    restock(&client, &admin, &[("SKU-00001", 5)]).await;
    let accepted = place_order(&client, &ingest, &order_json("c-rollout")).await;
    let view = wait_final(
        &client,
        accepted["status_url"].as_str().expect("status url"),
    )
    .await;
    assert_eq!(view["status"], "confirmed", "{view}");
    // The newer column is there, untouched by this release's writes.
    let gift: Option<String> =
        sqlx::query_scalar("SELECT gift_note FROM orders WHERE order_id = $1")
            .bind(accepted["order_id"].as_str().expect("order id"))
            .fetch_one(live.pool())
            .await
            .expect("the projection wrote the order into the expanded table");
    assert_eq!(gift, None);
    running
        .shutdown(Duration::from_secs(30))
        .await
        .expect("shutdown");

    // An edited migration (its checksum differs) is refused by the roles.
    sqlx::query("UPDATE _sqlx_migrations SET checksum = $1 WHERE version = $2")
        .bind(vec![0u8; 4])
        .bind(known[0].version)
        .execute(live.pool())
        .await
        .expect("edit");
    let refused = orderflow(&bootstrap, &db.url, &["query"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        stderr.contains(&known[0].version.to_string()) && stderr.contains("other contents"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_only_check_the_schema_and_run_one_migration_ahead_on_sqlite() {
    let Some(broker) = Broker::embedded() else {
        return;
    };
    rollout(broker, Database::sqlite_unmigrated()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_only_check_the_schema_and_run_one_migration_ahead_on_postgres() {
    let Some(broker) = Broker::embedded() else {
        return;
    };
    let Some(db) = Database::postgres_unmigrated().await else {
        return;
    };
    rollout(broker, db).await;
}
