//! keyward.v1.Crypto end to end: round trips, context binding, tampering,
//! malformed input, limits, batches and legacy rows.

use keyward::{
    api::proto::{
        batch_decrypt_result, batch_encrypt_result, decrypt_request::Ciphertext,
        ActivateKeyRequest, BatchDecryptRequest, BatchEncryptRequest, CreateKeyRequest,
        DecryptRequest, EncryptRequest, Envelope, EnvelopeForm, RetireKeyRequest,
    },
    crypto::{legacy::encrypt_legacy, secret::MasterSecret},
    service::crypto::Limits,
};
use tonic::Code;

use crate::helpers::{assert_code, ctx, master, spawn, spawn_with, Backend, Options, MASTER};

fn decrypt_blob(blob: impl Into<bytes::Bytes>, context: &[(&str, &str)]) -> DecryptRequest {
    DecryptRequest {
        context: ctx(context),
        ciphertext: Some(Ciphertext::Blob(blob.into())),
    }
}

fn decrypt_envelope(envelope: Envelope, context: &[(&str, &str)]) -> DecryptRequest {
    DecryptRequest {
        context: ctx(context),
        ciphertext: Some(Ciphertext::Envelope(envelope)),
    }
}

const CONN: &[(&str, &str)] = &[("connection_id", "42")];

/// XORs one byte of a protobuf `bytes` field.
fn flip(field: &mut bytes::Bytes, index: usize, mask: u8) {
    let mut bytes = field.to_vec();
    bytes[index] ^= mask;
    *field = bytes.into();
}

async fn round_trip_in_both_forms(backend: Backend) {
    let Some(app) = spawn(backend).await else {
        return;
    };
    let secret = b"postgres://app:s3cret@db.internal/app";
    let sealed = app.encrypt(secret, CONN).await;
    let envelope = sealed.envelope.clone().unwrap();
    assert_eq!(sealed.key_id, crate::helpers::PRIMARY);
    assert!(!envelope.encryption_key_id.is_empty());
    assert_eq!(envelope.payload_iv.len(), 12);
    assert_eq!(envelope.data_key_iv.len(), 12);
    assert_eq!(envelope.payload_ciphertext.len(), secret.len() + 16);
    assert!(
        !sealed.blob.windows(secret.len()).any(|w| w == secret),
        "plaintext visible in blob"
    );

    let mut client = app.crypto.clone();
    for request in [
        decrypt_blob(sealed.blob.clone(), CONN),
        decrypt_envelope(envelope.clone(), CONN),
    ] {
        let opened = client.decrypt(request).await.unwrap().into_inner();
        assert_eq!(&opened.plaintext[..], secret);
        assert_eq!(opened.encryption_key_id, envelope.encryption_key_id);
        assert!(!opened.legacy);
    }

    // Two encryptions of one plaintext share nothing.
    let again = app.encrypt(secret, CONN).await.envelope.unwrap();
    assert_ne!(again.data_key_ciphertext, envelope.data_key_ciphertext);
    assert_ne!(again.payload_ciphertext, envelope.payload_ciphertext);
}

async fn encrypt_returns_the_forms_asked_for(backend: Backend) {
    let Some(app) = spawn(backend).await else {
        return;
    };
    let mut client = app.crypto.clone();
    let request = |form: EnvelopeForm| EncryptRequest {
        plaintext: b"formed".to_vec().into(),
        context: ctx(CONN),
        form: form as i32,
    };
    let blob_only = client
        .encrypt(request(EnvelopeForm::Blob))
        .await
        .unwrap()
        .into_inner();
    assert!(blob_only.envelope.is_none());
    assert!(!blob_only.blob.is_empty());
    let fields_only = client
        .encrypt(request(EnvelopeForm::Fields))
        .await
        .unwrap()
        .into_inner();
    assert!(fields_only.blob.is_empty());
    let both = client
        .encrypt(request(EnvelopeForm::Both))
        .await
        .unwrap()
        .into_inner();
    assert!(both.envelope.is_some() && !both.blob.is_empty());
    for req in [
        decrypt_blob(blob_only.blob, CONN),
        decrypt_envelope(fields_only.envelope.unwrap(), CONN),
    ] {
        let opened = client.decrypt(req).await.unwrap().into_inner();
        assert_eq!(&opened.plaintext[..], b"formed");
    }
}

async fn wrong_context_fails(backend: Backend) {
    let Some(app) = spawn(backend).await else {
        return;
    };
    let sealed = app.encrypt(b"token", CONN).await;
    let mut client = app.crypto.clone();
    let other_contexts: [&[(&str, &str)]; 4] = [
        &[("connection_id", "43")],
        &[],
        &[("connection_id", "42"), ("tenant", "acme")],
        &[("Connection_id", "42")],
    ];
    for context in other_contexts {
        let status = assert_code(
            client
                .decrypt(decrypt_blob(sealed.blob.clone(), context))
                .await,
            Code::InvalidArgument,
        );
        assert!(
            status.message().contains("encryption context"),
            "{status:?}"
        );
    }
}

