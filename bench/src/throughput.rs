//! `keyward-bench throughput`: drives Encrypt, Decrypt, Rewrap and BatchEncrypt against a
//! server and reports them beside the `grpc.health.v1.Health/Check` floor,
//! measured on the same channel at the same concurrency in the same run, so
//! the ratios mean something on a noisy machine.
//!
//! Without `--target` it starts a server in-process on a temporary SQLite
//! database with the local KMS (the embedded default).

use std::{
    collections::HashMap,
    future::Future,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use bytes::{Buf, BufMut, Bytes};
use clap::{Args, ValueEnum};
use futures::{future::BoxFuture, TryFutureExt as _};
use hdrhistogram::Histogram;
use http::uri::PathAndQuery;
use prost::Message;
use tonic::{
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    transport::{Channel, Endpoint},
};
use tonic_health::pb::{
    health_check_response::ServingStatus, HealthCheckRequest, HealthCheckResponse,
};

use keyward::{
    app::{HTTP2_CONNECTION_WINDOW, HTTP2_STREAM_WINDOW},
    config::{KmsSettings, DEFAULT_MAX_REQUEST_BYTES},
    transport::connect_channel,
};
use keyward_client::proto::{
    batch_encrypt_result, crypto_client::CryptoClient, decrypt_request, rewrap_request,
    BatchEncryptRequest, BatchEncryptResponse, DecryptRequest, DecryptResponse, EncryptRequest,
    EncryptResponse, EnvelopeForm, RewrapRequest, RewrapResponse,
};

use crate::server::InProcessServer;
use tonic::metadata::AsciiMetadataValue;

#[derive(Debug, Clone, Args)]
pub struct ThroughputArgs {
    /// Server to measure (e.g. http://127.0.0.1:50051); default: start one
    /// in-process on a temporary SQLite database.
    #[arg(long, env = "KEYWARD_BENCH_TARGET")]
    pub target: Option<String>,
    /// Bearer token for a `--target` that requires authentication (a token
    /// with the encrypt, decrypt and rewrap roles: keyward token create).
    #[arg(
        long,
        env = "KEYWARD_TOKEN",
        hide_env_values = true,
        requires = "target"
    )]
    pub token: Option<String>,
    /// Requests in flight at once (one HTTP/2 channel).
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Plaintext size for Encrypt / Decrypt / BatchEncrypt items.
    #[arg(long, default_value_t = 1024)]
    pub payload_bytes: usize,
    /// Seconds each of Health, Encrypt, Decrypt, Rewrap and BatchEncrypt runs in all.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Items per BatchEncrypt request; fewer when that many would not fit
    /// the default 16 MiB request limit (`--max-request-bytes`).
    #[arg(long, default_value_t = 500)]
    pub batch_size: usize,
    /// BatchEncrypt requests in flight at once.
    #[arg(long, default_value_t = 4)]
    pub batch_concurrency: usize,
    /// Interleaved rounds (Health, Encrypt, Decrypt, Rewrap) the time is split into.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Envelope forms Encrypt returns.
    #[arg(long, value_enum, default_value_t = Form::Both)]
    pub form: Form,
}

/// `--form`: which envelope forms Encrypt and BatchEncrypt return.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Form {
    Both,
    Fields,
    Blob,
}

impl Form {
    fn proto(self) -> EnvelopeForm {
        match self {
            Form::Both => EnvelopeForm::Both,
            Form::Fields => EnvelopeForm::Fields,
            Form::Blob => EnvelopeForm::Blob,
        }
    }
}

/// What one phase measured.
#[derive(Debug, Clone)]
pub struct PhaseResult {
    pub name: &'static str,
    /// Operations per second (requests, or items for batches).
    pub ops_per_sec: f64,
    /// CPU time this process spent per operation (client and, without
    /// `--target`, server), when the platform reports it.
    pub cpu_per_op: Option<Duration>,
    pub p50: Duration,
    pub p99: Duration,
}

