-- Many replicas, one truth (see the PostgreSQL flavour for the comments).
CREATE TABLE keyward_catalog_version (
    id      INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
    version INTEGER NOT NULL
);
INSERT INTO keyward_catalog_version (id, version) VALUES (1, 1);

CREATE TRIGGER encryption_keys_inserted AFTER INSERT ON encryption_keys
BEGIN
    UPDATE keyward_catalog_version SET version = version + 1 WHERE id = 1;
END;
CREATE TRIGGER encryption_keys_updated AFTER UPDATE ON encryption_keys
BEGIN
    UPDATE keyward_catalog_version SET version = version + 1 WHERE id = 1;
END;
CREATE TRIGGER encryption_keys_deleted AFTER DELETE ON encryption_keys
BEGIN
    UPDATE keyward_catalog_version SET version = version + 1 WHERE id = 1;
END;

CREATE TABLE keyward_replicas (
    id              TEXT PRIMARY KEY NOT NULL,
    kind            TEXT NOT NULL CHECK (kind IN ('serve', 'worker')),
    host            TEXT NOT NULL,
    pid             INTEGER NOT NULL,
    listen          TEXT,
    version         TEXT NOT NULL,
    started_at      TEXT NOT NULL,
    heartbeat_at    TEXT NOT NULL,
    expires_at      TEXT NOT NULL,
    catalog_version INTEGER NOT NULL,
    active_key_id   TEXT,
    active_since    TEXT,
    key_readiness   TEXT NOT NULL
);

CREATE TABLE keyward_key_probes (
    key_id     TEXT PRIMARY KEY NOT NULL REFERENCES encryption_keys (id) ON DELETE CASCADE,
    probe      BLOB NOT NULL,
    created_at TEXT NOT NULL
);

ALTER TABLE encryption_rotation_jobs ADD COLUMN late_rows INTEGER NOT NULL DEFAULT 0;
ALTER TABLE encryption_rotation_jobs ADD COLUMN replicas_waited_since TEXT;
