-- Legacy ciphertexts are bound to no key record and no encryption context,
-- so a token limited to keys or contexts may open them only when granted
-- explicitly (`keyward token create --legacy`).
ALTER TABLE keyward_api_tokens ADD COLUMN legacy_access BOOLEAN NOT NULL DEFAULT FALSE;

-- A token change moves the catalog version (and notifies), so every
-- replica reloads its tokens at once: a revocation takes effect in well
-- under a second, not at the next full reload.
CREATE TRIGGER keyward_api_tokens_catalog_version
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON keyward_api_tokens
    FOR EACH STATEMENT EXECUTE FUNCTION keyward_bump_catalog_version();
