//! `keyward-bench rotation`: how fast a rotation moves rows, against the
//! database's own floor, and what it does to Encrypt latency meanwhile,
//! without a latency budget and within one.
//!
//! On the database given by `--database-url` (an empty PostgreSQL database
//! is the intended target) it:
//! 1. writes `--rows` envelopes (`--payload-bytes` each) under a fresh key;
//! 2. the floor: times one `UPDATE` setting every one of those rows to a new
//!    key record and rewriting its envelope columns, which no row-by-row
//!    rotation can beat (it changes the indexed key column, as a rotation
//!    does), then moves them back untimed;
//! 3. idle: Encrypt p99 on the idle server;
//! 4. no budget: activates a new key and rotates every row (REENCRYPT,
//!    local KMS) with `--workers` in-process workers;
//! 5. each `--budgets` multiple of the idle p99: activates a new key and
//!    rotates with that latency budget for at most `--budget-seconds`,
//!    sampling whether the job is throttled every 100 ms;
//! 6. verifies every row is on the last key and a sample decrypts, and
//!    removes what it wrote.
//!
//! Every phase runs `--repeats` times and every run is reported. Latency
//! is measured the same way in every phase by `keyward-bench load`, a
//! child process calling Encrypt at a fixed rate (`--load-rate`): the
//! budget holds only if the callers see it, not if the server says so.

use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::Args;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use keyward::{
    app::{Application, Services},
    config::{MasterSecrets, Settings},
    crypto::{context::EncryptionContext, secret::MasterSecret},
    keys::KeyRecord,
    rotation::{worker::WorkerOptions, Mode, RotationJob},
    service::{
        admin::{CreateKey, Staging},
        crypto::Ciphertext,
        rotation::StartRotation,
    },
};

use crate::{
    load::{LoadChild, LoadResult},
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
    /// Rows per rotation batch; 0: adaptive (the default of StartRotation).
    #[arg(long, default_value_t = 0)]
    pub batch_size: i64,
    /// Rotation workers in this process.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Encrypt calls per second of the load generator, in every phase.
    #[arg(long, default_value_t = 1500)]
    pub load_rate: u32,
    /// Seconds of each idle measurement.
    #[arg(long, default_value_t = 5.0)]
    pub idle_seconds: f64,
    /// Runs of each phase.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Latency budgets to rotate within, as multiples of the idle p99
    /// (the median of the idle runs); `--budgets` alone: only the
    /// unbudgeted rotation.
    #[arg(long, value_delimiter = ',', num_args = 0.., default_value = "2,1.5")]
    pub budgets: Vec<f64>,
    /// How long a budgeted rotation runs at most (it is then cancelled;
    /// its rows per second are over that time).
    #[arg(long, default_value_t = 20.0)]
    pub budget_seconds: f64,
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

/// One run of a phase.
#[derive(Debug, Clone)]
struct PhaseRun {
    /// Rows per second (none for idle).
    rate: Option<f64>,
    load: LoadResult,
    /// The fraction of samples the job was throttled in.
    throttled: Option<f64>,
    /// The median of the 1 s p99 windows the server published (what the
    /// workers act on; published only while a job has a budget).
    server_p99: Option<f64>,
}

/// A rotation's latency budget, in ms and as a multiple of the idle p99;
/// `None`: none.
type Budget = Option<(f64, f64)>;

/// What the rotation benchmark measured.
struct Report {
    floor: Vec<f64>,
    idle: Vec<PhaseRun>,
    /// (budget in ms and as a multiple of idle p99, its runs); `None`:
    /// no budget.
    rotations: Vec<(Budget, Vec<PhaseRun>)>,
    load_rate: u32,
}

/// Steps 1 to 6 of a run (see the module docs).
async fn measure(
    args: &RotationArgs,
    services: &Services,
    rows: &Rows,
    run: &Run,
    addr: std::net::SocketAddr,
) -> anyhow::Result<Report> {
    println!(
        "keyward-bench rotation: {} rows of {} bytes, batch {}, {} workers, Encrypt load {}/s, \
         {} runs a phase, {:?} backend",
        args.rows,
        args.payload_bytes,
        if args.batch_size == 0 {
            "adaptive".to_owned()
        } else {
            args.batch_size.to_string()
        },
        args.workers,
        args.load_rate,
        args.repeats,
        services.store.backend()
    );
    let repeats = args.repeats.max(1);

    // 1. The table.
    let started = Instant::now();
    let plaintext = vec![0x42u8; args.payload_bytes.max(1)];
    rows.write(services, &run.old_key, &run.prefix, args.rows, |_| {
        plaintext.clone()
    })
    .await?;
    println!(
        "wrote {} rows in {:.1} s",
        args.rows,
        started.elapsed().as_secs_f64()
    );
    let mut keys = Keys { run, made: 0 };

    // 2. The floor, on a key record that is never activated.
    let floor_key = keys.create(services).await?;
    let mut floor = Vec::new();
    for _ in 0..repeats {
        let started = Instant::now();
        let touched = rows.rewrite_in_place(&run.prefix, &floor_key.id).await?;
        floor.push(touched as f64 / started.elapsed().as_secs_f64());
        rows.rewrite_in_place(&run.prefix, &run.old_key.id).await?;
        rows.vacuum().await?;
    }
    println!("floor: {}", list(&floor, 0));

    // 3. Idle.
    let target = format!("http://{addr}");
    let mut idle = Vec::new();
    for _ in 0..repeats {
        let load = LoadChild::start(&target, args.load_rate)?;
        tokio::time::sleep(Duration::from_secs_f64(args.idle_seconds)).await;
        idle.push(PhaseRun {
            rate: None,
            load: load.finish().await?,
            throttled: None,
            server_p99: None,
        });
    }
    let idle_p99 = median(idle.iter().map(|r| r.load.p99_ms()).collect());
    println!(
        "idle Encrypt p99: {}",
        list(&idle.iter().map(|r| r.load.p99_ms()).collect::<Vec<_>>(), 3)
    );

    // 4. and 5. Rotations.
    let mut phases: Vec<Budget> = vec![None];
    phases.extend(args.budgets.iter().map(|x| Some((idle_p99 * x, *x))));
    let mut rotations = Vec::new();
    let mut last_key = run.old_key.clone();
    for phase in phases {
        let mut runs = Vec::new();
        for _ in 0..repeats {
            let key = keys.create(services).await?;
            let key = services
                .admin
                .activate_key(&key.id, Staging::Immediate)
                .await?
                .activated;
            let limit = phase.map(|_| Duration::from_secs_f64(args.budget_seconds));
            let (job, phase_run) = rotate(
                args,
                services,
                &key,
                phase.map(|(ms, _)| ms),
                limit,
                &target,
            )
            .await?;
            println!(
                "{}: {:.0} rows/s ({} of {} rows), p99 {:.3} ms{}",
                phase.map_or_else(
                    || "no budget".to_owned(),
                    |(ms, x)| format!("budget {ms:.3} ms ({x}x idle)")
                ),
                phase_run.rate.unwrap_or(0.0),
                job.counts.succeeded,
                args.rows,
                phase_run.load.p99_ms(),
                phase_run
                    .throttled
                    .map(|t| format!(", throttled {:.0}% of the time", t * 100.0))
                    .unwrap_or_default()
            );
            rows.vacuum().await?;
            runs.push(phase_run);
            last_key = key;
        }
        rotations.push((phase, runs));
    }

    // 6. The last rotation (unbudgeted, or cancelled) is finished, then
    // every row checked to be on its key and a sample decrypted.
    if rows.count_off_key(&run.prefix, &last_key.id).await? != 0 {
        let job = services
            .rotations
            .start(StartRotation {
                target: last_key.key_id.clone(),
                mode: Some(Mode::Reencrypt),
                batch_size: args.batch_size,
                ..StartRotation::default()
            })
            .await?;
        run_workers(args, services, &job.id, None).await?;
    }
    let remaining = rows.count_off_key(&run.prefix, &last_key.id).await?;
    if remaining != 0 {
        bail!("{remaining} rows are not on the last key");
    }
    let sample = format!("{}{:09}", run.prefix, args.rows / 2);
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
        floor,
        idle,
        rotations,
        load_rate: args.load_rate,
    })
}

