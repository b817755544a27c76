//! Key administration (runbook §1.2, §1.3, §1.6, §2.3): the key catalog's
//! writes, its refresh, the self-test, and the readiness signal that health
//! reporting follows.

use std::sync::Arc;

use tokio::sync::watch;

use super::crypto::CryptoService;
use crate::{
    crypto::kms::ProviderKind,
    error::{Error, Result},
    keys::{Catalog, KeyCatalog, KeyRecord, KeyStatus},
    store::{NewKey, RetireOutcome, Store, StoreError},
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

/// The outcome of an activation.
#[derive(Debug, Clone)]
pub struct Activation {
    pub activated: KeyRecord,
    /// The key that was active before, now `rotating`.
    pub previous: Option<KeyRecord>,
}

/// The outcome of a retirement.
#[derive(Debug, Clone)]
pub struct Retirement {
    pub key: KeyRecord,
    pub referencing_rows: i64,
}

/// The catalog after a refresh.
#[derive(Debug, Clone)]
pub struct RefreshSummary {
    pub key_count: usize,
    pub active_key_id: Option<String>,
}

/// One key's self-test result.
#[derive(Debug, Clone)]
pub struct KeyCheck {
    pub key: Arc<KeyRecord>,
    /// `None` when the round trip succeeded; the failure's message otherwise.
    pub error: Option<String>,
}

/// The whole self-test.
#[derive(Debug, Clone)]
pub struct SelfTestReport {
    pub keys: Vec<KeyCheck>,
}

impl SelfTestReport {
    /// Passed when there is an active key and every non-retired key worked.
    pub fn passed(&self) -> bool {
        self.keys.iter().any(|c| c.key.status == KeyStatus::Active)
            && self.keys.iter().all(|c| c.error.is_none())
    }
}

/// Whether this process can serve Encrypt: the catalog is loaded, there is
/// an active key, and that key passed a round trip through its KMS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    Starting,
    Ready,
    NotReady(String),
}

pub struct KeyAdmin {
    store: Store,
    catalog: Arc<KeyCatalog>,
    crypto: Arc<CryptoService>,
    readiness: watch::Sender<Readiness>,
}

/// Longest `key_id` accepted.
const MAX_KEY_ID_LEN: usize = 128;

impl KeyAdmin {
    pub fn new(store: Store, catalog: Arc<KeyCatalog>, crypto: Arc<CryptoService>) -> Self {
        let (readiness, _) = watch::channel(Readiness::Starting);
        Self {
            store,
            catalog,
            crypto,
            readiness,
        }
    }

    /// The key catalog as this process has it now.
    pub fn catalog_snapshot(&self) -> Arc<Catalog> {
        self.catalog.snapshot()
    }

    /// Follows readiness changes (health reporting subscribes here).
    pub fn readiness(&self) -> watch::Receiver<Readiness> {
        self.readiness.subscribe()
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
        let record = self.store.insert_key(&new).await.map_err(|err| match err {
            StoreError::Conflict(_) => Error::KeyExists(key_id),
            other => Error::Store(other),
        })?;
        self.refresh().await?;
        tracing::info!(key_id = %record.key_id, id = %record.id, provider = %record.provider, status = %record.status, "key registered");
        Ok(record)
    }

