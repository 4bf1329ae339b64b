-- An API key's own quotas (`PUT /admin/keys/{id}/limits`): a JSON array of
-- {"metric", "limit", "period", "overage"}, replacing the plan's per-key quotas of the metrics it
-- names. NULL: the plan's per-key quotas apply.
ALTER TABLE api_keys ADD COLUMN limits JSONB;
