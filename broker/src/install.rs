//! Which Tansu binary the embedded broker runs, and installing it once when there is none.
//!
//! The embedded default needs Tansu built with its SQLite storage engine (crates.io `tansu`,
//! feature `libsql`); the prebuilt memory-only binaries do not have it. The one version this
//! project runs and tests with is [`TANSU_VERSION`], with orderflow's patches to its storage crate
//! and its broker crate ([`PATCHES`], `broker/tansu/`, revision [`PATCH_REVISION`]):
//!
//! - **A fetch answers when data arrives.** Tansu 0.6 queried once and then held every fetch for
//!   its full `fetch.wait.max.ms`, data or not, so a consumer either polled the SQLite log
//!   hundreds of times a second (a core at idle) or waited out every hop. Patched, a produce
//!   wakes the waiting fetches, and a fetch queries again only if one of its partitions had an
//!   append, so an idle consumer costs one query per wait and a record is served at once.
//! - **A partition with nothing new costs no query.** The broker keeps each partition's high
//!   watermark as produces and queries report it (only ever raised; forgotten when a log moves
//!   otherwise: a transaction's end, deleted records or topics), and answers a fetch at or past
//!   it without touching SQLite. A consumer of six partitions used to pay six queries per fetch
//!   for the one partition that had a record.
//! - **Statements are prepared once per connection.** Tansu 0.6 parsed and planned every SQL
//!   statement on every use: 42 % of the broker's CPU under load (BENCHMARKS.md, "Where the time
//!   goes"). Patched, every `execute` and the reads of the fetch, metadata, produce and group
//!   paths are kept per connection and reset for reuse.
//! - **The maintenance runs in slices.** Tansu 0.6 applied retention and compaction as one
//!   statement each over every record of the partitions they apply to, on the one task that
//!   serves all storage requests: a busy pipeline's log of ten minutes stalled every produce,
//!   fetch and heartbeat for seconds (BENCHMARKS.md, the long runs). Patched, a pass visits
//!   each partition in slices of at most 500 records, one storage request per slice, so what
//!   queues behind it waits for a slice, and pauses between slices for four times the last
//!   one's length, so a pass takes at most a fifth of the storage task. Compaction starts each
//!   partition where the last pass stopped, so a pass costs what was appended since, not the
//!   log; retention deletes a partition's expired start, as Kafka does (a log loses its start,
//!   never its middle).
//!   `broker::schema`'s tests run the patch's statements.
//! - **Consumer groups re-form after a stall** (`tansu-broker`'s group coordinator). A stall
//!   longer than the session timeout (the maintenance of a long log) left Tansu 0.6's groups
//!   formed with no assignments, or forming around a leader that had left, for good: the
//!   pipeline stopped (docs/architecture.md, "Embedded mode"). Patched, a member dropped for a
//!   missed heartbeat starts a new generation, only a leader's sync forms a group, and a leader
//!   that left is replaced at the next join.
//!
//! The install downloads the `tansu`, `tansu-storage` and `tansu-broker` crates from crates.io
//! and checks them against their SHA-256 ([`SOURCES`]), applies the patches (`patch`, from
//! Debian's build tools), points `tansu`'s lock file at the patched crates and runs `cargo
//! install --locked --path` on it, into a cache directory named after version, feature and
//! patch revision, so a binary found there is always the right build:
//!
//! `$XDG_CACHE_HOME/orderflow`, else `$HOME/.cache/orderflow`, then
//! `tansu-<version>-libsql-<revision>/bin/tansu`. (No `ORDERFLOW_…` variable: those are
//! configuration keys.)
//!
//! An install builds into a temporary root beside the final one and is renamed into place only
//! when `cargo install` succeeded, so a build interrupted half-way never counts as installed.
//! Concurrent installs (two `dev` starts, parallel tests) wait on a lock file: one builds, the
//! others find its result.

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use sha2::{Digest as _, Sha256};

use crate::BrokerError;

