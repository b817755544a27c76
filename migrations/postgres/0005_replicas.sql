-- Many replicas, one truth.
--
-- keyward_catalog_version: bumped by a trigger on every change to
-- encryption_keys (keyward's own writes and hand-written SQL alike), and
-- announced on the `keyward_catalog` channel, so replicas reload at once.
CREATE TABLE keyward_catalog_version (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    version BIGINT NOT NULL
);
INSERT INTO keyward_catalog_version (id, version) VALUES (1, 1);

CREATE FUNCTION keyward_bump_catalog_version() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v BIGINT;
BEGIN
    UPDATE keyward_catalog_version SET version = version + 1 WHERE id = 1 RETURNING version INTO v;
    PERFORM pg_notify('keyward_catalog', v::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER encryption_keys_catalog_version
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON encryption_keys
    FOR EACH STATEMENT EXECUTE FUNCTION keyward_bump_catalog_version();

-- One row per running keyward process (serve or worker), refreshed by its
-- heartbeat: the catalog version it has loaded, the key it encrypts with,
-- and whether it can use each key (JSON: encryption_keys.id -> null when
-- usable, else the reason).
CREATE TABLE keyward_replicas (
    id              TEXT PRIMARY KEY,
    kind            TEXT NOT NULL CHECK (kind IN ('serve', 'worker')),
    host            TEXT NOT NULL,
    pid             BIGINT NOT NULL,
    listen          TEXT,
    version         TEXT NOT NULL,
    started_at      TIMESTAMPTZ NOT NULL,
    heartbeat_at    TIMESTAMPTZ NOT NULL,
    expires_at      TIMESTAMPTZ NOT NULL,
    catalog_version BIGINT NOT NULL,
    active_key_id   TEXT,
    active_since    TIMESTAMPTZ,
    key_readiness   TEXT NOT NULL
);

-- A staged activation's probe: a ciphertext (blob form) of a fixed,
-- public plaintext under the key, which every replica must decrypt before
-- the key becomes active.
CREATE TABLE keyward_key_probes (
    key_id     TEXT PRIMARY KEY REFERENCES encryption_keys (id) ON DELETE CASCADE,
    probe      BYTEA NOT NULL,
    created_at TIMESTAMPTZ NOT NULL
);

-- Rows a job's later passes caught (written off target while it ran), and
-- since when it has been waiting for replicas still encrypting with an
-- older key.
ALTER TABLE encryption_rotation_jobs
    ADD COLUMN late_rows BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN replicas_waited_since TIMESTAMPTZ;
