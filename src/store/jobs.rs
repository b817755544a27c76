//! `encryption_rotation_jobs`: the runbook's `encryption.rotate` queue,
//! one row per job (its status, counters, cursor and lease). Claiming and
//! finishing batches is `store::rotation`.

use chrono::{DateTime, Utc};

use super::{Store, StoreError};
use crate::rotation::{
    target::RotationTarget, Counts, JobStatus, Limits, Mode, NewJob, RotationJob, Throttle,
};

/// What `Store::tune_job` changes: each field when `Some`.
#[derive(Debug, Clone, Copy, Default)]
pub struct JobTuning {
    pub batch_size: Option<i64>,
    pub max_rows_per_second: Option<Option<i64>>,
    pub target_batch_ms: Option<Option<i64>>,
    pub max_foreground_p99_ms: Option<Option<f64>>,
    pub min_rows_per_second: Option<Option<i64>>,
    pub max_replication_lag_ms: Option<Option<i64>>,
}

/// A worker's word on why a job is throttled (`Store::report_throttle`).
#[derive(Debug, Clone, Copy)]
pub struct ThrottleReport<'a> {
    pub worker: &'a str,
    /// `None`: no longer throttled (clears the reason if this worker set it).
    pub reason: Option<&'a str>,
    /// How long the reason holds unless reported again.
    pub holds_for: chrono::Duration,
    /// Throttled worker-seconds since this worker's last report, by signal.
    pub foreground_seconds: f64,
    pub lag_seconds: f64,
}

/// The columns a job is read from; the status as text, as for key records
/// (`store::keys`), since an application's table may declare it an enum.
pub(super) const JOB_COLUMNS: &str = "id, CAST(status AS TEXT) AS status, target_key_id, mode, dry_run, batch_size, max_rows_per_second, \
     total_rows, processed_rows, succeeded_rows, failed_rows, skipped_rows, pass, last_error, cursor, \
     target_index, cancel_requested, created_at, updated_at, started_at, completed_at, late_rows, \
     replicas_waited_since, wrap_tag, paused, target_batch_ms, max_foreground_p99_ms, min_rows_per_second, \
     max_replication_lag_ms, throttle_reason, throttled_until, throttled_p99_seconds, throttled_lag_seconds";

#[derive(sqlx::FromRow)]
pub(super) struct JobRow {
    id: String,
    status: String,
    target_key_id: String,
    mode: String,
    dry_run: bool,
    batch_size: i64,
    max_rows_per_second: Option<i64>,
    total_rows: i64,
    processed_rows: i64,
    succeeded_rows: i64,
    failed_rows: i64,
    skipped_rows: i64,
    pass: i64,
    last_error: Option<String>,
    pub(super) cursor: Option<String>,
    pub(super) target_index: i64,
    cancel_requested: bool,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    started_at: Option<DateTime<Utc>>,
    completed_at: Option<DateTime<Utc>>,
    late_rows: i64,
    pub(super) replicas_waited_since: Option<DateTime<Utc>>,
    wrap_tag: Option<Vec<u8>>,
    paused: bool,
    target_batch_ms: Option<i64>,
    max_foreground_p99_ms: Option<f64>,
    min_rows_per_second: Option<i64>,
    max_replication_lag_ms: Option<i64>,
    throttle_reason: Option<String>,
    throttled_until: Option<DateTime<Utc>>,
    throttled_p99_seconds: f64,
    throttled_lag_seconds: f64,
}

impl TryFrom<JobRow> for RotationJob {
    type Error = StoreError;

