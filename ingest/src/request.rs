//! The order request body and its conversion into an `OrderPlaced` event.

use orderflow_platform::http::FieldError;
use orderflow_schemas::{
    ids::derived_event_id, pan::contains_card_number, Address, Envelope, EventKind, OrderLine,
    OrderPlaced,
};
use serde::Deserialize;
use uuid::Uuid;

/// Role of the `OrderPlaced` event id, derived from the order id. Never rename.
const ROLE_PLACED: &str = "ingest/placed";
/// Longest accepted identifier-like string (customer id, SKU, token).
const MAX_ID_LEN: usize = 128;
/// Longest accepted free-text string (names, address lines).
const MAX_TEXT_LEN: usize = 512;

/// An order as a producer sends it. Amounts are in minor units (cents) of `currency`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderRequest {
    pub customer_id: String,
    pub currency: String,
    pub lines: Vec<LineRequest>,
    pub shipping_address: AddressRequest,
    /// The payment provider's token for the customer's payment method. Never card data.
    pub payment_token: String,
    /// Sum of the lines; computed when absent.
    #[serde(default)]
    pub subtotal_minor: Option<i64>,
    #[serde(default)]
    pub shipping_minor: i64,
    #[serde(default)]
    pub tax_minor: i64,
    /// What the customer pays, as the producer computed it; validation checks it.
    pub total_minor: i64,
}

#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LineRequest {
    pub sku: String,
    pub quantity: i32,
    pub unit_price_minor: i64,
}

#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddressRequest {
    pub name: String,
    pub line1: String,
    #[serde(default)]
    pub line2: Option<String>,
    pub city: String,
    pub postal_code: String,
    pub country: String,
}

/// Why a body is not an order.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("the body is not JSON: {0}")]
    Syntax(String),
    /// Some field looked like a card number. The value is never echoed or logged.
    #[error("the body carries what looks like a card number at {field}")]
    CardData { field: String },
    #[error("the body does not match the order schema")]
    Invalid(Vec<FieldError>),
}

/// The documented shape of [`OrderRequest`].
static SHAPE: std::sync::LazyLock<orderflow_platform::shape::Shape> =
    std::sync::LazyLock::new(orderflow_platform::shape::Shape::of::<OrderRequest>);

/// Parses a request body into an order request, checking everything the edge checks.
pub fn parse(body: &[u8]) -> Result<OrderRequest, RequestError> {
    parse_value(parse_json(body)?)
}

/// Parses JSON text (one order, a batch array, or one NDJSON line).
pub fn parse_json(body: &[u8]) -> Result<serde_json::Value, RequestError> {
    // serde_json's syntax messages carry only position information, never content.
    serde_json::from_slice(body).map_err(|e| RequestError::Syntax(e.to_string()))
}

/// Checks one order given as JSON.
pub fn parse_value(value: serde_json::Value) -> Result<OrderRequest, RequestError> {
    if let Some(field) = find_card_number(&value, String::new()) {
        return Err(RequestError::CardData { field });
    }
    // Every shape error at once (deserializing would stop at the first).
    let shape = SHAPE.errors(&value);
    if !shape.is_empty() {
        return Err(RequestError::Invalid(shape));
    }
    let request: OrderRequest = serde_path_to_error::deserialize(value).map_err(|e| {
        let field = e.path().to_string();
        RequestError::Invalid(vec![FieldError {
            field: if field == "." { String::new() } else { field },
            message: e.into_inner().to_string(),
        }])
    })?;
    let errors = request.field_errors();
    if errors.is_empty() {
        Ok(request)
    } else {
        Err(RequestError::Invalid(errors))
    }
}

