//! Rotation end to end (runbook §1.4–§1.6): mixed tables, failures, dry run,
//! cancel, watchers, concurrent application writes, an offline worker.

use std::collections::HashMap;

use futures::StreamExt;
use keyward::{
    api::proto::{
        decrypt_request::Ciphertext, ActivateKeyRequest, CancelRotationRequest, CreateKeyRequest,
        DecryptRequest, GetRotationJobRequest, ListKeysRequest, ListRotationJobsRequest,
        RequeueRotationRequest, RetireKeyRequest, RotationMode, RotationProgress, RotationStatus,
        StartRotationRequest, WatchRotationRequest,
    },
    crypto::{legacy::encrypt_legacy, secret::MasterSecret},
};
use tonic::Code;

use crate::helpers::{
    assert_code, ctx, spawn, spawn_with, Backend, Options, TestApp, MASTER, PRIMARY,
};

pub(crate) fn conn_ctx(id: &str) -> Vec<(&str, &str)> {
    vec![("connection_id", id)]
}

/// Encrypts `plaintext` for row `id` with the row's context and stores it.
pub(crate) async fn insert_row(app: &TestApp, id: &str, plaintext: &str) {
    let sealed = app.encrypt(plaintext.as_bytes(), &conn_ctx(id)).await;
    app.insert_connection(id, sealed.envelope.as_ref().unwrap())
        .await;
}

pub(crate) async fn insert_legacy_row(app: &TestApp, id: &str, plaintext: &str, mirror: bool) {
    let (iv, ct) = encrypt_legacy(&MasterSecret::new(MASTER).unwrap(), plaintext.as_bytes());
    app.insert_legacy_connection(id, &ct, &iv, mirror).await;
}

