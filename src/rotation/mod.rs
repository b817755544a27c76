//! Rotation: re-encrypting every stored secret to the active key without
//! downtime (runbook §1.4–§1.6).
//!
//! A job is a row of `encryption_rotation_jobs` (the runbook's
//! `encryption.rotate` queue). Workers ([`worker::Worker`]) claim batches of
//! `connections` rows under an expiring lease, re-encrypt (or rewrap) them
//! outside any transaction, and write them back with a compare-and-swap on
//! the old ciphertext. Passes repeat until no row is left off the target key.

pub mod definition;
pub mod pass;
pub mod sizing;
pub mod target;
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

/// One rotation job.
#[derive(Debug, Clone, PartialEq, Eq)]
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
            created_at: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
            started_at: None,
            completed_at: None,
            wrap_tag: None,
        }
    }
}
