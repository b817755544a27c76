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

/// Requests that cannot be decoded are the caller's fault: answered with
/// the code gRPC assigns (INTERNAL), saying the request could not be
/// decoded, counted as `UNDECODABLE_REQUEST` (not INTERNAL, which alerts
/// watch). keyward's own INTERNAL stays INTERNAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_requests_are_the_callers_fault() {
    let app = crate::helpers::spawn_with(
        Backend::Sqlite,
        Options {
            metrics: true,
            ..Options::default()
        },
    )
    .await
    .unwrap();
    let frame = |flag: u8, declared: u32, payload: &[u8]| {
        let mut body = vec![flag];
        body.extend_from_slice(&declared.to_be_bytes());
        body.extend_from_slice(payload);
        body
    };
    // EncryptRequest.context (field 2) is a map<string, string>; its key
    // here is not UTF-8.
    let bad_utf8 = [0x12, 0x06, 0x0a, 0x02, 0xff, 0xfe, 0x12, 0x00];
    let cases: [(&str, Vec<u8>); 4] = [
        ("a context key that is not UTF-8", frame(0, 8, &bad_utf8)),
        ("bytes that are no protobuf", frame(0, 4, &[0xff; 4])),
        (
            "a compressed flag without an encoding",
            frame(1, 2, &[0x0a, 0x00]),
        ),
        ("no message at all", Vec::new()),
    ];
    for (what, body) in &cases {
        let (head, reply) =
            crate::grpc_web::grpc_web_body(&app, "/keyward.v1.Crypto/Encrypt", body, None).await;
        // Trailers-only: the status is in the headers (message
        // percent-encoded), else in the trailer frame.
        let status = format!("{head}\n{}", crate::grpc_web::frames(&reply).1)
            .replace("%20", " ")
            .replace(": ", ":");
        assert!(status.contains("grpc-status:13"), "{what}: {status}");
        assert!(
            status.contains("the request could not be decoded"),
            "{what}: {status}"
        );
    }
    let metrics = crate::metrics::scrape_text(&app).await;
    let undecodable = metrics
        .lines()
        .find(|l| {
            l.starts_with("keyward_rpc_requests_total{")
                && l.contains("grpc_method=\"Encrypt\"")
                && l.contains("grpc_code=\"UNDECODABLE_REQUEST\"")
        })
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(undecodable.ends_with(" 4"), "{undecodable}");
    assert!(
        !metrics.contains("grpc_code=\"INTERNAL\""),
        "a decoding failure was counted as a server fault:\n{metrics}"
    );
}

/// A client that goes away mid-call is recorded as CANCELLED (at INFO),
/// not as a server fault: here a WatchRotation stream the client drops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_is_cancelled_not_a_fault() {
    let app = crate::helpers::spawn_with(
        Backend::Sqlite,
        Options {
            metrics: true,
            worker: None,
            ..Options::default()
        },
    )
    .await
    .unwrap();
    activate_new_key(&app, "next").await;
    let job = crate::rotation::start(&app, Default::default()).await;
    let mut stream = app
        .admin
        .clone()
        .watch_rotation(keyward::api::proto::WatchRotationRequest { job_id: job })
        .await
        .unwrap()
        .into_inner();
    stream
        .message()
        .await
        .unwrap()
        .expect("a first progress message");
    drop(stream);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let metrics = crate::metrics::scrape_text(&app).await;
        let watch: Vec<&str> = metrics
            .lines()
            .filter(|l| {
                l.starts_with("keyward_rpc_requests_total{")
                    && l.contains("grpc_method=\"WatchRotation\"")
            })
            .collect();
        if watch.iter().any(|l| l.contains("grpc_code=\"CANCELLED\"")) {
            assert_eq!(watch.len(), 1, "{watch:?}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{watch:?}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
