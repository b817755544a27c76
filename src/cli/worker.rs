//! `keyward worker`: the rotation worker alone, and the worker and replica
//! settings `serve` shares with it.

use std::{process::ExitCode, time::Duration};

use clap::Args;

use super::{hangup_signals, open, shutdown_signal, GlobalArgs};
use crate::{
    rotation::worker::WorkerOptions,
    service::{readiness::Readiness, replica::ReplicaOptions},
    store::replicas::ReplicaKind,
};

/// The rotation worker's tuning, in `serve` (its in-process worker) and
/// `worker`.
#[derive(Debug, Args)]
pub(super) struct WorkerArgs {
    /// Seconds a claimed batch stays this worker's; a crashed worker's
    /// batch is taken over after this.
    #[arg(long, env = "KEYWARD_WORKER_LEASE_SECS", default_value_t = crate::rotation::worker::WorkerOptions::default().lease.as_secs())]
    lease_secs: u64,
    /// Milliseconds between polls of an empty queue.
    #[arg(long, env = "KEYWARD_WORKER_POLL_MS", default_value_t = super::millis(crate::rotation::worker::WorkerOptions::default().idle_poll))]
    poll_ms: u64,
}

/// Heartbeat and catalog following, in `serve` and `worker`.
#[derive(Debug, Args)]
pub(super) struct ReplicaArgs {
    /// Seconds between this process's heartbeats into keyward_replicas; it
    /// counts as gone after three missed.
    #[arg(long, env = "KEYWARD_HEARTBEAT_SECS", default_value_t = crate::service::replica::ReplicaOptions::default().heartbeat.as_secs())]
    heartbeat_secs: u64,
    /// Milliseconds between checks of the catalog version (PostgreSQL also
    /// announces changes at once with LISTEN/NOTIFY).
    #[arg(long, env = "KEYWARD_CATALOG_POLL_MS", default_value_t = super::millis(crate::service::replica::ReplicaOptions::default().catalog_poll))]
    catalog_poll_ms: u64,
    /// Do not LISTEN for catalog changes on PostgreSQL (e.g. behind a
    /// connection pooler in transaction mode); the version poll remains.
    #[arg(long, env = "KEYWARD_NO_CATALOG_LISTEN", value_parser = clap::builder::BoolishValueParser::new())]
    no_catalog_listen: bool,
    /// Seconds between checks of each non-retired key by this process (a
    /// KMS round trip and its probe, jittered by up to a tenth more); the
    /// heartbeat carries the results. The active key is checked at every
    /// heartbeat while it fails.
    #[arg(long, env = "KEYWARD_KEY_CHECK_SECS", default_value_t = crate::service::probes::DEFAULT_KEY_CHECK.as_secs())]
    key_check_secs: u64,
}

impl ReplicaArgs {
    pub(super) fn options(&self) -> ReplicaOptions {
        ReplicaOptions {
            heartbeat: Duration::from_secs(self.heartbeat_secs.max(1)),
            catalog_poll: Duration::from_millis(self.catalog_poll_ms.max(50)),
            listen: !self.no_catalog_listen,
            key_check: Duration::from_secs(self.key_check_secs.max(1)),
        }
    }
}

impl WorkerArgs {
    /// On shutdown a batch in flight gets half the grace period to finish;
    /// the other half is for abandoning it (releasing its lease) and the
    /// rest of the shutdown.
    pub(super) fn options(&self, shutdown_grace: Duration) -> WorkerOptions {
        WorkerOptions {
            lease: Duration::from_secs(self.lease_secs.max(1)),
            idle_poll: Duration::from_millis(self.poll_ms.max(10)),
            batch_grace: shutdown_grace / 2,
        }
    }
}

#[derive(Debug, Args)]
pub(super) struct StandaloneWorkerArgs {
    #[command(flatten)]
    worker: WorkerArgs,
    /// Seconds the worker gets to stop after SIGTERM/SIGINT: the batch in
    /// flight finishes within half of it or is abandoned, and the lease is
    /// released at once either way.
    #[arg(long, env = "KEYWARD_SHUTDOWN_GRACE_SECS", default_value_t = crate::config::DEFAULT_SHUTDOWN_GRACE.as_secs())]
    shutdown_grace_secs: u64,
    #[command(flatten)]
    replica: ReplicaArgs,
}

pub(super) async fn worker(
    global: &GlobalArgs,
    args: StandaloneWorkerArgs,
) -> anyhow::Result<ExitCode> {
    let mut hangups = hangup_signals()?;
    let services = open(global).await?;
    let grace = Duration::from_secs(args.shutdown_grace_secs);
    // The worker's one reloadable part is the key catalog.
    let admin = std::sync::Arc::clone(&services.admin);
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            tracing::info!("SIGHUP received: reloading the key catalog");
            if let Err(err) = admin.refresh().await {
                tracing::error!(error = %err, "reload failed; keeping the catalog that was loaded");
            }
        }
    });
    let worker = services.worker(args.worker.options(grace));
    let stop = tokio_util::sync::CancellationToken::new();
    let signal_stop = stop.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        signal_stop.cancel();
    });
    announce_when_ready(services.admin.readiness());
    let agent = services.replica_agent(ReplicaKind::Worker, None, args.replica.options());
    let agent = tokio::spawn(agent.run(stop.clone()));
    let work = async {
        worker.run(stop.clone()).await;
        let _ = agent.await;
        services.store.close().await;
    };
    // Once stopped, the worker claims nothing more; what it still has to
    // say to the database (a lease to release, its heartbeat row) gets the
    // shutdown grace, then the process goes anyway: with the database
    // down, each of those would wait out the pool's acquire timeout, and a
    // lease left behind expires on its own.
    let deadline = async {
        stop.cancelled().await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        () = work => {}
        () = deadline => tracing::warn!(
            grace_secs = grace.as_secs(),
            "the worker's cleanup did not finish within the shutdown grace (is the database \
             reachable?): exiting; a lease it held expires on its own"
        ),
    }
    Ok(ExitCode::SUCCESS)
}

/// Logs the runbook's start-up line (§2.2) once this worker can use the
/// keys, as `serve` does: the line operators look for in every pod.
fn announce_when_ready(mut readiness: tokio::sync::watch::Receiver<Readiness>) {
    tokio::spawn(async move {
        loop {
            if *readiness.borrow_and_update() == Readiness::Ready {
                tracing::info!("🔐 Encryption service initialized successfully");
                return;
            }
            if readiness.changed().await.is_err() {
                return;
            }
        }
    });
}
