-- An operator may pause a rotation job (keyward rotate pause, Admin/
-- PauseRotation): a paused job claims no batch and holds no lease, keeps
-- its counts and cursor, and goes on where it stopped once resumed.
ALTER TABLE encryption_rotation_jobs ADD COLUMN paused BOOLEAN NOT NULL DEFAULT FALSE;
