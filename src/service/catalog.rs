//! Loading the key catalog: one [`CatalogLoader`] per process reads the
//! key records and the catalog version from the database, swaps them into
//! the in-memory [`KeyCatalog`], tells the crypto service (whose cache
//! follows retirements) and the replica agent (which heartbeats the version
//! loaded), and has [`KeyHealth`] re-evaluate readiness.
//!
//! Every path that reloads comes here: startup, the refresh timer and
//! `LISTEN` (through the key admin), a change made in this process, and
//! the read-through of a ciphertext naming a key this process has not
//! loaded yet ([`ReadThrough`], rate-limited).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::watch;

use super::{crypto::CryptoService, crypto::ReadThrough, readiness::KeyHealth};
use crate::{
    error::Result,
    keys::{Catalog, KeyCatalog},
    store::Store,
};

/// The least time between two read-through reloads: ciphertexts naming
/// made-up key ids cannot turn into a database query each.
const READ_THROUGH_EVERY: Duration = Duration::from_secs(1);

pub struct CatalogLoader {
    store: Store,
    catalog: Arc<KeyCatalog>,
    crypto: Arc<CryptoService>,
    /// Readiness, the self-test and the keys' probes, re-evaluated after
    /// every reload.
    health: KeyHealth,
    /// The catalog version of each reload, so this process's replica agent
    /// heartbeats a change made here at once.
    loaded: watch::Sender<i64>,
    /// When the last read-through reload ran (at most one per
    /// [`READ_THROUGH_EVERY`]; concurrent misses wait for it and share it).
    /// When the last read-through reload ran, and why it failed if it did.
    last_read_through: tokio::sync::Mutex<Option<(Instant, Option<String>)>>,
}

impl CatalogLoader {
    pub fn new(
        store: Store,
        catalog: Arc<KeyCatalog>,
        crypto: Arc<CryptoService>,
        health: KeyHealth,
    ) -> Self {
        let (loaded, _) = watch::channel(0);
        Self {
            store,
            catalog,
            crypto,
            health,
            loaded,
            last_read_through: tokio::sync::Mutex::new(None),
        }
    }

    /// Readiness, the keys' probes and the self-test.
    pub fn health(&self) -> &KeyHealth {
        &self.health
    }

    /// The key catalog as this process has it now.
    pub fn snapshot(&self) -> Arc<Catalog> {
        self.catalog.snapshot()
    }

    /// Follows catalog reloads (the replica agent subscribes here).
    pub fn loads(&self) -> watch::Receiver<i64> {
        self.loaded.subscribe()
    }

    /// Reloads the catalog and re-evaluates readiness.
    pub async fn reload(&self) -> Result<Arc<Catalog>> {
        let catalog = self.load().await?;
        self.health.publish(&catalog).await;
        Ok(catalog)
    }

    /// Reloads the catalog only (the self-test evaluates the keys itself).
    pub async fn load(&self) -> Result<Arc<Catalog>> {
        // The version first: a change between the two reads makes the
        // next version check reload again, never miss it.
        let version = self.store.catalog_version().await?;
        let records = self.store.list_keys().await?;
        let catalog = self.catalog.replace(records, version);
        self.crypto.catalog_changed(&catalog);
        self.loaded.send_replace(version);
        Ok(catalog)
    }

    /// Reloads the catalog because a ciphertext names `record_id`, which
    /// this process does not know: once, rate-limited.
    /// Within the interval after a failed reload, that failure is the
    /// answer: the catalog still cannot be read.
    async fn reload_for(&self, record_id: &str) -> Result<(), String> {
        let mut last = self.last_read_through.lock().await;
        if self.catalog.get(record_id).is_some() {
            return Ok(());
        }
        if let Some((at, failure)) = last.as_ref() {
            if at.elapsed() < READ_THROUGH_EVERY {
                return failure.clone().map_or(Ok(()), Err);
            }
        }
        let failure = match self.reload().await {
            Ok(_) => {
                tracing::debug!(%record_id, "catalog reloaded for an unknown key id");
                None
            }
            Err(err) => {
                tracing::warn!(error = %err, "read-through catalog reload failed");
                Some(err.to_string())
            }
        };
        *last = Some((Instant::now(), failure.clone()));
        failure.map_or(Ok(()), Err)
    }
}

#[async_trait::async_trait]
impl ReadThrough for CatalogLoader {
    async fn read_through(&self, record_id: &str) -> Result<(), String> {
        self.reload_for(record_id).await
    }
}
