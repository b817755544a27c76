//! The key catalog: key records (`encryption_keys` rows as domain values)
//! and the in-memory snapshot that the hot path reads without a database
//! round trip.

use std::{collections::HashMap, fmt, sync::Arc};

use arc_swap::ArcSwap;
use chrono::{DateTime, Utc};

use crate::crypto::kms::{KekRef, ProviderKind};

/// Lifecycle of a key record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KeyStatus {
    /// Registered; decrypts, but new writes do not use it yet.
    Pending,
    /// The one key new Encrypts use.
    Active,
    /// The previous active key while secrets migrate off it.
    Rotating,
    /// No new writes; kept for restores.
    Retired,
}

impl KeyStatus {
    pub const ALL: [KeyStatus; 4] = [Self::Pending, Self::Active, Self::Rotating, Self::Retired];

    /// The value stored in `encryption_keys.status`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Active => "active",
            Self::Rotating => "rotating",
            Self::Retired => "retired",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

impl fmt::Display for KeyStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `pad`, so a width in the format string (the CLI's tables) applies.
        f.pad(self.as_str())
    }
}

/// One key record: metadata only. Key material is never in the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    /// `encryption_keys.id`, named by envelopes and `connections.encryption_key_id`.
    pub id: String,
    /// The operator's name for the key.
    pub key_id: String,
    /// The KMS key that wraps this record's data keys.
    pub kms_key_arn: String,
    pub alias: Option<String>,
    pub provider: ProviderKind,
    pub status: KeyStatus,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub rotated_at: Option<DateTime<Utc>>,
}

impl KeyRecord {
    /// A local key whose `kms_key_arn` is not `local:NAME`: a record made
    /// before such names were refused (or inserted by hand), whose name was
    /// taken as a local key's. It works; `keys list` and `self-test` point
    /// it out, since a new record would have to say `local:` (or name the
    /// AWS key it was meant to be).
    pub fn local_by_guess(&self) -> bool {
        self.provider == ProviderKind::Local && !self.kms_key_arn.starts_with("local:")
    }

    /// The KEK reference a provider needs.
    pub fn kek(&self) -> KekRef<'_> {
        KekRef {
            record_id: &self.id,
            kms_key_arn: &self.kms_key_arn,
        }
    }
}

/// An immutable snapshot of `encryption_keys`.
#[derive(Debug, Default)]
pub struct Catalog {
    by_id: HashMap<String, Arc<KeyRecord>>,
    active: Option<Arc<KeyRecord>>,
    keys: Vec<Arc<KeyRecord>>,
    /// The database's catalog version when the rows were read (0: never
    /// loaded).
    version: i64,
}

impl Catalog {
    pub fn new(records: Vec<KeyRecord>, version: i64) -> Self {
        let keys: Vec<Arc<KeyRecord>> = records.into_iter().map(Arc::new).collect();
        let by_id = keys.iter().map(|k| (k.id.clone(), Arc::clone(k))).collect();
        let active = keys.iter().find(|k| k.status == KeyStatus::Active).cloned();
        Self {
            by_id,
            active,
            keys,
            version,
        }
    }

    /// The catalog version these records are from (at least).
    pub fn version(&self) -> i64 {
        self.version
    }

    /// The key new Encrypts use.
    pub fn active(&self) -> Option<&Arc<KeyRecord>> {
        self.active.as_ref()
    }

    /// A key by `encryption_keys.id`.
    pub fn get(&self, id: &str) -> Option<&Arc<KeyRecord>> {
        self.by_id.get(id)
    }

    pub fn keys(&self) -> &[Arc<KeyRecord>] {
        &self.keys
    }
}

/// The process-wide catalog: readers take a snapshot lock-free; a refresh
/// swaps in a new one.
#[derive(Default)]
pub struct KeyCatalog(ArcSwap<Catalog>);

impl KeyCatalog {
    pub fn snapshot(&self) -> Arc<Catalog> {
        self.0.load_full()
    }

    /// The active key. Unlike [`Self::snapshot`] it leaves the catalog's
    /// reference count alone: every Encrypt reads it, from every worker
    /// thread, and a shared count's cache line moves between cores on each
    /// change.
    pub fn active(&self) -> Option<Arc<KeyRecord>> {
        self.0.load().active().cloned()
    }

    /// A key by `encryption_keys.id`, read as [`Self::active`] is.
    pub fn get(&self, id: &str) -> Option<Arc<KeyRecord>> {
        self.0.load().get(id).cloned()
    }

    pub fn replace(&self, records: Vec<KeyRecord>, version: i64) -> Arc<Catalog> {
        let catalog = Arc::new(Catalog::new(records, version));
        self.0.store(Arc::clone(&catalog));
        catalog
    }
}

#[cfg(test)]
impl KeyRecord {
    /// A local key record `id` named `key_id`, for unit tests.
    pub(crate) fn local_for_test(id: &str, key_id: &str, status: KeyStatus) -> Self {
        Self {
            id: id.into(),
            key_id: key_id.into(),
            kms_key_arn: format!("local:{key_id}"),
            alias: None,
            provider: ProviderKind::Local,
            status,
            created_at: Utc::now(),
            updated_at: Utc::now(),
            rotated_at: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, status: KeyStatus) -> KeyRecord {
        KeyRecord::local_for_test(id, &format!("k-{id}"), status)
    }

    #[test]
    fn snapshot_finds_active_and_by_id() {
        let catalog = KeyCatalog::default();
        assert!(catalog.snapshot().active().is_none());
        catalog.replace(
            vec![
                record("a", KeyStatus::Rotating),
                record("b", KeyStatus::Active),
            ],
            7,
        );
        let snap = catalog.snapshot();
        assert_eq!(snap.active().map(|k| k.id.as_str()), Some("b"));
        assert_eq!(snap.get("a").map(|k| k.status), Some(KeyStatus::Rotating));
        assert!(snap.get("zzz").is_none());
        assert_eq!(snap.version(), 7);
    }

    #[test]
    fn statuses_round_trip() {
        for st in KeyStatus::ALL {
            assert_eq!(KeyStatus::parse(st.as_str()), Some(st));
        }
    }
}
