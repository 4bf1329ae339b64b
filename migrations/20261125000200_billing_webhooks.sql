-- Every webhook delivery that was verified, keyed by provider and the provider's event id, so a
-- redelivery is recognised and has no second effect.
CREATE TABLE webhook_events (
    provider     TEXT NOT NULL,
    event_id     TEXT NOT NULL,
    event_type   TEXT NOT NULL,
    -- processed | ignored | stale | unlinked | linked
    status       TEXT NOT NULL,
    org_id       TEXT,
    received_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, event_id)
);

-- The last applied state of each provider subscription (see domain::subscription).
CREATE TABLE subscriptions (
    provider              TEXT NOT NULL,
    subscription_id       TEXT NOT NULL,
    org_id                TEXT NOT NULL,
    customer_id           TEXT,
    product_id            TEXT,
    -- The plan the product maps to; NULL when unmapped (the org then gets the default plan).
    plan_if_active        TEXT,
    status                TEXT NOT NULL,
    terminal              BOOLEAN NOT NULL DEFAULT false,
    current_period_end    TIMESTAMPTZ,
    cancel_at_period_end  BOOLEAN NOT NULL DEFAULT false,
    status_since          TIMESTAMPTZ NOT NULL,
    last_event_at         TIMESTAMPTZ NOT NULL,
    -- When the scheduled job must look again (period end, grace expiry); NULL: only an event can
    -- change the plan.
    next_change_at        TIMESTAMPTZ,
    updated_at            TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, subscription_id)
);
CREATE INDEX subscriptions_org_id ON subscriptions (org_id);
CREATE INDEX subscriptions_due ON subscriptions (next_change_at) WHERE next_change_at IS NOT NULL;

-- Provider customer → org, learnt from events that carry the org id (checkout, metadata), for
-- later events that do not.
CREATE TABLE billing_customers (
    provider     TEXT NOT NULL,
    customer_id  TEXT NOT NULL,
    org_id       TEXT NOT NULL,
    linked_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, customer_id)
);
