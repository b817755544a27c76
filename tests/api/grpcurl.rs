//! The README's operator recipes (the block between the `grpcurl:begin` and
//! `grpcurl:end` markers), run verbatim with a real grpcurl against the real
//! `keyward serve` requiring tokens; every answer is checked.

use std::{path::PathBuf, process::Command, time::Duration};

use keyward::api::proto::{crypto_client::CryptoClient, EncryptRequest};
use sqlx::SqlitePool;
use tonic::{metadata::MetadataValue, Request};

use crate::{
    cli::{free_port, keyward, run, stderr, stdout, Server},
    helpers::bind_envelope,
    helpers::ctx,
};

const SECRET: &str = "grpcurl-recipes-master-secret-0123456789";

/// grpcurl from `.tools/venv` (scripts/test installs it) or PATH.
fn grpcurl_dir() -> Option<PathBuf> {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".tools/venv/bin");
    let found = std::iter::once(venv)
        .chain(std::env::split_paths(
            &std::env::var_os("PATH").unwrap_or_default(),
        ))
        .find(|dir| dir.join("grpcurl").is_file());
    let jq = Command::new("jq").arg("--version").output().is_ok();
    if found.is_some() && jq {
        return found;
    }
    let why = "grpcurl (scripts/test installs it into .tools/venv) and jq are needed";
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{why}");
    }
    eprintln!("SKIPPED ({why})");
    None
}

fn recipes() -> String {
    let readme =
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("README.md"))
            .unwrap();
    let block = readme
        .split("<!-- grpcurl:begin -->")
        .nth(1)
        .and_then(|rest| rest.split("<!-- grpcurl:end -->").next())
        .expect("README.md has the grpcurl recipes block");
    block
        .lines()
        .filter(|line| !line.starts_with("```"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_grpcurl_recipes_answer_as_documented() {
    let Some(grpcurl) = grpcurl_dir() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let with_secret = || {
        let mut cmd = keyward(dir.path());
        cmd.env("ENCRYPTION_MASTER_KEY", SECRET);
        cmd
    };
    let seeded = run(with_secret().arg("seed-key"));
    assert!(seeded.status.success(), "{}", stderr(&seeded));
    let token = |args: &[&str]| {
        let out = run(with_secret().args(["token", "create"]).args(args));
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out).trim().to_owned()
    };
    let ops = token(&["--name", "ops", "--role", "admin"]);
    let app = token(&["--name", "app", "--role", "encrypt", "--role", "decrypt"]);

    let addr = format!("127.0.0.1:{}", free_port());
    let mut cmd = with_secret();
    cmd.args(["serve", "--listen", &addr, "--audit-log", "off"]);
    let server = Server::spawn(cmd, addr.clone());
    server.wait_for_log("Encryption service initialized successfully");

    // Rows under the first key (so retiring it needs the rotation first),
    // and an expired scoped token to prune.
    let mut crypto = CryptoClient::new(server.channel().await);
    let db = SqlitePool::connect(&format!(
        "sqlite://{}",
        dir.path().join("keyward.db").display()
    ))
    .await
    .unwrap();
    for i in 0..3 {
        let id = format!("conn-{i}");
        let mut request = Request::new(EncryptRequest {
            plaintext: format!("credential {i}").into_bytes().into(),
            context: ctx(&[("connection_id", id.as_str())]),
            ..Default::default()
        });
        request.metadata_mut().insert(
            "authorization",
            MetadataValue::try_from(format!("Bearer {app}")).unwrap(),
        );
        let e = crypto
            .encrypt(request)
            .await
            .unwrap()
            .into_inner()
            .envelope
            .unwrap();
        let insert = sqlx::query(
            "INSERT INTO connections (id, encryption_key_id, data_key_ciphertext, data_key_iv, \
             payload_ciphertext, payload_iv) VALUES ($1, $2, $3, $4, $5, $6)",
        );
        bind_envelope!(insert, &id, e).execute(&db).await.unwrap();
    }
    sqlx::query(
        "INSERT INTO connection_scoped_tokens (connection_id, token_hash, expires_at) \
         VALUES ('conn-0', 'stale', '2000-01-01T00:00:00Z')",
    )
    .execute(&db)
    .await
    .unwrap();
    db.close().await;

    let path = std::env::join_paths(std::iter::once(grpcurl).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))
    .unwrap();
    let script = format!("set -euo pipefail\n{}", recipes());
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("bash")
            .args(["-c", &script])
            .env("PATH", path)
            .env("KW", &addr)
            .env("OPS_TOKEN", &ops)
            .env("APP_TOKEN", &app)
            .output(),
    )
    .await
    .expect("the recipes did not finish in 60 s")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "a recipe failed:\n{stdout}\n{stderr}");

    // Each answer, in the order of the recipes.
    let mut rest = stdout.as_ref();
    for (recipe, answer) in [
        ("ListKeys", r#""keyId": "primary""#),
        ("CreateKey", r#""status": "KEY_STATUS_PENDING""#),
        ("ActivateKey", r#""status": "KEY_STATUS_ROTATING""#),
        ("ActivateKey", r#""confirmedReplicas": ["#),
        ("ListReplicas", r#""kind": "serve""#),
        ("RefreshKeyMetadata", r#""activeKeyId": "2026-01""#),
        ("SelfTest", r#""passed": true"#),
        ("Decrypt", r#""plaintext": "aHVudGVyMg==""#),
        ("CancelRotation", r#""dryRun": true"#),
        ("WatchRotation", r#""terminal": true"#),
        ("GetRotationJob", r#""succeededRows": "3""#),
        ("ListRotationJobs", r#""jobs": ["#),
        ("GetKeyUsage", r#""rows": "3""#),
        ("RetireKey dry run", r#""keyward keys retire primary""#),
        ("RetireKey", r#""status": "KEY_STATUS_RETIRED""#),
        ("PruneExpiredScopedTokens", r#""removed": "1""#),
    ] {
        let at = rest
            .find(answer)
            .unwrap_or_else(|| panic!("{recipe}: no {answer} in what followed:\n{rest}"));
        rest = &rest[at + answer.len()..];
    }
    let cancelled = stdout.contains("ROTATION_STATUS_CANCELLED")
        || stdout.contains(r#""cancelRequested": true"#);
    assert!(cancelled, "CancelRotation: {stdout}");
    assert!(stdout.contains("ROTATION_STATUS_COMPLETED"), "{stdout}");
}