/// The Tansu release the embedded broker runs.
pub const TANSU_VERSION: &str = "0.6.0";
/// The cargo feature that brings Tansu's SQLite storage engine.
pub const TANSU_FEATURES: &str = "libsql";
/// orderflow's patches (module docs): each a crate of [`SOURCES`] and a unified diff against
/// that crate's root.
pub const PATCHES: &[(&str, &str)] = &[
    (
        "tansu-storage",
        include_str!("../tansu/tansu-storage-0.6.0.patch"),
    ),
    (
        "tansu-broker",
        include_str!("../tansu/tansu-broker-0.6.0.patch"),
    ),
];
/// Names the patches in the install directory: a changed patch installs a new build beside the
/// old one instead of running the old one.
pub const PATCH_REVISION: &str = "orderflow3";
/// The crates an install downloads, with the SHA-256 of each `.crate` file (those of the
/// patched crates are the checksums `tansu`'s own lock file records).
pub const SOURCES: &[(&str, &str)] = &[
    (
        "tansu",
        "4fdd85473ec265140488cf8d55e82b844f5c051c8916fabdd4a71156ac053f6d",
    ),
    (
        "tansu-storage",
        "720d2ed8e6010c70f7f06e5af5a7274ebbf6e42fdcd9e46de542b10dc4d2f35d",
    ),
    (
        "tansu-broker",
        "93c1e91b40c2a706dfdbe9a795c08c70918c874ad23f6e0e87564cc0a180e720",
    ),
];
/// Where crates.io serves a crate's source.
const DOWNLOAD_URL: &str = "https://static.crates.io/crates";

/// Where a binary comes from: a configured path, or the install cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Install {
    /// Build and install Tansu into the cache when it is not there (a first run).
    IfMissing,
    /// Only use what is installed; a missing binary is an error naming the install command.
    Never,
}

/// The cache directory of orderflow's own tools.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("orderflow");
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(home) => PathBuf::from(home).join(".cache").join("orderflow"),
        None => std::env::temp_dir().join("orderflow-cache"),
    }
}

/// The name of the pinned, patched build: its install root's name inside [`cache_dir`].
fn build_name() -> String {
    format!("tansu-{TANSU_VERSION}-{TANSU_FEATURES}-{PATCH_REVISION}")
}

/// The install root of the pinned build, inside [`cache_dir`].
pub fn install_root() -> PathBuf {
    cache_dir().join(build_name())
}

/// The binary of the pinned build, whether or not it is installed yet.
pub fn installed_binary() -> PathBuf {
    install_root().join("bin").join("tansu")
}

/// The command that installs the pinned build, for messages.
pub fn install_command() -> String {
    format!(
        "orderflow broker --install-only (Tansu {TANSU_VERSION} with orderflow's patch, built \
         with cargo into {})",
        install_root().display()
    )
}

/// The binary to run: `configured` if given (it must exist), else the installed build,
/// installing it first when allowed. `before_install` is called once if a build starts, so the
/// caller can say that a first run takes a while; cargo's own progress goes to stderr.
pub fn resolve(
    configured: Option<&Path>,
    install: Install,
    before_install: impl FnOnce(&str),
) -> Result<PathBuf, BrokerError> {
    if let Some(path) = configured {
        return if path.is_file() {
            Ok(path.to_owned())
        } else {
            Err(BrokerError::ConfiguredBinaryMissing(path.to_owned()))
        };
    }
    let binary = installed_binary();
    if binary.is_file() {
        return Ok(binary);
    }
    match install {
        Install::Never => Err(BrokerError::NotInstalled {
            command: install_command(),
        }),
        Install::IfMissing => {
            run_install(before_install)?;
            Ok(binary)
        }
    }
}

fn run_install(before_install: impl FnOnce(&str)) -> Result<(), BrokerError> {
    let root = install_root();
    let parent = cache_dir();
    std::fs::create_dir_all(&parent).map_err(|source| BrokerError::Io {
        what: format!("creating {}", parent.display()),
        source,
    })?;
    let lock_path = parent.join(format!("{}.install.lock", build_name()));
    let lock = File::create(&lock_path).map_err(|source| BrokerError::Io {
        what: format!("creating {}", lock_path.display()),
        source,
    })?;
    // Blocks while another process installs; released when `lock` drops.
    lock.lock().map_err(|source| BrokerError::Io {
        what: format!("locking {}", lock_path.display()),
        source,
    })?;
    if installed_binary().is_file() {
        return Ok(()); // the other process finished it
    }
    before_install(&install_command());
    let staging = parent.join(format!("{}.installing", build_name()));
    let sources = parent.join(format!("{}.sources", build_name()));
    for dir in [&staging, &sources] {
        let _ = std::fs::remove_dir_all(dir);
    }
    std::fs::create_dir_all(&sources).map_err(|source| BrokerError::Io {
        what: format!("creating {}", sources.display()),
        source,
    })?;
    let tansu = prepare_sources(&sources)?;
    run(
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .args([
                "install",
                "--locked",
                "--features",
                TANSU_FEATURES,
                "--path",
            ])
            .arg(&tansu)
            .arg("--root")
            .arg(&staging)
            .arg("--target-dir")
            .arg(sources.join("target")),
        "cargo install (needed once, to build the broker)",
    )?;
    std::fs::rename(&staging, &root).map_err(|source| BrokerError::Io {
        what: format!("moving {} to {}", staging.display(), root.display()),
        source,
    })?;
    let _ = std::fs::remove_dir_all(&sources);
    Ok(())
}

