//! The `pkcs11` provider end to end, against a real SoftHSM2 token
//! (`softhsm`): round trips bound to the context, tampering and a wrong
//! context refused, key objects that are sensitive and never extractable
//! (read back from the token), a missing object named in the error, and
//! rotation local → pkcs11 → pkcs11 on both backends with every row
//! checked.

use keyward::{
    api::proto::{
        decrypt_request::Ciphertext, CreateKeyRequest, DecryptRequest, RotationMode,
        RotationStatus, SelfTestRequest, StartRotationRequest,
    },
    config::KmsSettings,
    crypto::kms::pkcs11::{KeyObject, Pkcs11Kms},
};
use tonic::Code;

use crate::{
    helpers::{assert_code, ctx, spawn_with, Backend, Options, TestApp},
    rotation::{
        decrypt_all, insert_legacy_row, insert_row, rotate_every_row_onto, start, watch_all,
    },
    softhsm::{hsm_or_skip, SoftHsm, OUTAGE_TOKEN},
};

/// A server whose pkcs11 provider uses the test token.
async fn spawn_hsm(backend: Backend, hsm: &SoftHsm) -> Option<TestApp> {
    spawn_with(
        backend,
        Options {
            kms: KmsSettings {
                pkcs11: Some(hsm.settings()),
                ..KmsSettings::default()
            },
            ..Options::default()
        },
    )
    .await
}

