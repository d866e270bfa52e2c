//! The HTTP edge with authentication on, as production runs it (embedded broker, SQLite):
//! the authorization matrix of every endpoint, JWT attacks, `Idempotency-Key` replay, conflict
//! and concurrent duplicates (and a retry after a 503 writing the same event), and rate limits
//! per principal.

use std::{
    path::PathBuf,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use orderflow::pipeline::{self, Role, Running};
use orderflow_auth::{KeyStore, Role as AuthRole};
use orderflow_platform::Settings;
use orderflow_projections::Database as Db;
use orderflow_testkit::{
    apply_topics, eventually, log::LogReader, order_json, test_settings_with, Broker, Database,
};
use serde_json::{json, Value};

const HS_SECRET: &str = "a-test-secret-of-at-least-32-bytes-long";
const ISSUER: &str = "https://issuer.test";
const AUDIENCE: &str = "orderflow-test";

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../auth/tests/fixtures")
        .join(name)
}

fn settings(db: &Database, extra: &[(&str, &str)]) -> Settings {
    let jwks = format!("{:?}", fixture("jwks.json").display().to_string());
    let secret = format!("{HS_SECRET:?}");
    let issuer = format!("{ISSUER:?}");
    let audience = format!("{AUDIENCE:?}");
    let mut all: Vec<(&str, &str)> = vec![
        ("auth.enabled", "true"),
        ("auth.jwt.hs256_secret", &secret),
        ("auth.jwt.jwks_file", &jwks),
        ("auth.jwt.issuer", &issuer),
        ("auth.jwt.audience", &audience),
    ];
    all.extend_from_slice(extra);
    test_settings_with(Some(&db.url), &all)
}

struct Edge {
    running: Option<Running>,
    ingest: String,
    query: String,
    admin: String,
    keys: KeyStore,
    client: reqwest::Client,
}

impl Edge {
    async fn start(broker: &Broker, db: &Database, extra: &[(&str, &str)]) -> Self {
        let settings = settings(db, extra);
        apply_topics(broker, &settings).await;
        let running = pipeline::start(&settings, &broker.bootstrap(), &[Role::Ingest, Role::Query])
            .await
            .expect("pipeline");
        let database = Db::connect(db.url.as_str(), 2).await.expect("database");
        Self {
            ingest: format!("http://{}", running.ingest_addr.expect("ingest")),
            query: format!("http://{}", running.query_addr.expect("query")),
            admin: format!("http://{}", running.admin_addr.expect("admin")),
            running: Some(running),
            keys: KeyStore::new(database, Duration::from_secs(5)),
            client: reqwest::Client::new(),
        }
    }

    async fn key(&self, role: AuthRole) -> String {
        self.keys
            .create(&format!("test-{role}"), role)
            .await
            .expect("key")
            .1
    }

    async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            running
                .shutdown(Duration::from_secs(30))
                .await
                .expect("shutdown");
        }
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

fn claims(role: &str) -> Value {
    json!({"sub": "svc-1", "role": role, "iss": ISSUER, "aud": AUDIENCE, "exp": now() + 600, "nbf": now() - 10})
}

fn sign(algorithm: Algorithm, kid: Option<&str>, claims: &Value) -> String {
    let key = match algorithm {
        Algorithm::HS256 => EncodingKey::from_secret(HS_SECRET.as_bytes()),
        Algorithm::RS256 => {
            EncodingKey::from_rsa_pem(&std::fs::read(fixture("rsa-private.pem")).expect("rsa"))
                .expect("rsa key")
        }
        Algorithm::ES256 => {
            EncodingKey::from_ec_pem(&std::fs::read(fixture("ec-private.pem")).expect("ec"))
                .expect("ec key")
        }
        other => panic!("{other:?}"),
    };
    let mut header = Header::new(algorithm);
    header.kid = kid.map(str::to_owned);
    encode(&header, claims, &key).expect("sign")
}

/// An endpoint of the matrix and what an allowed caller gets from it.
struct Endpoint {
    base: &'static str,
    method: &'static str,
    path: String,
    body: Option<Value>,
    /// The roles allowed, and the status they get.
    allowed: &'static [AuthRole],
    ok: u16,
}

