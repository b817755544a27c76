-- Conflicts between a row's envelope and its legacy copy: the
-- application's old pods write the legacy columns only, so a row rotated
-- onto a key can later get a legacy copy holding another plaintext.
-- Finding one takes decrypting both copies, so `keyward legacy cutover`
-- (a dry run too) records what it found per target, and key usage, the
-- retirement plan and the metrics report it with the time of that check.

-- The last complete check of each target's legacy copies.
CREATE TABLE keyward_legacy_checks (
    target_table TEXT PRIMARY KEY NOT NULL,
    checked_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    conflicts    BIGINT NOT NULL
);

-- The rows that check found in conflict (ids as text).
CREATE TABLE keyward_legacy_conflicts (
    target_table TEXT NOT NULL,
    row_id       TEXT NOT NULL,
    PRIMARY KEY (target_table, row_id)
);
