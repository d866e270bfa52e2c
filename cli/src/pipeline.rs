//! Starting and stopping roles together.
//!
//! One root [`CancellationToken`] and a [`Supervisor`] of named tasks: SIGINT/SIGTERM (or a
//! test) cancels the root; every role stops taking work, finishes and commits what it has, and
//! returns. A task that fails, panics or stops on its own cancels the root too, so the process
//! never runs half a pipeline, and the process then exits non-zero naming it (so does a drain
//! that runs past its deadline).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use orderflow_auth::Authenticator;
use orderflow_gateway::{simulator::Simulator, GatewayClient};
use orderflow_ingest::{
    idempotency::IdempotencyStore,
    replays::{ProjectionReplayer, ReplaySummary, Replays},
    IngestMetrics, IngestState, OrderDirectory, OrderLocation, Publisher, RateLimits,
    SharedDirectory,
};
use orderflow_platform::{
    health::{readiness_routes, Readiness},
    http::{edge, health_routes, Server},
    kafka::{KafkaClients, MetadataProbe},
    metrics::{metrics_routes, ConsumerMetrics, HttpMetrics, MetricsRegistry, ProducerMetrics},
    switches::Switches,
    Settings,
};
use orderflow_processors::{saga::rules, ProcessorDeps, ProcessorMetrics, SagaRules};
use orderflow_projections::{
    cache::{listen, ChangeFeed, OrderCache},
    db::Backend,
    inventory::InventoryProjection,
    orders::OrdersProjection,
    query, Database, ProjectionMetrics, ProjectionWriter,
};
use orderflow_schemas::Codec;
use orderflow_topics::names;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::supervisor::Supervisor;

/// The roles; `dev` runs them all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Ingest,
    Process,
    Project,
    Query,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Ingest, Role::Process, Role::Project, Role::Query];
}

/// Every metric family of the binary, registered once per process whatever roles it runs (a
/// role that does not run leaves its families empty). The one place that decides what
/// `/metrics` can show; rules and dashboards are checked against it.
pub struct Metrics {
    pub http: HttpMetrics,
    pub ingest: IngestMetrics,
    pub processors: ProcessorMetrics,
    pub projections: ProjectionMetrics,
    pub producers: ProducerMetrics,
}

impl Metrics {
    pub fn register(registry: &MetricsRegistry) -> Self {
        let consumer = ConsumerMetrics::register(registry);
        Self {
            http: HttpMetrics::register(registry),
            ingest: IngestMetrics::register(registry),
            processors: ProcessorMetrics::register(registry, consumer.clone()),
            projections: ProjectionMetrics::register(registry, consumer),
            producers: ProducerMetrics::register(registry),
        }
    }
}

/// Applies the reloadable parts of a new configuration to running roles: the ingest edge's
/// rate limits, the JWT keys, and the saga's rules (validation, fraud model, deadlines), which
/// are published to the log rather than swapped in memory (`orderflow_processors::saga::rules`).
/// Everything else needs a restart.
#[derive(Clone)]
pub struct Reloader {
    switches: Switches,
    limits: RateLimits,
    query_limits: RateLimits,
    auth: Authenticator,
    rules: Option<RulesPublisher>,
}

impl Reloader {
    pub fn reload(&self, settings: &Settings) {
        self.switches.set(settings);
        self.limits.reload(&settings.ingest.limits());
        self.query_limits.reload(&settings.query.limits());
        match self.auth.reload_jwt(&settings.auth.jwt) {
            Ok(()) => info!("Reloaded the rate limits and the JWT keys."),
            Err(e) => warn!(
                error = %e,
                "Reloaded the rate limits; the JWT keys are not reloaded (the old ones stay)."
            ),
        }
        if let Some(publisher) = &self.rules {
            let publisher = publisher.clone();
            let rules = SagaRules::from_settings(settings);
            tokio::spawn(async move { publisher.publish_if_changed(rules).await });
        }
    }
}

/// Publishes the saga's rules to every `orders.events` partition (a control record each), where
/// they take effect at that position of the log for every replica and every re-run.
#[derive(Clone)]
pub struct RulesPublisher {
    clients: KafkaClients,
    codec: Arc<Codec>,
    /// The rules last published (JSON), to publish a reload only when it changes them.
    last: Arc<std::sync::Mutex<String>>,
}

