//! Processors: the runtime that runs a step exactly once per input on any broker
//! ([`runtime`], with changelog-backed [`state`]), and the steps: the order [`saga`], the
//! [`inventory`] processor and the [`payments`] worker.
//!
//! A step is plain code ([`runtime::Step`]): it sees one decoded event and the state of its
//! partition, and pushes output events; it never touches Kafka, so it is unit-tested without a
//! broker. The runtime owns consuming, batching, transactions, state restore, positions and dead
//! letters. [`processors`] lists the processors the binary runs — the one place that decides
//! which exist and what they read and write.

pub mod inventory;
pub mod metrics;
pub mod payments;
pub mod runtime;
pub mod saga;
pub mod sequence;
pub mod state;

use std::{future::Future, pin::Pin, sync::Arc};

use orderflow_platform::{config::Settings, health::Readiness, kafka::KafkaClients};
use orderflow_schemas::Codec;
use orderflow_topics::names;
use tokio_util::sync::CancellationToken;

pub use metrics::ProcessorMetrics;
pub use runtime::{Outputs, ProcessorError, ProcessorIo, ProcessorRuntime, Step};
pub use saga::rules::SagaRules;

/// A processor's run loop, ready to be spawned.
pub type ProcessorTask = Pin<Box<dyn Future<Output = ()> + Send>>;

/// What every processor runtime needs from the process.
#[derive(Clone)]
pub struct RuntimeDeps {
    pub clients: KafkaClients,
    pub codec: Arc<Codec>,
    pub metrics: ProcessorMetrics,
    pub readiness: Option<Readiness>,
}

/// What the processors of the process role need: their runtimes', the gateway, the switches.
#[derive(Clone)]
pub struct ProcessorDeps {
    pub runtime: RuntimeDeps,
    /// The payment gateway's client (its URL and TLS, from `payment.*`).
    pub gateway: orderflow_gateway::GatewayClient,
    /// The operational switches (a processor named in `switches.paused_processors` pauses).
    pub switches: Option<orderflow_platform::switches::Switches>,
}

/// The saga processor's inputs and outputs.
pub const SAGA: ProcessorIo = ProcessorIo {
    name: "saga",
    input_topic: names::ORDERS_EVENTS,
    dead_letter_topic: names::SAGA_DLQ,
    changelog_topic: Some(names::SAGA_CHANGELOG),
};

pub const INVENTORY: ProcessorIo = ProcessorIo {
    name: "inventory",
    input_topic: names::INVENTORY_COMMANDS,
    dead_letter_topic: names::INVENTORY_DLQ,
    changelog_topic: Some(names::INVENTORY_CHANGELOG),
};

pub const PAYMENTS: ProcessorIo = ProcessorIo {
    name: "payments",
    input_topic: names::PAYMENTS_REQUESTS,
    dead_letter_topic: names::PAYMENTS_DLQ,
    changelog_topic: None,
};

/// Every processor of the process role.
pub const PROCESSORS: [ProcessorIo; 3] = [SAGA, INVENTORY, PAYMENTS];

/// Where the saga writes.
pub const SAGA_TOPICS: saga::SagaTopics = saga::SagaTopics {
    orders: names::ORDERS_EVENTS,
    inventory_commands: names::INVENTORY_COMMANDS,
    payment_requests: names::PAYMENTS_REQUESTS,
};

/// The saga step, built from the settings (its configured rules: [`saga::rules`]).
pub fn saga_step(settings: &Settings) -> saga::Saga {
    saga::Saga::new(
        SagaRules::from_settings(settings),
        SAGA_TOPICS,
        settings.state.retention_ms,
    )
}

