//! `keyward_catalog_version`, `keyward_replicas`, `keyward_key_probes` and
//! the per-key row counts: what lets several keyward processes on one
//! database agree on the key catalog.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use super::{on_pool, Backend, BeginWrite, Pool, Store, StoreError};
use crate::{crypto::secret::Fingerprint, rotation::target::RotationTarget};

/// What a process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaKind {
    /// `keyward serve`: answers Encrypt and Decrypt.
    Serve,
    /// `keyward worker`: runs rotation jobs.
    Worker,
}

impl ReplicaKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Serve => "serve",
            Self::Worker => "worker",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Serve, Self::Worker]
            .into_iter()
            .find(|k| k.as_str() == s)
    }
}

/// One process's heartbeat, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaRecord {
    pub id: String,
    pub kind: ReplicaKind,
    pub host: String,
    pub pid: i64,
    /// The gRPC address of a `serve` replica.
    pub listen: Option<String>,
    /// keyward's version.
    pub version: String,
    pub started_at: DateTime<Utc>,
    pub heartbeat_at: DateTime<Utc>,
    /// Past this, the replica counts as gone.
    pub expires_at: DateTime<Utc>,
    /// The catalog version the replica has loaded.
    pub catalog_version: i64,
    /// `encryption_keys.id` of the key its Encrypts use.
    pub active_key_id: Option<String>,
    /// Since when it has used that key.
    pub active_since: Option<DateTime<Utc>>,
    /// Per `encryption_keys.id` of each non-retired key: `None` when the
    /// replica can use it, else why not.
    pub key_readiness: BTreeMap<String, Option<String>>,
    /// The master secrets it holds, current first; `None` from a keyward
    /// that does not report them.
    pub master_fingerprints: Option<Vec<Fingerprint>>,
}

impl ReplicaRecord {
    pub fn is_live(&self, now: DateTime<Utc>) -> bool {
        self.expires_at > now
    }
}

/// Rows of one rotation target on one key.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyUsage {
    /// The target table.
    pub target: String,
    /// `encryption_keys.id`; `None` for legacy rows (no key id).
    pub key_record_id: Option<String>,
    pub rows: i64,
    /// The oldest `updated_at` among them, when the target has that column.
    pub oldest_written_at: Option<DateTime<Utc>>,
    /// How many of them still hold a legacy ciphertext (all legacy rows;
    /// rows on a key until `keyward legacy cutover` clears their copy).
    pub legacy_copies: i64,
    /// Of those, the rows the last check found in conflict with their
    /// envelope ([`super::connections::LegacyCheck`]).
    pub legacy_conflicts: i64,
}

/// A row of [`RotationTarget::usage_sql`].
#[derive(sqlx::FromRow)]
struct UsageRow {
    key_record_id: Option<String>,
    row_count: i64,
    oldest_secs: Option<f64>,
    legacy_copies: i64,
    legacy_conflicts: i64,
}

#[derive(sqlx::FromRow)]
struct ReplicaRow {
    id: String,
    kind: String,
    host: String,
    pid: i64,
    listen: Option<String>,
    version: String,
    started_at: DateTime<Utc>,
    heartbeat_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
    catalog_version: i64,
    active_key_id: Option<String>,
    active_since: Option<DateTime<Utc>>,
    key_readiness: String,
    master_fingerprints: Option<String>,
}

impl TryFrom<ReplicaRow> for ReplicaRecord {
    type Error = StoreError;

    fn try_from(row: ReplicaRow) -> Result<Self, StoreError> {
        let corrupt = |what: &str| StoreError::Corrupt(format!("replica {} has {what}", row.id));
        Ok(ReplicaRecord {
            kind: ReplicaKind::parse(&row.kind).ok_or_else(|| corrupt("an unknown kind"))?,
            key_readiness: serde_json::from_str(&row.key_readiness)
                .map_err(|_| corrupt("unreadable key readiness"))?,
            master_fingerprints: match &row.master_fingerprints {
                None => None,
                Some(list) => Some(
                    list.split(',')
                        .filter(|fp| !fp.is_empty())
                        .map(Fingerprint::parse)
                        .collect::<Option<_>>()
                        .ok_or_else(|| corrupt("unreadable master fingerprints"))?,
                ),
            },
            id: row.id,
            host: row.host,
            pid: row.pid,
            listen: row.listen,
            version: row.version,
            started_at: row.started_at,
            heartbeat_at: row.heartbeat_at,
            expires_at: row.expires_at,
            catalog_version: row.catalog_version,
            active_key_id: row.active_key_id,
            active_since: row.active_since,
        })
    }
}

