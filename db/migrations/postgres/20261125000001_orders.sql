-- Current state of every order, folded from orders.events by the orders projection.
CREATE TABLE orders (
    order_id      TEXT PRIMARY KEY,
    customer_id   TEXT NOT NULL,
    status        TEXT NOT NULL,
    version       BIGINT NOT NULL,
    currency      TEXT NOT NULL,
    total_minor   BIGINT NOT NULL,
    line_count    BIGINT NOT NULL,
    reasons       TEXT,
    placed_at     BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL,
    last_event_id TEXT NOT NULL
);
CREATE INDEX orders_by_customer ON orders (customer_id, placed_at DESC, order_id);
CREATE INDEX orders_by_status ON orders (status, updated_at);

-- The input position each projection's tables reflect, written in the same transaction as the
-- rows (DESIGN.md rule 3).
CREATE TABLE projection_offsets (
    projection   TEXT NOT NULL,
    topic        TEXT NOT NULL,
    partition_id BIGINT NOT NULL,
    next_offset  BIGINT NOT NULL,
    PRIMARY KEY (projection, topic, partition_id)
);
