//! `orderflow dev` on a fresh in-process broker must not keep tables that disagree with its
//! empty log.

use orderflow::embedded::prepare_database_for_fresh_log;
use orderflow_platform::{config::Overrides, Settings};
use orderflow_projections::Database;
use orderflow_testkit::TempDir;

fn settings(overrides: &[(&str, String)]) -> Settings {
    let mut o = Overrides::default();
    for (key, value) in overrides {
        o.set(*key, &format!("{value:?}"));
    }
    Settings::from_defaults(&o).expect("settings")
}

#[tokio::test]
async fn the_default_sqlite_file_of_an_earlier_run_is_moved_aside() {
    let dir = TempDir::new();
    let data = dir.0.join("data");
    let settings = settings(&[("dev.data_dir", data.display().to_string())]);
    assert_eq!(
        prepare_database_for_fresh_log(&settings)
            .await
            .expect("nothing to move"),
        None
    );

    let db = Database::connect(&settings.database_url(), 1)
        .await
        .expect("connect");
    db.migrate().await.expect("migrate");
    db.pool().close().await;
    let moved = prepare_database_for_fresh_log(&settings)
        .await
        .expect("moves")
        .expect("a file was moved");
    assert!(moved.exists());
    assert!(!data.join("orderflow.sqlite").exists());
}

#[tokio::test]
async fn a_configured_database_with_positions_is_refused() {
    let dir = TempDir::new();
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.0.join("shared.sqlite").display()
    );
    let settings = settings(&[("database.url", url.clone())]);
    // Empty: fine.
    assert_eq!(
        prepare_database_for_fresh_log(&settings)
            .await
            .expect("empty is fine"),
        None
    );

    let db = Database::connect(&url, 1).await.expect("connect");
    sqlx::query(
        "INSERT INTO projection_offsets (projection, topic, partition_id, next_offset) \
         VALUES ('orders', 'orders.events', 0, 42)",
    )
    .execute(db.pool())
    .await
    .expect("insert");
    let err = prepare_database_for_fresh_log(&settings)
        .await
        .expect_err("positions of another log");
    assert!(err.to_string().contains("another broker's log"), "{err}");
}
