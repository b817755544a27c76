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

pub use super::row::{RotationRow, StoredCopies};
use super::{
    jobs::{JobRow, JOB_COLUMNS},
    on_pool,
    tx::{Arg, WriteTx},
    Pool, Store, StoreError,
};
use crate::{
    crypto::envelope::Envelope,
    rotation::{
        pass::{pass_end, PassEnd, PassFacts},
        target::{Encoding, RotationTarget, SqlType, Stored},
        JobStatus, RotationJob,
    },
};

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
    /// Checks each target's ciphertext columns against its encoding, and
    /// gives it the type of its id column on PostgreSQL (see
    /// [`RotationTarget::id_type`]; ids of a type keyward does not page
    /// natively, or a table not there yet, stay compared as text).
    pub async fn resolve_targets(
        &self,
        targets: Vec<RotationTarget>,
    ) -> Result<Vec<RotationTarget>, StoreError> {
        let mut resolved = Vec::with_capacity(targets.len());
        for mut target in targets {
            self.check_encoding(&target).await?;
            if let Pool::Postgres(pool) = &self.pool {
                let found =
                    super::adopt::column_type(pool, target.table.as_str(), target.id.as_str())
                        .await?;
                target.id_type = found
                    .filter(|t| super::adopt::is_id_type(t))
                    .and_then(|t| SqlType::parse(&t));
            }
            resolved.push(target);
        }
        Ok(resolved)
    }

    /// Refuses a target whose ciphertext columns hold text while its
    /// encoding says bytes, or the other way round: rotation would misread
    /// every row (or fail to write one).
    async fn check_encoding(&self, target: &RotationTarget) -> Result<(), StoreError> {
        let mut columns = vec![
            &target.columns.data_key_ciphertext,
            &target.columns.payload_ciphertext,
        ];
        columns.extend(target.legacy.as_ref().map(|(ct, _)| ct));
        for column in columns {
            let table = target.table.as_str();
            let Some(sql_type) = self.declared_type(table, column.as_str()).await? else {
                continue;
            };
            let Some(text) = super::adopt::holds_text(self.backend(), &sql_type) else {
                continue;
            };
            if text != target.encoding.is_text() {
                return Err(StoreError::TargetSchema(format!(
                    "{table}.{} is {sql_type}, but the rotation target's encoding is {}: \
                     declare {} for {table} in --rotation-targets \
                     ({{\"table\": \"{table}\", \"encoding\": …}})",
                    column.as_str(),
                    target.encoding.as_str(),
                    if text {
                        "base64 or hex"
                    } else {
                        "bytes (the default)"
                    },
                )));
            }
        }
        Ok(())
    }

    /// The declared type of `table.column`, if both exist.
    pub(super) async fn declared_type(
        &self,
        table: &str,
        column: &str,
    ) -> Result<Option<String>, StoreError> {
        Ok(match &self.pool {
            Pool::Postgres(pool) => super::adopt::column_type(pool, table, column).await?,
            Pool::Sqlite(pool) => {
                sqlx::query_scalar("SELECT type FROM pragma_table_info($1) WHERE name = $2")
                    .bind(table)
                    .bind(column)
                    .fetch_optional(pool)
                    .await?
            }
        })
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
        let first = crate::rotation::sizing::FIRST_ADAPTIVE_BATCH;
        self.claim_batch_sized(worker_id, lease, targets, first)
            .await
    }

    /// [`Self::claim_batch`], taking `adaptive_size` rows when the job's
    /// batches are adaptive (its `batch_size` is 0: the worker sizes them).
    pub async fn claim_batch_sized(
        &self,
        worker_id: &str,
        lease: Duration,
        targets: &[RotationTarget],
        adaptive_size: i64,
    ) -> Result<ClaimOutcome, StoreError> {
        let mut tx = WriteTx::begin(&self.pool).await?;
        let outcome = claim(&mut tx, worker_id, lease, targets, adaptive_size).await?;
        tx.commit().await?;
        Ok(outcome)
    }

    /// Writes a processed batch: compare-and-swap updates for rotated rows
    /// (a row the application rewrote meanwhile is skipped, never
    /// overwritten), `last_error` for failed rows, the job's counters, and
    /// the release of the lease. One transaction, which begins by deleting
    /// the claim: a worker whose lease expired and was dropped (paused, then
    /// resumed: a zombie) finds none, writes nothing and moves no counter
    /// (`None`); a later pass has redone, or will redo, its rows.
    pub async fn finish_batch(
        &self,
        claim: &Claim,
        target: &RotationTarget,
        target_key_id: &str,
        outcomes: &[RowOutcome],
    ) -> Result<Option<BatchCounts>, StoreError> {
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
        let held = tx
            .execute(
                "DELETE FROM encryption_rotation_claims WHERE id = $1",
                &[(&claim.id).into()],
            )
            .await?;
        if held == 0 {
            // Dropping the transaction rolls it back.
            return Ok(None);
        }
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
        tx.commit().await?;
        Ok(Some(counts))
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
            sample.extend(
                rows.into_iter()
                    .map(|row| (index, row.decoded(target.encoding))),
            );
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
    adaptive_size: i64,
) -> Result<ClaimOutcome, StoreError> {
    let now = Utc::now();
    let pick = format!(
        "SELECT {JOB_COLUMNS} FROM encryption_rotation_jobs WHERE status IN ('pending', 'running') \
         AND NOT paused ORDER BY created_at, id LIMIT 1{}",
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
    if let Some(rows) = next_rows(tx, &job, targets, &mut place, adaptive_size).await? {
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
    let mut remaining = 0;
    for target in targets {
        let tag = wrap_tag(job, target);
        remaining += tx
            .fetch_i64(
                &target.count_off_target_sql(),
                &[
                    (&job.target_key_id).into(),
                    (&job.id).into(),
                    Arg::stored(target.encoding, tag.as_ref()),
                ],
            )
            .await?;
    }
    Ok(remaining)
}

/// The job's wrap tag as `target` stores the start of a data key.
fn wrap_tag(job: &RotationJob, target: &RotationTarget) -> Option<Stored> {
    job.wrap_tag
        .as_deref()
        .map(|tag| target.encoding.stored_prefix(tag))
}

/// The next batch: after the cursor in the current target, else from the
/// start of the following targets (`place` moves with it). None at the end
/// of the pass.
async fn next_rows(
    tx: &mut WriteTx,
    job: &RotationJob,
    targets: &[RotationTarget],
    place: &mut Place,
    adaptive_size: i64,
) -> Result<Option<Vec<RotationRow>>, StoreError> {
    let size = if job.batch_size > 0 {
        job.batch_size
    } else {
        adaptive_size
    };
    while let Some(target) = targets.get(place.index) {
        let tag = wrap_tag(job, target);
        let rows: Vec<RotationRow> = tx
            .fetch_all(
                &target.select_batch_sql(place.cursor.is_empty()),
                &[
                    (&job.target_key_id).into(),
                    (&job.id).into(),
                    (&place.cursor).into(),
                    size.into(),
                    Arg::stored(target.encoding, tag.as_ref()),
                ],
            )
            .await?;
        let rows: Vec<RotationRow> = rows
            .into_iter()
            .map(|row| row.decoded(target.encoding))
            .collect();
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
/// it was claimed (compare-and-swap on what was read, in the target's
/// stored form); how many were written.
async fn write_rotated(
    tx: &mut WriteTx,
    target: &RotationTarget,
    target_key_id: &str,
    rewritten: &[(&RotationRow, &Envelope)],
) -> Result<i64, StoreError> {
    if rewritten.is_empty() {
        return Ok(0);
    }
    let enc = target.encoding;
    let written = match tx {
        // One statement for the whole batch.
        WriteTx::Postgres(tx) => {
            let new = |f: fn(&Envelope) -> &Vec<u8>| {
                StoredColumn::of(enc, rewritten.iter().map(|(_, e)| Some(enc.encode(f(e)))))
            };
            let old = |f: fn(&RotationRow, Encoding) -> Option<Stored>| {
                StoredColumn::of(enc, rewritten.iter().map(|(r, _)| f(r, enc)))
            };
            let ids: Vec<&str> = rewritten.iter().map(|(r, _)| r.id.as_str()).collect();
            let old_keys: Vec<Option<&str>> = rewritten
                .iter()
                .map(|(r, _)| r.encryption_key_id.as_deref())
                .collect();
            let sql = target.write_batch_sql_postgres();
            let query = sqlx::query(&sql).bind(target_key_id).bind(ids);
            let query = new(|e| &e.data_key_ciphertext).bind_to(query);
            let query = new(|e| &e.data_key_iv).bind_to(query);
            let query = new(|e| &e.payload_ciphertext).bind_to(query);
            let query = new(|e| &e.payload_iv).bind_to(query).bind(old_keys);
            let query = old(RotationRow::stored_payload).bind_to(query);
            let query = old(RotationRow::stored_legacy).bind_to(query);
            query.execute(&mut **tx).await?.rows_affected()
        }
        // SQLite has no arrays; an embedded database pays no round trip per
        // statement, so one statement per row is cheap.
        WriteTx::Sqlite(_) => {
            let sql = target.write_row_sql_sqlite();
            let mut written = 0;
            for (row, env) in rewritten {
                let new = [
                    &env.data_key_ciphertext,
                    &env.data_key_iv,
                    &env.payload_ciphertext,
                    &env.payload_iv,
                ]
                .map(|value| enc.encode(value));
                let (old_payload, old_legacy) = (row.stored_payload(enc), row.stored_legacy(enc));
                let mut args = vec![Arg::from(target_key_id)];
                args.extend(new.iter().map(|value| Arg::stored(enc, Some(value))));
                args.extend([
                    (&row.id).into(),
                    row.encryption_key_id.as_deref().into(),
                    Arg::stored(enc, old_payload.as_ref()),
                    Arg::stored(enc, old_legacy.as_ref()),
                ]);
                written += tx.execute(&sql, &args).await?;
            }
            written
        }
    };
    Ok(i64::try_from(written).unwrap_or(i64::MAX))
}

/// One column of a PostgreSQL batch write, as an array of the target's
/// stored form.
enum StoredColumn {
    Bytes(Vec<Option<Vec<u8>>>),
    Text(Vec<Option<String>>),
}

impl StoredColumn {
    fn of(encoding: Encoding, values: impl Iterator<Item = Option<Stored>>) -> Self {
        if encoding.is_text() {
            StoredColumn::Text(values.map(|v| v.map(Stored::into_text)).collect())
        } else {
            StoredColumn::Bytes(values.map(|v| v.map(Stored::into_bytes)).collect())
        }
    }

    fn bind_to<'q>(
        self,
        query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        match self {
            StoredColumn::Bytes(values) => query.bind(values),
            StoredColumn::Text(values) => query.bind(values),
        }
    }
}
