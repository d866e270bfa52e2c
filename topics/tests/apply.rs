//! `topics apply` against real brokers: the embedded one, a separate Tansu process, and the
//! mock cluster (which takes topics through its own API).

use orderflow_platform::{
    config::{Overrides, Settings},
    kafka::KafkaClients,
};
use orderflow_testkit::Broker;
use orderflow_topics::{
    apply::{apply, Provisioner},
    names, Catalog,
};
use rdkafka::{
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
};

fn clients(broker: &Broker) -> KafkaClients {
    let settings = Settings::load(None, &Overrides::default()).expect("default settings");
    KafkaClients::new(&settings.kafka, broker.bootstrap())
}

fn provisioner(broker: &Broker) -> Provisioner<'_> {
    match broker.as_mock() {
        Some(mock) => Provisioner::Mock(mock),
        None => Provisioner::Admin,
    }
}

async fn apply_twice_is_a_no_op(broker: Broker) {
    let catalog = Catalog::load().expect("catalog");
    let clients = clients(&broker);
    let first = apply(&catalog, &clients, provisioner(&broker))
        .await
        .expect("first apply");
    assert_eq!(first.created.len(), catalog.topics.len(), "{first}");
    assert!(!first.has_drift(), "{first}");

    let second = apply(&catalog, &clients, provisioner(&broker))
        .await
        .expect("second apply");
    assert!(second.created.is_empty(), "second apply created: {second}");
    assert!(!second.has_drift(), "{second}");
    assert_eq!(second.unchanged.len(), catalog.topics.len(), "{second}");
}

async fn drift_is_reported_and_left_alone(broker: Broker) {
    let catalog = Catalog::load().expect("catalog");
    let clients = clients(&broker);
    // Someone created orders.events by hand with the wrong partition count.
    match broker.as_mock() {
        Some(mock) => mock
            .cluster()
            .create_topic(names::ORDERS_EVENTS, 2, 1)
            .expect("create by hand"),
        None => {
            let admin: AdminClient<DefaultClientContext> =
                clients.admin().create().expect("admin client");
            let topic = NewTopic::new(names::ORDERS_EVENTS, 2, TopicReplication::Fixed(1));
            for result in admin
                .create_topics([&topic], &AdminOptions::new())
                .await
                .expect("create by hand")
            {
                result.expect("created");
            }
        }
    }
    let report = apply(&catalog, &clients, provisioner(&broker))
        .await
        .expect("apply");
    let drift: Vec<_> = report
        .drift
        .iter()
        .filter(|d| d.topic == names::ORDERS_EVENTS)
        .collect();
    assert_eq!(drift.len(), 1, "{report}");
    assert!(drift[0].problem.contains("has 2 partitions"), "{report}");
    assert!(!report.created.iter().any(|t| t == names::ORDERS_EVENTS));
    // The other topics were still created.
    assert_eq!(report.created.len(), catalog.topics.len() - 1, "{report}");

    // Nothing was changed: a second apply reports the same drift.
    let again = apply(&catalog, &clients, provisioner(&broker))
        .await
        .expect("apply again");
    assert_eq!(again.drift, report.drift);
}

mod embedded {
    use super::*;

    #[tokio::test]
    async fn apply_twice_is_a_no_op() {
        let Some(broker) = Broker::embedded() else {
            return;
        };
        super::apply_twice_is_a_no_op(broker).await;
    }

    #[tokio::test]
    async fn drift_is_reported_and_left_alone() {
        let Some(broker) = Broker::embedded() else {
            return;
        };
        super::drift_is_reported_and_left_alone(broker).await;
    }
}

mod mock {
    use super::*;

    #[tokio::test]
    async fn apply_twice_is_a_no_op() {
        super::apply_twice_is_a_no_op(Broker::mock()).await;
    }
}

mod tansu {
    use super::*;

    #[tokio::test]
    async fn apply_twice_is_a_no_op() {
        let Some(broker) = Broker::tansu() else {
            return;
        };
        super::apply_twice_is_a_no_op(broker).await;
    }

    #[tokio::test]
    async fn drift_is_reported_and_left_alone() {
        let Some(broker) = Broker::tansu() else {
            return;
        };
        super::drift_is_reported_and_left_alone(broker).await;
    }
}