/// Downloads and checks [`SOURCES`] into `dir`, applies [`PATCHES`] and points `tansu`'s
/// manifest and lock file at the patched crates; returns the `tansu` crate's directory.
fn prepare_sources(dir: &Path) -> Result<PathBuf, BrokerError> {
    for (name, sha256) in SOURCES {
        let file = dir.join(format!("{name}-{TANSU_VERSION}.crate"));
        let url = format!("{DOWNLOAD_URL}/{name}/{TANSU_VERSION}/download");
        run(
            Command::new("curl")
                .args(["--fail", "--silent", "--show-error", "--location"])
                .args(["--retry", "3", "--output"])
                .arg(&file)
                .arg(&url),
            &format!("downloading {url} (curl)"),
        )?;
        let bytes = std::fs::read(&file).map_err(|source| BrokerError::Io {
            what: format!("reading {}", file.display()),
            source,
        })?;
        let found = hex(&Sha256::digest(&bytes));
        if found != *sha256 {
            return Err(BrokerError::InstallFailed {
                status: format!("{url} has SHA-256 {found}, expected {sha256}"),
                command: install_command(),
            });
        }
        run(
            Command::new("tar")
                .arg("-xzf")
                .arg(&file)
                .arg("-C")
                .arg(dir),
            &format!("unpacking {}", file.display()),
        )?;
    }
    let tansu = dir.join(format!("tansu-{TANSU_VERSION}"));
    let manifest = tansu.join("Cargo.toml");
    let mut manifest_text = read(&manifest)?;
    manifest_text.push_str("\n[patch.crates-io]\n");
    let lock = tansu.join("Cargo.lock");
    let mut lock_text = read(&lock)?;
    for (name, diff) in PATCHES {
        let patch = dir.join(format!("orderflow-{name}.patch"));
        write(&patch, diff)?;
        run(
            Command::new("patch")
                .args(["-p1", "--batch", "--forward", "--quiet", "-d"])
                .arg(dir.join(format!("{name}-{TANSU_VERSION}")))
                .arg("-i")
                .arg(&patch),
            &format!("patching {name} (patch, from Debian's build tools)"),
        )?;
        manifest_text.push_str(&format!(
            "{name} = {{ path = \"../{name}-{TANSU_VERSION}\" }}\n"
        ));
        lock_text =
            lock_with_patched(&lock_text, name).ok_or_else(|| BrokerError::InstallFailed {
                status: format!(
                    "{} has no registry entry for {name} {TANSU_VERSION}",
                    lock.display()
                ),
                command: install_command(),
            })?;
    }
    write(&manifest, &manifest_text)?;
    write(&lock, &lock_text)?;
    Ok(tansu)
}

