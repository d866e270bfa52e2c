-- The edge's own tables (not read models): API keys and idempotency records. See the
-- PostgreSQL migration of the same number for what each column means.
CREATE TABLE api_keys (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    role          TEXT NOT NULL CHECK (role IN ('producer', 'reader', 'admin')),
    secret_sha256 TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    revoked_at    BIGINT
);

CREATE TABLE idempotency_keys (
    principal     TEXT NOT NULL,
    key           TEXT NOT NULL,
    fingerprint   TEXT NOT NULL,
    seed          TEXT NOT NULL,
    occurred_at   BIGINT NOT NULL,
    state         TEXT NOT NULL CHECK (state IN ('in_flight', 'failed', 'done')),
    claimed_at    BIGINT NOT NULL,
    status        INTEGER,
    content_type  TEXT,
    location      TEXT,
    body          TEXT,
    expires_at    BIGINT NOT NULL,
    PRIMARY KEY (principal, key)
);
CREATE INDEX idempotency_keys_expiry ON idempotency_keys (expires_at);
