//! Key administration (runbook §1.2, §1.3, §1.6, §2.3): the key catalog's
//! writes (create, activate, seed, retire), usage and the retirement plan.
//! Loading the catalog is `service::catalog` (a [`CatalogLoader`] this
//! service holds and reloads after every change); readiness, the keys'
//! probes and the self-test are `service::readiness` (the loader's
//! [`KeyHealth`]); the retirement plan's decision is `service::retirement`.

use std::{sync::Arc, time::Duration};

use tokio::sync::watch;

pub use super::readiness::{KeyCheck, Readiness, SelfTestReport};
use super::{
    catalog::CatalogLoader,
    crypto::CryptoService,
    probes::{KeyFault, Vacant},
    readiness::KeyHealth,
    replica,
    retirement::{self, RetireFacts, RetirePlan},
};
use crate::service::targets::TargetList;
use crate::{
    crypto::kms::{provider_of_new_key, ProviderKind},
    error::{Error, Result},
    keys::{Catalog, KeyCatalog, KeyRecord, KeyStatus},
    rotation::{target::RotationTarget, RotationJob},
    store::{
        replicas::{KeyUsage, ReplicaRecord},
        LegacyCheck, NewKey, RetireOutcome, Store, StoreError,
    },
};

/// A request to register a key record.
#[derive(Debug, Clone, Default)]
pub struct CreateKey {
    pub key_id: String,
    /// Empty: `local:<key_id>` for the local provider.
    pub kms_key_arn: String,
    pub alias: Option<String>,
    /// Empty: inferred from `kms_key_arn`.
    pub provider: String,
    pub activate: bool,
}

/// How an activation reaches the replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Staging {
    /// Active at once; replicas follow on their next catalog reload.
    Immediate,
    /// First every live replica must show it can decrypt under the key
    /// (within `timeout`); only then does it become active.
    Staged { timeout: Duration },
}

/// The outcome of an activation.
#[derive(Debug, Clone)]
pub struct Activation {
    pub activated: KeyRecord,
    /// The key that was active before, now `rotating`.
    pub previous: Option<KeyRecord>,
    /// Staged: the live replicas that confirmed the key before it became
    /// active.
    pub confirmed: Vec<ReplicaRecord>,
}

/// The outcome of a retirement.
#[derive(Debug, Clone)]
pub struct Retirement {
    pub key: KeyRecord,
    pub referencing_rows: i64,
    /// With force: the blockers that were overridden.
    pub overridden: Vec<String>,
}

/// Rows on one key (or legacy rows) across the rotation targets.
#[derive(Debug, Clone)]
pub struct KeyUsageReport {
    /// `None` for legacy rows, or for rows naming a key id with no record.
    pub key: Option<KeyRecord>,
    /// `encryption_keys.id` the rows name; `None` for legacy rows.
    pub key_record_id: Option<String>,
    /// One entry per rotation target, in configuration order.
    pub targets: Vec<KeyUsage>,
}

impl KeyUsageReport {
    pub fn rows(&self) -> i64 {
        self.targets.iter().map(|u| u.rows).sum()
    }

    /// Rows that still hold a legacy ciphertext, all targets together.
    pub fn legacy_copies(&self) -> i64 {
        self.targets.iter().map(|u| u.legacy_copies).sum()
    }

    /// Of those, the rows the last `legacy cutover` check found in
    /// conflict with their envelope.
    pub fn legacy_conflicts(&self) -> i64 {
        self.targets.iter().map(|u| u.legacy_conflicts).sum()
    }

    pub fn oldest_written_at(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        self.targets
            .iter()
            .filter_map(|u| u.oldest_written_at)
            .min()
    }
}

/// The catalog after a refresh.
#[derive(Debug, Clone)]
pub struct RefreshSummary {
    pub key_count: usize,
    pub active_key_id: Option<String>,
}

pub struct KeyAdmin {
    store: Store,
    catalog: Arc<CatalogLoader>,
    crypto: Arc<CryptoService>,
    targets: Arc<TargetList>,
}

/// Longest `key_id` accepted.
const MAX_KEY_ID_LEN: usize = 128;

