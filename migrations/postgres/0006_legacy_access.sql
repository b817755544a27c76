-- Legacy ciphertexts are bound to no key record and no encryption context,
-- so a token limited to keys or contexts may open them only when granted
-- explicitly (`keyward token create --legacy`).
ALTER TABLE keyward_api_tokens ADD COLUMN legacy_access BOOLEAN NOT NULL DEFAULT FALSE;
