//! The replica agent: what makes one keyward process a good citizen among
//! several on one database.
//!
//! It keeps the in-memory catalog current — a cheap poll of the catalog
//! version (every `catalog_poll`), and on PostgreSQL a `LISTEN` that
//! answers at once — and heartbeats into `keyward_replicas`: the catalog
//! version it has loaded, the key its Encrypts use (and since when), and
//! whether it can use each non-retired key (it opens the key's probe,
//! `service::probes`) and which master secrets it holds. A staged
//! activation waits on those heartbeats; a rotation job waits for `serve`
//! replicas that still encrypt with an older key. On shutdown the agent
//! deletes its row.

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc, time::Duration};

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::service::admin::KeyAdmin;
use crate::{
    keys::Catalog,
    store::{
        replicas::{CatalogListener, ReplicaKind, ReplicaRecord},
        Store,
    },
};

/// How often a replica looks at the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaOptions {
    /// Between heartbeats; a replica counts as gone after three missed.
    pub heartbeat: Duration,
    /// Between checks of the catalog version.
    pub catalog_poll: Duration,
    /// On PostgreSQL, also `LISTEN` for changes (off behind a pooler in
    /// transaction mode, which cannot hold a LISTEN).
    pub listen: bool,
    /// Between checks of each non-retired key (a KMS round trip, its
    /// probe), whose results the heartbeat carries
    /// (`service::probes::check_due`).
    pub key_check: Duration,
}

impl Default for ReplicaOptions {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_secs(5),
            catalog_poll: Duration::from_secs(1),
            listen: true,
            key_check: crate::service::probes::DEFAULT_KEY_CHECK,
        }
    }
}

/// One process's presence in `keyward_replicas`.
pub struct ReplicaAgent {
    store: Store,
    admin: Arc<KeyAdmin>,
    options: ReplicaOptions,
    record: ReplicaRecord,
    /// The catalog version the last heartbeat reported.
    reported_version: Option<i64>,
}

impl ReplicaAgent {
    pub fn new(
        kind: ReplicaKind,
        listen: Option<SocketAddr>,
        store: Store,
        admin: Arc<KeyAdmin>,
        options: ReplicaOptions,
    ) -> Self {
        let now = Utc::now();
        let id = uuid::Uuid::new_v4().simple().to_string();
        let record = ReplicaRecord {
            id: format!("{}-{}", kind.as_str(), &id[..12]),
            kind,
            host: hostname(),
            pid: i64::from(std::process::id()),
            listen: listen.map(|a| a.to_string()),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            started_at: now,
            heartbeat_at: now,
            expires_at: now,
            catalog_version: 0,
            active_key_id: None,
            active_since: None,
            key_readiness: BTreeMap::new(),
            master_fingerprints: Some(
                admin
                    .crypto()
                    .kms()
                    .local()
                    .map(|local| local.fingerprints().to_vec())
                    .unwrap_or_default(),
            ),
        };
        Self {
            store,
            admin,
            options,
            record,
            reported_version: None,
        }
    }

    /// This replica's id in `keyward_replicas`.
    pub fn id(&self) -> &str {
        &self.record.id
    }

    /// Heartbeats and follows the catalog until `stop`, then removes the
    /// replica's row.
    pub async fn run(mut self, stop: CancellationToken) {
        let listening = match self.options.listen {
            true => self.store.catalog_listener().await,
            false => Ok(None),
        };
        let mut listener = match listening {
            Ok(listener) => listener,
            Err(err) => {
                tracing::warn!(error = %err, "cannot LISTEN for catalog changes; polling the catalog version only");
                None
            }
        };
        let mut loads = self.admin.catalog_loads();
        let mut poll = tokio::time::interval(self.options.catalog_poll);
        let mut beat = tokio::time::interval(self.options.heartbeat);
        for ticker in [&mut poll, &mut beat] {
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        loop {
            tokio::select! {
                _ = beat.tick() => self.sync(true).await,
                _ = poll.tick() => self.sync(false).await,
                // A reload in this process (an admin change made here).
                Ok(()) = loads.changed() => self.sync(false).await,
                changed = notified(&mut listener) => {
                    if let Err(err) = changed {
                        tracing::warn!(error = %err, "catalog LISTEN connection lost; polling the catalog version only");
                        listener = None;
                    }
                    self.sync(false).await;
                }
                () = stop.cancelled() => break,
            }
        }
        if let Err(err) = self.store.remove_replica(&self.record.id).await {
            tracing::warn!(error = %err, replica = %self.record.id, "could not remove this replica's heartbeat row; it expires by itself");
        }
    }

    /// Reloads the catalog when the database's version moved on, and
    /// heartbeats when the loaded catalog changed since the last heartbeat
    /// (or always, with `beat`).
    async fn sync(&mut self, beat: bool) {
        match self.store.catalog_version().await {
            Ok(version) if version != self.admin.catalog_snapshot().version() => {
                if let Err(err) = self.admin.refresh().await {
                    tracing::warn!(error = %err, "catalog reload failed; keeping the previous catalog");
                }
            }
            Ok(_) => {}
            Err(err) => {
                tracing::warn!(error = %err, "cannot read the catalog version");
                return;
            }
        }
        let catalog = self.admin.catalog_snapshot();
        if beat || self.reported_version != Some(catalog.version()) {
            self.heartbeat(&catalog).await;
        }
    }

    async fn heartbeat(&mut self, catalog: &Catalog) {
        // Proven keys are remembered by the admin service; failures are
        // checked again on every heartbeat.
        let readiness: BTreeMap<String, Option<String>> = match self
            .admin
            .key_faults(catalog, false)
            .await
        {
            Ok(faults) => faults
                .into_iter()
                .map(|(id, fault)| (id, fault.map(|f| f.reason().to_owned())))
                .collect(),
            Err(err) => {
                tracing::warn!(error = %err, "cannot check the keys' probes; heartbeat skipped");
                return;
            }
        };

        let now = Utc::now();
        let active = catalog.active().map(|k| k.id.clone());
        if active != self.record.active_key_id {
            self.record.active_since = active.as_ref().map(|_| now);
            self.record.active_key_id = active;
        }
        self.record.key_readiness = readiness;
        self.record.catalog_version = catalog.version();
        self.record.heartbeat_at = now;
        self.record.expires_at = now + expiry(self.options.heartbeat);
        match self.store.heartbeat(&self.record).await {
            Ok(()) => self.reported_version = Some(catalog.version()),
            Err(err) => tracing::warn!(error = %err, "heartbeat failed"),
        }
        if let Err(err) =
            super::sync_wrapping(&self.store, self.admin.crypto(), Some(&self.record.id)).await
        {
            tracing::warn!(error = %err, "cannot read which master secrets the replicas have; wrapping as before");
        }
    }
}

/// A replica that missed three heartbeats counts as gone.
fn expiry(heartbeat: Duration) -> chrono::Duration {
    chrono::Duration::from_std(heartbeat * 3).unwrap_or(chrono::Duration::seconds(15))
}

/// The next catalog change announced by PostgreSQL; never, without a
/// listener.
async fn notified(listener: &mut Option<CatalogListener>) -> Result<(), crate::store::StoreError> {
    match listener {
        Some(listener) => listener.changed().await,
        None => std::future::pending().await,
    }
}

/// This machine's name, for operators reading `keyward replicas list`.
fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}
