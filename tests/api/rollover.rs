//! A master-secret rollover (runbook §2.1) finished end to end: two
//! replicas on secret A, both restarted one at a time with B (A as the
//! previous secret), B wraps only once both have it, a rotation rewraps
//! every row (those already on the active key included) and the key's
//! probe, `master-secret status` reaches 0 once the legacy copy is cut
//! over, A is removed, and every row still decrypts. And the README's
//! rolling restart on three replicas: no read fails at any step.

use std::{collections::HashMap, time::Duration};

use keyward::{
    api::proto::StartRotationRequest,
    crypto::{
        kms::local::{wrapped_by, Wrapping},
        secret::{Fingerprint, MasterSecret},
    },
    service::replica::ReplicaOptions,
};

use crate::{
    cli::{keyward, run, stderr, stdout},
    helpers::{master, spawn_with, Backend, Options, TestApp, MASTER},
    on_both_backends,
    rotation::{decrypt_all, insert_legacy_row, insert_row, start, watch_all},
};

const NEW_SECRET: &str = "the-new-master-secret-0123456789abcdef";

fn secrets(current: &str, previous: &[&str]) -> Options {
    Options {
        master: Some(master(current, previous)),
        replica: ReplicaOptions {
            heartbeat: Duration::from_millis(300),
            catalog_poll: Duration::from_millis(100),
            ..ReplicaOptions::default()
        },
        ..Options::default()
    }
}

fn fingerprint(secret: &str) -> Fingerprint {
    MasterSecret::new(secret).unwrap().fingerprint()
}

/// Which secret wrapped each row's data key (`None` for a legacy row).
async fn wrapped(app: &TestApp) -> Vec<Option<Fingerprint>> {
    let rows = app.connections().await;
    rows.iter()
        .map(|row| wrapped_by(row.data_key_ciphertext.as_deref().unwrap_or_default()))
        .collect()
}

