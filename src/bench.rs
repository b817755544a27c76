//! `keyward bench`: drives Encrypt, Decrypt and BatchEncrypt against a
//! server and reports them beside the `grpc.health.v1.Health/Check` floor,
//! measured on the same channel at the same concurrency in the same run, so
//! the ratios mean something on a noisy machine.
//!
//! Without `--target` it starts a server in-process on a temporary SQLite
//! database with the local KMS (the embedded default).

use std::{
    collections::HashMap,
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::Args;
use hdrhistogram::Histogram;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

use crate::{
    api::proto::{
        crypto_client::CryptoClient, decrypt_request, BatchEncryptRequest, DecryptRequest,
        EncryptRequest,
    },
    app::{Application, HTTP2_CONNECTION_WINDOW, HTTP2_STREAM_WINDOW},
    config::{MasterSecrets, Settings},
    crypto::secret::MasterSecret,
};

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Server to measure (e.g. http://127.0.0.1:50051); default: start one
    /// in-process on a temporary SQLite database.
    #[arg(long, env = "KEYWARD_BENCH_TARGET")]
    pub target: Option<String>,
    /// Requests in flight at once (one HTTP/2 channel).
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Plaintext size for Encrypt / Decrypt / BatchEncrypt items.
    #[arg(long, default_value_t = 1024)]
    pub payload_bytes: usize,
    /// Seconds each phase runs.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Items per BatchEncrypt request.
    #[arg(long, default_value_t = 500)]
    pub batch_size: usize,
    /// BatchEncrypt requests in flight at once.
    #[arg(long, default_value_t = 4)]
    pub batch_concurrency: usize,
}

/// What one phase measured.
#[derive(Debug, Clone)]
pub struct PhaseResult {
    pub name: &'static str,
    /// Operations per second (requests, or items for batches).
    pub ops_per_sec: f64,
    pub p50: Duration,
    pub p99: Duration,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<Vec<PhaseResult>> {
    let mut _server = None;
    let target = match &args.target {
        Some(target) => target.clone(),
        None => {
            let server = InProcessServer::start().await?;
            let url = server.url.clone();
            _server = Some(server);
            url
        }
    };
    let channel = Endpoint::from_shared(target.clone())?
        .tcp_nodelay(true)
        .initial_connection_window_size(HTTP2_CONNECTION_WINDOW)
        .initial_stream_window_size(HTTP2_STREAM_WINDOW)
        .connect()
        .await
        .with_context(|| format!("cannot connect to {target}"))?;
    let duration = Duration::from_secs_f64(args.seconds.max(0.5));
    let context: HashMap<String, String> =
        [("connection_id".to_owned(), "bench".to_owned())].into();
    let payload = bytes::Bytes::from(vec![0x5a_u8; args.payload_bytes.max(1)]);

    println!(
        "keyward bench: target {target}, concurrency {}, payload {} bytes, {:.1} s per phase",
        args.concurrency,
        args.payload_bytes,
        duration.as_secs_f64()
    );

    // Warm up connections, allocator and caches.
    health_phase(&channel, args.concurrency, Duration::from_millis(500)).await?;

    let floor_a = health_phase(&channel, args.concurrency, duration).await?;
    let encrypt = {
        let (ch, ctx, pl) = (channel.clone(), context.clone(), payload.clone());
        phase("Encrypt", args.concurrency, duration, 1, move || {
            let mut client = CryptoClient::new(ch.clone());
            let req = EncryptRequest {
                plaintext: pl.clone(),
                context: ctx.clone(),
            };
            async move { client.encrypt(req).await.map(|_| ()) }
        })
        .await?
    };
    let blob = CryptoClient::new(channel.clone())
        .encrypt(EncryptRequest {
            plaintext: payload.clone(),
            context: context.clone(),
        })
        .await?
        .into_inner()
        .blob;
    let decrypt = {
        let (ch, ctx) = (channel.clone(), context.clone());
        phase("Decrypt", args.concurrency, duration, 1, move || {
            let mut client = CryptoClient::new(ch.clone());
            let req = DecryptRequest {
                context: ctx.clone(),
                ciphertext: Some(decrypt_request::Ciphertext::Blob(blob.clone())),
            };
            async move { client.decrypt(req).await.map(|_| ()) }
        })
        .await?
    };
    let floor_b = health_phase(&channel, args.concurrency, duration).await?;
    let batch = {
        let items: Vec<EncryptRequest> = (0..args.batch_size.max(1))
            .map(|_| EncryptRequest {
                plaintext: payload.clone(),
                context: context.clone(),
            })
            .collect();
        let ch = channel.clone();
        phase(
            "BatchEncrypt",
            args.batch_concurrency,
            duration,
            items.len(),
            move || {
                let mut client = CryptoClient::new(ch.clone());
                let req = BatchEncryptRequest {
                    items: items.clone(),
                };
                async move { client.batch_encrypt(req).await.map(|_| ()) }
            },
        )
        .await?
    };

    let floor_rps = (floor_a.ops_per_sec + floor_b.ops_per_sec) / 2.0;
    let floor = PhaseResult {
        name: "Health/Check (floor)",
        ops_per_sec: floor_rps,
        p50: floor_a.p50.min(floor_b.p50),
        p99: floor_a.p99.max(floor_b.p99),
    };
    println!(
        "\n{:<22} {:>14} {:>10} {:>10} {:>10}",
        "phase", "ops/s", "vs floor", "p50 ms", "p99 ms"
    );
    for r in [&floor, &encrypt, &decrypt] {
        println!(
            "{:<22} {:>14.0} {:>10.2} {:>10.3} {:>10.3}",
            r.name,
            r.ops_per_sec,
            r.ops_per_sec / floor_rps,
            ms(r.p50),
            ms(r.p99)
        );
    }
    println!(
        "{:<22} {:>14.0} {:>10} {:>10.3} {:>10.3}   (items/s; {} items per request, {} in flight; latency per request)",
        batch.name, batch.ops_per_sec, "-", ms(batch.p50), ms(batch.p99), args.batch_size, args.batch_concurrency
    );
    println!(
        "\nfloor runs: {:.0} and {:.0} requests/s (before and after the Encrypt/Decrypt phases)",
        floor_a.ops_per_sec, floor_b.ops_per_sec
    );
    Ok(vec![floor, encrypt, decrypt, batch])
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn health_phase(
    channel: &Channel,
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<PhaseResult> {
    let ch = channel.clone();
    phase("Health/Check", concurrency, duration, 1, move || {
        let mut client = HealthClient::new(ch.clone());
        async move {
            client
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .map(|_| ())
        }
    })
    .await
}

/// Runs `concurrency` loops of `call` for `duration`; every call must
/// succeed (a benchmark that counts failures as throughput would lie).
async fn phase<F, Fut>(
    name: &'static str,
    concurrency: usize,
    duration: Duration,
    ops_per_call: usize,
    make_call: F,
) -> anyhow::Result<PhaseResult>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), tonic::Status>> + Send,
{
    let make_call = Arc::new(make_call);
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let make_call = Arc::clone(&make_call);
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
            let mut calls = 0u64;
            while Instant::now() < deadline {
                let t = Instant::now();
                make_call()
                    .await
                    .map_err(|s| anyhow::anyhow!("{name} failed: {s}"))?;
                hist.saturating_record(u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX));
                calls += 1;
            }
            anyhow::Ok((calls, hist))
        }));
    }
    let mut total = 0u64;
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for task in tasks {
        let (calls, h) = task.await??;
        total += calls;
        hist.add(h)?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    Ok(PhaseResult {
        name,
        ops_per_sec: (total as f64 * ops_per_call as f64) / elapsed,
        p50: Duration::from_micros(hist.value_at_quantile(0.50)),
        p99: Duration::from_micros(hist.value_at_quantile(0.99)),
    })
}

/// A server on a temporary SQLite database, stopped on drop.
struct InProcessServer {
    url: String,
    _dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl InProcessServer {
    async fn start() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let db = dir.path().join("bench.db");
        let master = MasterSecrets {
            current: MasterSecret::new(MasterSecret::generate_hex().as_bytes())?,
            previous: vec![],
        };
        let mut settings =
            Settings::for_database(format!("sqlite://{}", db.display()), Some(master));
        settings.seed_dev_key = true;
        let app = Application::build(settings).await?;
        let url = format!("http://{}", app.local_addr()?);
        let (stop, stopped) = tokio::sync::oneshot::channel();
        tokio::spawn(app.run_until_stopped(async {
            let _ = stopped.await;
        }));
        Ok(Self {
            url,
            _dir: dir,
            stop: Some(stop),
        })
    }
}

impl Drop for InProcessServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