fn endpoints() -> Vec<Endpoint> {
    use AuthRole::*;
    let unknown = "0190a0a0-0000-7000-8000-000000000000";
    let e = |base, method, path: &str, body: Option<Value>, allowed, ok| Endpoint {
        base,
        method,
        path: path.to_owned(),
        body,
        allowed,
        ok,
    };
    vec![
        e(
            "ingest",
            "POST",
            "/v1/orders",
            Some(order_json("c-m")),
            &[Producer, Admin],
            202,
        ),
        e(
            "ingest",
            "POST",
            "/v1/orders/batch",
            Some(json!([order_json("c-m")])),
            &[Producer, Admin],
            200,
        ),
        e(
            "ingest",
            "POST",
            &format!("/v1/orders/{unknown}/cancel"),
            Some(json!({})),
            &[Producer, Admin],
            404,
        ),
        e(
            "query",
            "GET",
            &format!("/v1/orders/{unknown}"),
            None,
            &[Producer, Reader, Admin],
            404,
        ),
        e(
            "query",
            "GET",
            "/v1/customers/c-m/orders",
            None,
            &[Reader, Admin],
            200,
        ),
        e(
            "query",
            "GET",
            "/v1/analytics/status-counts",
            None,
            &[Reader, Admin],
            200,
        ),
        e(
            "query",
            "GET",
            "/v1/analytics/sales?from=0&to=3600000",
            None,
            &[Reader, Admin],
            200,
        ),
        e(
            "query",
            "GET",
            "/v1/analytics/top-products?from=0&to=3600000",
            None,
            &[Reader, Admin],
            200,
        ),
        e("query", "GET", "/v1/inventory", None, &[Reader, Admin], 200),
        e(
            "query",
            "GET",
            "/v1/inventory/SKU-NONE",
            None,
            &[Reader, Admin],
            404,
        ),
        e(
            "query",
            "GET",
            "/v1/reviews?status=pending",
            None,
            &[Reader, Admin],
            200,
        ),
        e(
            "admin",
            "POST",
            &format!("/v1/orders/{unknown}/review"),
            Some(json!({"decision": "approve", "reviewer": "r"})),
            &[Admin],
            404,
        ),
        e(
            "admin",
            "POST",
            "/v1/inventory",
            Some(json!([{"sku": "SKU-M", "quantity": 1}])),
            &[Admin],
            202,
        ),
        e("admin", "GET", "/v1/keys", None, &[Admin], 200),
        e(
            "admin",
            "POST",
            "/v1/keys",
            Some(json!({"name": "matrix", "role": "reader"})),
            &[Admin],
            201,
        ),
        e(
            "admin",
            "DELETE",
            "/v1/keys/0000000000000000",
            None,
            &[Admin],
            404,
        ),
        e(
            "admin",
            "POST",
            "/v1/projections/nothing/replay",
            None,
            &[Admin],
            404,
        ),
        e(
            "admin",
            "GET",
            "/v1/projections/orders/replay",
            None,
            &[Admin],
            404,
        ),
        e("admin", "GET", "/v1/dead-letters", None, &[Admin], 200),
        e(
            "admin",
            "GET",
            "/v1/dead-letters/orders.events",
            None,
            &[Admin],
            404,
        ),
        e(
            "admin",
            "GET",
            "/v1/dead-letters/orderflow.saga.dlq/0/999999",
            None,
            &[Admin],
            404,
        ),
        e(
            "admin",
            "POST",
            "/v1/dead-letters/orders.events/0/0/redrive",
            None,
            &[Admin],
            404,
        ),
        e(
            "admin",
            "POST",
            "/v1/dead-letters/orders.events/0/0/discard",
            Some(json!({"note": "not a letter"})),
            &[Admin],
            404,
        ),
        e(
            "admin",
            "POST",
            "/v1/dead-letters/orders.events/release",
            None,
            &[Admin],
            404,
        ),
    ]
}

