-- Adaptive batches: a job whose batch_size is 0 (the default since this
-- migration) has each worker size its batches to take about
-- target_batch_ms (NULL: 250 ms).
ALTER TABLE encryption_rotation_jobs ADD COLUMN target_batch_ms BIGINT;
