//! Several servers on one database: a key made on one replica decrypts on
//! another at once (read-through), replicas follow catalog changes (version
//! poll; LISTEN/NOTIFY on PostgreSQL), staged activation waits for every
//! replica, re-encryption debt and the retirement plan, and a replica that
//! has not switched keys cannot keep a rotation from completing.

use std::time::{Duration, Instant};

use keyward::{
    api::proto::{
        decrypt_request::Ciphertext, ActivateKeyRequest, CreateKeyRequest, DecryptRequest,
        Envelope, GetKeyUsageRequest, GetRotationJobRequest, KeyStatus, KeyUsage, ListKeysRequest,
        ListReplicasRequest, ListReplicasResponse, RefreshKeyMetadataRequest, RetireKeyRequest,
        RetireKeyResponse, RotationStatus, StartRotationRequest,
    },
    auth::audit::{AuditSettings, AuditSink},
    service::replica::ReplicaOptions,
};
use tonic::Code;

use crate::{
    helpers::{assert_code, ctx, json_lines, master, spawn, spawn_with, Backend, Options, TestApp},
    on_both_backends,
    rotation::{activate_new_key, insert_legacy_row, insert_row, start, watch_all},
};

const CONN: &[(&str, &str)] = &[("connection_id", "c-1")];
const HOUR: Duration = Duration::from_secs(3600);

/// A replica that learns about catalog changes only when asked
/// (RefreshKeyMetadata) or by read-through: no version poll, no LISTEN,
/// no refresh timer and no heartbeat (each checks the version) within a
/// test, after the first.
fn frozen() -> Options {
    Options {
        worker: None,
        replica: ReplicaOptions {
            catalog_poll: HOUR,
            listen: false,
            heartbeat: HOUR,
            ..ReplicaOptions::default()
        },
        catalog_refresh: HOUR,
        ..Options::default()
    }
}

async fn decrypt(
    app: &TestApp,
    blob: &[u8],
    context: &[(&str, &str)],
) -> Result<Vec<u8>, tonic::Status> {
    app.crypto
        .clone()
        .decrypt(DecryptRequest {
            context: ctx(context),
            ciphertext: Some(Ciphertext::Blob(blob.to_vec().into())),
        })
        .await
        .map(|r| r.into_inner().plaintext.to_vec())
}

async fn usage(app: &TestApp) -> Vec<KeyUsage> {
    app.admin
        .clone()
        .get_key_usage(GetKeyUsageRequest {})
        .await
        .unwrap()
        .into_inner()
        .keys
}

/// RetireKey on `key_id` (a dry run, forced, or neither).
async fn retire(
    app: &TestApp,
    key_id: &str,
    dry_run: bool,
    force: bool,
) -> Result<RetireKeyResponse, tonic::Status> {
    app.admin
        .clone()
        .retire_key(RetireKeyRequest {
            key_id: key_id.into(),
            dry_run,
            force,
        })
        .await
        .map(tonic::Response::into_inner)
}

fn rows_on(usage: &[KeyUsage], key_id: &str) -> i64 {
    usage
        .iter()
        .find(|u| u.key_id == key_id)
        .map(|u| u.rows)
        .unwrap_or_else(|| panic!("no usage entry for {key_id:?}: {usage:?}"))
}

/// The acceptance test of issue 8's first point: activate a new key through
/// A, Encrypt through A, Decrypt through B at once.
async fn a_key_made_on_one_replica_decrypts_on_another_at_once(backend: Backend) {
    let Some(a) = spawn(backend).await else {
        return;
    };
    let b = a.replica(frozen()).await;
    let next = activate_new_key(&a, "next").await;
    let sealed = a.encrypt(b"made on A", CONN).await;
    assert_eq!(sealed.envelope.as_ref().unwrap().encryption_key_id, next);
    assert_eq!(decrypt(&b, &sealed.blob, CONN).await.unwrap(), b"made on A");

    // An id no replica knows still fails, with NOT_FOUND.
    let mut envelope: Envelope = sealed.envelope.unwrap();
    envelope.encryption_key_id = "00000000-0000-4000-8000-000000000000".into();
    let status = assert_code(
        b.crypto
            .clone()
            .decrypt(DecryptRequest {
                context: ctx(CONN),
                ciphertext: Some(Ciphertext::Envelope(envelope)),
            })
            .await,
        Code::NotFound,
    );
    assert!(
        status.message().contains("not in the key catalog"),
        "{status:?}"
    );
}

