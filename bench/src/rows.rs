//! The benchmark's own rows in `connections`: writing them in bulk, the
//! one-statement floor, reading them back and removing them with the keys
//! and the job the run created. Every statement is scoped to the run's id
//! prefix (`bench-…-`, `soak-…-`), so nothing else in the table is read or
//! changed.
//!
//! keyward's own SQL lives in its `store` module; these statements are the
//! benchmark's, on a pool of its own (sqlx's `Any` driver: one text for
//! SQLite and PostgreSQL).

use std::sync::Arc;

use keyward::{
    app::Services,
    crypto::{context::EncryptionContext, envelope::Envelope},
    keys::KeyRecord,
    service::admin::CreateKey,
};
use sqlx::{any::AnyPoolOptions, AnyPool};

/// Rows per INSERT: 6 parameters each stays under SQLite's and
/// PostgreSQL's limits on bound parameters.
const INSERT_CHUNK: usize = 1000;

/// The five envelope columns of `connections`, as read.
type EnvelopeColumns = (
    Option<String>,
    Option<Vec<u8>>,
    Option<Vec<u8>>,
    Option<Vec<u8>>,
    Option<Vec<u8>>,
);

/// One benchmark run: its id, the prefix of its rows' ids, and the key it
/// first writes them under (created active). Every key it creates has a
/// key_id starting `{label}-` and holding its id.
pub struct Run {
    pub id: String,
    pub label: String,
    pub prefix: String,
    pub old_key: KeyRecord,
}

impl Run {
    /// A new run labelled `label` (`bench`, `soak`): rows `{label}-{id}-…`
    /// under key `{label}-old-{id}`.
    pub async fn begin(services: &Services, label: &str) -> anyhow::Result<Self> {
        let id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
        let old_key = services
            .admin
            .create_key(CreateKey {
                key_id: format!("{label}-old-{id}"),
                activate: true,
                ..CreateKey::default()
            })
            .await?;
        Ok(Self {
            prefix: format!("{label}-{id}-"),
            label: label.to_owned(),
            id,
            old_key,
        })
    }
}

/// A pool on the benchmark's database, for its own rows.
pub struct Rows {
    pool: AnyPool,
    postgres: bool,
}

impl Rows {
    pub async fn connect(database_url: &str) -> anyhow::Result<Self> {
        sqlx::any::install_default_drivers();
        let pool = AnyPoolOptions::new()
            .max_connections(2)
            .connect(database_url)
            .await?;
        Ok(Self {
            pool,
            postgres: database_url.starts_with("postgres"),
        })
    }

    /// Writes `rows` connections `{prefix}{n:09}` under `key`, each
    /// encrypted by keyward with its row's context `{"connection_id": id}`
    /// and inserted in bulk statements.
    pub async fn write(
        &self,
        services: &Services,
        key: &KeyRecord,
        prefix: &str,
        rows: usize,
        plaintext: impl Fn(&str) -> Vec<u8>,
    ) -> anyhow::Result<()> {
        let key = Arc::new(key.clone());
        let mut written = 0usize;
        while written < rows {
            let n = (rows - written).min(INSERT_CHUNK);
            let mut batch = Vec::with_capacity(n);
            for i in written..written + n {
                let id = format!("{prefix}{i:09}");
                let context = EncryptionContext::from_pairs([("connection_id", id.as_str())])?;
                let sealed = services
                    .crypto
                    .encrypt_with(&key, &plaintext(&id), &context)
                    .await?;
                batch.push((id, sealed.envelope));
            }
            self.insert(&batch).await?;
            written += n;
        }
        Ok(())
    }

    /// One multi-row INSERT.
    async fn insert(&self, rows: &[(String, Envelope)]) -> anyhow::Result<()> {
        let values: Vec<String> = (0..rows.len())
            .map(|i| {
                let p = i * 6;
                format!(
                    "(${}, ${}, ${}, ${}, ${}, ${})",
                    p + 1,
                    p + 2,
                    p + 3,
                    p + 4,
                    p + 5,
                    p + 6
                )
            })
            .collect();
        let sql = format!(
            "INSERT INTO connections (id, encryption_key_id, data_key_ciphertext, data_key_iv, \
             payload_ciphertext, payload_iv) VALUES {}",
            values.join(", ")
        );
        let mut query = sqlx::query(&sql);
        for (id, e) in rows {
            query = query
                .bind(id.as_str())
                .bind(e.encryption_key_id.as_str())
                .bind(e.data_key_ciphertext.as_slice())
                .bind(e.data_key_iv.as_slice())
                .bind(e.payload_ciphertext.as_slice())
                .bind(e.payload_iv.as_slice());
        }
        query.execute(&self.pool).await?;
        Ok(())
    }

