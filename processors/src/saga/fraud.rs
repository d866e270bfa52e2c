//! Fraud scoring: hard rules plus a logistic model over an order's features, with weights and
//! thresholds from `[fraud]` (reloadable). Pure: the features come from the order and the
//! customer's state, time from event timestamps, so a re-scored order scores the same (as long as
//! the configuration did not change in between).

use std::sync::{Arc, RwLock};

use orderflow_platform::config::FraudSettings;
use orderflow_schemas::{FraudDecision, OrderPlaced};
use serde::{Deserialize, Serialize};

/// The model's settings, shared with the reloader: a reload takes effect for the next order.
#[derive(Debug, Clone)]
pub struct SharedModel(Arc<RwLock<FraudSettings>>);

impl SharedModel {
    pub fn new(settings: FraudSettings) -> Self {
        Self(Arc::new(RwLock::new(settings)))
    }

    pub fn reload(&self, settings: &FraudSettings) {
        match self.0.write() {
            Ok(mut current) => *current = settings.clone(),
            Err(poisoned) => *poisoned.into_inner() = settings.clone(),
        }
    }

    pub fn current(&self) -> FraudSettings {
        match self.0.read() {
            Ok(settings) => settings.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

/// What the saga remembers of a customer for scoring (partition-local: orders are keyed by
/// customer).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CustomerState {
    /// `(order_id, occurred_at)` of the customer's orders within the velocity window of the
    /// latest one, oldest first.
    pub recent: Vec<(String, i64)>,
    pub orders_seen: u64,
    pub last_country: Option<String>,
}

impl CustomerState {
    /// Records `placed` (once per order id) and forgets orders outside the window.
    pub fn record(&mut self, placed: &OrderPlaced, window_ms: i64) {
        let order_id = &placed.envelope.order_id;
        if self.recent.iter().any(|(id, _)| id == order_id) {
            return;
        }
        let at = placed.envelope.occurred_at;
        self.recent.push((order_id.clone(), at));
        self.recent.sort_by_key(|(_, t)| *t);
        let newest = self.recent.last().map_or(at, |(_, t)| *t);
        self.recent.retain(|(_, t)| *t > newest - window_ms);
        self.orders_seen += 1;
        self.last_country = Some(placed.shipping_address.country.clone());
    }
}

/// The model's verdict on one order.
#[derive(Debug, Clone, PartialEq)]
pub struct Assessment {
    pub score: f64,
    pub decision: FraudDecision,
    pub reasons: Vec<String>,
}

/// Scores `placed` for a customer whose state does not include it yet.
pub fn assess(model: &FraudSettings, placed: &OrderPlaced, customer: &CustomerState) -> Assessment {
    let at = placed.envelope.occurred_at;
    let velocity = customer
        .recent
        .iter()
        .filter(|(id, t)| {
            *id != placed.envelope.order_id && *t > at - model.velocity_window_ms && *t <= at
        })
        .count();
    // The customer's state may already hold this order (re-scoring after a crash): never count
    // the order against itself.
    let itself = u64::from(
        customer
            .recent
            .iter()
            .any(|(id, _)| *id == placed.envelope.order_id),
    );
    let first_order = customer.orders_seen.saturating_sub(itself) == 0;
    let items: i64 = placed
        .lines
        .iter()
        .map(|l| i64::from(l.quantity.max(0)))
        .sum();
    let country_change = customer
        .last_country
        .as_deref()
        .is_some_and(|c| c != placed.shipping_address.country);
    let major = placed.total_minor.max(0) as f64 / 100.0;

    let contributions = [
        (
            "amount",
            model.weight_amount * (1.0 + major).ln(),
            format!("amount {major:.2}"),
        ),
        (
            "velocity",
            model.weight_velocity * velocity as f64,
            format!(
                "{velocity} earlier orders within {} min",
                model.velocity_window_ms / 60_000
            ),
        ),
        (
            "first_order",
            if first_order {
                model.weight_first_order
            } else {
                0.0
            },
            "first order of the customer".to_owned(),
        ),
        (
            "items",
            model.weight_items * items as f64,
            format!("{items} items"),
        ),
        (
            "country_change",
            if country_change {
                model.weight_country_change
            } else {
                0.0
            },
            format!(
                "shipping country {} differs from the previous order's {}",
                placed.shipping_address.country,
                customer.last_country.as_deref().unwrap_or("-")
            ),
        ),
    ];
    let z = model.bias + contributions.iter().map(|(_, c, _)| c).sum::<f64>();
    let score = 1.0 / (1.0 + (-z).exp());
    let mut reasons: Vec<String> = contributions
        .iter()
        .filter(|(_, c, _)| *c > 0.0)
        .map(|(name, c, text)| format!("{name}: {text} (+{c:.2})"))
        .collect();

    let mut decision = if score >= model.reject_threshold {
        FraudDecision::Reject
    } else if score >= model.review_threshold {
        FraudDecision::Review
    } else {
        FraudDecision::Approve
    };
    if velocity + 1 > model.max_orders_per_window as usize {
        decision = FraudDecision::Reject;
        reasons.push(format!(
            "rule: {} orders within the window, more than {}",
            velocity + 1,
            model.max_orders_per_window
        ));
    }
    if placed.total_minor >= model.review_amount_minor && decision == FraudDecision::Approve {
        decision = FraudDecision::Review;
        reasons.push(format!(
            "rule: total {} at or above the review amount {}",
            placed.total_minor, model.review_amount_minor
        ));
    }
    reasons.insert(0, format!("score {score:.4}"));
    Assessment {
        score,
        decision,
        reasons,
    }
}
