//! `orderflow`: one binary, many roles. Subcommands and wiring only; see `lib.rs`.

use std::{path::PathBuf, time::Duration};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use orderflow::{
    dlq,
    embedded::{check_database_matches_log, Broker},
    format_ms,
    loadgen::{self, LoadgenArgs},
    pipeline::{self, Role},
    redact_url, requirements, shadow,
};
use orderflow_auth::{KeyStore, Role as AuthRole};
use orderflow_platform::{config::Overrides, telemetry, Settings};
use orderflow_projections::Database;
use orderflow_topics::{docs::render_markdown, Catalog};
use secrecy::ExposeSecret;
use tracing::info;

/// How long roles get to finish and commit their work on shutdown.
const DRAIN_DEADLINE: Duration = Duration::from_secs(15);

#[derive(Parser)]
#[command(
    name = "orderflow",
    version,
    about = "Event-driven order processing on Kafka"
)]
struct Cli {
    /// Config file (default: ./orderflow.toml if it exists).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Override any config key, e.g. --set kafka.fetch_wait_max_ms=10 (repeatable).
    #[arg(long = "set", global = true, value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Kafka bootstrap servers (kafka.brokers); empty: the embedded broker (dev only).
    #[arg(long, global = true, value_name = "HOSTS")]
    kafka_brokers: Option<String>,
    /// Database URL (database.url): sqlite://PATH or postgres://...
    #[arg(long, global = true, value_name = "URL")]
    database_url: Option<String>,
    /// Log format (telemetry.format): human or json.
    #[arg(long, global = true, value_name = "FORMAT")]
    log_format: Option<String>,
    /// Ingest listen address (ingest.listen).
    #[arg(long, global = true, value_name = "ADDR")]
    ingest_listen: Option<String>,
    /// Query API listen address (query.listen).
    #[arg(long, global = true, value_name = "ADDR")]
    query_listen: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every role in one process; with no broker configured, on the embedded broker (its
    /// log in ./data/broker) and a SQLite file under ./data. A restart carries on from both.
    Dev,
    /// Run the ingest edge (HTTP → orders.events).
    Ingest,
    /// Run the processors (the order saga).
    Process {
        /// Run only a shadow of the saga named NAME: the live input under its own consumer
        /// group, outputs to NAME.-prefixed topics (created if missing), no payment calls;
        /// compare with `orderflow shadow diff NAME` (docs/runbooks/deploy.md, "Canaries").
        #[arg(long, value_name = "NAME")]
        shadow: Option<String>,
    },
    /// Shadow runs of the saga.
    Shadow {
        #[command(subcommand)]
        command: ShadowCommand,
    },
    /// Run the projection writers.
    Project,
    /// Run the query API.
    Query,
    /// Topic catalog commands.
    Topics {
        #[command(subcommand)]
        command: TopicsCommand,
    },
    /// Configuration commands.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Apply the database migrations.
    Migrate,
    /// Post random orders to a running instance and report what became of them.
    Loadgen(LoadgenArgs),
    /// Check the tables against the event log; exit 1 naming every breach.
    Reconcile {
        /// How long an order may stay in flight before it is a breach, seconds.
        #[arg(long, default_value_t = 300)]
        slo_secs: u64,
    },
    /// Rebuild a projection's tables from the beginning of the log into fresh tables and swap
    /// them in atomically, while the pipeline and the queries keep running.
    Replay {
        #[arg(value_enum)]
        projection: ProjectionName,
        /// Fold the whole log, not the latest snapshot plus the records after it (after a
        /// change to the projection's fold: a snapshot holds the old fold's rows).
        #[arg(long)]
        from_beginning: bool,
    },
    /// Take a snapshot of a projection (its tables and positions, copied consistently while it
    /// runs): later replays fold only the log after it, and still work once the log before it
    /// is deleted. Keeps the latest one.
    Snapshot {
        #[arg(value_enum)]
        projection: ProjectionName,
    },
    /// Back up the event log, the changelogs, the consumer groups' offsets and the database
    /// into DIR, consistently while the pipeline runs. A directory holding earlier backups gets
    /// an incremental set (from their ends). docs/runbooks/backup-restore.md.
    Backup {
        dir: PathBuf,
        /// A full set even when DIR holds earlier ones (starts a new chain).
        #[arg(long)]
        full: bool,
    },
    /// Restore the backup in DIR into an empty cluster and database, offsets and positions
    /// mapped; with no broker configured, into the embedded broker's data directory. The
    /// pipeline must not run meanwhile.
    Restore {
        dir: PathBuf,
        /// Restore even though topics hold records (appended after them) or the database is
        /// not empty (replaced).
        #[arg(long)]
        force: bool,
    },
    /// Run the embedded broker on its own (Tansu with SQLite storage, its log on disk), with
    /// the topic catalog applied, and print its address first.
    Broker {
        /// Directory of the log (default: dev.data_dir/broker). A restart on the same directory
        /// serves the same log.
        #[arg(long, value_name = "DIR")]
        data: Option<PathBuf>,
        /// Only install the broker if it is missing (a first run builds it), print the binary's
        /// path and exit.
        #[arg(long)]
        install_only: bool,
    },
    /// Run the simulated payment gateway on its own (gateway.listen).
    Gateway,
    /// Stock commands.
    Inventory {
        #[command(subcommand)]
        command: InventoryCommand,
    },
    /// Dead letters: list them, show one, redrive one onto its source topic (as it was or
    /// corrected) or discard it. docs/runbooks/dead-letters.md.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// API keys: create (the key is printed once), list, revoke.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Decide an order held for fraud review, through a running admin listener.
    Review {
        order_id: String,
        /// approve or reject
        #[arg(value_parser = ["approve", "reject"])]
        decision: String,
        /// Who decided (recorded in the event).
        #[arg(long)]
        reviewer: String,
        #[arg(long, default_value = "")]
        note: String,
        /// Base URL of the admin listener.
        #[arg(long, default_value = "http://127.0.0.1:8083")]
        url: String,
        /// An admin API key or token (sent as a bearer token).
        #[arg(long, env = "ADMIN_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
        /// For an https URL: PEM CAs to trust instead of the Mozilla roots (a private CA).
        #[arg(long, env = "ADMIN_CA_FILE", default_value = "")]
        ca_file: String,
        /// Client certificate (PEM) for an admin listener that requires mutual TLS.
        #[arg(
            long,
            env = "ADMIN_CERT_FILE",
            default_value = "",
            requires = "key_file"
        )]
        cert_file: String,
        /// The client certificate's private key (PEM).
        #[arg(
            long,
            env = "ADMIN_KEY_FILE",
            default_value = "",
            requires = "cert_file"
        )]
        key_file: String,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// With no TOPIC, each dead-letter topic's pending and resolved counts; with one, its
    /// pending letters (--all: the resolved ones too).
    List {
        topic: Option<String>,
        #[arg(long)]
        all: bool,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One letter in full: reason, consumer, source, key, headers, the event decoded.
    Show {
        topic: String,
        /// PARTITION/OFFSET, as `list` shows it.
        letter: String,
        /// JSON: the document `redrive --from` takes back, once its `event` is corrected.
        #[arg(long)]
        json: bool,
    },
    /// Put back the held letters whose earlier letters are all resolved, in their order (the
    /// admin listener does this by itself every few seconds; redrive and discard do it for
    /// their chain).
    Release {
        /// One dead-letter topic; default: all of them.
        topic: Option<String>,
    },
    /// Put a letter back on its source topic with a new event id derived from the original
    /// and a `redriven.from` header naming the letter. A letter of a parked key must be the
    /// first unresolved one of its chain; the held letters behind it follow it.
    Redrive {
        topic: String,
        /// PARTITION/OFFSET.
        letter: String,
        /// The corrected event: JSON with `event_type` and `event` (what `show --json`
        /// writes). Needed when the letter's value does not decode.
        #[arg(long, value_name = "FILE")]
        from: Option<PathBuf>,
        /// Who is resolving (default: $USER).
        #[arg(long)]
        by: Option<String>,
    },
    /// Park a letter for good, saying why.
    Discard {
        topic: String,
        /// PARTITION/OFFSET.
        letter: String,
        #[arg(long)]
        note: String,
        /// Who is resolving (default: $USER).
        #[arg(long)]
        by: Option<String>,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a key and print it (only its hash is stored: it cannot be shown again).
    Create {
        /// Who or what the key is for, e.g. shop-berlin.
        #[arg(long)]
        name: String,
        /// producer, reader or admin
        #[arg(long, value_parser = ["producer", "reader", "admin"])]
        role: String,
    },
    /// List every key (never its secret), revoked ones too.
    List,
    /// Revoke a key by id; it stops working within auth.key_cache_ttl_ms.
    Revoke { id: String },
}

/// The projections `replay` can rebuild.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum ProjectionName {
    /// orders, order_lines, order_events, customer_stats, customer_spend,
    /// sales_per_product_hour, fraud_reviews
    Orders,
    /// inventory_movements, inventory_levels
    Inventory,
}

