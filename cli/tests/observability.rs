//! The operations contract: every metric that an alert rule or a dashboard panel names is one
//! the binary registers, the rules pass `promtool check rules` and `promtool test rules`, and
//! every alert's runbook exists.

use std::{collections::BTreeSet, path::PathBuf, process::Command};

use orderflow::pipeline::Metrics;
use orderflow_platform::metrics::MetricsRegistry;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Sample names `/metrics` can show, from the binary's one metrics registration.
fn registered_samples() -> BTreeSet<String> {
    let registry = MetricsRegistry::new();
    let _metrics = Metrics::register(&registry);
    registry.sample_names()
}

/// Every `orderflow_…` identifier in `text` (metric names; recording rules use `orderflow:`).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let is_ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let mut i = 0;
    while let Some(found) = text[i..].find("orderflow_") {
        let start = i + found;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        if start == 0 || !is_ident(bytes[start - 1]) {
            names.insert(text[start..end].to_owned());
        }
        i = end;
    }
    names
}

#[test]
fn every_metric_in_rules_and_dashboards_is_registered() {
    let registered = registered_samples();
    assert!(
        registered.contains("orderflow_order_end_to_end_seconds_bucket"),
        "{registered:?}"
    );
    for file in [
        "deploy/prometheus/rules.yml",
        "deploy/prometheus/rules.test.yml",
        "deploy/grafana/orderflow.json",
    ] {
        let used = metric_names(&read(file));
        assert!(!used.is_empty(), "{file} names no metric");
        let unknown: Vec<_> = used.difference(&registered).collect();
        assert!(
            unknown.is_empty(),
            "{file} names metrics the code does not register: {unknown:?}"
        );
    }
}

#[test]
fn the_dashboard_uses_only_recording_rules_that_exist() {
    let rules = read("deploy/prometheus/rules.yml");
    let recorded: BTreeSet<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- record: "))
        .map(str::trim)
        .collect();
    let dashboard = read("deploy/grafana/orderflow.json");
    let parsed: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard is JSON");
    let panels = parsed["panels"].as_array().expect("panels");
    assert!(panels.len() > 10);
    for panel in panels {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("expr");
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')) {
                if word.starts_with("orderflow:") {
                    assert!(
                        recorded.contains(word),
                        "{} uses {word}, which no rule records",
                        panel["title"]
                    );
                }
            }
        }
    }
}

#[test]
fn every_alert_links_an_existing_runbook() {
    let rules = read("deploy/prometheus/rules.yml");
    let links: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("runbook_url: "))
        .collect();
    let alerts = rules
        .lines()
        .filter(|l| l.trim().starts_with("- alert: "))
        .count();
    assert_eq!(links.len(), alerts, "every alert has a runbook_url");
    for link in links {
        let page = repo().join(link.trim());
        let text = std::fs::read_to_string(&page).unwrap_or_else(|e| panic!("{link}: {e}"));
        for section in ["## What it means", "## Confirm", "## What to do"] {
            assert!(text.contains(section), "{link} lacks {section:?}");
        }
    }
}

#[test]
fn promtool_checks_and_tests_the_rules() {
    if Command::new("promtool").arg("--version").output().is_err() {
        orderflow_testkit::unavailable::<()>(
            "promtool (apt-get install prometheus)",
            "not on PATH",
        );
        return;
    }
    let dir = repo().join("deploy/prometheus");
    for args in [
        ["check", "rules", "rules.yml"],
        ["test", "rules", "rules.test.yml"],
    ] {
        let output = Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("promtool runs");
        assert!(
            output.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