impl RulesPublisher {
    fn new(clients: KafkaClients, codec: Arc<Codec>) -> Self {
        Self {
            clients,
            codec,
            last: Arc::default(),
        }
    }

    /// Publishes `rules` unless they are the ones published last.
    pub async fn publish_if_changed(&self, rules: SagaRules) {
        let json = rules.to_json();
        if *self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            == json
        {
            return;
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or_default();
        match rules::publish(
            &self.clients,
            &self.codec,
            names::ORDERS_EVENTS,
            &rules,
            now,
        )
        .await
        {
            Ok(partitions) => {
                info!(digest = %rules.digest(), partitions, "Saga rules published; each partition applies them from here on.");
                *self
                    .last
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = json;
            }
            Err(e) => {
                tracing::error!(error = %e, "Publishing the saga rules failed; the partitions keep the rules they have. Send SIGHUP again.");
            }
        }
    }
}

/// The orders projection as the ingest edge's order directory.
struct ProjectedOrders(Database);

impl OrderDirectory for ProjectedOrders {
    fn locate(
        &self,
        order_id: &str,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Option<OrderLocation>, String>> + Send + '_>,
    > {
        let order_id = order_id.to_owned();
        Box::pin(async move {
            orderflow_projections::orders::get(self.0.pool(), &order_id)
                .await
                .map(|row| {
                    row.map(|r| OrderLocation {
                        customer_id: r.customer_id,
                        status: r.status,
                    })
                })
                .map_err(|e| e.to_string())
        })
    }
}

/// `orderflow replay` behind the admin API: the same function, the process's own settings.
struct Replayer {
    db: Database,
    clients: KafkaClients,
    settings: orderflow_platform::config::ProjectionSettings,
}

impl ProjectionReplayer for Replayer {
    fn projections(&self) -> &'static [&'static str] {
        &["orders", "inventory"]
    }

