//! A replica started with another master secret is caught, not trusted:
//! it cannot open the keys' probes (or, for a key without one, any of a
//! sample of the key's rows), so it is NOT_SERVING saying why, its
//! self-test fails, the right replicas' self-tests name it, and it never
//! writes the probe that would make its secret the truth; its rotation
//! worker claims nothing. `serve --dev` refuses such a database.

use std::time::Duration;

use keyward::{
    api::proto::ListReplicasRequest,
    rotation::worker::{Step, WorkerOptions},
    service::admin::Readiness,
};

use crate::{
    cli::{keyward, run, stderr},
    helpers::{master, spawn, Backend, Options, TestApp, MASTER},
    on_both_backends,
};

const OTHER_SECRET: &str = "another-master-secret-0123456789ab";
const WRONG_SECRET: &str =
    "this master secret (ENCRYPTION_MASTER_KEY) is not the one that wrote key primary";

fn with_secret(secret: &str) -> Options {
    Options {
        master: Some(master(secret, &[])),
        ..Options::default()
    }
}

async fn rows(app: &TestApp, count: usize) {
    for i in 0..count {
        let id = format!("row-{i}");
        let sealed = app.encrypt(b"s3cret", &[("connection_id", &id)]).await;
        app.insert_connection(&id, &sealed.envelope.unwrap()).await;
    }
}

/// Waits until the app's readiness is not ready, and returns why.
async fn not_ready_reason(app: &TestApp) -> String {
    let mut readiness = app.services.admin.readiness();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Readiness::NotReady(reason) = &*readiness.borrow_and_update() {
            return reason.clone();
        }
        tokio::time::timeout_at(deadline, readiness.changed())
            .await
            .expect("the replica stayed ready")
            .unwrap();
    }
}

async fn a_replica_with_another_master_secret_is_not_serving(backend: Backend) {
    let Some(right) = spawn(backend).await else {
        return;
    };
    rows(&right, 3).await;
    let wrong = right.replica(with_secret(OTHER_SECRET)).await;

    let reason = not_ready_reason(&wrong).await;
    assert!(reason.contains(WRONG_SECRET), "{reason}");
    wrong.wait_for_health(2).await;
    assert_eq!(right.health_status().await, 1);
    // Nothing it encrypted could be read elsewhere: it refuses to write.
    let refused = wrong
        .crypto
        .clone()
        .encrypt(keyward::api::proto::EncryptRequest {
            plaintext: b"x".to_vec().into(),
            context: crate::helpers::ctx(&[("connection_id", "9")]),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains(WRONG_SECRET), "{refused:?}");

    // Its self-test fails, saying so; the right replica's names it too.
    let report = wrong.services.admin.self_test().await.unwrap();
    assert!(!report.passed());
    let primary = report
        .keys
        .iter()
        .find(|c| c.key.key_id == "primary")
        .unwrap();
    assert!(primary.foreign, "{primary:?}");
    assert!(primary.error.as_deref().unwrap().contains(WRONG_SECRET));
    wrong.wait_for_heartbeat().await;
    let report = right.services.admin.self_test().await.unwrap();
    assert!(
        !report.passed(),
        "the right replica must report the wrong one"
    );
    let primary = report
        .keys
        .iter()
        .find(|c| c.key.key_id == "primary")
        .unwrap();
    assert_eq!(primary.error, None);
    assert_eq!(primary.replicas.len(), 1, "{primary:?}");
    assert!(primary.replicas[0].contains(WRONG_SECRET), "{primary:?}");

    // `replicas list` shows it, and the probe stays the right replica's.
    let listed = right
        .admin
        .clone()
        .list_replicas(ListReplicasRequest {})
        .await
        .unwrap()
        .into_inner();
    let reasons: Vec<String> = listed
        .replicas
        .iter()
        .flat_map(|r| r.keys.iter().map(|k| k.error.clone()))
        .filter(|e| !e.is_empty())
        .collect();
    assert_eq!(reasons.len(), 1, "{listed:?}");
    assert!(reasons[0].contains(WRONG_SECRET));
    let stored = right.services.store.key_probes().await.unwrap();
    assert_eq!(stored.len(), 1);

    // Its rotation worker claims nothing: it would only fail the rows.
    let worker = wrong.services.worker(WorkerOptions::default());
    match worker.try_execute_task().await.unwrap() {
        Step::Held(reason) => assert!(reason.contains(WRONG_SECRET), "{reason}"),
        other => panic!("a worker with another master secret stepped: {other:?}"),
    }
}

async fn the_first_replica_to_start_does_not_define_a_keys_truth(backend: Backend) {
    let Some(mut right) = spawn(backend).await else {
        return;
    };
    rows(&right, 3).await;
    right.shutdown().await;
    // A key from before probes existed (or inserted by the runbook's SQL)
    // has rows and no probe.
    right.sql("DELETE FROM keyward_key_probes").await;
    let wrong = right.replica(with_secret(OTHER_SECRET)).await;
    let reason = not_ready_reason(&wrong).await;
    assert!(reason.contains(WRONG_SECRET), "{reason}");
    assert!(reason.contains("sampled rows"), "{reason}");
    assert_eq!(
        wrong.count("SELECT COUNT(*) FROM keyward_key_probes").await,
        0,
        "a replica that opened none of the key's rows wrote its probe"
    );

    // The right secret proves itself on the rows, writes the probe, and
    // serves; the wrong replica stays out.
    let right = wrong.replica(Options::default()).await;
    right.wait_for_health(1).await;
    assert_eq!(
        right.count("SELECT COUNT(*) FROM keyward_key_probes").await,
        1
    );
    assert!(not_ready_reason(&wrong).await.contains(WRONG_SECRET));
}

on_both_backends!(
    a_replica_with_another_master_secret_is_not_serving,
    the_first_replica_to_start_does_not_define_a_keys_truth
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_dev_refuses_a_database_holding_keys_of_another_secret() {
    let dir = tempfile::tempdir().unwrap();
    // A database with a local key and rows, written with MASTER.
    let db = dir.path().join("keyward.db");
    let url = format!("sqlite://{}?mode=rwc", db.display());
    let services = keyward::app::Services::open(
        &url,
        Some(&master(MASTER, &[])),
        keyward::service::crypto::Limits::default(),
    )
    .await
    .unwrap();
    services
        .admin
        .seed_key(keyward::service::admin::CreateKey {
            key_id: "primary".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    services.store.close().await;

    // No secret given: --dev would generate one, and refuses instead.
    let out = run(keyward(dir.path()).args(["serve", "--dev", "--listen", "127.0.0.1:0"]));
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("already holds local keys (primary)"),
        "{}",
        stderr(&out)
    );
    assert!(!dir.path().join("keyward.master.key").exists());

    // Another secret given: the key's probe does not open.
    let out = run(keyward(dir.path())
        .env("ENCRYPTION_MASTER_KEY", OTHER_SECRET)
        .args(["serve", "--dev", "--listen", "127.0.0.1:0"]));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("serve --dev refuses this database"),
        "{}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("is not the one that wrote key primary"),
        "{}",
        stderr(&out)
    );
}
