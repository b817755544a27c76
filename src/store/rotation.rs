//! `encryption_rotation_claims` and the rows a rotation reads and writes
//! (the jobs themselves are `store::jobs`).
//!
//! A worker's step is: [`Store::claim_batch`] (short transaction: pick the
//! oldest live job, advance its keyset cursor by one batch, record a lease),
//! then the crypto outside any transaction, then [`Store::finish_batch`]
//! (short transaction: compare-and-swap writes, per-row failures, counters,
//! release the lease). When a pass reaches the end of the table and no live
//! lease remains, the job either starts another pass over the rows still
//! off the target key or finishes.

use chrono::{DateTime, Duration, Utc};

use super::{
    jobs::{JobRow, JOB_COLUMNS},
    on_pool, BeginWrite, Pool, Store, StoreError,
};
use crate::{
    crypto::envelope::Envelope,
    rotation::{
        pass::{pass_end, PassEnd, PassFacts},
        target::{RotationTarget, SqlType},
        JobStatus, RotationJob,
    },
};

/// A row of a rotation target, as the rotation reads it.
#[derive(Debug, Clone)]
pub struct RotationRow {
    pub id: String,
    pub encryption_key_id: Option<String>,
    pub data_key_ciphertext: Option<Vec<u8>>,
    pub data_key_iv: Option<Vec<u8>>,
    pub payload_ciphertext: Option<Vec<u8>>,
    pub payload_iv: Option<Vec<u8>>,
    pub legacy_ciphertext: Option<Vec<u8>>,
    pub legacy_iv: Option<Vec<u8>>,
    /// The values of the target's context columns, in order.
    pub context: Vec<Option<String>>,
}

impl RotationRow {
    /// The row's ciphertext as an envelope. A legacy row (no key id) is read
    /// from its legacy columns while they hold a ciphertext, else from the
    /// payload mirror: the application's old pods write the legacy columns
    /// only, so after the migration's backfill the mirror can be stale, and
    /// the legacy copy is the one they last wrote.
    pub fn envelope(&self) -> Envelope {
        let legacy_copy = match (&self.legacy_ciphertext, &self.legacy_iv) {
            (Some(ct), Some(iv)) if self.encryption_key_id.is_none() && !ct.is_empty() => {
                Some((ct.clone(), iv.clone()))
            }
            _ => None,
        };
        let (payload_ciphertext, payload_iv) = legacy_copy.unwrap_or_else(|| {
            (
                self.payload_ciphertext.clone().unwrap_or_default(),
                self.payload_iv.clone().unwrap_or_default(),
            )
        });
        Envelope {
            encryption_key_id: self.encryption_key_id.clone().unwrap_or_default(),
            data_key_ciphertext: self.data_key_ciphertext.clone().unwrap_or_default(),
            data_key_iv: self.data_key_iv.clone().unwrap_or_default(),
            payload_ciphertext,
            payload_iv,
        }
    }
}

/// Reads a row selected by `RotationTarget::select_batch_sql`.
macro_rules! rotation_row {
    ($row:expr, $contexts:expr) => {{
        use sqlx::Row as _;
        let row = $row;
        RotationRow {
            id: row.try_get("id")?,
            encryption_key_id: row.try_get("encryption_key_id")?,
            data_key_ciphertext: row.try_get("data_key_ciphertext")?,
            data_key_iv: row.try_get("data_key_iv")?,
            payload_ciphertext: row.try_get("payload_ciphertext")?,
            payload_iv: row.try_get("payload_iv")?,
            legacy_ciphertext: row.try_get("legacy_ciphertext")?,
            legacy_iv: row.try_get("legacy_iv")?,
            context: (0..$contexts)
                .map(|i| row.try_get::<Option<String>, _>(format!("ctx_{i}").as_str()))
                .collect::<Result<_, _>>()?,
        }
    }};
}

/// A batch a worker holds under lease.
#[derive(Debug, Clone)]
pub struct Claim {
    pub id: String,
    pub job: RotationJob,
    /// Position of the rows' table in the configured targets.
    pub target_index: usize,
    pub rows: Vec<RotationRow>,
}

