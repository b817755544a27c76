-- Master-secret rollover (runbook §2.1).
--
-- Each replica reports the fingerprints of the master secrets it holds
-- (comma-separated hex, current first; never a secret): a new secret wraps
-- data keys only once every live replica has it. NULL: a keyward from
-- before fingerprints.
ALTER TABLE keyward_replicas ADD COLUMN master_fingerprints TEXT;

-- The header every data key the job writes under its target key begins
-- with (the local KMS: the wrapping master secret's fingerprint); rows on
-- the target key without it are rewrapped too. NULL: rows on the target
-- key are done.
ALTER TABLE encryption_rotation_jobs ADD COLUMN wrap_tag BLOB;