    fn try_from(row: JobRow) -> Result<Self, StoreError> {
        Ok(RotationJob {
            status: JobStatus::parse(&row.status).ok_or_else(|| {
                StoreError::Corrupt(format!("job {} has status {:?}", row.id, row.status))
            })?,
            mode: Mode::parse(&row.mode).ok_or_else(|| {
                StoreError::Corrupt(format!("job {} has mode {:?}", row.id, row.mode))
            })?,
            id: row.id,
            target_key_id: row.target_key_id,
            dry_run: row.dry_run,
            batch_size: row.batch_size,
            max_rows_per_second: row.max_rows_per_second,
            target_batch_ms: row.target_batch_ms,
            counts: Counts {
                total: row.total_rows,
                processed: row.processed_rows,
                succeeded: row.succeeded_rows,
                failed: row.failed_rows,
                skipped: row.skipped_rows,
                late: row.late_rows,
            },
            pass: row.pass,
            last_error: row.last_error,
            cancel_requested: row.cancel_requested,
            paused: row.paused,
            limits: Limits {
                max_foreground_p99_ms: row.max_foreground_p99_ms,
                min_rows_per_second: row.min_rows_per_second,
                max_replication_lag_ms: row.max_replication_lag_ms,
            },
            throttle: Throttle {
                reason: row.throttle_reason,
                until: row.throttled_until,
                foreground_seconds: row.throttled_p99_seconds,
                lag_seconds: row.throttled_lag_seconds,
            },
            created_at: row.created_at,
            updated_at: row.updated_at,
            started_at: row.started_at,
            completed_at: row.completed_at,
            wrap_tag: row.wrap_tag,
        })
    }
}

impl Store {
    pub async fn insert_job(&self, new: &NewJob) -> Result<RotationJob, StoreError> {
        let id = uuid::Uuid::new_v4().to_string();
        let now = Utc::now();
        let sql = format!(
            "INSERT INTO encryption_rotation_jobs (id, status, target_key_id, mode, dry_run, batch_size, \
             max_rows_per_second, created_at, updated_at, wrap_tag, target_batch_ms, max_foreground_p99_ms, \
             min_rows_per_second, max_replication_lag_ms) \
             VALUES ($1, 'pending', $2, $3, $4, $5, $6, $7, $7, $8, $9, $10, $11, $12) \
             RETURNING {JOB_COLUMNS}"
        );
        let row: JobRow = super::on_pool!(self, |pool| sqlx::query_as(&sql)
            .bind(&id)
            .bind(&new.target_key_id)
            .bind(new.mode.as_str())
            .bind(new.dry_run)
            .bind(new.batch_size)
            .bind(new.max_rows_per_second)
            .bind(now)
            .bind(&new.wrap_tag)
            .bind(new.target_batch_ms)
            .bind(new.limits.max_foreground_p99_ms)
            .bind(new.limits.min_rows_per_second)
            .bind(new.limits.max_replication_lag_ms)
            .fetch_one(pool)
            .await)?;
        row.try_into()
    }

    pub async fn get_job(&self, id: &str) -> Result<Option<RotationJob>, StoreError> {
        let sql = format!("SELECT {JOB_COLUMNS} FROM encryption_rotation_jobs WHERE id = $1");
        let row: Option<JobRow> = super::on_pool!(self, |pool| sqlx::query_as(&sql)
            .bind(id)
            .fetch_optional(pool)
            .await)?;
        row.map(RotationJob::try_from).transpose()
    }

