//! Faults (issue: faults and hostile connections): what keyward answers
//! when a dependency fails under it. The zombie worker is in `workers.rs`.

use keyward::api::proto::{decrypt_request::Ciphertext, DecryptRequest};

use crate::{
    helpers::{ctx, spawn_on, Backend, Options},
    moto::Proxy,
    postgres,
    rotation::activate_new_key,
};

/// A Decrypt that names a key this replica has not loaded, while it cannot
/// reach the database, is UNAVAILABLE (retry), not NOT_FOUND ("restore the
/// row"): the key may well exist. Once the database is back, it decrypts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unloaded_key_with_the_database_down_is_unavailable_not_missing() {
    let Some(server) = postgres::server_or_skip() else {
        return;
    };
    let url = postgres::create_database(server, "faults").await;
    let writer = spawn_on(Backend::Postgres, url.clone(), Options::default()).await;
    // The second replica reaches the database through a hop the test cuts.
    let (head, database) = url.rsplit_once('/').unwrap();
    let (credentials, host) = head.rsplit_once('@').unwrap();
    let proxy = Proxy::start(host).await;
    let via_proxy = format!("{credentials}@{}/{database}", proxy.addr);
    let reader = spawn_on(Backend::Postgres, via_proxy, Options::default()).await;

    proxy.cut();
    activate_new_key(&writer, "next").await;
    let sealed = writer
        .encrypt(b"credential", &[("connection_id", "c-1")])
        .await;
    assert_eq!(sealed.key_id, "next");
    let request = DecryptRequest {
        context: ctx(&[("connection_id", "c-1")]),
        ciphertext: Some(Ciphertext::Envelope(sealed.envelope.unwrap())),
    };
    let refused = reader
        .crypto
        .clone()
        .decrypt(request.clone())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("retry"), "{refused:?}");

    proxy.restore();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match reader.crypto.clone().decrypt(request.clone()).await {
            Ok(opened) => {
                assert_eq!(&opened.into_inner().plaintext[..], b"credential");
                break;
            }
            Err(status) if status.code() == tonic::Code::Unavailable => {
                assert!(std::time::Instant::now() < deadline, "{status:?}");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            Err(status) => panic!("{status:?}"),
        }
    }
}
