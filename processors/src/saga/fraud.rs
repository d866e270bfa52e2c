//! Fraud scoring: hard rules plus a logistic model over an order's features, with weights and
//! thresholds from `[fraud]`. Pure: the features come from the order and the customer's state,
//! time from event timestamps, and the model is the partition's (part of the log: [`super::rules`]),
//! so a re-scored order scores the same.

use orderflow_platform::config::FraudSettings;
use orderflow_schemas::{FraudDecision, OrderPlaced};
use serde::{Deserialize, Serialize};

/// How many time buckets a customer's velocity window is cut into.
pub const VELOCITY_BUCKETS: usize = 12;

/// What the saga remembers of a customer for scoring (partition-local: orders are keyed by
/// customer). Fixed size whatever the customer's traffic: the velocity window is counted in
/// [`VELOCITY_BUCKETS`] time buckets, never as a list of orders.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CustomerState {
    /// Width of a bucket (the velocity window / [`VELOCITY_BUCKETS`] when they were counted).
    #[serde(default)]
    pub bucket_ms: i64,
    /// `(bucket index, orders)`: the customer's orders per bucket (index = event time /
    /// `bucket_ms`), the newest [`VELOCITY_BUCKETS`] buckets at most, oldest first.
    #[serde(default)]
    pub buckets: Vec<(i64, u32)>,
    pub orders_seen: u64,
    pub last_country: Option<String>,
    /// Event time of the customer's newest order: the horizon counts from it.
    #[serde(default)]
    pub last_at: i64,
}

impl CustomerState {
    /// Records `placed`, a new order of the customer (the saga drops repeats before scoring).
    pub fn record(&mut self, placed: &OrderPlaced, window_ms: i64) {
        let at = placed.envelope.occurred_at;
        let width = bucket_width(window_ms);
        if self.bucket_ms != width {
            // The window changed: the old buckets do not divide into the new ones.
            self.buckets.clear();
            self.bucket_ms = width;
        }
        let index = at.div_euclid(width);
        match self.buckets.binary_search_by_key(&index, |(i, _)| *i) {
            Ok(found) => self.buckets[found].1 = self.buckets[found].1.saturating_add(1),
            Err(position) => self.buckets.insert(position, (index, 1)),
        }
        let newest = self.buckets.last().map_or(index, |(i, _)| *i);
        self.buckets
            .retain(|(i, _)| *i > newest - VELOCITY_BUCKETS as i64);
        self.orders_seen += 1;
        self.last_country = Some(placed.shipping_address.country.clone());
        self.last_at = self.last_at.max(at);
    }

    /// The customer's orders recorded in the window ending with the bucket of `at`.
    pub fn velocity(&self, at: i64, window_ms: i64) -> u64 {
        let width = bucket_width(window_ms);
        if self.bucket_ms != width {
            return 0;
        }
        let index = at.div_euclid(width);
        self.buckets
            .iter()
            .filter(|(i, _)| *i <= index && *i > index - VELOCITY_BUCKETS as i64)
            .map(|(_, n)| u64::from(*n))
            .sum()
    }

    /// The event time the customer's entry expires from (plus the horizon).
    pub fn expires_at(&self) -> i64 {
        self.last_at
    }
}

fn bucket_width(window_ms: i64) -> i64 {
    (window_ms / VELOCITY_BUCKETS as i64).max(1)
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
    // The customer's state never holds this order yet: the saga scores an order once, and a
    // re-run after a failed batch restores the state from before that batch.
    let velocity = customer.velocity(at, model.velocity_window_ms);
    let first_order = customer.orders_seen == 0;
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
    if velocity + 1 > u64::from(model.max_orders_per_window) {
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
    if model.hold_all_for_review && decision == FraudDecision::Approve {
        decision = FraudDecision::Review;
        reasons
            .push("switch: every order is held for review (fraud.hold_all_for_review)".to_owned());
    }
    reasons.insert(0, format!("score {score:.4} (model {})", model.model));
    Assessment {
        score,
        decision,
        reasons,
    }
}
