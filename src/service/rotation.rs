//! Rotation jobs as operators see them (runbook §1.4–§1.6): start, watch,
//! inspect, cancel, requeue; and scoped-token pruning.
//!
//! Progress lives in the database, so any replica can serve WatchRotation
//! for a job that any worker runs: one poller per watched job in this
//! process reads the job row and every stream on it follows that poller
//! (`service::progress`).

use std::sync::Arc;

use futures::Stream;

use crate::service::{progress::ProgressHub, targets::TargetList};
use crate::{
    error::{Error, Result},
    keys::{KeyCatalog, KeyStatus},
    rotation::{sizing, Limits, Mode, NewJob, RotationJob, MAX_BATCH_SIZE},
    service::{admin::KeyAdmin, rollout},
    store::{Backend, JobTuning, Store},
};

/// Options of StartRotation.
#[derive(Debug, Clone, Default)]
pub struct StartRotation {
    /// `key_id` or `id` of the target key; empty: the active key.
    pub target: String,
    pub mode: Option<Mode>,
    pub dry_run: bool,
    /// Rows per batch; 0 (the default): adaptive, each batch sized to take
    /// about `target_batch_ms`.
    pub batch_size: i64,
    /// 0: unthrottled.
    pub max_rows_per_second: i64,
    /// What an adaptive batch aims to take, in ms; 0: 250.
    pub target_batch_ms: i64,
    /// The latency budget: the Encrypt/Decrypt p99 (ms) no serve replica
    /// may exceed; 0: none.
    pub max_foreground_p99_ms: f64,
    /// With a budget, the rows per second per worker kept even over it;
    /// 0: none (a job may pause while well over its budget).
    pub min_rows_per_second: i64,
    /// The replay lag (ms) no standby may exceed (PostgreSQL); 0: none.
    pub max_replication_lag_ms: i64,
}

/// What UpdateRotation changes: each field when given, with the meaning
/// it has in [`StartRotation`] (0 lifts a limit).
#[derive(Debug, Clone, Copy, Default)]
pub struct Retune {
    pub batch_size: Option<i64>,
    pub max_rows_per_second: Option<i64>,
    pub target_batch_ms: Option<i64>,
    pub max_foreground_p99_ms: Option<f64>,
    pub min_rows_per_second: Option<i64>,
    pub max_replication_lag_ms: Option<i64>,
}

/// The largest latency budget and replication-lag limit, in ms.
const MAX_LIMIT_MS: f64 = 3_600_000.0;

/// A latency budget as a request gives it (0: none).
fn budget_ms(ms: f64) -> Result<Option<f64>> {
    if ms == 0.0 {
        Ok(None)
    } else if ms.is_finite() && ms > 0.0 && ms <= MAX_LIMIT_MS {
        Ok(Some(ms))
    } else {
        Err(Error::InvalidField {
            field: "max_foreground_p99_ms",
            reason: format!("{ms} is not a duration in ms within (0, {MAX_LIMIT_MS}], or 0 (none)"),
        })
    }
}

/// A count a request gives where 0 means none and negatives are refused.
fn optional_count(field: &'static str, value: i64) -> Result<Option<i64>> {
    match value {
        0 => Ok(None),
        v if v > 0 => Ok(Some(v)),
        v => Err(Error::InvalidField {
            field,
            reason: format!("{v} is negative; 0 means none"),
        }),
    }
}

pub use super::progress::Progress;

/// A target batch duration as a request gives it (0: the default).
fn target_batch_ms(ms: i64) -> Result<Option<i64>> {
    match ms {
        0 => Ok(None),
        ms if sizing::TARGET_BATCH_MS.contains(&ms) => Ok(Some(ms)),
        ms => Err(Error::InvalidField {
            field: "target_batch_ms",
            reason: format!(
                "{ms} is not within {}..={} (ms), or 0 (the default, 250)",
                sizing::TARGET_BATCH_MS.start(),
                sizing::TARGET_BATCH_MS.end()
            ),
        }),
    }
}

pub struct Rotations {
    store: Store,
    targets: Arc<TargetList>,
    catalog: Arc<KeyCatalog>,
    admin: Arc<KeyAdmin>,
    progress: Arc<ProgressHub>,
}