async fn call(edge: &Edge, endpoint: &Endpoint, authorization: Option<&str>) -> (u16, Value) {
    let base = match endpoint.base {
        "ingest" => &edge.ingest,
        "query" => &edge.query,
        _ => &edge.admin,
    };
    let url = format!("{base}{}", endpoint.path);
    let mut request = match endpoint.method {
        "GET" => edge.client.get(&url),
        "POST" => edge.client.post(&url),
        _ => edge.client.delete(&url),
    };
    if let Some(body) = &endpoint.body {
        request = request.json(body);
    }
    if let Some(value) = authorization {
        request = request.header("authorization", value);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    let challenge = response.headers().get("www-authenticate").cloned();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if status == 401 {
        assert!(challenge.is_some(), "401 without WWW-Authenticate: {url}");
    }
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_answers_each_caller_as_its_role_allows() {
    let Some(broker) = Broker::embedded() else {
        return;
    };
    let db = Database::sqlite();
    let edge = Edge::start(&broker, &db, &[]).await;
    let keys = [
        (AuthRole::Producer, edge.key(AuthRole::Producer).await),
        (AuthRole::Reader, edge.key(AuthRole::Reader).await),
        (AuthRole::Admin, edge.key(AuthRole::Admin).await),
    ];
    let revoked = edge.key(AuthRole::Admin).await;
    let revoked_id = revoked.split('_').nth(1).expect("id").to_owned();
    assert!(edge.keys.revoke(&revoked_id).await.expect("revoke"));

    let bad: Vec<(&str, String)> = vec![
        ("no credentials", String::new()),
        (
            "unknown key",
            format!("Bearer ofk_0123456789abcdef_{}", "A".repeat(43)),
        ),
        ("revoked key", format!("Bearer {revoked}")),
        ("not bearer", "Basic dXNlcjpwYXNz".to_owned()),
        ("garbage token", "Bearer not.a.token".to_owned()),
    ];
    let mut failures = Vec::new();
    for endpoint in endpoints() {
        let what = format!("{} {} {}", endpoint.base, endpoint.method, endpoint.path);
        for (name, value) in &bad {
            let auth = (!value.is_empty()).then_some(value.as_str());
            let (status, body) = call(&edge, &endpoint, auth).await;
            if status != 401 || body["type"] != "urn:orderflow:problem:unauthenticated" {
                failures.push(format!("{what} with {name}: {status} {body}"));
            }
        }
        for (role, key) in &keys {
            let bearer = format!("Bearer {key}");
            let (status, body) = call(&edge, &endpoint, Some(&bearer)).await;
            let expected = if endpoint.allowed.contains(role) {
                endpoint.ok
            } else {
                403
            };
            if status != expected {
                failures.push(format!(
                    "{what} as {role}: expected {expected}, got {status} {body}"
                ));
            }
        }
        // A JWT carries its role just as a key does.
        let token = sign(Algorithm::RS256, Some("rsa-1"), &claims("reader"));
        let (status, body) = call(&edge, &endpoint, Some(&format!("Bearer {token}"))).await;
        let expected = if endpoint.allowed.contains(&AuthRole::Reader) {
            endpoint.ok
        } else {
            403
        };
        if status != expected {
            failures.push(format!(
                "{what} as a reader JWT: expected {expected}, got {status} {body}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // The matrix covers every operation each listener documents (and so routes:
    // cli/tests/openapi.rs), apart from the public health and document routes.
    let matrix = endpoints();
    let mut uncovered = Vec::new();
    for (base, url) in [
        ("ingest", &edge.ingest),
        ("query", &edge.query),
        ("admin", &edge.admin),
    ] {
        let document: Value = edge
            .client
            .get(format!("{url}/openapi.json"))
            .send()
            .await
            .expect("openapi.json")
            .json()
            .await
            .expect("a JSON document");
        let paths = document["paths"].as_object().expect("paths");
        for (template, operations) in paths {
            if ["/healthz", "/readyz", "/openapi.json"].contains(&template.as_str()) {
                continue;
            }
            for method in operations.as_object().expect("operations").keys() {
                let covered = matrix.iter().any(|e| {
                    e.base == base
                        && e.method.eq_ignore_ascii_case(method)
                        && matches_template(template, &e.path)
                });
                if !covered {
                    uncovered.push(format!("{base} {method} {template}"));
                }
            }
        }
    }
    assert!(
        uncovered.is_empty(),
        "operations missing from the matrix: {uncovered:?}"
    );
    edge.stop().await;
}

/// Whether a concrete path (query string ignored) is an instance of an OpenAPI path template.
fn matches_template(template: &str, path: &str) -> bool {
    let path = path.split('?').next().unwrap_or_default();
    let (t, p): (Vec<&str>, Vec<&str>) = (template.split('/').collect(), path.split('/').collect());
    t.len() == p.len()
        && t.iter()
            .zip(&p)
            .all(|(t, p)| (t.starts_with('{') && t.ends_with('}') && !p.is_empty()) || t == p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_expired_and_misaddressed_tokens_are_refused() {
    let Some(broker) = Broker::embedded() else {
        return;
    };
    let db = Database::sqlite();
    let edge = Edge::start(&broker, &db, &[]).await;
    let endpoint = Endpoint {
        base: "query",
        method: "GET",
        path: "/v1/customers/c-jwt/orders".to_owned(),
        body: None,
        allowed: &[AuthRole::Reader],
        ok: 200,
    };
    let status_with = |token: String| {
        let edge = &edge;
        let endpoint = &endpoint;
        async move {
            call(edge, endpoint, Some(&format!("Bearer {token}")))
                .await
                .0
        }
    };

    // Each kind of key works when the token is right...
    for (alg, kid) in [
        (Algorithm::HS256, None),
        (Algorithm::RS256, Some("rsa-1")),
        (Algorithm::ES256, Some("ec-1")),
    ] {
        assert_eq!(
            status_with(sign(alg, kid, &claims("reader"))).await,
            200,
            "{alg:?}"
        );
    }

    // ...and every attack is a 401.
    let b64 = |v: &Value| URL_SAFE_NO_PAD.encode(v.to_string());
    let alg_none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&claims("admin"))
    );
    let alg_none_kid = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT", "kid": "rsa-1"})),
        b64(&claims("admin"))
    );
    // HS256 "signed" with the RSA public key, claiming the RSA key's kid: the classic
    // algorithm confusion.
    let public_pem = std::fs::read(fixture("rsa-public.pem")).expect("public key");
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("rsa-1".to_owned());
    let confused = encode(
        &header,
        &claims("admin"),
        &EncodingKey::from_secret(&public_pem),
    )
    .expect("sign");
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("ec-1".to_owned());
    let confused_ec = encode(
        &header,
        &claims("admin"),
        &EncodingKey::from_secret(&public_pem),
    )
    .expect("sign");
    let with = |f: &dyn Fn(&mut Value)| {
        let mut c = claims("reader");
        f(&mut c);
        sign(Algorithm::RS256, Some("rsa-1"), &c)
    };
    let valid = sign(Algorithm::RS256, Some("rsa-1"), &claims("reader"));
    let mut parts: Vec<&str> = valid.split('.').collect();
    let tampered_payload = b64(
        &json!({"sub": "svc-1", "role": "reader", "iss": ISSUER, "aud": AUDIENCE, "exp": now() + 6000, "nbf": now() - 10}),
    );
    parts[1] = &tampered_payload;
    let tampered = parts.join(".");
    let attacks: Vec<(&str, String)> = vec![
        ("alg none", alg_none),
        ("alg none with a kid", alg_none_kid),
        ("HS256 signed with the RSA public key", confused),
        ("HS256 under an EC kid", confused_ec),
        ("expired", with(&|c| c["exp"] = json!(now() - 3600))),
        ("not yet valid", with(&|c| c["nbf"] = json!(now() + 3600))),
        (
            "wrong audience",
            with(&|c| c["aud"] = json!("someone-else")),
        ),
        (
            "wrong issuer",
            with(&|c| c["iss"] = json!("https://evil.test")),
        ),
        (
            "no exp",
            with(&|c| {
                c.as_object_mut().map(|o| o.remove("exp"));
            }),
        ),
        ("unknown role", with(&|c| c["role"] = json!("root"))),
        (
            "unknown kid",
            sign(Algorithm::RS256, Some("rsa-2"), &claims("reader")),
        ),
        ("tampered payload", tampered),
        (
            "HS256 with another secret",
            encode(
                &Header::new(Algorithm::HS256),
                &claims("reader"),
                &EncodingKey::from_secret(b"another-secret-another-secret-00"),
            )
            .expect("sign"),
        ),
    ];
    let mut failures = Vec::new();
    for (name, token) in attacks {
        let status = status_with(token).await;
        if status != 401 {
            failures.push(format!("{name}: {status}"));
        }
    }
    assert!(failures.is_empty(), "accepted attacks: {failures:?}");
    edge.stop().await;
}

async fn post_keyed(
    edge: &Edge,
    token: &str,
    key: &str,
    body: &Value,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let response = edge
        .client
        .post(format!("{}/v1/orders", edge.ingest))
        .bearer_auth(token)
        .header("idempotency-key", key)
        .json(body)
        .send()
        .await
        .expect("post");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    (
        status,
        headers,
        response.json().await.unwrap_or(Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_replays_refuses_a_different_body_and_serialises_duplicates() {
    let broker = Broker::mock();
    let db = Database::sqlite();
    let edge = Edge::start(&broker, &db, &[]).await;
    let producer = edge.key(AuthRole::Producer).await;
    let other_producer = edge.key(AuthRole::Producer).await;

    // Replay: the same answer, the same order, marked as a replay.
    let body = order_json("c-idem");
    let (s1, h1, first) = post_keyed(&edge, &producer, "k-1", &body).await;
    assert_eq!(s1, 202, "{first}");
    assert!(h1.get("idempotent-replayed").is_none());
    let (s2, h2, again) = post_keyed(&edge, &producer, "k-1", &body).await;
    assert_eq!((s2, &again), (202, &first));
    assert_eq!(h2["idempotent-replayed"], "true");
    assert_eq!(h2["location"], h1["location"]);

    // Conflict: the same key with another body.
    let (s3, _, problem) = post_keyed(&edge, &producer, "k-1", &order_json("c-other")).await;
    assert_eq!(s3, 422, "{problem}");
    assert_eq!(
        problem["type"],
        "urn:orderflow:problem:idempotency-key-reused"
    );

    // Keys are per principal: another producer's "k-1" is its own.
    let (s4, _, theirs) = post_keyed(&edge, &other_producer, "k-1", &body).await;
    assert_eq!(s4, 202);
    assert_ne!(theirs["order_id"], first["order_id"]);

    // Concurrent duplicates: one order; every answer is it, or a 409 to retry.
    let body = order_json("c-concurrent");
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (client, url, token, body) = (
            edge.client.clone(),
            format!("{}/v1/orders", edge.ingest),
            producer.clone(),
            body.clone(),
        );
        tasks.spawn(async move {
            let response = client
                .post(url)
                .bearer_auth(token)
                .header("idempotency-key", "k-concurrent")
                .json(&body)
                .send()
                .await
                .expect("post");
            let status = response.status().as_u16();
            (
                status,
                response.json::<Value>().await.unwrap_or(Value::Null),
            )
        });
    }
    let mut ids = std::collections::BTreeSet::new();
    while let Some(joined) = tasks.join_next().await {
        let (status, answer) = joined.expect("task");
        match status {
            202 => {
                ids.insert(answer["order_id"].as_str().expect("id").to_owned());
            }
            409 => assert_eq!(
                answer["type"],
                "urn:orderflow:problem:idempotency-key-in-flight"
            ),
            other => panic!("a duplicate answered {other}: {answer}"),
        }
    }
    assert_eq!(ids.len(), 1, "{ids:?}");
    let concurrent_id = ids.into_iter().next().expect("one id");

    // A 503 is not stored: the retry with the same key publishes the same event (same ids and
    // time), so a write the broker did make before the 503 is not a second order.
    let cluster = broker.as_mock().expect("mock").cluster();
    cluster.broker_down(1).expect("down");
    let body = order_json("c-retry");
    let (status, _, problem) = post_keyed(&edge, &producer, "k-retry", &body).await;
    assert_eq!(status, 503, "{problem}");
    cluster.broker_up(1).expect("up");
    let retried = eventually(Duration::from_secs(30), "a 202 for the retry", || async {
        let (status, _, answer) = post_keyed(&edge, &producer, "k-retry", &body).await;
        (status == 202).then_some(answer)
    })
    .await;
    let retried_id = retried["order_id"].as_str().expect("id").to_owned();

    // The log holds exactly one OrderPlaced for each keyed order, and nothing conflicting.
    let settings = settings(&db, &[]);
    let mut log = LogReader::new(&settings, &broker.bootstrap());
    let first_id = first["order_id"].as_str().expect("id").to_owned();
    log.poll_until(Duration::from_secs(30), "the keyed orders", |l| {
        [&first_id, &concurrent_id, &retried_id]
            .iter()
            .all(|id| l.by_order.contains_key(*id))
    });
    for id in [&first_id, &concurrent_id, &retried_id] {
        assert_eq!(
            log.log.by_order[id].len(),
            1,
            "order {id}: {:?}",
            log.log.by_order[id]
        );
    }
    assert!(log.log.conflicts.is_empty(), "{:?}", log.log.conflicts);
    let placed_id = log.log.by_order[&first_id]
        .keys()
        .next()
        .expect("event")
        .clone();
    assert_eq!(log.log.copies[&placed_id], 1, "a replay wrote again");
    edge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_principal_has_its_own_rate_limit_and_a_reload_changes_it() {
    let Some(broker) = Broker::embedded() else {
        return;
    };
    let db = Database::sqlite();
    let edge = Edge::start(
        &broker,
        &db,
        &[
            ("ingest.rate_limit_per_principal_per_second", "1"),
            ("ingest.rate_limit_principal_burst", "3"),
        ],
    )
    .await;
    let a = edge.key(AuthRole::Producer).await;
    let b = edge.key(AuthRole::Producer).await;
    let post = |token: String| {
        let (client, url) = (edge.client.clone(), format!("{}/v1/orders", edge.ingest));
        async move {
            let response = client
                .post(url)
                .bearer_auth(token)
                .json(&order_json("c-rate"))
                .send()
                .await
                .expect("post");
            let status = response.status().as_u16();
            (status, response.headers().clone())
        }
    };
    let mut remaining = Vec::new();
    for _ in 0..3 {
        let (status, headers) = post(a.clone()).await;
        assert_eq!(status, 202);
        assert_eq!(headers["ratelimit-limit"], "3");
        remaining.push(
            headers["ratelimit-remaining"]
                .to_str()
                .expect("ascii")
                .to_owned(),
        );
    }
    assert_eq!(remaining, ["2", "1", "0"]);
    let (status, headers) = post(a.clone()).await;
    assert_eq!(status, 429);
    let retry_after: u64 = headers["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    // Another principal from the same address is unaffected.
    assert_eq!(post(b.clone()).await.0, 202);
    // A's bucket refills with time (1 request per second).
    eventually(Duration::from_secs(5), "A's bucket to refill", || async {
        (post(a.clone()).await.0 == 202).then_some(())
    })
    .await;

    // A reload without the per-principal limit lifts it.
    let running = edge.running.as_ref().expect("running");
    running.reloader().reload(&settings(&db, &[]));
    for _ in 0..10 {
        let (status, headers) = post(a.clone()).await;
        assert_eq!(status, 202);
        assert!(headers.get("ratelimit-limit").is_none());
    }
    edge.stop().await;
}

/// The query API has per-principal limits of its own (`query.rate_limit_*`): a reader past
/// its burst gets `429` with `Retry-After`, another reader is unaffected, and the ingest edge's
/// limits (none here) do not apply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_query_api_limits_each_principal() {
    let Some(broker) = Broker::embedded() else {
        return;
    };
    let db = Database::sqlite();
    let edge = Edge::start(
        &broker,
        &db,
        &[
            ("query.rate_limit_per_principal_per_second", "1"),
            ("query.rate_limit_principal_burst", "2"),
        ],
    )
    .await;
    let a = edge.key(AuthRole::Reader).await;
    let b = edge.key(AuthRole::Reader).await;
    let get = |token: String| {
        let (client, url) = (
            edge.client.clone(),
            format!("{}/v1/analytics/status-counts", edge.query),
        );
        async move {
            let response = client
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .expect("get");
            (response.status().as_u16(), response.headers().clone())
        }
    };
    for expected in ["1", "0"] {
        let (status, headers) = get(a.clone()).await;
        assert_eq!(status, 200);
        assert_eq!(headers["ratelimit-remaining"], expected);
    }
    let (status, headers) = get(a.clone()).await;
    assert_eq!(status, 429);
    assert!(headers.contains_key("retry-after"));
    assert_eq!(
        get(b.clone()).await.0,
        200,
        "another reader has its own bucket"
    );
    let producer = edge.key(AuthRole::Producer).await;
    for _ in 0..4 {
        let response = edge
            .client
            .post(format!("{}/v1/orders", edge.ingest))
            .bearer_auth(&producer)
            .json(&order_json("c-query-limits"))
            .send()
            .await
            .expect("post");
        assert_eq!(
            response.status().as_u16(),
            202,
            "the ingest edge is not limited"
        );
    }
    edge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_expires_after_its_time() {
    let Some(broker) = Broker::embedded() else {
        return;
    };
    let db = Database::sqlite();
    let edge = Edge::start(&broker, &db, &[("ingest.idempotency_ttl_secs", "1")]).await;
    let producer = edge.key(AuthRole::Producer).await;
    let (status, _, first) = post_keyed(&edge, &producer, "k-ttl", &order_json("c-ttl")).await;
    assert_eq!(status, 202, "{first}");
    // Within its time the key is bound to its first request...
    let (status, _, _) = post_keyed(&edge, &producer, "k-ttl", &order_json("c-other")).await;
    assert_eq!(status, 422);
    // ...and once it expired, the same key is free for a new request: a new order.
    let second = eventually(Duration::from_secs(10), "the key to expire", || async {
        let (status, _, answer) =
            post_keyed(&edge, &producer, "k-ttl", &order_json("c-other")).await;
        (status == 202).then_some(answer)
    })
    .await;
    assert_ne!(second["order_id"], first["order_id"]);
    edge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_keys_rotate_on_a_reload() {
    let Some(broker) = Broker::embedded() else {
        return;
    };
    let db = Database::sqlite();
    // The JWKS in a file of the test's own, which the "operator" rewrites.
    let dir = std::env::temp_dir().join(format!("orderflow-jwks-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("dir");
    let jwks = dir.join("jwks.json");
    let original = std::fs::read_to_string(fixture("jwks.json")).expect("fixture");
    std::fs::write(&jwks, &original).expect("write jwks");
    let jwks_value = format!("{:?}", jwks.display().to_string());
    let extra = [("auth.jwt.jwks_file", jwks_value.as_str())];
    let edge = Edge::start(&broker, &db, &extra).await;
    let reader = sign(Algorithm::RS256, Some("rsa-1"), &claims("reader"));
    let status = |token: String| {
        let (client, url) = (
            edge.client.clone(),
            format!("{}/v1/analytics/status-counts", edge.query),
        );
        async move {
            client
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .expect("get")
                .status()
                .as_u16()
        }
    };
    assert_eq!(status(reader.clone()).await, 200);
    let running = edge.running.as_ref().expect("running");

    // The RSA key is retired: the file keeps only the other keys; a reload applies it.
    let mut document: Value = serde_json::from_str(&original).expect("jwks json");
    document["keys"]
        .as_array_mut()
        .expect("keys")
        .retain(|k| k["kid"] != "rsa-1");
    std::fs::write(&jwks, document.to_string()).expect("rewrite jwks");
    assert_eq!(status(reader.clone()).await, 200, "nothing changes before");
    running.reloader().reload(&settings(&db, &extra));
    assert_eq!(
        status(reader.clone()).await,
        401,
        "the retired key is refused"
    );
    // HS256 (the secret, reloaded too) and ES256 still work.
    assert_eq!(
        status(sign(Algorithm::ES256, Some("ec-1"), &claims("reader"))).await,
        200
    );
    assert_eq!(
        status(sign(Algorithm::HS256, None, &claims("reader"))).await,
        200
    );

    // A file that does not load keeps the keys in use.
    std::fs::write(&jwks, "{not json").expect("break jwks");
    running.reloader().reload(&settings(&db, &extra));
    assert_eq!(
        status(sign(Algorithm::ES256, Some("ec-1"), &claims("reader"))).await,
        200
    );
    // The key is back.
    std::fs::write(&jwks, &original).expect("restore jwks");
    running.reloader().reload(&settings(&db, &extra));
    assert_eq!(status(reader).await, 200);
    edge.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
