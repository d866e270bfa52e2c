//! `orderflow dev` as a child process, as a user runs it: started with extra arguments, its
//! banner read for the addresses it serves, stopped with SIGINT (what Ctrl-C sends).

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

/// Where [`DevProcess::start`] puts dev's log, in the directory it runs in.
pub const STDERR_FILE: &str = "dev.stderr.log";

/// A running `orderflow dev`; killed on drop if still running.
pub struct DevProcess {
    child: Option<Child>,
    /// Keeps the stdout reader alive, so the child never writes into a closed pipe.
    _lines: mpsc::Receiver<String>,
    /// Everything printed up to "Press Ctrl-C".
    pub banner: Vec<String>,
    /// Base URL of the ingest edge, e.g. `http://127.0.0.1:41234`.
    pub ingest_url: String,
    /// Base URL of the query API.
    pub query_url: String,
    /// Base URL of the admin listener.
    pub admin_url: String,
    /// The API keys `dev` created and printed, by role (only with `auth.enabled=true`).
    pub api_keys: std::collections::BTreeMap<String, String>,
    /// URL of the metrics endpoint.
    pub metrics_url: String,
    /// The broker's bootstrap address.
    pub bootstrap: String,
    /// The database URL as printed (a password would be masked).
    pub database_url: String,
}

impl DevProcess {
    /// Starts `binary [args...]` with every listener on a free port, running `dev`, in
    /// `dir` and waits (up to two minutes) for its banner. Authentication is off unless `args`
    /// turn it on (`--set auth.enabled=true`; the keys `dev` prints are then in `api_keys`).
    pub fn start(binary: &Path, dir: &Path, args: &[String]) -> Result<Self, String> {
        let mut child = Command::new(binary)
            .args(["--set", "auth.enabled=false"])
            .args(args)
            .args([
                "--set",
                "admin.listen=\"127.0.0.1:0\"",
                "--set",
                "gateway.listen=\"127.0.0.1:0\"",
                "--ingest-listen",
                "127.0.0.1:0",
                "--query-listen",
                "127.0.0.1:0",
                "--set",
                "telemetry.listen=\"127.0.0.1:0\"",
                "--set",
                "dev.broker_listen=\"127.0.0.1:0\"",
                "dev",
            ])
            .current_dir(dir)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(
                std::fs::File::create(dir.join(STDERR_FILE))
                    .map(Stdio::from)
                    .unwrap_or_else(|_| Stdio::null()),
            )
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let (tx, lines) = mpsc::channel();
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
            match lines.recv_timeout(left) {
                Ok(line) => banner.push(line),
                Err(_) => {
                    let _ = child.kill();
                    return Err(format!("orderflow dev printed no banner; got {banner:?}"));
                }
            }
        }
        let field = |name: &str| -> Result<String, String> {
            banner
                .iter()
                .find_map(|l| l.trim().strip_prefix(name).map(|r| r.trim().to_owned()))
                .ok_or_else(|| format!("no {name} line in {banner:?}"))
        };
        let base = |url: String| url.split("/v1/").next().unwrap_or_default().to_owned();
        let ingest_url = base(field("ingest")?);
        let query_url = base(field("query")?);
        let admin_url = base(field("admin")?);
        let api_keys = banner
            .iter()
            .filter_map(|l| l.trim().strip_prefix("api key"))
            .filter_map(|rest| {
                let mut words = rest.split_whitespace();
                Some((words.next()?.to_owned(), words.next()?.to_owned()))
            })
            .collect();
        let metrics_url = field("metrics")?;
        let bootstrap = field("broker")?
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned();
        let database_url = field("database")?;
        Ok(Self {
            child: Some(child),
            _lines: lines,
            banner,
            ingest_url,
            query_url,
            admin_url,
            api_keys,
            metrics_url,
            bootstrap,
            database_url,
        })
    }

    /// The last `lines` lines dev logged (for a failing test's message).
    pub fn log_tail(dir: &Path, lines: usize) -> String {
        let text = std::fs::read_to_string(dir.join(STDERR_FILE)).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends SIGINT and waits up to 30 s for the process to exit.
    pub fn interrupt(&mut self) -> Result<ExitStatus, String> {
        let Some(child) = self.child.as_mut() else {
            return Err("already stopped".to_owned());
        };
        Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .map_err(|e| format!("cannot run kill: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    self.child = None;
                    return Ok(status);
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Ok(None) => return Err("did not stop within 30 s of SIGINT".to_owned()),
                Err(e) => return Err(format!("wait failed: {e}")),
            }
        }
    }
}

impl Drop for DevProcess {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Records in `orders.events` of the broker at `bootstrap`, over its six partitions (high
/// watermarks: exact on the embedded broker).
pub fn events_in_log(bootstrap: &str) -> i64 {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = match rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
    {
        Ok(consumer) => consumer,
        Err(_) => return 0,
    };
    (0..6)
        .map(|partition| {
            consumer
                .fetch_watermarks("orders.events", partition, Duration::from_secs(5))
                .map_or(0, |(_, high)| high)
        })
        .sum()
}

/// Waits (up to two minutes) until `orders.events` holds at least `events` records: orders are
/// flowing.
pub async fn wait_events(bootstrap: &str, events: i64) {
    crate::eventually(Duration::from_secs(120), "orders to flow", || {
        let bootstrap = bootstrap.to_owned();
        async move {
            tokio::task::spawn_blocking(move || (events_in_log(&bootstrap) >= events).then_some(()))
                .await
                .ok()
                .flatten()
        }
    })
    .await;
}