impl Rotations {
    pub fn new(
        store: Store,
        targets: Arc<TargetList>,
        catalog: Arc<KeyCatalog>,
        admin: Arc<KeyAdmin>,
    ) -> Self {
        Self {
            progress: Arc::new(ProgressHub::new(store.clone())),
            store,
            targets,
            catalog,
            admin,
        }
    }

    /// Queues a job (runbook §1.4). The target must be the active key or a
    /// pending one; the job then moves every row not on it.
    pub async fn start(&self, req: StartRotation) -> Result<RotationJob> {
        self.admin.refresh().await?;
        let catalog = self.catalog.snapshot();
        let target = if req.target.trim().is_empty() {
            catalog.active().cloned().ok_or(Error::NoActiveKey)?
        } else {
            let ident = req.target.trim();
            catalog
                .keys()
                .iter()
                .find(|k| k.key_id == ident)
                .or_else(|| catalog.get(ident))
                .cloned()
                .ok_or_else(|| Error::KeyNotFound(ident.to_owned()))?
        };
        if matches!(target.status, KeyStatus::Retired | KeyStatus::Rotating) {
            return Err(Error::KeyStatusConflict {
                key_id: target.key_id.clone(),
                status: target.status,
                hint: "rotate to the active key (or a pending one)",
            });
        }
        let batch_size = match req.batch_size {
            n if (0..=MAX_BATCH_SIZE).contains(&n) => n,
            _ => {
                return Err(Error::InvalidField {
                    field: "batch_size",
                    reason: format!("must be between 1 and {MAX_BATCH_SIZE}, or 0 (adaptive)"),
                })
            }
        };
        let target_batch_ms = target_batch_ms(req.target_batch_ms)?;
        let max_rows_per_second = optional_count("max_rows_per_second", req.max_rows_per_second)?;
        let limits = Limits {
            max_foreground_p99_ms: budget_ms(req.max_foreground_p99_ms)?,
            min_rows_per_second: optional_count("min_rows_per_second", req.min_rows_per_second)?,
            max_replication_lag_ms: self.lag_limit(req.max_replication_lag_ms)?,
        };
        if limits.min_rows_per_second.is_some() && limits.max_foreground_p99_ms.is_none() {
            return Err(Error::InvalidField {
                field: "min_rows_per_second",
                reason: "is the floor kept under a latency budget: give max_foreground_p99_ms too"
                    .into(),
            });
        }
        // A master-secret rollover: rows on the target key that another
        // secret wrapped are rewrapped, and the keys' probes resealed.
        let crypto = self.admin.crypto();
        let wrap_tag = crypto.wrap_tag_of(&target);
        if !req.dry_run {
            rollout::reseal_probes(&self.store, crypto, &catalog).await?;
        }
        let job = self
            .store
            .insert_job(&NewJob {
                target_key_id: target.id.clone(),
                mode: req.mode.unwrap_or(Mode::Reencrypt),
                dry_run: req.dry_run,
                batch_size,
                max_rows_per_second,
                target_batch_ms,
                limits,
                wrap_tag,
            })
            .await?;
        tracing::info!(job = %job.id, target = %target.key_id, mode = job.mode.as_str(), dry_run = job.dry_run, "rotation job queued");
        Ok(job)
    }

    pub async fn get(&self, id: &str) -> Result<RotationJob> {
        self.store
            .get_job(id)
            .await?
            .ok_or_else(|| Error::JobNotFound(id.to_owned()))
    }

    pub async fn list(&self, limit: i64) -> Result<Vec<RotationJob>> {
        Ok(self.store.list_jobs(limit.clamp(1, 1000)).await?)
    }

    /// Cancels a job; a running one stops between batches.
    pub async fn cancel(&self, id: &str) -> Result<RotationJob> {
        let job = self
            .store
            .cancel_job(id)
            .await?
            .ok_or_else(|| Error::JobNotFound(id.to_owned()))?;
        tracing::info!(job = %job.id, status = %job.status, "rotation job cancel requested");
        Ok(job)
    }

    /// Pauses (`true`) or resumes a pending or running job: paused, it
    /// claims no batch (one in flight finishes and releases its lease) and
    /// keeps its counts and place.
    pub async fn set_paused(&self, id: &str, paused: bool) -> Result<RotationJob> {
        match self.store.set_job_paused(id, paused).await? {
            Some(job) => {
                tracing::info!(job = %job.id, paused, "rotation job {}", if paused { "paused" } else { "resumed" });
                Ok(job)
            }
            None => Err(self
                .conflict(
                    id,
                    "only pending or running jobs not being cancelled can be paused or resumed",
                )
                .await?),
        }
    }

