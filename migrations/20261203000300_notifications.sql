-- Outbound events for the product (usage.threshold_crossed, plan.changed): an outbox. A row is
-- written once (threshold crossings by a batch writer, plan changes in the transaction that
-- changes the plan) and delivered at least once by any replica, with the row's id as the
-- Standard Webhooks `webhook-id` on every attempt.
CREATE TABLE notifications (
    -- UUID v7 (time-ordered); the `webhook-id` of every delivery attempt.
    id               UUID PRIMARY KEY,
    org_id           TEXT NOT NULL,
    type             TEXT NOT NULL,
    -- The exact JSON body sent: {"type", "timestamp", "data"}.
    payload          JSONB NOT NULL,
    -- pending | delivered | failed
    status           TEXT NOT NULL DEFAULT 'pending',
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_error       TEXT,
    -- Destinations that answered 2xx ('global', 'org'): not sent again on a retry.
    delivered_to     TEXT[] NOT NULL DEFAULT '{}',
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX notifications_due ON notifications (next_attempt_at) WHERE status = 'pending';
CREATE INDEX notifications_org ON notifications (org_id, created_at DESC);
-- Settled events are removed after a while (`notify::RETAIN`).
CREATE INDEX notifications_settled ON notifications (updated_at) WHERE status <> 'pending';

-- An org's own endpoint (PUT /admin/orgs/{org_id}/notifications). The secret must be kept to
-- sign with, so it is stored as given (`whsec_` + base64); it is shown once, at creation.
CREATE TABLE notification_endpoints (
    org_id       TEXT PRIMARY KEY,
    url          TEXT NOT NULL,
    secret       TEXT NOT NULL,
    -- Set when the endpoint answered 410 Gone: nothing more is sent to it.
    disabled_at  TIMESTAMPTZ,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);