#[derive(Subcommand)]
enum InventoryCommand {
    /// Publish restocks from a CSV (sku,quantity) or JSON ([{"sku","quantity"}]) file.
    Load { file: PathBuf },
}

#[derive(Subcommand)]
enum ShadowCommand {
    /// Compare the shadow's timeline with the live saga's by event id, for every order the
    /// shadow has consumed whole: the same id with other bytes, missing, or extra. Exit 1 when
    /// anything differs.
    Diff { name: String },
}

#[derive(Subcommand)]
enum TopicsCommand {
    /// Create missing topics; report drift (exit code 3) without changing existing topics.
    Apply {
        /// Report drift but exit 0: for deployment Jobs, where drift is a finding for an
        /// operator (docs/runbooks/deploy.md) and a retry cannot resolve it.
        #[arg(long)]
        drift_ok: bool,
    },
    /// Render the topic documentation from the catalog.
    Docs {
        /// Write here instead of standard output.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Fail if FILE differs from the rendering (for CI).
        #[arg(long, requires = "out")]
        check: bool,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the effective configuration, secrets redacted.
    Show,
    /// Validate the effective configuration (file, environment, --set, secret files); with
    /// --role, also that it has everything that role needs, naming every key it lacks.
    Check {
        #[arg(long, value_enum)]
        role: Option<RoleName>,
    },
}

/// A role, as `config check --role` names it.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum RoleName {
    Ingest,
    Process,
    Project,
    Query,
}

