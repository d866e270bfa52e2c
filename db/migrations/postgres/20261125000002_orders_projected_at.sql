-- When the projection wrote the row's current state (wall clock, ms since the epoch). Not part
-- of the fold of the log: a replay writes new times. It measures freshness: the end-to-end
-- latency of an order is projected_at minus the time it was sent.
ALTER TABLE orders ADD COLUMN projected_at BIGINT;
CREATE INDEX orders_by_projected_at ON orders (projected_at);
