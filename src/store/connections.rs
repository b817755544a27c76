//! `connections`: the application's table of stored credentials (and the
//! legacy copies `keyward legacy cutover` clears from any rotation target),
//! and the runbook's `connection_scoped_tokens` beside it.

use chrono::{DateTime, Utc};

use super::{
    on_pool,
    rotation::RotationRow,
    tx::{Arg, WriteTx},
    Pool, Store, StoreError,
};
use crate::rotation::target::{sqlite_unix_seconds, RotationTarget};

impl Store {
    /// The next page (after id `cursor`, empty at the start) of `target`'s
    /// rows that are on a key and still hold a legacy copy: what `legacy
    /// cutover` examines. Empty for a target without legacy columns.
    pub async fn legacy_copies_page(
        &self,
        target: &RotationTarget,
        cursor: &str,
        limit: i64,
    ) -> Result<Vec<RotationRow>, StoreError> {
        let Some(sql) = target.select_legacy_copies_sql(cursor.is_empty()) else {
            return Ok(Vec::new());
        };
        let rows: Vec<RotationRow> = on_pool!(self, |pool| sqlx::query_as(&sql)
            .bind(cursor)
            .bind(limit)
            .fetch_all(pool)
            .await)?;
        Ok(rows
            .into_iter()
            .map(|row| row.decoded(target.encoding))
            .collect())
    }

    /// Clears `row`'s legacy copy if the row is still as it was read (key,
    /// payload and legacy ciphertext unchanged); whether it was.
    pub async fn clear_legacy_copy(
        &self,
        target: &RotationTarget,
        row: &RotationRow,
    ) -> Result<bool, StoreError> {
        let Some(sql) = target.clear_legacy_copy_sql() else {
            return Ok(false);
        };
        let enc = target.encoding;
        let (payload, legacy) = (row.stored_payload(enc), row.stored_legacy(enc));
        let cleared = self
            .execute(
                &sql,
                &[
                    (&row.id).into(),
                    row.encryption_key_id.as_deref().into(),
                    Arg::stored(enc, payload.as_ref()),
                    Arg::stored(enc, legacy.as_ref()),
                ],
            )
            .await?;
        Ok(cleared == 1)
    }

