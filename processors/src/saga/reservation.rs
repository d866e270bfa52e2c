//! Inventory reservation: the inventory processor answers per SKU; once every line is answered
//! the order is paid for, or rejected with what was reserved released (all or nothing).

use orderflow_schemas::{
    Envelope, EventKind, InventoryRejected, InventoryReserved, OrderEvent, Reason, SkuShortage,
};

use super::{
    cause_of,
    emitter::Emitter,
    role,
    state::{SagaState, Stage},
    Saga,
};
use crate::runtime::{Outputs, StepError};

impl Saga {
    pub(super) fn on_inventory_answer(
        &self,
        state: &mut SagaState,
        envelope: &Envelope,
        sku: &str,
        answer: Result<i32, (i32, i32)>,
        out: &mut Outputs,
    ) -> Result<(), StepError> {
        let Some(order) = state.orders.get(&envelope.order_id) else {
            return Ok(());
        };
        let Stage::Reserving { pending, .. } = &order.stage else {
            return Ok(());
        };
        if pending.get(sku).map(String::as_str) != envelope.causation_id.as_deref() {
            return Ok(()); // a repeat, or the answer to another request
        }
        let cause = cause_of(envelope)?;
        let Some(order) = state.orders.get_mut(&envelope.order_id) else {
            return Ok(());
        };
        let Stage::Reserving {
            pending,
            reserved,
            shortages,
            ..
        } = &mut order.stage
        else {
            return Ok(());
        };
        pending.remove(sku);
        match answer {
            Ok(quantity) => {
                reserved.insert(sku.to_owned(), quantity);
            }
            Err((requested, available)) => shortages.push((sku.to_owned(), requested, available)),
        }
        if !pending.is_empty() {
            return Ok(());
        }
        let shortages = std::mem::take(shortages);
        let any_reserved = !reserved.is_empty();
        let mut em = Emitter::for_input(out, self.topics, envelope, cause);
        if shortages.is_empty() {
            let lines = order.sku_lines();
            em.timeline(
                order,
                role::RESERVED,
                EventKind::InventoryReserved,
                |envelope| OrderEvent::InventoryReserved(InventoryReserved { envelope, lines }),
            );
            em.request_payment(order);
            return Ok(());
        }
        let reasons = shortages
            .iter()
            .map(|(sku, requested, available)| Reason {
                code: "out_of_stock".to_owned(),
                field: Some(format!("lines[sku={sku}]")),
                message: format!("{requested} requested, {available} available"),
            })
            .collect();
        let shortages = shortages
            .into_iter()
            .map(|(sku, requested, available)| SkuShortage {
                sku,
                requested,
                available,
            })
            .collect();
        em.timeline(
            order,
            role::INVENTORY_REJECTED,
            EventKind::InventoryRejected,
            |envelope| {
                OrderEvent::InventoryRejected(InventoryRejected {
                    envelope,
                    shortages,
                })
            },
        );
        if any_reserved {
            em.release_all(order, "another line is out of stock");
        }
        em.reject(order, "inventory", reasons);
        Ok(())
    }
}
