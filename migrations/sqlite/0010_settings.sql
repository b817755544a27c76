-- Settings every process must share, recorded by the first process that
-- is given one, so that one given another refuses to start: today the
-- application's legacy format (`legacy_format`, JSON; see the --legacy-*
-- flags). A process given none follows what is recorded here.
CREATE TABLE keyward_settings (
    name       TEXT PRIMARY KEY NOT NULL,
    value      TEXT NOT NULL,
    updated_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP
);