pub async fn run(args: ThroughputArgs) -> anyhow::Result<Vec<PhaseResult>> {
    let mut _server = None;
    let target = match &args.target {
        Some(target) => target.clone(),
        None => {
            let server = InProcessServer::start(KmsSettings::default()).await?;
            let url = server.url.clone();
            _server = Some(server);
            url
        }
    };
    let endpoint = Endpoint::from_shared(target.clone())?
        .initial_connection_window_size(HTTP2_CONNECTION_WINDOW)
        .initial_stream_window_size(HTTP2_STREAM_WINDOW);
    let channel = connect_channel(endpoint)
        .await
        .with_context(|| format!("cannot connect to {target}"))?;
    let batch_size = batch_size_that_fits(args.batch_size, args.payload_bytes);
    let rounds = args.rounds.max(1);
    let slice = Duration::from_secs_f64(args.seconds.max(0.3) / rounds as f64);
    let context: HashMap<String, String> =
        [("connection_id".to_owned(), "bench".to_owned())].into();
    let payload = bytes::Bytes::from(vec![0x5a_u8; args.payload_bytes.max(1)]);
    let form = args.form.proto() as i32;
    let authorization: Option<AsciiMetadataValue> = args
        .token
        .as_deref()
        .map(|token| format!("Bearer {token}").parse())
        .transpose()
        .context("--token is not a valid header value")?;
    let encrypt_request = EncryptRequest {
        plaintext: payload,
        context: context.clone(),
        form,
    };

    println!(
        "keyward-bench throughput: target {target}, concurrency {}, payload {} bytes, form {:?}, \
         {rounds} interleaved rounds of {:.2} s per operation",
        args.concurrency,
        args.payload_bytes,
        args.form,
        slice.as_secs_f64()
    );

    let mut first = tonic::Request::new(EncryptRequest {
        form: EnvelopeForm::Blob as i32,
        ..encrypt_request.clone()
    });
    if let Some(value) = &authorization {
        first.metadata_mut().insert("authorization", value.clone());
    }
    let blob = CryptoClient::new(channel.clone())
        .encrypt(first)
        .await?
        .into_inner()
        .blob;

    // Rewrap moves that ciphertext to the active key: the in-process server
    // activates a second key first, so every call rewraps; a --target
    // server's active key already holds it, so its calls measure the check
    // that it is in place.
    let rewrap_moves = match &_server {
        Some(server) => {
            let admin = &server.services.admin;
            let next = admin
                .create_key(keyward::service::admin::CreateKey {
                    key_id: "bench-next".into(),
                    ..Default::default()
                })
                .await?;
            admin
                .activate_key(&next.id, keyward::service::admin::Staging::Immediate)
                .await?;
            true
        }
        None => false,
    };
    let rewrap = PreEncodedCall::new(
        &channel,
        &authorization,
        REWRAP,
        &RewrapRequest {
            context: context.clone(),
            ciphertext: Some(rewrap_request::Ciphertext::Blob(blob.clone())),
            form,
        },
    );
    let health = PreEncodedCall::new(
        &channel,
        &authorization,
        HEALTH_CHECK,
        &HealthCheckRequest {
            service: String::new(),
        },
    );
    let encrypt = PreEncodedCall::new(&channel, &authorization, ENCRYPT, &encrypt_request);
    let decrypt = PreEncodedCall::new(
        &channel,
        &authorization,
        DECRYPT,
        &DecryptRequest {
            context: context.clone(),
            ciphertext: Some(decrypt_request::Ciphertext::Blob(blob)),
        },
    );
    let batch = PreEncodedCall::new(
        &channel,
        &authorization,
        BATCH_ENCRYPT,
        &BatchEncryptRequest {
            items: vec![encrypt_request.clone(); batch_size],
        },
    );
    check_answers(
        &health,
        &encrypt,
        &decrypt,
        &batch,
        &encrypt_request.plaintext,
    )
    .await?;
    let moved = RewrapResponse::decode(rewrap.clone().call().await?)?;
    anyhow::ensure!(
        moved.rewrapped == rewrap_moves,
        "Rewrap answered rewrapped={}",
        moved.rewrapped
    );
    let (health, encrypt, decrypt, rewrap, batch) = (
        health.repeat(),
        encrypt.repeat(),
        decrypt.repeat(),
        rewrap.repeat(),
        batch.repeat(),
    );

    // Warm up connections, allocator and caches.
    run_slice(args.concurrency, Duration::from_millis(300), health.clone()).await?;
    run_slice(
        args.concurrency,
        Duration::from_millis(300),
        encrypt.clone(),
    )
    .await?;

    // Interleave short slices so that drift in the machine's speed hits
    // every operation alike.
    let mut totals = [
        Totals::new()?,
        Totals::new()?,
        Totals::new()?,
        Totals::new()?,
    ];
    // Each round's Encrypt, Decrypt and Rewrap against that round's floor:
    // their spread shows how much of a difference between runs is the
    // machine.
    let mut round_ratios = [Vec::new(), Vec::new(), Vec::new()];
    let operations = [health, encrypt, decrypt, rewrap];
    for round in 0..rounds {
        // Every other round runs in reverse order, so that a steady change
        // in the machine's speed within a round favours no operation.
        let mut order: Vec<usize> = (0..operations.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        let mut slices = [None, None, None, None];
        for n in order {
            slices[n] = Some(run_slice(args.concurrency, slice, operations[n].clone()).await?);
        }
        let [Some(floor), Some(encrypt), Some(decrypt), Some(rewrap)] = slices else {
            anyhow::bail!("a round missed an operation");
        };
        for (ratios, op) in round_ratios.iter_mut().zip([&encrypt, &decrypt, &rewrap]) {
            ratios.push(op.calls_per_sec() / floor.calls_per_sec());
        }
        for (total, op) in totals.iter_mut().zip([floor, encrypt, decrypt, rewrap]) {
            total.add(op)?;
        }
    }
    let batch_totals = {
        let mut t = Totals::new()?;
        t.add(run_slice(args.batch_concurrency, slice * rounds as u32, batch).await?)?;
        t
    };

    let floor = totals[0].result("Health/Check (floor)", 1);
    let results = vec![
        floor.clone(),
        totals[1].result("Encrypt", 1),
        totals[2].result("Decrypt", 1),
        totals[3].result(
            if rewrap_moves {
                "Rewrap"
            } else {
                "Rewrap (in place)"
            },
            1,
        ),
        batch_totals.result("BatchEncrypt", batch_size),
    ];
    println!(
        "\n{:<22} {:>14} {:>10} {:>10} {:>10} {:>12}",
        "operation", "ops/s", "vs floor", "p50 ms", "p99 ms", "CPU µs/op"
    );
    for r in &results[..4] {
        println!(
            "{:<22} {:>14.0} {:>10.2} {:>10.3} {:>10.3} {:>12}",
            r.name,
            r.ops_per_sec,
            r.ops_per_sec / floor.ops_per_sec,
            ms(r.p50),
            ms(r.p99),
            cpu_micros(r.cpu_per_op)
        );
    }
    for (name, ratios) in ["Encrypt", "Decrypt", "Rewrap"]
        .iter()
        .zip(&mut round_ratios)
    {
        ratios.sort_by(f64::total_cmp);
        if let (Some(min), Some(max)) = (ratios.first(), ratios.last()) {
            println!(
                "  {name}/floor by round: min {min:.2}, median {:.2}, max {max:.2} ({} rounds)",
                ratios[ratios.len() / 2],
                ratios.len()
            );
        }
    }
    let b = &results[4];
    println!(
        "{:<22} {:>14.0} {:>10} {:>10.3} {:>10.3} {:>12}   (items/s; {} items per request, {} in flight; latency per request)",
        b.name, b.ops_per_sec, "-", ms(b.p50), ms(b.p99), cpu_micros(b.cpu_per_op), batch_size, args.batch_concurrency
    );
    println!(
        "CPU µs/op: this process's CPU time per operation ({}).",
        if args.target.is_some() {
            "the client only"
        } else {
            "client and in-process server together"
        }
    );
    Ok(results)
}

/// `wanted` items of `payload_bytes`, or as many as fit in a request under
/// the server's default size limit (each item also carries its context and
/// field tags, well under 256 bytes here); at least one.
fn batch_size_that_fits(wanted: usize, payload_bytes: usize) -> usize {
    let per_item = payload_bytes.saturating_add(256);
    wanted.min(DEFAULT_MAX_REQUEST_BYTES / per_item).max(1)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn cpu_micros(cpu: Option<Duration>) -> String {
    cpu.map_or_else(
        || "-".to_owned(),
        |d| format!("{:.1}", d.as_secs_f64() * 1e6),
    )
}

const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";
const ENCRYPT: &str = "/keyward.v1.Crypto/Encrypt";
const DECRYPT: &str = "/keyward.v1.Crypto/Decrypt";
const BATCH_ENCRYPT: &str = "/keyward.v1.Crypto/BatchEncrypt";
const REWRAP: &str = "/keyward.v1.Crypto/Rewrap";

/// One unary call the load generator makes over and over, as load
/// generators do (h2load, ghz's binary mode, gRPC's own generic benchmark
/// client): the request is encoded once, and each response is taken as the
/// bytes of one gRPC message, not parsed. The client then spends next to no
/// CPU on protobuf, which matters when it shares the two cores with an
/// in-process server; what the server does per call is unchanged.
/// [`check_answers`] parses one response of each kind before measuring.
#[derive(Clone)]
struct PreEncodedCall {
    grpc: tonic::client::Grpc<Channel>,
    path: PathAndQuery,
    request: Bytes,
    /// `Bearer …` for a server that requires authentication.
    authorization: Option<AsciiMetadataValue>,
}

impl PreEncodedCall {
    fn new(
        channel: &Channel,
        authorization: &Option<AsciiMetadataValue>,
        path: &'static str,
        request: &impl Message,
    ) -> Self {
        Self {
            authorization: authorization.clone(),
            // A batch's response outgrows tonic's 4 MiB default from 4 KiB
            // payloads on; the server's own limits bound it.
            grpc: tonic::client::Grpc::new(channel.clone()).max_decoding_message_size(usize::MAX),
            path: PathAndQuery::from_static(path),
            request: request.encode_to_vec().into(),
        }
    }

    /// The response message's bytes; the gRPC status was checked by tonic.
    async fn call(mut self) -> Result<Bytes, tonic::Status> {
        self.grpc
            .ready()
            .await
            .map_err(|err| tonic::Status::unavailable(format!("channel not ready: {err}")))?;
        let mut request = tonic::Request::new(self.request);
        if let Some(value) = self.authorization {
            request.metadata_mut().insert("authorization", value);
        }
        self.grpc
            .unary(request, self.path, RawCodec)
            .await
            .map(tonic::Response::into_inner)
    }

    /// The call as [`run_slice`] repeats it.
    fn repeat(self) -> impl Fn() -> BoxFuture<'static, Result<(), tonic::Status>> + Clone {
        move || Box::pin(self.clone().call().map_ok(drop))
    }
}

/// Parses one response of each operation: the pre-encoded requests must
/// get the answers they stand for, or the benchmark measures errors.
async fn check_answers(
    health: &PreEncodedCall,
    encrypt: &PreEncodedCall,
    decrypt: &PreEncodedCall,
    batch: &PreEncodedCall,
    plaintext: &[u8],
) -> anyhow::Result<()> {
    let status = HealthCheckResponse::decode(health.clone().call().await?)?.status;
    anyhow::ensure!(
        status == ServingStatus::Serving as i32,
        "Health/Check answered status {status}, not SERVING"
    );
    let sealed = EncryptResponse::decode(encrypt.clone().call().await?)?;
    anyhow::ensure!(
        !sealed.blob.is_empty() || sealed.envelope.is_some(),
        "Encrypt returned no ciphertext"
    );
    let opened = DecryptResponse::decode(decrypt.clone().call().await?)?;
    anyhow::ensure!(
        opened.plaintext.as_ref() == plaintext,
        "Decrypt did not return the plaintext"
    );
    let results = BatchEncryptResponse::decode(batch.clone().call().await?)?.results;
    let ok = results
        .iter()
        .filter(|r| matches!(r.result, Some(batch_encrypt_result::Result::Ok(_))))
        .count();
    anyhow::ensure!(
        ok == results.len() && ok > 0,
        "BatchEncrypt: {ok} of {} items succeeded",
        results.len()
    );
    Ok(())
}

/// Sends [`Bytes`] already encoded and returns the message bytes received.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(&mut self, item: Bytes, buf: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        buf.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, tonic::Status> {
        Ok(Some(buf.copy_to_bytes(buf.remaining())))
    }
}

