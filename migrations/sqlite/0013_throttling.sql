-- Rotation inside a latency budget and a replication-lag limit.
--
-- A job's limits (NULL: none): the foreground p99 (ms) no serve replica
-- may exceed, the rate it keeps even over that budget, and the replay lag
-- (ms) no streaming standby may exceed (PostgreSQL).
ALTER TABLE encryption_rotation_jobs ADD COLUMN max_foreground_p99_ms REAL;
ALTER TABLE encryption_rotation_jobs ADD COLUMN min_rows_per_second BIGINT;
ALTER TABLE encryption_rotation_jobs ADD COLUMN max_replication_lag_ms BIGINT;
-- Why the job runs slower than it could, as a worker last said, and until
-- when that holds unless said again; the time workers spent throttled, by
-- signal (worker-seconds).
ALTER TABLE encryption_rotation_jobs ADD COLUMN throttle_reason TEXT;
ALTER TABLE encryption_rotation_jobs ADD COLUMN throttled_by TEXT;
ALTER TABLE encryption_rotation_jobs ADD COLUMN throttled_until TEXT;
ALTER TABLE encryption_rotation_jobs ADD COLUMN throttled_p99_seconds REAL NOT NULL DEFAULT 0;
ALTER TABLE encryption_rotation_jobs ADD COLUMN throttled_lag_seconds REAL NOT NULL DEFAULT 0;

-- Each serve replica's Encrypt/Decrypt p99 over its last one-second
-- window, published every second while a job has a latency budget.
ALTER TABLE keyward_replicas ADD COLUMN foreground_p99_ms REAL;
ALTER TABLE keyward_replicas ADD COLUMN foreground_calls BIGINT;
ALTER TABLE keyward_replicas ADD COLUMN foreground_at TEXT;
