//! `topics apply`: make the cluster match the catalog without ever destroying data.
//!
//! Missing topics are created; existing ones are compared and any difference is reported as
//! [`Drift`], never "fixed" — changing partitions remaps keys and breaks per-key order, and
//! lowering retention deletes data, so those are an operator's decision. Running it twice is a
//! no-op the second time.

use std::{collections::BTreeMap, time::Duration};

use orderflow_platform::kafka::{KafkaClients, MetadataProbe, MockBroker};
use rdkafka::{
    admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication},
    client::DefaultClientContext,
    error::KafkaError,
    types::RDKafkaErrorCode,
};
use tracing::info;

use crate::{Catalog, TopicSpec};

/// How topics are created on the target cluster.
pub enum Provisioner<'a> {
    /// Any Kafka-protocol cluster, through the admin API.
    Admin,
    /// librdkafka's mock cluster (fault-injection tests), which has no CreateTopics handler:
    /// topics are created through its own API. It keeps no topic configs, so those are not
    /// checked.
    Mock(&'a MockBroker),
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("cannot create a Kafka admin client: {0}")]
    Client(#[source] KafkaError),
    /// `reason` is librdkafka's error with the last connection error, which says why (a TLS
    /// handshake, SASL, a refused connection).
    #[error("cannot read cluster metadata from {bootstrap}: {reason}")]
    Metadata { bootstrap: String, reason: String },
    #[error("cannot create topic {topic}: {source}")]
    Create {
        topic: String,
        #[source]
        source: KafkaError,
    },
    #[error("topic {topic} was created but its partitions have no leader after {waited:?}")]
    NotReady { topic: String, waited: Duration },
}

/// One way a topic differs from the catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drift {
    pub topic: String,
    pub problem: String,
}

/// What `apply` did and found.
#[derive(Debug, Default, Clone)]
pub struct ApplyReport {
    pub created: Vec<String>,
    /// Topics that exist and match the catalog as far as the broker lets us see.
    pub unchanged: Vec<String>,
    pub drift: Vec<Drift>,
    /// Things worth knowing that are not drift (capped replication, configs not reported).
    pub notes: Vec<String>,
}

impl ApplyReport {
    pub fn has_drift(&self) -> bool {
        !self.drift.is_empty()
    }
}

impl std::fmt::Display for ApplyReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for t in &self.created {
            writeln!(f, "created   {t}")?;
        }
        for t in &self.unchanged {
            writeln!(f, "ok        {t}")?;
        }
        for d in &self.drift {
            writeln!(f, "DRIFT     {}: {}", d.topic, d.problem)?;
        }
        for n in &self.notes {
            writeln!(f, "note      {n}")?;
        }
        Ok(())
    }
}

/// A topic as the cluster reports it.
#[derive(Debug, Clone)]
struct Existing {
    partitions: i32,
    /// Smallest replica count over the topic's partitions.
    replication: i32,
    all_have_leaders: bool,
}

struct Cluster {
    brokers: i32,
    topics: BTreeMap<String, Existing>,
}

fn describe(probe: &MetadataProbe, clients: &KafkaClients) -> Result<Cluster, ApplyError> {
    let metadata = probe
        .fetch(clients.admin_timeout())
        .map_err(|reason| ApplyError::Metadata {
            bootstrap: clients.bootstrap().to_owned(),
            reason,
        })?;
    let topics = metadata
        .topics()
        .iter()
        .filter(|t| t.error().is_none())
        .map(|t| {
            let partitions = t.partitions();
            let existing = Existing {
                partitions: partitions.len() as i32,
                replication: partitions
                    .iter()
                    .map(|p| p.replicas().len() as i32)
                    .min()
                    .unwrap_or(0),
                all_have_leaders: partitions.iter().all(|p| p.leader() >= 0),
            };
            (t.name().to_owned(), existing)
        })
        .collect();
    Ok(Cluster {
        brokers: metadata.brokers().len() as i32,
        topics,
    })
}

/// Creates what is missing and reports drift. Never deletes or alters an existing topic.
pub async fn apply(
    catalog: &Catalog,
    clients: &KafkaClients,
    provisioner: Provisioner<'_>,
) -> Result<ApplyReport, ApplyError> {
    let admin: AdminClient<DefaultClientContext> =
        clients.admin().create().map_err(ApplyError::Client)?;
    let probe = MetadataProbe::new(clients).map_err(ApplyError::Client)?;
    let cluster = describe(&probe, clients)?;
    let mut report = ApplyReport::default();

    for spec in &catalog.topics {
        let replication = spec.replication.min(cluster.brokers.max(1));
        if replication < spec.replication {
            report.notes.push(format!(
                "{}: replication {} capped at {} (brokers in the cluster)",
                spec.name, spec.replication, replication
            ));
        }
        match cluster.topics.get(&spec.name) {
            None => {
                create(&admin, clients, &provisioner, spec, replication).await?;
                info!(topic = %spec.name, partitions = spec.partitions, replication, "Created topic.");
                report.created.push(spec.name.clone());
            }
            Some(existing) => {
                let before = report.drift.len();
                if existing.partitions != spec.partitions {
                    report.drift.push(Drift {
                        topic: spec.name.clone(),
                        problem: format!(
                            "has {} partitions, the catalog says {}; left as is (changing the \
                             count remaps keys to partitions and breaks per-key order)",
                            existing.partitions, spec.partitions
                        ),
                    });
                }
                if existing.replication < replication {
                    report.drift.push(Drift {
                        topic: spec.name.clone(),
                        problem: format!(
                            "has replication {}, the catalog says {replication}; left as is \
                             (reassign partitions to raise it)",
                            existing.replication
                        ),
                    });
                }
                match provisioner {
                    Provisioner::Mock(_) => {}
                    Provisioner::Admin => {
                        check_configs(&admin, clients, spec, &mut report).await;
                    }
                }
                if report.drift.len() == before {
                    report.unchanged.push(spec.name.clone());
                }
            }
        }
    }
    if matches!(provisioner, Provisioner::Mock(_)) {
        report
            .notes
            .push("mock cluster: topic configs are not kept, so not checked".to_owned());
    }
    wait_for_leaders(&probe, clients, &report.created).await?;
    Ok(report)
}

