-- The monthly (UTC calendar month) usage of every metered metric per org: the record billing
-- reads. Written by the gateway's flusher (idempotent and monotonic through `version`), read back
-- to restore Redis after a data loss. A stable interface: further columns always get a default.
CREATE TABLE usage_counters (
    org_id        TEXT NOT NULL,
    metric        TEXT NOT NULL,
    -- First instant of the month (UTC). Gauges are stored as their level in the month of the flush.
    period_start  TIMESTAMPTZ NOT NULL,
    quantity      BIGINT NOT NULL,
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- The Redis key's change count when `quantity` was read: a write only lands if it is newer.
    version       BIGINT NOT NULL DEFAULT 0,
    -- counter | gauge
    kind          TEXT NOT NULL DEFAULT 'counter',
    PRIMARY KEY (org_id, metric, period_start)
);
CREATE INDEX usage_counters_period ON usage_counters (period_start);
