//! The hot-key run on the default: the embedded broker and SQLite (`hot_keys/mod.rs`).

mod hot_keys;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_five_thousand_orders_on_two_skus_all_confirm() {
    let Some(broker) = orderflow_testkit::Broker::embedded() else {
        return;
    };
    hot_keys::hot_keys(broker, orderflow_testkit::Database::sqlite(), 25_000).await;
}