    /// Changes a pending or running job's batch size (0: adaptive), row
    /// rate, target batch duration and limits, each when given, from its
    /// next batch on (workers read a throttled job's limits every second).
    pub async fn tune(&self, id: &str, retune: Retune) -> Result<RotationJob> {
        if let Some(size) = retune.batch_size {
            if !(0..=MAX_BATCH_SIZE).contains(&size) {
                return Err(Error::InvalidField {
                    field: "batch_size",
                    reason: format!("{size} is not within 1..={MAX_BATCH_SIZE}, or 0 (adaptive)"),
                });
            }
        }
        let count = |field, value: Option<i64>| value.map(|v| optional_count(field, v)).transpose();
        let tuning = JobTuning {
            batch_size: retune.batch_size,
            max_rows_per_second: count("max_rows_per_second", retune.max_rows_per_second)?,
            target_batch_ms: retune
                .target_batch_ms
                .map(self::target_batch_ms)
                .transpose()?,
            max_foreground_p99_ms: retune.max_foreground_p99_ms.map(budget_ms).transpose()?,
            min_rows_per_second: count("min_rows_per_second", retune.min_rows_per_second)?,
            max_replication_lag_ms: retune
                .max_replication_lag_ms
                .map(|ms| self.lag_limit(ms))
                .transpose()?,
        };
        match self.store.tune_job(id, &tuning).await? {
            Some(job) => {
                tracing::info!(job = %job.id, batch_size = job.batch_size, max_rows_per_second = ?job.max_rows_per_second,
                    limits = ?job.limits, "rotation job re-tuned");
                Ok(job)
            }
            None => Err(self
                .conflict(id, "only pending or running jobs can be re-tuned")
                .await?),
        }
    }

    /// A replication-lag limit as a request gives it (0: none); refused
    /// on SQLite, which has no standbys.
    fn lag_limit(&self, ms: i64) -> Result<Option<i64>> {
        let limit = optional_count("max_replication_lag_ms", ms)?;
        if limit.is_some() && self.store.backend() == Backend::Sqlite {
            return Err(Error::InvalidField {
                field: "max_replication_lag_ms",
                reason: "SQLite has no replication to wait for; give 0".into(),
            });
        }
        if limit.is_some_and(|ms| ms as f64 > MAX_LIMIT_MS) {
            return Err(Error::InvalidField {
                field: "max_replication_lag_ms",
                reason: format!("{ms} is over {MAX_LIMIT_MS} ms"),
            });
        }
        Ok(limit)
    }

    /// Why job `id` refused a change its state does not allow (or that it
    /// does not exist).
    async fn conflict(&self, id: &str, hint: &'static str) -> Result<Error> {
        let job = self.get(id).await?;
        Ok(Error::JobStatusConflict {
            job_id: job.id,
            status: job.status,
            hint,
        })
    }

    /// Requeues a failed or cancelled job.
    pub async fn requeue(&self, id: &str) -> Result<RotationJob> {
        match self.store.requeue_job(id, &self.targets.current()).await? {
            Some(job) => {
                tracing::info!(job = %job.id, "rotation job requeued");
                Ok(job)
            }
            None => Err(self
                .conflict(id, "only failed or cancelled jobs can be requeued")
                .await?),
        }
    }

    /// Progress events: the current state at once, then on every change or
    /// at least every second; ends after the terminal event.
    pub async fn watch(
        &self,
        id: &str,
    ) -> Result<impl Stream<Item = Result<Progress>> + Send + 'static> {
        self.progress.watch(id).await
    }

    /// The one reader per watched job in this process.
    pub fn progress(&self) -> &Arc<ProgressHub> {
        &self.progress
    }

    /// The `connection_scoped_tokens` a prune would remove.
    pub async fn aged_scoped_tokens(&self) -> Result<Vec<crate::store::AgedToken>> {
        Ok(self.store.aged_scoped_tokens().await?)
    }

    /// Removes expired or used `connection_scoped_tokens`.
    pub async fn prune_scoped_tokens(&self) -> Result<u64> {
        let removed = self.store.prune_scoped_tokens().await?;
        tracing::info!(removed, "expired or used scoped tokens pruned");
        Ok(removed)
    }
}
