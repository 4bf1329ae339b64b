-- Prepaid credits: units of a metric an org bought (or was given) ahead, spent per request when
-- a charge would pass a hard quota of its plan (see README "Credits"). Redis holds the live
-- balances; this table is their durable record: `remaining` is written by the flusher
-- (monotonic through `version`, like usage_counters) and read back to restore Redis after a
-- data loss. `amount - remaining` is what was spent from the grant.
CREATE TABLE credit_grants (
    org_id      TEXT NOT NULL,
    -- The grant's id: the client's `grant_id` (idempotency), or one the gateway made up.
    id          TEXT NOT NULL,
    metric      TEXT NOT NULL,
    amount      BIGINT NOT NULL CHECK (amount > 0),
    remaining   BIGINT NOT NULL CHECK (remaining >= 0),
    -- 0 is spent first.
    priority    INTEGER NOT NULL DEFAULT 10 CHECK (priority BETWEEN 0 AND 99999),
    expires_at  TIMESTAMPTZ,
    reason      TEXT,
    -- admin | webhook:<provider>
    source      TEXT NOT NULL DEFAULT 'admin',
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- Set by DELETE: what was left is no longer spendable (`voided` says how much that was).
    voided_at   TIMESTAMPTZ,
    voided      BIGINT,
    -- The Redis credit hash's change count when `remaining` was read.
    version     BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (org_id, id)
);
CREATE INDEX credit_grants_live ON credit_grants (org_id, metric) WHERE voided_at IS NULL;
