//! Crypto/Rewrap: a ciphertext kept outside the rotation targets moves to
//! the active key without its plaintext leaving keyward, bound to the same
//! context; legacy input becomes an envelope; a `rewrap` token cannot
//! decrypt, and a scoped one cannot turn another row's legacy secret into
//! an envelope under a context it chose.

use keyward::{
    api::proto::{
        batch_rewrap_result::Result as Item, rewrap_request::Ciphertext, BatchRewrapRequest,
        CreateKeyRequest, EncryptRequest, Envelope, RewrapRequest, RewrapResponse,
    },
    auth::{audit::AuditSink, Role, Scope},
};
use tonic::Code;

use crate::{
    audit_bounds::audited_app,
    helpers::{assert_code, ctx, json_lines, spawn, Backend, TestApp},
    legacy_scope::legacy_envelope,
    on_both_backends,
    rotation::activate_new_key,
    security::{decrypt_request, issue, with_token},
};

fn rewrap_request(envelope: Envelope, context: &[(&str, &str)]) -> RewrapRequest {
    RewrapRequest {
        context: ctx(context),
        ciphertext: Some(Ciphertext::Envelope(envelope)),
        form: 0,
    }
}

async fn rewrap(
    app: &TestApp,
    envelope: Envelope,
    context: &[(&str, &str)],
) -> Result<RewrapResponse, tonic::Status> {
    app.crypto
        .clone()
        .rewrap(rewrap_request(envelope, context))
        .await
        .map(tonic::Response::into_inner)
}

async fn decrypt(app: &TestApp, envelope: Envelope, context: &[(&str, &str)]) -> Vec<u8> {
    app.crypto
        .clone()
        .decrypt(decrypt_request(envelope, context))
        .await
        .unwrap()
        .into_inner()
        .plaintext
        .to_vec()
}

