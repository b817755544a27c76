//! `encryption_keys`: the key catalog's rows.

use chrono::{DateTime, Utc};

use super::{on_pool, BeginWrite, Store, StoreError};
use crate::{
    crypto::kms::ProviderKind,
    keys::{KeyRecord, KeyStatus},
    rotation::target::RotationTarget,
};

/// The columns a key record is read from. The status is read as text and
/// written as a literal: an application's `encryption_keys` may declare it
/// an enum (adoption), which a text parameter cannot be compared with or
/// written into.
const KEY_COLUMNS: &str =
    "id, key_id, kms_key_arn, alias, provider, CAST(status AS TEXT) AS status, \
     created_at, updated_at, rotated_at";

#[derive(sqlx::FromRow)]
struct KeyRow {
    id: String,
    key_id: String,
    kms_key_arn: String,
    alias: Option<String>,
    provider: Option<String>,
    status: String,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    rotated_at: Option<DateTime<Utc>>,
}

impl TryFrom<KeyRow> for KeyRecord {
    type Error = StoreError;

    fn try_from(row: KeyRow) -> Result<Self, StoreError> {
        let status = KeyStatus::parse(&row.status).ok_or_else(|| {
            StoreError::Corrupt(format!("key {} has status {:?}", row.key_id, row.status))
        })?;
        let provider = match row.provider.as_deref() {
            None | Some("") => ProviderKind::infer(&row.kms_key_arn),
            Some(name) => ProviderKind::parse(name).ok_or_else(|| {
                StoreError::Corrupt(format!("key {} has provider {name:?}", row.key_id))
            })?,
        };
        Ok(KeyRecord {
            id: row.id,
            key_id: row.key_id,
            kms_key_arn: row.kms_key_arn,
            alias: row.alias,
            provider,
            status,
            created_at: row.created_at,
            updated_at: row.updated_at,
            rotated_at: row.rotated_at,
        })
    }
}

/// A key record to insert.
#[derive(Debug, Clone)]
pub struct NewKey {
    /// The record's `id` (a UUID), chosen before the insert so the key's
    /// probe can be sealed under it and inserted in the same transaction.
    pub id: String,
    pub key_id: String,
    pub kms_key_arn: String,
    pub alias: Option<String>,
    pub provider: ProviderKind,
    pub status: KeyStatus,
}

impl NewKey {
    /// The record as it will be once inserted (timestamps now).
    pub fn record(&self) -> KeyRecord {
        let now = Utc::now();
        KeyRecord {
            id: self.id.clone(),
            key_id: self.key_id.clone(),
            kms_key_arn: self.kms_key_arn.clone(),
            alias: self.alias.clone(),
            provider: self.provider,
            status: self.status,
            created_at: now,
            updated_at: now,
            rotated_at: None,
        }
    }
}

/// What `retire_key` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetireOutcome {
    /// Retired; `referencing_rows` rows still pointed at it (only with force).
    Retired {
        key: KeyRecord,
        referencing_rows: i64,
    },
    /// Not retired: rows still reference the key and force was not given.
    InUse { referencing_rows: i64 },
    /// Not retired: the key was not `rotating` when the write ran.
    NotRotating,
}