/// The path of the first string or number that looks like a card number.
fn find_card_number(value: &serde_json::Value, path: String) -> Option<String> {
    match value {
        serde_json::Value::String(s) => contains_card_number(s).then_some(path),
        serde_json::Value::Number(n) => contains_card_number(&n.to_string()).then_some(path),
        serde_json::Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, v)| find_card_number(v, format!("{path}[{i}]"))),
        serde_json::Value::Object(map) => map.iter().find_map(|(k, v)| {
            let child = if path.is_empty() {
                k.clone()
            } else {
                format!("{path}.{k}")
            };
            // A key can carry data too.
            if contains_card_number(k) {
                return Some(child);
            }
            find_card_number(v, child)
        }),
        serde_json::Value::Bool(_) | serde_json::Value::Null => None,
    }
}

impl OrderRequest {
    /// Structural checks: required text present and bounded, at least one line. Business rules
    /// are the saga's.
    fn field_errors(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        let mut text = |field: &str, value: &str, max: usize| {
            if value.trim().is_empty() {
                errors.push(FieldError {
                    field: field.to_owned(),
                    message: "must not be empty".to_owned(),
                });
            } else if value.len() > max {
                errors.push(FieldError {
                    field: field.to_owned(),
                    message: format!("must be at most {max} bytes"),
                });
            }
        };
        text("customer_id", &self.customer_id, MAX_ID_LEN);
        text("currency", &self.currency, 3);
        text("payment_token", &self.payment_token, MAX_ID_LEN);
        let a = &self.shipping_address;
        text("shipping_address.name", &a.name, MAX_TEXT_LEN);
        text("shipping_address.line1", &a.line1, MAX_TEXT_LEN);
        text("shipping_address.city", &a.city, MAX_TEXT_LEN);
        text("shipping_address.postal_code", &a.postal_code, MAX_ID_LEN);
        text("shipping_address.country", &a.country, 2);
        if let Some(line2) = &a.line2 {
            if line2.len() > MAX_TEXT_LEN {
                text("shipping_address.line2", line2, MAX_TEXT_LEN);
            }
        }
        for (i, line) in self.lines.iter().enumerate() {
            text(&format!("lines[{i}].sku"), &line.sku, MAX_ID_LEN);
        }
        if self.lines.is_empty() {
            errors.push(FieldError {
                field: "lines".to_owned(),
                message: "an order needs at least one line".to_owned(),
            });
        }
        if self.subtotal_minor.is_none() && self.computed_subtotal().is_none() {
            errors.push(FieldError {
                field: "lines".to_owned(),
                message: "the line amounts overflow".to_owned(),
            });
        }
        errors
    }

    fn computed_subtotal(&self) -> Option<i64> {
        self.lines.iter().try_fold(0i64, |sum, l| {
            i64::from(l.quantity)
                .checked_mul(l.unit_price_minor)
                .and_then(|v| sum.checked_add(v))
        })
    }