async fn create(
    admin: &AdminClient<DefaultClientContext>,
    clients: &KafkaClients,
    provisioner: &Provisioner<'_>,
    spec: &TopicSpec,
    replication: i32,
) -> Result<(), ApplyError> {
    let create_error = |source| ApplyError::Create {
        topic: spec.name.clone(),
        source,
    };
    match provisioner {
        Provisioner::Mock(broker) => broker
            .cluster()
            .create_topic(&spec.name, spec.partitions, replication)
            .map_err(create_error),
        Provisioner::Admin => {
            let configs = spec.configs();
            let mut topic = NewTopic::new(
                &spec.name,
                spec.partitions,
                TopicReplication::Fixed(replication),
            );
            for (key, value) in &configs {
                topic = topic.set(key, value);
            }
            let options = AdminOptions::new().operation_timeout(Some(clients.admin_timeout()));
            let results = admin
                .create_topics([&topic], &options)
                .await
                .map_err(create_error)?;
            for result in results {
                match result {
                    Ok(_) => {}
                    // Another `apply` won the race: the topic exists, which is what we wanted.
                    Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                    Err((_, code)) => return Err(create_error(KafkaError::AdminOp(code))),
                }
            }
            Ok(())
        }
    }
}

async fn check_configs(
    admin: &AdminClient<DefaultClientContext>,
    clients: &KafkaClients,
    spec: &TopicSpec,
    report: &mut ApplyReport,
) {
    let options = AdminOptions::new().request_timeout(Some(clients.admin_timeout()));
    let described = admin
        .describe_configs([&ResourceSpecifier::Topic(&spec.name)], &options)
        .await;
    let resource = match described {
        Ok(mut results) => match results.pop() {
            Some(Ok(resource)) if !resource.entries.is_empty() => resource,
            _ => {
                report.notes.push(format!(
                    "{}: the broker does not report topic configs; configs not checked",
                    spec.name
                ));
                return;
            }
        },
        Err(e) => {
            report.notes.push(format!(
                "{}: describing configs failed ({e}); configs not checked",
                spec.name
            ));
            return;
        }
    };
    report.drift.extend(config_drift(spec, |key| {
        resource.get(key).and_then(|e| e.value.clone())
    }));
}

/// How the configs a broker reports (`have`) differ from the catalog's: cleanup policy and
/// retention, so a topic whose retention was lowered (and would delete what replay needs) is
/// reported like any other drift.
pub fn config_drift(spec: &TopicSpec, have: impl Fn(&str) -> Option<String>) -> Vec<Drift> {
    let mut drift = Vec::new();
    for (key, want) in spec.configs() {
        let have = have(key);
        if have.as_deref() != Some(want.as_str()) {
            let why = if key == "retention.ms" {
                " (records older than the retention are deleted; replay and reconcile need the \
                 whole log)"
            } else {
                ""
            };
            drift.push(Drift {
                topic: spec.name.clone(),
                problem: format!(
                    "{key} is {}, the catalog says {want}; left as is{why}",
                    have.as_deref().unwrap_or("unset")
                ),
            });
        }
    }
    drift
}

/// New topics take a moment to get leaders; consumers that subscribe before would see nothing.
async fn wait_for_leaders(
    probe: &MetadataProbe,
    clients: &KafkaClients,
    created: &[String],
) -> Result<(), ApplyError> {
    if created.is_empty() {
        return Ok(());
    }
    let waited = clients.admin_timeout();
    let deadline = tokio::time::Instant::now() + waited;
    loop {
        let cluster = describe(probe, clients)?;
        let pending = created.iter().find(|name| {
            !cluster
                .topics
                .get(name.as_str())
                .is_some_and(|t| t.partitions > 0 && t.all_have_leaders)
        });
        match pending {
            None => return Ok(()),
            Some(topic) if tokio::time::Instant::now() >= deadline => {
                return Err(ApplyError::NotReady {
                    topic: topic.clone(),
                    waited,
                })
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lowered_retention_is_drift() {
        let catalog = Catalog::load().expect("catalog");
        let orders = catalog
            .get(crate::names::ORDERS_EVENTS)
            .expect("orders.events");
        let as_catalog = |key: &str| match key {
            "cleanup.policy" => Some("delete".to_owned()),
            "retention.ms" => Some(crate::FOREVER.to_string()),
            _ => None,
        };
        assert!(config_drift(orders, as_catalog).is_empty());
        let lowered = |key: &str| match key {
            "cleanup.policy" => Some("delete".to_owned()),
            "retention.ms" => Some("604800000".to_owned()),
            _ => None,
        };
        let drift = config_drift(orders, lowered);
        assert_eq!(drift.len(), 1, "{drift:?}");
        assert!(
            drift[0].problem.starts_with(&format!(
                "retention.ms is 604800000, the catalog says {}",
                crate::FOREVER
            )),
            "{drift:?}"
        );
    }
}
