//! The Kubernetes manifests run as shipped: each overlay (`deploy/kubernetes/overlays/*`) is
//! rendered with `kubectl kustomize`, and every orderflow container in it is given exactly what
//! its manifest gives it — its arguments, its environment, and a file at every path it mounts (the
//! ConfigMaps' contents as rendered; for Secrets, which live outside the repository, a stand-in
//! at each path the container's environment names). `orderflow config check --role R` must then
//! pass for every role, and `migrate` and `topics apply` must accept their configuration. A
//! missing key (the processors' gateway, once shipped without it) fails here, naming the key.
//!
//! Schema validation and policy checks of the same renderings (kubernetes-validate, checkov) run
//! in scripts/test.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

use orderflow_testkit::{unavailable, TempDir};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_orderflow");
const ROLES: [&str; 4] = ["ingest", "process", "project", "query"];

fn kubernetes_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes")
}

/// The overlay's resources, rendered by `kubectl kustomize`; `None` (skip) without kubectl
/// outside CI.
fn render(overlay: &str) -> Option<Vec<Value>> {
    let dir = kubernetes_dir().join("overlays").join(overlay);
    let output = match Command::new("kubectl").arg("kustomize").arg(&dir).output() {
        Ok(output) => output,
        Err(e) => return unavailable("kubectl (kustomize)", &e.to_string()),
    };
    assert!(
        output.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).expect("utf-8");
    let mut resources = Vec::new();
    for document in serde_norway::Deserializer::from_str(&text) {
        let value: Value = serde::Deserialize::deserialize(document).expect("YAML");
        if !value.is_null() {
            resources.push(value);
        }
    }
    Some(resources)
}

fn str_of<'a>(value: &'a Value, pointer: &str) -> &'a str {
    value
        .pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// Stand-in content for a secret file at `path` (only its form matters to `config check`).
fn stand_in(path: &str) -> &'static str {
    if path.ends_with("database-url") {
        "postgres://orderflow:secret@postgres.db.svc:5432/orderflow\n"
    } else {
        "-----BEGIN CERTIFICATE-----\nstand-in\n-----END CERTIFICATE-----\n"
    }
}

/// One orderflow container of a rendered workload, ready to run with a command of ours.
struct Container {
    workload: String,
    args: Vec<String>,
    env: BTreeMap<String, String>,
    _root: TempDir,
}

