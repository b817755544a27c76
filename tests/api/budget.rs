//! Rotation inside limits: a latency budget on the serve replicas'
//! foreground p99, and a replication-lag limit on PostgreSQL's standbys.
//! Workers are stepped by hand, so what each step does is asserted.

use std::time::Duration;

use keyward::{
    api::proto::{GetRotationJobRequest, RotationJob, StartRotationRequest},
    rotation::worker::{Step, Worker},
    store::replicas::{ReplicaKind, ReplicaRecord},
};

use crate::{
    helpers::{spawn_on, Backend, TestApp},
    job_control::{put_rows_off_the_active_key, rows_off_the_active_key, workerless},
    on_both_backends,
    rotation::{decrypt_all, start},
};

/// Longer than a worker keeps a reading.
const READING_AGE: Duration = Duration::from_millis(250);

async fn job(app: &TestApp, job_id: &str) -> RotationJob {
    app.admin
        .clone()
        .get_rotation_job(GetRotationJobRequest {
            job_id: job_id.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// Steps `worker` until its job ends; the job.
async fn finish(worker: &Worker) -> keyward::rotation::RotationJob {
    for _ in 0..400 {
        match worker.try_execute_task().await.unwrap() {
            Step::Advanced(job) if job.status.is_terminal() => return job,
            Step::Throttled { .. } | Step::Waiting => tokio::time::sleep(READING_AGE).await,
            _ => {}
        }
    }
    panic!("the job never ended");
}

/// Waits until the server's replica row meets `condition`, calling
/// Encrypt meanwhile.
async fn await_published(app: &TestApp, condition: &str) {
    let published =
        format!("SELECT COUNT(*) FROM keyward_replicas WHERE kind = 'serve' AND {condition}");
    for _ in 0..300 {
        if app.count(&published).await > 0 {
            return;
        }
        app.encrypt(b"foreground", &[("connection_id", "fg")]).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the server never published its foreground p99");
}

/// Starts `request` (a job with a budget), lets `worker` take its first
/// batch (from then on the worker follows the job), and waits until the
/// server has published its own latency (`published`, a condition on its
/// replica row); the job's id.
async fn follow_a_budgeted_job(
    app: &TestApp,
    worker: &Worker,
    request: StartRotationRequest,
    published: &str,
) -> String {
    let job_id = start(app, request).await;
    let step = worker.try_execute_task().await.unwrap();
    assert!(matches!(step, Step::Batch { .. }), "{step:?}");
    await_published(app, published).await;
    job_id
}

/// A live serve replica that reports `p99_ms` (`None`: publishes nothing),
/// once the worker's last reading is too old to count.
async fn slow_replica(app: &TestApp, p99_ms: Option<f64>) -> ReplicaRecord {
    let store = &app.services.store;
    let slow = synthetic_replica("synthetic-slow");
    store.heartbeat(&slow).await.unwrap();
    if p99_ms.is_some() {
        store
            .publish_foreground(&slow.id, p99_ms, 500, chrono::Utc::now())
            .await
            .unwrap();
    }
    tokio::time::sleep(READING_AGE).await;
    slow
}

/// A serve replica that is not one: its heartbeat row only, with the p99
/// a test gives it.
fn synthetic_replica(id: &str) -> ReplicaRecord {
    let now = chrono::Utc::now();
    ReplicaRecord {
        id: id.into(),
        kind: ReplicaKind::Serve,
        host: "slow-host".into(),
        pid: 1,
        listen: Some("slow.example:50051".into()),
        version: "synthetic".into(),
        started_at: now,
        heartbeat_at: now,
        expires_at: now + chrono::Duration::hours(1),
        catalog_version: 0,
        active_key_id: None,
        active_since: None,
        key_readiness: Default::default(),
        master_fingerprints: None,
    }
}

/// The budget holds for a replica's callers: while a live serve replica
/// reports a p99 well over the budget, workers claim nothing and the job
/// says why; when it recovers they go on (slowly at first), and the job
/// completes with every row.
async fn workers_wait_while_a_replica_is_over_the_latency_budget(backend: Backend) {
    let Some((app, plaintexts)) = rows_off_the_active_key(backend, 30).await else {
        return;
    };
    let worker = app.services.worker(Default::default());
    // The server itself publishes its p99 every second while a job with a
    // budget runs.
    let job_id = follow_a_budgeted_job(
        &app,
        &worker,
        StartRotationRequest {
            batch_size: 10,
            max_foreground_p99_ms: 20.0,
            ..Default::default()
        },
        "foreground_calls > 0",
    )
    .await;
    let store = &app.services.store;
    let slow = slow_replica(&app, Some(100.0)).await;
    let expected = "foreground p99 100.00 ms > budget 20.00 ms on replica slow.example:50051";
    for _ in 0..5 {
        match worker.try_execute_task().await.unwrap() {
            Step::Throttled { reason, .. } => assert_eq!(reason, expected),
            step => panic!("a worker went on over the budget: {step:?}"),
        }
        tokio::time::sleep(READING_AGE).await;
    }
    let held = job(&app, &job_id).await;
    assert_eq!(held.processed_rows, 10);
    assert!(held.throttled);
    assert_eq!(held.throttle_reason, expected);
    assert_eq!(held.max_foreground_p99_ms, 20.0);

    // It recovers: the worker goes on, at a low rate at first.
    store
        .publish_foreground(&slow.id, Some(1.0), 500, chrono::Utc::now())
        .await
        .unwrap();
    tokio::time::sleep(READING_AGE).await;
    let step = worker.try_execute_task().await.unwrap();
    assert!(matches!(step, Step::Batch { rows: 10, .. }), "{step:?}");
    let recovering = job(&app, &job_id).await;
    assert!(
        recovering
            .throttle_reason
            .starts_with("climbing under latency budget 20.00 ms"),
        "{recovering:?}"
    );
    // Gone (a replica the job's pass would wait for to confirm keys).
    store.remove_replica(&slow.id).await.unwrap();
    let done = finish(&worker).await;
    assert_eq!(done.counts.succeeded, 30, "{done:?}");
    assert!(done.throttle.foreground_seconds >= 1.0, "{done:?}");
    let ended = job(&app, &job_id).await;
    assert!(!ended.throttled, "{ended:?}");
    assert_eq!(decrypt_all(&app).await, plaintexts);
}

/// A job insisting on a floor goes on over its budget, saying so.
async fn a_floor_breaks_the_budget_on_purpose(backend: Backend) {
    let Some((app, _)) = rows_off_the_active_key(backend, 20).await else {
        return;
    };
    let worker = app.services.worker(Default::default());
    let job_id = follow_a_budgeted_job(
        &app,
        &worker,
        StartRotationRequest {
            batch_size: 5,
            max_foreground_p99_ms: 20.0,
            min_rows_per_second: 100,
            ..Default::default()
        },
        "foreground_at IS NOT NULL",
    )
    .await;
    slow_replica(&app, Some(100.0)).await;
    let step = worker.try_execute_task().await.unwrap();
    assert!(matches!(step, Step::Batch { rows: 5, .. }), "{step:?}");
    let going = job(&app, &job_id).await;
    assert!(going.throttled);
    assert!(
        going
            .throttle_reason
            .ends_with("over budget on purpose: min_rows_per_second 100"),
        "{going:?}"
    );
    // A floor without a budget means nothing: refused.
    let refused = app
        .admin
        .clone()
        .start_rotation(StartRotationRequest {
            min_rows_per_second: 100,
            ..Default::default()
        })
        .await;
    crate::helpers::assert_code(refused, tonic::Code::InvalidArgument);
}

/// A live serve replica that publishes no latency (a keyward older than
/// this one) holds a budgeted job, saying which: its callers' latency is
/// unknown, so the budget cannot be kept for them.
async fn a_replica_that_publishes_no_latency_holds_a_budgeted_job(backend: Backend) {
    let Some((app, _)) = rows_off_the_active_key(backend, 20).await else {
        return;
    };
    let worker = app.services.worker(Default::default());
    follow_a_budgeted_job(
        &app,
        &worker,
        StartRotationRequest {
            batch_size: 5,
            max_foreground_p99_ms: 20.0,
            ..Default::default()
        },
        "foreground_at IS NOT NULL",
    )
    .await;
    slow_replica(&app, None).await;
    match worker.try_execute_task().await.unwrap() {
        Step::Throttled { reason, .. } => assert!(
            reason.starts_with("no foreground p99 from replica slow.example:50051"),
            "{reason}"
        ),
        step => panic!("{step:?}"),
    }
}

on_both_backends!(
    a_replica_that_publishes_no_latency_holds_a_budgeted_job,
    workers_wait_while_a_replica_is_over_the_latency_budget,
    a_floor_breaks_the_budget_on_purpose,
);

/// A limit on replication lag cannot be given on SQLite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_refuses_a_replication_lag_limit() {
    let Some((app, _)) = rows_off_the_active_key(Backend::Sqlite, 1).await else {
        return;
    };
    let refused = app
        .admin
        .clone()
        .start_rotation(StartRotationRequest {
            max_replication_lag_ms: 1000,
            ..Default::default()
        })
        .await;
    let status = refused.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("SQLite has no replication"),
        "{status:?}"
    );
}

/// A real standby (`pg_basebackup -R`) whose replay is paused: the job
/// throttles and says which standby and how far behind, goes on when
/// replay resumes, and completes. A role that cannot read the standbys'
/// positions throttles too, saying what to grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_wait_for_a_standby_behind_the_lag_limit() {
    if crate::postgres::server_or_skip().is_none() {
        return;
    }
    let primary = crate::postgres::Cluster::start().expect("a primary cluster");
    let standby = primary.standby("standby1").expect("a streaming standby");
    let database_url = crate::postgres::create_database(&primary.url(), "kw").await;
    let app = spawn_on(Backend::Postgres, database_url.clone(), workerless()).await;
    let plaintexts = put_rows_off_the_active_key(&app, 200).await;
    let job_id = start(
        &app,
        StartRotationRequest {
            batch_size: 10,
            max_replication_lag_ms: 1000,
            ..Default::default()
        },
    )
    .await;
    let standby_db = sqlx::PgPool::connect(&format!("{}/postgres", standby.url()))
        .await
        .unwrap();
    let streaming = "SELECT COUNT(*) FROM pg_stat_replication WHERE state = 'streaming'";
    let mut waited = 0;
    while app.count(streaming).await == 0 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        waited += 1;
        assert!(waited < 300, "the standby never streamed");
    }
    sqlx::query("SELECT pg_wal_replay_pause()")
        .execute(&standby_db)
        .await
        .unwrap();

    let worker = app.services.worker(Default::default());
    let mut batches = 0;
    let reason = loop {
        match worker.try_execute_task().await.unwrap() {
            Step::Throttled { reason, .. } => break reason,
            Step::Batch { .. } => batches += 1,
            step => panic!("{step:?}"),
        }
        tokio::time::sleep(READING_AGE).await;
        assert!(
            batches < 19,
            "the worker never waited for the paused standby"
        );
    };
    assert!(
        reason.starts_with("standby standby1 lag ") && reason.ends_with(" s > 1.0 s"),
        "{reason}"
    );
    let held = job(&app, &job_id).await;
    assert!(held.throttled && held.throttle_reason.starts_with("standby standby1 lag"));
    for _ in 0..3 {
        let step = worker.try_execute_task().await.unwrap();
        assert!(matches!(step, Step::Throttled { .. }), "{step:?}");
        tokio::time::sleep(READING_AGE).await;
    }
    assert_eq!(job(&app, &job_id).await.processed_rows, held.processed_rows);

    // Without pg_read_all_stats the positions are hidden: the job waits,
    // saying what to grant, rather than ignoring its limit.
    app.sql("CREATE ROLE kw_limited LOGIN").await;
    app.sql("GRANT ALL ON SCHEMA public TO kw_limited").await;
    app.sql("GRANT ALL ON ALL TABLES IN SCHEMA public TO kw_limited")
        .await;
    let limited_url = database_url.replacen("postgres://postgres@", "postgres://kw_limited@", 1);
    let limited = spawn_on(Backend::Postgres, limited_url, workerless()).await;
    let blind = limited.services.worker(Default::default());
    let step = loop {
        match blind.try_execute_task().await.unwrap() {
            Step::Batch { .. } => tokio::time::sleep(READING_AGE).await,
            step => break step,
        }
    };
    assert!(
        matches!(&step, Step::Throttled { reason, .. }
            if reason == "replication lag unreadable: grant pg_read_all_stats"),
        "{step:?}"
    );
    drop(limited);

    sqlx::query("SELECT pg_wal_replay_resume()")
        .execute(&standby_db)
        .await
        .unwrap();
    let done = finish(&worker).await;
    assert_eq!(done.counts.succeeded, 200, "{done:?}");
    assert!(done.throttle.lag_seconds > 0.0, "{done:?}");
    assert_eq!(decrypt_all(&app).await, plaintexts);
}