impl KeyAdmin {
    pub fn new(
        store: Store,
        catalog: Arc<KeyCatalog>,
        crypto: Arc<CryptoService>,
        targets: Arc<TargetList>,
    ) -> Self {
        let health = KeyHealth::new(store.clone(), Arc::clone(&crypto), Arc::clone(&targets));
        let catalog = Arc::new(CatalogLoader::new(
            store.clone(),
            catalog,
            Arc::clone(&crypto),
            health,
        ));
        Self {
            store,
            catalog,
            crypto,
            targets,
        }
    }

    /// The crypto service this admin service checks keys with.
    pub fn crypto(&self) -> &Arc<CryptoService> {
        &self.crypto
    }

    /// The catalog's loader: the crypto service's read-through source.
    pub fn catalog(&self) -> &Arc<CatalogLoader> {
        &self.catalog
    }

    /// Why this process cannot open what another process wrote under some
    /// key (another master secret), as of the last check; see
    /// [`KeyHealth::misconfigured`].
    pub fn misconfigured(&self) -> Option<String> {
        self.catalog.health().misconfigured()
    }

    /// Whether this process can use each non-retired key of `catalog`; see
    /// [`KeyHealth::key_faults`].
    pub async fn key_faults(
        &self,
        catalog: &Catalog,
        fresh: bool,
    ) -> Result<std::collections::BTreeMap<String, Option<KeyFault>>> {
        self.catalog.health().key_faults(catalog, fresh).await
    }

    /// Reloads the catalog, then round-trips every non-retired key and opens
    /// its probe (runbook §2.3); see [`KeyHealth::self_test`].
    pub async fn self_test(&self) -> Result<SelfTestReport> {
        let catalog = self.catalog.load().await?;
        self.catalog.health().self_test(&catalog).await
    }

    /// The key catalog as this process has it now.
    pub fn catalog_snapshot(&self) -> Arc<Catalog> {
        self.catalog.snapshot()
    }

    /// Follows catalog reloads (the replica agent subscribes here).
    pub fn catalog_loads(&self) -> watch::Receiver<i64> {
        self.catalog.loads()
    }

    /// Follows readiness changes (health reporting subscribes here).
    pub fn readiness(&self) -> watch::Receiver<Readiness> {
        self.catalog.health().readiness()
    }

    pub async fn list_keys(&self) -> Result<Vec<KeyRecord>> {
        Ok(self.store.list_keys().await?)
    }

    /// Registers a key record (runbook §1.2's INSERT).
    pub async fn create_key(&self, req: CreateKey) -> Result<KeyRecord> {
        let new = validate_new_key(req)?;
        let key_id = new.key_id.clone();
        if new.status == KeyStatus::Active {
            self.check_usable(&new).await?;
        }
        // The creator defines what the key's data decrypts with: its probe
        // goes in with the record. A pending key whose KMS cannot be reached
        // yet is registered without one; its activation writes it.
        let probe = match replica::seal_probe(&self.crypto, &new.record()).await {
            Ok(probe) => Some(probe),
            Err(err) if new.status == KeyStatus::Pending => {
                tracing::warn!(key_id = %key_id, error = %err, "no probe sealed for the new key; its activation writes one");
                None
            }
            Err(err) => {
                return Err(Error::KeyUnusable {
                    key_id,
                    source: Box::new(err),
                })
            }
        };
        let record = self
            .store
            .insert_key(&new, probe.as_deref())
            .await
            .map_err(|err| match err {
                StoreError::Conflict(_) => Error::KeyExists(key_id),
                other => Error::Store(other),
            })?;
        self.refresh().await?;
        tracing::info!(key_id = %record.key_id, id = %record.id, provider = %record.provider, status = %record.status, "key registered");
        Ok(record)
    }

