//! The saga's state of one `orders.events` partition: one entry per order (`o:<order id>`), one
//! per customer for fraud scoring (`c:<customer id>`), and the partition's event-time clock
//! (`t:clock`).
//!
//! Bounded: an order's entry is O(1) (its lines, stage and sequence); a customer's is a fixed
//! number of velocity buckets ([`CustomerState`]). Orders that reached a final stage (rejected,
//! cancelled, confirmed) are kept only to recognise duplicates and late answers, and are
//! dropped, with a tombstone, once the partition's clock is `state.retention_ms` past the time
//! they finished; customers are dropped once idle that long (and longer than the velocity
//! window). Orders in flight are never dropped, and are indexed apart, so the timers visit only
//! them, not every order of the horizon.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use orderflow_schemas::SkuQuantity;
use serde::{Deserialize, Serialize};

use super::{
    fraud::CustomerState,
    rules::{ActiveRules, SagaRules},
};
use crate::state::{ChangelogRecord, EventClock, Horizon, PartitionState, Store};

const RULES_KEY: &str = "rules";

/// The saga's state of one `orders.events` partition.
#[derive(Debug)]
pub struct SagaState {
    pub(super) orders: Store<OrderState>,
    pub(super) customers: Store<CustomerState>,
    clock: EventClock,
    /// Finished orders (`o:`) and customers (`c:`) by event time, for the horizon.
    horizon: Horizon,
    /// Orders not in a final stage: what the timers look at.
    active: BTreeSet<String>,
    /// The partition's rules (`g:rules`), and them compiled.
    rules: Store<SagaRules>,
    in_force: Option<Arc<ActiveRules>>,
}

impl Default for SagaState {
    fn default() -> Self {
        Self {
            orders: Store::new("o:"),
            customers: Store::new("c:"),
            clock: EventClock::default(),
            horizon: Horizon::default(),
            active: BTreeSet::new(),
            rules: Store::new("g:"),
            in_force: None,
        }
    }
}

impl SagaState {
    pub fn order(&self, order_id: &str) -> Option<&OrderState> {
        self.orders.get(order_id)
    }

    pub fn customer(&self, customer_id: &str) -> Option<&CustomerState> {
        self.customers.get(customer_id)
    }

    /// Orders held: in flight and finished within the horizon.
    pub fn orders(&self) -> usize {
        self.orders.len()
    }

    /// Customers held.
    pub fn customers(&self) -> usize {
        self.customers.len()
    }

    /// The rules in force on this partition, if it has adopted any.
    pub fn rules(&self) -> Option<&Arc<ActiveRules>> {
        self.in_force.as_ref()
    }

    /// The rules in force, adopting `configured` if the partition has none yet (the first
    /// input of a partition): from then on only a control record changes them.
    pub(super) fn rules_or_adopt(&mut self, configured: &Arc<ActiveRules>) -> Arc<ActiveRules> {
        match &self.in_force {
            Some(rules) => rules.clone(),
            None => {
                self.set_rules(configured.clone());
                configured.clone()
            }
        }
    }

    /// Puts `rules` in force (written with the batch); the same rules again change nothing.
    pub(super) fn set_rules(&mut self, rules: Arc<ActiveRules>) -> bool {
        if self.in_force.as_ref().is_some_and(|r| r.json == rules.json) {
            return false;
        }
        self.rules.put(RULES_KEY.to_owned(), rules.rules.clone());
        self.in_force = Some(rules);
        true
    }

    /// Orders in flight, with their state.
    pub(super) fn active(&self) -> impl Iterator<Item = (&String, &OrderState)> {
        self.active
            .iter()
            .filter_map(|id| self.orders.get(id).map(|order| (id, order)))
    }

    /// Advances the partition's clock to an input's event time and drops what the horizon
    /// passed: finished orders and idle customers. Returns the clock.
    pub(super) fn advance(&mut self, occurred_at: i64, retention_ms: i64) -> i64 {
        let now = self.clock.advance(occurred_at);
        let (orders, customers) = (&mut self.orders, &mut self.customers);
        self.horizon
            .expire(now.saturating_sub(retention_ms), |key, queued| {
                if let Some(id) = key.strip_prefix("o:") {
                    let order = orders.get(id)?;
                    if !order.stage.is_final() {
                        return None; // back in flight (a cancelled confirmation): queued again when it ends
                    }
                    if order.since > queued {
                        return Some(order.since);
                    }
                    orders.remove(id);
                } else if let Some(id) = key.strip_prefix("c:") {
                    let at = customers.get(id)?.expires_at();
                    if at > queued {
                        return Some(at);
                    }
                    customers.remove(id);
                }
                None
            });
        now
    }