async fn rewrap_moves_a_ciphertext_to_the_active_key_without_its_plaintext(backend: Backend) {
    let Some(app) = spawn(backend).await else {
        return;
    };
    let context = [("connection_id", "s3-object-17")];
    let sealed = app.encrypt(b"kept in object storage", &context).await;
    let old = sealed.envelope.unwrap();
    let next = activate_new_key(&app, "next").await;

    let moved = rewrap(&app, old.clone(), &context).await.unwrap();
    assert!(moved.rewrapped);
    assert_eq!(moved.key_id, "next");
    let envelope = moved.envelope.clone().unwrap();
    assert_eq!(envelope.encryption_key_id, next);
    // Only the data key moved: the payload is the same bytes.
    assert_eq!(envelope.payload_ciphertext, old.payload_ciphertext);
    assert_ne!(envelope.data_key_ciphertext, old.data_key_ciphertext);
    assert!(!moved.blob.is_empty());
    assert_eq!(
        decrypt(&app, envelope.clone(), &context).await,
        b"kept in object storage"
    );

    // Already in place: returned as given.
    let again = rewrap(&app, envelope.clone(), &context).await.unwrap();
    assert!(!again.rewrapped);
    assert_eq!(again.envelope.unwrap(), envelope);

    // The context stays bound: another one is refused, in place or not.
    let other = [("connection_id", "s3-object-18")];
    assert_code(
        rewrap(&app, old.clone(), &other).await,
        Code::InvalidArgument,
    );
    assert_code(
        rewrap(&app, envelope.clone(), &other).await,
        Code::InvalidArgument,
    );
    // A tampered data key is refused.
    let mut tampered = old.clone();
    let mut key = tampered.data_key_ciphertext.to_vec();
    let middle = key.len() / 2;
    key[middle] ^= 1;
    tampered.data_key_ciphertext = key.into();
    assert_code(
        rewrap(&app, tampered, &context).await,
        Code::InvalidArgument,
    );
    // Nothing to rewrap.
    let empty = app.crypto.clone().rewrap(RewrapRequest::default()).await;
    assert_code(empty, Code::InvalidArgument);

    // Legacy input becomes an envelope under the active key, bound to the
    // context given.
    let legacy = rewrap(&app, legacy_envelope(b"from before keyward"), &context)
        .await
        .unwrap();
    assert!(legacy.rewrapped);
    let envelope = legacy.envelope.unwrap();
    assert_eq!(envelope.encryption_key_id, next);
    assert!(!envelope.data_key_ciphertext.is_empty());
    assert_eq!(
        decrypt(&app, envelope, &context).await,
        b"from before keyward"
    );

    // Batches: each item alone.
    let results = app
        .crypto
        .clone()
        .batch_rewrap(BatchRewrapRequest {
            items: vec![
                rewrap_request(old.clone(), &context),
                rewrap_request(old, &other),
            ],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert!(matches!(&results[0].result, Some(Item::Ok(ok)) if ok.key_id == "next"));
    assert!(
        matches!(&results[1].result, Some(Item::Error(e)) if e.code == Code::InvalidArgument as i32)
    );
}

on_both_backends!(rewrap_moves_a_ciphertext_to_the_active_key_without_its_plaintext);

/// The `rewrap` role moves ciphertexts but cannot read them; scopes apply
/// to the source and the target key; legacy input needs legacy access;
/// each rewrap is audited like a Decrypt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewrap_token_cannot_decrypt_and_scopes_bind_both_keys() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.log");
    let app = audited_app(AuditSink::File(audit.clone())).await;
    let platform = issue(&app, "platform", Role::ALL.as_ref(), Scope::default()).await;
    let context = [("tenant", "acme"), ("connection_id", "c1")];
    let old = app
        .crypto
        .clone()
        .encrypt(with_token(
            EncryptRequest {
                plaintext: b"acme's password".to_vec().into(),
                context: ctx(&context),
                form: 0,
            },
            &platform,
        ))
        .await
        .unwrap()
        .into_inner()
        .envelope
        .unwrap();
    app.admin
        .clone()
        .create_key(with_token(
            CreateKeyRequest {
                key_id: "next".into(),
                activate: true,
                ..Default::default()
            },
            &platform,
        ))
        .await
        .unwrap();

    let migrator = issue(&app, "migrator", &[Role::Rewrap], Scope::default()).await;
    let mut client = app.crypto.clone();
    let refused = client
        .decrypt(with_token(
            decrypt_request(old.clone(), &context),
            &migrator,
        ))
        .await;
    assert_code(refused, Code::PermissionDenied);
    let moved = client
        .rewrap(with_token(rewrap_request(old.clone(), &context), &migrator))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(moved.key_id, "next");

    // Scoped to the old key only: may not put it under the active key.
    let old_only = issue(
        &app,
        "old-only",
        &[Role::Rewrap],
        Scope {
            keys: vec!["primary".into()],
            ..Scope::default()
        },
    )
    .await;
    let status = assert_code(
        client
            .rewrap(with_token(rewrap_request(old.clone(), &context), &old_only))
            .await,
        Code::PermissionDenied,
    );
    assert!(status.message().contains("active key"), "{status:?}");

    // Scoped to a tenant: another row's legacy secret stays out of reach,
    // unless legacy access was granted.
    let tenant = |legacy| Scope {
        context: [("tenant".to_owned(), "acme".to_owned())].into(),
        legacy,
        ..Scope::default()
    };
    let scoped = issue(&app, "acme-migrator", &[Role::Rewrap], tenant(false)).await;
    let granted = issue(&app, "acme-legacy", &[Role::Rewrap], tenant(true)).await;
    let victim = legacy_envelope(b"globex's password");
    let status = assert_code(
        client
            .rewrap(with_token(
                rewrap_request(victim.clone(), &context),
                &scoped,
            ))
            .await,
        Code::PermissionDenied,
    );
    assert!(status.message().contains("legacy"), "{status:?}");
    let ok = client
        .rewrap(with_token(rewrap_request(victim, &context), &granted))
        .await;
    assert!(ok.is_ok(), "{ok:?}");

    let events = json_lines(&std::fs::read_to_string(&audit).unwrap());
    let rewraps: Vec<_> = events
        .iter()
        .filter(|e| e["rpc"] == "keyward.v1.Crypto/Rewrap")
        .collect();
    assert!(
        rewraps
            .iter()
            .any(|e| e["principal"] == "migrator" && e["result"] == "ok" && e["key_id"] == "next"),
        "{rewraps:?}"
    );
    assert!(
        rewraps
            .iter()
            .any(|e| e["principal"] == "acme-migrator" && e["result"] == "PERMISSION_DENIED"),
        "{rewraps:?}"
    );
    // Neither plaintext is in the log.
    let log = std::fs::read_to_string(&audit).unwrap();
    assert!(!log.contains("password"));
}