async fn any_tampered_field_fails_without_internal(backend: Backend) {
    let Some(app) = spawn(backend).await else {
        return;
    };
    let envelope = app.encrypt(b"token", CONN).await.envelope.unwrap();
    let mut client = app.crypto.clone();
    type Mutation = Box<dyn Fn(&mut Envelope)>;
    let mutations: Vec<(&str, Mutation, Code)> = vec![
        (
            "payload byte",
            Box::new(|e| flip(&mut e.payload_ciphertext, 0, 1)),
            Code::InvalidArgument,
        ),
        (
            "tag byte",
            Box::new(|e| {
                let last = e.payload_ciphertext.len() - 1;
                flip(&mut e.payload_ciphertext, last, 0x80)
            }),
            Code::InvalidArgument,
        ),
        (
            "payload iv",
            Box::new(|e| flip(&mut e.payload_iv, 3, 1)),
            Code::InvalidArgument,
        ),
        (
            "short payload iv",
            Box::new(|e| e.payload_iv.truncate(8)),
            Code::InvalidArgument,
        ),
        (
            "data key byte",
            Box::new(|e| flip(&mut e.data_key_ciphertext, 5, 1)),
            Code::InvalidArgument,
        ),
        (
            "data key iv",
            Box::new(|e| flip(&mut e.data_key_iv, 0, 1)),
            Code::InvalidArgument,
        ),
        (
            "empty data key",
            Box::new(|e| e.data_key_ciphertext.clear()),
            Code::InvalidArgument,
        ),
        (
            "truncated payload",
            Box::new(|e| e.payload_ciphertext.truncate(10)),
            Code::InvalidArgument,
        ),
        (
            "unknown key id",
            Box::new(|e| e.encryption_key_id = "no-such-key".into()),
            Code::NotFound,
        ),
    ];
    for (what, mutate, code) in mutations {
        let mut tampered = envelope.clone();
        mutate(&mut tampered);
        let status = client
            .decrypt(decrypt_envelope(tampered, CONN))
            .await
            .expect_err(what);
        assert_eq!(status.code(), code, "{what}: {status:?}");
    }
}

async fn malformed_blobs_are_invalid_argument(backend: Backend) {
    let Some(app) = spawn(backend).await else {
        return;
    };
    let blob = app.encrypt(b"token", CONN).await.blob;
    let mut client = app.crypto.clone();
    let mut flipped = blob.clone();
    flip(&mut flipped, blob.len() - 1, 1);
    let mut bad_version = blob.clone();
    flip(&mut bad_version, 2, 1 ^ 7);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("garbage", b"not a blob at all".to_vec(), "bad magic"),
        ("truncated", blob[..20].to_vec(), "truncated"),
        ("version", bad_version.to_vec(), "unsupported blob version"),
        ("flipped tag", flipped.to_vec(), "decryption failed"),
        ("header only", blob[..3].to_vec(), "truncated"),
    ];
    for (what, bytes, expect) in cases {
        let status = assert_code(
            client.decrypt(decrypt_blob(bytes, CONN)).await,
            Code::InvalidArgument,
        );
        assert!(status.message().contains(expect), "{what}: {status:?}");
    }
    let missing = DecryptRequest {
        context: ctx(CONN),
        ciphertext: None,
    };
    let status = assert_code(client.decrypt(missing).await, Code::InvalidArgument);
    assert!(status.message().contains("envelope"));
}

