//! Several keyward processes on one database. Each runs an [`agent`]
//! that follows the catalog and heartbeats into `keyward_replicas`; this
//! module holds the rest of that protocol, which the admin operations use:
//! the staged-activation probe (sealed by the activator, checked by every
//! agent), the wait for every live replica to confirm a key, which
//! replicas still encrypt with a key, and which master secret wraps new
//! data keys (the one every live replica has: [`sync_wrapping`]).

pub mod agent;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

pub use agent::{ReplicaAgent, ReplicaOptions};

use super::crypto::CryptoService;
use crate::{
    crypto::{
        context::EncryptionContext,
        kms::local::{choose_wrapping, Wrapping},
    },
    error::{Error, Result},
    keys::KeyRecord,
    store::{
        replicas::{ReplicaKind, ReplicaRecord},
        Store,
    },
};

/// The fixed, public plaintext of a staged activation's probe.
const PROBE_PLAINTEXT: &[u8] = b"keyward staged activation probe";
/// The context key a probe is bound to (with the key record id).
const PROBE_CONTEXT_KEY: &str = "keyward:probe";

/// How long [`encrypting_with`] waits for replicas behind the catalog
/// version to report again.
const REPLICA_CATCH_UP: Duration = Duration::from_secs(3);

/// How often the waits here look at the replicas' heartbeats.
const HEARTBEAT_POLL: Duration = Duration::from_millis(200);

/// A key's probe (`service::probes`): the blob of a fixed, public
/// plaintext sealed under `key`.
pub(crate) async fn seal_probe(crypto: &CryptoService, key: &KeyRecord) -> Result<Vec<u8>> {
    let sealed = crypto
        .encrypt_with(
            &Arc::new(key.clone()),
            PROBE_PLAINTEXT,
            &probe_context(&key.id)?,
        )
        .await?;
    sealed.blob()
}

/// Waits until every live replica has loaded catalog `version` (or later)
/// and reports `key` usable. A replica that reports it cannot, or does not
/// report within `timeout`, is [`Error::ReplicaNotReady`]. Returns the live
/// replicas, which all confirmed.
pub(crate) async fn await_confirmations(
    store: &Store,
    key: &KeyRecord,
    version: i64,
    timeout: Duration,
) -> Result<Vec<ReplicaRecord>> {
    let deadline = Instant::now() + timeout;
    let mut reported = 0;
    loop {
        let now = chrono::Utc::now();
        let live: Vec<ReplicaRecord> = store
            .list_replicas()
            .await?
            .into_iter()
            .filter(|r| r.is_live(now))
            .collect();
        let mut waiting = Vec::new();
        for replica in &live {
            let readiness = (replica.catalog_version >= version)
                .then(|| replica.key_readiness.get(&key.id))
                .flatten();
            match readiness {
                Some(None) => {}
                Some(Some(reason)) => {
                    return Err(Error::ReplicaNotReady {
                        replica: describe(replica),
                        key_id: key.key_id.clone(),
                        reason: reason.clone(),
                    })
                }
                None => waiting.push(replica),
            }
        }
        let Some(first) = waiting.first() else {
            tracing::info!(key_id = %key.key_id, replicas = live.len(), "staged activation: every live replica can decrypt under the key");
            return Ok(live);
        };
        if Instant::now() >= deadline {
            return Err(Error::ReplicaNotReady {
                replica: describe(first),
                key_id: key.key_id.clone(),
                reason: format!(
                    "it did not confirm the key within {}s (it has catalog version {} of {version}; last heartbeat {})",
                    timeout.as_secs(),
                    first.catalog_version,
                    first.heartbeat_at.to_rfc3339()
                ),
            });
        }
        if waiting.len() != reported {
            reported = waiting.len();
            tracing::info!(key_id = %key.key_id, waiting = reported, live = live.len(), "staged activation: waiting for replicas to confirm the key");
        }
        tokio::time::sleep(HEARTBEAT_POLL).await;
    }
}

/// Live `serve` replicas whose heartbeat says they encrypt with `key`.
/// Those behind the database's catalog version are about to reload, so
/// they get [`REPLICA_CATCH_UP`] to report again first.
pub(crate) async fn encrypting_with(store: &Store, key: &KeyRecord) -> Result<Vec<ReplicaRecord>> {
    let deadline = Instant::now() + REPLICA_CATCH_UP;
    loop {
        let version = store.catalog_version().await?;
        let now = chrono::Utc::now();
        let holding: Vec<ReplicaRecord> = store
            .list_replicas()
            .await?
            .into_iter()
            .filter(|r| {
                r.is_live(now)
                    && r.kind == ReplicaKind::Serve
                    && r.active_key_id.as_deref() == Some(key.id.as_str())
            })
            .collect();
        let catching_up = holding.iter().any(|r| r.catalog_version < version);
        if !catching_up || Instant::now() >= deadline {
            return Ok(holding);
        }
        tokio::time::sleep(HEARTBEAT_POLL).await;
    }
}

/// Sets which of this process's master secrets wraps new data keys: the
/// first that every other live replica reports having
/// ([`choose_wrapping`]), so a rolling restart onto a new secret never
/// writes a data key another replica cannot unwrap. `this_replica` is left
/// out of the count (its own row may be stale). Nothing to do without a
/// master secret.
pub(crate) async fn sync_wrapping(
    store: &Store,
    crypto: &CryptoService,
    this_replica: Option<&str>,
) -> Result<()> {
    let Some(local) = crypto.kms().local() else {
        return Ok(());
    };
    let now = chrono::Utc::now();
    let others: Vec<_> = store
        .list_replicas()
        .await?
        .into_iter()
        .filter(|r| r.is_live(now) && Some(r.id.as_str()) != this_replica)
        .map(|r| r.master_fingerprints)
        .collect();
    let wrapping = choose_wrapping(local.fingerprints(), &others);
    if local.set_wrapping(wrapping) {
        // Cached data keys were wrapped under the secret before.
        crypto.cache().invalidate_all();
        let fingerprint = local
            .wrapping_fingerprint()
            .map(|fp| fp.to_string())
            .unwrap_or_default();
        match wrapping {
            Wrapping::Tagged(_) => {
                tracing::info!(master_secret = %fingerprint, "new data keys are wrapped under master secret {fingerprint}")
            }
            Wrapping::Untagged => {
                tracing::warn!(master_secret = %fingerprint, "a live replica runs a keyward that does not report its master secrets: new data keys are wrapped in the format it reads")
            }
        }
    }
    Ok(())
}

/// The context a key's probe under key record `id` is bound to.
pub(crate) fn probe_context(id: &str) -> Result<EncryptionContext> {
    Ok(EncryptionContext::from_pairs([(PROBE_CONTEXT_KEY, id)])?)
}

/// A replica as operators know it: host, process and address.
pub fn describe(replica: &ReplicaRecord) -> String {
    let listen = replica
        .listen
        .as_ref()
        .map(|l| format!(", {l}"))
        .unwrap_or_default();
    format!(
        "{} ({} pid {} on {}{listen})",
        replica.id,
        replica.kind.as_str(),
        replica.pid,
        replica.host,
    )
}