    /// The `OrderPlaced` event for this request: a new order id (UUIDv7, time-ordered), an
    /// event id derived from it, sequence 1.
    pub fn into_event(self, order_id: Uuid, occurred_at_ms: i64) -> OrderPlaced {
        let subtotal_minor = self
            .subtotal_minor
            .or_else(|| self.computed_subtotal())
            .unwrap_or_default();
        OrderPlaced {
            envelope: Envelope {
                event_id: derived_event_id(order_id, ROLE_PLACED).to_string(),
                order_id: order_id.to_string(),
                customer_id: self.customer_id,
                occurred_at: occurred_at_ms,
                causation_id: None,
                sequence: 1,
                schema_version: EventKind::OrderPlaced.schema_version(),
            },
            currency: self.currency,
            lines: self
                .lines
                .into_iter()
                .map(|l| OrderLine {
                    sku: l.sku,
                    quantity: l.quantity,
                    unit_price_minor: l.unit_price_minor,
                })
                .collect(),
            shipping_address: Address {
                name: self.shipping_address.name,
                line1: self.shipping_address.line1,
                line2: self.shipping_address.line2,
                city: self.shipping_address.city,
                postal_code: self.shipping_address.postal_code,
                country: self.shipping_address.country,
            },
            payment_token: self.payment_token,
            subtotal_minor,
            shipping_minor: self.shipping_minor,
            tax_minor: self.tax_minor,
            total_minor: self.total_minor,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body() -> serde_json::Value {
        serde_json::json!({
            "customer_id": "c-1",
            "currency": "EUR",
            "lines": [{"sku": "SKU-00001", "quantity": 2, "unit_price_minor": 1000}],
            "shipping_address": {"name": "A", "line1": "B", "city": "C", "postal_code": "D", "country": "DE"},
            "payment_token": "tok_1",
            "total_minor": 2000
        })
    }

    #[test]
    fn a_complete_body_parses_and_computes_the_subtotal() {
        let request = parse(body().to_string().as_bytes()).expect("valid");
        let order_id = Uuid::now_v7();
        let event = request.into_event(order_id, 5);
        assert_eq!(event.subtotal_minor, 2000);
        assert_eq!(event.envelope.sequence, 1);
        assert_eq!(event.envelope.order_id, order_id.to_string());
        assert_eq!(
            event.envelope.event_id,
            derived_event_id(order_id, ROLE_PLACED).to_string()
        );
    }

    #[test]
    fn syntax_errors_are_reported() {
        assert!(matches!(parse(b"{"), Err(RequestError::Syntax(_))));
    }

    #[test]
    fn type_errors_name_the_field() {
        let mut b = body();
        b["lines"][0]["quantity"] = serde_json::json!("two");
        let Err(RequestError::Invalid(errors)) = parse(b.to_string().as_bytes()) else {
            panic!("expected Invalid");
        };
        assert_eq!(errors[0].field, "lines[0].quantity");
    }

    #[test]
    fn missing_and_empty_fields_are_all_listed() {
        let mut b = body();
        b["customer_id"] = serde_json::json!("");
        b["lines"] = serde_json::json!([]);
        b["shipping_address"]["city"] = serde_json::json!(" ");
        let Err(RequestError::Invalid(errors)) = parse(b.to_string().as_bytes()) else {
            panic!("expected Invalid");
        };
        let fields: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["customer_id", "shipping_address.city", "lines"]);

        let mut b = body();
        b.as_object_mut().expect("object").remove("total_minor");
        let Err(RequestError::Invalid(errors)) = parse(b.to_string().as_bytes()) else {
            panic!("expected Invalid");
        };
        assert_eq!(errors[0].field, "total_minor", "{errors:?}");
        assert_eq!(errors[0].message, "is required");
    }

    #[test]
    fn every_shape_error_is_listed_at_once() {
        let mut b = body();
        b.as_object_mut().expect("object").remove("currency");
        b["total_minor"] = serde_json::json!("12");
        b["lines"][0]["quantity"] = serde_json::json!(1e12);
        b["lines"][0]["colour"] = serde_json::json!("red");
        b["shipping_address"]
            .as_object_mut()
            .expect("object")
            .remove("city");
        b["shipping_address"]["line2"] = serde_json::json!(null);
        let Err(RequestError::Invalid(errors)) = parse(b.to_string().as_bytes()) else {
            panic!("expected Invalid");
        };
        let mut fields: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
        fields.sort_unstable();
        assert_eq!(
            fields,
            [
                "currency",
                "lines[0].colour",
                "lines[0].quantity",
                "shipping_address.city",
                "total_minor"
            ],
            "{errors:?}"
        );
    }

    #[test]
    fn card_numbers_anywhere_are_refused_without_echo() {
        for (path, value) in [
            ("/payment_token", serde_json::json!("4242424242424242")),
            (
                "/shipping_address/name",
                serde_json::json!("card 4111 1111 1111 1111"),
            ),
            ("/total_minor", serde_json::json!(4_242_424_242_424_242_i64)),
        ] {
            let mut b = body();
            *b.pointer_mut(path).expect("path exists") = value;
            match parse(b.to_string().as_bytes()) {
                Err(e @ RequestError::CardData { .. }) => {
                    let text = e.to_string();
                    assert!(
                        !text.contains("4242424242424242") && !text.contains("4111"),
                        "{text}"
                    );
                }
                other => panic!("{path}: expected CardData, got {other:?}"),
            }
        }
    }
}
