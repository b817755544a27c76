//! Legacy ciphertexts carry no key record and no context binding, so a
//! scoped principal's context proves nothing about them: only principals
//! without limits, or granted legacy access, open them (over gRPC and
//! gRPC-Web alike), and every refusal is audited.

use keyward::{
    api::proto::{
        batch_decrypt_result::Result as Item, BatchDecryptRequest, DecryptResponse, Envelope,
    },
    auth::{audit::AuditSink, Role, Scope},
    crypto::{legacy::encrypt_legacy, secret::MasterSecret},
};
use prost::Message;
use tonic::Code;

use crate::{
    audit_bounds::audited_app,
    grpc_web::{frames, grpc_web},
    helpers::{assert_code, json_lines, MASTER},
    security::{decrypt_request, issue, with_token},
};

/// Another connection's legacy row, as an attacker would copy it from the
/// table: payload columns only, no key record.
pub(crate) fn legacy_envelope(plaintext: &[u8]) -> Envelope {
    let (iv, ct) = encrypt_legacy(&MasterSecret::new(MASTER).unwrap(), plaintext);
    Envelope {
        payload_ciphertext: ct.into(),
        payload_iv: iv.to_vec().into(),
        ..Envelope::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scoped_principals_open_legacy_rows_only_when_granted() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.log");
    let app = audited_app(AuditSink::File(audit.clone())).await;
    let decrypting = [Role::Decrypt];
    let tenant = |legacy| Scope {
        context: [("tenant".to_owned(), "acme".to_owned())].into(),
        legacy,
        ..Scope::default()
    };
    let context_scoped = issue(&app, "acme-app", &decrypting, tenant(false)).await;
    let key_scoped = issue(
        &app,
        "primary-only",
        &decrypting,
        Scope {
            keys: vec!["primary".into()],
            ..Scope::default()
        },
    )
    .await;
    let granted = issue(&app, "acme-migrating", &decrypting, tenant(true)).await;
    let unscoped = issue(&app, "platform", &decrypting, Scope::default()).await;
    let mut client = app.crypto.clone();
    let victim = legacy_envelope(b"globex's database password");
    let acme = [("tenant", "acme")];

    for token in [&context_scoped, &key_scoped] {
        let status = assert_code(
            client
                .decrypt(with_token(decrypt_request(victim.clone(), &acme), token))
                .await,
            Code::PermissionDenied,
        );
        assert!(status.message().contains("legacy"), "{status:?}");
        assert!(status.message().contains("--legacy"), "{status:?}");
        // Batches judge each item the same way.
        let results = client
            .batch_decrypt(with_token(
                BatchDecryptRequest {
                    items: vec![decrypt_request(victim.clone(), &acme)],
                },
                token,
            ))
            .await
            .unwrap()
            .into_inner()
            .results;
        match &results[0].result {
            Some(Item::Error(e)) => assert_eq!(e.code, Code::PermissionDenied as i32),
            other => panic!("a scoped batch item opened a legacy row: {other:?}"),
        }
    }
    for token in [&granted, &unscoped] {
        let opened = client
            .decrypt(with_token(decrypt_request(victim.clone(), &acme), token))
            .await
            .unwrap()
            .into_inner();
        assert!(opened.legacy);
        assert_eq!(&opened.plaintext[..], b"globex's database password");
    }
    // A granted principal is still held to its context.
    assert_code(
        client
            .decrypt(with_token(
                decrypt_request(victim.clone(), &[("tenant", "globex")]),
                &granted,
            ))
            .await,
        Code::PermissionDenied,
    );

    // gRPC-Web is judged by the same handler.
    let request = decrypt_request(victim.clone(), &acme);
    let (head, body) = grpc_web(
        &app,
        "/keyward.v1.Crypto/Decrypt",
        &request,
        Some(&context_scoped),
    )
    .await;
    // An error is a trailers-only response: its status is in the headers.
    let (messages, trailers) = frames(&body);
    assert!(messages.is_empty(), "{trailers}");
    assert!(
        head.contains("grpc-status: 7") || trailers.contains("grpc-status:7"),
        "{head}\n{trailers}"
    );
    let (_, body) = grpc_web(&app, "/keyward.v1.Crypto/Decrypt", &request, Some(&granted)).await;
    let (messages, trailers) = frames(&body);
    assert!(trailers.contains("grpc-status:0"), "{trailers}");
    let opened = DecryptResponse::decode(&messages[0][..]).unwrap();
    assert_eq!(&opened.plaintext[..], b"globex's database password");

    // Every refusal is audited as one, naming the principal.
    let events = json_lines(&std::fs::read_to_string(&audit).unwrap());
    let refused: Vec<_> = events
        .iter()
        .filter(|e| e["result"] == "PERMISSION_DENIED")
        .map(|e| e["principal"].as_str().unwrap().to_owned())
        .collect();
    for name in ["acme-app", "primary-only"] {
        assert_eq!(
            refused.iter().filter(|p| *p == name).count(),
            if name == "acme-app" { 3 } else { 2 },
            "{refused:?}"
        );
    }
    assert!(!events
        .iter()
        .any(|e| e["principal"] == "acme-app" && e["result"] == "ok"));
}
