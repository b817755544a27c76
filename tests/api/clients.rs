//! The Rust client crate (`clients/rust`, `keyward-client`) against the
//! real server: TLS with a private CA, bearer tokens and a client
//! certificate, typed errors, batch results per item, and WatchRotation as
//! a stream.

use futures::StreamExt;
use keyward::auth::Role;
use keyward_client::{context, proto, Ciphertext, Client, Error};

use crate::security::{issue_unscoped, secured_app, Pki};

fn builder(pki: &Pki, port: u16) -> keyward_client::ClientBuilder {
    Client::builder(format!("https://127.0.0.1:{port}"))
        .ca_certificate(&pki.ca_pem)
        .tls_domain("localhost")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_client_encrypts_decrypts_batches_and_watches() {
    let (pki, app, _audit) = secured_app().await;
    let port = app.addr.port();
    let token = issue_unscoped(&app, "billing", &[Role::Encrypt, Role::Decrypt]).await;
    let client = builder(&pki, port).token(&token).connect().await.unwrap();

    let row = context([("connection_id", "42")]);
    let sealed = client.encrypt(&b"hunter2"[..], &row).await.unwrap();
    assert_eq!(sealed.key_id, crate::helpers::PRIMARY);
    let opened = client.decrypt(sealed.blob.clone(), &row).await.unwrap();
    assert_eq!(&opened.plaintext[..], b"hunter2");
    let envelope = sealed.envelope.clone().unwrap();
    let opened = client.decrypt(envelope.clone(), &row).await.unwrap();
    assert_eq!(&opened.plaintext[..], b"hunter2");
    assert!(!opened.legacy);

    // Typed errors.
    let other_row = context([("connection_id", "43")]);
    let refused = client.decrypt(sealed.blob.clone(), &other_row).await;
    assert!(
        matches!(refused, Err(Error::InvalidArgument(_))),
        "{refused:?}"
    );
    let anonymous = builder(&pki, port).connect().await.unwrap();
    let refused = anonymous.encrypt(&b"x"[..], &row).await;
    assert!(
        matches!(refused, Err(Error::Unauthenticated(_))),
        "{refused:?}"
    );
    let refused = client.rotation_job("any").await;
    assert!(
        matches!(refused, Err(Error::PermissionDenied(_))),
        "{refused:?}"
    );

    // Batches: one result per item, in order.
    let sealed_all = client
        .batch_encrypt((0..3).map(|i| {
            (
                format!("secret {i}").into(),
                context([("n", i.to_string())]),
            )
        }))
        .await
        .unwrap();
    assert_eq!(sealed_all.len(), 3);
    let items = sealed_all.iter().enumerate().map(|(i, s)| {
        let s = s.as_ref().unwrap();
        // The middle item carries the wrong context.
        let n = if i == 1 { 99 } else { i };
        (
            Ciphertext::from(s.blob.clone()),
            context([("n", n.to_string())]),
        )
    });
    let opened_all = client.batch_decrypt(items).await.unwrap();
    assert_eq!(&opened_all[0].as_ref().unwrap().plaintext[..], b"secret 0");
    assert!(matches!(opened_all[1], Err(Error::InvalidArgument(_))));
    assert_eq!(&opened_all[2].as_ref().unwrap().plaintext[..], b"secret 2");

    // WatchRotation as a stream, through a client certificate (admin).
    for i in 0..30 {
        let id = format!("conn-{i:02}");
        let sealed = client
            .encrypt(
                &b"credential"[..],
                &context([("connection_id", id.as_str())]),
            )
            .await
            .unwrap();
        let e = sealed.envelope.unwrap();
        let envelope = keyward::api::proto::Envelope {
            encryption_key_id: e.encryption_key_id,
            data_key_ciphertext: e.data_key_ciphertext,
            data_key_iv: e.data_key_iv,
            payload_ciphertext: e.payload_ciphertext,
            payload_iv: e.payload_iv,
        };
        app.insert_connection(&id, &envelope).await;
    }
    let operator = builder(&pki, port)
        .client_identity(
            std::fs::read(pki.path("ops-admin.pem")).unwrap(),
            std::fs::read(pki.path("ops-admin.key")).unwrap(),
        )
        .connect()
        .await
        .unwrap();
    operator
        .admin()
        .create_key(proto::CreateKeyRequest {
            key_id: "next".into(),
            activate: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let job = operator
        .start_rotation(proto::StartRotationRequest {
            batch_size: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    let events: Vec<_> = operator
        .watch_rotation(&job.id)
        .await
        .unwrap()
        .collect()
        .await;
    let last = events.last().unwrap().as_ref().unwrap();
    assert!(last.terminal);
    let done = last.job.as_ref().unwrap();
    assert_eq!(done.status(), proto::RotationStatus::Completed);
    assert_eq!((done.succeeded_rows, done.failed_rows), (30, 0));
    let unknown = operator.watch_rotation("no-such-job").await;
    assert!(matches!(unknown, Err(Error::NotFound(_))));
}