    fn replay(
        &self,
        projection: &str,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<ReplaySummary, String>> + Send + '_>,
    > {
        let projection = projection.to_owned();
        Box::pin(async move {
            use orderflow_projections::{
                inventory::InventoryProjection,
                orders::OrdersProjection,
                replay::{replay, ReplayFrom},
            };
            let report = match projection.as_str() {
                "orders" => {
                    replay(
                        OrdersProjection,
                        &self.db,
                        &self.clients,
                        &self.settings,
                        ReplayFrom::default(),
                    )
                    .await
                }
                "inventory" => {
                    replay(
                        InventoryProjection,
                        &self.db,
                        &self.clients,
                        &self.settings,
                        ReplayFrom::default(),
                    )
                    .await
                }
                other => return Err(format!("no projection {other}")),
            }
            .map_err(|e| e.to_string())?;
            Ok(ReplaySummary {
                records: report.records,
                rows: report.rows,
            })
        })
    }
}

/// A running set of roles.
pub struct Running {
    pub ingest_addr: Option<SocketAddr>,
    pub query_addr: Option<SocketAddr>,
    /// The simulated payment gateway, when this process runs it (no `payment.gateway_url`).
    pub gateway_addr: Option<SocketAddr>,
    /// The admin listener (runs with the ingest edge).
    pub admin_addr: Option<SocketAddr>,
    /// The operations listener: `/metrics`, `/healthz`, `/readyz`.
    pub ops_addr: SocketAddr,
    cancel: CancellationToken,
    tasks: Supervisor,
    /// The operational switches and the edge listeners' rate limits, for reloads.
    switches: Switches,
    limits: RateLimits,
    query_limits: RateLimits,
    /// Publishes the saga's rules on reloads (where processors run).
    rules: Option<RulesPublisher>,
    /// Credentials checks of every listener, for reloads of the JWT keys.
    auth: Authenticator,
    publisher: Option<Publisher>,
    readiness: Readiness,
}

/// The `/readyz` component that holds readiness back while the roles start.
const STARTING: &str = "startup";

/// Starts `roles` against the broker at `bootstrap`.
pub async fn start(settings: &Settings, bootstrap: &str, roles: &[Role]) -> Result<Running> {
    start_with(settings, bootstrap, roles, None).await
}

/// [`start`]; with `shadow`, the process role runs only the shadow of that name of the saga
/// (`orderflow process --shadow NAME`; its topics must exist: [`crate::shadow`]).
pub async fn start_with(
    settings: &Settings,
    bootstrap: &str,
    roles: &[Role],
    shadow: Option<&str>,
) -> Result<Running> {
    let codec = Arc::new(Codec::new().context("compiled-in schemas")?);
    let clients = KafkaClients::new(&settings.kafka, bootstrap);
    let cancel = CancellationToken::new();
    let mut tasks = Supervisor::new(cancel.clone());
    let registry = MetricsRegistry::new();
    let metrics = Metrics::register(&registry);
    let switches = Switches::new(settings, &registry);
    let readiness = Readiness::new();
    // `/readyz` answers from the moment the operations listener is bound; until every role
    // below has registered what it waits for, it must not say ready.
    readiness.set_not_ready(STARTING, "starting");

    // The operations listener, whatever roles run here.
    let ops = Server::bind(
        settings.telemetry.listen,
        metrics_routes(registry.clone())
            .merge(health_routes())
            .merge(readiness_routes(readiness.clone())),
    )
    .await
    .with_context(|| {
        format!(
            "binding the metrics listener to {}",
            settings.telemetry.listen
        )
    })?;
    let ops_addr = ops.local_addr()?;
    {
        let cancel = cancel.clone();
        tasks.spawn("metrics listener", async move {
            ops.run(cancel).await.map_err(anyhow::Error::from)
        });
    }

    // The ingest edge reads the orders projection to route commands on existing orders.
    let needs_db = roles.contains(&Role::Project)
        || roles.contains(&Role::Query)
        || roles.contains(&Role::Ingest);
    let db = if needs_db {
        let db = Database::connect(settings.database_url(), settings.database.max_connections)
            .await
            .context("connecting to the database (database.url)")?;
        // Roles never migrate (`orderflow migrate` does, as a step of its own): they run on a
        // schema that has every migration they know, and on one migration ahead.
        db.require_schema()
            .await
            .context("checking the database schema")?;
        Some(db)
    } else {
        None
    };

    // Credentials: API keys from the database, JWTs as configured.
    let auth = Authenticator::new(&settings.auth, db.clone()).context("auth settings")?;
    if !settings.auth.enabled {
        warn!("Authentication is off (auth.enabled = false): every caller acts as an admin.");
    }

    // The query API alone never talks to the broker; every other role does.
    let broker_for_readiness = roles
        .iter()
        .any(|r| *r != Role::Query)
        .then(|| clients.clone());
    tasks.spawn(
        "dependency watch",
        watch_dependencies(
            broker_for_readiness,
            db.clone(),
            readiness.clone(),
            cancel.clone(),
        ),
    );

    // Rate limits of the two edge listeners (reloaded on SIGHUP); their refilled buckets are
    // dropped every few seconds, so the limiters hold only recent clients.
    let limits = RateLimits::new(&settings.ingest.limits());
    let query_limits = RateLimits::new(&settings.query.limits());
    if roles.contains(&Role::Ingest) || roles.contains(&Role::Query) {
        let (limits, query_limits, cancel) = (limits.clone(), query_limits.clone(), cancel.clone());
        tasks.spawn("rate limit eviction", async move {
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return Ok(()),
                    () = tokio::time::sleep(orderflow_auth::limits::EVICT_INTERVAL) => {
                        limits.retain_recent();
                        query_limits.retain_recent();
                    }
                }
            }
        });
    }

    // Committed projection changes, announced to this process's query cache.
    let changes = ChangeFeed::new();
    let mut query_addr = None;
    if let (true, Some(db)) = (roles.contains(&Role::Query), &db) {
        let cache = OrderCache::new(
            settings.query.cache_capacity,
            Duration::from_millis(settings.query.cache_ttl_ms),
            metrics.projections.cache.clone(),
        );
        tasks.spawn("query cache", {
            let (cache, changes, cancel) = (cache.clone(), changes.clone(), cancel.clone());
            async move {
                cache.follow(changes, cancel).await;
                Ok(())
            }
        });
        // Other processes' projection writers announce their changes through PostgreSQL.
        if db.backend() == Backend::Postgres {
            tasks.spawn("query cache listener", {
                let (url, cache, cancel) = (settings.database_url(), cache.clone(), cancel.clone());
                async move {
                    listen(url, cache, cancel).await;
                    Ok(())
                }
            });
        }
        let http = metrics.http.for_server("query");
        let server = Server::bind_tls(
            settings.query.listen,
            edge(http.layer(query::router(
                db.clone(),
                cache,
                auth.clone(),
                query_limits.clone(),
            ))),
            &settings.query.tls,
        )
        .await
        .with_context(|| format!("binding the query API to {}", settings.query.listen))?;
        query_addr = Some(server.local_addr()?);
        let cancel = cancel.clone();
        tasks.spawn("query API", async move {
            server.run(cancel).await.map_err(anyhow::Error::from)
        });
    }