    /// Makes a key active; the previous active key becomes `rotating`.
    /// The key must round-trip through its KMS first, so a misconfigured
    /// key never becomes the one every Encrypt uses. Staged, every live
    /// replica must also decrypt a probe under it first.
    pub async fn activate_key(&self, ident: &str, staging: Staging) -> Result<Activation> {
        let key = self.find(ident).await?;
        match key.status {
            KeyStatus::Active => {
                return Ok(Activation {
                    activated: key,
                    previous: None,
                    confirmed: Vec::new(),
                })
            }
            KeyStatus::Retired => {
                return Err(Error::KeyStatusConflict {
                    key_id: key.key_id,
                    status: key.status,
                    hint: "a retired key cannot be activated again; register a new key",
                })
            }
            KeyStatus::Pending | KeyStatus::Rotating => {}
        }
        let record = Arc::new(key.clone());
        let unusable = |err: Error| Error::KeyUnusable {
            key_id: key.key_id.clone(),
            source: Box::new(err),
        };
        self.crypto.round_trip(&record).await.map_err(unusable)?;
        // This process must open the key's probe; a key without one gets it
        // here (after a sample of its rows decrypted, if it has rows).
        let probe = self.store.key_probe(&key.id).await?;
        super::probes::prove_key(
            &self.crypto,
            &self.store,
            &self.targets.current(),
            &record,
            probe.as_deref(),
            Vacant::WriteProbe,
        )
        .await
        .map_err(|fault| unusable(fault.into()))?;
        let confirmed = match staging {
            Staging::Immediate => Vec::new(),
            Staging::Staged { timeout } => self.stage(&key, timeout).await?,
        };
        let previous = self
            .store
            .list_keys()
            .await?
            .into_iter()
            .find(|k| k.status == KeyStatus::Active);
        self.store.activate_key(&key.id).await?;
        let catalog = self.catalog.reload().await?;
        let activated = catalog
            .get(&key.id)
            .map(|k| KeyRecord::clone(k))
            .ok_or_else(|| Error::KeyNotFound(ident.to_owned()))?;
        let previous = previous.and_then(|p| catalog.get(&p.id).map(|k| KeyRecord::clone(k)));
        tracing::info!(key_id = %activated.key_id, previous = ?previous.as_ref().map(|p| &p.key_id), staged = !confirmed.is_empty(), "key activated");
        Ok(Activation {
            activated,
            previous,
            confirmed,
        })
    }

    /// Staged activation's wait: stores a probe under `key` (which moves
    /// the catalog version), then waits until every live replica has
    /// loaded that version and decrypted the probe.
    async fn stage(&self, key: &KeyRecord, timeout: Duration) -> Result<Vec<ReplicaRecord>> {
        // The key has its probe (activate_key saw to it). Touching the key
        // moves the catalog version: every replica loads it and opens the
        // probe before it confirms.
        let version = self.store.touch_key(&key.id).await?;
        replica::await_confirmations(&self.store, key, version, timeout).await
    }

    /// Every process that heartbeats into this database (live or gone
    /// within the hour), and the database's catalog version.
    pub async fn list_replicas(&self) -> Result<(Vec<ReplicaRecord>, i64)> {
        let replicas = self.store.list_replicas().await?;
        Ok((replicas, self.store.catalog_version().await?))
    }

    /// Rows per key (legacy included) in every rotation target: every key
    /// record, then legacy rows, then ids with no record.
    pub async fn key_usage(&self) -> Result<Vec<KeyUsageReport>> {
        let targets = self.fresh_targets().await?;
        let usage = self.store.key_usage(&targets).await?;
        let keys = self.store.list_keys().await?;
        let report_for = |record_id: Option<&str>| -> Vec<KeyUsage> {
            targets
                .iter()
                .map(|t| {
                    usage
                        .iter()
                        .find(|u| {
                            u.target == t.table.as_str() && u.key_record_id.as_deref() == record_id
                        })
                        .cloned()
                        .unwrap_or_else(|| KeyUsage {
                            target: t.table.as_str().to_owned(),
                            key_record_id: record_id.map(str::to_owned),
                            rows: 0,
                            oldest_written_at: None,
                            legacy_copies: 0,
                            legacy_conflicts: 0,
                        })
                })
                .collect()
        };
        let mut reports: Vec<KeyUsageReport> = keys
            .iter()
            .map(|key| KeyUsageReport {
                targets: report_for(Some(&key.id)),
                key_record_id: Some(key.id.clone()),
                key: Some(key.clone()),
            })
            .collect();
        reports.push(KeyUsageReport {
            key: None,
            key_record_id: None,
            targets: report_for(None),
        });
        let mut orphans: Vec<&str> = usage
            .iter()
            .filter_map(|u| u.key_record_id.as_deref())
            .filter(|id| !keys.iter().any(|k| k.id == *id))
            .collect();
        orphans.sort_unstable();
        orphans.dedup();
        reports.extend(orphans.into_iter().map(|id| KeyUsageReport {
            key: None,
            key_record_id: Some(id.to_owned()),
            targets: report_for(Some(id)),
        }));
        Ok(reports)
    }

