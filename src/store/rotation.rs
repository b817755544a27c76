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
    on_pool,
    tx::WriteTx,
    Pool, Store, StoreError,
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
        let legacy_copy = self
            .legacy_copy()
            .filter(|copy| self.encryption_key_id.is_none() && !copy.payload_ciphertext.is_empty());
        legacy_copy.unwrap_or_else(|| Envelope {
            encryption_key_id: self.encryption_key_id.clone().unwrap_or_default(),
            data_key_ciphertext: self.data_key_ciphertext.clone().unwrap_or_default(),
            data_key_iv: self.data_key_iv.clone().unwrap_or_default(),
            payload_ciphertext: self.payload_ciphertext.clone().unwrap_or_default(),
            payload_iv: self.payload_iv.clone().unwrap_or_default(),
        })
    }

    /// The row's legacy copy as a legacy envelope (no key id), if it holds
    /// one (its IV column may be empty: the legacy layout may keep the IV
    /// in the ciphertext).
    pub fn legacy_copy(&self) -> Option<Envelope> {
        Some(Envelope {
            payload_ciphertext: self.legacy_ciphertext.clone()?,
            payload_iv: self.legacy_iv.clone().unwrap_or_default(),
            ..Envelope::default()
        })
    }
}

/// Reads a row selected by `RotationTarget::select_batch_sql` (or
/// `sample_on_key_sql`): the envelope and legacy columns by name, then the
/// context columns `ctx_0`, `ctx_1`, … in the order they were selected.
impl<'r, R: sqlx::Row> sqlx::FromRow<'r, R> for RotationRow
where
    &'static str: sqlx::ColumnIndex<R>,
    usize: sqlx::ColumnIndex<R>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Vec<u8>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    fn from_row(row: &'r R) -> Result<Self, sqlx::Error> {
        use sqlx::Column as _;
        Ok(RotationRow {
            id: row.try_get("id")?,
            encryption_key_id: row.try_get("encryption_key_id")?,
            data_key_ciphertext: row.try_get("data_key_ciphertext")?,
            data_key_iv: row.try_get("data_key_iv")?,
            payload_ciphertext: row.try_get("payload_ciphertext")?,
            payload_iv: row.try_get("payload_iv")?,
            legacy_ciphertext: row.try_get("legacy_ciphertext")?,
            legacy_iv: row.try_get("legacy_iv")?,
            context: row
                .columns()
                .iter()
                .enumerate()
                .filter(|(_, column)| column.name().starts_with("ctx_"))
                .map(|(i, _)| row.try_get::<Option<String>, _>(i))
                .collect::<Result<_, _>>()?,
        })
    }
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
    /// walking `targets` in order within each pass. One short transaction:
    /// on SQLite it holds the write lock from the start (`BEGIN
    /// IMMEDIATE`), on PostgreSQL the job row (`FOR UPDATE`), so workers
    /// sharing a job take turns at its cursor, each then processing its
    /// own batch in parallel.
    pub async fn claim_batch(
        &self,
        worker_id: &str,
        lease: Duration,
        targets: &[RotationTarget],
    ) -> Result<ClaimOutcome, StoreError> {
        let mut tx = WriteTx::begin(&self.pool).await?;
        let outcome = claim(&mut tx, worker_id, lease, targets).await?;
        tx.commit().await?;
        Ok(outcome)
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
        let mut rewritten: Vec<(&RotationRow, &Envelope)> = Vec::new();
        let mut failures: Vec<(&RotationRow, &str)> = Vec::new();
        let mut verified = 0i64;
        for (row, outcome) in claim.rows.iter().zip(outcomes) {
            match outcome {
                RowOutcome::Rewritten(env) => rewritten.push((row, env)),
                RowOutcome::Failed(msg) => failures.push((row, msg)),
                RowOutcome::Verified => verified += 1,
            }
        }
        let mut tx = WriteTx::begin(&self.pool).await?;
        let written = write_rotated(&mut tx, target, target_key_id, &rewritten).await?;
        let counts = BatchCounts {
            succeeded: verified + written,
            failed: failures.len() as i64,
            skipped: rewritten.len() as i64 - written,
        };
        let fail_sql = target.fail_row_sql();
        for (row, msg) in &failures {
            let message = format!("rotation job {}: {msg}", claim.job.id);
            tx.execute(
                &fail_sql,
                &[(&row.id).into(), (&message).into(), (&claim.job.id).into()],
            )
            .await?;
        }
        let last_error = failures
            .last()
            .map(|(row, msg)| format!("{} {}: {msg}", target.table.as_str(), row.id));
        tx.execute(
            "UPDATE encryption_rotation_jobs SET processed_rows = processed_rows + $2, \
             succeeded_rows = succeeded_rows + $3, failed_rows = failed_rows + $4, \
             skipped_rows = skipped_rows + $5, last_error = COALESCE($6, last_error), \
             updated_at = $7 WHERE id = $1",
            &[
                (&claim.job.id).into(),
                (outcomes.len() as i64).into(),
                counts.succeeded.into(),
                counts.failed.into(),
                counts.skipped.into(),
                last_error.as_deref().into(),
                Utc::now().into(),
            ],
        )
        .await?;
        tx.execute(
            "DELETE FROM encryption_rotation_claims WHERE id = $1",
            &[(&claim.id).into()],
        )
        .await?;
        tx.commit().await?;
        Ok(counts)
    }

    /// Gives up a claimed batch without writing anything: its lease is
    /// deleted at once, so the job's pass can end without waiting for it to
    /// expire, and the next pass picks its rows up (they are still off the
    /// target key).
    pub async fn release_claim(&self, claim: &Claim, worker_id: &str) -> Result<(), StoreError> {
        let mut tx = WriteTx::begin(&self.pool).await?;
        tx.execute(
            "DELETE FROM encryption_rotation_claims WHERE id = $1",
            &[(&claim.id).into()],
        )
        .await?;
        tx.execute(
            "UPDATE encryption_rotation_jobs SET lease_owner = NULL, lease_expires_at = NULL, \
             updated_at = $3 WHERE id = $1 AND lease_owner = $2",
            &[(&claim.job.id).into(), worker_id.into(), Utc::now().into()],
        )
        .await?;
        tx.commit().await?;
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
                sqlx::query_as(&sql)
                    .bind(key_id)
                    .bind(limit)
                    .fetch_all(pool)
                    .await
            })?;
            sample.extend(rows.into_iter().map(|row| (index, row)));
        }
        Ok(sample)
    }
}

