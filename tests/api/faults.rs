//! Faults (issue: faults and hostile connections): what keyward answers
//! when a dependency fails under it. The zombie worker is in `workers.rs`.

use keyward::api::proto::{decrypt_request::Ciphertext, DecryptRequest};

use crate::{
    helpers::{ctx, spawn_on, Backend, Options},
    moto::Proxy,
    postgres,
    rotation::activate_new_key,
};

/// A server on a PostgreSQL database of its own, a TCP hop to that
/// database the test can cut or stall, and the database's URL through it.
async fn behind_a_proxy(
    prefix: &str,
) -> Option<(crate::helpers::TestApp, std::sync::Arc<Proxy>, String)> {
    let url = postgres::create_database(postgres::server_or_skip()?, prefix).await;
    let app = spawn_on(Backend::Postgres, url.clone(), Options::default()).await;
    let (head, database) = url.rsplit_once('/').unwrap();
    let (credentials, host) = head.rsplit_once('@').unwrap();
    let proxy = Proxy::start(host).await;
    let via_proxy = format!("{credentials}@{}/{database}", proxy.addr);
    Some((app, proxy, via_proxy))
}

/// A Decrypt that names a key this replica has not loaded, while it cannot
/// reach the database, is UNAVAILABLE (retry), not NOT_FOUND ("restore the
/// row"): the key may well exist. Once the database is back, it decrypts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unloaded_key_with_the_database_down_is_unavailable_not_missing() {
    let Some((writer, proxy, via_proxy)) = behind_a_proxy("faults").await else {
        return;
    };
    // The second replica reaches the database through a hop the test cuts.
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
    let app = with_metrics(Options::default()).await;
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

/// A server on SQLite with `options` and its metrics endpoint.
async fn with_metrics(options: Options) -> crate::helpers::TestApp {
    let options = Options {
        metrics: true,
        ..options
    };
    crate::helpers::spawn_with(Backend::Sqlite, options)
        .await
        .unwrap()
}

