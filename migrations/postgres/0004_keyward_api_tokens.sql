-- Bearer tokens for callers of keyward's gRPC API. Only a SHA-256 hash of
-- each token is stored; `keyward token create` prints the token once.
CREATE TABLE keyward_api_tokens (
    id            TEXT PRIMARY KEY NOT NULL DEFAULT gen_random_uuid()::text,
    name          TEXT NOT NULL UNIQUE,
    token_hash    TEXT NOT NULL UNIQUE,
    -- Comma-separated roles: encrypt, decrypt, admin.
    roles         TEXT NOT NULL,
    -- Comma-separated key_ids (or record ids) the token is limited to; NULL: any.
    key_scope     TEXT,
    -- JSON object of encryption-context pairs every request must carry; NULL: any.
    context_scope TEXT,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    revoked_at    TIMESTAMPTZ
);