impl From<RoleName> for Role {
    fn from(name: RoleName) -> Self {
        match name {
            RoleName::Ingest => Role::Ingest,
            RoleName::Process => Role::Process,
            RoleName::Project => Role::Project,
            RoleName::Query => Role::Query,
        }
    }
}

impl Cli {
    fn overrides(&self) -> Result<Overrides> {
        let mut overrides = Overrides::default();
        for pair in &self.set {
            overrides.set_pair(pair)?;
        }
        // Strings stay strings: these flags never go through TOML parsing.
        let named = [
            ("kafka.brokers", &self.kafka_brokers),
            ("database.url", &self.database_url),
            ("telemetry.format", &self.log_format),
            ("ingest.listen", &self.ingest_listen),
            ("query.listen", &self.query_listen),
        ];
        for (key, value) in named {
            if let Some(value) = value {
                overrides.set(key, &format!("{value:?}"));
            }
        }
        Ok(overrides)
    }
}

/// How long the exit waits for blocking calls still running once the work is done (a
/// librdkafka call stuck on an unreachable broker must not hold the process).
const EXIT_GRACE: Duration = Duration::from_secs(5);

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async {
        match run(cli).await {
            Ok(code) => code,
            Err(e) => {
                eprintln!("error: {e:#}");
                std::process::ExitCode::FAILURE
            }
        }
    });
    // Every role has drained (or been reported as stuck) by now; what still runs is blocking
    // work nobody waits for.
    runtime.shutdown_timeout(EXIT_GRACE);
    code
}