    let mut ingest_addr = None;
    let mut admin_addr = None;
    let mut publisher = None;
    if roles.contains(&Role::Ingest) {
        let p = Publisher::new(
            &clients,
            codec.clone(),
            names::ORDERS_EVENTS,
            Some(metrics.producers.clone()),
        )
        .context("creating the ingest producer")?;
        let warm = p.clone();
        let warmed =
            tokio::task::spawn_blocking(move || warm.warm_up(Duration::from_secs(10))).await;
        if let Ok(Err(e)) = warmed {
            // Not fatal: requests answer 503 until the broker is reachable.
            warn!(error = %e, "The ingest producer cannot reach the broker yet.");
        }
        let status_base_url = if !settings.ingest.status_base_url.is_empty() {
            settings
                .ingest
                .status_base_url
                .trim_end_matches('/')
                .to_owned()
        } else {
            let scheme = if settings.query.tls.enabled() {
                "https"
            } else {
                "http"
            };
            format!("{scheme}://{}", query_addr.unwrap_or(settings.query.listen))
        };
        let idempotency = db.clone().map(|db| {
            IdempotencyStore::new(
                db,
                Duration::from_secs(settings.ingest.idempotency_ttl_secs),
                Duration::from_millis(settings.ingest.idempotency_wait_ms),
                settings.ingest.max_body_bytes,
            )
        });
        if let Some(store) = idempotency.clone() {
            tasks.spawn(
                "idempotency purge",
                purge_idempotency_keys(store, cancel.clone()),
            );
        }
        let dead_letters = orderflow_deadletters::DeadLetters::new(
            clients.clone(),
            codec.clone(),
            Duration::from_secs(10),
        );
        let state = IngestState {
            switches: switches.clone(),
            auth: auth.clone(),
            idempotency,
            publisher: p.clone(),
            status_base_url,
            metrics: metrics.ingest.clone(),
            max_batch_orders: settings.ingest.max_batch_orders,
            limits: limits.clone(),
            directory: db
                .clone()
                .map(|db| Arc::new(ProjectedOrders(db)) as SharedDirectory),
            orders_topic: names::ORDERS_EVENTS,
            inventory_topic: names::INVENTORY_COMMANDS,
            replays: db.clone().map(|db| {
                Replays::new(Arc::new(Replayer {
                    db,
                    clients: clients.clone(),
                    settings: settings.projection.clone(),
                }))
            }),
            dead_letters: Some(dead_letters.clone()),
        };
        tasks.spawn("dead-letter release", {
            let (dead_letters, cancel) = (dead_letters.clone(), cancel.clone());
            async move {
                orderflow_ingest::deadletters::release_held(
                    dead_letters,
                    orderflow_ingest::deadletters::RELEASE_INTERVAL,
                    cancel,
                )
                .await;
                Ok(())
            }
        });
        tasks.spawn("dead-letter census", {
            let (metrics, cancel) = (metrics.ingest.clone(), cancel.clone());
            async move {
                orderflow_ingest::deadletters::census(
                    dead_letters,
                    metrics,
                    orderflow_ingest::deadletters::CENSUS_INTERVAL,
                    cancel,
                )
                .await;
                Ok(())
            }
        });
        let http = metrics.http.for_server("ingest");
        let admin = edge(
            metrics
                .http
                .for_server("admin")
                .layer(orderflow_ingest::admin_router(
                    state.clone(),
                    settings.ingest.max_body_bytes,
                )),
        );
        let router = edge(http.layer(orderflow_ingest::router(
            state,
            settings.ingest.max_body_bytes,
        )));
        let admin_server = Server::bind_tls(settings.admin.listen, admin, &settings.admin.tls)
            .await
            .with_context(|| format!("binding the admin listener to {}", settings.admin.listen))?;
        admin_addr = Some(admin_server.local_addr()?);
        {
            let cancel = cancel.clone();
            tasks.spawn("admin listener", async move {
                admin_server.run(cancel).await.map_err(anyhow::Error::from)
            });
        }
        let server = Server::bind_tls(settings.ingest.listen, router, &settings.ingest.tls)
            .await
            .with_context(|| format!("binding the ingest edge to {}", settings.ingest.listen))?;
        ingest_addr = Some(server.local_addr()?);
        publisher = Some(p);
        let cancel = cancel.clone();
        tasks.spawn("ingest edge", async move {
            server.run(cancel).await.map_err(anyhow::Error::from)
        });
    }

