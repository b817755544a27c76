//! `connections`: the application's table of stored credentials, and the
//! runbook's `connection_scoped_tokens` beside it.

use super::{on_pool, Store, StoreError};

impl Store {
    /// Writes a row in the legacy format, as the pre-keyward application did
    /// (with the payload mirror the migration backfills). Fixture generator
    /// only: keyward itself never writes legacy ciphertexts.
    pub async fn write_legacy_connection(
        &self,
        id: &str,
        name: Option<&str>,
        ciphertext: &[u8],
        iv: &[u8],
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
        let now = chrono::Utc::now();
        let removed = on_pool!(self, |pool| {
            sqlx::query(
            "DELETE FROM connection_scoped_tokens WHERE expires_at <= $1 OR used_at IS NOT NULL"
        )
        .bind(now)
        .execute(pool)
        .await
        .map(|r| r.rows_affected())
        })?;
        Ok(removed)
    }
}
