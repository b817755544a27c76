//! The `aws-kms` provider end to end, against moto's KMS server: round
//! trips with context, KMS failures as gRPC codes, rotation into and
//! between AWS keys in both modes, a KMS outage mid-rotation, and the
//! data-key cache's bounds on KMS calls, and the scheduled check of every
//! live key within a KMS call budget.

use std::{sync::atomic::Ordering, time::Duration};

use keyward::{
    api::proto::{
        decrypt_request::Ciphertext, rewrap_request, ActivateKeyRequest, CreateKeyRequest,
        DecryptRequest, EncryptRequest, ListReplicasRequest, RefreshKeyMetadataRequest,
        RewrapRequest, RotationMode, RotationStatus, SelfTestRequest, StartRotationRequest,
    },
    config::KmsSettings,
    crypto::{
        cache::{CacheMode, CacheSettings},
        kms::{KmsOperation, ProviderKind},
    },
};
use keyward::{rotation::worker::WorkerOptions, service::replica::ReplicaOptions};
use tokio_util::sync::CancellationToken;
use tonic::Code;

use crate::{
    helpers::{assert_code, ctx, spawn_with, Backend, Options, TestApp},
    moto,
    rotation::{
        conn_ctx, decrypt_all, insert_legacy_row, insert_row, rotate_every_row_onto, start,
        watch_all,
    },
};

/// A server whose AWS KMS is the moto server (or the given endpoint).
async fn spawn_aws(backend: Backend, kms: KmsSettings) -> Option<TestApp> {
    spawn_with(
        backend,
        Options {
            kms,
            ..Options::default()
        },
    )
    .await
}

