//! A worker's brake: reads what its job throttles on (the serve replicas'
//! foreground p99, the standbys' lag), lets [`super::throttle`] decide,
//! and tells the job row why it is slow, so WatchRotation, the CLI, the
//! dashboard and the metrics can say so.
//!
//! The brake follows the job its worker last claimed a batch of. While a
//! job has limits, every step first reads the signals (at most every
//! [`READ_EVERY`]); a held worker claims nothing, so it holds no lease,
//! and re-reads its job's limits every second, so an UpdateRotation or a
//! pause reaches it.

use std::time::Duration;

use tokio::{sync::Mutex, time::Instant};

use super::{
    throttle::{Foreground, Governor, LagTracker, Reading, Reason, Signal, Verdict},
    JobStatus, RotationJob,
};
use crate::store::{Store, StoreError, ThrottleReport};

/// Readings older than this are taken again.
const READ_EVERY: Duration = Duration::from_millis(200);
/// A replica's p99 counts while it is this fresh (it publishes every
/// second).
const FRESH: chrono::Duration = chrono::Duration::seconds(3);
/// How often a held worker re-reads its job.
const JOB_REREAD: Duration = Duration::from_secs(1);
/// How often a throttled worker says so again, and how long its word
/// holds without that.
const REPORT_EVERY: Duration = Duration::from_secs(1);
const REPORT_HOLDS: chrono::Duration = chrono::Duration::seconds(3);

struct State {
    /// The job last claimed from, and when it was read.
    job: Option<(RotationJob, Instant)>,
    governor: Governor,
    lag: LagTracker,
    /// The last reading and when it was taken.
    reading: Option<(Reading, Instant)>,
    /// What this worker last reported, and when.
    reported: Option<Reason>,
    reported_at: Instant,
}

pub struct Brake {
    store: Store,
    worker: String,
    state: Mutex<State>,
}

impl Brake {
    pub fn new(store: Store, worker: String) -> Self {
        Self {
            store,
            worker,
            state: Mutex::new(State {
                job: None,
                governor: Governor::default(),
                lag: LagTracker::default(),
                reading: None,
                reported: None,
                reported_at: Instant::now(),
            }),
        }
    }

    /// What to do before claiming: `None` when the job followed has no
    /// limits (or there is none).
    pub async fn before_claim(&self) -> Result<Option<(String, Verdict)>, StoreError> {
        let mut state = self.state.lock().await;
        let Some((job, read_at)) = state.job.clone() else {
            return Ok(None);
        };
        let job = if read_at.elapsed() >= JOB_REREAD {
            match self.store.get_job(&job.id).await? {
                Some(job) if job.status == JobStatus::Running && !job.paused => {
                    state.job = Some((job.clone(), Instant::now()));
                    job
                }
                _ => {
                    self.report(&mut state, &job.id, None).await?;
                    state.job = None;
                    return Ok(None);
                }
            }
        } else {
            job
        };
        if !job.limits.any() {
            self.report(&mut state, &job.id, None).await?;
            return Ok(None);
        }
        let now = Instant::now();
        let reading = match &state.reading {
            Some((reading, at)) if now.duration_since(*at) < READ_EVERY => reading.clone(),
            _ => {
                let reading = self.read(&mut state, &job).await?;
                state.reading = Some((reading.clone(), now));
                reading
            }
        };
        let verdict = state.governor.decide(&job.limits, &reading, now);
        self.report(&mut state, &job.id, verdict.reason.clone())
            .await?;
        Ok(Some((job.id, verdict)))
    }

    /// Follows `job` (just claimed from) and learns from its batch of
    /// `rows` that took `took`.
    pub async fn after_batch(&self, job: &RotationJob, rows: usize, took: Duration) {
        let mut state = self.state.lock().await;
        if state.job.as_ref().is_some_and(|(j, _)| j.id != job.id) {
            state.reading = None;
        }
        state.job = Some((job.clone(), Instant::now()));
        state.governor.observe(rows, took);
    }

    async fn read(&self, state: &mut State, job: &RotationJob) -> Result<Reading, StoreError> {
        let mut reading = Reading::default();
        if job.limits.max_foreground_p99_ms.is_some() {
            let since = chrono::Utc::now() - FRESH;
            let (fresh, silent): (Vec<_>, Vec<_>) = self
                .store
                .foreground_readings()
                .await?
                .into_iter()
                .partition(|r| r.at.is_some_and(|at| at >= since));
            reading.silent = silent.into_iter().map(|r| r.name).next();
            reading.foreground = fresh
                .into_iter()
                .filter_map(|r| {
                    r.p99_ms.map(|p99_ms| Foreground {
                        replica: r.name,
                        p99_ms,
                    })
                })
                .max_by(|a, b| a.p99_ms.total_cmp(&b.p99_ms));
        }
        if job.limits.max_replication_lag_ms.is_some() {
            if let Some(replication) = self.store.replication().await? {
                reading.lag = state.lag.observe(Instant::now(), &replication);
            }
        }
        Ok(reading)
    }

    /// Tells job `job_id` why this worker is slow (`None`: it is not):
    /// on every change of signal or phase, and every second while it
    /// lasts.
    async fn report(
        &self,
        state: &mut State,
        job_id: &str,
        reason: Option<Reason>,
    ) -> Result<(), StoreError> {
        let now = Instant::now();
        let kind = |r: &Option<Reason>| r.as_ref().map(|r| (r.signal, r.phase));
        if kind(&state.reported) == kind(&reason)
            && (reason.is_none() || now.duration_since(state.reported_at) < REPORT_EVERY)
        {
            return Ok(());
        }
        let spent = now.duration_since(state.reported_at).as_secs_f64();
        let (mut foreground_seconds, mut lag_seconds) = (0.0, 0.0);
        match state.reported.as_ref().map(|r| r.signal) {
            Some(Signal::Foreground) => foreground_seconds = spent,
            Some(Signal::Lag) => lag_seconds = spent,
            None => {}
        }
        match (&state.reported, &reason) {
            (None, Some(why)) => {
                tracing::info!(worker = %self.worker, job = %job_id, reason = %why.text, "rotation throttled")
            }
            (Some(_), None) => {
                tracing::info!(worker = %self.worker, job = %job_id, "rotation no longer throttled")
            }
            _ => {}
        }
        self.store
            .report_throttle(
                job_id,
                &ThrottleReport {
                    worker: &self.worker,
                    reason: reason.as_ref().map(|why| why.text.as_str()),
                    holds_for: REPORT_HOLDS,
                    foreground_seconds,
                    lag_seconds,
                },
            )
            .await?;
        state.reported = reason;
        state.reported_at = now;
        Ok(())
    }
}