/// Where a job's pass stands: the target it is in and the id of the last
/// row claimed there (empty at the start of a target).
struct Place {
    index: usize,
    cursor: String,
}

impl Place {
    fn index_arg(&self) -> i64 {
        i64::try_from(self.index).unwrap_or(i64::MAX)
    }
}

/// The claim step of [`Store::claim_batch`], inside its transaction.
async fn claim(
    tx: &mut WriteTx,
    worker_id: &str,
    lease: Duration,
    targets: &[RotationTarget],
) -> Result<ClaimOutcome, StoreError> {
    let now = Utc::now();
    let pick = format!(
        "SELECT {JOB_COLUMNS} FROM encryption_rotation_jobs WHERE status IN ('pending', 'running') \
         ORDER BY created_at, id LIMIT 1{}",
        tx.lock_clause()
    );
    let Some(row) = tx.fetch_all::<JobRow>(&pick, &[]).await?.into_iter().next() else {
        return Ok(ClaimOutcome::Idle);
    };
    let mut place = Place {
        index: usize::try_from(row.target_index).unwrap_or(0),
        cursor: row.cursor.clone().unwrap_or_default(),
    };
    let waited_since = row.replicas_waited_since;
    let mut job = RotationJob::try_from(row)?;
    let live = tx
        .fetch_i64(
            "SELECT COUNT(*) FROM encryption_rotation_claims WHERE job_id = $1 AND lease_expires_at > $2",
            &[(&job.id).into(), now.into()],
        )
        .await?;
    if job.cancel_requested {
        if live > 0 {
            return Ok(ClaimOutcome::Waiting);
        }
        return cancel(tx, job, now).await;
    }
    if job.status == JobStatus::Pending {
        start(tx, &mut job, targets, now).await?;
    }
    if let Some(rows) = next_rows(tx, &job, targets, &mut place).await? {
        let id = record_lease(tx, &job, &place, &rows, worker_id, now + lease, now).await?;
        return Ok(ClaimOutcome::Batch(Claim {
            id,
            job,
            target_index: place.index,
            rows,
        }));
    }
    // End of a pass. Wait for batches other workers still hold; batches of
    // workers whose lease expired are dropped and their rows are picked up
    // by the next pass.
    if live > 0 {
        return park(tx, &job, &place, None).await;
    }
    end_pass(tx, job, &place, waited_since, targets, now).await
}

/// Cancels a job no worker holds a batch of.
async fn cancel(
    tx: &mut WriteTx,
    mut job: RotationJob,
    now: DateTime<Utc>,
) -> Result<ClaimOutcome, StoreError> {
    tx.execute(
        "UPDATE encryption_rotation_jobs SET status = 'cancelled', completed_at = $2, \
         updated_at = $2, lease_owner = NULL, lease_expires_at = NULL WHERE id = $1",
        &[(&job.id).into(), now.into()],
    )
    .await?;
    tx.execute(
        "DELETE FROM encryption_rotation_claims WHERE job_id = $1",
        &[(&job.id).into()],
    )
    .await?;
    job.status = JobStatus::Cancelled;
    Ok(ClaimOutcome::Advanced(job))
}