    /// The last `legacy cutover` check of each target's legacy copies.
    pub async fn legacy_checks(&self) -> Result<Vec<LegacyCheck>> {
        Ok(self.store.legacy_checks().await?)
    }

    /// What would keep `ident` from being retired now, and what to run
    /// next (`RetireKey` with `dry_run`).
    pub async fn retire_plan(&self, ident: &str) -> Result<RetirePlan> {
        self.plan_retirement(self.find(ident).await?).await
    }

    /// The [`RetirePlan`] of a key record already read.
    async fn plan_retirement(&self, key: KeyRecord) -> Result<RetirePlan> {
        let usage = self.store.key_usage(&self.fresh_targets().await?).await?;
        let legacy_copies = usage.iter().map(|u| u.legacy_copies).sum();
        let legacy_conflicts = usage.iter().map(|u| u.legacy_conflicts).sum();
        let rows: Vec<KeyUsage> = usage
            .into_iter()
            .filter(|u| u.key_record_id.as_deref() == Some(key.id.as_str()) && u.rows > 0)
            .collect();
        let jobs: Vec<RotationJob> = self
            .store
            .list_jobs(1000)
            .await?
            .into_iter()
            .filter(|j| !j.status.is_terminal())
            .collect();
        let replicas = replica::encrypting_with(&self.store, &key).await?;
        Ok(retirement::plan(RetireFacts {
            key,
            rows,
            jobs,
            replicas,
            active_key_id: self.catalog.snapshot().active().map(|k| k.key_id.clone()),
            legacy_copies,
            legacy_conflicts,
        }))
    }

    /// Retires a `rotating` key (runbook §1.6). Anything in its
    /// [`RetirePlan`] refuses it unless `force`; a forced retirement
    /// reports what it overrode (the API audits that).
    pub async fn retire_key(&self, ident: &str, force: bool) -> Result<Retirement> {
        let key = self.find(ident).await?;
        match key.status {
            KeyStatus::Retired => {
                let referencing_rows = self
                    .store
                    .count_key_references(&key.id, &self.fresh_targets().await?)
                    .await?;
                return Ok(Retirement {
                    key,
                    referencing_rows,
                    overridden: Vec::new(),
                });
            }
            KeyStatus::Active => {
                return Err(Error::KeyStatusConflict {
                    key_id: key.key_id,
                    status: key.status,
                    hint: "activate another key first; only rotating keys can be retired",
                })
            }
            KeyStatus::Pending => {
                return Err(Error::KeyStatusConflict {
                    key_id: key.key_id,
                    status: key.status,
                    hint: "only rotating keys can be retired",
                })
            }
            KeyStatus::Rotating => {}
        }
        let plan = self.plan_retirement(key.clone()).await?;
        if !plan.blockers.is_empty() && !force {
            return Err(Error::RetireBlocked {
                key_id: key.key_id,
                blockers: plan.blockers,
                next_steps: plan.next_steps,
            });
        }
        let outcome = self
            .store
            .retire_key(&key.id, force, &self.fresh_targets().await?)
            .await?;
        let retirement = match outcome {
            RetireOutcome::Retired {
                key,
                referencing_rows,
            } => Retirement {
                key,
                referencing_rows,
                overridden: plan.blockers,
            },
            RetireOutcome::InUse { referencing_rows } => {
                return Err(Error::KeyInUse {
                    key_id: key.key_id,
                    rows: referencing_rows,
                })
            }
            RetireOutcome::NotRotating => return Err(Error::Store(StoreError::Concurrent)),
        };
        self.refresh().await?;
        tracing::info!(key_id = %retirement.key.key_id, force, referencing_rows = retirement.referencing_rows, overridden = ?retirement.overridden, "key retired");
        Ok(retirement)
    }

