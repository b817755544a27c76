//! `keyward-bench soak`: a bounded soak of a real `keyward serve` process.
//!
//! On the database given by `--database-url` (an empty PostgreSQL database
//! is the intended target) it:
//! 1. writes `--rows` connections under a fresh key, each with its own
//!    plaintext and its row's context;
//! 2. starts `keyward serve` (`--server`, by default the `keyward` beside
//!    this binary) as a child process, with its
//!    in-process rotation worker and an audit log file;
//! 3. activates a second key and starts a rotation of those rows through
//!    the Admin API, and for `--duration-secs` runs `--concurrency` callers
//!    that each Encrypt and then Decrypt-and-compare, closed loop;
//! 4. samples the server's RSS from `/proc` throughout and reports, per
//!    `--report-every-secs` window, Encrypt and Decrypt p50/p99, calls per
//!    second, rows rotated and RSS;
//! 5. waits for the rotation to end, then reads every row back and
//!    BatchDecrypts it through the server, comparing each plaintext;
//! 6. reports error counts (which must be 0), the peak RSS (`VmHWM`)
//!    against `--max-rss-mib`, stops the server with SIGTERM and removes
//!    what it wrote. The exit status is non-zero if anything failed.

use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use anyhow::{bail, Context as _};
use clap::Args;
use hdrhistogram::Histogram;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

use keyward::{
    app::Services, config::MasterSecrets, crypto::secret::MasterSecret, service::crypto::Limits,
};
use keyward_client::proto::{
    admin_client::AdminClient, batch_decrypt_result, crypto_client::CryptoClient, decrypt_request,
    BatchDecryptRequest, CreateKeyRequest, DecryptRequest, EncryptRequest, EnvelopeForm,
    GetRotationJobRequest, RotationStatus, StartRotationRequest,
};

use crate::{
    rows::{self, Rows, Run},
    DatabaseArgs,
};

#[derive(Debug, Clone, Args)]
pub struct SoakArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// The `keyward` binary to run as `keyward serve`; default: the one
    /// beside this binary, else `keyward` on PATH.
    #[arg(long, env = "KEYWARD_BIN")]
    pub server: Option<PathBuf>,
    /// Rows written, then rotated during the soak.
    #[arg(long, default_value_t = 200_000)]
    pub rows: usize,
    /// Seconds of mixed Encrypt/Decrypt load.
    #[arg(long, default_value_t = 120)]
    pub duration_secs: u64,
    /// Concurrent callers, each alternating Encrypt and Decrypt.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Seconds per row of the report.
    #[arg(long, default_value_t = 10)]
    pub report_every_secs: u64,
    /// Rows per rotation batch.
    #[arg(long, default_value_t = 500)]
    pub batch_size: i64,
    /// Plaintext bytes of each load call.
    #[arg(long, default_value_t = 300)]
    pub payload_bytes: usize,
    /// Longest the rotation may take after the load ends, in seconds.
    #[arg(long, default_value_t = 600)]
    pub rotation_timeout_secs: u64,
    /// Peak server RSS allowed, in MiB; above it the soak fails.
    #[arg(long, default_value_t = 64)]
    pub max_rss_mib: u64,
}

/// Latencies of one report window.
struct Window {
    encrypt: Histogram<u64>,
    decrypt: Histogram<u64>,
    max_rss_kib: u64,
    rotated: i64,
}

impl Window {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            encrypt: Histogram::new_with_bounds(1, 60_000_000, 3)?,
            decrypt: Histogram::new_with_bounds(1, 60_000_000, 3)?,
            max_rss_kib: 0,
            rotated: 0,
        })
    }
}

/// What the soak observed, shared by the callers and the sampler.
struct Observed {
    started: Instant,
    every: Duration,
    windows: Mutex<Vec<Window>>,
    errors: AtomicU64,
}

impl Observed {
    /// The report window of instant `at`.
    fn window(&self, at: Instant) -> usize {
        ((at - self.started).as_secs_f64() / self.every.as_secs_f64()) as usize
    }

    fn with_window(&self, index: usize, f: impl FnOnce(&mut Window)) {
        let mut windows = self
            .windows
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while windows.len() <= index {
            match Window::new() {
                Ok(w) => windows.push(w),
                Err(_) => return,
            }
        }
        if let Some(w) = windows.get_mut(index) {
            f(w);
        }
    }

    fn error(&self, what: &str) {
        if self.errors.fetch_add(1, Ordering::Relaxed) < 5 {
            eprintln!("soak error: {what}");
        }
    }
}

/// The plaintext of row `id`: derived from it, so the read-back can check it.
fn row_plaintext(id: &str) -> Vec<u8> {
    format!("soak credential for {id}").into_bytes()
}