/// Replicas load a change made elsewhere by themselves: PostgreSQL
/// announces it (this replica does not poll), SQLite's version is polled.
async fn replicas_follow_catalog_changes(backend: Backend) {
    let Some(a) = spawn(backend).await else {
        return;
    };
    let poll = match backend {
        Backend::Postgres => HOUR,
        Backend::Sqlite => Duration::from_millis(100),
    };
    let b = a
        .replica(Options {
            worker: None,
            replica: ReplicaOptions {
                catalog_poll: poll,
                listen: true,
                heartbeat: Duration::from_secs(5),
                ..ReplicaOptions::default()
            },
            catalog_refresh: HOUR,
            ..Options::default()
        })
        .await;
    let next = activate_new_key(&a, "next").await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let sealed = b.encrypt(b"x", CONN).await;
        if sealed.envelope.unwrap().encryption_key_id == next {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "replica B never loaded the new key"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let replicas = list_replicas(&a).await;
    let listens: Vec<&str> = replicas
        .replicas
        .iter()
        .map(|r| r.listen.as_str())
        .collect();
    assert_eq!(replicas.replicas.len(), 2, "{replicas:?}");
    for app in [&a, &b] {
        let addr = app.addr.to_string();
        assert!(listens.contains(&addr.as_str()), "{listens:?}");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let replicas = list_replicas(&a).await;
        let current = replicas.replicas.iter().all(|r| {
            r.live
                && r.kind == "serve"
                && r.catalog_version == replicas.catalog_version
                && r.active_key_id == "next"
                && r.keys.iter().any(|k| k.key_id == "next" && k.ready)
                && r.keys.iter().any(|k| k.key_id == "primary" && k.ready)
        });
        if current {
            break;
        }
        assert!(Instant::now() < deadline, "{replicas:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A staged activation makes the key active only once every live replica
/// decrypted its probe: a replica with another master secret stops it,
/// naming the replica and the reason; so does one that never reports.
async fn staged_activation_waits_for_every_replica(backend: Backend) {
    let Some(a) = spawn(backend).await else {
        return;
    };
    let b = a
        .replica(Options {
            worker: None,
            ..Options::default()
        })
        .await;
    let mut c = a
        .replica(Options {
            worker: None,
            master: Some(master("another-master-secret-0123456789ab", &[])),
            ..Options::default()
        })
        .await;
    let mut admin = a.admin.clone();
    admin
        .create_key(CreateKeyRequest {
            key_id: "next".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let staged = |timeout| ActivateKeyRequest {
        key_id: "next".into(),
        staged: true,
        staged_timeout_seconds: timeout,
    };
    let c_id = replica_id(&a, &c).await;
    let status = assert_code(
        admin.activate_key(staged(20)).await,
        Code::FailedPrecondition,
    );
    assert!(status.message().contains(&c_id), "{status:?}");
    assert!(status.message().contains("cannot use it"), "{status:?}");
    assert_eq!(key_status(&a, "next").await, KeyStatus::Pending as i32);

    c.shutdown().await;
    // A replica that is live but never reports the new catalog.
    insert_stuck_replica(&a, None).await;
    let status = assert_code(
        admin.activate_key(staged(1)).await,
        Code::FailedPrecondition,
    );
    assert!(status.message().contains("serve-stuck"), "{status:?}");
    assert!(
        status
            .message()
            .contains("did not confirm the key within 1s"),
        "{status:?}"
    );
    assert_eq!(key_status(&a, "next").await, KeyStatus::Pending as i32);
    a.sql("DELETE FROM keyward_replicas WHERE id = 'serve-stuck'")
        .await;

    let activated = admin.activate_key(staged(20)).await.unwrap().into_inner();
    let mut confirmed: Vec<String> = activated
        .confirmed_replicas
        .iter()
        .map(|r| r.listen.clone())
        .collect();
    confirmed.sort();
    let mut expected = vec![a.addr.to_string(), b.addr.to_string()];
    expected.sort();
    assert_eq!(confirmed, expected);
    assert_eq!(
        activated.activated.unwrap().status,
        KeyStatus::Active as i32
    );
    // B had the key loaded already; it encrypts with it within a poll.
    let next = key_record_id(&a, "next");
    let deadline = Instant::now() + Duration::from_secs(5);
    while b
        .encrypt(b"x", CONN)
        .await
        .envelope
        .unwrap()
        .encryption_key_id
        != next
    {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn list_replicas(app: &TestApp) -> ListReplicasResponse {
    app.admin
        .clone()
        .list_replicas(ListReplicasRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// A `serve` replica `serve-stuck` that stays live (until 2099) on catalog
/// version 1, encrypting with `active` (a key record id), and never
/// heartbeats again.
async fn insert_stuck_replica(app: &TestApp, active: Option<&str>) {
    let active = active.map_or("NULL".to_owned(), |id| format!("'{id}'"));
    app.sql(&format!(
        "INSERT INTO keyward_replicas (id, kind, host, pid, listen, version, started_at, heartbeat_at, \
         expires_at, catalog_version, active_key_id, active_since, key_readiness) VALUES \
         ('serve-stuck', 'serve', 'old-host', 1, '10.0.0.9:50051', '0.0.0', '2026-01-01T00:00:00Z', \
         '2099-01-01T00:00:00Z', '2099-01-01T00:00:00Z', 1, {active}, NULL, '{{}}')"
    ))
    .await;
}

async fn replica_id(on: &TestApp, replica: &TestApp) -> String {
    let addr = replica.addr.to_string();
    list_replicas(on)
        .await
        .replicas
        .into_iter()
        .find(|r| r.listen == addr)
        .map(|r| r.id)
        .expect("the replica heartbeats")
}

async fn key_status(app: &TestApp, key_id: &str) -> i32 {
    app.admin
        .clone()
        .list_keys(ListKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .keys
        .into_iter()
        .find(|k| k.key_id == key_id)
        .map(|k| k.status)
        .unwrap()
}

fn key_record_id(app: &TestApp, key_id: &str) -> String {
    app.services
        .catalog
        .snapshot()
        .keys()
        .iter()
        .find(|k| k.key_id == key_id)
        .map(|k| k.id.clone())
        .unwrap()
}

/// GetKeyUsage counts rows per key (legacy too) with the oldest write; the
/// retirement plan names what blocks and what to run; after the rotation
/// the debt is zero and the key retires.
async fn key_usage_and_the_retirement_plan(backend: Backend) {
    let Some(app) = spawn(backend).await else {
        return;
    };
    for i in 0..3 {
        insert_row(&app, &format!("row-{i}"), "secret").await;
    }
    insert_legacy_row(&app, "legacy-1", "old secret", true).await;
    let before = usage(&app).await;
    assert_eq!(rows_on(&before, "primary"), 3);
    let legacy = before.iter().find(|u| u.legacy).unwrap();
    assert_eq!((legacy.rows, legacy.legacy_copies), (1, 1));
    let primary = before.iter().find(|u| u.key_id == "primary").unwrap();
    assert_eq!(primary.status, KeyStatus::Active as i32);
    assert_eq!(primary.targets.len(), 1);
    assert_eq!(primary.targets[0].target, "connections");
    assert!(primary.oldest_written_at.is_some());
    assert!(primary.oldest_age_seconds >= 0.0 && primary.oldest_age_seconds < 600.0);

    activate_new_key(&app, "next").await;
    let plan = retire(&app, "primary", true, false).await.unwrap();
    assert!(!plan.retired);
    assert_eq!(plan.referencing_rows, 3);
    assert_eq!(
        plan.blockers,
        vec!["3 rows are still on it (3 in connections)"],
        "{plan:?}"
    );
    assert!(
        plan.next_steps[0].contains("keyward rotate start --target next"),
        "{plan:?}"
    );
    assert_eq!(plan.rows[0].rows, 3);
    assert!(plan.replicas_using_key.is_empty());
    // A real retirement refuses with exactly that report.
    let status = assert_code(
        retire(&app, "primary", false, false).await,
        Code::FailedPrecondition,
    );
    assert!(status.message().contains(&plan.blockers[0]), "{status:?}");
    assert!(status.message().contains(&plan.next_steps[0]), "{status:?}");

    let job_id = start(&app, StartRotationRequest::default()).await;
    let job = watch_all(&app, &job_id).await.pop().unwrap().job.unwrap();
    assert_eq!(job.status, RotationStatus::Completed as i32);
    let after = usage(&app).await;
    assert_eq!(rows_on(&after, "primary"), 0);
    assert_eq!(rows_on(&after, "next"), 4);
    assert_eq!(after.iter().find(|u| u.legacy).unwrap().rows, 0);
    // The rotated legacy row keeps its legacy copy for the old pods: the
    // plan counts it and names the cutover, without blocking.
    let next = after.iter().find(|u| u.key_id == "next").unwrap();
    assert_eq!((next.legacy_copies, next.targets[0].legacy_copies), (1, 1));

    let plan = retire(&app, "primary", true, false).await.unwrap();
    assert!(plan.blockers.is_empty(), "{plan:?}");
    assert_eq!(plan.legacy_copies, 1);
    assert_eq!(plan.next_steps[0], "keyward keys retire primary");
    assert!(
        plan.next_steps[1].ends_with("keyward legacy cutover --dry-run"),
        "{plan:?}"
    );
    let retired = retire(&app, "primary", false, false).await.unwrap();
    assert!(retired.retired);
    assert_eq!(retired.key.unwrap().status, KeyStatus::Retired as i32);
}

/// Forcing a retirement past its blockers works, and the audit log says
/// which blockers were overridden.
async fn a_forced_retirement_is_audited_with_what_it_overrode(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.log");
    let Some(app) = spawn_with(
        backend,
        Options {
            audit: AuditSettings {
                sink: AuditSink::File(audit.clone()),
                ..AuditSettings::default()
            },
            ..Options::default()
        },
    )
    .await
    else {
        return;
    };
    insert_row(&app, "row-1", "secret").await;
    activate_new_key(&app, "next").await;
    let retired = retire(&app, "primary", false, true).await.unwrap();
    assert!(retired.retired);
    assert_eq!(
        retired.blockers,
        vec!["1 rows are still on it (1 in connections)"]
    );
    let log = std::fs::read_to_string(&audit).unwrap();
    let forced: Vec<serde_json::Value> = json_lines(&log)
        .into_iter()
        .filter(|e| e["result"] == "forced")
        .collect();
    assert_eq!(forced.len(), 1, "{log}");
    assert_eq!(forced[0]["rpc"], "keyward.v1.Admin/RetireKey");
    assert_eq!(forced[0]["key_id"], "primary");
    assert!(
        forced[0]["detail"]
            .as_str()
            .unwrap()
            .contains("1 rows are still on it"),
        "{log}"
    );
}

/// A replica still encrypting with the previous key after activation: the
/// job waits for it instead of ending, its rows are caught by later passes
/// and counted as late, and once it switches the job completes with every
/// row on the new key.
async fn a_stale_replica_does_not_stall_rotation(backend: Backend) {
    let Some(a) = spawn(backend).await else {
        return;
    };
    let b = a.replica(frozen()).await;
    for i in 0..20 {
        insert_row(&a, &format!("conn-{i:02}"), "secret").await;
    }
    let next = activate_new_key(&a, "next").await;
    let job_id = start(
        &a,
        StartRotationRequest {
            batch_size: 5,
            ..Default::default()
        },
    )
    .await;
    let job = |app: &TestApp| {
        let mut admin = app.admin.clone();
        let job_id = job_id.clone();
        async move {
            admin
                .get_rotation_job(GetRotationJobRequest { job_id })
                .await
                .unwrap()
                .into_inner()
        }
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while job(&a).await.processed_rows < 20 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // B has not loaded the activation: it still writes under primary. The
    // five rows land in one transaction, so the job's pass end sees all of
    // them late or none (one by one, a pass end between two inserts counted
    // only the first ones late, and the pass went on to the rest).
    let primary = key_record_id(&a, "primary");
    let mut late = Vec::new();
    for i in 0..5 {
        let id = format!("z-late-{i}");
        let sealed = b.encrypt(b"late", &[("connection_id", id.as_str())]).await;
        let envelope = sealed.envelope.unwrap();
        assert_eq!(envelope.encryption_key_id, primary);
        late.push((id, envelope));
    }
    b.insert_connections(&late).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let waiting = job(&a).await;
    assert_eq!(
        waiting.status,
        RotationStatus::Running as i32,
        "{waiting:?}"
    );

    b.admin
        .clone()
        .refresh_key_metadata(RefreshKeyMetadataRequest {})
        .await
        .unwrap();
    let done = watch_all(&a, &job_id).await.pop().unwrap().job.unwrap();
    assert_eq!(done.status, RotationStatus::Completed as i32, "{done:?}");
    assert_eq!(done.late_rows, 5, "{done:?}");
    assert_eq!(done.processed_rows, 25);
    assert!(done.last_error.is_empty(), "{done:?}");
    for row in a.connections().await {
        assert_eq!(
            row.encryption_key_id.as_deref(),
            Some(next.as_str()),
            "{row:?}"
        );
    }
    let sealed = b.encrypt(b"after", CONN).await;
    assert_eq!(sealed.envelope.unwrap().encryption_key_id, next);
}

/// A replica that never switches cannot hold a job forever: past the wait
/// the job ends anyway and names the replica.
async fn a_replica_that_never_switches_cannot_hold_a_job_forever(backend: Backend) {
    let Some(app) = spawn(backend).await else {
        return;
    };
    for i in 0..3 {
        insert_row(&app, &format!("conn-{i}"), "secret").await;
    }
    activate_new_key(&app, "next").await;
    let primary = key_record_id(&app, "primary");
    insert_stuck_replica(&app, Some(&primary)).await;
    let job_id = start(&app, StartRotationRequest::default()).await;
    let waiting = format!(
        "SELECT COUNT(*) FROM encryption_rotation_jobs WHERE id = '{job_id}' \
         AND status = 'running' AND replicas_waited_since IS NOT NULL"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while app.count(&waiting).await == 0 {
        assert!(
            Instant::now() < deadline,
            "the job never waited for the stuck replica"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // As if the wait had run its course.
    app.sql(&format!(
        "UPDATE encryption_rotation_jobs SET replicas_waited_since = '2000-01-01T00:00:00Z' \
         WHERE id = '{job_id}'"
    ))
    .await;
    let done = watch_all(&app, &job_id).await.pop().unwrap().job.unwrap();
    assert_eq!(done.status, RotationStatus::Completed as i32, "{done:?}");
    assert_eq!(done.processed_rows, 3);
    assert!(done.last_error.contains("serve-stuck"), "{done:?}");
    assert!(done.last_error.contains("after 120s"), "{done:?}");
}

on_both_backends!(
    a_replica_that_never_switches_cannot_hold_a_job_forever,
    a_key_made_on_one_replica_decrypts_on_another_at_once,
    replicas_follow_catalog_changes,
    staged_activation_waits_for_every_replica,
    key_usage_and_the_retirement_plan,
    a_forced_retirement_is_audited_with_what_it_overrode,
    a_stale_replica_does_not_stall_rotation,
);