    /// The rotation targets as the database lists them now: what counts
    /// rows on a key (usage, retirement) must not miss a table added a
    /// moment ago on another host.
    async fn fresh_targets(&self) -> Result<Arc<Vec<RotationTarget>>> {
        self.targets.reload().await?;
        Ok(self.targets.current())
    }

    /// The rotation targets this process follows.
    pub fn targets(&self) -> &Arc<TargetList> {
        &self.targets
    }

    /// Reloads the catalog from the database and re-evaluates readiness
    /// (runbook §1.3).
    pub async fn refresh(&self) -> Result<RefreshSummary> {
        let catalog = self.catalog.reload().await?;
        // The rotation targets change with the catalog version too.
        self.targets.reload().await?;
        Ok(RefreshSummary {
            key_count: catalog.keys().len(),
            active_key_id: catalog.active().map(|k| k.key_id.clone()),
        })
    }

    /// Upserts the active key, as the runbook's `seed:encryption-key` does.
    /// An existing record with the same `key_id` is (re)activated; one with
    /// a different `kms_key_arn` is refused rather than silently repointed,
    /// which would orphan everything wrapped under the old KMS key.
    pub async fn seed_key(&self, req: CreateKey) -> Result<KeyRecord> {
        let new = validate_new_key(CreateKey {
            activate: true,
            ..req
        })?;
        match self.store.find_key(&new.key_id).await? {
            Some(existing) if existing.kms_key_arn != new.kms_key_arn => Err(Error::InvalidField {
                field: "kms_key_arn",
                reason: format!(
                    "key {} already exists with kms_key_arn {}; register a new key_id instead of repointing it",
                    existing.key_id, existing.kms_key_arn
                ),
            }),
            Some(existing) => Ok(self
                .activate_key(&existing.id, Staging::Immediate)
                .await?
                .activated),
            None => self.create_key_from(new).await,
        }
    }

    async fn create_key_from(&self, new: NewKey) -> Result<KeyRecord> {
        self.create_key(CreateKey {
            key_id: new.key_id,
            kms_key_arn: new.kms_key_arn,
            alias: new.alias,
            provider: new.provider.as_str().to_owned(),
            activate: new.status == KeyStatus::Active,
        })
        .await
    }

    async fn find(&self, ident: &str) -> Result<KeyRecord> {
        self.store
            .find_key(ident)
            .await?
            .ok_or_else(|| Error::KeyNotFound(ident.to_owned()))
    }

    /// Checks a key that is about to become active can round-trip.
    async fn check_usable(&self, new: &NewKey) -> Result<()> {
        self.crypto
            .round_trip(&Arc::new(new.record()))
            .await
            .map_err(|err| Error::KeyUnusable {
                key_id: new.key_id.clone(),
                source: Box::new(err),
            })
    }
}