    /// After an input with event time `occurred_at` was applied to `order_id` (and maybe
    /// its customer): keeps the in-flight index and the horizon up to date. An order that
    /// finished in this input carries its time as `since`; a customer seen for the first time
    /// has one order.
    pub(super) fn track(&mut self, order_id: &str, customer_id: &str, occurred_at: i64) {
        if let Some(order) = self.orders.get(order_id) {
            if order.stage.is_final() {
                if self.active.remove(order_id) || order.since == occurred_at {
                    self.horizon.note(format!("o:{order_id}"), order.since);
                }
            } else {
                self.active.insert(order_id.to_owned());
            }
        }
        if let Some(customer) = self.customers.get(customer_id) {
            if customer.orders_seen == 1 && customer.expires_at() == occurred_at {
                self.horizon
                    .note(format!("c:{customer_id}"), customer.expires_at());
            }
        }
    }
}

impl PartitionState for SagaState {
    fn restore(&mut self, key: &str, value: Option<&[u8]>) -> Result<(), String> {
        if self.orders.owns(key) {
            self.orders.restore(key, value).map(|_| ())
        } else if self.customers.owns(key) {
            self.customers.restore(key, value).map(|_| ())
        } else if self.clock.owns(key) {
            self.clock.restore(key, value)
        } else if self.rules.owns(key) {
            self.rules.restore(key, value).map(|_| ())
        } else {
            Err(format!("unknown saga state key {key:?}"))
        }
    }

    fn restored(&mut self) {
        self.in_force = self.rules.get(RULES_KEY).cloned().map(ActiveRules::new);
        let mut horizon = Horizon::default();
        let mut active = BTreeSet::new();
        for (id, order) in self.orders.iter() {
            if order.stage.is_final() {
                horizon.note(format!("o:{id}"), order.since);
            } else {
                active.insert(id.clone());
            }
        }
        for (id, customer) in self.customers.iter() {
            horizon.note(format!("c:{id}"), customer.expires_at());
        }
        self.horizon = horizon;
        self.active = active;
    }

    fn changes(&mut self) -> Vec<ChangelogRecord> {
        let mut out = Vec::new();
        self.orders.changes_into(&mut out);
        self.customers.changes_into(&mut out);
        self.clock.changes_into(&mut out);
        self.rules.changes_into(&mut out);
        out
    }

    fn note_written_at(&mut self, key: &str, written_at_ms: i64) {
        self.orders.note_written_at(key, written_at_ms);
    }

    fn entries(&self) -> usize {
        self.orders.len() + self.customers.len() + self.horizon.len()
    }
}

/// Where an order stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "stage", rename_all = "snake_case")]
pub enum Stage {
    /// Held for an admin's decision.
    Review {
        scored_event_id: String,
    },
    /// Waiting for the inventory's answer per SKU: the command id per SKU still pending.
    Reserving {
        request_id: String,
        pending: BTreeMap<String, String>,
        reserved: BTreeMap<String, i32>,
        shortages: Vec<(String, i32, i32)>,
    },
    /// Waiting for the payment worker's answer to `request_id`. `cause_id` is the request's
    /// causation id, kept to send the request again byte for byte (empty in states written
    /// before it was kept: such a request is not sent again).
    Paying {
        request_id: String,
        #[serde(default)]
        cause_id: String,
    },
    Confirmed,
    /// Waiting for the refund of a confirmed order the customer cancelled.
    Refunding {
        request_id: String,
        #[serde(default)]
        cause_id: String,
    },
    /// `rejected` or `cancelled`.
    Done {
        status: String,
    },
}

/// The saga's state of one order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderState {
    pub customer_id: String,
    pub currency: String,
    pub total_minor: i64,
    /// Quantity per SKU, lines of one SKU merged, sorted by SKU.
    pub lines: Vec<(String, i32)>,
    pub payment_token: String,
    /// Sequence of the last timeline event (or the slot kept for an awaited answer).
    pub sequence: i64,
    /// Event time the current stage started (deadlines run from it), or the order finished
    /// (the horizon runs from it).
    pub since: i64,
    pub stage: Stage,
    /// A cancellation that arrived while a payment was in flight: applied on its answer.
    pub cancel_requested: Option<String>,
    /// The payment request whose deadline cancelled the order: an authorization that still
    /// answers it is refunded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timed_out_payment: Option<String>,
}

impl Stage {
    /// Confirmed, rejected or cancelled: nothing more happens unless the customer cancels a
    /// confirmed order. Such orders are kept only until the horizon.
    pub fn is_final(&self) -> bool {
        matches!(self, Self::Confirmed | Self::Done { .. })
    }
}

impl OrderState {
    /// The id of the payment or refund request the order is waiting on.
    pub(super) fn awaited_payment(&self) -> Option<&str> {
        match &self.stage {
            Stage::Paying { request_id, .. } | Stage::Refunding { request_id, .. } => {
                Some(request_id)
            }
            _ => None,
        }
    }

    pub(super) fn sku_lines(&self) -> Vec<SkuQuantity> {
        self.lines
            .iter()
            .map(|(sku, quantity)| SkuQuantity {
                sku: sku.clone(),
                quantity: *quantity,
            })
            .collect()
    }
}
