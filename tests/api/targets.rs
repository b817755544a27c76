//! One list of rotation targets for every process (issue: operator
//! safety): kept in the database, changed by `keyward targets` and the
//! Admin API, followed by every server, worker and operator command; a
//! `--rotation-targets` file seeds it or must agree with it.

use keyward::api::proto::{
    AddRotationTargetRequest, CancelRotationRequest, ListRotationTargetsRequest,
    RemoveRotationTargetRequest,
};
use tonic::Code;

use crate::{
    adoption::keyward_on,
    cli::{stderr, stdout},
    helpers::{assert_code, spawn_with, Backend, Options, TestApp, PRIMARY},
    rotation::{activate_new_key, start},
};

const API_TOKENS: &str = r#"{"table": "api_tokens", "context": {"token_id": "id"}, "columns": {"payload_ciphertext": "secret_ciphertext"}}"#;

/// The tables a server lists, in order.
async fn listed(app: &TestApp) -> Vec<String> {
    app.admin
        .clone()
        .list_rotation_targets(ListRotationTargetsRequest {})
        .await
        .unwrap()
        .into_inner()
        .targets
        .into_iter()
        .map(|t| t.table)
        .collect()
}

async fn add(app: &TestApp, definition: &str) -> Result<Vec<String>, tonic::Status> {
    let reply = app
        .admin
        .clone()
        .add_rotation_target(AddRotationTargetRequest {
            definition_json: definition.into(),
        })
        .await?;
    Ok(reply
        .into_inner()
        .targets
        .into_iter()
        .map(|t| t.table)
        .collect())
}

/// `api_tokens` with one secret under the active key.
async fn api_tokens_with_a_secret(app: &TestApp) {
    app.sql(
        "CREATE TABLE api_tokens (id INTEGER PRIMARY KEY, encryption_key_id TEXT,
           data_key_ciphertext BLOB, data_key_iv BLOB, secret_ciphertext BLOB, payload_iv BLOB,
           last_error TEXT, last_error_job_id TEXT)",
    )
    .await;
    let env = app
        .encrypt(b"token secret", &[("token_id", "1")])
        .await
        .envelope
        .unwrap();
    app.sql(&format!(
        "INSERT INTO api_tokens VALUES (1, '{}', X'{}', X'{}', X'{}', X'{}', NULL, NULL)",
        env.encryption_key_id,
        hex::encode(&env.data_key_ciphertext),
        hex::encode(&env.data_key_iv),
        hex::encode(&env.payload_ciphertext),
        hex::encode(&env.payload_iv),
    ))
    .await;
}

