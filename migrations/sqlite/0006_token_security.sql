-- Legacy ciphertexts are bound to no key record and no encryption context,
-- so a token limited to keys or contexts may open them only when granted
-- explicitly (`keyward token create --legacy`).
ALTER TABLE keyward_api_tokens ADD COLUMN legacy_access BOOLEAN NOT NULL DEFAULT 0;

-- A token change moves the catalog version, so every replica reloads its
-- tokens within one catalog poll: a revocation takes effect in about a
-- second, not at the next full reload.
CREATE TRIGGER keyward_api_tokens_inserted AFTER INSERT ON keyward_api_tokens
BEGIN
    UPDATE keyward_catalog_version SET version = version + 1 WHERE id = 1;
END;
CREATE TRIGGER keyward_api_tokens_updated AFTER UPDATE ON keyward_api_tokens
BEGIN
    UPDATE keyward_catalog_version SET version = version + 1 WHERE id = 1;
END;
CREATE TRIGGER keyward_api_tokens_deleted AFTER DELETE ON keyward_api_tokens
BEGIN
    UPDATE keyward_catalog_version SET version = version + 1 WHERE id = 1;
END;
