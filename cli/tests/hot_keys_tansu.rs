//! The hot-key run on a separate broker and a database server: Tansu and PostgreSQL
//! (`hot_keys/mod.rs`).

mod hot_keys;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_five_thousand_orders_on_two_skus_all_confirm() {
    let Some(broker) = orderflow_testkit::Broker::tansu() else {
        return;
    };
    let Some(db) = orderflow_testkit::Database::postgres().await else {
        return;
    };
    hot_keys::hot_keys(broker, db, 25_000).await;
}