async fn plaintext_and_context_limits(backend: Backend) {
    let limits = Limits {
        max_plaintext_bytes: 1024,
        max_batch_items: 3,
        max_context_entries: 4,
        max_context_bytes: 100,
    };
    let Some(app) = spawn_with(
        backend,
        Options {
            limits,
            ..Options::default()
        },
    )
    .await
    else {
        return;
    };
    let mut client = app.crypto.clone();
    let empty = EncryptRequest {
        plaintext: vec![].into(),
        context: ctx(CONN),
        ..Default::default()
    };
    let status = assert_code(client.encrypt(empty).await, Code::InvalidArgument);
    assert!(status.message().contains("empty"));

    let big = EncryptRequest {
        plaintext: vec![1; 1025].into(),
        context: ctx(CONN),
        ..Default::default()
    };
    let status = assert_code(client.encrypt(big).await, Code::InvalidArgument);
    assert!(
        status
            .message()
            .contains("1025 bytes, over the limit of 1024"),
        "{status:?}"
    );
    let exact = EncryptRequest {
        plaintext: vec![1; 1024].into(),
        context: ctx(CONN),
        ..Default::default()
    };
    client.encrypt(exact).await.unwrap();

    let empty_key = EncryptRequest {
        plaintext: vec![1].into(),
        context: ctx(&[("", "x")]),
        ..Default::default()
    };
    assert_code(client.encrypt(empty_key).await, Code::InvalidArgument);

    // Configured context limits: 4 entries, 100 bytes.
    let five: Vec<(String, String)> = (0..5).map(|i| (format!("k{i}"), "v".into())).collect();
    let many = EncryptRequest {
        plaintext: vec![1].into(),
        context: five.into_iter().collect(),
        ..Default::default()
    };
    let status = assert_code(client.encrypt(many).await, Code::InvalidArgument);
    assert!(
        status.message().contains("5 entries; the limit is 4"),
        "{status:?}"
    );
    let long = "x".repeat(101);
    let large = EncryptRequest {
        plaintext: vec![1].into(),
        context: ctx(&[("k", long.as_str())]),
        ..Default::default()
    };
    let status = assert_code(client.encrypt(large).await, Code::InvalidArgument);
    assert!(status.message().contains("the limit is 100"), "{status:?}");

    let items = (0..4)
        .map(|_| EncryptRequest {
            plaintext: vec![1].into(),
            context: ctx(CONN),
            ..Default::default()
        })
        .collect();
    let status = assert_code(
        client.batch_encrypt(BatchEncryptRequest { items }).await,
        Code::InvalidArgument,
    );
    assert!(
        status.message().contains("4 items, over the limit of 3"),
        "{status:?}"
    );
    let items = (0..4).map(|_| decrypt_blob(vec![], CONN)).collect();
    assert_code(
        client.batch_decrypt(BatchDecryptRequest { items }).await,
        Code::InvalidArgument,
    );
}

async fn batches_report_per_item(backend: Backend) {
    let Some(app) = spawn(backend).await else {
        return;
    };
    let mut client = app.crypto.clone();
    let items = vec![
        EncryptRequest {
            plaintext: b"one".to_vec().into(),
            context: ctx(&[("connection_id", "1")]),
            ..Default::default()
        },
        EncryptRequest {
            plaintext: vec![].into(),
            context: ctx(&[("connection_id", "2")]),
            ..Default::default()
        },
        EncryptRequest {
            plaintext: b"three".to_vec().into(),
            context: ctx(&[("connection_id", "3")]),
            ..Default::default()
        },
    ];
    let results = client
        .batch_encrypt(BatchEncryptRequest { items })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results.len(), 3);
    let ok = |i: usize| match results[i].result.clone().unwrap() {
        batch_encrypt_result::Result::Ok(ok) => ok,
        batch_encrypt_result::Result::Error(e) => panic!("item {i} failed: {e:?}"),
    };
    match results[1].result.clone().unwrap() {
        batch_encrypt_result::Result::Error(e) => assert_eq!(e.code, Code::InvalidArgument as i32),
        other => panic!("empty plaintext was accepted: {other:?}"),
    }
    let (one, three) = (ok(0), ok(2));

    let items = vec![
        decrypt_blob(three.blob.clone(), &[("connection_id", "3")]),
        decrypt_blob(one.blob.clone(), &[("connection_id", "3")]),
        decrypt_envelope(one.envelope.clone().unwrap(), &[("connection_id", "1")]),
    ];
    let results = client
        .batch_decrypt(BatchDecryptRequest { items })
        .await
        .unwrap()
        .into_inner()
        .results;
    let outcome: Vec<Result<Vec<u8>, i32>> = results
        .into_iter()
        .map(|r| match r.result.unwrap() {
            batch_decrypt_result::Result::Ok(ok) => Ok(ok.plaintext.to_vec()),
            batch_decrypt_result::Result::Error(e) => Err(e.code),
        })
        .collect();
    assert_eq!(
        outcome,
        vec![
            Ok(b"three".to_vec()),
            Err(Code::InvalidArgument as i32),
            Ok(b"one".to_vec())
        ]
    );
}

