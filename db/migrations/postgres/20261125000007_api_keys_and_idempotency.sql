-- The edge's own tables (not read models): API keys and idempotency records.

-- An API key: the token is `ofk_<id>_<secret>`; only the SHA-256 of the secret is kept (the
-- secret is 256 random bits, so a fast hash is enough: nothing to brute-force). Revoked keys
-- stay for the audit trail.
CREATE TABLE api_keys (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    role          TEXT NOT NULL CHECK (role IN ('producer', 'reader', 'admin')),
    secret_sha256 TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    revoked_at    BIGINT
);

-- One Idempotency-Key of one principal: the request's fingerprint, the order id and time the
-- first attempt chose (a retry after a failure reuses them, so it writes the same event), and
-- once answered, the answer to give again.
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

-- Analysts read the read models, not credentials or stored answers.
DO $$
BEGIN
    REVOKE ALL ON api_keys, idempotency_keys FROM orderflow_analyst;
EXCEPTION WHEN undefined_object THEN
    NULL;
END
$$;