/// Every container of the overlay's workloads, its mounts materialised under a temp directory
/// and every path in its arguments and environment moved there.
fn containers(resources: &[Value]) -> Vec<Container> {
    let config_maps: BTreeMap<&str, &Value> = resources
        .iter()
        .filter(|r| str_of(r, "/kind") == "ConfigMap")
        .map(|r| (str_of(r, "/metadata/name"), &r["data"]))
        .collect();
    let secrets: BTreeMap<&str, &Value> = resources
        .iter()
        .filter(|r| str_of(r, "/kind") == "Secret")
        .map(|r| (str_of(r, "/metadata/name"), r))
        .collect();
    let mut out = Vec::new();
    for workload in resources
        .iter()
        .filter(|r| matches!(str_of(r, "/kind"), "Deployment" | "StatefulSet" | "Job"))
    {
        let name = format!(
            "{}/{}",
            str_of(workload, "/kind"),
            str_of(workload, "/metadata/name")
        );
        let spec = &workload["spec"]["template"]["spec"];
        let volumes: BTreeMap<&str, &Value> = spec["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|v| (str_of(v, "/name"), v))
            .collect();
        let all = spec["initContainers"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(spec["containers"].as_array().into_iter().flatten());
        for container in all {
            let root = TempDir::new();
            let relocate = |path: &str| -> String { format!("{}{path}", root.0.display()) };
            let mut mounts = Vec::new();
            for mount in container["volumeMounts"].as_array().into_iter().flatten() {
                let at = str_of(mount, "/mountPath").to_owned();
                let volume = volumes
                    .get(str_of(mount, "/name"))
                    .unwrap_or_else(|| panic!("{name}: mount of an undeclared volume {mount}"));
                let dir = PathBuf::from(relocate(&at));
                std::fs::create_dir_all(&dir).expect("mount dir");
                if let Some(map) = volume.pointer("/configMap/name").and_then(Value::as_str) {
                    let data = config_maps
                        .get(map)
                        .unwrap_or_else(|| panic!("{name}: ConfigMap {map} is not in the overlay"));
                    for (file, content) in data.as_object().into_iter().flatten() {
                        std::fs::write(dir.join(file), content.as_str().unwrap_or_default())
                            .expect("config file");
                    }
                }
                if let Some(secret) = volume.pointer("/secret/secretName").and_then(Value::as_str) {
                    // Rendered in the overlay (dev): its real keys.
                    if let Some(rendered) = secrets.get(secret) {
                        use base64::Engine;
                        for (file, content) in rendered["data"].as_object().into_iter().flatten() {
                            let text: String = content
                                .as_str()
                                .unwrap_or_default()
                                .split_whitespace()
                                .collect();
                            let bytes = base64::engine::general_purpose::STANDARD
                                .decode(text)
                                .expect("base64 secret data");
                            std::fs::write(dir.join(file), bytes).expect("secret file");
                        }
                    }
                }
                mounts.push(at);
            }
            let mut env = BTreeMap::new();
            for var in container["env"].as_array().into_iter().flatten() {
                let key = str_of(var, "/name").to_owned();
                let value = if var.pointer("/valueFrom/fieldRef").is_some() {
                    "orderflow-process-0".to_owned()
                } else {
                    str_of(var, "/value").to_owned()
                };
                env.insert(key, value);
            }
            assert!(
                container["envFrom"].is_null(),
                "{name}: settings come from the mounted orderflow.toml and the role's own env"
            );
            // Paths under a mount move with it; a secret file the environment names that the
            // overlay does not render gets a stand-in (it comes from outside the repository).
            for value in env.values_mut() {
                if let Some(mount) = mounts.iter().find(|m| value.starts_with(m.as_str())) {
                    let moved = relocate(value);
                    if !Path::new(&moved).exists() && mount.starts_with("/var/run/secrets") {
                        std::fs::write(&moved, stand_in(value)).expect("stand-in");
                    }
                    *value = moved;
                }
            }
            let args = container["args"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|a| a.as_str().unwrap_or_default().to_owned())
                .map(|a| {
                    if mounts.iter().any(|m| a.starts_with(m.as_str())) {
                        relocate(&a)
                    } else {
                        a
                    }
                })
                .collect();
            out.push(Container {
                workload: format!("{name}/{}", str_of(container, "/name")),
                args,
                env,
                _root: root,
            });
        }
    }
    out
}

/// Runs `orderflow` with the container's global options and environment (nothing of ours),
/// and `command` instead of the container's own.
fn run(container: &Container, command: &[&str]) -> std::process::Output {
    let mut global = Vec::new();
    let mut args = container.args.iter();
    while let Some(arg) = args.next() {
        if arg == "--config" || arg == "--set" {
            global.push(arg.clone());
            global.extend(args.next().cloned());
        } else if arg.starts_with("--") {
            global.push(arg.clone());
        } else {
            break; // the command: the rest is its own
        }
    }
    Command::new(BIN)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(&container.env)
        .current_dir(container._root.0.as_path())
        .args(&global)
        .args(command)
        .output()
        .expect("orderflow runs")
}

/// The command of a container: its arguments past the global options.
fn command_of(container: &Container) -> Vec<&str> {
    let mut command = Vec::new();
    let mut args = container.args.iter();
    while let Some(arg) = args.next() {
        if arg == "--config" || arg == "--set" {
            args.next();
        } else if !arg.starts_with("--") || !command.is_empty() {
            command.push(arg.as_str());
        }
    }
    command
}

fn check_overlay(overlay: &str) {
    let Some(resources) = render(overlay) else {
        return;
    };
    let containers = containers(&resources);
    let mut checked = BTreeMap::new();
    for container in &containers {
        let command = command_of(container);
        let Some(&first) = command.first() else {
            panic!("{}: no command", container.workload);
        };
        let check: Vec<&str> = if ROLES.contains(&first) {
            vec!["config", "check", "--role", first]
        } else if matches!(first, "migrate" | "topics" | "gateway") {
            // No role requirements: the configuration must load (secret files included).
            vec!["config", "check"]
        } else {
            panic!("{}: unexpected command {command:?}", container.workload);
        };
        let output = run(container, &check);
        assert!(
            output.status.success(),
            "{overlay}: {} ({command:?}) would not start:\n{}",
            container.workload,
            String::from_utf8_lossy(&output.stderr)
        );
        *checked.entry(first).or_insert(0) += 1;
    }
    for role in ROLES.iter().chain(&["migrate", "topics"]) {
        assert!(
            checked.contains_key(role),
            "{overlay}: no container runs {role}: {checked:?}"
        );
    }

    // The check is not vacuous: the processors without their gateway are refused by name.
    let process = containers
        .iter()
        .find(|c| command_of(c).first() == Some(&"process"))
        .expect("process");
    let mut without = Container {
        workload: process.workload.clone(),
        args: process.args.clone(),
        env: process.env.clone(),
        _root: TempDir::new(),
    };
    without
        .env
        .insert("ORDERFLOW_PAYMENT__GATEWAY_URL".to_owned(), String::new());
    let output = run(&without, &["config", "check", "--role", "process"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("payment.gateway_url: required"), "{stderr}");
}

#[test]
fn every_role_of_the_dev_overlay_has_what_it_needs() {
    check_overlay("dev");
}

#[test]
fn every_role_of_the_prod_overlay_has_what_it_needs() {
    check_overlay("prod");
}

#[test]
fn the_overlays_pin_a_release_and_name_the_setup_job_after_it() {
    for overlay in ["dev", "prod"] {
        let Some(resources) = render(overlay) else {
            return;
        };
        let mut tags = std::collections::BTreeSet::new();
        for r in &resources {
            for c in r
                .pointer("/spec/template/spec/containers")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let image = str_of(c, "/image");
                let (name, tag) = image.rsplit_once(':').expect("a tagged image");
                assert_eq!(name, "ghcr.io/orderflow/orderflow", "{overlay}: {image}");
                assert_ne!(tag, "latest", "{overlay}: {image}");
                tags.insert(tag.to_owned());
            }
        }
        assert_eq!(tags.len(), 1, "{overlay}: one release at a time: {tags:?}");
        let tag = tags.into_iter().next().expect("tag");
        assert!(
            resources.iter().any(|r| str_of(r, "/kind") == "Job"
                && str_of(r, "/metadata/name") == format!("orderflow-setup-{tag}")),
            "{overlay}: the setup Job is not named after release {tag}"
        );
    }
}