/// Registers (and optionally activates) a key record on `kms_key_arn`.
/// Registers a key, and waits until the server's heartbeat has checked it
/// (a KMS round trip), so a test's KMS call counts are its own.
async fn register(app: &TestApp, key_id: &str, kms_key_arn: &str, activate: bool) -> String {
    let id = app
        .admin
        .clone()
        .create_key(CreateKeyRequest {
            key_id: key_id.into(),
            kms_key_arn: kms_key_arn.into(),
            activate,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .id;
    app.wait_for_heartbeat().await;
    id
}

fn kms_calls(app: &TestApp, op: KmsOperation) -> u64 {
    let stats = app.services.crypto.kms().stats();
    stats.ok(ProviderKind::AwsKms, op) + stats.failed(ProviderKind::AwsKms, op)
}

async fn decrypt(
    app: &TestApp,
    envelope: keyward::api::proto::Envelope,
    context: &[(&str, &str)],
) -> Result<Vec<u8>, tonic::Status> {
    app.crypto
        .clone()
        .decrypt(DecryptRequest {
            context: ctx(context),
            ciphertext: Some(Ciphertext::Envelope(envelope)),
        })
        .await
        .map(|r| r.into_inner().plaintext.to_vec())
}

/// Crypto/Rewrap between two aws-kms keys moves only the data key, with
/// one KMS ReEncrypt (the data key never leaves the KMS); the context
/// stays bound, and KMS refuses another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrap_between_aws_keys_is_one_reencrypt() {
    let Some(endpoint) = moto::endpoint_or_skip() else {
        return;
    };
    let kms = moto::client(endpoint).await;
    let Some(app) = spawn_aws(Backend::Sqlite, moto::kms_settings(endpoint)).await else {
        return;
    };
    register(&app, "aws-a", &moto::create_key(&kms).await, true).await;
    let context = [("connection_id", "queue-message-9")];
    let sealed = app.encrypt(b"kept in a queue", &context).await;
    let old = sealed.envelope.unwrap();
    register(&app, "aws-b", &moto::create_key(&kms).await, true).await;
    let request = |context: &[(&str, &str)]| RewrapRequest {
        context: ctx(context),
        ciphertext: Some(rewrap_request::Ciphertext::Envelope(old.clone())),
        form: 0,
    };
    let reencrypts = kms_calls(&app, KmsOperation::ReEncrypt);
    let decrypts = kms_calls(&app, KmsOperation::Decrypt);
    let moved = app
        .crypto
        .clone()
        .rewrap(request(&context))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(kms_calls(&app, KmsOperation::ReEncrypt) - reencrypts, 1);
    assert_eq!(kms_calls(&app, KmsOperation::Decrypt) - decrypts, 0);
    assert!(moved.rewrapped);
    assert_eq!(moved.key_id, "aws-b");
    let envelope = moved.envelope.unwrap();
    assert_eq!(envelope.payload_ciphertext, old.payload_ciphertext);
    assert_eq!(
        decrypt(&app, envelope, &context).await.unwrap(),
        b"kept in a queue"
    );
    let wrong = app
        .crypto
        .clone()
        .rewrap(request(&[("connection_id", "queue-message-10")]))
        .await;
    assert_code(wrong, Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trips_bind_the_encryption_context() {
    let Some(endpoint) = moto::endpoint_or_skip() else {
        return;
    };
    let kms = moto::client(endpoint).await;
    let arn = moto::create_key(&kms).await;
    let app = spawn_aws(Backend::Sqlite, moto::kms_settings(endpoint))
        .await
        .unwrap();
    let record = register(&app, "aws-primary", &arn, true).await;

    let tenant = [("tenant", "acme")];
    let sealed = app.encrypt(b"postgres://db-password", &tenant).await;
    let envelope = sealed.envelope.unwrap();
    assert_eq!(envelope.encryption_key_id, record);
    assert!(
        envelope.data_key_iv.is_empty(),
        "KMS ciphertexts carry their own nonce"
    );
    assert_eq!(
        decrypt(&app, envelope.clone(), &tenant).await.unwrap(),
        b"postgres://db-password"
    );
    let blob = app
        .crypto
        .clone()
        .decrypt(DecryptRequest {
            context: ctx(&tenant),
            ciphertext: Some(Ciphertext::Blob(sealed.blob)),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(&blob.plaintext[..], b"postgres://db-password");

    // KMS itself refuses the data key under another context.
    let status = assert_code(
        decrypt(&app, envelope.clone(), &[("tenant", "other")]).await,
        Code::InvalidArgument,
    );
    assert!(status.message().contains("context"), "{status:?}");
    let mut tampered = envelope.clone();
    let mut wrapped = tampered.data_key_ciphertext.to_vec();
    let last = wrapped.len() - 1;
    wrapped[last] ^= 1;
    tampered.data_key_ciphertext = wrapped.into();
    assert_code(
        decrypt(&app, tampered, &tenant).await,
        Code::InvalidArgument,
    );

    // An alias names the KMS key as well as its ARN does.
    let alias = format!("alias/keyward-{}", uuid::Uuid::new_v4().simple());
    kms.create_alias()
        .alias_name(&alias)
        .target_key_id(&arn)
        .send()
        .await
        .unwrap();
    register(&app, "aws-by-alias", &alias, true).await;
    let sealed = app.encrypt(b"via alias", &tenant).await;
    assert_eq!(
        decrypt(&app, sealed.envelope.unwrap(), &tenant)
            .await
            .unwrap(),
        b"via alias"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kms_key_failures_are_failed_precondition_and_fail_health() {
    let Some(endpoint) = moto::endpoint_or_skip() else {
        return;
    };
    let kms = moto::client(endpoint).await;
    let options = || Options {
        kms: moto::kms_settings(endpoint),
        ..Options::default()
    };
    let app = spawn_with(Backend::Sqlite, options()).await.unwrap();
    let mut admin = app.admin.clone();

    // A KMS key that does not exist cannot become active.
    let missing = "arn:aws:kms:us-east-1:123456789012:key/6f1c0b2e-3d4a-4b5c-8d9e-0a1b2c3d4e5f";
    let status = assert_code(
        admin
            .create_key(CreateKeyRequest {
                key_id: "missing".into(),
                kms_key_arn: missing.into(),
                activate: true,
                ..Default::default()
            })
            .await,
        Code::FailedPrecondition,
    );
    assert!(status.message().contains("not found"), "{status:?}");

    // Neither can a disabled one.
    let disabled = moto::create_key(&kms).await;
    kms.disable_key()
        .key_id(moto::key_id(&disabled))
        .send()
        .await
        .unwrap();
    let status = assert_code(
        admin
            .create_key(CreateKeyRequest {
                key_id: "disabled".into(),
                kms_key_arn: disabled.clone(),
                activate: true,
                ..Default::default()
            })
            .await,
        Code::FailedPrecondition,
    );
    assert!(status.message().contains("disabled"), "{status:?}");

    // The active key's KMS key is disabled while in use: the self-test
    // names it, and a restarted server stays NOT_SERVING.
    let arn = moto::create_key(&kms).await;
    register(&app, "aws-live", &arn, true).await;
    kms.disable_key()
        .key_id(moto::key_id(&arn))
        .send()
        .await
        .unwrap();
    let report = admin
        .self_test(SelfTestRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!report.passed);
    let check = report.keys.iter().find(|k| k.key_id == "aws-live").unwrap();
    assert_eq!(check.provider, "aws-kms");
    assert!(!check.ok && check.error.contains("disabled"), "{check:?}");
    let local = report.keys.iter().find(|k| k.key_id == "primary").unwrap();
    assert!(local.ok, "{local:?}");

    let app = app
        .restart(Options {
            seed: false,
            ..options()
        })
        .await;
    app.wait_for_health(2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(app.health_status().await, 2, "stays NOT_SERVING");
    kms.enable_key()
        .key_id(moto::key_id(&arn))
        .send()
        .await
        .unwrap();
    app.admin
        .clone()
        .refresh_key_metadata(RefreshKeyMetadataRequest {})
        .await
        .unwrap();
    app.wait_for_health(1).await;
}

/// Rows on a local key and legacy rows rotate onto an AWS key, then between
/// two AWS keys, in both modes; every row decrypts to its plaintext after
/// each step.
async fn rotation_into_and_between_aws_keys(backend: Backend) {
    let Some(endpoint) = moto::endpoint_or_skip() else {
        return;
    };
    let kms = moto::client(endpoint).await;
    let Some(app) = spawn_aws(backend, moto::kms_settings(endpoint)).await else {
        return;
    };
    let mut expected = std::collections::HashMap::new();
    for i in 0..30 {
        let id = format!("conn-{i:02}");
        let plaintext = format!("secret number {i}");
        if i % 5 == 0 {
            insert_legacy_row(&app, &id, &plaintext, true).await;
        } else {
            insert_row(&app, &id, &plaintext).await;
        }
        expected.insert(id, plaintext);
    }

    let steps = [
        ("aws-a", RotationMode::Rewrap), // local → AWS: KMS Encrypt of the data key
        ("aws-b", RotationMode::Rewrap), // AWS → AWS: KMS ReEncrypt
        ("aws-c", RotationMode::Reencrypt), // AWS → AWS: fresh data keys
        ("aws-d", RotationMode::Reencrypt),
    ];
    for (key_id, mode) in steps {
        let record = register(&app, key_id, &moto::create_key(&kms).await, true).await;
        let reencrypts_before = kms_calls(&app, KmsOperation::ReEncrypt);
        rotate_every_row_onto(&app, &record, mode, &expected).await;
        if key_id == "aws-b" {
            // Every row moved inside KMS: one ReEncrypt each.
            assert_eq!(
                kms_calls(&app, KmsOperation::ReEncrypt) - reencrypts_before,
                30
            );
        }
    }
}

/// The KMS goes away mid-rotation: the rows it could not reach carry
/// `last_error`, the job ends `completed_with_errors`, and once the KMS is
/// back a new job finishes; no row is lost.
async fn kms_outage_mid_rotation_loses_nothing(backend: Backend) {
    let Some(endpoint) = moto::endpoint_or_skip() else {
        return;
    };
    let kms = moto::client(endpoint).await;
    let proxy = moto::Proxy::start(endpoint).await;
    let Some(app) = spawn_aws(backend, moto::kms_settings(&proxy.url())).await else {
        return;
    };
    let mut expected = std::collections::HashMap::new();
    for i in 0..60 {
        let id = format!("conn-{i:02}");
        let plaintext = format!("credential {i}");
        insert_row(&app, &id, &plaintext).await;
        expected.insert(id, plaintext);
    }
    let target = register(&app, "aws-target", &moto::create_key(&kms).await, true).await;
    let job = start(
        &app,
        StartRotationRequest {
            batch_size: 10,
            max_rows_per_second: 40,
            ..Default::default()
        },
    )
    .await;
    // Cut the KMS once the first batch is written.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let rows = app.connections().await;
        if rows
            .iter()
            .any(|r| r.encryption_key_id.as_deref() == Some(&target))
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "rotation never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proxy.cut();
    let last = watch_all(&app, &job).await.pop().unwrap().job.unwrap();
    assert_eq!(
        last.status(),
        RotationStatus::CompletedWithErrors,
        "{last:?}"
    );
    assert!(last.failed_rows > 0 && last.succeeded_rows > 0, "{last:?}");
    let failed: Vec<_> = app
        .connections()
        .await
        .into_iter()
        .filter(|r| r.last_error.is_some())
        .collect();
    assert_eq!(failed.len() as i64, last.failed_rows);
    for row in &failed {
        assert!(
            row.last_error.as_deref().unwrap().contains("kms"),
            "{:?}",
            row.last_error
        );
        assert_ne!(row.encryption_key_id.as_deref(), Some(target.as_str()));
    }

    proxy.restore();
    let job = start(&app, StartRotationRequest::default()).await;
    let last = watch_all(&app, &job).await.pop().unwrap().job.unwrap();
    assert_eq!(last.status(), RotationStatus::Completed, "{last:?}");
    for row in app.connections().await {
        assert_eq!(row.encryption_key_id.as_deref(), Some(target.as_str()));
        assert_eq!(row.last_error, None, "a finished row clears its error");
    }
    assert_eq!(decrypt_all(&app).await, expected);
}

crate::on_both_backends!(
    rotation_into_and_between_aws_keys,
    kms_outage_mid_rotation_loses_nothing
);

/// The KMS hangs while a worker is stopping: the batch in flight is
/// abandoned once the batch grace is over, nothing of it is written, its
/// lease is released at once, and when the KMS answers again the next pass
/// finishes the job with exact counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_stuck_on_a_hung_kms_is_abandoned_at_shutdown() {
    let Some(endpoint) = moto::endpoint_or_skip() else {
        return;
    };
    let kms = moto::client(endpoint).await;
    let proxy = moto::Proxy::start(endpoint).await;
    let mut settings = moto::kms_settings(&proxy.url());
    settings.aws.attempt_timeout = Duration::from_secs(60);
    settings.aws.operation_timeout = Duration::from_secs(120);
    let Some(app) = spawn_with(
        Backend::Sqlite,
        Options {
            kms: settings,
            worker: None,
            ..Options::default()
        },
    )
    .await
    else {
        return;
    };
    let mut expected = std::collections::HashMap::new();
    for i in 0..20 {
        let id = format!("conn-{i:02}");
        let plaintext = format!("credential {i}");
        insert_row(&app, &id, &plaintext).await;
        expected.insert(id, plaintext);
    }
    let target = register(&app, "aws-target", &moto::create_key(&kms).await, true).await;
    let job_id = start(
        &app,
        StartRotationRequest {
            batch_size: 10,
            ..Default::default()
        },
    )
    .await;
    let claims = "SELECT COUNT(*) FROM encryption_rotation_claims";
    let options = WorkerOptions {
        lease: Duration::from_secs(600),
        idle_poll: Duration::from_millis(50),
        batch_grace: Duration::from_millis(200),
    };

    proxy.stall();
    let worker = app.services.worker(options);
    let stop = CancellationToken::new();
    let running = tokio::spawn({
        let stop = stop.clone();
        async move { worker.run(stop).await }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while app.count(claims).await == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no batch was claimed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Stuck: the KMS does not answer.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(app.count(claims).await, 1);
    stop.cancel();
    let stopping = tokio::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(5), running)
        .await
        .expect("the worker did not stop while its KMS hung")
        .unwrap();
    assert!(
        stopping.elapsed() < Duration::from_secs(2),
        "{:?}",
        stopping.elapsed()
    );
    assert_eq!(
        app.count(claims).await,
        0,
        "the abandoned batch kept its lease"
    );
    let job = app
        .admin
        .clone()
        .get_rotation_job(keyward::api::proto::GetRotationJobRequest {
            job_id: job_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(job.processed_rows, 0, "{job:?}");
    assert!(app
        .connections()
        .await
        .iter()
        .all(|r| r.encryption_key_id.as_deref() != Some(target.as_str())));

    proxy.restore();
    let worker = app.services.worker(options);
    let stop = CancellationToken::new();
    let running = tokio::spawn({
        let stop = stop.clone();
        async move { worker.run(stop).await }
    });
    let last = watch_all(&app, &job_id).await.pop().unwrap().job.unwrap();
    stop.cancel();
    running.await.unwrap();
    assert_eq!(last.status(), RotationStatus::Completed, "{last:?}");
    assert_eq!(
        (
            last.total_rows,
            last.processed_rows,
            last.succeeded_rows,
            last.failed_rows
        ),
        (20, 20, 20, 0),
        "{last:?}"
    );
    assert_eq!(decrypt_all(&app).await, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_bounds_kms_calls_and_forgets_rotated_keys() {
    let Some(endpoint) = moto::endpoint_or_skip() else {
        return;
    };
    let kms = moto::client(endpoint).await;
    let mut settings = moto::kms_settings(endpoint);
    settings.cache = CacheSettings {
        max_messages: 100,
        ..CacheSettings::default()
    };
    let app = spawn_aws(Backend::Sqlite, settings).await.unwrap();
    register(&app, "aws-a", &moto::create_key(&kms).await, true).await;
    // Cache misses are exactly the KMS calls made for API traffic (the
    // self-test probes behind a refresh bypass the cache and are not
    // counted here).
    let stats = std::sync::Arc::clone(app.services.crypto.cache().stats());
    let generate = |_: &TestApp| stats.encrypt_misses.load(Ordering::Relaxed);
    let decrypts = |_: &TestApp| stats.decrypt_misses.load(Ordering::Relaxed);
    let base_generate = generate(&app);
    let base_decrypt = decrypts(&app);

    // 950 Encrypts in one context, 32 at a time: one data key per 100
    // messages, the tenth half used.
    let tenant = [("tenant", "acme")];
    let envelopes: Vec<_> = futures::future::join_all((0..32).map(|worker| {
        let mut client = app.crypto.clone();
        async move {
            let mut out = Vec::new();
            for i in (worker..950).step_by(32) {
                let response = client
                    .encrypt(EncryptRequest {
                        plaintext: format!("message {i}").into_bytes().into(),
                        context: ctx(&tenant),
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner();
                out.push((i, response.envelope.unwrap()));
            }
            out
        }
    }))
    .await
    .into_iter()
    .flatten()
    .collect();
    assert_eq!(generate(&app) - base_generate, 10);

    // Reading them back needs no KMS call: the data keys were cached as
    // they were generated.
    for (i, envelope) in &envelopes {
        let plaintext = decrypt(&app, envelope.clone(), &tenant).await.unwrap();
        assert_eq!(plaintext, format!("message {i}").into_bytes());
    }
    assert_eq!(decrypts(&app), base_decrypt);

    // Another context gets its own data key.
    app.encrypt(b"x", &[("tenant", "globex")]).await;
    assert_eq!(generate(&app) - base_generate, 11);

    // A refresh that changes nothing keeps the cache...
    let mut admin = app.admin.clone();
    admin
        .refresh_key_metadata(RefreshKeyMetadataRequest {})
        .await
        .unwrap();
    app.encrypt(b"x", &tenant).await;
    assert_eq!(generate(&app) - base_generate, 11);
    // ...a status change drops it: after aws-a was rotating and is active
    // again, its old data keys are not reused.
    register(&app, "aws-b", &moto::create_key(&kms).await, true).await;
    admin
        .activate_key(ActivateKeyRequest {
            key_id: "aws-a".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let before = generate(&app);
    app.encrypt(b"x", &tenant).await;
    assert_eq!(generate(&app) - before, 1);
    // And decrypting old data now costs one KMS call per data key.
    let before = decrypts(&app);
    for (_, envelope) in envelopes.iter().take(5) {
        decrypt(&app, envelope.clone(), &tenant).await.unwrap();
    }
    let distinct: std::collections::HashSet<_> = envelopes
        .iter()
        .take(5)
        .map(|(_, e)| e.data_key_ciphertext.clone())
        .collect();
    assert_eq!(decrypts(&app) - before, distinct.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_cache_off_every_encrypt_calls_kms() {
    let Some(endpoint) = moto::endpoint_or_skip() else {
        return;
    };
    let kms = moto::client(endpoint).await;
    let mut settings = moto::kms_settings(endpoint);
    settings.cache.mode = CacheMode::Off;
    let app = spawn_aws(Backend::Sqlite, settings).await.unwrap();
    register(&app, "aws-a", &moto::create_key(&kms).await, true).await;
    let before = kms_calls(&app, KmsOperation::GenerateDataKey);
    for i in 0..20 {
        let id = format!("c{i}");
        let sealed = app.encrypt(b"x", &conn_ctx(&id)).await;
        decrypt(&app, sealed.envelope.unwrap(), &conn_ctx(&id))
            .await
            .unwrap();
    }
    assert_eq!(kms_calls(&app, KmsOperation::GenerateDataKey) - before, 20);
    assert!(kms_calls(&app, KmsOperation::Decrypt) >= 20);
}

/// A key named by its full ARN needs no configured region: the ARN says
/// where the key lives. A bare key id without a region is refused, saying
/// how to fix it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_arn_carries_its_region() {
    use keyward::crypto::kms::{aws::AwsKms, KekRef, KmsError, KmsProvider};
    let Some(endpoint) = crate::moto::endpoint_or_skip() else {
        return;
    };
    let arn = crate::moto::create_key(&crate::moto::client(endpoint).await).await;
    assert!(
        arn.starts_with(&format!("arn:aws:kms:{}:", crate::moto::REGION)),
        "{arn}"
    );
    let mut settings = crate::moto::kms_settings(endpoint).aws;
    settings.region = None;
    let kms = AwsKms::new(settings);
    let kek = |kms_key_arn| KekRef {
        record_id: "r1",
        kms_key_arn,
    };
    kms.check_key(kek(&arn)).await.unwrap();
    if std::env::var_os("AWS_REGION").is_none() && std::env::var_os("AWS_DEFAULT_REGION").is_none()
    {
        let refused = kms
            .check_key(kek(crate::moto::key_id(&arn)))
            .await
            .unwrap_err();
        assert!(
            matches!(refused, KmsError::NotConfigured { .. }),
            "{refused:?}"
        );
        assert!(
            refused.to_string().contains("name the key by its ARN"),
            "{refused}"
        );
    }
}

/// This replica's readiness of `key_id` as its heartbeat reports it:
/// `Some(error)` (empty when ready), `None` before it reports the key.
async fn reported(app: &TestApp, key_id: &str) -> Option<(bool, String)> {
    let replicas = app
        .admin
        .clone()
        .list_replicas(ListReplicasRequest {})
        .await
        .unwrap()
        .into_inner()
        .replicas;
    let me = replicas
        .into_iter()
        .find(|r| r.listen == app.addr.to_string())?;
    me.keys
        .into_iter()
        .find(|k| k.key_id == key_id)
        .map(|k| (k.ready, k.error))
}

/// Waits until this replica reports `key_id` ready (or not).
async fn wait_until_reported(app: &TestApp, key_id: &str, ready: bool) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some((now, error)) = reported(app, key_id).await {
            if now == ready {
                return error;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{key_id} never reported ready={ready}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every non-retired key is checked again on a schedule within a KMS call
/// budget; a rotating key whose KMS key is disabled is reported (heartbeat,
/// metrics) while health stays SERVING, and recovers when re-enabled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_live_key_is_rechecked_within_a_kms_call_budget() {
    let Some(endpoint) = moto::endpoint_or_skip() else {
        return;
    };
    let kms = moto::client(endpoint).await;
    let interval = Duration::from_secs(2);
    let app = spawn_with(
        Backend::Sqlite,
        Options {
            kms: moto::kms_settings(endpoint),
            metrics: true,
            worker: None,
            replica: ReplicaOptions {
                heartbeat: Duration::from_millis(500),
                catalog_poll: Duration::from_millis(100),
                key_check: interval,
                ..ReplicaOptions::default()
            },
            ..Options::default()
        },
    )
    .await
    .unwrap();
    // primary (local) and aws-old end up rotating, aws-new active,
    // aws-pending pending: three AWS keys.
    let old_arn = moto::create_key(&kms).await;
    register(&app, "aws-old", &old_arn, true).await;
    register(&app, "aws-new", &moto::create_key(&kms).await, true).await;
    register(&app, "aws-pending", &moto::create_key(&kms).await, false).await;

    // The budget: each key at most once per interval (plus jitter); a
    // check is a round trip and the probe for the active key (at most 4
    // calls: DescribeKey, GenerateDataKey, Decrypt twice), a look at the
    // KMS key and the probe for the others (DescribeKey, Decrypt).
    let calls = || {
        app.services
            .crypto
            .kms()
            .stats()
            .total(ProviderKind::AwsKms)
    };
    let before = calls();
    let window = Duration::from_secs(7);
    tokio::time::sleep(window).await;
    let spent = calls() - before;
    let checks_per_key = (window.as_secs_f64() / interval.as_secs_f64()).floor() as u64 + 1;
    let budget = checks_per_key * (4 + 2 + 2);
    assert!(
        spent <= budget,
        "{spent} AWS KMS calls in {window:?}, budget {budget}"
    );
    println!("{spent} AWS KMS calls in {window:?}: 3 AWS keys checked every {interval:?} (budget {budget})");
    // And the keys were checked again: each at least once in the window.
    assert!(spent >= 3, "{spent} AWS KMS calls in {window:?}");
    assert_eq!(wait_until_reported(&app, "aws-old", true).await, "");

    // The rotating key's KMS key is disabled: reported within the
    // interval, on the heartbeat and in the metrics; health stays SERVING.
    kms.disable_key()
        .key_id(moto::key_id(&old_arn))
        .send()
        .await
        .unwrap();
    let error = wait_until_reported(&app, "aws-old", false).await;
    assert!(error.contains("disabled"), "{error}");
    assert_eq!(
        app.health_status().await,
        1,
        "a rotating key does not stop serving"
    );
    let scrape = crate::metrics::scrape_text(&app).await;
    assert!(
        scrape.contains(r#"keyward_key_ready{key_id="aws-old",status="rotating"} 0"#),
        "{scrape}"
    );
    assert!(
        scrape.contains(r#"keyward_key_ready{key_id="aws-new",status="active"} 1"#),
        "{scrape}"
    );

    // Re-enabled: it recovers on its next check.
    kms.enable_key()
        .key_id(moto::key_id(&old_arn))
        .send()
        .await
        .unwrap();
    wait_until_reported(&app, "aws-old", true).await;
    let scrape = crate::metrics::scrape_text(&app).await;
    assert!(
        scrape.contains(r#"keyward_key_ready{key_id="aws-old",status="rotating"} 1"#),
        "{scrape}"
    );
    assert_eq!(app.health_status().await, 1);
}