impl Store {
    /// Every key record, newest first.
    pub async fn list_keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
        let sql =
            format!("SELECT {KEY_COLUMNS} FROM encryption_keys ORDER BY created_at DESC, key_id");
        let rows: Vec<KeyRow> = on_pool!(self, |pool| sqlx::query_as(&sql).fetch_all(pool).await)?;
        rows.into_iter().map(KeyRecord::try_from).collect()
    }

    /// A key by its `key_id` or, failing that, its `id`.
    pub async fn find_key(&self, ident: &str) -> Result<Option<KeyRecord>, StoreError> {
        let sql = format!(
            "SELECT {KEY_COLUMNS} FROM encryption_keys WHERE key_id = $1 OR id = $1 \
             ORDER BY CASE WHEN key_id = $1 THEN 0 ELSE 1 END LIMIT 1"
        );
        let row: Option<KeyRow> = on_pool!(self, |pool| sqlx::query_as(&sql)
            .bind(ident)
            .fetch_optional(pool)
            .await)?;
        row.map(KeyRecord::try_from).transpose()
    }

    /// Inserts a key record. An `active` insert demotes the current active
    /// key to `rotating` in the same transaction.
    /// Inserts a key record, with its probe (`service::probes`) in the same
    /// transaction when there is one: no other process ever sees the key
    /// without it, so none can write a probe of its own first.
    pub async fn insert_key(
        &self,
        new: &NewKey,
        probe: Option<&[u8]>,
    ) -> Result<KeyRecord, StoreError> {
        let id = &new.id;
        let now = Utc::now();
        let insert = format!(
            "INSERT INTO encryption_keys (id, key_id, kms_key_arn, alias, provider, status, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, '{}', $6, $6) RETURNING {KEY_COLUMNS}",
            new.status.as_str()
        );
        let row: KeyRow = on_pool!(self, |pool| {
            let mut tx = pool.begin_write().await?;
            if new.status == KeyStatus::Active {
                sqlx::query(DEMOTE_ACTIVE)
                    .bind(now)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
            }
            let row = sqlx::query_as(&insert)
                .bind(id)
                .bind(&new.key_id)
                .bind(&new.kms_key_arn)
                .bind(&new.alias)
                .bind(new.provider.as_str())
                .bind(now)
                .fetch_one(&mut *tx)
                .await?;
            if let Some(probe) = probe {
                sqlx::query(
                    "INSERT INTO keyward_key_probes (key_id, probe, created_at) VALUES ($1, $2, $3)",
                )
                .bind(id)
                .bind(probe)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            Ok::<_, sqlx::Error>(row)
        })?;
        row.try_into()
    }

    /// Makes key `id` active and the previous active key `rotating`, in one
    /// transaction. Only a `pending` or `rotating` key can be activated;
    /// [`StoreError::Concurrent`] if it was neither when the write ran.
    pub async fn activate_key(&self, id: &str) -> Result<(), StoreError> {
        let now = Utc::now();
        let activated = on_pool!(self, |pool| {
            let mut tx = pool.begin_write().await?;
            sqlx::query(DEMOTE_ACTIVE)
                .bind(now)
                .bind(id)
                .execute(&mut *tx)
                .await?;
            let done = sqlx::query(
                "UPDATE encryption_keys SET status = 'active', updated_at = $1 \
                 WHERE id = $2 AND status IN ('pending', 'rotating')",
            )
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if done == 1 {
                tx.commit().await?;
            }
            Ok::<_, sqlx::Error>(done == 1)
        })?;
        if activated {
            Ok(())
        } else {
            Err(StoreError::Concurrent)
        }
    }

    /// Retires a `rotating` key. Counting references (in every rotation
    /// target) and the status change happen in one transaction, so a
    /// refusal is accurate at the time.
    pub async fn retire_key(
        &self,
        id: &str,
        force: bool,
        targets: &[RotationTarget],
    ) -> Result<RetireOutcome, StoreError> {
        let count_references = RotationTarget::count_on_key_sql(targets);
        let now = Utc::now();
        let update = format!(
            "UPDATE encryption_keys SET status = 'retired', updated_at = $1 \
             WHERE id = $2 AND status = 'rotating' RETURNING {KEY_COLUMNS}"
        );
        let (refs, row): (i64, Option<KeyRow>) = on_pool!(self, |pool| {
            let mut tx = pool.begin_write().await?;
            let refs: i64 = sqlx::query_scalar(&count_references)
                .bind(id)
                .fetch_one(&mut *tx)
                .await?;
            if refs > 0 && !force {
                return Ok(RetireOutcome::InUse {
                    referencing_rows: refs,
                });
            }
            let row: Option<KeyRow> = sqlx::query_as(&update)
                .bind(now)
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok::<_, StoreError>((refs, row))
        })?;
        match row {
            Some(row) => Ok(RetireOutcome::Retired {
                key: row.try_into()?,
                referencing_rows: refs,
            }),
            None => Ok(RetireOutcome::NotRotating),
        }
    }

    /// How many rows of the rotation targets name key `id`.
    pub async fn count_key_references(
        &self,
        id: &str,
        targets: &[RotationTarget],
    ) -> Result<i64, StoreError> {
        let sql = RotationTarget::count_on_key_sql(targets);
        let count = on_pool!(self, |pool| sqlx::query_scalar(&sql)
            .bind(id)
            .fetch_one(pool)
            .await)?;
        Ok(count)
    }
}

const DEMOTE_ACTIVE: &str =
    "UPDATE encryption_keys SET status = 'rotating', rotated_at = $1, updated_at = $1 \
     WHERE status = 'active' AND id <> $2";
