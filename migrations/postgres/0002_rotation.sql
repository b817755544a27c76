-- Rotation bookkeeping: which job last failed a row (so a pass does not
-- retry it forever), and the batches workers have claimed (leases).
ALTER TABLE connections ADD COLUMN IF NOT EXISTS last_error_job_id TEXT;

ALTER TABLE encryption_rotation_jobs
    ALTER COLUMN batch_size TYPE BIGINT,
    ALTER COLUMN max_rows_per_second TYPE BIGINT,
    ALTER COLUMN pass TYPE BIGINT;

CREATE TABLE encryption_rotation_claims (
    id               TEXT PRIMARY KEY,
    job_id           TEXT NOT NULL REFERENCES encryption_rotation_jobs (id) ON DELETE CASCADE,
    worker_id        TEXT NOT NULL,
    first_row_id     TEXT NOT NULL,
    last_row_id      TEXT NOT NULL,
    lease_expires_at TIMESTAMPTZ NOT NULL
);

CREATE INDEX encryption_rotation_claims_job_idx ON encryption_rotation_claims (job_id);