async fn legacy_rows_decrypt_under_current_and_previous_master(backend: Backend) {
    let Some(app) = spawn(backend).await else {
        return;
    };
    let old = MasterSecret::new(MASTER).unwrap();
    let (iv, ct) = encrypt_legacy(&old, b"legacy-credential");
    let legacy = Envelope {
        payload_ciphertext: ct.into(),
        payload_iv: iv.to_vec().into(),
        ..Envelope::default()
    };
    let mut client = app.crypto.clone();
    // Legacy ciphertexts carry no context binding; applications may send
    // the row's context all the same.
    let opened = client
        .decrypt(decrypt_envelope(legacy.clone(), CONN))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(&opened.plaintext[..], b"legacy-credential");
    assert!(opened.legacy);
    assert!(opened.encryption_key_id.is_empty());

    let sealed = app.encrypt(b"enveloped", CONN).await;
    // Runbook §2: a new master secret arrives; the old one stays as previous.
    let app = app
        .restart(Options {
            master: Some(master("a-brand-new-master-secret-value", &[MASTER])),
            seed: false,
            ..Options::default()
        })
        .await;
    let mut client = app.crypto.clone();
    let opened = client
        .decrypt(decrypt_envelope(legacy.clone(), CONN))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(&opened.plaintext[..], b"legacy-credential");
    let opened = client
        .decrypt(decrypt_blob(sealed.blob.clone(), CONN))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(&opened.plaintext[..], b"enveloped");
    let fresh = app.encrypt(b"after rotation", CONN).await;

    // Without the old secret, old ciphertexts fail cleanly; new ones work.
    let app = app
        .restart(Options {
            master: Some(master("a-brand-new-master-secret-value", &[])),
            seed: false,
            ..Options::default()
        })
        .await;
    let mut client = app.crypto.clone();
    assert_code(
        client.decrypt(decrypt_envelope(legacy, CONN)).await,
        Code::InvalidArgument,
    );
    assert_code(
        client.decrypt(decrypt_blob(sealed.blob, CONN)).await,
        Code::InvalidArgument,
    );
    let opened = client
        .decrypt(decrypt_blob(fresh.blob, CONN))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(&opened.plaintext[..], b"after rotation");
}

async fn no_active_key_is_failed_precondition(backend: Backend) {
    let Some(app) = spawn_with(
        backend,
        Options {
            seed: false,
            ..Options::default()
        },
    )
    .await
    else {
        return;
    };
    let mut client = app.crypto.clone();
    let status = assert_code(
        client
            .encrypt(EncryptRequest {
                plaintext: b"x".to_vec().into(),
                context: ctx(CONN),
                ..Default::default()
            })
            .await,
        Code::FailedPrecondition,
    );
    assert!(status.message().contains("no active key"));
    // Health stays NOT_SERVING (2) until a key is active.
    app.wait_for_health(2).await;
}

async fn retired_keys_decrypt_but_never_encrypt(backend: Backend) {
    let Some(app) = spawn(backend).await else {
        return;
    };
    let old = app.encrypt(b"under primary", CONN).await;
    let mut admin = app.admin.clone();
    admin
        .create_key(CreateKeyRequest {
            key_id: "second".into(),
            activate: true,
            ..Default::default()
        })
        .await
        .unwrap();
    admin
        .retire_key(RetireKeyRequest {
            key_id: crate::helpers::PRIMARY.into(),
            force: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let fresh = app.encrypt(b"under second", CONN).await;
    assert_eq!(fresh.key_id, "second");
    let mut client = app.crypto.clone();
    let opened = client
        .decrypt(decrypt_blob(old.blob, CONN))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(&opened.plaintext[..], b"under primary");
    // A retired key cannot come back as the active one.
    let status = assert_code(
        admin
            .activate_key(ActivateKeyRequest {
                key_id: crate::helpers::PRIMARY.into(),
                ..Default::default()
            })
            .await,
        Code::FailedPrecondition,
    );
    assert!(status.message().contains("retired"));
}

crate::on_both_backends!(
    round_trip_in_both_forms,
    encrypt_returns_the_forms_asked_for,
    wrong_context_fails,
    any_tampered_field_fails_without_internal,
    malformed_blobs_are_invalid_argument,
    plaintext_and_context_limits,
    batches_report_per_item,
    legacy_rows_decrypt_under_current_and_previous_master,
    no_active_key_is_failed_precondition,
    retired_keys_decrypt_but_never_encrypt,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_request_is_resource_exhausted() {
    let app = spawn(Backend::Sqlite).await.unwrap();
    let mut client = app.crypto.clone();
    // Over the default 16 MiB request limit.
    let huge = EncryptRequest {
        plaintext: vec![7; 17 * 1024 * 1024].into(),
        context: ctx(CONN),
        ..Default::default()
    };
    let status = assert_code(client.encrypt(huge).await, Code::ResourceExhausted);
    assert!(
        status.message().contains("the 16777216 bytes")
            && status.message().contains("--max-request-bytes"),
        "the refusal states the limit: {status:?}"
    );
    // The connection is still good for the next call.
    client
        .encrypt(EncryptRequest {
            plaintext: b"small".to_vec().into(),
            context: ctx(CONN),
            ..Default::default()
        })
        .await
        .unwrap();
}
