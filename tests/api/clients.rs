//! The Rust client crate (`clients/rust`, `keyward-client`) against the
//! real server: TLS with a private CA, bearer tokens and a client
//! certificate, typed errors, batch results per item, and WatchRotation as
//! a stream; and a method on the client for every RPC of the proto.

use bytes::Bytes;
use futures::StreamExt;
use keyward::auth::Role;
use keyward_client::{context, proto, Ciphertext, Client, Error};

use crate::{
    helpers::{spawn_with, Backend, Options},
    security::{issue_unscoped, secured_app, Pki},
};

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

/// The methods of every service in the proto, as `package.Service/Method`.
pub(crate) fn proto_methods() -> std::collections::BTreeSet<String> {
    use prost::Message;
    let set =
        prost_types::FileDescriptorSet::decode(keyward::api::proto::FILE_DESCRIPTOR_SET).unwrap();
    set.file
        .iter()
        .flat_map(|file| file.service.iter().map(move |s| (file.package(), s)))
        .flat_map(|(package, service)| {
            service
                .method
                .iter()
                .map(move |m| format!("{package}.{}/{}", service.name(), m.name()))
        })
        .collect()
}

/// Every RPC of the proto has a method on `keyward_client::Client`: this
/// calls each method once and asks the server (its RPC metrics) which
/// methods it served. A new RPC without a client method fails here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_client_has_a_method_for_every_rpc() {
    // No worker: the job stays pending, so it can be paused, resumed,
    // re-tuned, cancelled and requeued in turn.
    let options = Options {
        metrics: true,
        worker: None,
        ..Default::default()
    };
    let app = spawn_with(Backend::Sqlite, options).await.unwrap();
    let client = Client::connect(format!("http://{}", app.addr))
        .await
        .unwrap();

    let row = context([("connection_id", "1")]);
    let sealed = client.encrypt(&b"s3cret"[..], &row).await.unwrap();
    let blob = Ciphertext::from(sealed.blob.clone());
    assert_eq!(
        &client.decrypt(blob.clone(), &row).await.unwrap().plaintext[..],
        b"s3cret"
    );
    let batch = client.batch_encrypt([(Bytes::from_static(b"x"), row.clone())]);
    assert!(batch.await.unwrap()[0].is_ok());
    let batch = client.batch_decrypt([(blob.clone(), row.clone())]);
    assert!(batch.await.unwrap()[0].is_ok());
    // Already on the active key: returned as given.
    assert!(!client.rewrap(blob.clone(), &row).await.unwrap().rewrapped);
    let batch = client.batch_rewrap([(blob.clone(), context([("connection_id", "2")]))]);
    assert!(matches!(
        batch.await.unwrap()[0],
        Err(Error::InvalidArgument(_))
    ));

    let targets = client.list_rotation_targets().await.unwrap();
    assert_eq!(targets[0].table, "connections");
    let added = client
        .add_rotation_target(r#"{"table": "connections", "encoding": "bytes"}"#)
        .await
        .unwrap();
    assert_eq!(added.len(), 1);
    let removed = client.remove_rotation_target("no_such_table", false).await;
    assert!(removed.is_err(), "{removed:?}");

    let next = proto::CreateKeyRequest {
        key_id: "next".into(),
        ..Default::default()
    };
    assert_eq!(client.create_key(next).await.unwrap().key_id, "next");
    let activate = proto::ActivateKeyRequest {
        key_id: "next".into(),
        ..Default::default()
    };
    client.activate_key(activate).await.unwrap();
    assert_eq!(client.list_keys().await.unwrap().len(), 2);
    let plan = proto::RetireKeyRequest {
        key_id: crate::helpers::PRIMARY.into(),
        dry_run: true,
        ..Default::default()
    };
    client.retire_key(plan).await.unwrap();
    assert!(!client.list_replicas().await.unwrap().is_empty());
    client.get_key_usage().await.unwrap();
    assert_eq!(client.refresh_key_metadata().await.unwrap().key_count, 2);
    assert!(client.self_test().await.unwrap().keys.iter().all(|k| k.ok));
    assert_eq!(client.prune_expired_scoped_tokens().await.unwrap(), 0);

    let job = client
        .start_rotation(proto::StartRotationRequest::default())
        .await
        .unwrap();
    let mut events = client.watch_rotation(&job.id).await.unwrap();
    assert!(events.next().await.unwrap().is_ok());
    drop(events);
    let paused = client.pause_rotation(&job.id).await.unwrap();
    assert_eq!(paused.status(), proto::RotationStatus::Paused);
    client.resume_rotation(&job.id).await.unwrap();
    let update = proto::UpdateRotationRequest {
        job_id: job.id.clone(),
        batch_size: Some(10),
        ..Default::default()
    };
    assert_eq!(client.update_rotation(update).await.unwrap().batch_size, 10);
    client.cancel_rotation(&job.id).await.unwrap();
    client.requeue_rotation(&job.id).await.unwrap();
    assert_eq!(client.get_rotation_job(&job.id).await.unwrap().id, job.id);
    assert_eq!(client.list_rotation_jobs(0).await.unwrap().len(), 1);

    let scrape = crate::metrics::scrape_text(&app).await;
    let served: std::collections::BTreeSet<String> = scrape
        .lines()
        .filter(|l| l.starts_with("keyward_rpc_requests_total{"))
        .filter_map(|l| {
            let label = |name: &str| {
                let start = l.find(&format!("{name}=\""))? + name.len() + 2;
                Some(l[start..].split('"').next()?.to_owned())
            };
            Some(format!(
                "{}/{}",
                label("grpc_service")?,
                label("grpc_method")?
            ))
        })
        .collect();
    let methods = proto_methods();
    assert!(methods.len() > 20, "{methods:?}");
    let missing: Vec<_> = methods.difference(&served).cloned().collect();
    assert!(missing.is_empty(), "no client method reached {missing:?}");
}
