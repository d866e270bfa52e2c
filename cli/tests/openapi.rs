//! The OpenAPI contract of every listener (ingest edge, query API, admin): each serves an
//! OpenAPI 3.1 document at `/openapi.json`; every documented operation is routed, no other
//! method of a documented path is, and no route is registered outside the documented builders;
//! and Schemathesis, run against each served document, finds no `5xx` and no response that
//! differs from the document.

use std::{path::Path, process::Command, time::Duration};

use orderflow::pipeline::{self, Role, Running};
use orderflow_auth::{KeyStore, Role as AuthRole};
use orderflow_projections::Database as Db;
use orderflow_testkit::{apply_topics, test_settings_with, unavailable, Broker, Database};
use serde_json::Value;

struct Listeners {
    running: Running,
    /// (name, base URL)
    urls: Vec<(&'static str, String)>,
}

async fn start(db: &Database, broker: &Broker, auth: bool) -> Listeners {
    let settings = test_settings_with(
        Some(&db.url),
        &[("auth.enabled", if auth { "true" } else { "false" })],
    );
    apply_topics(broker, &settings).await;
    let running = pipeline::start(&settings, &broker.bootstrap(), &[Role::Ingest, Role::Query])
        .await
        .expect("pipeline");
    let urls = vec![
        (
            "ingest",
            format!("http://{}", running.ingest_addr.expect("ingest")),
        ),
        (
            "query",
            format!("http://{}", running.query_addr.expect("query")),
        ),
        (
            "admin",
            format!("http://{}", running.admin_addr.expect("admin")),
        ),
    ];
    Listeners { running, urls }
}

async fn document(client: &reqwest::Client, base: &str) -> Value {
    let response = client
        .get(format!("{base}/openapi.json"))
        .send()
        .await
        .expect("openapi.json");
    assert_eq!(response.status(), 200);
    response.json().await.expect("a JSON document")
}

const METHODS: [&str; 5] = ["get", "post", "put", "delete", "patch"];

/// A concrete path for a templated one.
fn concrete(path: &str) -> String {
    path.replace("{order_id}", "0190a0a0-0000-7000-8000-000000000000")
        .replace("{customer_id}", "c-doc")
        .replace("{sku}", "SKU-DOC")
        .replace("{key_id}", "0000000000000000")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_operation_is_routed_and_nothing_else_is() {
    let Some(broker) = Broker::embedded() else {
        return;
    };
    let db = Database::sqlite();
    let listeners = start(&db, &broker, false).await;
    let client = reqwest::Client::new();
    let mut failures = Vec::new();
    for (name, base) in &listeners.urls {
        let doc = document(&client, base).await;
        assert!(
            doc["openapi"]
                .as_str()
                .is_some_and(|v| v.starts_with("3.1")),
            "{name}: {}",
            doc["openapi"]
        );
        let paths = doc["paths"].as_object().expect("paths");
        assert!(paths.contains_key("/healthz") && paths.contains_key("/openapi.json"));
        for (path, item) in paths {
            let url = format!("{base}{}", concrete(path));
            for method in METHODS {
                let documented = item.get(method).is_some();
                // Every operation that takes a body documents the body limit's answers.
                if let Some(op) = item
                    .get(method)
                    .filter(|op| op.get("requestBody").is_some())
                {
                    for status in ["400", "413"] {
                        if op["responses"].get(status).is_none() {
                            failures.push(format!("{name}: {method} {path} lacks {status}"));
                        }
                    }
                }
                let response = client
                    .request(method.to_uppercase().parse().expect("method"), &url)
                    .header("content-type", "application/json")
                    .body("{}")
                    .send()
                    .await
                    .expect("request");
                let status = response.status().as_u16();
                let body: Value = response.json().await.unwrap_or(Value::Null);
                let unrouted =
                    status == 405 || body["type"] == "urn:orderflow:problem:no-such-route";
                if documented == unrouted {
                    failures.push(format!(
                        "{name}: {method} {path} is {} but answers {status} {body}",
                        if documented {
                            "documented"
                        } else {
                            "not documented"
                        }
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    listeners
        .running
        .shutdown(Duration::from_secs(30))
        .await
        .expect("shutdown");
}

/// Routes exist only through `utoipa_axum::routes!`, which documents them: a plain axum
/// `.route(` in the crates that build the listeners would be a route the documents miss.
#[test]
fn no_route_is_registered_outside_the_documented_builders() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut offenders = Vec::new();
    for dir in ["ingest/src", "projections/src"] {
        for entry in std::fs::read_dir(root.join(dir)).expect("sources") {
            let path = entry.expect("entry").path();
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if text.contains(".route(") {
                offenders.push(path.display().to_string());
            }
        }
    }
    // The two undocumented-by-annotation routes every listener has are added, documented, by
    // `orderflow_platform::openapi::finish` (checked above): /healthz and /openapi.json.
    assert!(offenders.is_empty(), "plain axum routes in {offenders:?}");
}

fn schemathesis() -> Option<String> {
    let bin = std::env::var("SCHEMATHESIS_BIN").unwrap_or_else(|_| "schemathesis".to_owned());
    match Command::new(&bin).arg("--version").output() {
        Ok(out) if out.status.success() => Some(bin),
        _ => unavailable(
            "Schemathesis (pip install schemathesis)",
            &format!("{bin} --version did not run"),
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_and_no_undocumented_response() {
    let Some(bin) = schemathesis() else {
        return;
    };
    let Some(broker) = Broker::embedded() else {
        return;
    };
    let db = Database::sqlite();
    let listeners = start(&db, &broker, true).await;
    let keys = KeyStore::new(
        Db::connect(db.url.as_str(), 2).await.expect("database"),
        Duration::from_secs(5),
    );
    let (_, admin) = keys
        .create("schemathesis", AuthRole::Admin)
        .await
        .expect("key");
    let work = tempfile::tempdir().expect("tempdir");
    let mut failures = Vec::new();
    for (name, base) in &listeners.urls {
        let bin = bin.clone();
        let (document, admin, dir) = (
            format!("{base}/openapi.json"),
            admin.clone(),
            work.path().to_owned(),
        );
        let output = tokio::task::spawn_blocking(move || {
            Command::new(bin)
                .current_dir(dir)
                .args([
                    "run",
                    &document,
                    "--header",
                    &format!("Authorization: Bearer {admin}"),
                    "--checks",
                    "not_a_server_error,status_code_conformance,content_type_conformance,\
                     response_schema_conformance,response_headers_conformance",
                    "--max-examples",
                    "25",
                    "--seed",
                    "1",
                    "--workers",
                    "1",
                    "--generation-database",
                    "none",
                    "--no-color",
                ])
                .output()
        })
        .await
        .expect("join")
        .expect("schemathesis runs");
        let stdout = String::from_utf8_lossy(&output.stdout);
        eprintln!(
            "{name}: {}",
            stdout
                .lines()
                .filter(|l| l.contains("generated"))
                .collect::<Vec<_>>()
                .join(" ")
        );
        if !output.status.success() {
            failures.push(format!(
                "{name} ({base}):\n{stdout}\n{}",
                String::from_utf8_lossy(&output.stderr)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    listeners
        .running
        .shutdown(Duration::from_secs(30))
        .await
        .expect("shutdown");
}
