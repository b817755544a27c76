-- keyward schema, SQLite flavour (the embedded default).
-- Names follow the key-rotation runbook exactly. Timestamps are RFC 3339 text.

CREATE TABLE encryption_keys (
    id          TEXT PRIMARY KEY NOT NULL DEFAULT (lower(hex(randomblob(16)))),
    key_id      TEXT NOT NULL UNIQUE,
    kms_key_arn TEXT NOT NULL,
    alias       TEXT,
    -- NULL: inferred from the form of kms_key_arn (rows inserted by hand).
    provider    TEXT CHECK (provider IS NULL OR provider IN ('local', 'aws-kms')),
    status      TEXT NOT NULL DEFAULT 'pending'
                CHECK (status IN ('pending', 'active', 'rotating', 'retired')),
    -- Legacy, nullable; keyward never writes key material here.
    derived_key TEXT,
    created_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    rotated_at  TEXT
);

-- At most one active key.
CREATE UNIQUE INDEX encryption_keys_one_active ON encryption_keys (status) WHERE status = 'active';

CREATE TABLE connections (
    id                    TEXT PRIMARY KEY NOT NULL DEFAULT (lower(hex(randomblob(16)))),
    name                  TEXT,
    -- Legacy ciphertext columns, written by the application before keyward.
    encrypted_credentials BLOB,
    credentials_iv        BLOB,
    -- Envelope columns.
    encryption_key_id     TEXT REFERENCES encryption_keys (id),
    data_key_ciphertext   BLOB,
    data_key_iv           BLOB,
    payload_ciphertext    BLOB,
    payload_iv            BLOB,
    last_error            TEXT,
    created_at            TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at            TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

CREATE INDEX connections_encryption_key_id_idx ON connections (encryption_key_id);

-- The migration backfills the payload mirror of legacy rows.
UPDATE connections
SET payload_ciphertext = encrypted_credentials, payload_iv = credentials_iv
WHERE payload_ciphertext IS NULL AND encrypted_credentials IS NOT NULL;

-- The encryption.rotate queue: one row per re-encryption job.
CREATE TABLE encryption_rotation_jobs (
    id                  TEXT PRIMARY KEY NOT NULL DEFAULT (lower(hex(randomblob(16)))),
    status              TEXT NOT NULL DEFAULT 'pending'
                        CHECK (status IN ('pending', 'running', 'completed',
                                          'completed_with_errors', 'failed', 'cancelled')),
    target_key_id       TEXT NOT NULL REFERENCES encryption_keys (id),
    mode                TEXT NOT NULL DEFAULT 'reencrypt' CHECK (mode IN ('reencrypt', 'rewrap')),
    dry_run             BOOLEAN NOT NULL DEFAULT FALSE,
    batch_size          INTEGER NOT NULL DEFAULT 500,
    max_rows_per_second INTEGER,
    total_rows          INTEGER NOT NULL DEFAULT 0,
    processed_rows      INTEGER NOT NULL DEFAULT 0,
    succeeded_rows      INTEGER NOT NULL DEFAULT 0,
    failed_rows         INTEGER NOT NULL DEFAULT 0,
    skipped_rows        INTEGER NOT NULL DEFAULT 0,
    last_error          TEXT,
    cursor              TEXT,
    pass                INTEGER NOT NULL DEFAULT 0,
    cancel_requested    BOOLEAN NOT NULL DEFAULT FALSE,
    lease_owner         TEXT,
    lease_expires_at    TEXT,
    created_at          TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at          TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    started_at          TEXT,
    completed_at        TEXT
);

CREATE INDEX encryption_rotation_jobs_status_idx ON encryption_rotation_jobs (status);

CREATE TABLE connection_scoped_tokens (
    id            TEXT PRIMARY KEY NOT NULL DEFAULT (lower(hex(randomblob(16)))),
    connection_id TEXT NOT NULL REFERENCES connections (id) ON DELETE CASCADE,
    token_hash    TEXT NOT NULL UNIQUE,
    scope         TEXT,
    expires_at    TEXT NOT NULL,
    used_at       TEXT,
    created_at    TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

CREATE INDEX connection_scoped_tokens_expires_at_idx ON connection_scoped_tokens (expires_at);