    /// Records a complete check of `target`'s legacy copies: the ids of
    /// the rows it found in conflict replace those of the previous check.
    pub async fn record_legacy_check(
        &self,
        target: &str,
        conflicts: &[String],
    ) -> Result<(), StoreError> {
        let mut tx = WriteTx::begin(&self.pool).await?;
        tx.execute(
            "DELETE FROM keyward_legacy_conflicts WHERE target_table = $1",
            &[target.into()],
        )
        .await?;
        for id in conflicts {
            tx.execute(
                "INSERT INTO keyward_legacy_conflicts (target_table, row_id) VALUES ($1, $2)",
                &[target.into(), id.into()],
            )
            .await?;
        }
        let count = i64::try_from(conflicts.len()).unwrap_or(i64::MAX);
        tx.execute(
            "INSERT INTO keyward_legacy_checks (target_table, checked_at, conflicts) \
             VALUES ($1, $2, $3) ON CONFLICT (target_table) \
             DO UPDATE SET checked_at = excluded.checked_at, conflicts = excluded.conflicts",
            &[target.into(), Utc::now().into(), count.into()],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The last check of each target's legacy copies, by target name.
    pub async fn legacy_checks(&self) -> Result<Vec<LegacyCheck>, StoreError> {
        let rows: Vec<(String, DateTime<Utc>, i64)> = on_pool!(self, |pool| sqlx::query_as(
            "SELECT target_table, checked_at, conflicts FROM keyward_legacy_checks \
             ORDER BY target_table"
        )
        .fetch_all(pool)
        .await)?;
        Ok(rows
            .into_iter()
            .map(|(target, checked_at, conflicts)| LegacyCheck {
                target,
                checked_at,
                conflicts,
            })
            .collect())
    }

    /// Which of `columns` of `table` are NOT NULL in the database's schema.
    pub async fn not_null_columns(
        &self,
        table: &str,
        columns: &[&str],
    ) -> Result<Vec<String>, StoreError> {
        let not_null: Vec<String> = match &self.pool {
            Pool::Postgres(pool) => {
                sqlx::query_scalar(
                    "SELECT CAST(attname AS TEXT) FROM pg_attribute \
                     WHERE attrelid = to_regclass(quote_ident($1)) AND attnum > 0 \
                       AND NOT attisdropped AND attnotnull",
                )
                .bind(table)
                .fetch_all(pool)
                .await?
            }
            Pool::Sqlite(pool) => {
                sqlx::query_scalar("SELECT name FROM pragma_table_info($1) WHERE \"notnull\" = 1")
                    .bind(table)
                    .fetch_all(pool)
                    .await?
            }
        };
        Ok(columns
            .iter()
            .filter(|c| not_null.iter().any(|n| n == *c))
            .map(|c| (*c).to_owned())
            .collect())
    }

    /// Writes a row in the legacy format, as the pre-keyward application did
    /// (with the payload mirror the migration backfills). Fixture generator
    /// only: keyward itself never writes legacy ciphertexts.
    pub async fn write_legacy_connection(
        &self,
        id: &str,
        name: Option<&str>,
        ciphertext: &[u8],
        iv: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        let now = chrono::Utc::now();
        on_pool!(self, |pool| sqlx::query(
            "INSERT INTO connections (id, name, encrypted_credentials, credentials_iv, \
                 payload_ciphertext, payload_iv, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $3, $4, $5, $5) \
             ON CONFLICT (id) DO UPDATE SET name = excluded.name, \
                 encrypted_credentials = excluded.encrypted_credentials, \
                 credentials_iv = excluded.credentials_iv, \
                 payload_ciphertext = excluded.payload_ciphertext, \
                 payload_iv = excluded.payload_iv, \
                 encryption_key_id = NULL, data_key_ciphertext = NULL, data_key_iv = NULL, \
                 updated_at = excluded.updated_at"
        )
        .bind(id)
        .bind(name)
        .bind(ciphertext)
        .bind(iv)
        .bind(now)
        .execute(pool)
        .await
        .map(|_| ()))?;
        Ok(())
    }

    /// Deletes `connection_scoped_tokens` that expired or were used.
    pub async fn prune_scoped_tokens(&self) -> Result<u64, StoreError> {
        let sql = format!(
            "DELETE FROM connection_scoped_tokens WHERE {}",
            self.aged_token()
        );
        let now = chrono::Utc::now();
        let removed = on_pool!(self, |pool| sqlx::query(&sql)
            .bind(now)
            .execute(pool)
            .await
            .map(|r| r.rows_affected()))?;
        Ok(removed)
    }

    /// The `connection_scoped_tokens` [`Self::prune_scoped_tokens`] would
    /// delete, for review (runbook §1.6.3), oldest expiry first.
    pub async fn aged_scoped_tokens(&self) -> Result<Vec<AgedToken>, StoreError> {
        let sql = format!(
            "SELECT CAST(id AS TEXT), CAST(connection_id AS TEXT), CAST(expires_at AS TEXT), \
             CAST(used_at AS TEXT) FROM connection_scoped_tokens WHERE {} ORDER BY expires_at",
            self.aged_token()
        );
        let now = chrono::Utc::now();
        let rows: Vec<(String, String, String, Option<String>)> =
            on_pool!(self, |pool| sqlx::query_as(&sql)
                .bind(now)
                .fetch_all(pool)
                .await)?;
        Ok(rows
            .into_iter()
            .map(|(id, connection_id, expires_at, used_at)| AgedToken {
                id,
                connection_id,
                expires_at,
                used_at,
            })
            .collect())
    }

    /// A scoped token that expired by `$1` or was used. On SQLite the
    /// times are compared as times, not text: the application may have
    /// stored `2026-12-06 23:00:00` (a space) where keyward writes
    /// `2026-12-06T23:00:00+00:00`, and as text every space-separated time
    /// sorts before every `T` one of the same day; or Unix seconds, as
    /// Drizzle's integer timestamps hold them.
    fn aged_token(&self) -> String {
        match self.backend() {
            super::Backend::Postgres => "expires_at <= $1 OR used_at IS NOT NULL".to_owned(),
            super::Backend::Sqlite => format!(
                "{} <= {} OR used_at IS NOT NULL",
                sqlite_unix_seconds("expires_at"),
                sqlite_unix_seconds("$1")
            ),
        }
    }
}

/// A scoped token due for pruning, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgedToken {
    pub id: String,
    pub connection_id: String,
    pub expires_at: String,
    /// Set when the token was used (then it is pruned whatever its expiry).
    pub used_at: Option<String>,
}

/// The last complete check (`keyward legacy cutover`, a dry run too) of a
/// target's legacy copies against its envelopes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegacyCheck {
    pub target: String,
    pub checked_at: DateTime<Utc>,
    /// Rows whose legacy copy held another plaintext than their envelope.
    pub conflicts: i64,
}
