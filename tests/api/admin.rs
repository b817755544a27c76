//! keyward.v1.Admin end to end: the key lifecycle of runbook §1.2–§1.6,
//! refresh after out-of-band changes, self-test and health.

use keyward::api::proto::{
    ActivateKeyRequest, CreateKeyRequest, KeyStatus, RefreshKeyMetadataRequest, RetireKeyRequest,
    SelfTestRequest,
};
use tonic::Code;

use crate::helpers::{assert_code, spawn, spawn_with, Backend, Options, PRIMARY};

const CONN: &[(&str, &str)] = &[("connection_id", "c-1")];

async fn activation_demotes_the_previous_key(backend: Backend) {
    let Some(app) = spawn(backend).await else {
        return;
    };
    let mut admin = app.admin.clone();
    let created = admin
        .create_key(CreateKeyRequest {
            key_id: "2025-03".into(),
            alias: "prod/app/2025-03".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.status, KeyStatus::Pending as i32);
    assert_eq!(created.kms_key_arn, "local:2025-03");
    assert_eq!(created.provider, "local");
    // Pending keys are not used for writes.
    assert_eq!(app.encrypt(b"x", CONN).await.key_id, PRIMARY);

    let activation = admin
        .activate_key(ActivateKeyRequest {
            key_id: "2025-03".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let activated = activation.activated.unwrap();
    let previous = activation.previous.unwrap();
    assert_eq!(activated.status, KeyStatus::Active as i32);
    assert_eq!(previous.key_id, PRIMARY);
    assert_eq!(previous.status, KeyStatus::Rotating as i32);
    assert!(previous.rotated_at.is_some());
    assert_eq!(app.encrypt(b"x", CONN).await.key_id, "2025-03");

    let keys = crate::helpers::list_keys(&mut admin).await;
    let active: Vec<_> = keys
        .iter()
        .filter(|k| k.status == KeyStatus::Active as i32)
        .collect();
    assert_eq!(active.len(), 1, "exactly one active key");

    // Activating the active key again changes nothing.
    let again = admin
        .activate_key(ActivateKeyRequest {
            key_id: "2025-03".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(again.previous.is_none());
    // By record id works too.
    admin
        .activate_key(ActivateKeyRequest {
            key_id: previous.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(app.encrypt(b"x", CONN).await.key_id, PRIMARY);
}

async fn retire_refuses_while_rows_reference_the_key(backend: Backend) {
    let Some(app) = spawn(backend).await else {
        return;
    };
    let sealed = app.encrypt(b"credential", CONN).await;
    app.insert_connection("c-1", sealed.envelope.as_ref().unwrap())
        .await;
    let mut admin = app.admin.clone();

    let status = assert_code(
        admin
            .retire_key(RetireKeyRequest {
                key_id: PRIMARY.into(),
                force: false,
                ..Default::default()
            })
            .await,
        Code::FailedPrecondition,
    );
    assert!(status.message().contains("only rotating"), "{status:?}");

    admin
        .create_key(CreateKeyRequest {
            key_id: "next".into(),
            activate: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let status = assert_code(
        admin
            .retire_key(RetireKeyRequest {
                key_id: PRIMARY.into(),
                force: false,
                ..Default::default()
            })
            .await,
        Code::FailedPrecondition,
    );
    assert!(
        status
            .message()
            .contains("1 rows are still on it (1 in connections)"),
        "{status:?}"
    );

    let retired = admin
        .retire_key(RetireKeyRequest {
            key_id: PRIMARY.into(),
            force: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retired.referencing_rows, 1);
    assert_eq!(retired.key.unwrap().status, KeyStatus::Retired as i32);

    let status = assert_code(
        admin
            .retire_key(RetireKeyRequest {
                key_id: "next".into(),
                force: false,
                ..Default::default()
            })
            .await,
        Code::FailedPrecondition,
    );
    assert!(status.message().contains("active"));
    assert_code(
        admin
            .retire_key(RetireKeyRequest {
                key_id: "nope".into(),
                force: false,
                ..Default::default()
            })
            .await,
        Code::NotFound,
    );
}

async fn retire_succeeds_once_no_row_references_the_key(backend: Backend) {
    let Some(app) = spawn(backend).await else {
        return;
    };
    let mut admin = app.admin.clone();
    admin
        .create_key(CreateKeyRequest {
            key_id: "next".into(),
            activate: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let sealed = app.encrypt(b"credential", CONN).await;
    app.insert_connection("c-1", sealed.envelope.as_ref().unwrap())
        .await;
    let retired = admin
        .retire_key(RetireKeyRequest {
            key_id: PRIMARY.into(),
            force: false,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retired.referencing_rows, 0);
}

async fn bad_admin_requests(backend: Backend) {
    let Some(app) = spawn(backend).await else {
        return;
    };
    let mut admin = app.admin.clone();
    let dup = assert_code(
        admin
            .create_key(CreateKeyRequest {
                key_id: PRIMARY.into(),
                ..Default::default()
            })
            .await,
        Code::AlreadyExists,
    );
    assert!(dup.message().contains(PRIMARY));
    for key_id in ["", "has space", "semi;colon"] {
        assert_code(
            admin
                .create_key(CreateKeyRequest {
                    key_id: key_id.into(),
                    ..Default::default()
                })
                .await,
            Code::InvalidArgument,
        );
    }
    assert_code(
        admin
            .create_key(CreateKeyRequest {
                key_id: "k".into(),
                provider: "gcp".into(),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
    );
    assert_code(
        admin
            .activate_key(ActivateKeyRequest {
                key_id: "missing".into(),
                ..Default::default()
            })
            .await,
        Code::NotFound,
    );
    // An AWS key cannot become active on a server without the AWS provider:
    // activation checks the key round-trips first.
    let status = assert_code(
        admin
            .create_key(CreateKeyRequest {
                key_id: "aws".into(),
                kms_key_arn:
                    "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
                        .into(),
                activate: true,
                ..Default::default()
            })
            .await,
        Code::FailedPrecondition,
    );
    assert!(status.message().contains("aws-kms"), "{status:?}");
    assert_eq!(app.encrypt(b"x", CONN).await.key_id, PRIMARY);
}

async fn refresh_picks_up_out_of_band_changes(backend: Backend) {
    let Some(app) = spawn(backend).await else {
        return;
    };
    let now = match backend {
        Backend::Postgres => "NOW()",
        Backend::Sqlite => "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')",
    };
    // Runbook §1.2, by hand (on PostgreSQL exactly as written there, with a
    // local KMS key name).
    app.sql(&format!(
        "UPDATE encryption_keys SET status = 'rotating', rotated_at = {now}, updated_at = {now} WHERE status = 'active';
         INSERT INTO encryption_keys (key_id, kms_key_arn, alias, status) VALUES ('2025-03-kms', 'local:app/master', 'prod/app/2025-03', 'active');"
    ))
    .await;
    // The trigger moved the catalog version: the server reloads by itself
    // (NOTIFY on PostgreSQL, the version poll on SQLite).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while app.encrypt(b"x", CONN).await.key_id != "2025-03-kms" {
        assert!(
            std::time::Instant::now() < deadline,
            "the change was never loaded"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // RefreshKeyMetadata (runbook §1.3) still reloads on demand.
    let mut admin = app.admin.clone();
    let summary = admin
        .refresh_key_metadata(RefreshKeyMetadataRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(summary.active_key_id, "2025-03-kms");
    assert_eq!(summary.key_count, 2);
    let sealed = app.encrypt(b"x", CONN).await;
    assert_eq!(sealed.key_id, "2025-03-kms");
    let keys = crate::helpers::list_keys(&mut admin).await;
    let inserted = keys.iter().find(|k| k.key_id == "2025-03-kms").unwrap();
    assert_eq!(
        inserted.provider, "local",
        "provider inferred from kms_key_arn"
    );
    assert!(!inserted.id.is_empty());
}

async fn self_test_reports_every_key(backend: Backend) {
    let Some(app) = spawn(backend).await else {
        return;
    };
    let mut admin = app.admin.clone();
    admin
        .create_key(CreateKeyRequest {
            key_id: "pending-local".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let report = admin
        .self_test(SelfTestRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(report.passed);
    assert_eq!(report.keys.len(), 2);
    assert!(report.keys.iter().all(|k| k.ok && k.error.is_empty()));

    admin
        .create_key(CreateKeyRequest {
            key_id: "aws-pending".into(),
            kms_key_arn: "alias/app/master".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let report = admin
        .self_test(SelfTestRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!report.passed);
    let aws = report
        .keys
        .iter()
        .find(|k| k.key_id == "aws-pending")
        .unwrap();
    assert!(!aws.ok);
    assert_eq!(aws.provider, "aws-kms");
    assert!(aws.error.contains("not configured"), "{aws:?}");
    // The active key still works, so the server stays SERVING (1).
    app.wait_for_health(1).await;
}

async fn health_turns_serving_when_a_key_is_activated(backend: Backend) {
    let Some(app) = spawn_with(
        backend,
        Options {
            seed: false,
            ..Options::default()
        },
    )
    .await
    else {
        return;
    };
    app.wait_for_health(2).await;
    let mut admin = app.admin.clone();
    admin
        .create_key(CreateKeyRequest {
            key_id: "first".into(),
            activate: true,
            ..Default::default()
        })
        .await
        .unwrap();
    app.wait_for_health(1).await;
}

/// A `kms_key_arn` keyward cannot use is refused by name, listing the
/// forms it accepts; nothing is registered.
async fn unknown_key_references_are_refused(backend: Backend) {
    let Some(app) = spawn(backend).await else {
        return;
    };
    let mut admin = app.admin.clone();
    for (arn, says) in [
        ("my-key", "not a key reference keyward understands"),
        (
            "projects/p/locations/global/keyRings/r/cryptoKeys/k",
            "Google Cloud KMS key; that provider is not in this build",
        ),
    ] {
        let status = assert_code(
            admin
                .create_key(CreateKeyRequest {
                    key_id: "refused".into(),
                    kms_key_arn: arn.into(),
                    ..Default::default()
                })
                .await,
            Code::InvalidArgument,
        );
        assert!(
            status.message().contains(says) && status.message().contains("local:NAME"),
            "{}",
            status.message()
        );
    }
    let keys = crate::helpers::list_keys(&mut admin).await;
    assert!(keys.iter().all(|k| k.key_id != "refused"));
}

/// Scoped tokens (runbook §1.6.3): expired and used ones are listed for
/// review and pruned, live ones kept, whether the application wrote the
/// time with a `T` or a space (as text, every space-separated time sorts
/// before every `T` one of the same day).
async fn aged_scoped_tokens_are_listed_then_pruned(backend: Backend) {
    let Some(app) = spawn(backend).await else {
        return;
    };
    let at = |hours: i64, sep: char| {
        (chrono::Utc::now() + chrono::Duration::hours(hours))
            .format(&format!("%Y-%m-%d{sep}%H:%M:%S+00:00"))
            .to_string()
    };
    app.sql("INSERT INTO connections (id) VALUES ('conn-1')")
        .await;
    for (id, expires_at, used_at) in [
        ("expired-t", at(-1, 'T'), None),
        ("expired-space", at(-1, ' '), None),
        ("used", at(1, 'T'), Some(at(-1, 'T'))),
        ("live-t", at(1, 'T'), None),
        ("live-space", at(1, ' '), None),
    ] {
        app.sql(&format!(
            "INSERT INTO connection_scoped_tokens (id, connection_id, token_hash, expires_at, used_at) \
             VALUES ('{id}', 'conn-1', 'hash-{id}', '{expires_at}', {})",
            used_at.map_or("NULL".to_owned(), |u| format!("'{u}'"))
        ))
        .await;
    }
    let rotations = &app.services.rotations;
    let mut aged: Vec<String> = rotations
        .aged_scoped_tokens()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.id)
        .collect();
    aged.sort();
    assert_eq!(aged, ["expired-space", "expired-t", "used"]);
    assert_eq!(rotations.prune_scoped_tokens().await.unwrap(), 3);
    let left = app
        .count("SELECT COUNT(*) FROM connection_scoped_tokens WHERE id IN ('live-t', 'live-space')")
        .await;
    assert_eq!(left, 2);
    assert!(rotations.aged_scoped_tokens().await.unwrap().is_empty());
}

crate::on_both_backends!(
    aged_scoped_tokens_are_listed_then_pruned,
    unknown_key_references_are_refused,
    activation_demotes_the_previous_key,
    retire_refuses_while_rows_reference_the_key,
    retire_succeeds_once_no_row_references_the_key,
    bad_admin_requests,
    refresh_picks_up_out_of_band_changes,
    self_test_reports_every_key,
    health_turns_serving_when_a_key_is_activated,
);