    let mut rules_publisher = None;
    let mut gateway_addr = None;
    if let (true, Some(name)) = (roles.contains(&Role::Process), shadow) {
        let deps = orderflow_processors::RuntimeDeps {
            clients: clients.clone(),
            codec: codec.clone(),
            metrics: metrics.processors.clone(),
            readiness: Some(readiness.clone()),
        };
        let (task_name, task) = orderflow_processors::shadow_saga(settings, &deps, &cancel, name);
        tasks.spawn(task_name, async move {
            task.await;
            Ok(())
        });
    } else if roles.contains(&Role::Process) {
        // A start is a reload: the configured rules go into the log, where every partition
        // takes them up at this position (a partition without rules adopts them anyway).
        let publisher = RulesPublisher::new(clients.clone(), codec.clone());
        publisher
            .publish_if_changed(SagaRules::from_settings(settings))
            .await;
        rules_publisher = Some(publisher);
        let gateway_url = if settings.payment.gateway_url.trim().is_empty() {
            let simulator = Simulator::bind(&settings.gateway).await.with_context(|| {
                format!(
                    "binding the simulated payment gateway to {}",
                    settings.gateway.listen
                )
            })?;
            let addr = simulator.local_addr()?;
            let url = simulator.base_url()?;
            gateway_addr = Some(addr);
            let cancel = cancel.clone();
            tasks.spawn("simulated gateway", async move {
                simulator.run(cancel).await.map_err(anyhow::Error::from)
            });
            url
        } else {
            settings.payment.gateway_url.clone()
        };
        let gateway = GatewayClient::new(&gateway_url, &settings.payment.tls)
            .context("the payment gateway's client (payment.tls)")?;
        let deps = ProcessorDeps {
            runtime: orderflow_processors::RuntimeDeps {
                clients: clients.clone(),
                codec: codec.clone(),
                metrics: metrics.processors.clone(),
                readiness: Some(readiness.clone()),
            },
            gateway,
            switches: Some(switches.clone()),
        };
        for (name, task) in orderflow_processors::processors(settings, &deps, &cancel) {
            tasks.spawn(name, async move {
                task.await;
                Ok(())
            });
        }
    }

    if let (true, Some(db)) = (roles.contains(&Role::Project), &db) {
        tasks.spawn(
            "partition maintenance",
            maintain_partitions(db.clone(), cancel.clone()),
        );
        let writer = ProjectionWriter::new(
            OrdersProjection,
            db.clone(),
            clients.clone(),
            &settings.projection,
            codec.clone(),
            metrics.projections.clone(),
        )
        .with_readiness(readiness.clone())
        .with_change_feed(changes.clone());
        tasks.spawn("orders projection", {
            let cancel = cancel.clone();
            async move {
                writer.run(cancel).await;
                Ok(())
            }
        });
        let inventory = ProjectionWriter::new(
            InventoryProjection,
            db.clone(),
            clients.clone(),
            &settings.projection,
            codec.clone(),
            metrics.projections.clone(),
        )
        .with_readiness(readiness.clone());
        let cancel = cancel.clone();
        tasks.spawn("inventory projection", async move {
            inventory.run(cancel).await;
            Ok(())
        });
    }

    readiness.set_ready(STARTING);
    Ok(Running {
        admin_addr,
        switches,
        limits,
        query_limits,
        auth,
        rules: rules_publisher,
        gateway_addr,
        ingest_addr,
        query_addr,
        ops_addr,
        cancel,
        tasks,
        publisher,
        readiness,
    })
}

