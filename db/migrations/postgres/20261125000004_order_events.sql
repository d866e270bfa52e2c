-- Every event of every order, once (the full history), partitioned by month of occurred_at
-- (ms since the epoch). The orders projection creates each month's partition ahead of time
-- (the current month and the next three, at every start); the default partition only catches
-- what falls outside them, so no event is ever refused.
CREATE TABLE order_events (
    event_id     TEXT NOT NULL,
    order_id     TEXT NOT NULL,
    customer_id  TEXT NOT NULL,
    sequence     BIGINT NOT NULL,
    event_type   TEXT NOT NULL,
    occurred_at  BIGINT NOT NULL,
    causation_id TEXT,
    PRIMARY KEY (event_id, occurred_at)
) PARTITION BY RANGE (occurred_at);
CREATE TABLE order_events_default PARTITION OF order_events DEFAULT;
CREATE INDEX order_events_by_order ON order_events (order_id, sequence);
CREATE INDEX order_events_by_time ON order_events (occurred_at);