/// Parses a create request into a record to insert.
fn validate_new_key(req: CreateKey) -> Result<NewKey> {
    let key_id = req.key_id.trim().to_owned();
    if key_id.is_empty() {
        return Err(invalid("key_id", "must not be empty"));
    }
    if key_id.len() > MAX_KEY_ID_LEN {
        return Err(invalid("key_id", "must be at most 128 characters"));
    }
    if !key_id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.:/@".contains(c))
    {
        return Err(invalid(
            "key_id",
            "may contain only letters, digits and - _ . : / @",
        ));
    }
    let explicit =
        match req.provider.trim() {
            "" => None,
            name => Some(ProviderKind::parse(name).ok_or_else(|| {
                invalid("provider", "must be \"local\", \"aws-kms\" or \"pkcs11\"")
            })?),
        };
    let arn = req.kms_key_arn.trim().to_owned();
    let (provider, kms_key_arn) = match (explicit, arn.is_empty()) {
        (Some(ProviderKind::AwsKms), true) => {
            return Err(invalid(
                "kms_key_arn",
                "an aws-kms key needs its KMS key ARN, id or alias",
            ))
        }
        (Some(ProviderKind::Pkcs11), true) => {
            return Err(invalid(
                "kms_key_arn",
                "a pkcs11 key needs its PKCS#11 URI (pkcs11:token=TOKEN;object=LABEL)",
            ))
        }
        (_, true) => (ProviderKind::Local, format!("local:{key_id}")),
        (explicit, false) => {
            let named =
                provider_of_new_key(&arn).map_err(|e| invalid("kms_key_arn", &e.to_string()))?;
            if explicit.is_some_and(|kind| kind != named) {
                return Err(invalid(
                    "provider",
                    &format!(
                        "kms_key_arn {arn:?} names an {named} key, not {}",
                        explicit.map_or("", |k| k.as_str())
                    ),
                ));
            }
            (named, arn)
        }
    };
    let alias = req
        .alias
        .map(|a| a.trim().to_owned())
        .filter(|a| !a.is_empty());
    Ok(NewKey {
        id: uuid::Uuid::new_v4().to_string(),
        key_id,
        kms_key_arn,
        alias,
        provider,
        status: if req.activate {
            KeyStatus::Active
        } else {
            KeyStatus::Pending
        },
    })
}

fn invalid(field: &'static str, reason: &str) -> Error {
    Error::InvalidField {
        field,
        reason: reason.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(key_id: &str, arn: &str, provider: &str) -> CreateKey {
        CreateKey {
            key_id: key_id.into(),
            kms_key_arn: arn.into(),
            provider: provider.into(),
            ..CreateKey::default()
        }
    }

    #[test]
    fn local_keys_get_a_default_kms_name() {
        let new = validate_new_key(req("2025-03", "", "")).unwrap();
        assert_eq!(new.kms_key_arn, "local:2025-03");
        assert_eq!(new.provider, ProviderKind::Local);
        assert_eq!(new.status, KeyStatus::Pending);
    }

    #[test]
    fn provider_is_inferred_or_checked() {
        let new = validate_new_key(req("k", "arn:aws:kms:us-east-1:1:key/x", "")).unwrap();
        assert_eq!(new.provider, ProviderKind::AwsKms);
        assert!(validate_new_key(req("k", "", "aws-kms")).is_err());
        assert!(validate_new_key(req("k", "", "gcp")).is_err());
        assert!(validate_new_key(req("k", "local:k", "aws-kms")).is_err());
        assert!(validate_new_key(req("k", "alias/app", "local")).is_err());
    }

    #[test]
    fn a_key_reference_keyward_cannot_use_is_refused_with_the_accepted_forms() {
        for (arn, says) in [
            ("my-key", "not a key reference keyward understands"),
            ("local:", "not a key reference keyward understands"),
            (
                "projects/p/locations/global/keyRings/r/cryptoKeys/k",
                "Google Cloud KMS key; that provider is not in this build",
            ),
            ("pkcs11:token=t", "names no object"),
            ("vault:transit/k", "HashiCorp Vault key"),
        ] {
            let Err(Error::InvalidField { field, reason }) = validate_new_key(req("k", arn, ""))
            else {
                panic!("{arn} accepted");
            };
            assert_eq!(field, "kms_key_arn");
            assert!(
                reason.contains(says) && reason.contains("alias/"),
                "{reason}"
            );
        }
        for arn in [
            "arn:aws:kms:us-east-1:123456789012:key/runbook-example",
            "arn:aws-cn:kms:cn-north-1:1:alias/x",
            "alias/app/2025-03",
            "1234abcd-12ab-34cd-56ef-1234567890ab",
            "local:2025-03",
            "pkcs11:token=keyward;object=kek-2026-12",
        ] {
            assert!(validate_new_key(req("k", arn, "")).is_ok(), "{arn}");
        }
    }

    #[test]
    fn key_ids_are_validated() {
        assert!(validate_new_key(req("", "", "")).is_err());
        assert!(validate_new_key(req("has space", "", "")).is_err());
        assert!(validate_new_key(req(&"k".repeat(129), "", "")).is_err());
    }
}