/// Calls, time and latencies of one operation, summed over slices.
struct Totals {
    calls: u64,
    elapsed: Duration,
    /// CPU time of this process over the slices, if it could be read.
    cpu: Option<Duration>,
    hist: Histogram<u64>,
}

impl Totals {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            calls: 0,
            elapsed: Duration::ZERO,
            cpu: Some(Duration::ZERO),
            hist: Histogram::new_with_bounds(1, 60_000_000, 3)?,
        })
    }

    fn add(&mut self, other: Totals) -> anyhow::Result<()> {
        self.calls += other.calls;
        self.elapsed += other.elapsed;
        self.cpu = self.cpu.zip(other.cpu).map(|(a, b)| a + b);
        self.hist.add(other.hist)?;
        Ok(())
    }

    fn calls_per_sec(&self) -> f64 {
        self.calls as f64 / self.elapsed.as_secs_f64().max(f64::EPSILON)
    }

    fn result(&self, name: &'static str, ops_per_call: usize) -> PhaseResult {
        PhaseResult {
            name,
            ops_per_sec: (self.calls as f64 * ops_per_call as f64)
                / self.elapsed.as_secs_f64().max(f64::EPSILON),
            cpu_per_op: self
                .cpu
                .map(|cpu| cpu.div_f64((self.calls as f64 * ops_per_call as f64).max(1.0))),
            p50: Duration::from_micros(self.hist.value_at_quantile(0.50)),
            p99: Duration::from_micros(self.hist.value_at_quantile(0.99)),
        }
    }
}