/// A job to a new key that no worker runs, and a WatchRotation stream on it
/// past its first message.
async fn watching_a_pending_job(
    app: &crate::helpers::TestApp,
) -> (
    String,
    tonic::Streaming<keyward::api::proto::RotationProgress>,
) {
    activate_new_key(app, "next").await;
    let job = crate::rotation::start(app, Default::default()).await;
    let mut stream = app
        .admin
        .clone()
        .watch_rotation(keyward::api::proto::WatchRotationRequest {
            job_id: job.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    stream
        .message()
        .await
        .unwrap()
        .expect("a first progress message");
    (job, stream)
}

/// A client that goes away mid-call is recorded as CANCELLED (at INFO),
/// not as a server fault: here a WatchRotation stream the client drops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_is_cancelled_not_a_fault() {
    let app = with_metrics(Options {
        worker: None,
        ..Options::default()
    })
    .await;
    let (_, stream) = watching_a_pending_job(&app).await;
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

/// A worker stopped (SIGSTOP, a VM pause) inside a transaction holding the
/// job row used to freeze the rotation: the other worker made no progress
/// and `rotate cancel` hung. keyward's write transactions now end, on the
/// server, once idle for 2 s: the other worker moves the job on within one
/// lease, and cancel answers within 5 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_paused_inside_a_transaction_does_not_freeze_rotation() {
    let Some(server) = postgres::server_or_skip() else {
        return;
    };
    let url = postgres::create_database(server, "paused").await;
    let app = spawn_on(
        Backend::Postgres,
        url.clone(),
        Options {
            worker: None,
            ..Options::default()
        },
    )
    .await;
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    // Legacy rows that do not decrypt: each batch is little crypto and
    // much writing, so a worker is often inside a transaction.
    sqlx::query(
        "INSERT INTO connections (id, encrypted_credentials, credentials_iv) \
         SELECT 'g-' || lpad(i::text, 6, '0'), decode(md5(i::text), 'hex'), \
                decode(substr(md5(i::text), 1, 24), 'hex') FROM generate_series(1, 30000) AS i",
    )
    .execute(&pool)
    .await
    .unwrap();
    let job = crate::rotation::start(
        &app,
        keyward::api::proto::StartRotationRequest {
            batch_size: 20,
            ..Default::default()
        },
    )
    .await;
    let args = ["--lease-secs", "10"];
    let paused = crate::workers::WorkerProcess::start_with(&url, &args);
    let other = crate::workers::WorkerProcess::start_with(&url, &args);

    // Stop the first worker until it is caught holding the job row.
    let job_row_locked = || async {
        let mut tx = pool.begin().await.unwrap();
        let probe =
            sqlx::query("SELECT id FROM encryption_rotation_jobs WHERE id = $1 FOR UPDATE NOWAIT")
                .bind(&job)
                .fetch_optional(&mut *tx)
                .await;
        tx.rollback().await.ok();
        probe.is_err()
    };
    let mut caught = false;
    for _ in 0..400 {
        paused.signal("STOP");
        let mut held = true;
        for _ in 0..3 {
            tokio::time::sleep(std::time::Duration::from_millis(60)).await;
            held &= job_row_locked().await;
        }
        if held {
            caught = true;
            break;
        }
        paused.signal("CONT");
        tokio::time::sleep(std::time::Duration::from_millis(7)).await;
    }
    assert!(caught, "the worker was never caught inside a transaction");
    let processed = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT processed_rows FROM encryption_rotation_jobs WHERE id = $1",
        )
        .bind(&job)
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    let before = processed().await;
    let caught_at = std::time::Instant::now();
    while processed().await == before {
        assert!(
            caught_at.elapsed() < std::time::Duration::from_secs(10),
            "no progress within one lease while a worker is paused:\n{}",
            other.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let cancel = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        app.admin
            .clone()
            .cancel_rotation(keyward::api::proto::CancelRotationRequest {
                job_id: job.clone(),
            }),
    )
    .await
    .expect("cancel answered within 5 s");
    cancel.unwrap();
    paused.signal("CONT");
}

/// `keyward worker` stopped (SIGTERM) while PostgreSQL does not answer exits
/// within its shutdown grace (it used to take 20 s, waiting on the database
/// to release its lease and heartbeat row).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_exits_within_its_grace_while_the_database_is_down() {
    let Some((_app, proxy, via_proxy)) = behind_a_proxy("down").await else {
        return;
    };
    let mut worker =
        crate::workers::WorkerProcess::start_with(&via_proxy, &["--shutdown-grace-secs", "3"]);
    // Unanswered, as a stopped host or a half-open network is.
    proxy.stall();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let (status, took) = worker.terminate();
    assert!(status.success(), "{status:?}\n{}", worker.log());
    assert!(
        took < std::time::Duration::from_millis(4500),
        "took {took:?}:\n{}",
        worker.log()
    );
}

/// Connections that do nothing are closed (here with limits of 1 s): a
/// silent TCP connection, one that sent the HTTP/2 preface and nothing
/// more, and a keep-alive connection after its request; a request body that
/// never ends fails with DEADLINE_EXCEEDED. A quiet WatchRotation stream is
/// a request in progress and is never cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_do_nothing_are_closed_but_a_quiet_stream_is_not() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let second = std::time::Duration::from_secs(1);
    let app = crate::helpers::spawn_with(
        Backend::Sqlite,
        Options {
            worker: None,
            idle: keyward::idle::IdleLimits {
                first_request: second,
                idle: second,
                request_body: second,
            },
            ..Options::default()
        },
    )
    .await
    .unwrap();
    // Reads until the server closes the connection; what it sent, and how
    // long that took.
    let until_closed = |mut stream: tokio::net::TcpStream| async move {
        let started = std::time::Instant::now();
        let mut seen = Vec::new();
        let read = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            stream.read_to_end(&mut seen),
        )
        .await;
        assert!(read.is_ok(), "still open after 10 s");
        (
            String::from_utf8_lossy(&seen).into_owned(),
            started.elapsed(),
        )
    };

    let silent = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let (_, took) = until_closed(silent).await;
    assert!(took < std::time::Duration::from_secs(5), "{took:?}");

    let mut preface = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    preface
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let (_, took) = until_closed(preface).await;
    assert!(took < std::time::Duration::from_secs(5), "{took:?}");

    // A gRPC-Web request whose body never ends (100 bytes declared, 5 sent),
    // on a keep-alive connection.
    let mut slow = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    slow.write_all(
        b"POST /keyward.v1.Crypto/Encrypt HTTP/1.1\r\nhost: keyward\r\n\
          content-type: application/grpc-web+proto\r\nx-grpc-web: 1\r\ncontent-length: 100\r\n\r\n\
          \x00\x00\x00\x00\x5f",
    )
    .await
    .unwrap();
    let (reply, took) = until_closed(slow).await;
    // gRPC answers DEADLINE_EXCEEDED; tonic-web wraps the body's error, so
    // gRPC-Web says INTERNAL, and why.
    let reply = reply.to_ascii_lowercase().replace("%20", " ");
    assert!(
        reply.contains("the request body did not arrive in time"),
        "{reply}"
    );
    assert!(took < std::time::Duration::from_secs(5), "{took:?}");

    // A quiet stream outlives every limit; it ends when the job does.
    let (job, mut stream) = watching_a_pending_job(&app).await;
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    app.admin
        .clone()
        .cancel_rotation(keyward::api::proto::CancelRotationRequest { job_id: job })
        .await
        .unwrap();
    let mut last = None;
    while let Some(progress) = stream.message().await.expect("the quiet stream was cut") {
        last = Some(progress);
    }
    let last = last.expect("progress after the cancel");
    assert_eq!(
        last.job.unwrap().status,
        keyward::api::proto::RotationStatus::Cancelled as i32
    );
}