/// Starts a pending job: its first pass, over every row off its target.
async fn start(
    tx: &mut WriteTx,
    job: &mut RotationJob,
    targets: &[RotationTarget],
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let total = count_remaining(tx, job, targets).await?;
    tx.execute(
        "UPDATE encryption_rotation_jobs SET status = 'running', started_at = $2, pass = 1, \
         total_rows = $3, updated_at = $2 WHERE id = $1",
        &[(&job.id).into(), now.into(), total.into()],
    )
    .await?;
    job.status = JobStatus::Running;
    job.pass = 1;
    job.counts.total = total;
    job.started_at = Some(now);
    Ok(())
}

/// The rows of every target still off the job's key.
async fn count_remaining(
    tx: &mut WriteTx,
    job: &RotationJob,
    targets: &[RotationTarget],
) -> Result<i64, StoreError> {
    Ok(tx
        .fetch_i64(
            &RotationTarget::count_all_sql(targets),
            &[
                (&job.target_key_id).into(),
                (&job.id).into(),
                job.wrap_tag.as_deref().into(),
            ],
        )
        .await?)
}

/// The next batch: after the cursor in the current target, else from the
/// start of the following targets (`place` moves with it). None at the end
/// of the pass.
async fn next_rows(
    tx: &mut WriteTx,
    job: &RotationJob,
    targets: &[RotationTarget],
    place: &mut Place,
) -> Result<Option<Vec<RotationRow>>, StoreError> {
    while let Some(target) = targets.get(place.index) {
        let rows: Vec<RotationRow> = tx
            .fetch_all(
                &target.select_batch_sql(place.cursor.is_empty()),
                &[
                    (&job.target_key_id).into(),
                    (&job.id).into(),
                    (&place.cursor).into(),
                    job.batch_size.into(),
                    job.wrap_tag.as_deref().into(),
                ],
            )
            .await?;
        if rows.is_empty() {
            place.index += 1;
            place.cursor.clear();
            continue;
        }
        return Ok(Some(rows));
    }
    Ok(None)
}

