//! Whether this process can serve, and the self-test that says why not:
//! readiness (published on a watch channel that health follows), the
//! keys' probes (`service::probes`), and the self-test's report, which also
//! names other live replicas that cannot use a key. The admin service owns
//! one [`KeyHealth`] and calls it after every catalog reload.

use std::{collections::BTreeMap, sync::Arc};

use tokio::sync::watch;

use super::{
    crypto::CryptoService,
    probes::{KeyFault, KeyProofs},
    replica,
};
use crate::service::targets::TargetList;
use crate::{
    error::Result,
    keys::{Catalog, KeyRecord, KeyStatus},
    store::{replicas::ReplicaRecord, Store},
};

/// One key's self-test result.
#[derive(Debug, Clone)]
pub struct KeyCheck {
    pub key: Arc<KeyRecord>,
    /// `None` when this process round-tripped the key and opened its probe;
    /// the failure's message otherwise.
    pub error: Option<String>,
    /// The failure is that this process cannot open the key's data (its
    /// master secret or KMS key is not the one that wrote it).
    pub foreign: bool,
    /// Other live replicas that report they cannot use the key (a replica
    /// with another master secret shows here on every replica's self-test).
    pub replicas: Vec<String>,
}

impl KeyCheck {
    /// Everything that is wrong with the key, here and on other replicas.
    pub fn problems(&self) -> Option<String> {
        let mut all: Vec<String> = self.error.iter().cloned().collect();
        all.extend(self.replicas.iter().cloned());
        (!all.is_empty()).then(|| all.join("; "))
    }
}

/// The whole self-test.
#[derive(Debug, Clone)]
pub struct SelfTestReport {
    pub keys: Vec<KeyCheck>,
}

impl SelfTestReport {
    /// Passed when there is an active key and every non-retired key worked,
    /// here and on every live replica.
    pub fn passed(&self) -> bool {
        self.keys.iter().any(|c| c.key.status == KeyStatus::Active)
            && self
                .keys
                .iter()
                .all(|c| c.error.is_none() && c.replicas.is_empty())
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

/// Readiness, probes and the self-test of one process.
pub struct KeyHealth {
    store: Store,
    crypto: Arc<CryptoService>,
    targets: Arc<TargetList>,
    readiness: watch::Sender<Readiness>,
    /// Which keys this process has proven it can open (`service::probes`).
    proofs: KeyProofs,
}

impl KeyHealth {
    pub fn new(store: Store, crypto: Arc<CryptoService>, targets: Arc<TargetList>) -> Self {
        let (readiness, _) = watch::channel(Readiness::Starting);
        Self {
            store,
            crypto,
            targets,
            readiness,
            proofs: KeyProofs::default(),
        }
    }

    /// Checks each key again after `interval` (`serve --key-check-secs`).
    pub fn set_key_check_interval(&self, interval: std::time::Duration) {
        self.proofs.set_interval(interval);
    }

    /// Each non-retired key's last check here (record id → why it failed),
    /// without checking anything: what the metrics report.
    pub fn last_key_checks(&self) -> BTreeMap<String, Option<String>> {
        self.proofs.last()
    }

    /// Follows readiness changes.
    pub fn readiness(&self) -> watch::Receiver<Readiness> {
        self.readiness.subscribe()
    }

    /// Why this process cannot open what another process wrote under some
    /// key (another master secret), as of the last check; `None` when it
    /// can open every key's data. Such a process is not ready, refuses
    /// Encrypt, and its worker claims no rows (it would only fail them).
    pub fn misconfigured(&self) -> Option<String> {
        self.crypto.foreign()
    }

    /// Whether this process can use each non-retired key of `catalog`
    /// (`None`: it can), from the keys' scheduled checks
    /// (`service::probes`): a key is checked again when its KMS key or
    /// probe changes, or when its interval has passed, or always with
    /// `fresh`. Readiness follows the active key's result.
    pub async fn key_faults(
        &self,
        catalog: &Catalog,
        fresh: bool,
    ) -> Result<BTreeMap<String, Option<KeyFault>>> {
        let faults = self
            .proofs
            .check(
                &self.crypto,
                &self.store,
                &self.targets.current(),
                catalog,
                fresh,
            )
            .await?;
        let foreign = faults
            .values()
            .flatten()
            .find(|f| f.is_foreign())
            .map(|f| f.reason().to_owned());
        self.crypto.set_foreign(foreign);
        let active_fault = catalog
            .active()
            .and_then(|active| faults.get(&active.id).cloned().flatten())
            .map(|fault| fault.reason().to_owned());
        self.send(catalog, active_fault);
        Ok(faults)
    }

    /// Round-trips every non-retired key through its KMS and opens its
    /// probe (runbook §2.3), and reports what the other live replicas say
    /// they cannot use.
    pub async fn self_test(&self, catalog: &Catalog) -> Result<SelfTestReport> {
        let mut faults = self.key_faults(catalog, true).await?;
        let now = chrono::Utc::now();
        let others: Vec<ReplicaRecord> = self
            .store
            .list_replicas()
            .await?
            .into_iter()
            .filter(|r| r.is_live(now) && r.catalog_version >= catalog.version())
            .collect();
        let mut keys = Vec::new();
        for key in catalog
            .keys()
            .iter()
            .filter(|k| k.status != KeyStatus::Retired)
        {
            // The fresh check round-tripped the key and opened its probe.
            let fault = faults.remove(&key.id).flatten();
            let foreign = fault.as_ref().is_some_and(KeyFault::is_foreign);
            let error = fault.map(|fault| fault.reason().to_owned());
            // This process's own heartbeat row says what `error` says.
            let replicas = others
                .iter()
                .filter_map(|r| {
                    let reason = r.key_readiness.get(&key.id)?.as_ref()?;
                    (error.as_deref() != Some(reason.as_str()))
                        .then(|| format!("replica {}: {reason}", replica::describe(r)))
                })
                .collect();
            keys.push(KeyCheck {
                key: Arc::clone(key),
                error,
                foreign,
                replicas,
            });
        }
        // Readiness was published from the same checks (`key_faults`).
        Ok(SelfTestReport { keys })
    }

    /// Re-evaluates readiness from the keys' scheduled checks (the active
    /// key is checked again at most once per key-check interval while it
    /// passes, at every look while it fails); see [`Self::key_faults`].
    pub async fn publish(&self, catalog: &Catalog) {
        if let Err(err) = self.key_faults(catalog, false).await {
            tracing::warn!(error = %err, "cannot check the keys' probes; readiness keeps the last result of that check");
        }
    }

    /// Publishes readiness: an active key whose last check passed, and no
    /// key whose data this process cannot open (another master secret
    /// wrote it).
    fn send(&self, catalog: &Catalog, active_fault: Option<String>) {
        let readiness = match (catalog.active(), self.misconfigured()) {
            (_, Some(reason)) => Readiness::NotReady(reason),
            (None, None) => Readiness::NotReady("no active key".into()),
            (Some(active), None) => match active_fault {
                None => Readiness::Ready,
                Some(reason) => Readiness::NotReady(format!(
                    "active key {} failed its self-test: {reason}",
                    active.key_id
                )),
            },
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
