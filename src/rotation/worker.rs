//! The rotation worker: claims batches, moves each row to the target key,
//! writes back with compare-and-swap. [`Worker::try_execute_task`] is one
//! step, public so tests can drive a worker deterministically;
//! [`Worker::run`] loops it until told to stop.
//!
//! Stopping (SIGTERM): no new batch is claimed; a batch in flight gets
//! [`WorkerOptions::batch_grace`] to finish and be written, else it is
//! abandoned — nothing of it is written, and its lease is released at once
//! so the job's next pass (on any worker) redoes its rows without waiting
//! for the lease to expire. Either way the worker holds no lease when
//! `run` returns.

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::{brake::Brake, target::RotationTarget, throttle, JobStatus, Mode, RotationJob};
use crate::service::targets::TargetList;
use crate::{
    crypto::kms::local::tag_names,
    error::{Error, Result},
    keys::{KeyRecord, KeyStatus},
    service::{admin::KeyAdmin, crypto::CryptoService},
    store::{
        rotation::{Claim, ClaimOutcome, RotationRow, RowOutcome},
        Store,
    },
};

/// Rows of one batch rotated concurrently (they wait on KMS calls).
const ROW_CONCURRENCY: usize = 16;
/// How often a held worker looks again whether it may go on.
const THROTTLED_POLL: Duration = Duration::from_millis(250);

/// What one step did.
#[derive(Debug)]
// One value per batch: its size does not matter, and a boxed job would
// only make every match on it longer.
#[allow(clippy::large_enum_variant)]
pub enum Step {
    /// Nothing to do.
    Idle,
    /// Other workers hold the last batches of a pass, or the job was
    /// changed to follow a master-secret rollout: try again shortly.
    Waiting,
    /// A batch was processed.
    Batch { job_id: String, rows: usize },
    /// A batch was given up at shutdown and its lease released.
    Abandoned { job_id: String, rows: usize },
    /// A batch's lease had expired and been dropped when it was to be
    /// written: nothing was written.
    LeaseLost { job_id: String, rows: usize },
    /// A job started a new pass or ended.
    Advanced(RotationJob),
    /// Nothing was claimed: the job's limits hold the worker back
    /// (`super::brake`).
    Throttled { job_id: String, reason: String },
    /// Nothing was claimed: this process cannot open some key's data
    /// (another master secret wrote it), so it would only fail rows that a
    /// rightly configured worker can rotate.
    Held(String),
}

/// Worker tuning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerOptions {
    /// How long a claimed batch stays ours without being finished.
    pub lease: Duration,
    /// Sleep between polls of an empty queue.
    pub idle_poll: Duration,
    /// After a stop, how long a batch in flight may still run before it is
    /// abandoned.
    pub batch_grace: Duration,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(30),
            idle_poll: Duration::from_millis(500),
            batch_grace: Duration::from_secs(5),
        }
    }
}

pub struct Worker {
    id: String,
    store: Store,
    targets: Arc<TargetList>,
    crypto: Arc<CryptoService>,
    admin: Arc<KeyAdmin>,
    options: WorkerOptions,
    /// The size of this worker's next batch of an adaptive job
    /// (`super::sizing`).
    adaptive_size: std::sync::Mutex<i64>,
    /// What holds this worker back under its job's limits.
    brake: Brake,
}

impl Worker {
    pub fn new(
        store: Store,
        targets: Arc<TargetList>,
        crypto: Arc<CryptoService>,
        admin: Arc<KeyAdmin>,
        options: WorkerOptions,
    ) -> Self {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "worker".into());
        let id = format!(
            "{host}-{}-{}",
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        Self {
            brake: Brake::new(store.clone(), id.clone()),
            id,
            store,
            targets,
            crypto,
            admin,
            options,
            adaptive_size: std::sync::Mutex::new(super::sizing::FIRST_ADAPTIVE_BATCH),
        }
    }