const REPLICA_COLUMNS: &str = "id, kind, host, pid, listen, version, started_at, heartbeat_at, \
     expires_at, catalog_version, active_key_id, active_since, key_readiness, master_fingerprints";

/// Replicas gone longer than this are deleted by the next heartbeat.
const FORGET_AFTER: chrono::Duration = chrono::Duration::hours(1);

/// Catalog changes announced by PostgreSQL (`LISTEN keyward_catalog`).
pub struct CatalogListener(sqlx::postgres::PgListener);

impl CatalogListener {
    /// Resolves on the next announced change. An error means the
    /// connection was lost; the caller falls back to polling.
    pub async fn changed(&mut self) -> Result<(), StoreError> {
        self.0.recv().await?;
        Ok(())
    }
}

impl Store {
    /// The catalog version: bumped by the database on every change to
    /// `encryption_keys`.
    pub async fn catalog_version(&self) -> Result<i64, StoreError> {
        let version = on_pool!(self, |pool| sqlx::query_scalar(
            "SELECT version FROM keyward_catalog_version WHERE id = 1"
        )
        .fetch_one(pool)
        .await)?;
        Ok(version)
    }

    /// Listens for catalog changes; `None` on SQLite, which has no
    /// notifications (replicas poll the version instead).
    pub async fn catalog_listener(&self) -> Result<Option<CatalogListener>, StoreError> {
        match &self.pool {
            Pool::Sqlite(_) => Ok(None),
            Pool::Postgres(pool) => {
                let mut listener = sqlx::postgres::PgListener::connect_with(pool).await?;
                listener.listen("keyward_catalog").await?;
                Ok(Some(CatalogListener(listener)))
            }
        }
    }

    /// Writes a replica's heartbeat, and forgets replicas long gone.
    pub async fn heartbeat(&self, replica: &ReplicaRecord) -> Result<(), StoreError> {
        let readiness = serde_json::to_string(&replica.key_readiness)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let fingerprints = replica.master_fingerprints.as_ref().map(|list| {
            list.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        });
        let sql = format!(
            "INSERT INTO keyward_replicas ({REPLICA_COLUMNS}) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) \
             ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at, \
             expires_at = excluded.expires_at, catalog_version = excluded.catalog_version, \
             active_key_id = excluded.active_key_id, active_since = excluded.active_since, \
             key_readiness = excluded.key_readiness, listen = excluded.listen, \
             master_fingerprints = excluded.master_fingerprints"
        );
        on_pool!(self, |pool| {
            sqlx::query(&sql)
                .bind(&replica.id)
                .bind(replica.kind.as_str())
                .bind(&replica.host)
                .bind(replica.pid)
                .bind(&replica.listen)
                .bind(&replica.version)
                .bind(replica.started_at)
                .bind(replica.heartbeat_at)
                .bind(replica.expires_at)
                .bind(replica.catalog_version)
                .bind(&replica.active_key_id)
                .bind(replica.active_since)
                .bind(&readiness)
                .bind(&fingerprints)
                .execute(pool)
                .await?;
            sqlx::query("DELETE FROM keyward_replicas WHERE expires_at < $1")
                .bind(replica.heartbeat_at - FORGET_AFTER)
                .execute(pool)
                .await
                .map(drop)
        })?;
        Ok(())
    }

    /// Removes a replica (it is shutting down).
    pub async fn remove_replica(&self, id: &str) -> Result<(), StoreError> {
        on_pool!(self, |pool| sqlx::query(
            "DELETE FROM keyward_replicas WHERE id = $1"
        )
        .bind(id)
        .execute(pool)
        .await
        .map(drop))?;
        Ok(())
    }

    /// Every replica that has heartbeat within the last hour, oldest first.
    pub async fn list_replicas(&self) -> Result<Vec<ReplicaRecord>, StoreError> {
        let sql = format!("SELECT {REPLICA_COLUMNS} FROM keyward_replicas ORDER BY started_at, id");
        let rows: Vec<ReplicaRow> =
            on_pool!(self, |pool| sqlx::query_as(&sql).fetch_all(pool).await)?;
        rows.into_iter().map(ReplicaRecord::try_from).collect()
    }

    /// Stores `probe` as key `key_id`'s probe unless the key has one
    /// already, and returns the probe the key has now: a probe is never
    /// replaced, so the first proof of what a key's data decrypts with
    /// stays the reference every replica is checked against.
    pub async fn insert_key_probe(
        &self,
        key_id: &str,
        probe: &[u8],
    ) -> Result<Vec<u8>, StoreError> {
        let stored = on_pool!(self, |pool| {
            let mut tx = pool.begin_write().await?;
            sqlx::query(
                "INSERT INTO keyward_key_probes (key_id, probe, created_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (key_id) DO NOTHING",
            )
            .bind(key_id)
            .bind(probe)
            .bind(Utc::now())
            .execute(&mut *tx)
            .await?;
            let stored: Vec<u8> =
                sqlx::query_scalar("SELECT probe FROM keyward_key_probes WHERE key_id = $1")
                    .bind(key_id)
                    .fetch_one(&mut *tx)
                    .await?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>(stored)
        })?;
        Ok(stored)
    }

