//! Finishing a master-secret rollover (runbook §2.1).
//!
//! A new `ENCRYPTION_MASTER_KEY` with the old one as
//! `ENCRYPTION_MASTER_KEY_PREVIOUS`: once every live replica reports the
//! new secret (`replica::sync_wrapping`), new data keys are wrapped under
//! it. What was wrapped before still needs the old one: each wrapped data
//! key names its secret (`crypto::kms::local`), so a rotation rewraps the
//! rows on its target key that another secret wrapped, and reseals the
//! keys' probes ([`reseal_probes`]). [`RolloverReport`] says what still
//! needs a previous secret, and so when it may be removed.

use std::collections::BTreeMap;

use super::{
    crypto::{Ciphertext, CryptoService},
    replica::{probe_context, seal_probe},
};
use crate::{
    crypto::{
        kms::{
            local::{tag_names, Wrapping, WRAP_TAG_LEN},
            KmsProvider, ProviderKind,
        },
        secret::Fingerprint,
    },
    error::Result,
    keys::{Catalog, KeyRecord, KeyStatus},
    rotation::target::RotationTarget,
    store::Store,
};

/// Reseals, under the secret that wraps now, the probe of every
/// non-retired local key that another secret wrapped; returns their
/// `key_id`s. The old probe is opened first (only a process holding the
/// secret that made it may replace it), and replaced only if unchanged.
pub async fn reseal_probes(
    store: &Store,
    crypto: &CryptoService,
    catalog: &Catalog,
) -> Result<Vec<String>> {
    let Some(tag) = crypto.kms().local().and_then(|local| local.wrap_tag()) else {
        return Ok(Vec::new());
    };
    let mut resealed = Vec::new();
    for (key, probe) in local_probes(store, catalog).await? {
        let envelope = crypto.parse(Ciphertext::Blob(probe.clone()))?;
        if envelope.data_key_ciphertext.starts_with(&tag) {
            continue;
        }
        crypto
            .verify_under(&key, &envelope, &probe_context(&key.id)?)
            .await?;
        let fresh = seal_probe(crypto, &key).await?;
        if store.replace_key_probe(&key.id, &probe, &fresh).await? {
            tracing::info!(key_id = %key.key_id, "key probe resealed under the master secret that wraps now");
            resealed.push(key.key_id.clone());
        }
    }
    Ok(resealed)
}

/// The stored probe of every non-retired local key.
async fn local_probes(
    store: &Store,
    catalog: &Catalog,
) -> Result<Vec<(std::sync::Arc<KeyRecord>, Vec<u8>)>> {
    Ok(store
        .key_probes()
        .await?
        .into_iter()
        .filter_map(|(id, probe)| Some((catalog.get(&id)?.clone(), probe)))
        .filter(|(key, _)| key.provider == ProviderKind::Local && key.status != KeyStatus::Retired)
        .collect())
}

/// Where a rollover stands: what this process holds, what the replicas
/// report, and what still needs a previous secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloverReport {
    /// This process's secrets, current first.
    pub secrets: Vec<Fingerprint>,
    /// How this process wraps new data keys.
    pub wrapping: Wrapping,
    /// Each live replica and the secrets it reports (`None`: a keyward
    /// that does not report them).
    pub replicas: Vec<(String, Option<Vec<Fingerprint>>)>,
    /// Rows on local keys by the secret their data key names (`None`:
    /// wrapped before data keys named their secret).
    pub rows: BTreeMap<Option<Fingerprint>, i64>,
    /// Rows holding a legacy ciphertext, whose key derives from a master
    /// secret (until `keyward legacy cutover` clears them).
    pub legacy_copies: i64,
    /// `key_id`s of non-retired local keys whose probe another secret
    /// wrapped.
    pub stale_probes: Vec<String>,
}

impl RolloverReport {
    /// The secret every row should end under: the current one.
    pub fn current(&self) -> Option<Fingerprint> {
        self.secrets.first().copied()
    }

    /// Rows that still need a secret other than the current one: rows on
    /// local keys another secret wrapped (or one from before data keys
    /// named theirs), and legacy copies.
    pub fn rows_needing_previous(&self) -> i64 {
        let current = self.current();
        let wrapped: i64 = self
            .rows
            .iter()
            .filter(|(fp, _)| **fp != current || current.is_none())
            .map(|(_, n)| n)
            .sum();
        wrapped + self.legacy_copies
    }

