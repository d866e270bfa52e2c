//! The deployment manifests name only configuration keys that exist: every `ORDERFLOW_…`
//! variable in `deploy/kubernetes/` maps to a key of the settings (a typo would be refused by the
//! binary at start, in production, instead of here).

use std::path::Path;

use orderflow_platform::{config::Overrides, Settings};
use serde_json::Value;

#[test]
fn every_environment_variable_in_the_manifests_is_a_config_key() {
    let settings = Settings::from_defaults(&Overrides::default()).expect("defaults");
    let tree = serde_json::to_value(&settings).expect("settings serialize");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes");
    let mut seen = 0;
    let mut unknown = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("manifests") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("manifest");
        for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            let Some(name) = word.strip_prefix("ORDERFLOW_") else {
                continue;
            };
            seen += 1;
            let mut node = &tree;
            for part in name.to_ascii_lowercase().split("__") {
                node = match node.get(part) {
                    Some(next) => next,
                    None => {
                        unknown.push(format!("{}: {word}", path.display()));
                        &Value::Null
                    }
                };
                if node.is_null() {
                    break;
                }
            }
        }
    }
    assert!(
        seen > 10,
        "found only {seen} variables: is the scan broken?"
    );
    assert!(unknown.is_empty(), "not config keys: {unknown:?}");
}