/// How often expired idempotency keys are deleted.
const IDEMPOTENCY_PURGE_INTERVAL: Duration = Duration::from_secs(60);

/// Deletes expired `Idempotency-Key` records every minute, until cancelled.
async fn purge_idempotency_keys(store: IdempotencyStore, cancel: CancellationToken) -> Result<()> {
    loop {
        match store.purge_expired().await {
            Ok(0) => {}
            Ok(n) => info!(deleted = n, "Expired idempotency keys deleted."),
            Err(e) => warn!(error = %e, "Expired idempotency keys not deleted."),
        }
        tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            () = tokio::time::sleep(IDEMPOTENCY_PURGE_INTERVAL) => {}
        }
    }
}

/// How often the history's future partitions are checked (PostgreSQL).
const PARTITION_INTERVAL: Duration = Duration::from_secs(24 * 3600);

/// Keeps `order_events` partitions created for this month and the next three, until cancelled.
async fn maintain_partitions(db: Database, cancel: CancellationToken) -> Result<()> {
    loop {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or_default();
        match db.ensure_event_partitions(now).await {
            Ok(created) if !created.is_empty() => info!(?created, "Created history partitions."),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "Checking history partitions failed; retrying later."),
        }
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(PARTITION_INTERVAL) => {}
        }
    }
}

/// How often the broker and the database are checked for `/readyz`.
const READINESS_INTERVAL: Duration = Duration::from_secs(1);

/// Keeps the `broker` and `database` components of `/readyz` current until cancelled.
async fn watch_dependencies(
    clients: Option<KafkaClients>,
    db: Option<Database>,
    readiness: Readiness,
    cancel: CancellationToken,
) -> Result<()> {
    let probe: Option<Arc<MetadataProbe>> = match clients {
        Some(clients) => Some(Arc::new(
            MetadataProbe::new(&clients).context("creating the readiness metadata client")?,
        )),
        None => None,
    };
    loop {
        if let Some(probe) = &probe {
            let probe = probe.clone();
            let broker = tokio::task::spawn_blocking(move || {
                probe.fetch(READINESS_INTERVAL).map(|m| m.brokers().len())
            })
            .await;
            match broker {
                Ok(Ok(n)) if n > 0 => readiness.set_ready("broker"),
                Ok(Err(reason)) => {
                    readiness.set_not_ready("broker", format!("broker unreachable: {reason}"))
                }
                _ => readiness.set_not_ready("broker", "broker unreachable"),
            }
        }
        if let Some(db) = &db {
            match tokio::time::timeout(READINESS_INTERVAL, db.check_ready()).await {
                Ok(Ok(())) => readiness.set_ready("database"),
                Ok(Err(reason)) => readiness.set_not_ready("database", reason),
                Err(_) => readiness.set_not_ready("database", "database did not answer in time"),
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(READINESS_INTERVAL) => {}
        }
    }
}

impl Running {
    /// A handle that applies new settings' reloadable parts while the roles run.
    pub fn reloader(&self) -> Reloader {
        Reloader {
            switches: self.switches.clone(),
            limits: self.limits.clone(),
            query_limits: self.query_limits.clone(),
            auth: self.auth.clone(),
            rules: self.rules.clone(),
        }
    }

    /// The process's `/readyz` components, for what runs beside the roles (`dev`'s embedded
    /// broker).
    pub fn readiness(&self) -> Readiness {
        self.readiness.clone()
    }

    /// The root token: cancel it to stop everything.
    pub fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Runs until the root is cancelled or a task ends on its own (which cancels the root);
    /// see [`Supervisor::wait`].
    pub async fn wait(&mut self) -> Result<()> {
        self.tasks.wait().await
    }

    /// Cancels and drains every role, each finishing and committing its batch, then flushes
    /// the ingest producer; see [`Supervisor::drain`].
    pub async fn shutdown(mut self, deadline: Duration) -> Result<()> {
        let drained = self.tasks.drain(deadline).await;
        if let Some(publisher) = self.publisher.take() {
            // Bounded, and off the async workers like every blocking client call.
            let _ =
                tokio::task::spawn_blocking(move || publisher.flush(Duration::from_secs(2))).await;
        }
        if drained.is_ok() {
            info!("All roles stopped.");
        }
        drained
    }
}