/// A key object of the test's own on the token, and a key record on it.
async fn hsm_key(app: &TestApp, hsm: &SoftHsm, key_id: &str, activate: bool) -> String {
    let uri = hsm.uri(&format!("{key_id}-{}", uuid::Uuid::new_v4()));
    let made = Pkcs11Kms::new(Some(hsm.settings()))
        .create_key_object(&uri)
        .await
        .unwrap();
    assert_eq!(made, KeyObject::Generated);
    let record = app
        .admin
        .clone()
        .create_key(CreateKeyRequest {
            key_id: key_id.into(),
            kms_key_arn: uri,
            activate,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(record.provider, "pkcs11");
    record.id
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hsm_keys_round_trip_bound_to_the_context() {
    let Some(hsm) = hsm_or_skip() else {
        return;
    };
    let app = spawn_hsm(Backend::Sqlite, hsm).await.unwrap();
    let record = hsm_key(&app, hsm, "hsm-1", true).await;
    let row = [("connection_id", "42")];
    let sealed = app.encrypt(b"hunter2", &row).await;
    let envelope = sealed.envelope.unwrap();
    assert_eq!(envelope.encryption_key_id, record);
    assert_eq!(envelope.data_key_iv.len(), 12, "the HSM wrap's nonce");
    assert_eq!(
        envelope.data_key_ciphertext.len(),
        32 + 16,
        "key and GCM tag"
    );
    assert_eq!(
        decrypt(&app, envelope.clone(), &row).await.unwrap(),
        b"hunter2"
    );
    // Another row's context: the HSM's GCM tag does not verify.
    assert_code(
        decrypt(&app, envelope.clone(), &[("connection_id", "43")]).await,
        Code::InvalidArgument,
    );
    // A modified wrapped key, and a modified nonce.
    let mut tampered = envelope.clone();
    let mut dk = tampered.data_key_ciphertext.to_vec();
    dk[5] ^= 1;
    tampered.data_key_ciphertext = dk.into();
    assert_code(decrypt(&app, tampered, &row).await, Code::InvalidArgument);
    let mut tampered = envelope;
    let mut iv = tampered.data_key_iv.to_vec();
    iv[0] ^= 1;
    tampered.data_key_iv = iv.into();
    assert_code(decrypt(&app, tampered, &row).await, Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_objects_are_sensitive_and_never_extractable() {
    let Some(hsm) = hsm_or_skip() else {
        return;
    };
    let uri = hsm.uri(&format!("attrs-{}", uuid::Uuid::new_v4()));
    let kms = Pkcs11Kms::new(Some(hsm.settings()));
    assert_eq!(
        kms.create_key_object(&uri).await.unwrap(),
        KeyObject::Generated
    );
    // Asked again, the object is adopted, not duplicated.
    assert_eq!(
        kms.create_key_object(&uri).await.unwrap(),
        KeyObject::Adopted
    );
    let info = kms.describe_key_object(&uri).await.unwrap();
    assert!(info.sensitive && info.always_sensitive, "{info:?}");
    assert!(!info.extractable && info.never_extractable, "{info:?}");
    assert_eq!(info.value_len, 32, "AES-256");
    assert!(!info.value_readable, "the token gave out the key's value");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_key_object_is_named_and_not_activated() {
    let Some(hsm) = hsm_or_skip() else {
        return;
    };
    let app = spawn_hsm(Backend::Sqlite, hsm).await.unwrap();
    let uri = hsm.uri("no-such-object");
    let status = assert_code(
        app.admin
            .clone()
            .create_key(CreateKeyRequest {
                key_id: "ghost".into(),
                kms_key_arn: uri.clone(),
                activate: true,
                ..Default::default()
            })
            .await,
        Code::FailedPrecondition,
    );
    assert!(status.message().contains(&uri), "{status:?}");
    // Another token than this process's: refused, saying which.
    let status = assert_code(
        app.admin
            .clone()
            .create_key(CreateKeyRequest {
                key_id: "elsewhere".into(),
                kms_key_arn: "pkcs11:token=other;object=k".into(),
                activate: true,
                ..Default::default()
            })
            .await,
        Code::FailedPrecondition,
    );
    assert!(status.message().contains("other"), "{status:?}");
    // A module that cannot be loaded: UNAVAILABLE, naming it.
    let broken = Pkcs11Kms::new(Some(keyward::crypto::kms::Pkcs11Settings {
        module: "/nonexistent/libpkcs11.so".into(),
        ..hsm.settings()
    }));
    let err = broken.create_key_object(&uri).await.unwrap_err();
    let status = keyward::api::status::to_status(&keyward::error::Error::from(err));
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("/nonexistent/libpkcs11.so"),
        "{status:?}"
    );
}

/// Rows on a local key and legacy rows rotate into an HSM key, then to
/// another HSM key, in both modes, then out of the HSM onto a local key;
/// every row decrypts after each step.
async fn rotation_into_and_between_hsm_keys(backend: Backend) {
    let Some(hsm) = hsm_or_skip() else {
        return;
    };
    let Some(app) = spawn_hsm(backend, hsm).await else {
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
        ("hsm-a", RotationMode::Rewrap), // local → HSM: the data key wrapped in the HSM
        ("hsm-b", RotationMode::Rewrap), // HSM → HSM: unwrapped and wrapped in the HSM
        ("hsm-c", RotationMode::Reencrypt), // fresh data keys
    ];
    for (key_id, mode) in steps {
        let record = hsm_key(&app, hsm, key_id, true).await;
        rotate_every_row_onto(&app, &record, mode, &expected).await;
    }
    // And out of the HSM, onto a local key.
    let local = app
        .admin
        .clone()
        .create_key(CreateKeyRequest {
            key_id: "local-again".into(),
            activate: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .id;
    rotate_every_row_onto(&app, &local, RotationMode::Reencrypt, &expected).await;
}

/// The token refuses keyward mid-rotation (its PIN changed and the
/// process logged out: a wrong PIN from then on): the rows it could not
/// wrap carry `last_error` naming the key, the job ends
/// `completed_with_errors`, the self-test names it and health turns
/// NOT_SERVING (the key is the active one), nothing is lost, and once the
/// PIN is right again health recovers and a new job finishes.
async fn an_hsm_outage_mid_rotation_loses_nothing(backend: Backend) {
    // One test at a time changes the outage token's PIN.
    static OUTAGE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let Some(hsm) = hsm_or_skip() else {
        return;
    };
    let _alone = OUTAGE.lock().await;
    let Some(app) = spawn_with(
        backend,
        Options {
            kms: KmsSettings {
                pkcs11: Some(hsm.settings_of(OUTAGE_TOKEN)),
                ..KmsSettings::default()
            },
            ..Options::default()
        },
    )
    .await
    else {
        return;
    };
    let mut expected = std::collections::HashMap::new();
    for i in 0..60 {
        let id = format!("conn-{i:02}");
        let plaintext = format!("credential {i}");
        insert_row(&app, &id, &plaintext).await;
        expected.insert(id, plaintext);
    }
    let uri = format!(
        "pkcs11:token={OUTAGE_TOKEN};object=outage-{}",
        uuid::Uuid::new_v4()
    );
    let made = Pkcs11Kms::new(Some(hsm.settings_of(OUTAGE_TOKEN)))
        .create_key_object(&uri)
        .await
        .unwrap();
    assert_eq!(made, KeyObject::Generated);
    let target = app
        .admin
        .clone()
        .create_key(CreateKeyRequest {
            key_id: "hsm-target".into(),
            kms_key_arn: uri.clone(),
            activate: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .id;
    let job = start(
        &app,
        StartRotationRequest {
            mode: RotationMode::Rewrap.into(),
            batch_size: 10,
            max_rows_per_second: 40,
            ..Default::default()
        },
    )
    .await;
    // Change the PIN once the first batch is written.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while !app
        .connections()
        .await
        .iter()
        .any(|r| r.encryption_key_id.as_deref() == Some(&target))
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "rotation never started"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    hsm.outage(true);
    let last = watch_all(&app, &job).await.pop().unwrap().job.unwrap();
    // The self-test and health say so: the active key fails its check.
    let report = app
        .admin
        .clone()
        .self_test(SelfTestRequest {})
        .await
        .unwrap()
        .into_inner();
    let check = report
        .keys
        .iter()
        .find(|k| k.key_id == "hsm-target")
        .unwrap();
    assert!(
        !check.ok && check.error.contains("refused this process's PIN"),
        "{check:?}"
    );
    app.wait_for_health(2).await;
    hsm.outage(false);
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
        let error = row.last_error.as_deref().unwrap();
        assert!(error.contains(&uri), "the error names the key: {error}");
        assert!(error.contains("refused this process's PIN"), "{error}");
        assert_ne!(row.encryption_key_id.as_deref(), Some(target.as_str()));
    }

    let report = app
        .admin
        .clone()
        .self_test(SelfTestRequest {})
        .await
        .unwrap();
    assert!(report.into_inner().passed);
    app.wait_for_health(1).await;
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
    rotation_into_and_between_hsm_keys,
    an_hsm_outage_mid_rotation_loses_nothing
);

/// The operator's path, as processes: `keys create --generate --activate`
/// with the PIN from a file, a self-test, `serve` with the HSM key active,
/// then the PIN from the environment, wrong: refused, naming the key; the
/// PIN is in no output, not even at trace level.
#[test]
fn the_cli_generates_keys_and_never_prints_the_pin() {
    let Some(hsm) = hsm_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let uri = hsm.uri(&format!("cli-{}", uuid::Uuid::new_v4()));
    let keyward = |pin_from_env: Option<&str>| {
        let mut cmd = crate::cli::keyward(dir.path());
        cmd.env(
            "ENCRYPTION_MASTER_KEY",
            "pkcs11-cli-test-master-secret-0123456789",
        )
        .env("SOFTHSM2_CONF", &hsm.conf)
        .env("RUST_LOG", "trace")
        .env("KEYWARD_AUDIT_LOG", dir.path().join("audit.log"))
        .args(["--pkcs11-module", &hsm.module.display().to_string()])
        .args(["--pkcs11-token", crate::softhsm::TOKEN]);
        match pin_from_env {
            Some(pin) => cmd.env("KEYWARD_PKCS11_PIN", pin),
            None => cmd.args(["--pkcs11-pin-file", &hsm.pin_file.display().to_string()]),
        };
        cmd
    };
    let output = |out: &std::process::Output| {
        format!("{}{}", crate::cli::stdout(out), crate::cli::stderr(out))
    };
    assert!(crate::cli::run(keyward(None).arg("seed-key"))
        .status
        .success());
    let created = crate::cli::run(keyward(None).args([
        "keys",
        "create",
        "--key-id",
        "hsm-cli",
        "--kms-key-arn",
        &uri,
        "--generate",
        "--activate",
    ]));
    let text = output(&created);
    assert!(created.status.success(), "{text}");
    assert!(text.contains("generated an AES-256 key object"), "{text}");
    assert!(
        !text.contains(crate::softhsm::PIN),
        "the PIN was printed: {text}"
    );
    let tested = crate::cli::run(keyward(None).arg("self-test"));
    let text = output(&tested);
    assert!(tested.status.success(), "{text}");
    assert!(text.contains("hsm-cli (pkcs11, active)"), "{text}");
    assert!(
        !text.contains(crate::softhsm::PIN),
        "the PIN was printed: {text}"
    );

    // keyward serve with the HSM key active, at trace level, then stopped.
    let addr = format!("127.0.0.1:{}", crate::cli::free_port());
    let mut cmd = keyward(None);
    cmd.args(["serve", "--listen", &addr, "--audit-log", "off"]);
    let mut server = crate::cli::Server::spawn(cmd, addr);
    // Logged once the active key (the HSM's) passed its round trip.
    server.wait_for_log("Encryption service initialized successfully");
    server.signal("-TERM");
    server.wait_exit(std::time::Duration::from_secs(15));
    let log = server.log();
    assert!(
        !log.contains(crate::softhsm::PIN),
        "the PIN was logged: {log}"
    );

    let wrong = "13579-wrong-pin";
    let refused = crate::cli::run(keyward(Some(wrong)).arg("self-test"));
    let text = output(&refused);
    assert!(!refused.status.success(), "{text}");
    assert!(text.contains("refused this process's PIN"), "{text}");
    assert!(text.contains(&uri), "the error names the key: {text}");
    assert!(
        !text.contains(wrong) && !text.contains(crate::softhsm::PIN),
        "{text}"
    );
}