/// What one claim attempt found.
#[derive(Debug)]
pub enum ClaimOutcome {
    /// No pending or running job.
    Idle,
    /// A batch to process.
    Batch(Claim),
    /// The job moved on without a batch (a new pass began, or it finished).
    Advanced(RotationJob),
    /// The pass is at its end but other workers still hold batches.
    Waiting,
}

/// What became of one row of a batch.
#[derive(Debug, Clone)]
pub enum RowOutcome {
    /// Rotated: write this envelope if the row is unchanged.
    Rewritten(Envelope),
    /// Dry run: decrypted and verified, nothing to write.
    Verified,
    /// Could not be rotated; the message goes to `connections.last_error`.
    Failed(String),
}

/// Counters a finished batch adds to its job.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchCounts {
    pub succeeded: i64,
    pub failed: i64,
    pub skipped: i64,
}

impl Store {
    /// Gives each target the type of its id column on PostgreSQL (see
    /// [`RotationTarget::id_type`]); ids of a type keyward does not page
    /// natively (or a table not there yet) stay compared as text.
    pub async fn resolve_id_types(
        &self,
        targets: Vec<RotationTarget>,
    ) -> Result<Vec<RotationTarget>, StoreError> {
        let Pool::Postgres(pool) = &self.pool else {
            return Ok(targets);
        };
        let mut resolved = Vec::with_capacity(targets.len());
        for mut target in targets {
            let found =
                super::adopt::column_type(pool, target.table.as_str(), target.id.as_str()).await?;
            target.id_type = found
                .filter(|t| super::adopt::is_id_type(t))
                .and_then(|t| SqlType::parse(&t));
            resolved.push(target);
        }
        Ok(resolved)
    }