    /// The floor: one statement setting every benchmark row's key column to
    /// `key` and rewriting its other envelope columns in place, as a
    /// rotation's write does.
    pub async fn rewrite_in_place(&self, prefix: &str, key: &str) -> anyhow::Result<u64> {
        let done = sqlx::query(
            "UPDATE connections SET encryption_key_id = $2, \
             data_key_ciphertext = data_key_ciphertext, data_key_iv = data_key_iv, \
             payload_ciphertext = payload_ciphertext, payload_iv = payload_iv, \
             updated_at = CURRENT_TIMESTAMP WHERE id LIKE $1",
        )
        .bind(format!("{prefix}%"))
        .bind(key)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// Reclaims the dead tuples the floor left (PostgreSQL), so the
    /// rotation starts from the same table state the floor did.
    pub async fn vacuum(&self) -> anyhow::Result<()> {
        if self.postgres {
            sqlx::query("VACUUM ANALYZE connections")
                .execute(&self.pool)
                .await?;
        }
        Ok(())
    }

    /// Benchmark rows whose key is not `key`.
    pub async fn count_off_key(&self, prefix: &str, key: &str) -> anyhow::Result<i64> {
        Ok(sqlx::query_scalar(
            "SELECT COUNT(*) FROM connections \
             WHERE id LIKE $1 AND (encryption_key_id IS NULL OR encryption_key_id <> $2)",
        )
        .bind(format!("{prefix}%"))
        .bind(key)
        .fetch_one(&self.pool)
        .await?)
    }

    pub async fn envelope(&self, id: &str) -> anyhow::Result<Option<Envelope>> {
        let row: Option<EnvelopeColumns> = sqlx::query_as(
            "SELECT encryption_key_id, data_key_ciphertext, data_key_iv, payload_ciphertext, \
             payload_iv FROM connections WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(envelope))
    }

    /// Up to `limit` benchmark rows after id `after`, in id order.
    pub async fn page(
        &self,
        prefix: &str,
        after: &str,
        limit: i64,
    ) -> anyhow::Result<Vec<(String, Envelope)>> {
        #[allow(clippy::type_complexity)] // the six columns, as read
        let rows: Vec<(
            String,
            Option<String>,
            Option<Vec<u8>>,
            Option<Vec<u8>>,
            Option<Vec<u8>>,
            Option<Vec<u8>>,
        )> = sqlx::query_as(
            "SELECT id, encryption_key_id, data_key_ciphertext, data_key_iv, payload_ciphertext, \
             payload_iv FROM connections WHERE id LIKE $1 AND id > $2 ORDER BY id LIMIT $3",
        )
        .bind(format!("{prefix}%"))
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(id, k, dk, dkiv, ct, iv)| (id, envelope((k, dk, dkiv, ct, iv))))
            .collect())
    }

    /// Removes what `run` created: its rows, the jobs to its keys, its
    /// keys. Called whether the run succeeded or not.
    pub async fn remove(&self, run: &Run) -> anyhow::Result<()> {
        let keys = format!("{}-%", run.label);
        let id = format!("%{}%", run.id);
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM connections WHERE id LIKE $1")
            .bind(format!("{}%", run.prefix))
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "DELETE FROM encryption_rotation_jobs WHERE target_key_id IN \
             (SELECT id FROM encryption_keys WHERE key_id LIKE $1 AND key_id LIKE $2)",
        )
        .bind(&keys)
        .bind(&id)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM encryption_keys WHERE key_id LIKE $1 AND key_id LIKE $2")
            .bind(&keys)
            .bind(&id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }
}

fn envelope((k, dk, dkiv, ct, iv): EnvelopeColumns) -> Envelope {
    Envelope {
        encryption_key_id: k.unwrap_or_default(),
        data_key_ciphertext: dk.unwrap_or_default(),
        data_key_iv: dkiv.unwrap_or_default(),
        payload_ciphertext: ct.unwrap_or_default(),
        payload_iv: iv.unwrap_or_default(),
    }
}

/// Refuses a database holding anything this run did not create: a
/// benchmark activates keys of its own (demoting the active one) and
/// its rotation walks every row, so it runs only on an empty database.
/// Says what it found; tables not there yet count as empty.
pub async fn refuse_a_live_database(database_url: &str) -> anyhow::Result<()> {
    if keyward::config::sqlite_path(database_url).is_some_and(|file| !file.exists()) {
        return Ok(());
    }
    let rows = Rows::connect(database_url).await?;
    let mut found = Vec::new();
    let keys: Vec<String> =
        sqlx::query_scalar("SELECT key_id FROM encryption_keys ORDER BY key_id LIMIT 6")
            .fetch_all(&rows.pool)
            .await
            .unwrap_or_default();
    if !keys.is_empty() {
        let more = if keys.len() > 5 { ", …" } else { "" };
        found.push(format!(
            "keys {}{more}",
            keys[..keys.len().min(5)].join(", ")
        ));
    }
    for (table, what) in [
        ("connections", "connections rows"),
        ("encryption_rotation_jobs", "rotation jobs"),
        ("keyward_rotation_targets", "listed rotation targets"),
    ] {
        let count: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table}"))
            .fetch_one(&rows.pool)
            .await
            .unwrap_or(0);
        if count > 0 {
            found.push(format!("{count} {what}"));
        }
    }
    if !found.is_empty() {
        anyhow::bail!(
            "refusing to benchmark on a database that holds {}, which this benchmark did not \
             create: it would activate its own keys and rotate every row. Use an empty database",
            found.join(", ")
        );
    }
    rows.pool.close().await;
    Ok(())
}
