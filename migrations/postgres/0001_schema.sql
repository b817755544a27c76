-- keyward schema, PostgreSQL flavour (production, scale-out).
-- Names follow the key-rotation runbook exactly, and its §1.2 / §1.6 SQL runs
-- verbatim: id and timestamps default, provider may be NULL (inferred).
-- `connections` may already exist (the application's table): it is adopted,
-- and the envelope columns are added to it.

CREATE TABLE encryption_keys (
    id          TEXT PRIMARY KEY DEFAULT gen_random_uuid()::text,
    key_id      TEXT NOT NULL UNIQUE,
    kms_key_arn TEXT NOT NULL,
    alias       TEXT,
    provider    TEXT CHECK (provider IS NULL OR provider IN ('local', 'aws-kms')),
    status      TEXT NOT NULL DEFAULT 'pending'
                CHECK (status IN ('pending', 'active', 'rotating', 'retired')),
    derived_key TEXT,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    rotated_at  TIMESTAMPTZ
);

CREATE UNIQUE INDEX encryption_keys_one_active ON encryption_keys (status) WHERE status = 'active';

CREATE TABLE IF NOT EXISTS connections (
    id                    TEXT PRIMARY KEY DEFAULT gen_random_uuid()::text,
    name                  TEXT,
    encrypted_credentials BYTEA,
    credentials_iv        BYTEA,
    created_at            TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at            TIMESTAMPTZ NOT NULL DEFAULT now()
);

ALTER TABLE connections
    ADD COLUMN IF NOT EXISTS encryption_key_id   TEXT REFERENCES encryption_keys (id),
    ADD COLUMN IF NOT EXISTS data_key_ciphertext BYTEA,
    ADD COLUMN IF NOT EXISTS data_key_iv         BYTEA,
    ADD COLUMN IF NOT EXISTS payload_ciphertext  BYTEA,
    ADD COLUMN IF NOT EXISTS payload_iv          BYTEA,
    ADD COLUMN IF NOT EXISTS last_error          TEXT;

CREATE INDEX IF NOT EXISTS connections_encryption_key_id_idx ON connections (encryption_key_id);

-- Backfill the payload mirror of legacy rows so dual writes work at once.
UPDATE connections
SET payload_ciphertext = encrypted_credentials, payload_iv = credentials_iv
WHERE payload_ciphertext IS NULL AND encrypted_credentials IS NOT NULL;

CREATE TABLE encryption_rotation_jobs (
    id                  TEXT PRIMARY KEY DEFAULT gen_random_uuid()::text,
    status              TEXT NOT NULL DEFAULT 'pending'
                        CHECK (status IN ('pending', 'running', 'completed',
                                          'completed_with_errors', 'failed', 'cancelled')),
    target_key_id       TEXT NOT NULL REFERENCES encryption_keys (id),
    mode                TEXT NOT NULL DEFAULT 'reencrypt' CHECK (mode IN ('reencrypt', 'rewrap')),
    dry_run             BOOLEAN NOT NULL DEFAULT FALSE,
    batch_size          INTEGER NOT NULL DEFAULT 500,
    max_rows_per_second INTEGER,
    total_rows          BIGINT NOT NULL DEFAULT 0,
    processed_rows      BIGINT NOT NULL DEFAULT 0,
    succeeded_rows      BIGINT NOT NULL DEFAULT 0,
    failed_rows         BIGINT NOT NULL DEFAULT 0,
    skipped_rows        BIGINT NOT NULL DEFAULT 0,
    last_error          TEXT,
    cursor              TEXT,
    pass                INTEGER NOT NULL DEFAULT 0,
    cancel_requested    BOOLEAN NOT NULL DEFAULT FALSE,
    lease_owner         TEXT,
    lease_expires_at    TIMESTAMPTZ,
    created_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    started_at          TIMESTAMPTZ,
    completed_at        TIMESTAMPTZ
);

CREATE INDEX encryption_rotation_jobs_status_idx ON encryption_rotation_jobs (status);

CREATE TABLE connection_scoped_tokens (
    id            TEXT PRIMARY KEY DEFAULT gen_random_uuid()::text,
    connection_id TEXT NOT NULL REFERENCES connections (id) ON DELETE CASCADE,
    token_hash    TEXT NOT NULL UNIQUE,
    scope         TEXT,
    expires_at    TIMESTAMPTZ NOT NULL,
    used_at       TIMESTAMPTZ,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX connection_scoped_tokens_expires_at_idx ON connection_scoped_tokens (expires_at);
