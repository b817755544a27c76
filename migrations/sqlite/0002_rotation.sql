-- Rotation bookkeeping: which job last failed a row (so a pass does not
-- retry it forever), and the batches workers have claimed (leases).
ALTER TABLE connections ADD COLUMN last_error_job_id TEXT;

CREATE TABLE encryption_rotation_claims (
    id               TEXT PRIMARY KEY NOT NULL,
    job_id           TEXT NOT NULL REFERENCES encryption_rotation_jobs (id) ON DELETE CASCADE,
    worker_id        TEXT NOT NULL,
    first_row_id     TEXT NOT NULL,
    last_row_id      TEXT NOT NULL,
    lease_expires_at TEXT NOT NULL
);

CREATE INDEX encryption_rotation_claims_job_idx ON encryption_rotation_claims (job_id);