    /// What must happen before the previous secrets may be removed, in
    /// order; empty when they may go.
    pub fn blockers(&self) -> Vec<String> {
        let mut blockers = Vec::new();
        let Some(current) = self.current() else {
            return vec!["this process has no master secret: set ENCRYPTION_MASTER_KEY".into()];
        };
        for (replica, secrets) in &self.replicas {
            match secrets {
                None => blockers.push(format!(
                    "replica {replica} runs a keyward that does not report its master secrets: upgrade it"
                )),
                Some(list) if !list.is_empty() && !list.contains(&current) => {
                    blockers.push(format!(
                        "replica {replica} does not have master secret {current}: restart it with the new ENCRYPTION_MASTER_KEY"
                    ))
                }
                Some(_) => {}
            }
        }
        if blockers.is_empty() && self.wrapping != Wrapping::Tagged(0) {
            blockers.push(format!(
                "new data keys are not yet wrapped under master secret {current}: wait for the next heartbeat"
            ));
        }
        let wrapped = self.rows_needing_previous() - self.legacy_copies;
        if wrapped > 0 {
            blockers.push(format!(
                "{wrapped} rows have data keys wrapped under another master secret: run keyward rotate start --watch (it rewraps them)"
            ));
        }
        if !self.stale_probes.is_empty() {
            blockers.push(format!(
                "the probes of {} are wrapped under another master secret: keyward rotate start reseals them",
                self.stale_probes.join(", ")
            ));
        }
        if self.legacy_copies > 0 {
            blockers.push(format!(
                "{} rows still hold a legacy ciphertext, whose key derives from the master secret: keyward legacy cutover --dry-run",
                self.legacy_copies
            ));
        }
        blockers
    }
}

/// Gathers a [`RolloverReport`].
pub async fn report(
    store: &Store,
    crypto: &CryptoService,
    catalog: &Catalog,
    targets: &[RotationTarget],
) -> Result<RolloverReport> {
    let local = crypto.kms().local();
    let secrets = local.map(|l| l.fingerprints().to_vec()).unwrap_or_default();
    let wrapping = local.map_or(Wrapping::Tagged(0), |l| l.wrapping());
    let now = chrono::Utc::now();
    let replicas = store
        .list_replicas()
        .await?
        .into_iter()
        .filter(|r| r.is_live(now))
        .map(|r| (super::replica::describe(&r), r.master_fingerprints))
        .collect();
    let mut rows = BTreeMap::new();
    for (key_id, tag, count) in store.wrapping_usage(targets, WRAP_TAG_LEN).await? {
        let local_key = catalog
            .get(&key_id)
            .is_some_and(|k| k.provider == ProviderKind::Local);
        if local_key {
            let by = tag.as_deref().and_then(tag_names);
            *rows.entry(by).or_insert(0) += count;
        }
    }
    let legacy_copies = store
        .key_usage(targets)
        .await?
        .iter()
        .map(|u| u.legacy_copies)
        .sum();
    let current_tag = local.and_then(|l| l.wrap_tag());
    let mut stale_probes = Vec::new();
    for (key, probe) in local_probes(store, catalog).await? {
        let under_current = crypto
            .parse(Ciphertext::Blob(probe))
            .ok()
            .zip(current_tag.as_ref())
            .is_some_and(|(envelope, tag)| envelope.data_key_ciphertext.starts_with(tag));
        if !under_current || wrapping != Wrapping::Tagged(0) {
            stale_probes.push(key.key_id.clone());
        }
    }
    Ok(RolloverReport {
        secrets,
        wrapping,
        replicas,
        rows,
        legacy_copies,
        stale_probes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::secret::MasterSecret;

    fn fp(s: &str) -> Fingerprint {
        MasterSecret::new(s).unwrap().fingerprint()
    }

    fn report(rows: &[(Option<Fingerprint>, i64)], legacy: i64) -> RolloverReport {
        RolloverReport {
            secrets: vec![fp("master-secret-b-0123"), fp("master-secret-a-0123")],
            wrapping: Wrapping::Tagged(0),
            replicas: vec![(
                "serve-1".into(),
                Some(vec![fp("master-secret-b-0123"), fp("master-secret-a-0123")]),
            )],
            rows: rows.iter().copied().collect(),
            legacy_copies: legacy,
            stale_probes: Vec::new(),
        }
    }

    #[test]
    fn the_previous_secret_may_go_when_nothing_needs_it() {
        let b = fp("master-secret-b-0123");
        let done = report(&[(Some(b), 300)], 0);
        assert_eq!(done.rows_needing_previous(), 0);
        assert!(done.blockers().is_empty(), "{:?}", done.blockers());
    }

    #[test]
    fn rows_under_another_secret_legacy_copies_and_probes_hold_it() {
        let (a, b) = (fp("master-secret-a-0123"), fp("master-secret-b-0123"));
        let mut open = report(&[(Some(b), 10), (Some(a), 5), (None, 2)], 3);
        open.stale_probes = vec!["primary".into()];
        assert_eq!(open.rows_needing_previous(), 5 + 2 + 3);
        let blockers = open.blockers().join("\n");
        assert!(
            blockers.contains("7 rows have data keys wrapped under another master secret"),
            "{blockers}"
        );
        assert!(blockers.contains("probes of primary"), "{blockers}");
        assert!(
            blockers.contains("3 rows still hold a legacy ciphertext"),
            "{blockers}"
        );
    }

    #[test]
    fn a_replica_without_the_new_secret_holds_it() {
        let mut open = report(&[], 0);
        open.replicas
            .push(("serve-2".into(), Some(vec![fp("master-secret-a-0123")])));
        open.replicas.push(("serve-3".into(), None));
        open.wrapping = Wrapping::Untagged;
        let blockers = open.blockers().join("\n");
        assert!(
            blockers.contains("replica serve-2 does not have master secret"),
            "{blockers}"
        );
        assert!(
            blockers.contains("replica serve-3 runs a keyward that does not report"),
            "{blockers}"
        );
    }
}