pub async fn run(args: SoakArgs) -> anyhow::Result<bool> {
    let database_url = args.database.database_url.as_str();
    if !database_url.starts_with("postgres") {
        bail!("the soak runs on PostgreSQL: pass --database-url postgres://… (an empty database)");
    }
    let server_bin = server_binary(args.server.clone())?;
    let master_hex = MasterSecret::generate_hex().to_string();
    let master = MasterSecrets::parse(&master_hex, &[])?;
    rows::refuse_a_live_database(database_url).await?;
    let services = Services::open(database_url, Some(&master), Limits::default()).await?;
    let rows = Rows::connect(database_url).await?;
    let run = Run::begin(&services, "soak").await?;
    let Run {
        prefix, old_key, ..
    } = &run;
    println!(
        "keyward-bench soak: {} rows, {} s of load from {} callers, reports every {} s",
        args.rows, args.duration_secs, args.concurrency, args.report_every_secs
    );
    let started = Instant::now();
    if let Err(err) = rows
        .write(&services, old_key, prefix, args.rows, row_plaintext)
        .await
    {
        rows.remove(&run).await?;
        return Err(err);
    }
    println!(
        "wrote {} rows in {:.1} s",
        args.rows,
        started.elapsed().as_secs_f64()
    );

    let workdir = tempfile::tempdir()?;
    let mut server =
        match ServerProcess::start(&server_bin, database_url, &master_hex, workdir.path()).await {
            Ok(server) => server,
            Err(err) => {
                rows.remove(&run).await?;
                return Err(err);
            }
        };
    let outcome = soak(&rows, &server, prefix, &args).await;
    let stopped = server.stop().await;
    if outcome.is_err() {
        eprintln!("server log:\n{}", server.log_tail());
    }
    rows.remove(&run).await?;
    let report = outcome?;
    let peak_kib = stopped?;
    let peak_mib = peak_kib as f64 / 1024.0;
    println!(
        "{:<44} {:>10.1}   (target ≤ {})",
        "server peak RSS (VmHWM), MiB", peak_mib, args.max_rss_mib
    );
    let rss_ok = peak_mib <= args.max_rss_mib as f64;
    let ok = report && rss_ok;
    println!("soak {}", if ok { "PASSED" } else { "FAILED" });
    Ok(ok)
}

