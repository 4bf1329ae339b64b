-- Org state: which plan each org is on. An org without a row (or with a NULL plan) is on the
-- catalog's default plan, so changing the default in plans.toml moves those orgs with it.
CREATE TABLE orgs (
    org_id          TEXT PRIMARY KEY,
    plan_id         TEXT,
    -- Start of the org's billing cycle; NULL means calendar months (UTC).
    billing_anchor  TIMESTAMPTZ,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- API keys are stored as the SHA-256 of the full key; the key itself is shown once, at creation.
CREATE TABLE api_keys (
    id          UUID PRIMARY KEY,
    org_id      TEXT NOT NULL REFERENCES orgs (org_id) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    key_hash    BYTEA NOT NULL UNIQUE,
    -- The first characters of the key ("qg_1a2b3c"), so operators can tell keys apart.
    key_prefix  TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    revoked_at  TIMESTAMPTZ
);
CREATE INDEX api_keys_org_id ON api_keys (org_id);

-- Audit trail of every plan change, whatever caused it.
CREATE TABLE plan_changes (
    id          BIGSERIAL PRIMARY KEY,
    org_id      TEXT NOT NULL,
    from_plan   TEXT,
    to_plan     TEXT,
    cause       TEXT NOT NULL,
    event_id    TEXT,
    changed_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX plan_changes_org_id ON plan_changes (org_id, changed_at DESC);

-- Manual credits and charges made through the admin API, with their reason.
CREATE TABLE usage_adjustments (
    id            BIGSERIAL PRIMARY KEY,
    org_id        TEXT NOT NULL,
    metric        TEXT NOT NULL,
    amount        BIGINT NOT NULL,
    reason        TEXT NOT NULL,
    period_start  TIMESTAMPTZ NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX usage_adjustments_org_id ON usage_adjustments (org_id, created_at DESC);