/// One processor's runtime, ready to spawn.
fn runtime_task<S: Step>(
    io: ProcessorIo,
    step: S,
    settings: &Settings,
    deps: &RuntimeDeps,
    switches: Option<&orderflow_platform::switches::Switches>,
    cancel: &CancellationToken,
) -> (&'static str, ProcessorTask) {
    let mut runtime = ProcessorRuntime::new(
        io,
        step,
        deps.clients.clone(),
        &settings.processor,
        deps.codec.clone(),
        deps.metrics.clone(),
    );
    if let Some(readiness) = &deps.readiness {
        runtime = runtime.with_readiness(readiness.clone());
    }
    if let Some(switches) = switches {
        runtime = runtime.with_switches(switches.clone());
    }
    let cancel = cancel.clone();
    (io.name, Box::pin(runtime.run(cancel)))
}

/// The shadow `name` of the saga (`orderflow process --shadow NAME`) as a task: it consumes
/// the live `orders.events` under its own consumer group (`orderflow-shadow-NAME-saga`), keeps
/// its own changelog, and writes every output to the shadow's topics
/// ([`names::shadow_topic`]), where `orderflow shadow diff NAME` compares them with the live
/// saga's. It calls nothing outside: no inventory or payment processor acts on its commands, and
/// it reads the live inventory's and gateway's answers (to the same request ids wherever it
/// decided as the live saga did). Names are built once per process, for the process's life.
pub fn shadow_saga(
    settings: &Settings,
    deps: &RuntimeDeps,
    cancel: &CancellationToken,
    name: &str,
) -> (&'static str, ProcessorTask) {
    let leak = |topic: &str| -> &'static str { names::shadow_topic(name, topic).leak() };
    let io = ProcessorIo {
        name: format!("shadow-{name}-saga").leak(),
        input_topic: names::ORDERS_EVENTS,
        dead_letter_topic: leak(names::SAGA_DLQ),
        changelog_topic: Some(leak(names::SAGA_CHANGELOG)),
    };
    let topics = saga::SagaTopics {
        orders: leak(names::ORDERS_EVENTS),
        inventory_commands: leak(names::INVENTORY_COMMANDS),
        payment_requests: leak(names::PAYMENTS_REQUESTS),
    };
    let step = saga::Saga::new(
        SagaRules::from_settings(settings),
        topics,
        settings.state.retention_ms,
    )
    .shadow();
    // No switches: a shadow is started and stopped on its own.
    runtime_task(io, step, settings, deps, None, cancel)
}

/// Every processor, each as a task that runs until `cancel` fires.
pub fn processors(
    settings: &Settings,
    deps: &ProcessorDeps,
    cancel: &CancellationToken,
) -> Vec<(&'static str, ProcessorTask)> {
    fn task<S: Step>(
        io: ProcessorIo,
        step: S,
        settings: &Settings,
        deps: &ProcessorDeps,
        cancel: &CancellationToken,
    ) -> (&'static str, ProcessorTask) {
        runtime_task(
            io,
            step,
            settings,
            &deps.runtime,
            deps.switches.as_ref(),
            cancel,
        )
    }
    vec![
        task(SAGA, saga_step(settings), settings, deps, cancel),
        task(
            INVENTORY,
            inventory::Inventory::new(names::ORDERS_EVENTS, settings.state.retention_ms),
            settings,
            deps,
            cancel,
        ),
        task(
            PAYMENTS,
            payments::PaymentWorker::new(
                deps.gateway.clone(),
                &settings.payment,
                deps.runtime.metrics.gateway.clone(),
                names::ORDERS_EVENTS,
            ),
            settings,
            deps,
            cancel,
        ),
    ]
}

#[cfg(test)]
mod io_tests {
    use super::*;

    /// The dead-letter tools release held letters on the topics of the processors that park
    /// keys: exactly those with a changelog (`sequence`).
    #[test]
    fn the_sequenced_dead_letter_topics_are_those_of_the_processors_with_state() {
        let with_state: Vec<&str> = PROCESSORS
            .iter()
            .filter(|p| p.changelog_topic.is_some())
            .map(|p| p.dead_letter_topic)
            .collect();
        assert_eq!(with_state, names::SEQUENCED_DEAD_LETTER_TOPICS);
    }
}