    /// Claims the next batch of the oldest live job for `worker_id`,
    /// walking `targets` in order within each pass.
    pub async fn claim_batch(
        &self,
        worker_id: &str,
        lease: Duration,
        targets: &[RotationTarget],
    ) -> Result<ClaimOutcome, StoreError> {
        let count_all = RotationTarget::count_all_sql(targets);
        macro_rules! claim {
            ($tx:ident, $pick_job:expr) => {{
                let now = Utc::now();
                let row: Option<JobRow> = sqlx::query_as(&$pick_job).fetch_optional(&mut *$tx).await?;
                let Some(row) = row else {
                    $tx.commit().await?;
                    return Ok(ClaimOutcome::Idle);
                };
                let mut cursor = row.cursor.clone().unwrap_or_default();
                let mut index = usize::try_from(row.target_index).unwrap_or(0);
                let waited_since = row.replicas_waited_since;
                let mut job = RotationJob::try_from(row)?;
                let live: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM encryption_rotation_claims WHERE job_id = $1 AND lease_expires_at > $2",
                )
                .bind(&job.id)
                .bind(now)
                .fetch_one(&mut *$tx)
                .await?;

                if job.cancel_requested {
                    if live > 0 {
                        $tx.commit().await?;
                        return Ok(ClaimOutcome::Waiting);
                    }
                    sqlx::query(
                        "UPDATE encryption_rotation_jobs SET status = 'cancelled', completed_at = $2, \
                         updated_at = $2, lease_owner = NULL, lease_expires_at = NULL WHERE id = $1",
                    )
                    .bind(&job.id)
                    .bind(now)
                    .execute(&mut *$tx)
                    .await?;
                    sqlx::query("DELETE FROM encryption_rotation_claims WHERE job_id = $1")
                        .bind(&job.id)
                        .execute(&mut *$tx)
                        .await?;
                    $tx.commit().await?;
                    job.status = JobStatus::Cancelled;
                    return Ok(ClaimOutcome::Advanced(job));
                }

                if job.status == JobStatus::Pending {
                    let total: i64 = sqlx::query_scalar(&count_all)
                        .bind(&job.target_key_id)
                        .bind(&job.id)
                        .fetch_one(&mut *$tx)
                        .await?;
                    sqlx::query(
                        "UPDATE encryption_rotation_jobs SET status = 'running', started_at = $2, pass = 1, \
                         total_rows = $3, updated_at = $2 WHERE id = $1",
                    )
                    .bind(&job.id)
                    .bind(now)
                    .bind(total)
                    .execute(&mut *$tx)
                    .await?;
                    job.status = JobStatus::Running;
                    job.pass = 1;
                    job.counts.total = total;
                    job.started_at = Some(now);
                }

                // The next batch: after the cursor in the current target,
                // else from the start of the following targets.
                while let Some(target) = targets.get(index) {
                    let rows: Vec<RotationRow> = sqlx::query(&target.select_batch_sql(cursor.is_empty()))
                        .bind(&job.target_key_id)
                        .bind(&job.id)
                        .bind(&cursor)
                        .bind(job.batch_size)
                        .fetch_all(&mut *$tx)
                        .await?
                        .into_iter()
                        .map(|row| Ok::<_, sqlx::Error>(rotation_row!(row, target.context.len())))
                        .collect::<Result<_, _>>()?;
                    let Some(last) = rows.last() else {
                        index += 1;
                        cursor.clear();
                        continue;
                    };
                    let claim_id = uuid::Uuid::new_v4().to_string();
                    let expires = now + lease;
                    sqlx::query(
                        "UPDATE encryption_rotation_jobs SET cursor = $2, target_index = $3, lease_owner = $4, \
                         lease_expires_at = $5, updated_at = $6 WHERE id = $1",
                    )
                    .bind(&job.id)
                    .bind(&last.id)
                    .bind(i64::try_from(index).unwrap_or(i64::MAX))
                    .bind(worker_id)
                    .bind(expires)
                    .bind(now)
                    .execute(&mut *$tx)
                    .await?;
                    sqlx::query(
                        "INSERT INTO encryption_rotation_claims (id, job_id, worker_id, first_row_id, \
                         last_row_id, lease_expires_at) VALUES ($1, $2, $3, $4, $5, $6)",
                    )
                    .bind(&claim_id)
                    .bind(&job.id)
                    .bind(worker_id)
                    .bind(rows.first().map(|r| r.id.as_str()).unwrap_or_default())
                    .bind(&last.id)
                    .bind(expires)
                    .execute(&mut *$tx)
                    .await?;
                    $tx.commit().await?;
                    return Ok(ClaimOutcome::Batch(Claim {
                        id: claim_id,
                        job,
                        target_index: index,
                        rows,
                    }));
                }

                // End of a pass. Wait for batches other workers still hold;
                // batches of workers whose lease expired are dropped and
                // their rows are picked up by the next pass.
                // Parks the job at the end of its pass: keeps the cursor,
                // and with `since`, when it began waiting for replicas.
                macro_rules! wait_at_pass_end {
                    ($since:expr) => {{
                        let since: Option<DateTime<Utc>> = $since;
                        sqlx::query(
                            "UPDATE encryption_rotation_jobs SET cursor = $2, target_index = $3, \
                             replicas_waited_since = COALESCE(replicas_waited_since, $4) WHERE id = $1",
                        )
                        .bind(&job.id)
                        .bind(&cursor)
                        .bind(i64::try_from(index).unwrap_or(i64::MAX))
                        .bind(since)
                        .execute(&mut *$tx)
                        .await?;
                        $tx.commit().await?;
                        return Ok(ClaimOutcome::Waiting);
                    }};
                }
                if live > 0 {
                    wait_at_pass_end!(None);
                }
                sqlx::query("DELETE FROM encryption_rotation_claims WHERE job_id = $1")
                    .bind(&job.id)
                    .execute(&mut *$tx)
                    .await?;
                let remaining: i64 = sqlx::query_scalar(&count_all)
                    .bind(&job.target_key_id)
                    .bind(&job.id)
                    .fetch_one(&mut *$tx)
                    .await?;
                // `serve` replicas still encrypting with another key than
                // the (active) target: each row they write is a late row,
                // so the job waits for them (bounded) rather than end.
                let behind: Vec<(String, String)> = if job.dry_run {
                    Vec::new()
                } else {
                    sqlx::query_as(
                        "SELECT r.id, r.host FROM keyward_replicas r \
                         JOIN encryption_keys k ON k.id = $1 AND k.status = 'active' \
                         WHERE r.kind = 'serve' AND r.expires_at > $2 \
                         AND (r.active_key_id IS NULL OR r.active_key_id <> $1) ORDER BY r.id",
                    )
                    .bind(&job.target_key_id)
                    .bind(now)
                    .fetch_all(&mut *$tx)
                    .await?
                };
                // What happens now is decided from these facts alone.
                let facts = PassFacts {
                    now,
                    remaining,
                    behind: &behind,
                    waited_since,
                    dry_run: job.dry_run,
                    total: job.counts.total,
                    processed: job.counts.processed,
                    failed: job.counts.failed,
                };
                match pass_end(&facts) {
                    PassEnd::WaitForReplicas => wait_at_pass_end!(Some(now)),
                    PassEnd::Complete { status, last_error } => {
                        sqlx::query(
                            "UPDATE encryption_rotation_jobs SET status = $2, completed_at = $3, updated_at = $3, \
                             lease_owner = NULL, lease_expires_at = NULL, replicas_waited_since = NULL, \
                             last_error = COALESCE($4, last_error) WHERE id = $1",
                        )
                        .bind(&job.id)
                        .bind(status.as_str())
                        .bind(now)
                        .bind(&last_error)
                        .execute(&mut *$tx)
                        .await?;
                        if let Some(last_error) = last_error {
                            job.last_error = Some(last_error);
                        }
                        job.status = status;
                        job.completed_at = Some(now);
                    }
                    PassEnd::NextPass { late, waited_since, .. } => {
                        sqlx::query(
                            "UPDATE encryption_rotation_jobs SET pass = pass + 1, cursor = NULL, target_index = 0, \
                             total_rows = processed_rows + $2, late_rows = late_rows + $4, \
                             replicas_waited_since = $5, updated_at = $3 WHERE id = $1",
                        )
                        .bind(&job.id)
                        .bind(remaining)
                        .bind(now)
                        .bind(late)
                        .bind(waited_since)
                        .execute(&mut *$tx)
                        .await?;
                        job.pass += 1;
                        job.counts.total = job.counts.processed + remaining;
                        job.counts.late += late;
                    }
                }
                $tx.commit().await?;
                Ok(ClaimOutcome::Advanced(job))
            }};
        }
        let pick = format!(
            "SELECT {JOB_COLUMNS} FROM encryption_rotation_jobs WHERE status IN ('pending', 'running') \
             ORDER BY created_at, id LIMIT 1"
        );
        match &self.pool {
            Pool::Sqlite(pool) => {
                // The write lock is taken up front (`BEGIN IMMEDIATE`), so
                // two claimers never read the same cursor.
                let mut tx = pool.begin_write().await?;
                claim!(tx, pick)
            }
            Pool::Postgres(pool) => {
                let mut tx = pool.begin_write().await?;
                // The job row is locked only for this short transaction:
                // workers sharing a job take turns at its cursor, each
                // then processing its own batch in parallel.
                claim!(tx, format!("{pick} FOR UPDATE"))
            }
        }
    }

    /// Writes a processed batch: compare-and-swap updates for rotated rows
    /// (a row the application rewrote meanwhile is skipped, never
    /// overwritten), `last_error` for failed rows, the job's counters, and
    /// the release of the lease. One transaction.
    pub async fn finish_batch(
        &self,
        claim: &Claim,
        target: &RotationTarget,
        target_key_id: &str,
        outcomes: &[RowOutcome],
    ) -> Result<BatchCounts, StoreError> {
        let now = Utc::now();
        let mut counts = BatchCounts::default();
        let mut last_error: Option<String> = None;
        let mut rewritten: Vec<(&RotationRow, &Envelope)> = Vec::new();
        let mut failures: Vec<(&RotationRow, &String)> = Vec::new();
        for (row, outcome) in claim.rows.iter().zip(outcomes) {
            match outcome {
                RowOutcome::Rewritten(env) => rewritten.push((row, env)),
                RowOutcome::Failed(msg) => failures.push((row, msg)),
                RowOutcome::Verified => {}
            }
        }
        counts.succeeded = outcomes
            .iter()
            .filter(|o| matches!(o, RowOutcome::Verified))
            .count() as i64;
        counts.failed = failures.len() as i64;
        if let Some((row, msg)) = failures.last() {
            last_error = Some(format!("{} {}: {msg}", target.table.as_str(), row.id));
        }
        let fail_sql = target.fail_row_sql();

        macro_rules! finish {
            ($tx:ident, $written:expr) => {{
                let written: i64 = $written;
                counts.succeeded += written;
                counts.skipped = rewritten.len() as i64 - written;
                for (row, msg) in &failures {
                    sqlx::query(&fail_sql)
                        .bind(&row.id)
                        .bind(format!("rotation job {}: {msg}", claim.job.id))
                        .bind(&claim.job.id)
                        .execute(&mut *$tx)
                        .await?;
                }
                sqlx::query(
                    "UPDATE encryption_rotation_jobs SET processed_rows = processed_rows + $2, \
                     succeeded_rows = succeeded_rows + $3, failed_rows = failed_rows + $4, \
                     skipped_rows = skipped_rows + $5, last_error = COALESCE($6, last_error), \
                     updated_at = $7 WHERE id = $1",
                )
                .bind(&claim.job.id)
                .bind(outcomes.len() as i64)
                .bind(counts.succeeded)
                .bind(counts.failed)
                .bind(counts.skipped)
                .bind(&last_error)
                .bind(now)
                .execute(&mut *$tx)
                .await?;
                sqlx::query("DELETE FROM encryption_rotation_claims WHERE id = $1")
                    .bind(&claim.id)
                    .execute(&mut *$tx)
                    .await?;
                $tx.commit().await?;
            }};
        }

        match &self.pool {
            Pool::Postgres(pool) => {
                let mut tx = pool.begin_write().await?;
                // One statement for the whole batch.
                let written = if rewritten.is_empty() {
                    0
                } else {
                    let col = |f: fn(&Envelope) -> Vec<u8>| {
                        rewritten.iter().map(|(_, e)| f(e)).collect::<Vec<_>>()
                    };
                    let old = |f: fn(&RotationRow) -> Option<Vec<u8>>| {
                        rewritten.iter().map(|(r, _)| f(r)).collect::<Vec<_>>()
                    };
                    sqlx::query(&target.write_batch_sql_postgres())
                        .bind(target_key_id)
                        .bind(
                            rewritten
                                .iter()
                                .map(|(r, _)| r.id.clone())
                                .collect::<Vec<_>>(),
                        )
                        .bind(col(|e| e.data_key_ciphertext.clone()))
                        .bind(col(|e| e.data_key_iv.clone()))
                        .bind(col(|e| e.payload_ciphertext.clone()))
                        .bind(col(|e| e.payload_iv.clone()))
                        .bind(
                            rewritten
                                .iter()
                                .map(|(r, _)| r.encryption_key_id.clone())
                                .collect::<Vec<_>>(),
                        )
                        .bind(old(|r| r.payload_ciphertext.clone()))
                        .bind(old(|r| r.legacy_ciphertext.clone()))
                        .execute(&mut *tx)
                        .await?
                        .rows_affected() as i64
                };
                finish!(tx, written);
            }
            Pool::Sqlite(pool) => {
                // SQLite has no arrays; an embedded database pays no round
                // trip per statement, so one statement per row is cheap.
                let mut tx = pool.begin_write().await?;
                let sql = target.write_row_sql_sqlite();
                let mut written = 0i64;
                for (row, env) in &rewritten {
                    written += sqlx::query(&sql)
                        .bind(target_key_id)
                        .bind(&env.data_key_ciphertext)
                        .bind(&env.data_key_iv)
                        .bind(&env.payload_ciphertext)
                        .bind(&env.payload_iv)
                        .bind(&row.id)
                        .bind(&row.encryption_key_id)
                        .bind(&row.payload_ciphertext)
                        .bind(&row.legacy_ciphertext)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected() as i64;
                }
                finish!(tx, written);
            }
        }
        Ok(counts)
    }

    /// Gives up a claimed batch without writing anything: its lease is
    /// deleted at once, so the job's pass can end without waiting for it to
    /// expire, and the next pass picks its rows up (they are still off the
    /// target key).
    pub async fn release_claim(&self, claim: &Claim, worker_id: &str) -> Result<(), StoreError> {
        let now = Utc::now();
        super::on_pool!(self, |pool| {
            let mut tx = pool.begin_write().await?;
            sqlx::query("DELETE FROM encryption_rotation_claims WHERE id = $1")
                .bind(&claim.id)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "UPDATE encryption_rotation_jobs SET lease_owner = NULL, lease_expires_at = NULL, \
                 updated_at = $3 WHERE id = $1 AND lease_owner = $2",
            )
            .bind(&claim.job.id)
            .bind(worker_id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            tx.commit().await
        })?;
        Ok(())
    }

    /// Up to `limit` rows of each target that are on key record `key_id`,
    /// with the index of their target (to derive each row's context).
    pub async fn sample_rows_on_key(
        &self,
        targets: &[RotationTarget],
        key_id: &str,
        limit: i64,
    ) -> Result<Vec<(usize, RotationRow)>, StoreError> {
        let mut sample = Vec::new();
        for (index, target) in targets.iter().enumerate() {
            let sql = target.sample_on_key_sql();
            let rows: Vec<RotationRow> = on_pool!(self, |pool| {
                sqlx::query(&sql)
                    .bind(key_id)
                    .bind(limit)
                    .fetch_all(pool)
                    .await?
                    .into_iter()
                    .map(|row| Ok::<_, sqlx::Error>(rotation_row!(row, target.context.len())))
                    .collect::<Result<Vec<_>, _>>()
            })?;
            sample.extend(rows.into_iter().map(|row| (index, row)));
        }
        Ok(sample)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(key: Option<&str>, mirror: Option<&[u8]>, legacy: Option<&[u8]>) -> RotationRow {
        RotationRow {
            id: "r".into(),
            encryption_key_id: key.map(Into::into),
            data_key_ciphertext: key.map(|_| b"dk".to_vec()),
            data_key_iv: None,
            payload_ciphertext: mirror.map(<[u8]>::to_vec),
            payload_iv: mirror.map(|_| b"mirror-iv".to_vec()),
            legacy_ciphertext: legacy.map(<[u8]>::to_vec),
            legacy_iv: legacy.map(|_| b"legacy-iv".to_vec()),
            context: Vec::new(),
        }
    }

    #[test]
    fn a_legacy_row_is_read_from_what_the_old_pods_last_wrote() {
        // An old pod rewrote the legacy copy after the backfill: the mirror
        // is stale, the legacy copy wins.
        let e = row(None, Some(b"stale"), Some(b"fresh")).envelope();
        assert_eq!(
            (e.payload_ciphertext, e.payload_iv),
            (b"fresh".to_vec(), b"legacy-iv".to_vec())
        );
        // No legacy copy (cut over, or a mirror only): the mirror.
        let e = row(None, Some(b"mirror"), None).envelope();
        assert_eq!(e.payload_ciphertext, b"mirror".to_vec());
        // An envelope row is read from its envelope whatever its legacy copy.
        let e = row(Some("k"), Some(b"sealed"), Some(b"old")).envelope();
        assert_eq!(
            (e.payload_ciphertext, e.encryption_key_id),
            (b"sealed".to_vec(), "k".to_owned())
        );
    }
}
