-- Billing-cycle periods (`period = "billing_month"`).
--
-- The period in progress when an org's billing anchor changed, carried to the new anchor's next
-- boundary so that changing the anchor never resets usage (see domain::period). Both NULL when
-- no period is carried.
ALTER TABLE orgs
    ADD COLUMN billing_carry_start TIMESTAMPTZ,
    ADD COLUMN billing_carry_end   TIMESTAMPTZ;

-- Usage per org, metric and billing month: the durable copy of each `billing_month` counter,
-- written by the flusher like `usage_counters` (monotonic through `version`) and read back to
-- restore Redis after a data loss. A billing month is identified by its start; its end is where
-- the org's cycle put it (see `GET /v1/orgs/{org_id}/usage?period=`).
CREATE TABLE billing_usage (
    org_id        TEXT NOT NULL,
    metric        TEXT NOT NULL,
    period_start  TIMESTAMPTZ NOT NULL,
    quantity      BIGINT NOT NULL,
    version       BIGINT NOT NULL DEFAULT 0,
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, metric, period_start)
);
CREATE INDEX billing_usage_period ON billing_usage (period_start);

-- Subscription events whose org could not be found yet (no org id in the metadata, no customer
-- link), kept with their normalized state until an event links the customer or the
-- subscription; they are then applied for that org in the linking event's transaction.
CREATE TABLE unlinked_subscription_events (
    provider         TEXT NOT NULL,
    event_id         TEXT NOT NULL,
    subscription_id  TEXT NOT NULL,
    customer_id      TEXT,
    occurred_at      TIMESTAMPTZ NOT NULL,
    -- webhooks::event::SubscriptionEvent as JSON: the normalized state, never the raw payload.
    event            JSONB NOT NULL,
    received_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, event_id)
);
CREATE INDEX unlinked_subscription_events_customer
    ON unlinked_subscription_events (provider, customer_id);
CREATE INDEX unlinked_subscription_events_subscription
    ON unlinked_subscription_events (provider, subscription_id);
