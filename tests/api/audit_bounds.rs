//! What the audit log costs an attacker and what it does when it cannot be
//! written: refused calls of unauthenticated peers are bounded (a flood of
//! long paths on one connection writes a few lines, not megabytes), and a
//! fail-closed log that cannot be written turns health NOT_SERVING, so load
//! balancers move traffic instead of sending Decrypts to a server that
//! refuses them all.

use keyward::auth::{
    audit::{AuditSettings, AuditSink},
    AuthSettings, Role,
};
use tonic::Code;

use crate::{
    helpers::{assert_code, json_lines, spawn_with, Backend, Options, TestApp},
    security::{call, decrypt_request, encrypt_request, issue_unscoped, with_token},
};

/// Refused calls in the flood, and the length of each one's path.
const FLOOD_CALLS: usize = 20_000;
const FLOOD_PATH_BYTES: usize = 3_900;
/// The bound the security review set for that flood.
const FLOOD_BUDGET_BYTES: u64 = 5 * 1024 * 1024;

/// A SQLite server requiring authentication, auditing fail-closed to `sink`.
pub(crate) async fn audited_app(sink: AuditSink) -> TestApp {
    spawn_with(
        Backend::Sqlite,
        Options {
            auth: AuthSettings {
                required: true,
                ..AuthSettings::default()
            },
            audit: AuditSettings {
                sink,
                ..AuditSettings::default()
            },
            ..Options::default()
        },
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_refused_calls_cannot_fill_the_audit_disk() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.log");
    let app = audited_app(AuditSink::File(audit.clone())).await;
    // One connection, as in the finding (HPACK makes the repeated path
    // almost free on the wire).
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", app.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let path = format!("/keyward.v1.Admin/{}", "A".repeat(FLOOD_PATH_BYTES));
    let started = std::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let (channel, path) = (channel.clone(), path.clone());
        tasks.spawn(async move {
            for _ in 0..FLOOD_CALLS / 16 {
                assert_eq!(call(&channel, &path, None).await, Code::Unauthenticated);
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    // Wait out the window, so the count of the last one is written too.
    tokio::time::sleep(keyward::auth::audit::REFUSAL_WINDOW * 2).await;
    let bytes = std::fs::metadata(&audit).unwrap().len();
    println!(
        "audit flood: {FLOOD_CALLS} refused unauthenticated calls with {FLOOD_PATH_BYTES}-byte paths in {:.1}s wrote {bytes} bytes ({:.3} MB) of audit",
        started.elapsed().as_secs_f64(),
        bytes as f64 / 1e6
    );
    assert!(bytes < FLOOD_BUDGET_BYTES, "{bytes} bytes of audit");

    // Every refusal is accounted for: the events written plus the counts
    // of the summaries.
    let events = json_lines(&std::fs::read_to_string(&audit).unwrap());
    let refusals: u64 = events
        .iter()
        .filter(|e| e["result"] == "UNAUTHENTICATED")
        .map(|e| e["count"].as_u64().unwrap_or(1))
        .sum();
    assert_eq!(refusals, FLOOD_CALLS as u64, "{events:#?}");
    for event in &events {
        let rpc = event["rpc"].as_str().unwrap();
        assert!(
            rpc.len() < 200,
            "a long path was logged whole: {}",
            rpc.len()
        );
        assert_eq!(
            event["peer"].as_str().map(|p| p.starts_with("127.0.0.1")),
            Some(true)
        );
    }
    // The server still serves.
    assert_eq!(app.health_status().await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_fail_closed_audit_log_turns_health_not_serving() {
    let app = audited_app(AuditSink::File("/dev/full".into())).await;
    assert_eq!(app.health_status().await, 1);
    let token = issue_unscoped(&app, "app", &[Role::Encrypt, Role::Decrypt]).await;
    let pairs = [("connection_id", "1")];
    let mut client = app.crypto.clone();
    let envelope = client
        .encrypt(with_token(encrypt_request(b"secret", &pairs), &token))
        .await
        .unwrap()
        .into_inner()
        .envelope
        .unwrap();
    assert_code(
        client
            .decrypt(with_token(decrypt_request(envelope, &pairs), &token))
            .await,
        Code::Unavailable,
    );
    app.wait_for_health(2).await;
}
