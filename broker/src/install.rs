//! Which Tansu binary the embedded broker runs, and installing it once when there is none.
//!
//! The embedded default needs Tansu built with its SQLite storage engine (crates.io `tansu`,
//! feature `libsql`); the prebuilt memory-only binaries do not have it. The one version this
//! project runs and tests with is [`TANSU_VERSION`]. It is installed with `cargo install` into a
//! cache directory of its own, named after the version and feature, so a binary found there is
//! always the right build:
//!
//! `$XDG_CACHE_HOME/orderflow`, else `$HOME/.cache/orderflow`, then
//! `tansu-<version>-libsql/bin/tansu`. (No `ORDERFLOW_…` variable: those are configuration
//! keys.)
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

use crate::BrokerError;

/// The Tansu release the embedded broker runs.
pub const TANSU_VERSION: &str = "0.6.0";
/// The cargo feature that brings Tansu's SQLite storage engine.
pub const TANSU_FEATURES: &str = "libsql";

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

/// The install root of the pinned build, inside [`cache_dir`].
pub fn install_root() -> PathBuf {
    cache_dir().join(format!("tansu-{TANSU_VERSION}-{TANSU_FEATURES}"))
}

/// The binary of the pinned build, whether or not it is installed yet.
pub fn installed_binary() -> PathBuf {
    install_root().join("bin").join("tansu")
}

/// The command that installs the pinned build, for messages.
pub fn install_command() -> String {
    format!(
        "cargo install --locked tansu --version ={TANSU_VERSION} --features {TANSU_FEATURES} --root {}",
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
    let lock_path = parent.join(format!(
        "tansu-{TANSU_VERSION}-{TANSU_FEATURES}.install.lock"
    ));
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
    let staging = parent.join(format!("tansu-{TANSU_VERSION}-{TANSU_FEATURES}.installing"));
    let _ = std::fs::remove_dir_all(&staging);
    let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args([
            "install",
            "--locked",
            "tansu",
            "--version",
            &format!("={TANSU_VERSION}"),
            "--features",
            TANSU_FEATURES,
            "--root",
        ])
        .arg(&staging)
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .status()
        .map_err(|source| BrokerError::Io {
            what: "running cargo (needed once, to build the broker)".to_owned(),
            source,
        })?;
    if !status.success() {
        return Err(BrokerError::InstallFailed {
            status: status.to_string(),
            command: install_command(),
        });
    }
    std::fs::rename(&staging, &root).map_err(|source| BrokerError::Io {
        what: format!("moving {} to {}", staging.display(), root.display()),
        source,
    })?;
    Ok(())
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
        assert_eq!(name, format!("tansu-{TANSU_VERSION}-{TANSU_FEATURES}"));
        assert!(installed_binary().starts_with(&root));
        assert!(install_command().contains("--features libsql"));
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
