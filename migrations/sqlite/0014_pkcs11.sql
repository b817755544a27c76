-- Keys in an HSM: provider 'pkcs11' (kms_key_arn a pkcs11: URI) joins the
-- providers encryption_keys accepts. SQLite cannot alter a CHECK, and
-- rebuilding the table would drop the triggers and references that hang
-- on it; widening a CHECK is the schema edit SQLite documents as safe
-- (sqlite.org/lang_altertable.html, "making other kinds of table schema
-- changes": every stored row still satisfies it). The CREATE and DROP
-- after it bump the schema version so every connection re-reads the
-- schema. An application's own table without keyward's CHECK is left as
-- it is.
PRAGMA writable_schema = ON;
UPDATE sqlite_schema
   SET sql = replace(sql, 'provider IN (''local'', ''aws-kms'')',
                          'provider IN (''local'', ''aws-kms'', ''pkcs11'')')
 WHERE type = 'table' AND name = 'encryption_keys';
PRAGMA writable_schema = OFF;
CREATE TABLE keyward_schema_version_bump (x INTEGER);
DROP TABLE keyward_schema_version_bump;
