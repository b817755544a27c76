-- The rotation targets beyond `connections`, kept in the database so that
-- every server, worker and operator command sees one list (`keyward
-- targets add|list|remove`, the Admin API; a `--rotation-targets` file only
-- seeds or checks it). `definition` is the target's entry as the targets
-- file spells it (JSON); an entry for `connections` gives only its
-- encoding. Rotation walks `connections`, then these by `position`.
CREATE TABLE keyward_rotation_targets (
    table_name TEXT PRIMARY KEY NOT NULL,
    position   INTEGER NOT NULL UNIQUE,
    definition TEXT NOT NULL,
    created_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP
);

-- A change moves the catalog version: every process reloads the list with
-- the catalog.
CREATE TRIGGER keyward_rotation_targets_inserted AFTER INSERT ON keyward_rotation_targets
BEGIN
    UPDATE keyward_catalog_version SET version = version + 1 WHERE id = 1;
END;
CREATE TRIGGER keyward_rotation_targets_updated AFTER UPDATE ON keyward_rotation_targets
BEGIN
    UPDATE keyward_catalog_version SET version = version + 1 WHERE id = 1;
END;
CREATE TRIGGER keyward_rotation_targets_deleted AFTER DELETE ON keyward_rotation_targets
BEGIN
    UPDATE keyward_catalog_version SET version = version + 1 WHERE id = 1;
END;