/// A flood of made-up bearer tokens costs the database a few shared checks
/// (never one per token), its peer's excess is refused at once, and a token
/// created during the flood works on its first call from another address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_made_up_tokens_does_not_lock_out_a_new_one() {
    use crate::security::{bearer, call, issue_unscoped};
    use keyward::auth::{token, Role};

    const FLOOD: usize = 2_000;
    const CONCURRENCY: usize = 16;
    const ENCRYPT: &str = "/keyward.v1.Crypto/Encrypt";
    let options = Options {
        auth: keyward::auth::AuthSettings {
            required: true,
            ..Default::default()
        },
        ..Options::default()
    };
    let app = with_metrics(options).await;
    let from = |ip: [u8; 4]| {
        tonic::transport::Endpoint::from_shared(format!("http://{}", app.addr))
            .unwrap()
            .local_address(Some(std::net::IpAddr::from(ip)))
            .connect_lazy()
    };
    let started = std::time::Instant::now();
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let flood: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (channel, sent) = (from([127, 0, 0, 1]), std::sync::Arc::clone(&sent));
            tokio::spawn(async move {
                while sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < FLOOD {
                    let fake = bearer(&token::generate());
                    assert_eq!(
                        call(&channel, ENCRYPT, Some(&fake)).await,
                        tonic::Code::Unauthenticated
                    );
                }
            })
        })
        .collect();
    while sent.load(std::sync::atomic::Ordering::Relaxed) < FLOOD / 10 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let fresh = issue_unscoped(&app, "fresh", &[Role::Encrypt]).await;
    let code = call(&from([127, 0, 0, 2]), ENCRYPT, Some(&bearer(&fresh))).await;
    let during = sent.load(std::sync::atomic::Ordering::Relaxed) < FLOOD;
    // An empty request passes authentication and is refused by the handler.
    assert_eq!(
        code,
        tonic::Code::InvalidArgument,
        "the new token's first call"
    );
    for task in flood {
        task.await.unwrap();
    }
    let elapsed = started.elapsed();

    let metrics = crate::metrics::scrape_text(&app).await;
    let value = |name: &str| -> u64 {
        let line = metrics
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} in\n{metrics}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    let checks = value("keyward_token_checks_total ");
    let bound = elapsed.as_millis() as u64 / 100 + 2;
    assert!(
        checks <= bound,
        "{FLOOD} made-up tokens in {elapsed:?} cost {checks} database checks (at most {bound})"
    );
    let over_budget = value("keyward_unknown_tokens_total{outcome=\"over_peer_budget\"}");
    assert!(
        over_budget > FLOOD as u64 / 2,
        "{over_budget} of {FLOOD} refused at once"
    );
    assert_eq!(value("keyward_unknown_tokens_total{outcome=\"found\"}"), 1);
    eprintln!(
        "{FLOOD} made-up tokens in {elapsed:?}: {checks} checks, {over_budget} over the peer's budget; the new token's call came {}",
        if during { "during the flood" } else { "after it" }
    );
}
