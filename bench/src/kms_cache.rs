//! `keyward-bench kms-cache`: what the data-key cache saves on a remote KMS
//! or an HSM.
//!
//! Against an AWS KMS endpoint (moto's server stands in for AWS), or with
//! `--provider pkcs11` an HSM's PKCS#11 token (SoftHSM2 stands in for one),
//! it starts an in-process server twice, once with the cache on and once
//! off, each with an active key of that provider; measures the
//! `Health/Check` floor on the same channel at the same concurrency; drives
//! a fixed number of Encrypts (one encryption context, as one tenant's
//! writes) and then Decrypts of what was just written (warm: as the writer
//! reads back; cold: after the cache is emptied, as another replica would);
//! and reports requests/s, Encrypt ÷ floor and the KMS (HSM) calls keyward
//! made for each, counted by keyward itself
//! (`keyward::crypto::kms::KmsCallStats`).

use std::{
    collections::{HashMap, HashSet},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex, PoisonError,
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::Args;
use tonic::transport::Endpoint;

use keyward::{
    config::KmsSettings,
    crypto::{
        blob,
        cache::CacheMode,
        kms::{AwsKmsSettings, KmsOperation, ProviderKind},
    },
    service::admin::CreateKey,
};
use keyward_client::proto::{
    crypto_client::CryptoClient, decrypt_request, DecryptRequest, EncryptRequest, EnvelopeForm,
};

use crate::server::InProcessServer;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Provider {
    AwsKms,
    Pkcs11,
}

#[derive(Debug, Clone, Args)]
pub struct KmsCacheArgs {
    /// Where the key lives: AWS KMS (or a KMS-compatible server) or an HSM.
    #[arg(long, value_enum, default_value_t = Provider::AwsKms)]
    pub provider: Provider,
    /// AWS region (default: the standard AWS chain).
    #[arg(long, env = "AWS_REGION")]
    pub aws_region: Option<String>,
    /// Endpoint of a KMS-compatible server instead of AWS's (e.g. moto).
    #[arg(long, env = "KEYWARD_AWS_KMS_ENDPOINT")]
    pub aws_kms_endpoint: Option<String>,
    /// Encrypts (then as many Decrypts) per run.
    #[arg(long, default_value_t = 10_000)]
    pub requests: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Plaintext size.
    #[arg(long, default_value_t = 1024)]
    pub payload_bytes: usize,
    /// KMS key to use; default: create one on the endpoint (or a key
    /// object on the token).
    #[arg(long)]
    pub kms_key_arn: Option<String>,
    /// PKCS#11 module, with --provider pkcs11.
    #[arg(long, env = "KEYWARD_PKCS11_MODULE")]
    pub pkcs11_module: Option<std::path::PathBuf>,
    /// Token label, with --provider pkcs11.
    #[arg(long, env = "KEYWARD_PKCS11_TOKEN")]
    pub pkcs11_token: Option<String>,
    /// File holding the token's user PIN (or set KEYWARD_PKCS11_PIN).
    #[arg(long, env = "KEYWARD_PKCS11_PIN_FILE")]
    pub pkcs11_pin_file: Option<std::path::PathBuf>,
    /// PKCS#11 sessions keyward keeps open (default: keyward's, twice the
    /// cores).
    #[arg(long)]
    pub pkcs11_sessions: Option<usize>,
}

/// What one run measured.
struct RunResult {
    mode: &'static str,
    /// `Health/Check` per second on the same channel.
    floor_per_sec: f64,
    encrypt_per_sec: f64,
    generate_calls: u64,
    decrypt_per_sec: f64,
    decrypt_calls: u64,
    /// Decrypts again after emptying the cache (data written by another
    /// replica, or before a restart): KMS calls and rate.
    cold_decrypt_per_sec: f64,
    cold_decrypt_calls: u64,
    distinct_data_keys: usize,
}

pub async fn run(args: KmsCacheArgs) -> anyhow::Result<()> {
    let mut kms = KmsSettings {
        aws: AwsKmsSettings {
            region: args.aws_region.clone().filter(|r| !r.is_empty()),
            endpoint: args.aws_kms_endpoint.clone().filter(|e| !e.is_empty()),
            ..AwsKmsSettings::default()
        },
        ..KmsSettings::default()
    };
    let (kind, arn, place) = match args.provider {
        Provider::AwsKms => {
            let arn = match &args.kms_key_arn {
                Some(arn) => arn.clone(),
                None => create_kms_key(&kms).await?,
            };
            let place = format!("KMS {}", kms.aws.endpoint.as_deref().unwrap_or("(AWS)"));
            (ProviderKind::AwsKms, arn, place)
        }
        Provider::Pkcs11 => {
            let settings = pkcs11_settings(&args)?;
            let arn = match &args.kms_key_arn {
                Some(arn) => arn.clone(),
                None => {
                    let arn = format!(
                        "pkcs11:token={};object=keyward-bench-{}",
                        settings.token,
                        uuid::Uuid::new_v4().simple()
                    );
                    keyward::crypto::kms::pkcs11::Pkcs11Kms::new(Some(settings.clone()))
                        .create_key_object(&arn)
                        .await
                        .context("creating the key object on the token")?;
                    arn
                }
            };
            let place = format!(
                "HSM {} (sessions: {})",
                settings.module.display(),
                settings.sessions
            );
            kms.pkcs11 = Some(settings);
            (ProviderKind::Pkcs11, arn, place)
        }
    };
    println!(
        "keyward-bench kms-cache: {place}, key {arn}, {} Encrypts then {} Decrypts of {} bytes, concurrency {}",
        args.requests,
        args.requests,
        args.payload_bytes,
        args.concurrency
    );
    let mut results = Vec::new();
    for (mode, label) in [(CacheMode::Auto, "cache on"), (CacheMode::Off, "cache off")] {
        let mut settings = kms.clone();
        settings.cache.mode = mode;
        results.push(run_once(settings, kind, &arn, label, &args).await?);
    }
    println!(
        "\n{:<10} {:>9} {:>10} {:>8} {:>16} {:>10} {:>12} {:>15} {:>17} {:>10}",
        "run",
        "floor/s",
        "Encrypt/s",
        "/floor",
        "KMS generate",
        "Decrypt/s",
        "KMS Decrypt",
        "cold Decrypt/s",
        "cold KMS Decrypt",
        "data keys"
    );
    for r in &results {
        println!(
            "{:<10} {:>9.0} {:>10.0} {:>8.3} {:>16} {:>10.0} {:>12} {:>15.0} {:>17} {:>10}",
            r.mode,
            r.floor_per_sec,
            r.encrypt_per_sec,
            r.encrypt_per_sec / r.floor_per_sec.max(f64::EPSILON),
            r.generate_calls,
            r.decrypt_per_sec,
            r.decrypt_calls,
            r.cold_decrypt_per_sec,
            r.cold_decrypt_calls,
            r.distinct_data_keys
        );
    }
    if let [on, off] = &results[..] {
        println!(
            "\ncache on: {:.2} KMS calls per 1,000 Encrypts; KMS Decrypts per distinct data key: \
             {:.2} warm, {:.2} cold; Encrypt {:.1}x and Decrypt {:.1}x the cache-off rate",
            on.generate_calls as f64 * 1000.0 / args.requests.max(1) as f64,
            on.decrypt_calls as f64 / on.distinct_data_keys.max(1) as f64,
            on.cold_decrypt_calls as f64 / on.distinct_data_keys.max(1) as f64,
            on.encrypt_per_sec / off.encrypt_per_sec.max(f64::EPSILON),
            on.decrypt_per_sec / off.decrypt_per_sec.max(f64::EPSILON),
        );
    }
    Ok(())
}

/// The HSM of `--provider pkcs11`.
fn pkcs11_settings(args: &KmsCacheArgs) -> anyhow::Result<keyward::crypto::kms::Pkcs11Settings> {
    let module = args
        .pkcs11_module
        .clone()
        .context("--provider pkcs11 needs --pkcs11-module")?;
    let token = args
        .pkcs11_token
        .clone()
        .context("--provider pkcs11 needs --pkcs11-token")?;
    let pin = keyward::crypto::kms::Pkcs11Pin::load(args.pkcs11_pin_file.as_deref())
        .map_err(anyhow::Error::msg)?;
    Ok(keyward::crypto::kms::Pkcs11Settings {
        module,
        token,
        pin,
        sessions: args
            .pkcs11_sessions
            .unwrap_or_else(keyward::crypto::kms::Pkcs11Settings::default_sessions)
            .max(1),
    })
}

async fn create_kms_key(kms: &KmsSettings) -> anyhow::Result<String> {
    let config = keyward::crypto::kms::aws::load_sdk_config(&kms.aws).await;
    let client = aws_sdk_kms::Client::new(&config);
    let out = client
        .create_key()
        .description("keyward-bench kms-cache")
        .send()
        .await
        .context("creating a KMS key (give --kms-key-arn to use an existing one)")?;
    out.key_metadata
        .and_then(|m| m.arn)
        .context("CreateKey returned no ARN")
}

async fn run_once(
    kms: KmsSettings,
    kind: ProviderKind,
    arn: &str,
    label: &'static str,
    args: &KmsCacheArgs,
) -> anyhow::Result<RunResult> {
    let server = InProcessServer::start(kms).await?;
    server
        .services
        .admin
        .create_key(CreateKey {
            key_id: format!("bench-{}", uuid::Uuid::new_v4().simple()),
            kms_key_arn: arn.to_owned(),
            activate: true,
            ..CreateKey::default()
        })
        .await
        .context("registering the key")?;
    let channel = Endpoint::from_shared(server.url.clone())?
        .tcp_nodelay(true)
        .connect()
        .await?;
    let client = CryptoClient::new(channel.clone());
    let stats = Arc::clone(server.services.crypto.kms().stats());
    let calls = |op| stats.ok(kind, op) + stats.failed(kind, op);
    let health = tonic_health::pb::health_client::HealthClient::new(channel);
    let floor_time = drive(args.requests, args.concurrency, move |_| {
        let mut health = health.clone();
        async move {
            health
                .check(tonic_health::pb::HealthCheckRequest::default())
                .await
                .map(drop)
        }
    })
    .await?;
    let context: HashMap<String, String> = [("tenant".to_owned(), "bench".to_owned())].into();

    let request = EncryptRequest {
        plaintext: vec![0x5a_u8; args.payload_bytes.max(1)].into(),
        context: context.clone(),
        form: EnvelopeForm::Blob as i32,
    };
    let before = calls(KmsOperation::GenerateDataKey);
    let blobs = Arc::new(Mutex::new(Vec::with_capacity(args.requests)));
    let encrypt_time = drive(args.requests, args.concurrency, {
        let (client, blobs) = (client.clone(), Arc::clone(&blobs));
        move |_| {
            let (mut client, blobs, request) =
                (client.clone(), Arc::clone(&blobs), request.clone());
            async move {
                let blob = client.encrypt(request).await?.into_inner().blob;
                blobs
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(blob);
                Ok(())
            }
        }
    })
    .await?;
    let generate_calls = calls(KmsOperation::GenerateDataKey) - before;

    let blobs: Arc<Vec<bytes::Bytes>> = Arc::new(std::mem::take(
        &mut *blobs.lock().unwrap_or_else(PoisonError::into_inner),
    ));
    let distinct_data_keys = blobs
        .iter()
        .filter_map(|b| blob::parse(b).ok())
        .map(|e| e.data_key_ciphertext)
        .collect::<HashSet<_>>()
        .len();
    let decrypt_all = || {
        drive(blobs.len(), args.concurrency, {
            let (client, blobs, context) = (client.clone(), Arc::clone(&blobs), context.clone());
            move |i| {
                let mut client = client.clone();
                let request = DecryptRequest {
                    context: context.clone(),
                    ciphertext: Some(decrypt_request::Ciphertext::Blob(blobs[i].clone())),
                };
                async move { client.decrypt(request).await.map(drop) }
            }
        })
    };
    let before = calls(KmsOperation::Decrypt);
    let decrypt_time = decrypt_all().await?;
    let decrypt_calls = calls(KmsOperation::Decrypt) - before;
    server.services.crypto.cache().invalidate_all();
    let before = calls(KmsOperation::Decrypt);
    let cold_decrypt_time = decrypt_all().await?;
    let cold_decrypt_calls = calls(KmsOperation::Decrypt) - before;

    Ok(RunResult {
        mode: label,
        floor_per_sec: args.requests as f64 / floor_time.as_secs_f64().max(f64::EPSILON),
        encrypt_per_sec: args.requests as f64 / encrypt_time.as_secs_f64().max(f64::EPSILON),
        generate_calls,
        decrypt_per_sec: blobs.len() as f64 / decrypt_time.as_secs_f64().max(f64::EPSILON),
        decrypt_calls,
        cold_decrypt_per_sec: blobs.len() as f64
            / cold_decrypt_time.as_secs_f64().max(f64::EPSILON),
        cold_decrypt_calls,
        distinct_data_keys,
    })
}

/// Makes `total` calls, `concurrency` at a time; every call must succeed.
async fn drive<F, Fut>(total: usize, concurrency: usize, call: F) -> anyhow::Result<Duration>
where
    F: Fn(usize) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), tonic::Status>> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = (0..concurrency.max(1))
        .map(|_| {
            let (call, next) = (call.clone(), Arc::clone(&next));
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        return anyhow::Ok(());
                    }
                    call(i)
                        .await
                        .map_err(|s| anyhow::anyhow!("benchmark call failed: {s}"))?;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    Ok(start.elapsed())
}
