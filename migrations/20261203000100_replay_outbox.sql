-- Usage a replica admitted while Redis was unreachable and could not hand to Redis before it
-- stopped. Any replica that reaches Redis applies each row once (its idempotency key makes a
-- repeated application a no-op) and then deletes it. Not billing data: the flusher writes the
-- ledger (usage_counters) from Redis once the row is applied.
CREATE TABLE replay_outbox (
    id          UUID PRIMARY KEY,
    org_id      TEXT NOT NULL,
    -- The batch's idempotency key in Redis (`replay:<uuid>` or a usage report's own key).
    idem_key    TEXT NOT NULL,
    ttl_ms      BIGINT NOT NULL,
    -- The Redis keys and amounts: [{"key", "kind", "amount", "limit", "block", "param"}].
    specs       JSONB NOT NULL,
    compensation BOOLEAN NOT NULL DEFAULT false,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX replay_outbox_created ON replay_outbox (created_at);
