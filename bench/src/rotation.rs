//! `keyward-bench rotation`: how fast a rotation moves rows, against the
//! database's own floor, and what it does to Encrypt latency meanwhile.
//!
//! On the database given by `--database-url` (an empty PostgreSQL database
//! is the intended target) it:
//! 1. writes `--rows` envelopes (`--payload-bytes` each) under a fresh key;
//! 2. times one `UPDATE` setting every one of those rows to the new key record
//!    and rewriting its envelope columns: the floor no row-by-row rotation
//!    can beat (it changes the indexed key column, as a rotation does);
//! 3. measures Encrypt p50/p99 on an idle server (closed loop,
//!    `--load-concurrency` callers);
//! 4. activates a second key and rotates every row (REENCRYPT, local KMS)
//!    with `--workers` in-process workers while the same Encrypt load runs;
//! 5. verifies every row is on the new key and a sample decrypts, and
//!    removes what it wrote.

use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::Args;
use hdrhistogram::Histogram;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use keyward::{
    app::Application,
    config::{MasterSecrets, Settings},
    crypto::{context::EncryptionContext, secret::MasterSecret},
    rotation::{worker::WorkerOptions, JobStatus, Mode},
    service::{
        admin::{CreateKey, Staging},
        crypto::Ciphertext,
        rotation::StartRotation,
    },
};
use keyward_client::proto::{crypto_client::CryptoClient, EncryptRequest, EnvelopeForm};

use crate::{
    rows::{self, Rows, Run},
    DatabaseArgs,
};

#[derive(Debug, Clone, Args)]
pub struct RotationArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Rows to write and rotate.
    #[arg(long, default_value_t = 1_000_000)]
    pub rows: usize,
    /// Plaintext bytes per row.
    #[arg(long, default_value_t = 300)]
    pub payload_bytes: usize,
    /// Rows per rotation batch.
    #[arg(long, default_value_t = 1000)]
    pub batch_size: i64,
    /// Rotation workers in this process.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Concurrent Encrypt callers during the idle and the rotation phases.
    #[arg(long, default_value_t = 4)]
    pub load_concurrency: usize,
    /// Seconds of idle Encrypt load measured before the rotation.
    #[arg(long, default_value_t = 5.0)]
    pub idle_seconds: f64,
}

pub async fn run(args: RotationArgs) -> anyhow::Result<()> {
    let database_url = args.database.database_url.as_str();
    let master = MasterSecrets {
        current: MasterSecret::new(MasterSecret::generate_hex().as_bytes())?,
        previous: vec![],
        legacy: Default::default(),
    };
    rows::refuse_a_live_database(database_url).await?;
    let mut settings = Settings::for_database(database_url, Some(master));
    settings.worker = None;
    let app = Application::build(settings).await?;
    let services = app.services().clone();
    let rows = Rows::connect(database_url).await?;
    let addr = app.local_addr()?;
    let stop_server = CancellationToken::new();
    let server = tokio::spawn({
        let stop = stop_server.clone();
        app.run_until_stopped(async move { stop.cancelled().await })
    });
    let run = Run::begin(&services, "bench").await?;
    let measured = measure(&args, &services, &rows, &run, addr).await;
    // Whatever happened, the run's rows, keys and job go.
    let removed = rows.remove(&run).await;
    stop_server.cancel();
    server.await??;
    let report = measured?;
    removed?;
    report.print();
    Ok(())
}

/// What the rotation benchmark measured.
struct Report {
    floor_rate: f64,
    rotation_rate: f64,
    idle: LoadResult,
    busy: LoadResult,
    passes: i64,
    processed: i64,
}