/// `lock` (a Cargo.lock) with the entry of `crate_name` (one of [`SOURCES`]) turned into the
/// path dependency the manifest's `[patch]` makes it: the same package without a registry
/// source and checksum, so that `--locked` accepts the patched crate. `None` when the entry is
/// not there.
fn lock_with_patched(lock: &str, crate_name: &str) -> Option<String> {
    let entry = format!(
        "name = \"{crate_name}\"\nversion = \"{TANSU_VERSION}\"\n\
         source = \"registry+https://github.com/rust-lang/crates.io-index\"\n\
         checksum = \"{}\"\n",
        SOURCES
            .iter()
            .find(|(name, _)| *name == crate_name)
            .map(|(_, sha256)| *sha256)?
    );
    lock.contains(&entry).then(|| {
        lock.replace(
            &entry,
            &format!("name = \"{crate_name}\"\nversion = \"{TANSU_VERSION}\"\n"),
        )
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn read(path: &Path) -> Result<String, BrokerError> {
    std::fs::read_to_string(path).map_err(|source| BrokerError::Io {
        what: format!("reading {}", path.display()),
        source,
    })
}

fn write(path: &Path, text: &str) -> Result<(), BrokerError> {
    std::fs::write(path, text).map_err(|source| BrokerError::Io {
        what: format!("writing {}", path.display()),
        source,
    })
}

/// Runs one step of the install with its output on stderr; a failure names the step.
fn run(command: &mut Command, what: &str) -> Result<(), BrokerError> {
    let status = command
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .status()
        .map_err(|source| BrokerError::Io {
            what: format!("{what}: cannot run it"),
            source,
        })?;
    if status.success() {
        Ok(())
    } else {
        Err(BrokerError::InstallFailed {
            status: format!("{what}: {status}"),
            command: install_command(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_install_root_names_version_and_feature() {
        let root = install_root();
        let name = root
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        assert_eq!(
            name,
            format!("tansu-{TANSU_VERSION}-{TANSU_FEATURES}-{PATCH_REVISION}")
        );
        assert!(installed_binary().starts_with(&root));
        assert!(install_command().contains("--install-only"));
    }

    #[test]
    fn the_lock_file_entry_of_tansu_storage_becomes_the_patched_path_crate() {
        let lock = "[[package]]\nname = \"tansu-schema\"\nversion = \"0.6.0\"\n\n\
                    [[package]]\nname = \"tansu-storage\"\nversion = \"0.6.0\"\n\
                    source = \"registry+https://github.com/rust-lang/crates.io-index\"\n\
                    checksum = \"720d2ed8e6010c70f7f06e5af5a7274ebbf6e42fdcd9e46de542b10dc4d2f35d\"\n\
                    dependencies = [\n \"async-trait\",\n]\n";
        let patched = lock_with_patched(lock, "tansu-storage").expect("entry found");
        assert!(patched.contains(
            "name = \"tansu-storage\"\nversion = \"0.6.0\"\ndependencies = [\n \"async-trait\","
        ));
        assert!(!patched.contains("720d2ed8"), "{patched}");
        assert!(patched.contains("name = \"tansu-schema\""));
        // Another version's entry (a different lock file) is not silently left as it was.
        assert_eq!(
            lock_with_patched(&lock.replace("0.6.0", "0.5.9"), "tansu-storage"),
            None
        );
    }

    #[test]
    fn the_patches_touch_only_the_storage_crates_fetch_statement_and_maintenance_paths_and_the_group_coordinator(
    ) {
        let files = |name: &str| -> Vec<&str> {
            let (_, diff) = PATCHES
                .iter()
                .find(|(crate_name, _)| *crate_name == name)
                .expect("patched crate");
            diff.lines()
                .filter_map(|line| line.strip_prefix("+++ b/"))
                .collect()
        };
        assert_eq!(
            files("tansu-storage"),
            ["src/lib.rs", "src/lite.rs", "src/service/fetch.rs"]
        );
        assert_eq!(
            files("tansu-broker"),
            ["src/coordinator/group/administrator.rs"]
        );
        let all: String = PATCHES.iter().map(|(_, diff)| *diff).collect();
        assert!(all.contains("APPENDS.produced(topition, *base, records)"));
        assert!(all.contains("REUSABLE_QUERIES"));
        assert!(all.contains("generation_id: inner.generation_id + 1,"));
        assert!(all.contains("const MAINTENANCE_SLICE: i64 = 500;"));
        assert!(all.contains("tokio::time::sleep(slice * MAINTENANCE_PAUSE_FACTOR)"));
        // Every patched crate is downloaded and checked.
        for (name, _) in PATCHES {
            assert!(SOURCES.iter().any(|(source, _)| source == name), "{name}");
        }
    }

    #[test]
    fn the_lock_file_entry_of_tansu_broker_becomes_the_patched_path_crate() {
        let lock = "[[package]]\nname = \"tansu-broker\"\nversion = \"0.6.0\"\n\
                    source = \"registry+https://github.com/rust-lang/crates.io-index\"\n\
                    checksum = \"93c1e91b40c2a706dfdbe9a795c08c70918c874ad23f6e0e87564cc0a180e720\"\n";
        let patched = lock_with_patched(lock, "tansu-broker").expect("entry found");
        assert_eq!(
            patched,
            "[[package]]\nname = \"tansu-broker\"\nversion = \"0.6.0\"\n"
        );
        assert_eq!(lock_with_patched(lock, "tansu-cli"), None);
    }

    #[test]
    fn a_configured_binary_that_does_not_exist_is_an_error_naming_it() {
        let missing = Path::new("/nonexistent/tansu");
        let err = resolve(Some(missing), Install::IfMissing, |_| {
            panic!("must not install when a binary is configured")
        })
        .expect_err("missing binary");
        assert!(err.to_string().contains("/nonexistent/tansu"), "{err}");
    }
}