/// The run's keys, each `bench-k{n}-{id}` (`Rows::remove` finds them).
struct Keys<'a> {
    run: &'a Run,
    made: usize,
}

impl Keys<'_> {
    async fn create(&mut self, services: &Services) -> anyhow::Result<KeyRecord> {
        self.made += 1;
        Ok(services
            .admin
            .create_key(CreateKey {
                key_id: format!("{}-k{}-{}", self.run.label, self.made, self.run.id),
                ..CreateKey::default()
            })
            .await?)
    }
}

/// One rotation to `key` under load, within `budget_ms` when given, for
/// at most `limit` (then cancelled).
async fn rotate(
    args: &RotationArgs,
    services: &Services,
    key: &KeyRecord,
    budget_ms: Option<f64>,
    limit: Option<Duration>,
    target: &str,
) -> anyhow::Result<(RotationJob, PhaseRun)> {
    let job = services
        .rotations
        .start(StartRotation {
            target: key.key_id.clone(),
            mode: Some(Mode::Reencrypt),
            batch_size: args.batch_size,
            max_foreground_p99_ms: budget_ms.unwrap_or(0.0),
            ..StartRotation::default()
        })
        .await?;
    let load = LoadChild::start(target, args.load_rate)?;
    let started = Instant::now();
    let (job, throttled, windows) = run_workers(args, services, &job.id, limit).await?;
    let secs = started.elapsed().as_secs_f64();
    let load = load.finish().await?;
    if job.status != keyward::rotation::JobStatus::Completed && limit.is_none() {
        bail!("rotation ended {}: {:?}", job.status, job.last_error);
    }
    let run = PhaseRun {
        rate: Some(job.counts.succeeded as f64 / secs),
        load,
        throttled: budget_ms.map(|_| throttled),
        server_p99: (!windows.is_empty()).then(|| median(windows)),
    };
    Ok((job, run))
}