async fn run(cli: Cli) -> Result<std::process::ExitCode> {
    let overrides = cli.overrides()?;
    let settings = Settings::load(cli.config.as_deref(), &overrides)?;
    // SIGHUP reloads with the same layers: the file and environment as they are then.
    let config_file = cli.config.clone();
    // An edit of these files is a reload too (a ConfigMap mounted as a file changes under a
    // running pod; nothing sends it a signal).
    let mut watched: Vec<PathBuf> = cli
        .config
        .clone()
        .or_else(|| {
            std::path::Path::new(orderflow_platform::config::DEFAULT_CONFIG_FILE)
                .exists()
                .then(|| PathBuf::from(orderflow_platform::config::DEFAULT_CONFIG_FILE))
        })
        .into_iter()
        .collect();
    if !settings.auth.jwt.jwks_file.is_empty() {
        watched.push(PathBuf::from(&settings.auth.jwt.jwks_file));
    }
    let reload = Reload {
        load: Box::new(move || Settings::load(config_file.as_deref(), &overrides)),
        watched,
    };
    let _telemetry = telemetry::init(&settings.telemetry)?;
    match cli.command {
        Command::Dev => dev(&settings, reload).await?,
        Command::Ingest => role(&settings, Role::Ingest, reload).await?,
        Command::Process { shadow: None } => role(&settings, Role::Process, reload).await?,
        Command::Process { shadow: Some(name) } => shadow_role(&settings, &name, reload).await?,
        Command::Shadow {
            command: ShadowCommand::Diff { name },
        } => {
            if settings.kafka.brokers.trim().is_empty() {
                bail!(
                    "kafka.brokers is not set; shadow diff reads the live and the shadow's topics"
                );
            }
            let report = tokio::task::spawn_blocking(move || shadow::diff(&settings, &name))
                .await
                .context("shadow diff")??;
            print!("{report}");
            if !report.is_clean() {
                return Ok(std::process::ExitCode::FAILURE);
            }
        }
        Command::Project => role(&settings, Role::Project, reload).await?,
        Command::Query => role(&settings, Role::Query, reload).await?,
        Command::Topics { command } => return topics(&settings, command).await,
        Command::Config {
            command: ConfigCommand::Show,
        } => print!("{}", settings.to_toml()),
        Command::Config {
            command: ConfigCommand::Check { role },
        } => match role.map(Role::from) {
            // Loading validated everything every command needs.
            None => println!("configuration is valid"),
            Some(role) => {
                requirements::check(&settings, role)?;
                println!("configuration is valid and complete for the {role} role");
            }
        },
        Command::Migrate => {
            let (applied, created) = migrate(&settings).await?;
            println!(
                "migrations applied: {applied} in all; history partitions created: {created:?}"
            );
        }
        Command::Reconcile { slo_secs } => {
            if settings.kafka.brokers.trim().is_empty() {
                bail!("kafka.brokers is not set; reconcile reads the event log from the broker");
            }
            let db = Database::connect(settings.database_url(), 2).await?;
            let clients = orderflow_platform::kafka::KafkaClients::new(
                &settings.kafka,
                &settings.kafka.brokers,
            );
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or_default();
            let report = orderflow_projections::reconcile::reconcile(
                &db,
                &clients,
                orderflow_topics::names::ORDERS_EVENTS,
                Duration::from_secs(slo_secs),
                now,
            )
            .await?;
            print!("{report}");
            if !report.is_clean() {
                return Ok(std::process::ExitCode::FAILURE);
            }
        }
        Command::Snapshot { projection } => {
            let db = Database::connect(settings.database_url(), 2).await?;
            db.require_schema()
                .await
                .context("checking the database schema")?;
            use orderflow_projections::{
                inventory::InventoryProjection, orders::OrdersProjection, replay::take_snapshot,
            };
            let snapshot = match projection {
                ProjectionName::Orders => take_snapshot(&OrdersProjection, &db).await?,
                ProjectionName::Inventory => take_snapshot(&InventoryProjection, &db).await?,
            };
            print!("{snapshot}");
        }
        Command::Replay {
            projection,
            from_beginning,
        } => {
            let from = if from_beginning {
                orderflow_projections::replay::ReplayFrom::Beginning
            } else {
                orderflow_projections::replay::ReplayFrom::LatestSnapshot
            };
            if settings.kafka.brokers.trim().is_empty() {
                bail!("kafka.brokers is not set; replay reads the event log from the broker");
            }
            let db = Database::connect(settings.database_url(), 2).await?;
            db.require_schema()
                .await
                .context("checking the database schema")?;
            let clients = orderflow_platform::kafka::KafkaClients::new(
                &settings.kafka,
                &settings.kafka.brokers,
            );
            use orderflow_projections::{
                inventory::InventoryProjection, orders::OrdersProjection, replay::replay,
            };
            let report = match projection {
                ProjectionName::Orders => {
                    replay(OrdersProjection, &db, &clients, &settings.projection, from).await?
                }
                ProjectionName::Inventory => {
                    replay(
                        InventoryProjection,
                        &db,
                        &clients,
                        &settings.projection,
                        from,
                    )
                    .await?
                }
            };
            print!("{report}");
        }
        Command::Backup { dir, full } => {
            orderflow::backup::backup(&settings, &dir, orderflow_backup::BackupOptions { full })
                .await?
        }
        Command::Restore { dir, force } => {
            orderflow::backup::restore(&settings, &dir, orderflow_backup::RestoreOptions { force })
                .await?
        }
        Command::Broker { data, install_only } => broker(&settings, data, install_only).await?,
        Command::Gateway => {
            let simulator = orderflow_gateway::simulator::Simulator::bind(&settings.gateway)
                .await
                .with_context(|| format!("binding {}", settings.gateway.listen))?;
            println!("simulated payment gateway: {}", simulator.base_url()?);
            let cancel = tokio_util::sync::CancellationToken::new();
            let stop = cancel.clone();
            tokio::spawn(async move {
                shutdown_signal().await;
                stop.cancel();
            });
            simulator.run(cancel).await?;
        }
        Command::Inventory {
            command: InventoryCommand::Load { file },
        } => {
            let n = orderflow::admin::load_inventory(&settings, &file).await?;
            println!("{n} restocks published from {}", file.display());
        }
        Command::Dlq { command } => {
            let dead_letters = dlq::connect(&settings)?;
            match command {
                DlqCommand::List { topic, all, json } => {
                    dlq::list(&dead_letters, topic.as_deref(), all, json).await?
                }
                DlqCommand::Show {
                    topic,
                    letter,
                    json,
                } => dlq::show(&dead_letters, &topic, &letter, json).await?,
                DlqCommand::Redrive {
                    topic,
                    letter,
                    from,
                    by,
                } => {
                    dlq::redrive(
                        &dead_letters,
                        &topic,
                        &letter,
                        from.as_deref(),
                        &dlq::who(by),
                    )
                    .await?
                }
                DlqCommand::Discard {
                    topic,
                    letter,
                    note,
                    by,
                } => dlq::discard(&dead_letters, &topic, &letter, &note, &dlq::who(by)).await?,
                DlqCommand::Release { topic } => {
                    dlq::release(&dead_letters, topic.as_deref()).await?
                }
            }
        }
        Command::Keys { command } => {
            let keys = key_store(&settings).await?;
            match command {
                KeysCommand::Create { name, role } => {
                    let role: AuthRole = role.parse().map_err(anyhow::Error::msg)?;
                    let name = name.trim();
                    if name.is_empty() {
                        bail!("--name: expected a non-empty name");
                    }
                    let (key, token) = keys.create(name, role).await?;
                    println!("{token}");
                    eprintln!(
                        "created key {} ({}, role {}); the line above is the key, shown only now",
                        key.id, key.name, key.role
                    );
                }
                KeysCommand::List => {
                    println!(
                        "{:<16}  {:<8}  {:<24}  {:<8}  name",
                        "id", "role", "created", "state"
                    );
                    for key in keys.list().await? {
                        println!(
                            "{:<16}  {:<8}  {:<24}  {:<8}  {}",
                            key.id,
                            key.role,
                            format_ms(key.created_at),
                            if key.revoked_at.is_some() {
                                "revoked"
                            } else {
                                "active"
                            },
                            key.name
                        );
                    }
                }
                KeysCommand::Revoke { id } => {
                    if !keys.revoke(&id).await? {
                        bail!("no active key with id {id} (orderflow keys list shows them)");
                    }
                    println!("revoked {id}");
                }
            }
        }
        Command::Review {
            order_id,
            decision,
            reviewer,
            note,
            url,
            api_key,
            ca_file,
            cert_file,
            key_file,
        } => {
            let tls = orderflow_platform::config::ClientTlsSettings {
                ca_file,
                cert_file,
                key_file,
            };
            let answer = orderflow::admin::review(
                &url,
                &tls,
                api_key.as_deref(),
                &order_id,
                &decision,
                &reviewer,
                &note,
            )
            .await?;
            println!("{answer}");
        }
        Command::Loadgen(args) => {
            let report = loadgen::run(&args).await?;
            println!("{report}");
            if report.accepted == 0 || report.not_final > 0 {
                return Ok(std::process::ExitCode::FAILURE);
            }
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// Re-reads the configuration (SIGHUP).
/// How a running role re-reads its configuration: on SIGHUP, and when a watched file changes.
struct Reload {
    load: Box<dyn Fn() -> Result<Settings, orderflow_platform::ConfigError> + Send + Sync>,
    /// The config file and the JWKS file, polled every [`WATCH_INTERVAL`].
    watched: Vec<PathBuf>,
}

/// How often watched configuration files are read for changes. A ConfigMap edit reaches a pod
/// within the kubelet's sync period (about a minute); this adds at most two seconds.
const WATCH_INTERVAL: Duration = Duration::from_secs(2);

async fn dev(settings: &Settings, reload: Reload) -> Result<()> {
    let broker = Broker::from_settings(settings)?;
    let settings = &broker.client_settings(settings);
    // `dev` is its own operator: it migrates before its roles start (they only check).
    migrate(settings).await?;
    if broker.is_embedded() {
        check_database_matches_log(settings, &broker.bootstrap()).await?;
    }
    let report = broker.apply_topics(settings).await?;
    if report.has_drift() {
        eprint!("warning: topics differ from the catalog:\n{report}");
    }
    let mut running = pipeline::start(settings, &broker.bootstrap(), &Role::ALL).await?;
    broker.report_on(&running.readiness());
    if broker.is_embedded() {
        tokio::spawn(orderflow::embedded::watch_free_space(
            settings.dev.data_dir.clone(),
            running.readiness(),
            running.cancel_token(),
        ));
    }
    println!("orderflow dev is running");
    println!(
        "  broker      {}{}",
        broker.bootstrap(),
        if broker.is_embedded() {
            format!(
                " (embedded, log in {})",
                settings.dev.broker_dir().display()
            )
        } else {
            String::new()
        }
    );
    println!(
        "  database    {}",
        redact_url(settings.database_url().expose_secret())
    );
    let scheme = |tls: &orderflow_platform::config::TlsSettings| {
        if tls.enabled() {
            "https"
        } else {
            "http"
        }
    };
    if let Some(addr) = running.ingest_addr {
        let s = scheme(&settings.ingest.tls);
        println!("  ingest      {s}://{addr}/v1/orders");
    }
    if let Some(addr) = running.query_addr {
        let s = scheme(&settings.query.tls);
        println!("  query       {s}://{addr}/v1/orders/{{order_id}}");
    }
    if let Some(addr) = running.admin_addr {
        let s = scheme(&settings.admin.tls);
        println!("  admin       {s}://{addr}/v1/keys");
    }
    if let Some(addr) = running.gateway_addr {
        println!("  gateway     http://{addr} (simulated)");
    }
    if settings.auth.enabled {
        for (role, token) in dev_keys(settings).await? {
            println!("  api key     {role} {token}");
        }
    } else {
        println!("  auth        off (auth.enabled = false): no credentials needed");
    }
    println!("  metrics     http://{}/metrics", running.ops_addr);
    println!("Press Ctrl-C to stop.");
    let served = serve_until_signal(&mut running, reload).await;
    // The others drain either way; a role's failure is the error to exit with.
    let drained = running.shutdown(DRAIN_DEADLINE).await;
    served.and(drained)
}

/// `dev` on a database without API keys creates one per role and returns them, to print once
/// (on its first run: the database keeps them, and later runs say so).
async fn dev_keys(settings: &Settings) -> Result<Vec<(AuthRole, String)>> {
    let keys = key_store(settings).await?;
    if keys.list().await?.iter().any(|k| k.revoked_at.is_none()) {
        println!("  api keys    this database has keys already: orderflow keys list");
        return Ok(Vec::new());
    }
    let mut created = Vec::new();
    for role in AuthRole::ALL {
        let (_, token) = keys.create(&format!("dev-{role}"), role).await?;
        created.push((role, token));
    }
    Ok(created)
}

/// `orderflow migrate` (and the first step of `dev`): applies this release's migrations and
/// creates the history partitions of the coming months. Returns how many migrations the
/// database has and the partitions created.
async fn migrate(settings: &Settings) -> Result<(usize, Vec<String>)> {
    let db = Database::connect(settings.database_url(), 1)
        .await
        .context("connecting to the database (database.url)")?;
    db.migrate()
        .await
        .context("applying the database migrations")?;
    let compatible = db
        .require_schema()
        .await
        .context("checking the database schema")?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default();
    let created = db.ensure_event_partitions(now).await?;
    db.pool().close().await;
    Ok((
        db.known_migrations().len() + compatible.newer.len(),
        created,
    ))
}

async fn key_store(settings: &Settings) -> Result<KeyStore> {
    let db = Database::connect(settings.database_url(), 2)
        .await
        .context("connecting to the database (database.url)")?;
    db.require_schema()
        .await
        .context("checking the database schema")?;
    Ok(KeyStore::new(
        db,
        Duration::from_millis(settings.auth.key_cache_ttl_ms),
    ))
}

/// `orderflow broker`: the embedded broker alone, until Ctrl-C.
async fn broker(settings: &Settings, data: Option<PathBuf>, install_only: bool) -> Result<()> {
    if install_only {
        let binary = orderflow_broker::install::resolve(
            None,
            orderflow_broker::Install::IfMissing,
            |command| eprintln!("Installing the embedded broker: {command}"),
        )?;
        println!("{}", binary.display());
        return Ok(());
    }
    let mut settings = settings.clone();
    settings.kafka.brokers = String::new();
    if let Some(dir) = data {
        settings.dev.broker_data = dir.display().to_string();
    }
    let broker = Broker::from_settings(&settings)?;
    broker.apply_topics(&settings).await?;
    // The first line is the address, for scripts (and tests) to read.
    println!("{}", broker.bootstrap());
    println!(
        "embedded broker running with the topic catalog applied, its log in {}; Ctrl-C stops it",
        settings.dev.broker_dir().display()
    );
    shutdown_signal().await;
    Ok(())
}

async fn role(settings: &Settings, role: Role, reload: Reload) -> Result<()> {
    requirements::check(settings, role)?;
    let mut running = pipeline::start(settings, &settings.kafka.brokers, &[role]).await?;
    if let Some(addr) = running.ingest_addr.or(running.query_addr) {
        info!(%addr, "Listening.");
    }
    let served = serve_until_signal(&mut running, reload).await;
    // The others drain either way; a role's failure is the error to exit with.
    let drained = running.shutdown(DRAIN_DEADLINE).await;
    served.and(drained)
}

/// `orderflow process --shadow NAME`: the shadow saga alone (crate docs of [`shadow`]).
async fn shadow_role(settings: &Settings, name: &str, reload: Reload) -> Result<()> {
    // What the process role needs but the payment gateway: a shadow calls no one.
    let missing: Vec<_> = requirements::missing(settings, Role::Process)
        .into_iter()
        .filter(|m| m.key != "payment.gateway_url")
        .collect();
    if let Some(first) = missing.first() {
        bail!("the shadow's configuration is incomplete: {first}");
    }
    shadow::create_topics(settings, name).await?;
    let mut running = pipeline::start_with(
        settings,
        &settings.kafka.brokers,
        &[Role::Process],
        Some(name),
    )
    .await?;
    info!(shadow = name, "Shadow saga running.");
    let served = serve_until_signal(&mut running, reload).await;
    let drained = running.shutdown(DRAIN_DEADLINE).await;
    served.and(drained)
}

/// Waits for SIGINT/SIGTERM (then cancels) or for a role to stop on its own; SIGHUP, or an
/// edit of a watched file, re-reads the configuration and applies what can change without a
/// restart (an invalid one is logged and the running one kept).
async fn serve_until_signal(running: &mut pipeline::Running, reload: Reload) -> Result<()> {
    let reloader = running.reloader();
    let cancel = running.cancel_token();
    let Reload { load, watched } = reload;
    let apply = move |why: &str| match load() {
        Ok(settings) => {
            info!(trigger = why, "Configuration re-read.");
            reloader.reload(&settings);
        }
        Err(e) => {
            tracing::warn!(trigger = why, error = %e, "Configuration not reloaded: it is invalid; the running one stays.")
        }
    };
    tokio::spawn(async move {
        #[cfg(unix)]
        let mut hangups =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let read = |paths: &[PathBuf]| -> Vec<Option<Vec<u8>>> {
            paths.iter().map(|p| std::fs::read(p).ok()).collect()
        };
        let mut seen = read(&watched);
        let mut poll = tokio::time::interval(WATCH_INTERVAL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            #[cfg(unix)]
            let hangup = async {
                match hangups.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            };
            #[cfg(not(unix))]
            let hangup = std::future::pending::<Option<()>>();
            tokio::select! {
                _ = cancel.cancelled() => return,
                received = hangup => {
                    if received.is_none() {
                        hangups = None;
                        continue;
                    }
                    apply("SIGHUP");
                }
                _ = poll.tick(), if !watched.is_empty() => {
                    let now = read(&watched);
                    if now != seen {
                        seen = now;
                        apply("a configuration file changed");
                    }
                }
            }
        }
    });
    let cancel = running.cancel_token();
    tokio::spawn(async move {
        shutdown_signal().await;
        info!("Shutting down: finishing in-flight work.");
        cancel.cancel();
    });
    running.wait().await
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
}

async fn topics(settings: &Settings, command: TopicsCommand) -> Result<std::process::ExitCode> {
    match command {
        TopicsCommand::Apply { drift_ok } => {
            if settings.kafka.brokers.trim().is_empty() {
                bail!("kafka.brokers is not set; `topics apply` needs a broker to apply to (`orderflow dev` and `orderflow broker` apply the catalog to the embedded broker themselves)");
            }
            let broker = Broker::External(settings.kafka.brokers.clone());
            let report = broker.apply_topics(settings).await?;
            print!("{report}");
            Ok(if report.has_drift() && !drift_ok {
                std::process::ExitCode::from(3)
            } else {
                std::process::ExitCode::SUCCESS
            })
        }
        TopicsCommand::Docs { out, check } => {
            let rendered = render_markdown(&Catalog::load()?);
            match (out, check) {
                (None, _) => print!("{rendered}"),
                (Some(path), true) => {
                    let current = std::fs::read_to_string(&path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    if current != rendered {
                        eprintln!(
                            "{} is stale: run `orderflow topics docs --out {}`",
                            path.display(),
                            path.display()
                        );
                        return Ok(std::process::ExitCode::FAILURE);
                    }
                }
                (Some(path), false) => std::fs::write(&path, rendered)
                    .with_context(|| format!("writing {}", path.display()))?,
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
    }
}
