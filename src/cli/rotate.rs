//! `keyward rotate …` and `prune-tokens`: re-encryption jobs (runbook
//! §1.4, §1.5) and the clean-up after them (§1.6).

use std::process::ExitCode;

use anyhow::bail;
use clap::{Subcommand, ValueEnum};

use super::{
    audit::{audited, operator_audit_if, OperatorAudit},
    open, GlobalArgs,
};
use crate::{
    rotation::{JobStatus, Mode, RotationJob},
    service::rotation::{Retune, Rotations, StartRotation},
};

#[derive(Debug, Subcommand)]
pub(super) enum RotateCommand {
    /// Queue a job moving every connections row to the target key.
    Start {
        /// Target key (key_id or id); default the active key.
        #[arg(long)]
        target: Option<String>,
        /// reencrypt (fresh data key) or rewrap (data key re-wrapped only).
        #[arg(long, value_enum, default_value_t = RotateMode::Reencrypt)]
        mode: RotateMode,
        /// Decrypt-verify every row and write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Rows per batch (1..10000); 0 (the default): adaptive, each batch
        /// sized to take about --target-batch-ms.
        #[arg(long, default_value_t = 0)]
        batch_size: i64,
        /// What an adaptive batch aims to take, in ms (10..60000); 0: 250.
        #[arg(long, default_value_t = 0)]
        target_batch_ms: i64,
        /// Rows per second per worker; 0 = unthrottled.
        #[arg(long, default_value_t = 0)]
        max_rows_per_second: i64,
        /// The latency budget: slow down while any serve replica's
        /// Encrypt/Decrypt p99 is over this many ms, stop claiming while it
        /// is over twice it; 0 = none.
        #[arg(long, default_value_t = 0.0)]
        max_foreground_p99_ms: f64,
        /// With a budget: rows per second per worker kept even over it
        /// (breaking it on purpose); 0 = the job may pause.
        #[arg(long, default_value_t = 0)]
        min_rows_per_second: i64,
        /// PostgreSQL: claim nothing while a standby replays further behind
        /// than this many ms (or its lag cannot be read); 0 = none.
        #[arg(long, default_value_t = 0)]
        max_replication_lag_ms: i64,
        /// Follow progress until the job ends; exit 0 only if it completed cleanly.
        #[arg(long)]
        watch: bool,
    },
    /// Follow a job's progress until it ends.
    Watch { job_id: String },
    /// Show one job.
    Status { job_id: String },
    /// List jobs, newest first.
    List {
        #[arg(long, default_value_t = 20)]
        limit: i64,
    },
    /// Cancel a job (a running one stops between batches).
    Cancel { job_id: String },
    /// Put a failed or cancelled job back in the queue.
    Requeue { job_id: String },
    /// Pause a pending or running job: it claims no batch (one in flight
    /// finishes), holds no lease and keeps its counts.
    Pause { job_id: String },
    /// Resume a paused job where it stopped.
    Resume { job_id: String },
    /// Change a pending or running job's batch size or row rate from its
    /// next batch on.
    Update {
        job_id: String,
        /// Rows per batch (1..10000; 0: adaptive).
        #[arg(long)]
        batch_size: Option<i64>,
        /// Rows per second per worker; 0 lifts the limit.
        #[arg(long)]
        max_rows_per_second: Option<i64>,
        /// What an adaptive batch aims to take, in ms; 0: 250.
        #[arg(long)]
        target_batch_ms: Option<i64>,
        /// The latency budget in ms; 0 lifts it.
        #[arg(long)]
        max_foreground_p99_ms: Option<f64>,
        /// The rate kept over the budget; 0 lifts it.
        #[arg(long)]
        min_rows_per_second: Option<i64>,
        /// The replication-lag limit in ms; 0 lifts it.
        #[arg(long)]
        max_replication_lag_ms: Option<i64>,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(super) enum RotateMode {
    Reencrypt,
    Rewrap,
}

pub(super) async fn rotate(global: &GlobalArgs, cmd: RotateCommand) -> anyhow::Result<ExitCode> {
    let changes = matches!(
        cmd,
        RotateCommand::Start { .. }
            | RotateCommand::Cancel { .. }
            | RotateCommand::Requeue { .. }
            | RotateCommand::Pause { .. }
            | RotateCommand::Resume { .. }
            | RotateCommand::Update { .. }
    );
    let audit = operator_audit_if(global, changes)?;
    let services = open(global).await?;
    let rotations = &services.rotations;
    match cmd {
        RotateCommand::Start {
            target,
            mode,
            dry_run,
            batch_size,
            max_rows_per_second,
            target_batch_ms,
            max_foreground_p99_ms,
            min_rows_per_second,
            max_replication_lag_ms,
            watch,
        } => {
            let target = target.unwrap_or_default();
            let detail = format!("mode={mode:?} dry_run={dry_run}");
            let start = rotations.start(StartRotation {
                target: target.clone(),
                mode: Some(match mode {
                    RotateMode::Reencrypt => Mode::Reencrypt,
                    RotateMode::Rewrap => Mode::Rewrap,
                }),
                dry_run,
                batch_size,
                max_rows_per_second,
                target_batch_ms,
                max_foreground_p99_ms,
                min_rows_per_second,
                max_replication_lag_ms,
            });
            let key_id = Some(target.as_str()).filter(|t| !t.is_empty());
            let job = audited(&audit, "cli/rotate start", key_id, detail, start).await?;
            println!("Rotation job started: {}", job.id);
            if watch {
                return watch_job(rotations, &job.id).await;
            }
            Ok(ExitCode::SUCCESS)
        }
        RotateCommand::Watch { job_id } => watch_job(rotations, &job_id).await,
        RotateCommand::Status { job_id } => {
            let job = rotations.get(&job_id).await?;
            print_jobs(std::slice::from_ref(&job));
            if let Some(reason) = job.throttle_reason(chrono::Utc::now()) {
                println!("throttled: {reason}");
            }
            Ok(ExitCode::SUCCESS)
        }
        RotateCommand::List { limit } => {
            print_jobs(&rotations.list(limit).await?);
            Ok(ExitCode::SUCCESS)
        }
        RotateCommand::Cancel { job_id } => {
            let cancel = rotations.cancel(&job_id);
            print_changed_job(&audit, "cli/rotate cancel", &job_id, cancel).await
        }
        RotateCommand::Requeue { job_id } => {
            let requeue = rotations.requeue(&job_id);
            print_changed_job(&audit, "cli/rotate requeue", &job_id, requeue).await
        }
        RotateCommand::Pause { job_id } => {
            let pause = rotations.set_paused(&job_id, true);
            print_changed_job(&audit, "cli/rotate pause", &job_id, pause).await
        }
        RotateCommand::Resume { job_id } => {
            let resume = rotations.set_paused(&job_id, false);
            print_changed_job(&audit, "cli/rotate resume", &job_id, resume).await
        }
        RotateCommand::Update {
            job_id,
            batch_size,
            max_rows_per_second,
            target_batch_ms,
            max_foreground_p99_ms,
            min_rows_per_second,
            max_replication_lag_ms,
        } => {
            let tune = rotations.tune(
                &job_id,
                Retune {
                    batch_size,
                    max_rows_per_second,
                    target_batch_ms,
                    max_foreground_p99_ms,
                    min_rows_per_second,
                    max_replication_lag_ms,
                },
            );
            print_changed_job(&audit, "cli/rotate update", &job_id, tune).await
        }
    }
}

/// Runs an audited change of job `job_id` and prints the job it leaves.
async fn print_changed_job(
    audit: &Option<OperatorAudit>,
    command: &'static str,
    job_id: &str,
    change: impl std::future::Future<Output = crate::error::Result<RotationJob>>,
) -> anyhow::Result<ExitCode> {
    let job = audited(audit, command, None, format!("job_id={job_id}"), change).await?;
    print_jobs(&[job]);
    Ok(ExitCode::SUCCESS)
}

/// A live progress bar until the job ends; the exit status says whether
/// it completed cleanly.
pub(super) async fn watch_job(rotations: &Rotations, job_id: &str) -> anyhow::Result<ExitCode> {
    use futures::StreamExt;
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} [{bar:40}] {pos}/{len} rows  {msg}")?
            .progress_chars("=> "),
    );
    let mut events = Box::pin(rotations.watch(job_id).await?);
    let mut last = None;
    while let Some(event) = events.next().await {
        let progress = event?;
        let job = &progress.job;
        bar.set_length(job.counts.total.max(job.counts.processed).max(0) as u64);
        bar.set_position(job.counts.processed.max(0) as u64);
        let eta = progress
            .eta_seconds
            .map(|s| format!("eta {s:.0}s"))
            .unwrap_or_else(|| "eta -".into());
        // Like gh-ost's `State: throttled, lag=0.51s`.
        let state = job
            .throttle_reason(chrono::Utc::now())
            .map(|reason| format!("  throttled: {reason}"))
            .unwrap_or_default();
        bar.set_message(format!(
            "{} pass {}  {:.0} rows/s  {eta}  failed {}{state}",
            job.shown_status(),
            job.pass,
            progress.rows_per_second,
            job.counts.failed
        ));
        last = Some(progress);
    }
    bar.finish();
    let Some(last) = last else {
        bail!("the watch ended without an event");
    };
    let job = last.job;
    println!(
        "job {}: {} — total {}, processed {}, succeeded {}, failed {}, skipped {}, late {}{}",
        job.id,
        job.status,
        job.counts.total,
        job.counts.processed,
        job.counts.succeeded,
        job.counts.failed,
        job.counts.skipped,
        job.counts.late,
        job.last_error
            .map(|e| format!("; last error: {e}"))
            .unwrap_or_default()
    );
    Ok(if job.status == JobStatus::Completed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub(super) fn print_jobs(jobs: &[RotationJob]) {
    println!(
        "{:<36}  {:<22}  {:<9}  {:>4}  {:>8}  {:>9}  {:>8}  {:>7}  {:>7}  {:>5}  LAST_ERROR",
        "ID",
        "STATUS",
        "MODE",
        "PASS",
        "TOTAL",
        "PROCESSED",
        "SUCCEEDED",
        "FAILED",
        "SKIPPED",
        "LATE"
    );
    for j in jobs {
        println!(
            "{:<36}  {:<22}  {:<9}  {:>4}  {:>8}  {:>9}  {:>8}  {:>7}  {:>7}  {:>5}  {}",
            j.id,
            format!(
                "{}{}",
                j.shown_status(),
                if j.dry_run { " (dry run)" } else { "" }
            ),
            j.mode.as_str(),
            j.pass,
            j.counts.total,
            j.counts.processed,
            j.counts.succeeded,
            j.counts.failed,
            j.counts.skipped,
            j.counts.late,
            j.last_error.as_deref().unwrap_or("")
        );
    }
}

#[derive(Debug, clap::Args)]
pub(super) struct PruneArgs {
    /// List the expired or used tokens a prune would remove; remove nothing.
    #[arg(long)]
    dry_run: bool,
}

pub(super) async fn prune_tokens(global: &GlobalArgs, args: PruneArgs) -> anyhow::Result<ExitCode> {
    let services = open(global).await?;
    if args.dry_run {
        let aged = services.rotations.aged_scoped_tokens().await?;
        println!(
            "{:<38} {:<38} {:<34} {:<34}",
            "ID", "CONNECTION_ID", "EXPIRES_AT", "USED_AT"
        );
        for token in &aged {
            println!(
                "{:<38} {:<38} {:<34} {:<34}",
                token.id,
                token.connection_id,
                token.expires_at,
                token.used_at.as_deref().unwrap_or("-")
            );
        }
        println!(
            "{} expired or used scoped tokens would be removed",
            aged.len()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let removed = services.rotations.prune_scoped_tokens().await?;
    println!("removed {removed} expired or used scoped tokens");
    Ok(ExitCode::SUCCESS)
}