pub(crate) async fn activate_new_key(app: &TestApp, key_id: &str) -> String {
    let mut admin = app.admin.clone();
    admin
        .create_key(CreateKeyRequest {
            key_id: key_id.into(),
            activate: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .id
}

pub(crate) async fn start(app: &TestApp, request: StartRotationRequest) -> String {
    app.admin
        .clone()
        .start_rotation(request)
        .await
        .unwrap()
        .into_inner()
        .id
}

/// Every event of a watch, to its end.
pub(crate) async fn watch_all(app: &TestApp, job_id: &str) -> Vec<RotationProgress> {
    let mut stream = app
        .admin
        .clone()
        .watch_rotation(WatchRotationRequest {
            job_id: job_id.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    while let Some(event) = tokio::time::timeout_at(deadline, stream.next())
        .await
        .expect("watch timed out")
    {
        events.push(event.unwrap());
    }
    events
}

/// Rotates every row onto the active key `record` in `mode` (batches of
/// 7) and checks the job completed without a failure, every row is on
/// `record` with no error, and every row decrypts to what `expected` says.
pub(crate) async fn rotate_every_row_onto(
    app: &TestApp,
    record: &str,
    mode: RotationMode,
    expected: &HashMap<String, String>,
) {
    let job = start(
        app,
        StartRotationRequest {
            mode: mode.into(),
            batch_size: 7,
            ..Default::default()
        },
    )
    .await;
    let last = watch_all(app, &job).await.pop().unwrap().job.unwrap();
    assert_eq!(
        last.status(),
        RotationStatus::Completed,
        "{record}: {last:?}"
    );
    assert_eq!(last.failed_rows, 0);
    for row in app.connections().await {
        assert_eq!(row.encryption_key_id.as_deref(), Some(record));
        assert_eq!(row.last_error, None);
    }
    assert_eq!(
        &decrypt_all(app).await,
        expected,
        "after rotating onto {record}"
    );
}

/// Decrypts every row through the API with its own context.
pub(crate) async fn decrypt_all(app: &TestApp) -> HashMap<String, String> {
    let mut client = app.crypto.clone();
    let mut out = HashMap::new();
    for row in app.connections().await {
        let opened = client
            .decrypt(DecryptRequest {
                context: ctx(&conn_ctx(&row.id)),
                ciphertext: Some(Ciphertext::Envelope(row.envelope())),
            })
            .await
            .unwrap_or_else(|s| panic!("row {} does not decrypt: {s:?}", row.id))
            .into_inner();
        out.insert(
            row.id.clone(),
            String::from_utf8(opened.plaintext.to_vec()).unwrap(),
        );
    }
    out
}

fn assert_monotone_with_one_terminal(events: &[RotationProgress]) {
    assert!(!events.is_empty());
    let terminal: Vec<_> = events.iter().filter(|e| e.terminal).collect();
    assert_eq!(terminal.len(), 1, "exactly one terminal event");
    assert!(
        events.last().unwrap().terminal,
        "the terminal event is last"
    );
    let mut last = 0;
    for e in events {
        let processed = e.job.as_ref().unwrap().processed_rows;
        assert!(
            processed >= last,
            "processed went backwards: {last} -> {processed}"
        );
        last = processed;
    }
}

async fn mixed_table_rotates_to_completion(backend: Backend) {
    let Some(app) = spawn(backend).await else {
        return;
    };
    let mut expected = HashMap::new();
    for i in 0..3 {
        let id = format!("legacy-{i}");
        insert_legacy_row(&app, &id, &format!("legacy secret {i}"), i != 0).await;
        expected.insert(id.clone(), format!("legacy secret {i}"));
    }
    for i in 0..7 {
        let id = format!("old-{i}");
        insert_row(&app, &id, &format!("old secret {i}")).await;
        expected.insert(id, format!("old secret {i}"));
    }
    let next = activate_new_key(&app, "2025-03").await;
    for i in 0..2 {
        let id = format!("new-{i}");
        insert_row(&app, &id, &format!("new secret {i}")).await;
        expected.insert(id, format!("new secret {i}"));
    }

    let job_id = start(
        &app,
        StartRotationRequest {
            batch_size: 4,
            ..Default::default()
        },
    )
    .await;
    let events = watch_all(&app, &job_id).await;
    assert_monotone_with_one_terminal(&events);
    let job = events.last().unwrap().job.clone().unwrap();
    assert_eq!(job.status, RotationStatus::Completed as i32, "{job:?}");
    assert_eq!(job.target_key_id, "2025-03");
    assert_eq!(
        (
            job.total_rows,
            job.processed_rows,
            job.succeeded_rows,
            job.failed_rows
        ),
        (10, 10, 10, 0)
    );

    let rows = app.connections().await;
    assert!(
        rows.iter()
            .all(|r| r.encryption_key_id.as_deref() == Some(next.as_str())),
        "{rows:?}"
    );
    assert!(rows.iter().all(|r| r.last_error.is_none()));
    // The legacy rows keep their legacy copy for the application's old pods
    // (until `keyward legacy cutover`); no other row gained one.
    let with_copy: Vec<&str> = rows
        .iter()
        .filter(|r| r.encrypted_credentials.is_some())
        .map(|r| r.id.as_str())
        .collect();
    assert_eq!(with_copy, ["legacy-0", "legacy-1", "legacy-2"]);
    assert_eq!(decrypt_all(&app).await, expected);

    // Runbook §1.6: the old key retires cleanly now.
    app.admin
        .clone()
        .retire_key(RetireKeyRequest {
            key_id: PRIMARY.into(),
            force: false,
            ..Default::default()
        })
        .await
        .unwrap();
}

async fn corrupted_rows_end_completed_with_errors(backend: Backend) {
    let Some(app) = spawn(backend).await else {
        return;
    };
    for i in 0..6 {
        insert_row(&app, &format!("row-{i}"), &format!("secret {i}")).await;
    }
    // Two rows whose ciphertext was damaged, one copied from another row.
    let mut damaged = app
        .encrypt(b"damaged", &conn_ctx("bad-1"))
        .await
        .envelope
        .unwrap();
    let mut bytes = damaged.payload_ciphertext.to_vec();
    bytes[0] ^= 1;
    damaged.payload_ciphertext = bytes.into();
    app.insert_connection("bad-1", &damaged).await;
    let copied = app
        .encrypt(b"copied", &conn_ctx("row-0"))
        .await
        .envelope
        .unwrap();
    app.insert_connection("bad-2", &copied).await;
    let next = activate_new_key(&app, "next").await;

    let job_id = start(&app, StartRotationRequest::default()).await;
    let job = watch_all(&app, &job_id).await.pop().unwrap().job.unwrap();
    assert_eq!(
        job.status,
        RotationStatus::CompletedWithErrors as i32,
        "{job:?}"
    );
    assert_eq!((job.succeeded_rows, job.failed_rows), (6, 2));
    assert!(job.last_error.contains("decryption failed"), "{job:?}");

    for row in app.connections().await {
        if row.id.starts_with("bad-") {
            assert_ne!(row.encryption_key_id.as_deref(), Some(next.as_str()));
            let error = row.last_error.unwrap_or_default();
            assert!(error.contains(&job_id), "{error}");
            assert!(
                !error.contains("damaged") && !error.contains("copied"),
                "no plaintext in errors"
            );
        } else {
            assert_eq!(row.encryption_key_id.as_deref(), Some(next.as_str()));
        }
    }
    // Retiring the old key is refused while the failed rows still use it.
    assert_code(
        app.admin
            .clone()
            .retire_key(RetireKeyRequest {
                key_id: PRIMARY.into(),
                force: false,
                ..Default::default()
            })
            .await,
        Code::FailedPrecondition,
    );
}

async fn dry_run_writes_nothing(backend: Backend) {
    let Some(app) = spawn(backend).await else {
        return;
    };
    for i in 0..5 {
        insert_row(&app, &format!("row-{i}"), "secret").await;
    }
    insert_legacy_row(&app, "legacy", "old", true).await;
    activate_new_key(&app, "next").await;
    let before = app.connections().await;
    let job_id = start(
        &app,
        StartRotationRequest {
            dry_run: true,
            batch_size: 2,
            ..Default::default()
        },
    )
    .await;
    let job = watch_all(&app, &job_id).await.pop().unwrap().job.unwrap();
    assert_eq!(job.status, RotationStatus::Completed as i32);
    assert!(job.dry_run);
    assert_eq!((job.processed_rows, job.succeeded_rows), (6, 6));
    assert_eq!(app.connections().await, before);
}

async fn rewrap_moves_only_the_data_key(backend: Backend) {
    let Some(app) = spawn(backend).await else {
        return;
    };
    for i in 0..4 {
        insert_row(&app, &format!("row-{i}"), &format!("secret {i}")).await;
    }
    insert_legacy_row(&app, "legacy", "legacy secret", true).await;
    let next = activate_new_key(&app, "next").await;
    let before = app.connections().await;
    let job_id = start(
        &app,
        StartRotationRequest {
            mode: RotationMode::Rewrap as i32,
            ..Default::default()
        },
    )
    .await;
    let job = watch_all(&app, &job_id).await.pop().unwrap().job.unwrap();
    assert_eq!(job.status, RotationStatus::Completed as i32, "{job:?}");
    assert_eq!(job.mode, RotationMode::Rewrap as i32);
    let after = app.connections().await;
    for (old, new) in before.iter().zip(&after) {
        assert_eq!(new.encryption_key_id.as_deref(), Some(next.as_str()));
        assert_ne!(new.data_key_ciphertext, old.data_key_ciphertext);
        if old.encryption_key_id.is_some() {
            assert_eq!(
                new.payload_ciphertext, old.payload_ciphertext,
                "payload untouched"
            );
        }
    }
    let plain = decrypt_all(&app).await;
    assert_eq!(plain["row-3"], "secret 3");
    assert_eq!(plain["legacy"], "legacy secret");
}

async fn watchers_agree_and_cancel_leaves_a_consistent_table(backend: Backend) {
    let Some(app) = spawn(backend).await else {
        return;
    };
    let mut expected = HashMap::new();
    for i in 0..40 {
        let id = format!("row-{i:02}");
        insert_row(&app, &id, &format!("secret {i}")).await;
        expected.insert(id, format!("secret {i}"));
    }
    let next = activate_new_key(&app, "next").await;
    // 20 rows/s in batches of 5: about two seconds for the whole table.
    let job_id = start(
        &app,
        StartRotationRequest {
            batch_size: 5,
            max_rows_per_second: 20,
            ..Default::default()
        },
    )
    .await;
    let early = tokio::spawn({
        let app_admin = app.admin.clone();
        let job_id = job_id.clone();
        async move {
            let mut stream = app_admin
                .clone()
                .watch_rotation(WatchRotationRequest { job_id })
                .await
                .unwrap()
                .into_inner();
            let mut events = Vec::new();
            while let Some(e) = stream.next().await {
                events.push(e.unwrap());
            }
            events
        }
    });
    // A second watcher joins mid-job.
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    let late = watch_all(&app, &job_id).await;
    let early = early.await.unwrap();
    assert_monotone_with_one_terminal(&early);
    assert_monotone_with_one_terminal(&late);
    assert_eq!(
        early.last().unwrap().job,
        late.last().unwrap().job,
        "both end on the same state"
    );
    assert!(early.len() >= 2);
    let done = late.last().unwrap().job.clone().unwrap();
    assert_eq!(done.status, RotationStatus::Completed as i32);

    // Cancel: a fresh slow job is stopped between batches.
    let other = activate_new_key(&app, "third").await;
    let job_id = start(
        &app,
        StartRotationRequest {
            batch_size: 5,
            max_rows_per_second: 10,
            ..Default::default()
        },
    )
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    app.admin
        .clone()
        .cancel_rotation(CancelRotationRequest {
            job_id: job_id.clone(),
        })
        .await
        .unwrap();
    let job = watch_all(&app, &job_id).await.pop().unwrap().job.unwrap();
    assert_eq!(job.status, RotationStatus::Cancelled as i32, "{job:?}");
    assert!(
        job.processed_rows < 40,
        "cancel stopped the job early: {job:?}"
    );
    let rows = app.connections().await;
    assert!(rows
        .iter()
        .all(|r| [Some(next.as_str()), Some(other.as_str())]
            .contains(&r.encryption_key_id.as_deref())));
    assert_eq!(
        decrypt_all(&app).await,
        expected,
        "every row still decrypts after cancel"
    );

    // A cancelled job can be requeued and then completes.
    app.admin
        .clone()
        .requeue_rotation(RequeueRotationRequest {
            job_id: job_id.clone(),
        })
        .await
        .unwrap();
    let job = watch_all(&app, &job_id).await.pop().unwrap().job.unwrap();
    assert_eq!(job.status, RotationStatus::Completed as i32, "{job:?}");
    assert!(app
        .connections()
        .await
        .iter()
        .all(|r| r.encryption_key_id.as_deref() == Some(other.as_str())));
}

async fn concurrent_application_writes_are_never_lost(backend: Backend) {
    let Some(app) = spawn(backend).await else {
        return;
    };
    for i in 0..60 {
        insert_row(&app, &format!("row-{i:02}"), "v1").await;
    }
    let next = activate_new_key(&app, "next").await;
    let job_id = start(
        &app,
        StartRotationRequest {
            batch_size: 10,
            max_rows_per_second: 150,
            ..Default::default()
        },
    )
    .await;
    // The application keeps rewriting rows while the job runs.
    let mut expected: HashMap<String, String> = (0..60)
        .map(|i| (format!("row-{i:02}"), "v1".to_owned()))
        .collect();
    for round in 0..3 {
        for i in (round..60).step_by(7) {
            let id = format!("row-{i:02}");
            let value = format!("v2-{round}");
            let sealed = app.encrypt(value.as_bytes(), &conn_ctx(&id)).await;
            app.update_connection(&id, sealed.envelope.as_ref().unwrap())
                .await;
            expected.insert(id, value);
        }
        tokio::time::sleep(std::time::Duration::from_millis(60)).await;
    }
    let job = watch_all(&app, &job_id).await.pop().unwrap().job.unwrap();
    assert_eq!(job.status, RotationStatus::Completed as i32, "{job:?}");
    assert!(app
        .connections()
        .await
        .iter()
        .all(|r| r.encryption_key_id.as_deref() == Some(next.as_str())));
    assert_eq!(
        decrypt_all(&app).await,
        expected,
        "no application write was lost"
    );
}

async fn jobs_wait_for_a_worker(backend: Backend) {
    let Some(app) = spawn_with(
        backend,
        Options {
            worker: None,
            ..Options::default()
        },
    )
    .await
    else {
        return;
    };
    insert_row(&app, "row-1", "secret").await;
    activate_new_key(&app, "next").await;
    let job_id = start(&app, StartRotationRequest::default()).await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let mut admin = app.admin.clone();
    let job = admin
        .get_rotation_job(GetRotationJobRequest {
            job_id: job_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        job.status,
        RotationStatus::Pending as i32,
        "worker offline: the job stays pending"
    );
    let listed = admin
        .list_rotation_jobs(ListRotationJobsRequest { limit: 0 })
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(listed.len(), 1);

    // Start a worker on the same database (the runbook's fix).
    let services = keyward::app::Services::open(
        &app.database_url,
        Some(&crate::helpers::master(MASTER, &[])),
        Default::default(),
    )
    .await
    .unwrap();
    let worker = services.worker(Default::default());
    for _ in 0..10 {
        worker.try_execute_task().await.unwrap();
    }
    let job = admin
        .get_rotation_job(GetRotationJobRequest { job_id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(job.status, RotationStatus::Completed as i32);
    let _ = admin.list_keys(ListKeysRequest {}).await.unwrap();
}

async fn bad_rotation_requests(backend: Backend) {
    let Some(app) = spawn(backend).await else {
        return;
    };
    let mut admin = app.admin.clone();
    assert_code(
        admin
            .get_rotation_job(GetRotationJobRequest {
                job_id: "nope".into(),
            })
            .await,
        Code::NotFound,
    );
    assert_code(
        admin
            .watch_rotation(WatchRotationRequest {
                job_id: "nope".into(),
            })
            .await,
        Code::NotFound,
    );
    assert_code(
        admin
            .start_rotation(StartRotationRequest {
                target_key_id: "missing".into(),
                ..Default::default()
            })
            .await,
        Code::NotFound,
    );
    assert_code(
        admin
            .start_rotation(StartRotationRequest {
                batch_size: 100_000,
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
    );
    activate_new_key(&app, "next").await;
    assert_code(
        admin
            .start_rotation(StartRotationRequest {
                target_key_id: PRIMARY.into(),
                ..Default::default()
            })
            .await,
        Code::FailedPrecondition,
    );
    let job_id = start(&app, StartRotationRequest::default()).await;
    let job = watch_all(&app, &job_id).await.pop().unwrap().job.unwrap();
    assert_eq!(job.status, RotationStatus::Completed as i32);
    assert_code(
        admin
            .requeue_rotation(RequeueRotationRequest { job_id })
            .await,
        Code::FailedPrecondition,
    );
    let _ = admin
        .activate_key(ActivateKeyRequest {
            key_id: "next".into(),
            ..Default::default()
        })
        .await
        .unwrap();
}

crate::on_both_backends!(
    mixed_table_rotates_to_completion,
    corrupted_rows_end_completed_with_errors,
    dry_run_writes_nothing,
    rewrap_moves_only_the_data_key,
    watchers_agree_and_cancel_leaves_a_consistent_table,
    concurrent_application_writes_are_never_lost,
    jobs_wait_for_a_worker,
    bad_rotation_requests,
    configured_tables_rotate_too,
);

/// Runbook §1.2 by hand (`activate`), RefreshKeyMetadata, a rotation,
/// §1.6 by hand (`retire`): the old key is retired and every row decrypts.
async fn runbook_sql_runs(backend: Backend, activate: &str, retire: &str) {
    let Some(app) = spawn(backend).await else {
        return;
    };
    insert_row(&app, "conn-a", "alpha").await;
    insert_legacy_row(&app, "conn-b", "beta", true).await;
    app.sql(activate).await;
    let mut admin = app.admin.clone();
    let refreshed = admin
        .refresh_key_metadata(keyward::api::proto::RefreshKeyMetadataRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(refreshed.active_key_id, "2025-03-kms");
    let job_id = start(&app, StartRotationRequest::default()).await;
    let job = watch_all(&app, &job_id).await.pop().unwrap().job.unwrap();
    assert_eq!(job.status, RotationStatus::Completed as i32, "{job:?}");
    assert_eq!(job.target_key_id, "2025-03-kms");
    assert_eq!(job.succeeded_rows, 2);
    app.sql(retire).await;
    let keys = crate::helpers::list_keys(&mut admin).await;
    let old = keys.iter().find(|k| k.key_id == PRIMARY).unwrap();
    assert_eq!(old.status, keyward::api::proto::KeyStatus::Retired as i32);
    assert!(old.rotated_at.is_some(), "{old:?}");
    let plain = decrypt_all(&app).await;
    assert_eq!(
        (plain["conn-a"].as_str(), plain["conn-b"].as_str()),
        ("alpha", "beta")
    );
}

/// Runbook §1.2 and §1.6 exactly as written (with a local KMS key name for
/// the ARN).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runbook_sql_runs_verbatim_on_postgres() {
    runbook_sql_runs(
        Backend::Postgres,
        "UPDATE encryption_keys
SET status = 'rotating', rotated_at = NOW(), updated_at = NOW()
WHERE status = 'active';

INSERT INTO encryption_keys (key_id, kms_key_arn, alias, status)
VALUES (
  '2025-03-kms',
  'local:app/master',
  'prod/app/2025-03',
  'active'
);",
        "UPDATE encryption_keys
SET status = 'retired', updated_at = NOW()
WHERE status = 'rotating';",
    )
    .await;
}

/// The README's SQLite form of runbook §1.2 and §1.6, as written there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readmes_sqlite_runbook_sql_runs() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let block = readme
        .split("<!-- sqlite-runbook:begin -->")
        .nth(1)
        .and_then(|rest| rest.split("<!-- sqlite-runbook:end -->").next())
        .expect("README.md has the SQLite runbook block");
    let sql = block.replace("```sql", "").replace("```", "");
    let (activate, retire) = sql
        .split_once("-- §1.6")
        .expect("the block has §1.2, then §1.6");
    runbook_sql_runs(Backend::Sqlite, activate, &format!("-- §1.6{retire}")).await;
}

/// A deployment's own table of secrets, added by configuration, rotates in
/// the same job as `connections`, each row under its own context.
async fn configured_tables_rotate_too(backend: Backend) {
    use keyward::rotation::target::RotationTarget;
    let target = RotationTarget::new(
        "api_tokens",
        "id",
        &[
            ("token_id".into(), "id".into()),
            ("tenant".into(), "tenant".into()),
        ],
        &[("payload_ciphertext", "secret_ciphertext")],
        None,
        None,
    )
    .unwrap();
    let options = Options {
        targets: vec![target],
        ..Options::default()
    };
    let Some(app) = spawn_with(backend, options).await else {
        return;
    };
    let blob = if backend == Backend::Postgres {
        "BYTEA"
    } else {
        "BLOB"
    };
    app.sql(&format!(
        "CREATE TABLE api_tokens (id INTEGER PRIMARY KEY, tenant TEXT NOT NULL, encryption_key_id TEXT,
           data_key_ciphertext {blob}, data_key_iv {blob}, secret_ciphertext {blob}, payload_iv {blob},
           last_error TEXT, last_error_job_id TEXT)"
    ))
    .await;
    let hex_literal = |bytes: &[u8]| match backend {
        Backend::Postgres => format!("'\\x{}'::bytea", hex::encode(bytes)),
        Backend::Sqlite => format!("X'{}'", hex::encode(bytes)),
    };
    let mut expected = HashMap::new();
    for id in 1..=12 {
        let tenant = if id % 2 == 0 { "acme" } else { "globex" };
        let value = format!("token {id}");
        let id_text = id.to_string();
        let env = app
            .encrypt(
                value.as_bytes(),
                &[("token_id", id_text.as_str()), ("tenant", tenant)],
            )
            .await
            .envelope
            .unwrap();
        app.sql(&format!(
            "INSERT INTO api_tokens (id, tenant, encryption_key_id, data_key_ciphertext, data_key_iv, secret_ciphertext, payload_iv)
             VALUES ({id}, '{tenant}', '{}', {}, {}, {}, {})",
            env.encryption_key_id,
            hex_literal(&env.data_key_ciphertext),
            hex_literal(&env.data_key_iv),
            hex_literal(&env.payload_ciphertext),
            hex_literal(&env.payload_iv),
        ))
        .await;
        expected.insert(id, (tenant, value));
    }
    insert_row(&app, "conn-1", "connection secret").await;
    let next = activate_new_key(&app, "next").await;

    let job_id = start(
        &app,
        StartRotationRequest {
            batch_size: 5,
            ..Default::default()
        },
    )
    .await;
    let job = watch_all(&app, &job_id).await.pop().unwrap().job.unwrap();
    assert_eq!(job.status, RotationStatus::Completed as i32, "{job:?}");
    assert_eq!((job.total_rows, job.succeeded_rows), (13, 13));
    assert_eq!(decrypt_all(&app).await["conn-1"], "connection secret");

    // Read the rotated tokens back and decrypt each with its own context.
    type TokenRow = (
        i64,
        String,
        Option<String>,
        Vec<u8>,
        Vec<u8>,
        Vec<u8>,
        Vec<u8>,
    );
    let rows: Vec<TokenRow> = match backend {
        Backend::Sqlite => {
            let pool = sqlx::SqlitePool::connect(&app.database_url).await.unwrap();
            sqlx::query_as("SELECT CAST(id AS BIGINT), tenant, encryption_key_id, data_key_ciphertext, data_key_iv, secret_ciphertext, payload_iv FROM api_tokens")
                .fetch_all(&pool)
                .await
                .unwrap()
        }
        Backend::Postgres => {
            let pool = sqlx::PgPool::connect(&app.database_url).await.unwrap();
            sqlx::query_as("SELECT CAST(id AS BIGINT), tenant, encryption_key_id, data_key_ciphertext, data_key_iv, secret_ciphertext, payload_iv FROM api_tokens")
                .fetch_all(&pool)
                .await
                .unwrap()
        }
    };
    assert_eq!(rows.len(), 12);
    let mut client = app.crypto.clone();
    for (id, tenant, key, dk, dk_iv, ct, iv) in rows {
        assert_eq!(key.as_deref(), Some(next.as_str()));
        let id_text = id.to_string();
        let envelope = keyward::api::proto::Envelope {
            encryption_key_id: key.unwrap(),
            data_key_ciphertext: dk.into(),
            data_key_iv: dk_iv.into(),
            payload_ciphertext: ct.into(),
            payload_iv: iv.into(),
        };
        let opened = client
            .decrypt(DecryptRequest {
                context: ctx(&[("token_id", id_text.as_str()), ("tenant", tenant.as_str())]),
                ciphertext: Some(Ciphertext::Envelope(envelope)),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            std::str::from_utf8(&opened.plaintext).unwrap(),
            expected[&id].1
        );
    }
}
