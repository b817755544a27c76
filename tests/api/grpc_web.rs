//! gRPC-Web (what browsers and the dashboard speak) over plain HTTP/1.1:
//! CORS preflights for configured origins only, unary and server-streaming
//! calls framed as gRPC-Web, and authentication as for gRPC.

use keyward::{
    api::proto::{
        EncryptRequest, EncryptResponse, ListRotationJobsRequest, RotationProgress,
        StartRotationRequest, WatchRotationRequest,
    },
    auth::{AuthSettings, Role},
};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{
    helpers::{ctx, spawn_with, Backend, Options, TestApp},
    security::issue_unscoped,
};

const ORIGIN: &str = "http://dashboard.example";

/// One HTTP/1.1 exchange; returns the status line and headers (lowercased)
/// and the body, de-chunked.
async fn http(app: &TestApp, request: String, body: &[u8]) -> (String, Vec<u8>) {
    let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let mut rest = &raw[split + 4..];
    if !head.contains("transfer-encoding: chunked") {
        return (head, rest.to_vec());
    }
    let mut body = Vec::new();
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n").unwrap();
        let size =
            usize::from_str_radix(std::str::from_utf8(&rest[..line_end]).unwrap().trim(), 16)
                .unwrap();
        rest = &rest[line_end + 2..];
        if size == 0 {
            return (head, body);
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

/// A gRPC-Web POST of `message` to `path`.
pub(crate) async fn grpc_web(
    app: &TestApp,
    path: &str,
    message: &impl Message,
    token: Option<&str>,
) -> (String, Vec<u8>) {
    let payload = message.encode_to_vec();
    let mut body = vec![0u8];
    body.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    body.extend_from_slice(&payload);
    grpc_web_body(app, path, &body, token).await
}

/// A gRPC-Web POST of `body` (framed by the caller, as it pleases) to `path`.
pub(crate) async fn grpc_web_body(
    app: &TestApp,
    path: &str,
    body: &[u8],
    token: Option<&str>,
) -> (String, Vec<u8>) {
    let auth = token
        .map(|t| format!("authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "POST {path} HTTP/1.1\r\nhost: keyward\r\norigin: {ORIGIN}\r\ncontent-type: application/grpc-web+proto\r\n\
         x-grpc-web: 1\r\n{auth}content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    http(app, request, body).await
}

/// The messages and the trailer block of a gRPC-Web response body.
pub(crate) fn frames(mut body: &[u8]) -> (Vec<Vec<u8>>, String) {
    let (mut messages, mut trailers) = (Vec::new(), String::new());
    while body.len() >= 5 {
        let len = u32::from_be_bytes(body[1..5].try_into().unwrap()) as usize;
        let frame = &body[5..5 + len];
        if body[0] & 0x80 != 0 {
            trailers.push_str(&String::from_utf8_lossy(frame).to_ascii_lowercase());
        } else {
            messages.push(frame.to_vec());
        }
        body = &body[5 + len..];
    }
    (messages, trailers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsers_call_over_grpc_web_from_allowed_origins() {
    let app = spawn_with(
        Backend::Sqlite,
        Options {
            auth: AuthSettings {
                required: true,
                ..AuthSettings::default()
            },
            cors_allowed_origins: vec![ORIGIN.into()],
            ..Options::default()
        },
    )
    .await
    .unwrap();
    let ops = issue_unscoped(&app, "dashboard", &[Role::Admin, Role::Encrypt]).await;

    // CORS: the allowed origin's preflight is answered; another origin's is not.
    let preflight = |origin: &str| {
        format!(
            "OPTIONS /keyward.v1.Admin/WatchRotation HTTP/1.1\r\nhost: keyward\r\norigin: {origin}\r\n\
             access-control-request-method: POST\r\n\
             access-control-request-headers: content-type,x-grpc-web,authorization\r\n\
             connection: close\r\n\r\n"
        )
    };
    let (head, _) = http(&app, preflight(ORIGIN), b"").await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(
        head.contains(&format!("access-control-allow-origin: {ORIGIN}")),
        "{head}"
    );
    assert!(head.contains("authorization"), "{head}");
    let (head, _) = http(&app, preflight("http://elsewhere.example"), b"").await;
    assert!(!head.contains("access-control-allow-origin"), "{head}");

    // Unary, authenticated.
    let request = EncryptRequest {
        plaintext: b"hunter2".to_vec().into(),
        context: ctx(&[("connection_id", "42")]),
        ..Default::default()
    };
    let (head, body) = grpc_web(&app, "/keyward.v1.Crypto/Encrypt", &request, Some(&ops)).await;
    assert!(
        head.contains("content-type: application/grpc-web+proto"),
        "{head}"
    );
    assert!(
        head.contains(&format!("access-control-allow-origin: {ORIGIN}")),
        "{head}"
    );
    assert!(head.contains("access-control-expose-headers"), "{head}");
    let (messages, trailers) = frames(&body);
    assert!(trailers.contains("grpc-status:0"), "{trailers}");
    let sealed = EncryptResponse::decode(messages[0].as_slice()).unwrap();
    assert!(!sealed.blob.is_empty());

    // Without a token: UNAUTHENTICATED, as over gRPC.
    let (head, body) = grpc_web(
        &app,
        "/keyward.v1.Admin/ListRotationJobs",
        &ListRotationJobsRequest::default(),
        None,
    )
    .await;
    let status = format!("{head}\n{}", frames(&body).1);
    assert!(
        status.contains("grpc-status: 16") || status.contains("grpc-status:16"),
        "{status}"
    );

    // Server streaming: WatchRotation's events, then the trailers.
    let (_, body) = grpc_web(
        &app,
        "/keyward.v1.Admin/StartRotation",
        &StartRotationRequest::default(),
        Some(&ops),
    )
    .await;
    let (messages, _) = frames(&body);
    let job = keyward::api::proto::RotationJob::decode(messages[0].as_slice()).unwrap();
    let watch = WatchRotationRequest {
        job_id: job.id.clone(),
    };
    let (_, body) = grpc_web(&app, "/keyward.v1.Admin/WatchRotation", &watch, Some(&ops)).await;
    let (messages, trailers) = frames(&body);
    assert!(trailers.contains("grpc-status:0"), "{trailers}");
    let last = RotationProgress::decode(messages.last().unwrap().as_slice()).unwrap();
    assert!(last.terminal, "{last:?}");
    assert_eq!(last.job.unwrap().id, job.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_is_served_beside_grpc_and_never_opens_an_rpc() {
    let pages = tempfile::tempdir().unwrap();
    std::fs::write(
        pages.path().join("index.html"),
        "<h1>keyward rotations</h1>",
    )
    .unwrap();
    let app = spawn_with(
        Backend::Sqlite,
        Options {
            auth: AuthSettings {
                required: true,
                ..AuthSettings::default()
            },
            dashboard_dir: Some(pages.path().to_owned()),
            ..Options::default()
        },
    )
    .await
    .unwrap();
    let get =
        |path: &str| format!("GET {path} HTTP/1.1\r\nhost: keyward\r\nconnection: close\r\n\r\n");
    let (head, body) = http(&app, get("/"), b"").await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert_eq!(body, b"<h1>keyward rotations</h1>");
    let (head, _) = http(&app, get("/missing.js"), b"").await;
    assert!(head.starts_with("http/1.1 404"), "{head}");
    // No dotfile, and nothing a symlink reaches outside the directory.
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("passwd"), "root:x:0:0").unwrap();
    std::fs::write(pages.path().join(".env"), "ENCRYPTION_MASTER_KEY=hunter2").unwrap();
    std::os::unix::fs::symlink(outside.path().join("passwd"), pages.path().join("passwd")).unwrap();
    for path in ["/.env", "/%2Eenv", "/passwd", "/..%2F..%2Fetc%2Fpasswd"] {
        let (head, body) = http(&app, get(path), b"").await;
        assert!(head.starts_with("http/1.1 404"), "{path}: {head}");
        assert!(body.is_empty(), "{path}");
    }
    // A GET naming an RPC is never a file: it goes to the services, where
    // plain HTTP/1.1 that is not gRPC-Web is refused outright.
    let (head, _) = http(&app, get("/keyward.v1.Admin/ListKeys"), b"").await;
    assert!(head.starts_with("http/1.1 400"), "{head}");
    // gRPC beside it is unchanged (and still needs a token).
    let refused = app
        .admin
        .clone()
        .list_keys(keyward::api::proto::ListKeysRequest {})
        .await;
    assert_eq!(refused.unwrap_err().code(), tonic::Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dashboard_dir_holding_the_database_or_a_key_file_or_no_dashboard_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("keyward.db");
    let mut settings = keyward::config::Settings::for_database(
        format!("sqlite://{}?mode=rwc", db.display()),
        Some(crate::helpers::master(crate::helpers::MASTER, &[])),
    );
    // The working directory as the dashboard: it holds the database.
    settings.dashboard_dir = Some(dir.path().to_owned());
    std::fs::write(&db, b"").unwrap();
    let refused = keyward::app::Application::build(settings.clone())
        .await
        .err()
        .expect("a dashboard dir holding the database must be refused");
    assert!(refused.to_string().contains("keyward.db"), "{refused}");

    // A master key file given with --master-key-file, likewise.
    let pages = tempfile::tempdir().unwrap();
    let key_file = pages.path().join("master.key");
    std::fs::write(&key_file, crate::helpers::MASTER).unwrap();
    settings.dashboard_dir = Some(pages.path().to_owned());
    settings.secret_files = vec![key_file];
    let refused = keyward::app::Application::build(settings.clone())
        .await
        .err()
        .expect("a dashboard dir holding the master key file must be refused");
    assert!(refused.to_string().contains("master.key"), "{refused}");

    // A directory that is missing, or holds no built dashboard, would
    // answer 404 to everything: refused, saying how to build it.
    settings.secret_files.clear();
    for (dir, why) in [
        (pages.path().join("dist"), "No such file"),
        (pages.path().to_owned(), "build the dashboard first"),
    ] {
        settings.dashboard_dir = Some(dir);
        let refused = keyward::app::Application::build(settings.clone())
            .await
            .err()
            .expect("a dashboard dir without a dashboard must be refused");
        assert!(refused.to_string().contains(why), "{refused}");
    }
    std::fs::write(pages.path().join("index.html"), "<h1>keyward</h1>").unwrap();
    settings.dashboard_dir = Some(pages.path().to_owned());
    keyward::app::Application::build(settings).await.unwrap();
}