/// Steps 3 to 5; returns whether they passed.
async fn soak(
    rows: &Rows,
    server: &ServerProcess,
    prefix: &str,
    args: &SoakArgs,
) -> anyhow::Result<bool> {
    let channel = server.channel.clone();
    let mut admin = AdminClient::new(channel.clone());
    let new_key = admin
        .create_key(CreateKeyRequest {
            key_id: format!("{prefix}new"),
            activate: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    let job = admin
        .start_rotation(StartRotationRequest {
            batch_size: args.batch_size,
            ..Default::default()
        })
        .await?
        .into_inner();
    let observed = Arc::new(Observed {
        started: Instant::now(),
        every: Duration::from_secs(args.report_every_secs.max(1)),
        windows: Mutex::new(Vec::new()),
        errors: AtomicU64::new(0),
    });
    let deadline = observed.started + Duration::from_secs(args.duration_secs);
    let mut callers = Vec::new();
    for task in 0..args.concurrency.max(1) {
        callers.push(tokio::spawn(caller(
            CryptoClient::new(channel.clone()),
            task,
            args.payload_bytes.max(1),
            deadline,
            Arc::clone(&observed),
        )));
    }
    let sampler = tokio::spawn(sample(
        server.pid,
        admin.clone(),
        job.id.clone(),
        deadline,
        Arc::clone(&observed),
    ));
    for caller in callers {
        caller.await?;
    }
    sampler.await?;
    let load_errors = observed.errors.load(Ordering::Relaxed);

    // The rotation's end.
    let rotation_deadline = Instant::now() + Duration::from_secs(args.rotation_timeout_secs);
    let final_job = loop {
        let current = admin
            .get_rotation_job(GetRotationJobRequest {
                job_id: job.id.clone(),
            })
            .await?
            .into_inner();
        let status = current.status();
        if !matches!(status, RotationStatus::Pending | RotationStatus::Running) {
            break current;
        }
        if Instant::now() > rotation_deadline {
            bail!("the rotation did not finish within --rotation-timeout-secs");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let rotation_secs = final_job
        .completed_at
        .zip(final_job.started_at)
        .map(|(end, start)| {
            (end.seconds - start.seconds) as f64 + (end.nanos - start.nanos) as f64 / 1e9
        })
        .unwrap_or_default();

    // Every row reads back through the server.
    let (verified, wrong) = verify_rows(rows, &channel, prefix).await?;
    let off_key = rows.count_off_key(prefix, &new_key.id).await?;

    print_windows(&observed);
    let rotated_ok = final_job.status() == RotationStatus::Completed
        && final_job.failed_rows == 0
        && off_key == 0;
    println!("\n{:<44} {:>10}", "measure", "value");
    println!(
        "{:<44} {:>10}",
        "rotation",
        format!("{:?}", final_job.status())
    );
    println!(
        "{:<44} {:>10.0}",
        "rotation rows/s (under load)",
        final_job.succeeded_rows as f64 / rotation_secs.max(0.001)
    );
    println!(
        "{:<44} {:>10}",
        "rotation passes / rows processed / failed",
        format!(
            "{} / {} / {}",
            final_job.pass, final_job.processed_rows, final_job.failed_rows
        )
    );
    println!("{:<44} {:>10}", "rows not on the new key", off_key);
    println!("{:<44} {:>10}", "rows read back and compared", verified);
    println!("{:<44} {:>10}", "errors: load calls", load_errors);
    println!(
        "{:<44} {:>10}",
        "errors: rows that did not read back", wrong
    );
    Ok(rotated_ok && load_errors == 0 && wrong == 0 && verified == args.rows as u64)
}

/// One closed-loop caller: Encrypt, then Decrypt that ciphertext and
/// compare, until `deadline`.
async fn caller(
    mut client: CryptoClient<Channel>,
    task: usize,
    payload_bytes: usize,
    deadline: Instant,
    observed: Arc<Observed>,
) {
    let mut n = 0u64;
    while Instant::now() < deadline {
        let window = observed.window(Instant::now());
        n += 1;
        let context: std::collections::HashMap<String, String> =
            [("connection_id".to_owned(), format!("soak-load-{task}-{n}"))].into();
        let mut plaintext = format!("load {task} {n} ").into_bytes();
        plaintext.resize(payload_bytes, b'.');
        let t = Instant::now();
        let sealed = client
            .encrypt(EncryptRequest {
                plaintext: plaintext.clone().into(),
                context: context.clone(),
                form: EnvelopeForm::Blob as i32,
            })
            .await;
        let encrypt_us = micros(t);
        let blob = match sealed {
            Ok(sealed) => sealed.into_inner().blob,
            Err(status) => {
                observed.error(&format!("Encrypt: {status}"));
                continue;
            }
        };
        let t = Instant::now();
        let opened = client
            .decrypt(DecryptRequest {
                context,
                ciphertext: Some(decrypt_request::Ciphertext::Blob(blob)),
            })
            .await;
        let decrypt_us = micros(t);
        match opened {
            Ok(opened) if opened.get_ref().plaintext.as_ref() == plaintext.as_slice() => {}
            Ok(_) => observed.error("Decrypt returned another plaintext"),
            Err(status) => observed.error(&format!("Decrypt: {status}")),
        }
        observed.with_window(window, |w| {
            w.encrypt.saturating_record(encrypt_us);
            w.decrypt.saturating_record(decrypt_us);
        });
    }
}

fn micros(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// Every 250 ms until `deadline`: the server's RSS and the job's progress.
async fn sample(
    pid: u32,
    mut admin: AdminClient<Channel>,
    job_id: String,
    deadline: Instant,
    observed: Arc<Observed>,
) {
    while Instant::now() < deadline {
        let rss = proc_status_kib(pid, "VmRSS:").unwrap_or_default();
        let rotated = admin
            .get_rotation_job(GetRotationJobRequest {
                job_id: job_id.clone(),
            })
            .await
            .map(|r| r.into_inner().succeeded_rows)
            .unwrap_or_default();
        observed.with_window(observed.window(Instant::now()), |w| {
            w.max_rss_kib = w.max_rss_kib.max(rss);
            w.rotated = w.rotated.max(rotated);
        });
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A `kB` field of `/proc/PID/status` (`VmRSS:`, `VmHWM:`).
fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
}

fn print_windows(observed: &Observed) {
    let windows = observed
        .windows
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let every = observed.every.as_secs_f64();
    println!(
        "\n{:>8} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>9}",
        "t (s)", "enc p50", "enc p99", "dec p50", "dec p99", "calls/s", "rotated", "RSS MiB"
    );
    let ms = |h: &Histogram<u64>, q| h.value_at_quantile(q) as f64 / 1000.0;
    for (i, w) in windows.iter().enumerate() {
        println!(
            "{:>8.0} {:>9.2}ms {:>9.2}ms {:>9.2}ms {:>9.2}ms {:>10.0} {:>10} {:>9.1}",
            (i + 1) as f64 * every,
            ms(&w.encrypt, 0.5),
            ms(&w.encrypt, 0.99),
            ms(&w.decrypt, 0.5),
            ms(&w.decrypt, 0.99),
            (w.encrypt.len() + w.decrypt.len()) as f64 / every,
            w.rotated,
            w.max_rss_kib as f64 / 1024.0
        );
    }
}

/// Reads every row back and BatchDecrypts it through the server; returns
/// (rows compared, rows that failed or differed).
async fn verify_rows(table: &Rows, channel: &Channel, prefix: &str) -> anyhow::Result<(u64, u64)> {
    let mut client = CryptoClient::new(channel.clone());
    let (mut verified, mut wrong) = (0u64, 0u64);
    let mut after = String::new();
    loop {
        let rows = table.page(prefix, &after, 1000).await?;
        let Some((last, _)) = rows.last() else {
            break;
        };
        after = last.clone();
        let items = rows
            .iter()
            .map(|(id, envelope)| DecryptRequest {
                context: [("connection_id".to_owned(), id.clone())].into(),
                ciphertext: Some(decrypt_request::Ciphertext::Envelope(
                    keyward_client::proto::Envelope {
                        encryption_key_id: envelope.encryption_key_id.clone(),
                        data_key_ciphertext: envelope.data_key_ciphertext.clone().into(),
                        data_key_iv: envelope.data_key_iv.clone().into(),
                        payload_ciphertext: envelope.payload_ciphertext.clone().into(),
                        payload_iv: envelope.payload_iv.clone().into(),
                    },
                )),
            })
            .collect();
        let results = client
            .batch_decrypt(BatchDecryptRequest { items })
            .await?
            .into_inner()
            .results;
        for ((id, _), result) in rows.iter().zip(&results) {
            verified += 1;
            match &result.result {
                Some(batch_decrypt_result::Result::Ok(opened))
                    if opened.plaintext.as_ref() == row_plaintext(id).as_slice() => {}
                other => {
                    wrong += 1;
                    if wrong <= 5 {
                        eprintln!("row {id} did not read back: {other:?}");
                    }
                }
            }
        }
        wrong += rows.len().saturating_sub(results.len()) as u64;
    }
    Ok((verified, wrong))
}

/// `keyward serve` as a child process.
struct ServerProcess {
    child: tokio::process::Child,
    pid: u32,
    channel: Channel,
    log: PathBuf,
}

impl ServerProcess {
    async fn start(
        bin: &Path,
        database_url: &str,
        master_hex: &str,
        dir: &Path,
    ) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let addr = format!("127.0.0.1:{port}");
        let log = dir.join("server.log");
        let child = tokio::process::Command::new(bin)
            .args(["serve", "--listen", &addr, "--insecure-no-auth"])
            .arg("--audit-log")
            .arg(dir.join("audit.log"))
            .env("DATABASE_URL", database_url)
            .env("ENCRYPTION_MASTER_KEY", master_hex)
            .env("RUST_LOG", "warn")
            .env_remove("KEYWARD_CONFIG")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {} serve", bin.display()))?;
        let pid = child.id().context("the server exited at once")?;
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?;
        let started = Instant::now();
        let channel = loop {
            if let Ok(channel) = endpoint.connect().await {
                let serving = HealthClient::new(channel.clone())
                    .check(HealthCheckRequest::default())
                    .await
                    .is_ok_and(|r| r.into_inner().status == 1);
                if serving {
                    break channel;
                }
            }
            if started.elapsed() > Duration::from_secs(30) {
                bail!("keyward serve did not become SERVING within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        Ok(Self {
            child,
            pid,
            channel,
            log,
        })
    }

    /// SIGTERM, then the exit; returns the peak RSS (KiB) read just before.
    async fn stop(&mut self) -> anyhow::Result<u64> {
        let peak = proc_status_kib(self.pid, "VmHWM:").unwrap_or_default();
        tokio::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .await?;
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .context("keyward serve did not exit within 30 s of SIGTERM")??;
        if !status.success() {
            bail!("keyward serve exited with {status}");
        }
        Ok(peak)
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

/// `--server`, else the `keyward` beside this binary (cargo builds both into
/// one target directory), else `keyward` on PATH.
fn server_binary(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(path) = given {
        return Ok(path);
    }
    let beside = std::env::current_exe()?.with_file_name("keyward");
    if beside.is_file() {
        return Ok(beside);
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("keyward"))
        .find(|path| path.is_file())
        .context("no keyward binary beside keyward-bench or on PATH: pass --server")
}
