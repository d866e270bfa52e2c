//! Validation: the business rules an order must meet before the saga goes on. Every failed rule
//! becomes one [`Reason`]; an order is rejected with all of them, not just the first.

use std::collections::BTreeSet;

use orderflow_platform::config::ValidationSettings;
use orderflow_schemas::{pan::contains_card_number, OrderPlaced, Reason};

/// The rules, from `[validation]` in the config.
#[derive(Debug, Clone)]
pub struct Rules {
    currencies: BTreeSet<String>,
    max_lines: usize,
    max_quantity_per_line: i32,
}

fn reason(code: &str, field: impl Into<String>, message: impl Into<String>) -> Reason {
    Reason {
        code: code.to_owned(),
        field: Some(field.into()),
        message: message.into(),
    }
}

pub use orderflow_schemas::is_valid_sku;

impl Rules {
    pub fn from_settings(settings: &ValidationSettings) -> Self {
        Self {
            currencies: settings.currencies.iter().cloned().collect(),
            max_lines: settings.max_lines,
            max_quantity_per_line: settings.max_quantity_per_line,
        }
    }

    /// Every rule the order breaks; empty when it is valid.
    pub fn check(&self, order: &OrderPlaced) -> Vec<Reason> {
        let mut reasons = Vec::new();
        if !self.currencies.contains(&order.currency) {
            reasons.push(reason(
                "currency_not_accepted",
                "currency",
                format!(
                    "currency {:?} is not accepted; accepted: {}",
                    order.currency,
                    self.currencies
                        .iter()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        if order.lines.is_empty() {
            reasons.push(reason(
                "no_lines",
                "lines",
                "an order needs at least one line",
            ));
        }
        if order.lines.len() > self.max_lines {
            reasons.push(reason(
                "too_many_lines",
                "lines",
                format!(
                    "{} lines; at most {} allowed",
                    order.lines.len(),
                    self.max_lines
                ),
            ));
        }
        let mut subtotal: Option<i64> = Some(0);
        for (i, line) in order.lines.iter().enumerate() {
            if !is_valid_sku(&line.sku) {
                reasons.push(reason(
                    "invalid_sku",
                    format!("lines[{i}].sku"),
                    "a SKU is 1-64 letters, digits, '-' or '_'",
                ));
            }
            if line.quantity < 1 || line.quantity > self.max_quantity_per_line {
                reasons.push(reason(
                    "invalid_quantity",
                    format!("lines[{i}].quantity"),
                    format!(
                        "quantity {} is outside 1..={}",
                        line.quantity, self.max_quantity_per_line
                    ),
                ));
            }
            if line.unit_price_minor < 0 {
                reasons.push(reason(
                    "negative_price",
                    format!("lines[{i}].unit_price_minor"),
                    "a unit price cannot be negative",
                ));
            }
            subtotal = subtotal.and_then(|s| {
                i64::from(line.quantity)
                    .checked_mul(line.unit_price_minor)
                    .and_then(|l| s.checked_add(l))
            });
        }
        for (field, value) in [
            ("shipping_minor", order.shipping_minor),
            ("tax_minor", order.tax_minor),
        ] {
            if value < 0 {
                reasons.push(reason(
                    "negative_amount",
                    field,
                    format!("{field} cannot be negative"),
                ));
            }
        }
        match subtotal {
            None => reasons.push(reason(
                "amount_overflow",
                "lines",
                "the line amounts overflow",
            )),
            Some(sum) if sum != order.subtotal_minor => reasons.push(reason(
                "subtotal_mismatch",
                "subtotal_minor",
                format!(
                    "subtotal {} is not the sum of the lines, {sum}",
                    order.subtotal_minor
                ),
            )),
            Some(_) => {}
        }
        let total = order
            .subtotal_minor
            .checked_add(order.shipping_minor)
            .and_then(|t| t.checked_add(order.tax_minor));
        if total != Some(order.total_minor) {
            reasons.push(reason(
                "total_mismatch",
                "total_minor",
                format!(
                    "total {} is not subtotal + shipping + tax{}",
                    order.total_minor,
                    total.map(|t| format!(" = {t}")).unwrap_or_default()
                ),
            ));
        }
        let address = &order.shipping_address;
        for (field, value) in [
            ("name", &address.name),
            ("line1", &address.line1),
            ("city", &address.city),
            ("postal_code", &address.postal_code),
        ] {
            if value.trim().is_empty() {
                reasons.push(reason(
                    "incomplete_address",
                    format!("shipping_address.{field}"),
                    format!("shipping_address.{field} is required"),
                ));
            }
        }
        if !(address.country.len() == 2 && address.country.chars().all(|c| c.is_ascii_uppercase()))
        {
            reasons.push(reason(
                "invalid_country",
                "shipping_address.country",
                "country must be an ISO 3166-1 alpha-2 code such as \"DE\"",
            ));
        }
        if order.payment_token.trim().is_empty() {
            reasons.push(reason(
                "missing_payment_token",
                "payment_token",
                "a payment token is required",
            ));
        } else if contains_card_number(&order.payment_token) {
            // The value itself is never repeated: it may be a real card number.
            reasons.push(reason(
                "card_data_in_token",
                "payment_token",
                "the payment token looks like a card number; send the provider's token instead",
            ));
        }
        reasons
    }
}
