//! What each role needs from its configuration beyond what [`Settings::load`] checks for every
//! command: the one place that decides it, used when a role starts and by
//! `orderflow config check --role R` (which deployments run against each role's manifest).
//!
//! A role started without one of these would not fail at once but later, or worse, run wrongly:
//! a processor without a gateway crash-loops on its first payment, a role without
//! `database.url` writes dev's SQLite file inside its own container, a JWT issuer without keys
//! refuses every token.

use std::{fmt, path::Path};

use orderflow_platform::{config::TlsSettings, Settings};

use crate::pipeline::Role;

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Ingest => "ingest",
            Role::Process => "process",
            Role::Project => "project",
            Role::Query => "query",
        }
    }

    /// Whether the role keeps or reads tables (the projections, API keys, idempotency).
    pub fn needs_database(self) -> bool {
        matches!(self, Role::Ingest | Role::Project | Role::Query)
    }

    /// Whether the role authenticates callers (API keys and JWTs).
    pub fn authenticates(self) -> bool {
        matches!(self, Role::Ingest | Role::Query)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A key a role needs and does not have, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    pub key: &'static str,
    pub why: String,
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.why)
    }
}

/// Every key `role` needs and lacks in `settings`; empty when it can run.
pub fn missing(settings: &Settings, role: Role) -> Vec<Missing> {
    let mut missing = Vec::new();
    let mut need = |ok: bool, key: &'static str, why: &str| {
        if !ok {
            missing.push(Missing {
                key,
                why: why.to_owned(),
            });
        }
    };
    need(
        !settings.kafka.brokers.trim().is_empty(),
        "kafka.brokers",
        "required: the bootstrap servers (ORDERFLOW_KAFKA__BROKERS); only `orderflow dev` runs an embedded broker",
    );
    if role == Role::Process {
        need(
            !settings.payment.gateway_url.trim().is_empty(),
            "payment.gateway_url",
            "required: the payment gateway's base URL (ORDERFLOW_PAYMENT__GATEWAY_URL; `orderflow gateway` runs the simulated one)",
        );
    }
    if role.needs_database() {
        need(
            settings.database.url.expose().is_some(),
            "database.url",
            "required: the shared database (ORDERFLOW_DATABASE__URL_FILE naming a mounted secret); without it the role would write dev's SQLite file inside its own container",
        );
    }
    if role.authenticates() && settings.auth.enabled {
        let jwt = &settings.auth.jwt;
        need(
            jwt.issuer.is_empty() || jwt.configured(),
            "auth.jwt.jwks_file",
            "required because auth.jwt.issuer is set: the identity provider's public keys (or auth.jwt.hs256_secret_file); without them every JWT is refused",
        );
        need(
            jwt.jwks_file.is_empty() || Path::new(&jwt.jwks_file).is_file(),
            "auth.jwt.jwks_file",
            &format!("no such file: {}", jwt.jwks_file),
        );
    }
    // Which listeners the role serves; whether their settings agree is Settings::validate's.
    let listeners: &[(&'static str, &'static str, &'static str, &TlsSettings)] = match role {
        Role::Ingest => &[
            (
                "ingest.tls.cert_file",
                "ingest.tls.key_file",
                "ingest.tls.client_ca_file",
                &settings.ingest.tls,
            ),
            (
                "admin.tls.cert_file",
                "admin.tls.key_file",
                "admin.tls.client_ca_file",
                &settings.admin.tls,
            ),
        ],
        Role::Query => &[(
            "query.tls.cert_file",
            "query.tls.key_file",
            "query.tls.client_ca_file",
            &settings.query.tls,
        )],
        Role::Process | Role::Project => &[],
    };
    for (cert_key, key_key, ca_key, tls) in listeners {
        for (key, path) in [
            (*cert_key, &tls.cert_file),
            (*key_key, &tls.key_file),
            (*ca_key, &tls.client_ca_file),
        ] {
            need(
                path.is_empty() || Path::new(path).is_file(),
                key,
                &format!("no such file: {path}"),
            );
        }
    }
    missing
}

/// [`missing`] as one error naming every key, or `Ok` when the role can run.
pub fn check(settings: &Settings, role: Role) -> anyhow::Result<()> {
    let missing = missing(settings, role);
    if missing.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = missing.iter().map(|m| format!("  - {m}")).collect();
    anyhow::bail!(
        "the {role} role's configuration is incomplete:\n{}",
        list.join("\n")
    )
}

#[cfg(test)]
mod tests {
    use orderflow_platform::config::Overrides;

    use super::*;

    fn settings(pairs: &[(&str, &str)]) -> Settings {
        let mut overrides = Overrides::default();
        for (key, value) in pairs {
            overrides.set(*key, value);
        }
        Settings::from_defaults(&overrides).expect("settings")
    }

    fn keys(settings: &Settings, role: Role) -> Vec<&'static str> {
        missing(settings, role).into_iter().map(|m| m.key).collect()
    }

    #[test]
    fn defaults_name_what_each_role_lacks() {
        let s = settings(&[]);
        assert_eq!(
            keys(&s, Role::Process),
            ["kafka.brokers", "payment.gateway_url"]
        );
        assert_eq!(keys(&s, Role::Project), ["kafka.brokers", "database.url"]);
        assert_eq!(keys(&s, Role::Query), ["kafka.brokers", "database.url"]);
        assert_eq!(keys(&s, Role::Ingest), ["kafka.brokers", "database.url"]);
        let message = check(&s, Role::Process)
            .expect_err("incomplete")
            .to_string();
        assert!(
            message.contains("payment.gateway_url: required"),
            "{message}"
        );
    }

    #[test]
    fn a_complete_configuration_passes() {
        let s = settings(&[
            ("kafka.brokers", "\"kafka:9092\""),
            ("payment.gateway_url", "\"https://pay.example\""),
            ("database.url", "\"postgres://db/orderflow\""),
        ]);
        for role in Role::ALL {
            assert_eq!(keys(&s, role), Vec::<&str>::new(), "{role}");
        }
    }

    #[test]
    fn an_issuer_needs_keys_and_files_must_exist() {
        let s = settings(&[
            ("kafka.brokers", "\"kafka:9092\""),
            ("database.url", "\"postgres://db/orderflow\""),
            ("auth.jwt.issuer", "\"https://login.example/\""),
            ("admin.tls.cert_file", "\"/nonexistent/tls.crt\""),
            ("admin.tls.key_file", "\"/nonexistent/tls.key\""),
        ]);
        assert_eq!(keys(&s, Role::Query), ["auth.jwt.jwks_file"]);
        assert_eq!(
            keys(&s, Role::Ingest),
            [
                "auth.jwt.jwks_file",
                "admin.tls.cert_file",
                "admin.tls.key_file"
            ]
        );
        // Only the roles that authenticate care about JWT keys.
        assert_eq!(keys(&s, Role::Project), Vec::<&str>::new());
    }
}
