//! `connections`: the application's table of stored credentials.

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
}
