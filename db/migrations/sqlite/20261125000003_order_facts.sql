-- Facts folded from orders.events by the orders projection, in the same transaction as the
-- orders row they derive from. Counters move only when the orders row changed, so a duplicate
-- or re-emitted event never counts twice.

-- The lines of every order, as placed.
CREATE TABLE order_lines (
    order_id         TEXT NOT NULL,
    line_no          BIGINT NOT NULL,
    sku              TEXT NOT NULL,
    quantity         BIGINT NOT NULL,
    unit_price_minor BIGINT NOT NULL,
    currency         TEXT NOT NULL,
    PRIMARY KEY (order_id, line_no)
);
CREATE INDEX order_lines_by_sku ON order_lines (sku);

-- Per customer: how many orders were placed and how they ended.
CREATE TABLE customer_stats (
    customer_id      TEXT PRIMARY KEY,
    orders_placed    BIGINT NOT NULL,
    orders_confirmed BIGINT NOT NULL,
    orders_rejected  BIGINT NOT NULL,
    orders_cancelled BIGINT NOT NULL,
    first_order_at   BIGINT NOT NULL,
    last_order_at    BIGINT NOT NULL
);

-- Per customer and currency: what confirmed orders came to.
CREATE TABLE customer_spend (
    customer_id     TEXT NOT NULL,
    currency        TEXT NOT NULL,
    confirmed_minor BIGINT NOT NULL,
    PRIMARY KEY (customer_id, currency)
);

-- Confirmed sales per product per hour (event time of the confirmation, hour start in ms).
CREATE TABLE sales_per_product_hour (
    sku           TEXT NOT NULL,
    hour          BIGINT NOT NULL,
    currency      TEXT NOT NULL,
    units         BIGINT NOT NULL,
    revenue_minor BIGINT NOT NULL,
    orders        BIGINT NOT NULL,
    PRIMARY KEY (sku, hour, currency)
);
CREATE INDEX sales_per_product_hour_by_hour ON sales_per_product_hour (hour);