/// Runs `concurrency` loops of `call` for `duration`; every call must
/// succeed (a benchmark that counted failures as throughput would lie).
async fn run_slice<F, Fut>(
    concurrency: usize,
    duration: Duration,
    call: F,
) -> anyhow::Result<Totals>
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), tonic::Status>> + Send,
{
    let cpu_start = process_cpu_time();
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let call = call.clone();
        tasks.push(tokio::spawn(async move {
            let mut totals = Totals::new()?;
            while Instant::now() < deadline {
                let t = Instant::now();
                call()
                    .await
                    .map_err(|s| anyhow::anyhow!("benchmark call failed: {s}"))?;
                totals
                    .hist
                    .saturating_record(u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX));
                totals.calls += 1;
            }
            anyhow::Ok(totals)
        }));
    }
    let mut sum = Totals::new()?;
    for task in tasks {
        sum.add(task.await??)?;
    }
    sum.elapsed = start.elapsed();
    sum.cpu = process_cpu_time()
        .zip(cpu_start)
        .map(|(end, start)| end.saturating_sub(start));
    Ok(sum)
}

/// CPU time (user and system) this process's live threads have run, from
/// `/proc/self/task/*/schedstat` (Linux; nanoseconds). `None` elsewhere.
/// Threads that exited meanwhile drop out; the runtime's workers, which do
/// the measured work, live as long as the benchmark.
fn process_cpu_time() -> Option<Duration> {
    let mut total = 0_u64;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let Ok(task) = task else { continue };
        let Ok(stat) = std::fs::read_to_string(task.path().join("schedstat")) else {
            continue;
        };
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(Duration::from_nanos(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_cut_to_fit_the_default_request_limit() {
        assert_eq!(batch_size_that_fits(500, 1024), 500);
        let largest = batch_size_that_fits(500, 64 * 1024);
        assert_eq!(largest, 255);
        assert!(largest * (64 * 1024 + 256) <= DEFAULT_MAX_REQUEST_BYTES);
        assert_eq!(batch_size_that_fits(0, 1024), 1);
        assert_eq!(batch_size_that_fits(500, usize::MAX), 1);
    }
}
