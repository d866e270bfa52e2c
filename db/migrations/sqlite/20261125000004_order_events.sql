-- Every event of every order, once (the full history). On PostgreSQL this table is
-- partitioned by month; SQLite keeps one table.
CREATE TABLE order_events (
    event_id     TEXT NOT NULL PRIMARY KEY,
    order_id     TEXT NOT NULL,
    customer_id  TEXT NOT NULL,
    sequence     BIGINT NOT NULL,
    event_type   TEXT NOT NULL,
    occurred_at  BIGINT NOT NULL,
    causation_id TEXT
);
CREATE INDEX order_events_by_order ON order_events (order_id, sequence);
CREATE INDEX order_events_by_time ON order_events (occurred_at);