    /// Makes a key active; the previous active key becomes `rotating`.
    /// The key must round-trip through its KMS first, so a misconfigured
    /// key never becomes the one every Encrypt uses.
    pub async fn activate_key(&self, ident: &str) -> Result<Activation> {
        let key = self.find(ident).await?;
        match key.status {
            KeyStatus::Active => {
                return Ok(Activation {
                    activated: key,
                    previous: None,
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
        self.crypto
            .round_trip(&Arc::new(key.clone()))
            .await
            .map_err(|err| Error::KeyUnusable {
                key_id: key.key_id.clone(),
                source: Box::new(err),
            })?;
        let previous = self
            .store
            .list_keys()
            .await?
            .into_iter()
            .find(|k| k.status == KeyStatus::Active);
        self.store.activate_key(&key.id).await?;
        let catalog = self.refresh_catalog().await?;
        let activated = catalog
            .get(&key.id)
            .map(|k| KeyRecord::clone(k))
            .ok_or_else(|| Error::KeyNotFound(ident.to_owned()))?;
        let previous = previous.and_then(|p| catalog.get(&p.id).map(|k| KeyRecord::clone(k)));
        tracing::info!(key_id = %activated.key_id, previous = ?previous.as_ref().map(|p| &p.key_id), "key activated");
        Ok(Activation {
            activated,
            previous,
        })
    }

    /// Retires a `rotating` key (runbook §1.6).
    pub async fn retire_key(&self, ident: &str, force: bool) -> Result<Retirement> {
        let key = self.find(ident).await?;
        match key.status {
            KeyStatus::Retired => {
                let referencing_rows = self.store.count_key_references(&key.id).await?;
                return Ok(Retirement {
                    key,
                    referencing_rows,
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
        let outcome = self.store.retire_key(&key.id, force).await?;
        let retirement = match outcome {
            RetireOutcome::Retired {
                key,
                referencing_rows,
            } => Retirement {
                key,
                referencing_rows,
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
        tracing::info!(key_id = %retirement.key.key_id, force, referencing_rows = retirement.referencing_rows, "key retired");
        Ok(retirement)
    }

    /// Reloads the catalog from the database and re-evaluates readiness
    /// (runbook §1.3).
    pub async fn refresh(&self) -> Result<RefreshSummary> {
        let catalog = self.refresh_catalog().await?;
        Ok(RefreshSummary {
            key_count: catalog.keys().len(),
            active_key_id: catalog.active().map(|k| k.key_id.clone()),
        })
    }

    /// Round-trips every non-retired key through its KMS (runbook §2.3).
    pub async fn self_test(&self) -> Result<SelfTestReport> {
        let catalog = self.refresh_catalog_only().await?;
        let mut keys = Vec::new();
        for key in catalog
            .keys()
            .iter()
            .filter(|k| k.status != KeyStatus::Retired)
        {
            let error = self
                .crypto
                .round_trip(key)
                .await
                .err()
                .map(|e| e.to_string());
            keys.push(KeyCheck {
                key: Arc::clone(key),
                error,
            });
        }
        let report = SelfTestReport { keys };
        self.publish_readiness(&catalog, Some(&report)).await;
        Ok(report)
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
            Some(existing) => Ok(self.activate_key(&existing.id).await?.activated),
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
        let now = chrono::Utc::now();
        let probe = Arc::new(KeyRecord {
            id: "keyward:probe".into(),
            key_id: new.key_id.clone(),
            kms_key_arn: new.kms_key_arn.clone(),
            alias: None,
            provider: new.provider,
            status: KeyStatus::Pending,
            created_at: now,
            updated_at: now,
            rotated_at: None,
        });
        self.crypto
            .round_trip(&probe)
            .await
            .map_err(|err| Error::KeyUnusable {
                key_id: new.key_id.clone(),
                source: Box::new(err),
            })
    }

    async fn refresh_catalog(&self) -> Result<Arc<Catalog>> {
        let catalog = self.refresh_catalog_only().await?;
        self.publish_readiness(&catalog, None).await;
        Ok(catalog)
    }

    async fn refresh_catalog_only(&self) -> Result<Arc<Catalog>> {
        let records = self.store.list_keys().await?;
        let catalog = self.catalog.replace(records);
        self.crypto.catalog_changed(&catalog);
        Ok(catalog)
    }

    /// Ready means: an active key that round-trips. Uses the self-test's
    /// result when there is one, else probes the active key.
    async fn publish_readiness(&self, catalog: &Catalog, report: Option<&SelfTestReport>) {
        let readiness = match catalog.active() {
            None => Readiness::NotReady("no active key".into()),
            Some(active) => {
                let result =
                    match report.and_then(|r| r.keys.iter().find(|c| c.key.id == active.id)) {
                        Some(check) => check.error.clone(),
                        None => self
                            .crypto
                            .round_trip(active)
                            .await
                            .err()
                            .map(|e| e.to_string()),
                    };
                match result {
                    None => Readiness::Ready,
                    Some(reason) => Readiness::NotReady(format!(
                        "active key {} failed its self-test: {reason}",
                        active.key_id
                    )),
                }
            }
        };
        self.readiness.send_if_modified(|current| {
            if *current == readiness {
                false
            } else {
                *current = readiness;
                true
            }
        });
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
    let explicit = match req.provider.trim() {
        "" => None,
        name => Some(
            ProviderKind::parse(name)
                .ok_or_else(|| invalid("provider", "must be \"local\" or \"aws-kms\""))?,
        ),
    };
    let arn = req.kms_key_arn.trim().to_owned();
    let (provider, kms_key_arn) = match (explicit, arn.is_empty()) {
        (Some(ProviderKind::AwsKms), true) => {
            return Err(invalid(
                "kms_key_arn",
                "an aws-kms key needs its KMS key ARN, id or alias",
            ))
        }
        (Some(kind), false) => (kind, arn),
        (_, true) => (ProviderKind::Local, format!("local:{key_id}")),
        (None, false) => (ProviderKind::infer(&arn), arn),
    };
    let alias = req
        .alias
        .map(|a| a.trim().to_owned())
        .filter(|a| !a.is_empty());
    Ok(NewKey {
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
    }

    #[test]
    fn key_ids_are_validated() {
        assert!(validate_new_key(req("", "", "")).is_err());
        assert!(validate_new_key(req("has space", "", "")).is_err());
        assert!(validate_new_key(req(&"k".repeat(129), "", "")).is_err());
    }
}