/// Steps 1 to 5 of a run (see `run`).
async fn measure(
    args: &RotationArgs,
    services: &keyward::app::Services,
    rows: &Rows,
    run: &Run,
    addr: std::net::SocketAddr,
) -> anyhow::Result<Report> {
    let Run {
        id: run_id,
        prefix,
        old_key,
        ..
    } = run;
    println!(
        "keyward-bench rotation: {} rows of {} bytes, batch {}, {} workers, {:?} backend",
        args.rows,
        args.payload_bytes,
        args.batch_size,
        args.workers,
        services.store.backend()
    );

    // 1. The table.
    let started = Instant::now();
    let plaintext = vec![0x42u8; args.payload_bytes.max(1)];
    rows.write(services, old_key, prefix, args.rows, |_| plaintext.clone())
        .await?;
    println!(
        "wrote {} rows in {:.1} s",
        args.rows,
        started.elapsed().as_secs_f64()
    );

    // 2. The floor: one statement moving every row to the new key record and
    // rewriting the envelope columns, as the rotation must (changing the
    // indexed key column rules out HOT updates for both), then moving them
    // back untimed.
    let new_key = services
        .admin
        .create_key(CreateKey {
            key_id: format!("bench-new-{run_id}"),
            ..CreateKey::default()
        })
        .await?;
    let started = Instant::now();
    let touched = rows.rewrite_in_place(prefix, &new_key.id).await?;
    let floor_secs = started.elapsed().as_secs_f64();
    let floor_rate = touched as f64 / floor_secs;
    rows.rewrite_in_place(prefix, &old_key.id).await?;
    rows.vacuum().await?;

    // 3. Idle Encrypt latency.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    let idle = encrypt_load(
        channel.clone(),
        args.load_concurrency,
        Duration::from_secs_f64(args.idle_seconds),
        None,
    )
    .await?;

    // 4. Rotate under load.
    let new_key = services
        .admin
        .activate_key(&new_key.id, Staging::Immediate)
        .await?
        .activated;
    let job = services
        .rotations
        .start(StartRotation {
            target: new_key.key_id.clone(),
            mode: Some(Mode::Reencrypt),
            batch_size: args.batch_size,
            ..StartRotation::default()
        })
        .await?;
    let stop_workers = CancellationToken::new();
    let started = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..args.workers.max(1) {
        let worker = services.worker(WorkerOptions {
            lease: Duration::from_secs(60),
            idle_poll: Duration::from_millis(20),
            ..WorkerOptions::default()
        });
        let stop = stop_workers.clone();
        handles.push(tokio::spawn(async move { worker.run(stop).await }));
    }
    let rotation_done = CancellationToken::new();
    let load = tokio::spawn(encrypt_load(
        channel.clone(),
        args.load_concurrency,
        Duration::from_secs(3600),
        Some(rotation_done.clone()),
    ));
    let final_job = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let current = services.rotations.get(&job.id).await?;
        if current.status.is_terminal() {
            break current;
        }
    };
    let rotation_secs = started.elapsed().as_secs_f64();
    rotation_done.cancel();
    stop_workers.cancel();
    for handle in handles {
        handle.await?;
    }
    let busy = load.await??;
    if final_job.status != JobStatus::Completed {
        bail!(
            "rotation ended {}: {:?}",
            final_job.status,
            final_job.last_error
        );
    }
    let rotation_rate = final_job.counts.succeeded as f64 / rotation_secs;

    // 5. Verify and clean up.
    let remaining = rows.count_off_key(prefix, &new_key.id).await?;
    if remaining != 0 {
        bail!("{remaining} rows are not on the new key");
    }
    let sample = format!("{prefix}{:09}", args.rows / 2);
    let row = rows
        .envelope(&sample)
        .await?
        .context("sample row missing")?;
    let context = EncryptionContext::from_pairs([("connection_id", sample.as_str())])?;
    let opened = services
        .crypto
        .decrypt(Ciphertext::Envelope(row), &context)
        .await?;
    if opened.plaintext.as_bytes() != plaintext.as_slice() {
        bail!("the sample row decrypted to something else");
    }
    Ok(Report {
        floor_rate,
        rotation_rate,
        idle,
        busy,
        passes: final_job.pass,
        processed: final_job.counts.processed,
    })
}

impl Report {
    fn print(&self) {
        let Report {
            floor_rate,
            rotation_rate,
            idle,
            busy,
            passes,
            processed,
        } = self;
        println!("\n{:<46} {:>12}", "measure", "value");
        println!(
            "{:<46} {:>12.0}",
            "floor: one UPDATE of the same columns, rows/s", floor_rate
        );
        println!(
            "{:<46} {:>12.0}",
            "rotation (REENCRYPT, local KMS), rows/s", rotation_rate
        );
        println!(
            "{:<46} {:>12.2}",
            "rotation / floor",
            rotation_rate / floor_rate
        );
        println!("{:<46} {:>12.3}", "Encrypt p99 idle, ms", idle.p99_ms);
        println!(
            "{:<46} {:>12.3}",
            "Encrypt p99 during rotation, ms", busy.p99_ms
        );
        println!(
            "{:<46} {:>12.2}",
            "p99 during / idle",
            busy.p99_ms / idle.p99_ms
        );
        println!(
            "{:<46} {:>12}",
            "rotation passes / rows processed",
            format!("{passes} / {processed}")
        );
    }
}

struct LoadResult {
    p99_ms: f64,
}

/// Closed-loop Encrypt callers until `duration` passes or `stop` fires.
async fn encrypt_load(
    channel: tonic::transport::Channel,
    concurrency: usize,
    duration: Duration,
    stop: Option<CancellationToken>,
) -> anyhow::Result<LoadResult> {
    let deadline = Instant::now() + duration;
    let stop = stop.unwrap_or_default();
    let mut tasks = Vec::new();
    for task in 0..concurrency.max(1) {
        let mut client = CryptoClient::new(channel.clone());
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
            let request = EncryptRequest {
                plaintext: vec![7u8; 300].into(),
                context: [("connection_id".to_owned(), format!("load-{task}"))].into(),
                form: EnvelopeForm::Blob as i32,
            };
            while Instant::now() < deadline && !stop.is_cancelled() {
                let t = Instant::now();
                client.encrypt(request.clone()).await?;
                hist.saturating_record(u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX));
            }
            anyhow::Ok(hist)
        }));
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for task in tasks {
        hist.add(task.await??)?;
    }
    Ok(LoadResult {
        p99_ms: hist.value_at_quantile(0.99) as f64 / 1000.0,
    })
}