/// Runs `--workers` workers on job `job_id` until it ends, or until
/// `limit` passes (then it is cancelled); the job as it ended, the
/// fraction of 100 ms samples it was throttled in, and the p99 windows the
/// server published meanwhile.
async fn run_workers(
    args: &RotationArgs,
    services: &Services,
    job_id: &str,
    limit: Option<Duration>,
) -> anyhow::Result<(RotationJob, f64, Vec<f64>)> {
    let stop = CancellationToken::new();
    let mut handles = Vec::new();
    for _ in 0..args.workers.max(1) {
        let worker = services.worker(WorkerOptions {
            lease: Duration::from_secs(60),
            idle_poll: Duration::from_millis(20),
            ..WorkerOptions::default()
        });
        let stop = stop.clone();
        handles.push(tokio::spawn(async move { worker.run(stop).await }));
    }
    let started = Instant::now();
    let (mut samples, mut throttled) = (0u64, 0u64);
    let (mut windows, mut last_window) = (Vec::new(), None);
    let mut cancelled = false;
    let job = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let job = services.rotations.get(job_id).await?;
        if job.status.is_terminal() {
            break job;
        }
        if job.started_at.is_some() && !cancelled {
            samples += 1;
            throttled += u64::from(job.throttle_reason(chrono::Utc::now()).is_some());
            for reading in services.store.foreground_readings().await? {
                if let (Some(at), Some(p99)) = (reading.at, reading.p99_ms) {
                    if last_window.is_none_or(|last| at > last) {
                        last_window = Some(at);
                        windows.push(p99);
                    }
                }
            }
        }
        if limit.is_some_and(|limit| started.elapsed() >= limit) && !cancelled {
            services.rotations.cancel(job_id).await?;
            cancelled = true;
        }
    };
    stop.cancel();
    for handle in handles {
        handle.await?;
    }
    Ok((job, throttled as f64 / samples.max(1) as f64, windows))
}

/// The middle value (the upper of two).
pub(crate) fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

fn list(values: &[f64], decimals: usize) -> String {
    values
        .iter()
        .map(|v| format!("{v:.decimals$}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Report {
    fn print(&self) {
        let floor = median(self.floor.clone());
        let idle = median(self.idle.iter().map(|r| r.load.p99_ms()).collect());
        println!(
            "\nEncrypt latency from a separate process at {}/s (p99 over each run, from when each call was sent)",
            self.load_rate
        );
        println!(
            "{:<34} {:>3} {:>10} {:>7} {:>9} {:>7} {:>9} {:>7} {:>12}",
            "phase",
            "run",
            "rows/s",
            "/floor",
            "p99 ms",
            "/idle",
            "throttled",
            "errors",
            "server p99"
        );
        for (n, rate) in self.floor.iter().enumerate() {
            println!("{:<34} {:>3} {:>10.0}", "floor: one UPDATE", n + 1, rate);
        }
        for (n, run) in self.idle.iter().enumerate() {
            println!(
                "{:<34} {:>3} {:>10} {:>7} {:>9.3} {:>7.2} {:>9} {:>7}",
                "idle",
                n + 1,
                "",
                "",
                run.load.p99_ms(),
                run.load.p99_ms() / idle,
                "",
                run.load.errors
            );
        }
        for (phase, runs) in &self.rotations {
            let name = match phase {
                None => "rotation, no budget".to_owned(),
                Some((ms, x)) => format!("rotation, budget {ms:.3} ms ({x}x)"),
            };
            for (n, run) in runs.iter().enumerate() {
                let rate = run.rate.unwrap_or(0.0);
                println!(
                    "{:<34} {:>3} {:>10.0} {:>7.2} {:>9.3} {:>7.2} {:>9} {:>7} {:>12}",
                    name,
                    n + 1,
                    rate,
                    rate / floor,
                    run.load.p99_ms(),
                    run.load.p99_ms() / idle,
                    run.throttled
                        .map(|t| format!("{:.0}%", t * 100.0))
                        .unwrap_or_else(|| "-".into()),
                    run.load.errors,
                    run.server_p99
                        .map(|ms| format!("{ms:.3}"))
                        .unwrap_or_else(|| "-".into()),
                );
            }
            if let Some((ms, _)) = phase {
                let held = runs.iter().filter(|r| r.load.p99_ms() <= *ms).count();
                println!(
                    "{:<34}     p99 within the budget in {held} of {} runs",
                    "",
                    runs.len()
                );
            }
        }
        println!("\nrotation / floor (median, no budget): {:.2}", {
            let rates = self
                .rotations
                .first()
                .map(|(_, runs)| runs.iter().filter_map(|r| r.rate).collect())
                .unwrap_or_default();
            median(rates) / floor
        });
        println!("p99 during / idle (median, no budget): {:.2}", {
            let p99s = self
                .rotations
                .first()
                .map(|(_, runs)| runs.iter().map(|r| r.load.p99_ms()).collect())
                .unwrap_or_default();
            median(p99s) / idle
        });
    }
}