    /// Key `key_id`'s probe, if it has one.
    pub async fn key_probe(&self, key_id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let probe = on_pool!(self, |pool| sqlx::query_scalar(
            "SELECT probe FROM keyward_key_probes WHERE key_id = $1"
        )
        .bind(key_id)
        .fetch_optional(pool)
        .await)?;
        Ok(probe)
    }

    /// Touches a key record, so the catalog version moves and every
    /// replica checks the key again; returns the new version.
    pub async fn touch_key(&self, key_id: &str) -> Result<i64, StoreError> {
        let version = on_pool!(self, |pool| {
            let mut tx = pool.begin_write().await?;
            sqlx::query("UPDATE encryption_keys SET updated_at = $2 WHERE id = $1")
                .bind(key_id)
                .bind(Utc::now())
                .execute(&mut *tx)
                .await?;
            let version: i64 =
                sqlx::query_scalar("SELECT version FROM keyward_catalog_version WHERE id = 1")
                    .fetch_one(&mut *tx)
                    .await?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>(version)
        })?;
        Ok(version)
    }

    /// Every stored readiness probe: `encryption_keys.id` → blob.
    pub async fn key_probes(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let rows = on_pool!(self, |pool| sqlx::query_as(
            "SELECT key_id, probe FROM keyward_key_probes"
        )
        .fetch_all(pool)
        .await)?;
        Ok(rows)
    }

    /// Replaces key `key_id`'s probe with `new` if it is still `old` (a
    /// rollover reseals it under the new master secret; only a process that
    /// opened `old` calls this). Whether it was replaced.
    pub async fn replace_key_probe(
        &self,
        key_id: &str,
        old: &[u8],
        new: &[u8],
    ) -> Result<bool, StoreError> {
        let replaced = self
            .execute(
                "UPDATE keyward_key_probes SET probe = $3 WHERE key_id = $1 AND probe = $2",
                &[key_id.into(), Some(old).into(), Some(new).into()],
            )
            .await?;
        Ok(replaced == 1)
    }

    /// Rows on each key in every rotation target, by the first `tag_len`
    /// bytes of their wrapped data key (what names the master secret that
    /// wrapped it): `(key record id, those bytes, rows)`.
    pub async fn wrapping_usage(
        &self,
        targets: &[RotationTarget],
        tag_len: usize,
    ) -> Result<Vec<(String, Option<Vec<u8>>, i64)>, StoreError> {
        let mut all = Vec::new();
        for target in targets {
            let sql = target.wrapping_sql(tag_len);
            let enc = target.encoding;
            let rows: Vec<(String, Option<Vec<u8>>, i64)> = if enc.is_text() {
                let rows: Vec<(String, Option<String>, i64)> =
                    on_pool!(self, |pool| sqlx::query_as(&sql).fetch_all(pool).await)?;
                // A prefix that is not in the encoding names no secret.
                rows.into_iter()
                    .map(|(key, head, n)| {
                        let tag = head.and_then(|h| enc.decode(h.as_bytes()).ok());
                        (key, tag.map(|t| t[..t.len().min(tag_len)].to_vec()), n)
                    })
                    .collect()
            } else {
                on_pool!(self, |pool| sqlx::query_as(&sql).fetch_all(pool).await)?
            };
            all.extend(rows);
        }
        Ok(all)
    }

    /// Rows per key in every rotation target (legacy rows under `None`),
    /// with the oldest `updated_at` where the target has one.
    pub async fn key_usage(&self, targets: &[RotationTarget]) -> Result<Vec<KeyUsage>, StoreError> {
        let mut usage = Vec::new();
        for target in targets {
            let sql = target.usage_sql(self.backend() == Backend::Postgres);
            let rows: Vec<UsageRow> =
                on_pool!(self, |pool| sqlx::query_as(&sql).fetch_all(pool).await)?;
            usage.extend(rows.into_iter().map(|row| KeyUsage {
                target: target.table.as_str().to_owned(),
                key_record_id: row.key_record_id,
                rows: row.row_count,
                oldest_written_at: row.oldest_secs.and_then(|secs| {
                    DateTime::from_timestamp_millis((secs * 1000.0).round() as i64)
                }),
                legacy_copies: row.legacy_copies,
                legacy_conflicts: row.legacy_conflicts,
            }));
        }
        Ok(usage)
    }
}
