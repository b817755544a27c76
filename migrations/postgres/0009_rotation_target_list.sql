-- The rotation targets beyond `connections`, kept in the database so that
-- every server, worker and operator command sees one list (`keyward
-- targets add|list|remove`, the Admin API; a `--rotation-targets` file only
-- seeds or checks it). `definition` is the target's entry as the targets
-- file spells it (JSON); an entry for `connections` gives only its
-- encoding. Rotation walks `connections`, then these by `position`.
CREATE TABLE keyward_rotation_targets (
    table_name TEXT PRIMARY KEY NOT NULL,
    position   BIGINT NOT NULL UNIQUE,
    definition TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- A change moves the catalog version (and notifies): every process
-- reloads the list with the catalog.
CREATE TRIGGER keyward_rotation_targets_catalog_version
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON keyward_rotation_targets
    FOR EACH STATEMENT EXECUTE FUNCTION keyward_bump_catalog_version();
