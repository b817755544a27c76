-- Keys in an HSM: provider 'pkcs11' (kms_key_arn a pkcs11: URI) joins the
-- providers encryption_keys accepts. keyward's own CHECK on provider (from
-- 0001, or added by adopting the application's table) is replaced; other
-- constraints of the application's stay as they are.
DO $$
DECLARE c record;
BEGIN
  FOR c IN
    SELECT conname FROM pg_constraint
    WHERE conrelid = 'encryption_keys'::regclass AND contype = 'c'
      AND pg_get_constraintdef(oid) LIKE '%provider%'
      AND pg_get_constraintdef(oid) LIKE '%aws-kms%'
  LOOP
    EXECUTE format('ALTER TABLE encryption_keys DROP CONSTRAINT %I', c.conname);
  END LOOP;
END $$;
ALTER TABLE encryption_keys ADD CONSTRAINT encryption_keys_provider_check
    CHECK (provider IS NULL OR provider IN ('local', 'aws-kms', 'pkcs11'));
