//! The inventory processor: owns stock per SKU. It reads `inventory.commands` (keyed by SKU, so
//! one partition decides every change of a SKU, in log order) and answers the saga per line on
//! the orders topic.
//!
//! State per SKU: units available, every order's reservation (keyed by order id) and the restocks
//! applied (by event id). That makes every command idempotent (rule 2): a second reservation
//! request of an order gets the first answer again, byte for byte, and changes nothing; a release
//! releases once; a restock adds once. A release that arrives for an order whose reservation was
//! refused or never made changes nothing, and blocks a late duplicate of the reservation.
//! Stock never goes negative: a reservation is granted only from what is available.

use std::collections::{BTreeMap, BTreeSet};

use orderflow_schemas::{
    ids::derived_event_id, Envelope, EventKind, InventoryLineRejected, InventoryLineReleased,
    InventoryLineReserved, OrderEvent,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{
    runtime::{Outputs, Step, StepError},
    state::{ChangelogRecord, PartitionState, Store},
};

/// Roles of the replies, fed into their derived ids. Never rename.
const ROLE_RESERVED: &str = "inventory/reserved";
const ROLE_REJECTED: &str = "inventory/rejected";
const ROLE_RELEASED: &str = "inventory/released";

/// What happened to one order's request for one SKU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Reservation {
    Reserved { quantity: i32, available_after: i64 },
    Refused { requested: i32, available: i64 },
    Released { quantity: i32, available_after: i64 },
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SkuStock {
    pub available: i64,
    pub reservations: BTreeMap<String, Reservation>,
    pub restocks: BTreeSet<String>,
}

impl SkuStock {
    /// Units held by reservations.
    pub fn reserved(&self) -> i64 {
        self.reservations
            .values()
            .map(|r| match r {
                Reservation::Reserved { quantity, .. } => i64::from(*quantity),
                _ => 0,
            })
            .sum()
    }
}

/// Stock of the SKUs of one `inventory.commands` partition.
#[derive(Debug)]
pub struct InventoryState {
    skus: Store<SkuStock>,
}

impl Default for InventoryState {
    fn default() -> Self {
        Self {
            skus: Store::new("s:"),
        }
    }
}

impl InventoryState {
    pub fn sku(&self, sku: &str) -> Option<&SkuStock> {
        self.skus.get(sku)
    }
}

impl PartitionState for InventoryState {
    fn restore(&mut self, key: &str, value: Option<&[u8]>) -> Result<(), String> {
        self.skus.restore(key, value)
    }

    fn changes(&mut self) -> Vec<ChangelogRecord> {
        let mut out = Vec::new();
        self.skus.changes_into(&mut out);
        out
    }
}

pub struct Inventory {
    /// Where replies go (the orders topic, keyed by the order's customer).
    replies: &'static str,
}

impl Inventory {
    pub fn new(replies: &'static str) -> Self {
        Self { replies }
    }

    fn reply_envelope(
        command: &Envelope,
        role: &str,
        kind: EventKind,
    ) -> Result<Envelope, StepError> {
        let cause = Uuid::parse_str(&command.event_id)
            .map_err(|_| StepError::Poison(format!("malformed event_id {:?}", command.event_id)))?;
        Ok(Envelope {
            event_id: derived_event_id(cause, role).to_string(),
            order_id: command.order_id.clone(),
            customer_id: command.customer_id.clone(),
            occurred_at: command.occurred_at,
            causation_id: Some(command.event_id.clone()),
            sequence: 0,
            schema_version: kind.schema_version(),
        })
    }

    fn answer(
        &self,
        command: &Envelope,
        sku: &str,
        reservation: &Reservation,
        out: &mut Outputs,
    ) -> Result<(), StepError> {
        let event = match reservation {
            Reservation::Reserved {
                quantity,
                available_after,
            } => OrderEvent::InventoryLineReserved(InventoryLineReserved {
                envelope: Self::reply_envelope(
                    command,
                    ROLE_RESERVED,
                    EventKind::InventoryLineReserved,
                )?,
                sku: sku.to_owned(),
                quantity: *quantity,
                available_after: clamp(*available_after),
            }),
            Reservation::Refused {
                requested,
                available,
            } => OrderEvent::InventoryLineRejected(InventoryLineRejected {
                envelope: Self::reply_envelope(
                    command,
                    ROLE_REJECTED,
                    EventKind::InventoryLineRejected,
                )?,
                sku: sku.to_owned(),
                requested: *requested,
                available: clamp(*available),
            }),
            // A reservation request after its release: a late duplicate; nothing to say.
            Reservation::Released { .. } => return Ok(()),
        };
        out.push(self.replies, command.customer_id.clone(), event);
        Ok(())
    }
}

fn clamp(units: i64) -> i32 {
    units.clamp(0, i64::from(i32::MAX)) as i32
}

impl Step for Inventory {
    type State = InventoryState;

    fn handle(
        &mut self,
        state: &mut InventoryState,
        event: &OrderEvent,
        out: &mut Outputs,
    ) -> Result<(), StepError> {
        match event {
            OrderEvent::InventoryReservationRequested(request) => {
                let command = &request.envelope;
                for line in &request.lines {
                    let mut stock = state.skus.get(&line.sku).cloned().unwrap_or_default();
                    let reservation = match stock.reservations.get(&command.order_id) {
                        Some(existing) => existing.clone(),
                        None => {
                            let quantity = i64::from(line.quantity);
                            let reservation = if line.quantity > 0 && stock.available >= quantity {
                                stock.available -= quantity;
                                Reservation::Reserved {
                                    quantity: line.quantity,
                                    available_after: stock.available,
                                }
                            } else {
                                Reservation::Refused {
                                    requested: line.quantity,
                                    available: stock.available,
                                }
                            };
                            stock
                                .reservations
                                .insert(command.order_id.clone(), reservation.clone());
                            state.skus.put(line.sku.clone(), stock);
                            reservation
                        }
                    };
                    self.answer(command, &line.sku, &reservation, out)?;
                }
                Ok(())
            }
            OrderEvent::InventoryReleaseRequested(release) => {
                let command = &release.envelope;
                let mut stock = state.skus.get(&release.sku).cloned().unwrap_or_default();
                match stock.reservations.get(&command.order_id).cloned() {
                    Some(Reservation::Released { .. }) | Some(Reservation::Refused { .. }) => {
                        return Ok(())
                    }
                    Some(Reservation::Reserved { quantity, .. }) => {
                        stock.available += i64::from(quantity);
                        stock.reservations.insert(
                            command.order_id.clone(),
                            Reservation::Released {
                                quantity,
                                available_after: stock.available,
                            },
                        );
                        out.push(
                            self.replies,
                            command.customer_id.clone(),
                            OrderEvent::InventoryLineReleased(InventoryLineReleased {
                                envelope: Self::reply_envelope(
                                    command,
                                    ROLE_RELEASED,
                                    EventKind::InventoryLineReleased,
                                )?,
                                sku: release.sku.clone(),
                                quantity,
                                available_after: clamp(stock.available),
                            }),
                        );
                    }
                    None => {
                        // Nothing reserved (yet): remember the release so that a late
                        // duplicate of the request is not granted.
                        stock.reservations.insert(
                            command.order_id.clone(),
                            Reservation::Released {
                                quantity: 0,
                                available_after: stock.available,
                            },
                        );
                    }
                }
                state.skus.put(release.sku.clone(), stock);
                Ok(())
            }
            OrderEvent::InventoryRestocked(restock) => {
                if restock.quantity <= 0 {
                    return Err(StepError::Poison(format!(
                        "restock of {} with quantity {}: expected a positive quantity",
                        restock.sku, restock.quantity
                    )));
                }
                let mut stock = state.skus.get(&restock.sku).cloned().unwrap_or_default();
                if stock.restocks.insert(restock.envelope.event_id.clone()) {
                    stock.available += i64::from(restock.quantity);
                    state.skus.put(restock.sku.clone(), stock);
                }
                Ok(())
            }
            other => Err(StepError::Poison(format!(
                "{} is not an inventory command",
                other.kind().name()
            ))),
        }
    }
}