    /// The newest jobs first.
    pub async fn list_jobs(&self, limit: i64) -> Result<Vec<RotationJob>, StoreError> {
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM encryption_rotation_jobs ORDER BY created_at DESC, id LIMIT $1"
        );
        let rows: Vec<JobRow> = super::on_pool!(self, |pool| sqlx::query_as(&sql)
            .bind(limit)
            .fetch_all(pool)
            .await)?;
        rows.into_iter().map(RotationJob::try_from).collect()
    }

    /// How many jobs are in each status (statuses with none are left out).
    pub async fn count_jobs_by_status(&self) -> Result<Vec<(JobStatus, i64)>, StoreError> {
        let rows: Vec<(String, i64)> = super::on_pool!(self, |pool| {
            sqlx::query_as(
            "SELECT CAST(status AS TEXT), COUNT(*) FROM encryption_rotation_jobs GROUP BY status"
        )
        .fetch_all(pool)
        .await
        })?;
        rows.into_iter()
            .map(|(status, n)| {
                JobStatus::parse(&status)
                    .map(|s| (s, n))
                    .ok_or_else(|| StoreError::Corrupt(format!("a job has status {status:?}")))
            })
            .collect()
    }

    /// Jobs a worker is running now, oldest first.
    pub async fn running_jobs(&self) -> Result<Vec<RotationJob>, StoreError> {
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM encryption_rotation_jobs WHERE status = 'running' \
             ORDER BY created_at, id LIMIT 100"
        );
        let rows: Vec<JobRow> =
            super::on_pool!(self, |pool| sqlx::query_as(&sql).fetch_all(pool).await)?;
        rows.into_iter().map(RotationJob::try_from).collect()
    }

    /// Sets the wrap tag a job rewraps to (`RotationJob::wrap_tag`).
    pub async fn set_job_wrap_tag(&self, id: &str, tag: Option<&[u8]>) -> Result<(), StoreError> {
        super::on_pool!(self, |pool| sqlx::query(
            "UPDATE encryption_rotation_jobs SET wrap_tag = $2, updated_at = $3 WHERE id = $1"
        )
        .bind(id)
        .bind(tag)
        .bind(Utc::now())
        .execute(pool)
        .await
        .map(drop))?;
        Ok(())
    }

    /// Cancels a job: a pending one at once, a running one between batches.
    /// Returns the job as it now stands; `None` if there is no such job.
    pub async fn cancel_job(&self, id: &str) -> Result<Option<RotationJob>, StoreError> {
        let now = Utc::now();
        super::on_pool!(self, |pool| {
            sqlx::query(
                "UPDATE encryption_rotation_jobs SET status = 'cancelled', completed_at = $2, updated_at = $2 \
                 WHERE id = $1 AND status = 'pending'",
            )
            .bind(id)
            .bind(now)
            .execute(pool)
            .await?;
            sqlx::query(
                "UPDATE encryption_rotation_jobs SET cancel_requested = TRUE, paused = FALSE, \
                 updated_at = $2 WHERE id = $1 AND status = 'running'",
            )
            .bind(id)
            .bind(now)
            .execute(pool)
            .await
            .map(|_| ())
        })?;
        self.get_job(id).await
    }

    /// Pauses or resumes a pending or running job (a running job being
    /// cancelled is not paused again). `None` if the job is in another
    /// state or does not exist.
    pub async fn set_job_paused(
        &self,
        id: &str,
        paused: bool,
    ) -> Result<Option<RotationJob>, StoreError> {
        let done = super::on_pool!(self, |pool| sqlx::query(
            "UPDATE encryption_rotation_jobs SET paused = $2, updated_at = $3 \
             WHERE id = $1 AND status IN ('pending', 'running') AND NOT cancel_requested"
        )
        .bind(id)
        .bind(paused)
        .bind(Utc::now())
        .execute(pool)
        .await
        .map(|r| r.rows_affected()))?;
        self.job_if_changed(id, done).await
    }

    /// Changes the batch size, the row rate and the target batch duration
    /// of a pending or running job (each when given; `Some(None)` clears a
    /// rate or a target). `None` if the job is in another state or does
    /// not exist.
    pub async fn tune_job(
        &self,
        id: &str,
        tune: &JobTuning,
    ) -> Result<Option<RotationJob>, StoreError> {
        let done = super::on_pool!(self, |pool| sqlx::query(
            "UPDATE encryption_rotation_jobs SET \
             batch_size = CASE WHEN $2 THEN $3 ELSE batch_size END, \
             max_rows_per_second = CASE WHEN $4 THEN $5 ELSE max_rows_per_second END, \
             target_batch_ms = CASE WHEN $7 THEN $8 ELSE target_batch_ms END, \
             max_foreground_p99_ms = CASE WHEN $9 THEN $10 ELSE max_foreground_p99_ms END, \
             min_rows_per_second = CASE WHEN $11 THEN $12 ELSE min_rows_per_second END, \
             max_replication_lag_ms = CASE WHEN $13 THEN $14 ELSE max_replication_lag_ms END, \
             updated_at = $6 WHERE id = $1 AND status IN ('pending', 'running')"
        )
        .bind(id)
        .bind(tune.batch_size.is_some())
        .bind(tune.batch_size.unwrap_or(0))
        .bind(tune.max_rows_per_second.is_some())
        .bind(tune.max_rows_per_second.flatten())
        .bind(Utc::now())
        .bind(tune.target_batch_ms.is_some())
        .bind(tune.target_batch_ms.flatten())
        .bind(tune.max_foreground_p99_ms.is_some())
        .bind(tune.max_foreground_p99_ms.flatten())
        .bind(tune.min_rows_per_second.is_some())
        .bind(tune.min_rows_per_second.flatten())
        .bind(tune.max_replication_lag_ms.is_some())
        .bind(tune.max_replication_lag_ms.flatten())
        .execute(pool)
        .await
        .map(|r| r.rows_affected()))?;
        self.job_if_changed(id, done).await
    }

    /// Records what a worker says about job `id`'s throttling: the reason
    /// (or its end, which clears a reason only this worker set) and the
    /// throttled time since its last report. Only a running job.
    pub async fn report_throttle(
        &self,
        id: &str,
        report: &ThrottleReport<'_>,
    ) -> Result<(), StoreError> {
        let now = Utc::now();
        super::on_pool!(self, |pool| sqlx::query(
            "UPDATE encryption_rotation_jobs SET \
             throttle_reason = CASE WHEN $3 IS NOT NULL THEN $3 \
                 WHEN throttled_by = $2 THEN NULL ELSE throttle_reason END, \
             throttled_until = CASE WHEN $3 IS NOT NULL THEN $4 \
                 WHEN throttled_by = $2 THEN NULL ELSE throttled_until END, \
             throttled_by = CASE WHEN $3 IS NOT NULL THEN $2 \
                 WHEN throttled_by = $2 THEN NULL ELSE throttled_by END, \
             throttled_p99_seconds = throttled_p99_seconds + $5, \
             throttled_lag_seconds = throttled_lag_seconds + $6 \
             WHERE id = $1 AND status = 'running'"
        )
        .bind(id)
        .bind(report.worker)
        .bind(report.reason)
        .bind(now + report.holds_for)
        .bind(report.foreground_seconds)
        .bind(report.lag_seconds)
        .execute(pool)
        .await
        .map(drop))?;
        Ok(())
    }

    /// The job after an update that changed `rows` rows: `None` if none.
    async fn job_if_changed(&self, id: &str, rows: u64) -> Result<Option<RotationJob>, StoreError> {
        if rows == 0 {
            return Ok(None);
        }
        self.get_job(id).await
    }

    /// Puts a failed or cancelled job back in the queue from the start
    /// (rows already rotated are not off target any more, so nothing is
    /// redone). `None` if the job is in another state or does not exist.
    pub async fn requeue_job(
        &self,
        id: &str,
        targets: &[RotationTarget],
    ) -> Result<Option<RotationJob>, StoreError> {
        let now = Utc::now();
        let done = super::on_pool!(self, |pool| {
            sqlx::query(
            "UPDATE encryption_rotation_jobs SET status = 'pending', cursor = NULL, target_index = 0, pass = 0, \
             cancel_requested = FALSE, paused = FALSE, completed_at = NULL, last_error = NULL, total_rows = 0, \
             processed_rows = 0, succeeded_rows = 0, failed_rows = 0, skipped_rows = 0, late_rows = 0, \
             replicas_waited_since = NULL, updated_at = $2 \
             WHERE id = $1 AND status IN ('failed', 'cancelled')"
        )
        .bind(id)
        .bind(now)
        .execute(pool)
        .await
        .map(|r| r.rows_affected())
        })?;
        if done == 0 {
            return Ok(None);
        }
        super::on_pool!(self, |pool| sqlx::query(
            "DELETE FROM encryption_rotation_claims WHERE job_id = $1"
        )
        .bind(id)
        .execute(pool)
        .await
        .map(|_| ()))?;
        // A requeued job may retry the rows it failed before.
        for target in targets {
            let sql = target.clear_failures_sql();
            super::on_pool!(self, |pool| sqlx::query(&sql)
                .bind(id)
                .execute(pool)
                .await
                .map(|_| ()))?;
        }
        self.get_job(id).await
    }

    /// Marks a job failed outright (its target key cannot be used).
    pub async fn fail_job(&self, id: &str, error: &str) -> Result<(), StoreError> {
        let now = Utc::now();
        super::on_pool!(self, |pool| {
            sqlx::query(
            "UPDATE encryption_rotation_jobs SET status = 'failed', last_error = $2, completed_at = $3, \
             updated_at = $3 WHERE id = $1 AND status IN ('pending', 'running')"
        )
        .bind(id)
        .bind(error)
        .bind(now)
        .execute(pool)
        .await
        .map(|_| ())
        })?;
        Ok(())
    }
}