/// The issue's finding: the operator CLI, run without the targets file,
/// retired a key another target's rows still used. Now the list is the
/// database's: the CLI counts those rows, refuses, and every replica
/// follows a change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_process_follows_the_targets_in_the_database() {
    let options = || Options {
        worker: None,
        ..Options::default()
    };
    let app = spawn_with(Backend::Sqlite, options()).await.unwrap();
    let replica = app.replica(options()).await;
    api_tokens_with_a_secret(&app).await;

    // Checked against the table: a column it lacks is named.
    let missing = API_TOKENS.replace("\"token_id\": \"id\"", "\"token_id\": \"token\"");
    let refused = assert_code(add(&app, &missing).await, Code::FailedPrecondition);
    assert!(
        refused.message().contains("api_tokens.token"),
        "{refused:?}"
    );
    let refused = assert_code(
        add(&app, r#"{"table": "api_tokens"}"#).await,
        Code::InvalidArgument,
    );
    assert!(refused.message().contains("context"), "{refused:?}");
    assert_eq!(
        add(&app, API_TOKENS).await.unwrap(),
        ["connections", "api_tokens"]
    );
    assert_code(add(&app, API_TOKENS).await, Code::AlreadyExists);

    // The other replica follows within its catalog poll.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while listed(&replica).await != ["connections", "api_tokens"] {
        assert!(
            std::time::Instant::now() < deadline,
            "the replica never followed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    // The operator CLI, without --rotation-targets, sees the same list.
    activate_new_key(&app, "next").await;
    let url = &app.database_url;
    let out = keyward_on(url, &["targets", "list"]);
    assert!(stdout(&out).contains("api_tokens"), "{}", stdout(&out));
    let out = keyward_on(url, &["keys", "usage"]);
    assert!(stdout(&out).contains("api_tokens"), "{}", stdout(&out));
    let out = keyward_on(url, &["keys", "retire", PRIMARY, "--dry-run"]);
    assert!(
        format!("{}{}", stdout(&out), stderr(&out)).contains("api_tokens"),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    let out = keyward_on(url, &["keys", "retire", PRIMARY]);
    assert!(!out.status.success(), "retired a key api_tokens still uses");
    assert!(stderr(&out).contains("api_tokens"), "{}", stderr(&out));

    // No change while a job walks the list.
    let job = start(&app, Default::default()).await;
    let busy = assert_code(
        add(&app, r#"{"table": "connections", "encoding": "bytes"}"#).await,
        Code::FailedPrecondition,
    );
    assert!(busy.message().contains(&job), "{busy:?}");
    app.admin
        .clone()
        .cancel_rotation(CancelRotationRequest { job_id: job })
        .await
        .unwrap();

    // A table still holding envelopes is removed only with force.
    let out = keyward_on(url, &["targets", "remove", "api_tokens"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("1 rows"), "{}", stderr(&out));
    let removed = app
        .admin
        .clone()
        .remove_rotation_target(RemoveRotationTargetRequest {
            table: "api_tokens".into(),
            force: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(removed.targets.len(), 1);
}

/// A `--rotation-targets` file seeds an empty list; a process whose file
/// disagrees with the database refuses to start, naming the difference.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_targets_file_seeds_the_list_and_a_disagreeing_one_is_refused() {
    let seeded = keyward::rotation::definition::parse_list(&format!("[{API_TOKENS}]")).unwrap();
    let app = spawn_with(
        Backend::Sqlite,
        Options {
            targets: seeded,
            ..Options::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(listed(&app).await, ["connections", "api_tokens"]);
    let out = keyward_on(&app.database_url, &["targets", "list"]);
    assert!(stdout(&out).contains("api_tokens"), "{}", stdout(&out));

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("targets.json");
    std::fs::write(
        &file,
        format!("[{}]", API_TOKENS.replace("}}", r#"}, "encoding": "hex"}"#)),
    )
    .unwrap();
    let out = keyward_on(
        &app.database_url,
        &["--rotation-targets", file.to_str().unwrap(), "keys", "list"],
    );
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("api_tokens differs") && err.contains("hex"),
        "{err}"
    );
}

/// The README's `keyward targets` block, run verbatim with bash on a
/// database that has the table it names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_targets_block_runs_as_written() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let block: String = readme
        .split("<!-- targets:begin -->")
        .nth(1)
        .and_then(|rest| rest.split("<!-- targets:end -->").next())
        .expect("README.md has the targets block")
        .lines()
        .filter(|line| !line.starts_with("```"))
        .collect::<Vec<_>>()
        .join("\n");
    let app = spawn_with(Backend::Sqlite, Options::default())
        .await
        .unwrap();
    app.sql(
        "CREATE TABLE api_tokens (id INTEGER PRIMARY KEY, tenant TEXT NOT NULL, encryption_key_id TEXT,
           data_key_ciphertext BLOB, data_key_iv BLOB, secret_ciphertext BLOB, payload_iv BLOB,
           last_error TEXT, last_error_job_id TEXT)",
    )
    .await;
    let home = tempfile::tempdir().unwrap();
    let bin_dir = std::path::Path::new(env!("CARGO_BIN_EXE_keyward"))
        .parent()
        .unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = std::process::Command::new("bash")
        .args(["-euo", "pipefail", "-c", &block])
        .env_clear()
        .env("PATH", path)
        .env("HOME", home.path())
        .env("DATABASE_URL", &app.database_url)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let printed = stdout(&out);
    // add and list print the list with api_tokens; remove prints it without.
    assert_eq!(printed.matches("api_tokens ").count(), 2, "{printed}");
    assert!(
        printed.contains(r#""payload_ciphertext":"secret_ciphertext""#),
        "{printed}"
    );
    assert_eq!(listed(&app).await, ["connections"]);
}

/// The same list on PostgreSQL: added through one replica, followed by
/// another, checked against the table, removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_list_is_shared_on_postgres_too() {
    let Some(app) = spawn_with(Backend::Postgres, Options::default()).await else {
        return;
    };
    let replica = app.replica(Options::default()).await;
    app.sql(
        "CREATE TABLE api_tokens (id BIGINT PRIMARY KEY, encryption_key_id TEXT,
           data_key_ciphertext BYTEA, data_key_iv BYTEA, secret_ciphertext BYTEA, payload_iv BYTEA,
           last_error TEXT, last_error_job_id TEXT)",
    )
    .await;
    let missing = API_TOKENS.replace("\"token_id\": \"id\"", "\"token_id\": \"token\"");
    assert_code(add(&app, &missing).await, Code::FailedPrecondition);
    assert_eq!(
        add(&app, API_TOKENS).await.unwrap(),
        ["connections", "api_tokens"]
    );
    assert_eq!(listed(&replica).await, ["connections", "api_tokens"]);
    let encoded = add(&replica, r#"{"table": "connections", "encoding": "bytes"}"#).await;
    assert_eq!(encoded.unwrap(), ["connections", "api_tokens"]);
    app.admin
        .clone()
        .remove_rotation_target(RemoveRotationTargetRequest {
            table: "api_tokens".into(),
            force: false,
        })
        .await
        .unwrap();
    assert_eq!(listed(&replica).await, ["connections"]);
}