    fn adaptive_size(&self) -> i64 {
        *self
            .adaptive_size
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sizes the next batch of an adaptive job from how long this one took.
    fn learn(&self, job: &RotationJob, rows: usize, took: Duration) {
        if job.batch_size > 0 {
            return;
        }
        let target = super::sizing::target_of(job.target_batch_ms);
        let mut size = self
            .adaptive_size
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *size = super::sizing::next_batch_size(*size, rows, took, target);
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Runs steps until `stop` is cancelled; see the module docs for what
    /// happens to a batch in flight.
    pub async fn run(&self, stop: CancellationToken) {
        tracing::info!(worker = %self.id, "rotation worker started");
        while !stop.is_cancelled() {
            let pause = match self.step(&stop).await {
                Ok(Step::Idle) => self.options.idle_poll,
                Ok(Step::Held(reason)) => {
                    tracing::warn!(worker = %self.id, %reason, "this worker claims no rotation batch: {reason}");
                    self.options.idle_poll.max(Duration::from_secs(5))
                }
                Ok(Step::Waiting) => Duration::from_millis(100),
                Ok(Step::Throttled { .. }) => THROTTLED_POLL,
                Ok(Step::Batch { .. } | Step::LeaseLost { .. }) => Duration::ZERO,
                Ok(Step::Abandoned { job_id, rows }) => {
                    tracing::warn!(worker = %self.id, job = %job_id, rows,
                        "stopping: the batch in flight was abandoned and its lease released; \
                         a later pass of the job redoes its rows");
                    Duration::ZERO
                }
                Ok(Step::Advanced(job)) => {
                    if job.status.is_terminal() {
                        tracing::info!(job = %job.id, status = %job.status, processed = job.counts.processed,
                            failed = job.counts.failed, "rotation job finished");
                    } else {
                        tracing::info!(job = %job.id, pass = job.pass, "rotation job starts another pass");
                    }
                    Duration::ZERO
                }
                Err(err) => {
                    tracing::warn!(worker = %self.id, error = %err, "rotation step failed; retrying");
                    Duration::from_secs(1)
                }
            };
            if !pause.is_zero() {
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = stop.cancelled() => {}
                }
            }
        }
        tracing::info!(worker = %self.id, "rotation worker stopped");
    }

    /// One step: claim a batch (or advance a job), process it, write it.
    pub async fn try_execute_task(&self) -> Result<Step> {
        self.step(&CancellationToken::new()).await
    }

    /// One step that gives up its batch when `stop` has been cancelled for
    /// longer than the batch grace.
    async fn step(&self, stop: &CancellationToken) -> Result<Step> {
        if let Some(reason) = self.admin.misconfigured() {
            return Ok(Step::Held(reason));
        }
        let mut cap = None;
        if let Some((job_id, verdict)) = self.brake.before_claim().await? {
            if verdict.hold {
                let reason = verdict.reason.map(|why| why.text).unwrap_or_default();
                return Ok(Step::Throttled { job_id, reason });
            }
            cap = verdict.cap;
        }
        let lease =
            chrono::Duration::from_std(self.options.lease).unwrap_or(chrono::Duration::seconds(30));
        let targets = self.targets.current();
        let size = throttle::batch_under_cap(self.adaptive_size(), cap);
        let claim = match self
            .store
            .claim_batch_sized(&self.id, lease, &targets, size)
            .await?
        {
            ClaimOutcome::Idle => return Ok(Step::Idle),
            ClaimOutcome::Waiting => return Ok(Step::Waiting),
            ClaimOutcome::Advanced(job) => return Ok(Step::Advanced(job)),
            ClaimOutcome::Batch(claim) => claim,
        };
        let Some(table) = targets.get(claim.target_index) else {
            // The list cannot change while a job runs (service::targets).
            let message = "the job's rotation target is no longer listed (keyward targets list)";
            self.store.fail_job(&claim.job.id, message).await?;
            return Ok(Step::Idle);
        };
        let target = match self.target_key(&claim.job).await {
            Ok(target) => target,
            Err(err) => {
                let message = err.to_string();
                tracing::error!(job = %claim.job.id, error = %message, "rotation job failed");
                self.store.fail_job(&claim.job.id, &message).await?;
                let mut job = claim.job;
                job.status = JobStatus::Failed;
                job.last_error = Some(message);
                return Ok(Step::Advanced(job));
            }
        };
        if let Some(tag) = self.wraps_otherwise(&claim.job, &target) {
            // The rollout moved since the job started: the job follows it,
            // or the rows this worker writes would stay off target.
            self.store.release_claim(&claim, &self.id).await?;
            self.store
                .set_job_wrap_tag(&claim.job.id, tag.as_deref())
                .await?;
            tracing::info!(job = %claim.job.id, master_secret = %describe_tag(tag.as_deref()),
                "rotation job now rewraps under the master secret new data keys are wrapped under");
            return Ok(Step::Waiting);
        }
        let started = tokio::time::Instant::now();
        let give_up = async {
            stop.cancelled().await;
            tokio::time::sleep(self.options.batch_grace).await;
        };
        let outcomes = tokio::select! {
            biased;
            outcomes = self.process(&claim, table, &target) => outcomes,
            () = give_up => {
                self.store.release_claim(&claim, &self.id).await?;
                return Ok(Step::Abandoned {
                    job_id: claim.job.id.clone(),
                    rows: claim.rows.len(),
                });
            }
        };
        let Some(counts) = self
            .store
            .finish_batch(&claim, table, &target.id, &outcomes)
            .await?
        else {
            tracing::warn!(worker = %self.id, job = %claim.job.id, rows = outcomes.len(),
                "the batch's lease expired and was dropped before it was written (this worker \
                 was paused or too slow): nothing of it was written, a later pass redoes its rows");
            return Ok(Step::LeaseLost {
                job_id: claim.job.id.clone(),
                rows: outcomes.len(),
            });
        };
        let took = started.elapsed();
        self.learn(&claim.job, outcomes.len(), took);
        self.brake
            .after_batch(&claim.job, outcomes.len(), took)
            .await;
        tracing::debug!(worker = %self.id, job = %claim.job.id, rows = outcomes.len(),
            succeeded = counts.succeeded, failed = counts.failed, skipped = counts.skipped,
            "rotation batch written");
        let rate = claim
            .job
            .max_rows_per_second
            .filter(|r| *r > 0)
            .map(|r| r as f64)
            .into_iter()
            .chain(cap)
            .reduce(f64::min);
        if let Some(rate) = rate {
            // The pause holds no lease: a stop cuts it short.
            let budget = Duration::from_secs_f64(outcomes.len() as f64 / rate);
            tokio::select! {
                () = tokio::time::sleep_until(started + budget) => {}
                () = stop.cancelled() => {}
            }
        }
        Ok(Step::Batch {
            job_id: claim.job.id.clone(),
            rows: outcomes.len(),
        })
    }

    async fn process(
        &self,
        claim: &Claim,
        table: &RotationTarget,
        target: &Arc<KeyRecord>,
    ) -> Vec<RowOutcome> {
        // Rows are independent: with a remote KMS each one waits on network
        // round trips, so up to ROW_CONCURRENCY are in flight at once (in
        // order, so outcomes line up with rows). With the local KMS nothing
        // waits and this is a plain loop.
        // Collected first: a lazy `map` closure over borrowed rows trips
        // the compiler's `Send` check where the worker is spawned.
        let rows: Vec<_> = claim
            .rows
            .iter()
            .enumerate()
            .map(|(n, row)| self.row_outcome(n, claim, table, target, row))
            .collect();
        futures::stream::iter(rows)
            .buffered(ROW_CONCURRENCY)
            .collect()
            .await
    }

    async fn row_outcome(
        &self,
        n: usize,
        claim: &Claim,
        table: &RotationTarget,
        target: &Arc<KeyRecord>,
        row: &RotationRow,
    ) -> RowOutcome {
        // A batch is thousands of AEAD operations with no I/O in between:
        // yield now and then so RPCs sharing this runtime (the in-process
        // worker) are not held up behind it.
        if n % 16 == 15 {
            tokio::task::yield_now().await;
        }
        match self.rotate_row(&claim.job, table, target, row).await {
            Ok(outcome) => outcome,
            Err(err) => RowOutcome::Failed(err.to_string()),
        }
    }

    async fn rotate_row(
        &self,
        job: &RotationJob,
        table: &RotationTarget,
        target: &Arc<KeyRecord>,
        row: &RotationRow,
    ) -> Result<RowOutcome> {
        if let Some(why) = &row.malformed {
            return Ok(RowOutcome::Failed(why.clone()));
        }
        let envelope = row.envelope();
        let legacy = envelope.encryption_key_id.is_empty();
        if let Some(((_, column), _)) = table
            .context
            .iter()
            .zip(&row.context)
            .find(|(_, value)| value.is_none())
        {
            return Ok(RowOutcome::Failed(format!(
                "context column {} is NULL, so the row's encryption context is unknown",
                column.as_str()
            )));
        }
        let context = table.context_of(&row.context)?;
        if job.dry_run {
            self.crypto.verify(&envelope, &context).await?;
            return Ok(RowOutcome::Verified);
        }
        let rotated = if job.mode == Mode::Rewrap && !legacy {
            self.crypto.rewrap(envelope, &context, target).await?
        } else {
            self.crypto.reencrypt(&envelope, &context, target).await?
        };
        Ok(RowOutcome::Rewritten(rotated))
    }

    /// The wrap tag this worker writes under the job's target key, when
    /// it is not the one the job rewraps to (the replicas' rollout moved
    /// since the job started): rows written now would stay off target and
    /// be redone in every pass. A dry run writes nothing.
    fn wraps_otherwise(&self, job: &RotationJob, target: &KeyRecord) -> Option<Option<Vec<u8>>> {
        let wraps = self.crypto.wrap_tag_of(target);
        (!job.dry_run && wraps != job.wrap_tag).then_some(wraps)
    }

    /// The job's target key, refreshing the catalog once if this process
    /// has not seen it yet. A missing or retired target fails the job.
    async fn target_key(&self, job: &RotationJob) -> Result<Arc<KeyRecord>> {
        let find = || {
            self.crypto
                .catalog()
                .snapshot()
                .get(&job.target_key_id)
                .cloned()
        };
        let key = match find() {
            Some(key) => key,
            None => {
                self.admin.refresh().await?;
                find().ok_or_else(|| Error::UnknownKey(job.target_key_id.clone()))?
            }
        };
        if key.status == KeyStatus::Retired {
            return Err(Error::KeyStatusConflict {
                key_id: key.key_id.clone(),
                status: key.status,
                hint: "a retired key cannot be a rotation target; start a job for the active key",
            });
        }
        Ok(key)
    }
}

/// A wrap tag as operators know it: the master secret's fingerprint.
fn describe_tag(tag: Option<&[u8]>) -> String {
    match tag {
        Some(tag) => tag_names(tag).map_or_else(|| "(unknown)".to_owned(), |fp| fp.to_string()),
        None => "none (data keys are not tagged)".to_owned(),
    }
}
