//! Operator commands around the pipeline: `orderflow inventory load FILE` and `orderflow review
//! ORDER`.

use std::{path::Path, sync::Arc, time::Duration};

use anyhow::{bail, Context, Result};
use orderflow_ingest::{commands::restock_events, commands::RestockItem, Publisher};
use orderflow_platform::{config::ClientTlsSettings, kafka::KafkaClients, Settings};
use orderflow_schemas::Codec;
use orderflow_topics::names;

/// Parses a stock file: CSV (`sku,quantity` per line, an optional header line) or a JSON array
/// of `{"sku", "quantity"}`. Errors name the file and the line or item.
pub fn parse_stock_file(path: &Path) -> Result<Vec<RestockItem>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let name = path.display();
    let trimmed = text.trim_start();
    if trimmed.starts_with('[') {
        let mut de = serde_json::Deserializer::from_str(&text);
        return serde_path_to_error::deserialize(&mut de)
            .map_err(|e| anyhow::anyhow!("{name}: item {}: {}", e.path(), e.inner()));
    }
    let mut items = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line_no = n + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split(',').map(str::trim);
        let (Some(sku), Some(quantity), None) = (fields.next(), fields.next(), fields.next())
        else {
            bail!("{name}:{line_no}: expected two fields, sku,quantity; found {line:?}");
        };
        if n == 0 && sku.eq_ignore_ascii_case("sku") {
            continue; // the header
        }
        let quantity: i32 = quantity.parse().with_context(|| {
            format!("{name}:{line_no}: quantity {quantity:?} is not a whole number")
        })?;
        items.push(RestockItem {
            sku: sku.to_owned(),
            quantity,
        });
    }
    Ok(items)
}

/// `orderflow inventory load FILE`: one `InventoryRestocked` per line onto `inventory.commands`,
/// each acknowledged by the broker before the command reports success.
pub async fn load_inventory(settings: &Settings, path: &Path) -> Result<usize> {
    if settings.kafka.brokers.trim().is_empty() {
        bail!("kafka.brokers is not set; inventory load writes to the broker (for `orderflow dev`, POST the file's items to /v1/inventory instead)");
    }
    let items = parse_stock_file(path)?;
    let source = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let events = restock_events(&items, &source).map_err(|errors| {
        let list: Vec<String> = errors
            .iter()
            .map(|e| format!("{}: {} {}", path.display(), e.field, e.message))
            .collect();
        anyhow::anyhow!("{}", list.join("\n"))
    })?;
    let clients = KafkaClients::new(&settings.kafka, &settings.kafka.brokers);
    let codec = Arc::new(Codec::new()?);
    let publisher = Publisher::new(&clients, codec, names::INVENTORY_COMMANDS, None)?;
    for (sku, event) in &events {
        publisher
            .publish_to(names::INVENTORY_COMMANDS, sku, event, None)
            .await
            .with_context(|| format!("publishing the restock of {sku}"))?;
    }
    publisher.flush(Duration::from_secs(5));
    Ok(events.len())
}

/// `orderflow review ORDER DECISION`: posts the decision to a running ingest edge, which checks
/// the order is held for review and publishes it.
pub async fn review(
    url: &str,
    tls: &ClientTlsSettings,
    api_key: Option<&str>,
    order_id: &str,
    decision: &str,
    reviewer: &str,
    note: &str,
) -> Result<String> {
    let client = orderflow_platform::tls::http_client(tls)
        .context("the admin listener's TLS (--ca-file, --cert-file, --key-file)")?
        .timeout(Duration::from_secs(10))
        .build()?;
    let mut request = client
        .post(format!(
            "{}/v1/orders/{order_id}/review",
            url.trim_end_matches('/')
        ))
        .json(&serde_json::json!({"decision": decision, "reviewer": reviewer, "note": note}));
    if let Some(key) = api_key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.map_err(|e| {
        anyhow::anyhow!(
            "reaching the admin listener at {url}: {}",
            orderflow_platform::http::error_chain(&e)
        )
    })?;
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    if !status.is_success() {
        bail!("the admin listener answered {status}: {body}");
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stock_files_parse_as_csv_or_json_and_errors_name_the_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let csv = dir.path().join("stock.csv");
        std::fs::write(&csv, "sku,quantity\nSKU-1, 10\n\n# comment\nSKU-2,5\n").expect("write");
        let items = parse_stock_file(&csv).expect("parses");
        assert_eq!(items.len(), 2);
        assert_eq!((items[1].sku.as_str(), items[1].quantity), ("SKU-2", 5));

        let json = dir.path().join("stock.json");
        std::fs::write(&json, r#"[{"sku": "SKU-1", "quantity": 3}]"#).expect("write");
        assert_eq!(parse_stock_file(&json).expect("parses").len(), 1);

        std::fs::write(&csv, "SKU-1,10\nSKU-2,lots\n").expect("write");
        let err = parse_stock_file(&csv)
            .expect_err("bad quantity")
            .to_string();
        assert!(err.contains("stock.csv:2"), "{err}");

        std::fs::write(&json, r#"[{"sku": "SKU-1", "qty": 3}]"#).expect("write");
        let err = parse_stock_file(&json).expect_err("bad field").to_string();
        assert!(err.contains("stock.json") && err.contains("[0]"), "{err}");
    }
}