/// Waits until the app wraps new data keys as `expected` says.
async fn wraps(app: &TestApp, expected: Wrapping) {
    let local = app.services.crypto.kms().local().unwrap().clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while local.wrapping() != expected {
        assert!(
            tokio::time::Instant::now() < deadline,
            "still {:?}",
            local.wrapping()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `keyward <args>` on the app's database with B current and A previous.
fn cli(app: &TestApp, args: &[&str]) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    run(keyward(dir.path())
        .env("DATABASE_URL", &app.database_url)
        .env("ENCRYPTION_MASTER_KEY", NEW_SECRET)
        .env("ENCRYPTION_MASTER_KEY_PREVIOUS", MASTER)
        .args(args))
}

async fn a_master_secret_rollover_finishes(backend: Backend) {
    let Some(first) = spawn_with(backend, secrets(MASTER, &[])).await else {
        return;
    };
    let second = first.replica(secrets(MASTER, &[])).await;
    let mut plaintexts = HashMap::new();
    for i in 0..20 {
        let id = format!("row-{i:02}");
        insert_row(&first, &id, &format!("secret {i}")).await;
        plaintexts.insert(id, format!("secret {i}"));
    }
    insert_legacy_row(&first, "legacy-1", "legacy secret", true).await;
    plaintexts.insert("legacy-1".into(), "legacy secret".into());
    let (old, new) = (fingerprint(MASTER), fingerprint(NEW_SECRET));
    assert!(wrapped(&first).await.iter().flatten().all(|fp| *fp == old));

    // Rolling restart, first replica: it has B, but the second has only A,
    // so A still wraps (a row it wrote must open on the second).
    let first = first.restart(secrets(NEW_SECRET, &[MASTER])).await;
    wraps(&first, Wrapping::Tagged(1)).await;
    insert_row(&first, "during-rollout", "written mid-rollout").await;
    plaintexts.insert("during-rollout".into(), "written mid-rollout".into());
    assert_eq!(decrypt_all(&second).await, plaintexts);
    // The mixed state is visible: each replica's secrets, current first.
    let listed = first
        .admin
        .clone()
        .list_replicas(keyward::api::proto::ListReplicasRequest {})
        .await
        .unwrap()
        .into_inner();
    let mut held: Vec<Vec<String>> = listed
        .replicas
        .iter()
        .map(|r| r.master_fingerprints.clone())
        .collect();
    held.sort();
    assert_eq!(
        held,
        [
            vec![new.to_string(), old.to_string()],
            vec![old.to_string()]
        ]
    );
    let shown = stdout(&cli(&first, &["replicas", "list"]));
    assert!(shown.contains("MASTER SECRETS"), "{shown}");
    assert!(shown.contains(&format!("{new},{old}")), "{shown}");

    // Second replica restarted: every replica has B, and B wraps.
    let second = second.restart(secrets(NEW_SECRET, &[MASTER])).await;
    wraps(&second, Wrapping::Tagged(0)).await;
    wraps(&first, Wrapping::Tagged(0)).await;
    let out = cli(&first, &["master-secret", "status"]);
    let shown = stdout(&out);
    assert_eq!(out.status.code(), Some(65), "{shown}{}", stderr(&out));
    assert!(
        shown.contains(&format!("{new}  current, wraps new data keys")),
        "{shown}"
    );
    assert!(shown.contains(&format!("{old}: 21")), "{shown}");
    assert!(
        shown.contains("rows still needing the previous master secret: 22"),
        "{shown}"
    );
    assert!(shown.contains("keyward rotate start"), "{shown}");

    // A rotation to the active key rewraps every row, though all but the
    // legacy one are on it already, and the key's probe.
    let job_id = start(&first, StartRotationRequest::default()).await;
    let events = watch_all(&first, &job_id).await;
    let job = events.last().unwrap().job.clone().unwrap();
    assert_eq!((job.succeeded_rows, job.failed_rows), (22, 0), "{job:?}");
    assert!(wrapped(&first).await.iter().all(|fp| *fp == Some(new)));
    let out = cli(&first, &["master-secret", "status"]);
    let shown = stdout(&out);
    assert_eq!(out.status.code(), Some(65), "{shown}");
    assert!(
        shown.contains("rows still needing the previous master secret: 1"),
        "{shown}"
    );
    assert!(shown.contains("keyward legacy cutover"), "{shown}");
    assert!(!shown.contains("probes of"), "{shown}");

    // The legacy copy's key derives from the old secret: cut it over.
    let out = cli(&first, &["legacy", "cutover", "--old-pods-stopped"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let out = cli(&first, &["master-secret", "status"]);
    let shown = stdout(&out);
    assert!(out.status.success(), "{shown}{}", stderr(&out));
    assert!(
        shown.contains("rows still needing the previous master secret: 0"),
        "{shown}"
    );
    assert!(
        shown.contains("the previous master secret may be removed"),
        "{shown}"
    );

    // A removed: both replicas restart on B alone; every row decrypts and
    // the keys' probes open (the self-test passes).
    drop(second);
    let first = first.restart(secrets(NEW_SECRET, &[])).await;
    let second = first.replica(secrets(NEW_SECRET, &[])).await;
    assert_eq!(decrypt_all(&first).await, plaintexts);
    assert_eq!(decrypt_all(&second).await, plaintexts);
    let report = second.services.admin.self_test().await.unwrap();
    assert!(report.passed(), "{report:?}");
}

on_both_backends!(a_master_secret_rollover_finishes);

/// The README's procedure on three replicas (the failure: rows
/// written by restarted replicas could not be read by the others). After
/// each replica's restart, every replica writes a row and every replica
/// reads every row: none fails, and the new secret wraps only once all
/// three hold it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_three_replicas_never_fails_a_read() {
    let first = spawn_with(Backend::Sqlite, secrets(MASTER, &[]))
        .await
        .unwrap();
    let mut replicas = vec![
        first.replica(secrets(MASTER, &[])).await,
        first.replica(secrets(MASTER, &[])).await,
    ];
    replicas.insert(0, first);
    let mut plaintexts = HashMap::new();
    let mut written = 0;
    for step in 0..=replicas.len() {
        if step > 0 {
            let old = replicas.remove(step - 1);
            let restarted = old.restart(secrets(NEW_SECRET, &[MASTER])).await;
            replicas.insert(step - 1, restarted);
            let expected = if step == replicas.len() {
                Wrapping::Tagged(0)
            } else {
                Wrapping::Tagged(1)
            };
            for app in &replicas[..step] {
                wraps(app, expected).await;
            }
        }
        for app in &replicas {
            let (id, value) = (format!("row-{written:02}"), format!("secret {written}"));
            insert_row(app, &id, &value).await;
            plaintexts.insert(id, value);
            written += 1;
        }
        for (i, app) in replicas.iter().enumerate() {
            assert_eq!(
                decrypt_all(app).await,
                plaintexts,
                "step {step}: replica {i} could not read every row"
            );
        }
    }
    let new = fingerprint(NEW_SECRET);
    let last: Vec<_> = wrapped(&replicas[0]).await.into_iter().skip(9).collect();
    assert!(last.iter().all(|fp| *fp == Some(new)), "{last:?}");
}
