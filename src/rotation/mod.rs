//! Rotation: re-encrypting every stored secret to the active key without
//! downtime (runbook §1.4–§1.6).
//!
//! A job is a row of `encryption_rotation_jobs` (the runbook's
//! `encryption.rotate` queue). Workers ([`worker::Worker`]) claim batches of
//! `connections` rows under an expiring lease, re-encrypt (or rewrap) them
//! outside any transaction, and write them back with a compare-and-swap on
//! the old ciphertext. Passes repeat until no row is left off the target key.

pub mod brake;
pub mod definition;
pub mod pass;
pub mod sizing;
pub mod target;
pub mod throttle;
pub mod worker;

use std::fmt;

use chrono::{DateTime, Utc};

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobStatus {
    /// Queued; no worker has started it (the runbook's "worker offline").
    Pending,
    Running,
    Completed,
    /// Finished, but some rows could not be rotated (see `last_error`).
    CompletedWithErrors,
    /// Stopped outright (e.g. its target key is unusable); can be requeued.
    Failed,
    Cancelled,
}

impl JobStatus {
    pub const ALL: [JobStatus; 6] = [
        Self::Pending,
        Self::Running,
        Self::Completed,
        Self::CompletedWithErrors,
        Self::Failed,
        Self::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Completed => "completed",
            Self::CompletedWithErrors => "completed_with_errors",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// No worker will touch the job again (unless it is requeued).
    pub fn is_terminal(self) -> bool {
        !matches!(self, Self::Pending | Self::Running)
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `pad`, so a width in the format string (the CLI's tables) applies.
        f.pad(self.as_str())
    }
}

/// How rows are moved to the target key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Decrypt, then encrypt under a fresh data key and the target key.
    Reencrypt,
    /// Only re-wrap the data key under the target key; the payload is
    /// untouched. Legacy rows have no data key and are re-encrypted.
    Rewrap,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Reencrypt => "reencrypt",
            Mode::Rewrap => "rewrap",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Mode::Reencrypt, Mode::Rewrap]
            .into_iter()
            .find(|m| m.as_str() == s)
    }
}

/// Row counters of a job.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Rows to rotate (grows when a later pass finds late rows).
    pub total: i64,
    pub processed: i64,
    pub succeeded: i64,
    pub failed: i64,
    /// Rows an application rewrote while the job held them: left alone.
    pub skipped: i64,
    /// Rows a later pass caught that were written off target while the
    /// job ran (a replica still encrypting with an older key).
    pub late: i64,
}

/// What a job slows down for (each `None`: no such limit).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Limits {
    /// The Encrypt/Decrypt p99 (ms) no live serve replica may exceed: the
    /// latency budget. Workers slow down while one does, and stop claiming
    /// while one is well over it.
    pub max_foreground_p99_ms: Option<f64>,
    /// With a budget: the rate (rows per second per worker) the job keeps
    /// even over it, breaking the budget on purpose.
    pub min_rows_per_second: Option<i64>,
    /// The replay lag (ms) no streaming standby may exceed (PostgreSQL):
    /// workers claim nothing while one does, or while it cannot be read.
    pub max_replication_lag_ms: Option<i64>,
}

impl Limits {
    /// Whether workers have anything to watch.
    pub fn any(&self) -> bool {
        self.max_foreground_p99_ms.is_some() || self.max_replication_lag_ms.is_some()
    }
}

/// Why a job runs slower than it could, as its workers last said.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Throttle {
    /// e.g. `foreground p99 2.4 ms > budget 1.0 ms on replica X`.
    pub reason: Option<String>,
    /// The reason holds until then unless a worker says it again (a worker
    /// that died does not leave its job throttled).
    pub until: Option<DateTime<Utc>>,
    /// Worker-seconds spent throttled on the latency budget.
    pub foreground_seconds: f64,
    /// Worker-seconds spent throttled on replication lag.
    pub lag_seconds: f64,
}

/// One rotation job.
#[derive(Debug, Clone, PartialEq)]
pub struct RotationJob {
    pub id: String,
    pub status: JobStatus,
    /// `encryption_keys.id` of the key rows move to.
    pub target_key_id: String,
    pub mode: Mode,
    pub dry_run: bool,
    /// Rows per batch; 0: adaptive (`sizing`).
    pub batch_size: i64,
    pub max_rows_per_second: Option<i64>,
    /// What an adaptive batch aims to take, in ms; `None`: 250.
    pub target_batch_ms: Option<i64>,
    pub counts: Counts,
    pub pass: i64,
    pub last_error: Option<String>,
    pub cancel_requested: bool,
    /// Paused by an operator: no batch is claimed until it is resumed.
    pub paused: bool,
    pub limits: Limits,
    pub throttle: Throttle,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    /// What every data key the job wraps under its target key begins with
    /// ([`crate::crypto::kms::KmsProvider::wrap_tag`]); rows on the target
    /// key without it are rewrapped too (a master-secret rollover).
    pub wrap_tag: Option<Vec<u8>>,
}

/// Options of a new job.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub target_key_id: String,
    pub mode: Mode,
    pub dry_run: bool,
    pub batch_size: i64,
    pub max_rows_per_second: Option<i64>,
    pub target_batch_ms: Option<i64>,
    pub limits: Limits,
    /// See [`RotationJob::wrap_tag`].
    pub wrap_tag: Option<Vec<u8>>,
}

/// Rows of an adaptive job's first batch (and what a job's batch size
/// defaulted to before batches were adaptive).
pub const DEFAULT_BATCH_SIZE: i64 = 500;
/// Largest batch a job may ask for.
pub const MAX_BATCH_SIZE: i64 = 10_000;

/// The encryption context of a `connections` row: derived from the row
/// itself, so the worker can decrypt without the application and a
/// ciphertext copied into another row fails. Applications must encrypt
/// connection credentials with exactly this context.
pub const CONNECTION_CONTEXT_KEY: &str = "connection_id";

impl RotationJob {
    /// The status as operators see it: `paused` for a paused job that has
    /// not ended.
    pub fn shown_status(&self) -> &'static str {
        if self.paused && !self.status.is_terminal() {
            "paused"
        } else {
            self.status.as_str()
        }
    }

    /// Why the job is slower than it could be at `now`, if it is: paused
    /// by an operator, or throttled by its workers.
    pub fn throttle_reason(&self, now: DateTime<Utc>) -> Option<&str> {
        if self.status.is_terminal() {
            return None;
        }
        if self.paused {
            return Some("paused");
        }
        match (&self.throttle.reason, self.throttle.until) {
            (Some(reason), Some(until)) if until > now => Some(reason),
            _ => None,
        }
    }
}

#[cfg(test)]
impl RotationJob {
    /// A running REENCRYPT job `id` to key record `target_key_id`, for unit
    /// tests.
    pub(crate) fn running_for_test(id: &str, target_key_id: &str) -> Self {
        Self {
            id: id.into(),
            status: JobStatus::Running,
            target_key_id: target_key_id.into(),
            mode: Mode::Reencrypt,
            dry_run: false,
            batch_size: 500,
            max_rows_per_second: None,
            target_batch_ms: None,
            counts: Counts::default(),
            pass: 1,
            last_error: None,
            cancel_requested: false,
            paused: false,
            limits: Limits::default(),
            throttle: Throttle::default(),
            created_at: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
            started_at: None,
            completed_at: None,
            wrap_tag: None,
        }
    }
}