/// Moves the job's cursor past `rows` and leases them to `worker_id`; the
/// claim's id.
async fn record_lease(
    tx: &mut WriteTx,
    job: &RotationJob,
    place: &Place,
    rows: &[RotationRow],
    worker_id: &str,
    expires: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<String, StoreError> {
    let first = rows.first().map(|r| r.id.as_str()).unwrap_or_default();
    let last = rows.last().map(|r| r.id.as_str()).unwrap_or_default();
    let claim_id = uuid::Uuid::new_v4().to_string();
    tx.execute(
        "UPDATE encryption_rotation_jobs SET cursor = $2, target_index = $3, lease_owner = $4, \
         lease_expires_at = $5, updated_at = $6 WHERE id = $1",
        &[
            (&job.id).into(),
            last.into(),
            place.index_arg().into(),
            worker_id.into(),
            expires.into(),
            now.into(),
        ],
    )
    .await?;
    tx.execute(
        "INSERT INTO encryption_rotation_claims (id, job_id, worker_id, first_row_id, \
         last_row_id, lease_expires_at) VALUES ($1, $2, $3, $4, $5, $6)",
        &[
            (&claim_id).into(),
            (&job.id).into(),
            worker_id.into(),
            first.into(),
            last.into(),
            expires.into(),
        ],
    )
    .await?;
    Ok(claim_id)
}

/// Parks the job at the end of its pass: keeps its place, and with
/// `since`, when it began waiting for replicas.
async fn park(
    tx: &mut WriteTx,
    job: &RotationJob,
    place: &Place,
    since: Option<DateTime<Utc>>,
) -> Result<ClaimOutcome, StoreError> {
    tx.execute(
        "UPDATE encryption_rotation_jobs SET cursor = $2, target_index = $3, \
         replicas_waited_since = COALESCE(replicas_waited_since, $4) WHERE id = $1",
        &[
            (&job.id).into(),
            (&place.cursor).into(),
            place.index_arg().into(),
            since.into(),
        ],
    )
    .await?;
    Ok(ClaimOutcome::Waiting)
}

/// A pass ended with no batch held: gathers the facts and does what
/// [`pass_end`] decides (wait for replicas, complete, or another pass).
async fn end_pass(
    tx: &mut WriteTx,
    mut job: RotationJob,
    place: &Place,
    waited_since: Option<DateTime<Utc>>,
    targets: &[RotationTarget],
    now: DateTime<Utc>,
) -> Result<ClaimOutcome, StoreError> {
    tx.execute(
        "DELETE FROM encryption_rotation_claims WHERE job_id = $1",
        &[(&job.id).into()],
    )
    .await?;
    let remaining = count_remaining(tx, &job, targets).await?;
    // `serve` replicas still encrypting with another key than the (active)
    // target: each row they write is a late row, so the job waits for them
    // (bounded) rather than end.
    let behind: Vec<(String, String)> = if job.dry_run {
        Vec::new()
    } else {
        tx.fetch_all(
            "SELECT r.id, r.host FROM keyward_replicas r \
             JOIN encryption_keys k ON k.id = $1 AND k.status = 'active' \
             WHERE r.kind = 'serve' AND r.expires_at > $2 \
             AND (r.active_key_id IS NULL OR r.active_key_id <> $1) ORDER BY r.id",
            &[(&job.target_key_id).into(), now.into()],
        )
        .await?
    };
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
        PassEnd::WaitForReplicas => return park(tx, &job, place, Some(now)).await,
        PassEnd::Complete { status, last_error } => {
            // The status as a literal (the column may be an enum).
            let complete = format!(
                "UPDATE encryption_rotation_jobs SET status = '{}', completed_at = $2, updated_at = $2, \
                 lease_owner = NULL, lease_expires_at = NULL, replicas_waited_since = NULL, \
                 last_error = COALESCE($3, last_error) WHERE id = $1",
                status.as_str()
            );
            tx.execute(
                &complete,
                &[(&job.id).into(), now.into(), last_error.as_deref().into()],
            )
            .await?;
            if last_error.is_some() {
                job.last_error = last_error;
            }
            job.status = status;
            job.completed_at = Some(now);
        }
        PassEnd::NextPass {
            late, waited_since, ..
        } => {
            tx.execute(
                "UPDATE encryption_rotation_jobs SET pass = pass + 1, cursor = NULL, target_index = 0, \
                 total_rows = processed_rows + $2, late_rows = late_rows + $4, \
                 replicas_waited_since = $5, updated_at = $3 WHERE id = $1",
                &[
                    (&job.id).into(),
                    remaining.into(),
                    now.into(),
                    late.into(),
                    waited_since.into(),
                ],
            )
            .await?;
            job.pass += 1;
            job.counts.total = job.counts.processed + remaining;
            job.counts.late += late;
        }
    }
    Ok(ClaimOutcome::Advanced(job))
}

/// Writes the rotated rows of a batch, each only if it is unchanged since
/// it was claimed (compare-and-swap); how many were written.
async fn write_rotated(
    tx: &mut WriteTx,
    target: &RotationTarget,
    target_key_id: &str,
    rewritten: &[(&RotationRow, &Envelope)],
) -> Result<i64, StoreError> {
    if rewritten.is_empty() {
        return Ok(0);
    }
    let written = match tx {
        // One statement for the whole batch.
        WriteTx::Postgres(tx) => {
            let new = |f: fn(&Envelope) -> &Vec<u8>| -> Vec<&[u8]> {
                rewritten.iter().map(|(_, e)| f(e).as_slice()).collect()
            };
            let old = |f: fn(&RotationRow) -> &Option<Vec<u8>>| -> Vec<Option<&[u8]>> {
                rewritten.iter().map(|(r, _)| f(r).as_deref()).collect()
            };
            sqlx::query(&target.write_batch_sql_postgres())
                .bind(target_key_id)
                .bind(
                    rewritten
                        .iter()
                        .map(|(r, _)| r.id.as_str())
                        .collect::<Vec<_>>(),
                )
                .bind(new(|e| &e.data_key_ciphertext))
                .bind(new(|e| &e.data_key_iv))
                .bind(new(|e| &e.payload_ciphertext))
                .bind(new(|e| &e.payload_iv))
                .bind(
                    rewritten
                        .iter()
                        .map(|(r, _)| r.encryption_key_id.as_deref())
                        .collect::<Vec<_>>(),
                )
                .bind(old(|r| &r.payload_ciphertext))
                .bind(old(|r| &r.legacy_ciphertext))
                .execute(&mut **tx)
                .await?
                .rows_affected()
        }
        // SQLite has no arrays; an embedded database pays no round trip per
        // statement, so one statement per row is cheap.
        WriteTx::Sqlite(tx) => {
            let sql = target.write_row_sql_sqlite();
            let mut written = 0;
            for (row, env) in rewritten {
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
                    .execute(&mut **tx)
                    .await?
                    .rows_affected();
            }
            written
        }
    };
    Ok(i64::try_from(written).unwrap_or(i64::MAX))
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
