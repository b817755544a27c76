//! Statements only `keyward bench-rotation` and `bench-soak` use: bulk
//! rows, the single-statement floor, reading rows back, and clean-up.
//! Every statement is scoped to the benchmark's own id prefix.

use chrono::Utc;

use super::{on_pool, BeginWrite, Pool, Store, StoreError};
use crate::crypto::envelope::Envelope;

impl Store {
    /// Inserts envelope rows (PostgreSQL: one statement per call).
    pub async fn bulk_insert_connections(
        &self,
        rows: &[(String, Envelope)],
    ) -> Result<(), StoreError> {
        match &self.pool {
            Pool::Postgres(pool) => {
                let col = |f: fn(&Envelope) -> Vec<u8>| {
                    rows.iter().map(|(_, e)| f(e)).collect::<Vec<_>>()
                };
                sqlx::query(
                    "INSERT INTO connections (id, encryption_key_id, data_key_ciphertext, data_key_iv, \
                     payload_ciphertext, payload_iv) \
                     SELECT * FROM UNNEST($1::text[], $2::text[], $3::bytea[], $4::bytea[], $5::bytea[], $6::bytea[])",
                )
                .bind(rows.iter().map(|(id, _)| id.clone()).collect::<Vec<_>>())
                .bind(rows.iter().map(|(_, e)| e.encryption_key_id.clone()).collect::<Vec<_>>())
                .bind(col(|e| e.data_key_ciphertext.clone()))
                .bind(col(|e| e.data_key_iv.clone()))
                .bind(col(|e| e.payload_ciphertext.clone()))
                .bind(col(|e| e.payload_iv.clone()))
                .execute(pool)
                .await?;
            }
            Pool::Sqlite(pool) => {
                let mut tx = pool.begin_write().await?;
                for (id, e) in rows {
                    sqlx::query(
                        "INSERT INTO connections (id, encryption_key_id, data_key_ciphertext, data_key_iv, \
                         payload_ciphertext, payload_iv) VALUES ($1, $2, $3, $4, $5, $6)",
                    )
                    .bind(id)
                    .bind(&e.encryption_key_id)
                    .bind(&e.data_key_ciphertext)
                    .bind(&e.data_key_iv)
                    .bind(&e.payload_ciphertext)
                    .bind(&e.payload_iv)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
            }
        }
        Ok(())
    }

    /// The floor: one statement setting every benchmark row's key column to
    /// `key` and rewriting its other envelope columns in place.
    pub async fn rewrite_envelopes_in_place(
        &self,
        prefix: &str,
        key: &str,
    ) -> Result<u64, StoreError> {
        let pattern = format!("{prefix}%");
        let now = Utc::now();
        let n = on_pool!(self, |pool| sqlx::query(
            "UPDATE connections SET encryption_key_id = $3, \
             data_key_ciphertext = data_key_ciphertext, data_key_iv = data_key_iv, \
             payload_ciphertext = payload_ciphertext, payload_iv = payload_iv, updated_at = $2 \
             WHERE id LIKE $1"
        )
        .bind(&pattern)
        .bind(now)
        .bind(key)
        .execute(pool)
        .await
        .map(|r| r.rows_affected()))?;
        Ok(n)
    }

    /// Reclaims the dead tuples the floor left (PostgreSQL), so the
    /// rotation starts from the same table state the floor did.
    pub async fn vacuum_connections(&self) -> Result<(), StoreError> {
        if let Pool::Postgres(pool) = &self.pool {
            sqlx::query("VACUUM ANALYZE connections")
                .execute(pool)
                .await?;
        }
        Ok(())
    }

    pub async fn count_bench_rows_off_key(
        &self,
        prefix: &str,
        key: &str,
    ) -> Result<i64, StoreError> {
        let pattern = format!("{prefix}%");
        let n = on_pool!(self, |pool| {
            sqlx::query_scalar(
            "SELECT COUNT(*) FROM connections WHERE id LIKE $1 AND encryption_key_id IS DISTINCT FROM $2"
        )
        .bind(&pattern)
        .bind(key)
        .fetch_one(pool)
        .await
        })?;
        Ok(n)
    }

    pub async fn bench_row_envelope(&self, id: &str) -> Result<Option<Envelope>, StoreError> {
        let row: Option<EnvelopeColumns> = on_pool!(self, |pool| {
            sqlx::query_as(
            "SELECT encryption_key_id, data_key_ciphertext, data_key_iv, payload_ciphertext, payload_iv \
             FROM connections WHERE id = $1"
        )
        .bind(id)
        .fetch_optional(pool)
        .await
        })?;
        Ok(row.map(envelope))
    }

    /// Up to `limit` benchmark rows after id `after`, in id order.
    pub async fn bench_rows_page(
        &self,
        prefix: &str,
        after: &str,
        limit: i64,
    ) -> Result<Vec<(String, Envelope)>, StoreError> {
        let pattern = format!("{prefix}%");
        #[allow(clippy::type_complexity)] // the six columns, as read
        let rows: Vec<(
            String,
            Option<String>,
            Option<Vec<u8>>,
            Option<Vec<u8>>,
            Option<Vec<u8>>,
            Option<Vec<u8>>,
        )> = on_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT id, encryption_key_id, data_key_ciphertext, data_key_iv, payload_ciphertext, \
                 payload_iv FROM connections WHERE id LIKE $1 AND id > $2 ORDER BY id LIMIT $3",
            )
            .bind(&pattern)
            .bind(after)
            .bind(limit)
            .fetch_all(pool)
            .await
        })?;
        Ok(rows
            .into_iter()
            .map(|(id, k, dk, dkiv, ct, iv)| (id, envelope((k, dk, dkiv, ct, iv))))
            .collect())
    }

    /// Removes the benchmark's rows, its job and its keys.
    pub async fn delete_bench_data(
        &self,
        prefix: &str,
        job_id: &str,
        key_ids: &[&str],
    ) -> Result<(), StoreError> {
        let pattern = format!("{prefix}%");
        on_pool!(self, |pool| {
            sqlx::query("DELETE FROM connections WHERE id LIKE $1")
                .bind(&pattern)
                .execute(pool)
                .await?;
            sqlx::query("DELETE FROM encryption_rotation_jobs WHERE id = $1")
                .bind(job_id)
                .execute(pool)
                .await?;
            for key in key_ids {
                sqlx::query("DELETE FROM encryption_keys WHERE id = $1")
                    .bind(key)
                    .execute(pool)
                    .await?;
            }
            Ok::<_, sqlx::Error>(())
        })?;
        Ok(())
    }
}

/// The five envelope columns of `connections`, as read.
type EnvelopeColumns = (
    Option<String>,
    Option<Vec<u8>>,
    Option<Vec<u8>>,
    Option<Vec<u8>>,
    Option<Vec<u8>>,
);

fn envelope((k, dk, dkiv, ct, iv): EnvelopeColumns) -> Envelope {
    Envelope {
        encryption_key_id: k.unwrap_or_default(),
        data_key_ciphertext: dk.unwrap_or_default(),
        data_key_iv: dkiv.unwrap_or_default(),
        payload_ciphertext: ct.unwrap_or_default(),
        payload_iv: iv.unwrap_or_default(),
    }
}
