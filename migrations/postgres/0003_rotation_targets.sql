-- Which configured rotation target (by position) a job's cursor is in.
ALTER TABLE encryption_rotation_jobs ADD COLUMN target_index BIGINT NOT NULL DEFAULT 0;
