-- Stock per SKU, folded by the inventory projection from restocks (inventory.commands) and
-- the inventory processor's per-line answers (orders.events). Every movement is recorded once,
-- keyed by its event id; the levels move only when a movement was new, so a duplicate or
-- re-emitted answer never counts twice.
CREATE TABLE inventory_movements (
    event_id    TEXT NOT NULL PRIMARY KEY,
    sku         TEXT NOT NULL,
    -- The order the units moved for; NULL for restocks.
    order_id    TEXT,
    -- restocked, reserved, released or rejected (a line refused for lack of stock).
    kind        TEXT NOT NULL,
    quantity    BIGINT NOT NULL,
    occurred_at BIGINT NOT NULL
);
CREATE INDEX inventory_movements_by_sku ON inventory_movements (sku, occurred_at);
CREATE INDEX inventory_movements_by_order ON inventory_movements (order_id);

CREATE TABLE inventory_levels (
    sku            TEXT NOT NULL PRIMARY KEY,
    -- Units ever received.
    restocked      BIGINT NOT NULL,
    -- Units held by orders now (reserved minus released); confirmed orders' units included.
    reserved       BIGINT NOT NULL,
    -- restocked - reserved: what the inventory processor can still reserve.
    available      BIGINT NOT NULL,
    -- Reservation lines refused for lack of stock.
    rejected_lines BIGINT NOT NULL,
    updated_at     BIGINT NOT NULL
);

-- Orders the fraud check held for an admin's decision, and how each review ended.
CREATE TABLE fraud_reviews (
    order_id    TEXT NOT NULL PRIMARY KEY,
    customer_id TEXT NOT NULL,
    score       DOUBLE PRECISION NOT NULL,
    -- JSON array of the fraud check's reasons.
    reasons     TEXT NOT NULL,
    total_minor BIGINT NOT NULL,
    currency    TEXT NOT NULL,
    -- pending, approved, rejected or cancelled (timed out or cancelled by the customer).
    status      TEXT NOT NULL,
    queued_at   BIGINT NOT NULL,
    -- From the first review decision received for the order.
    reviewer    TEXT,
    note        TEXT,
    resolved_at BIGINT
);
CREATE INDEX fraud_reviews_queue ON fraud_reviews (status, queued_at);
