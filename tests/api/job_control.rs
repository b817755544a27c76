//! Operators pause, resume and re-tune a rotation job while it runs: a
//! paused job claims nothing, holds no lease and keeps its counts; resumed,
//! it goes on where it stopped.

use std::collections::HashMap;

use keyward::{
    api::proto::{
        PauseRotationRequest, ResumeRotationRequest, RotationStatus, StartRotationRequest,
        UpdateRotationRequest,
    },
    rotation::worker::Step,
};
use tonic::Code;

use crate::{
    adoption::keyward_on,
    cli::stderr,
    helpers::{assert_code, spawn_with, Backend, Options, TestApp},
    on_both_backends,
    rotation::{activate_new_key, decrypt_all, start},
};

/// A server without a worker (the tests step one), `rows` rows under its
/// first key and a new active key; their plaintexts by id.
pub(crate) async fn rows_off_the_active_key(
    backend: Backend,
    rows: usize,
) -> Option<(TestApp, HashMap<String, String>)> {
    let app = spawn_with(backend, workerless()).await?;
    let plaintexts = put_rows_off_the_active_key(&app, rows).await;
    Some((app, plaintexts))
}

/// Options of a server without a worker.
pub(crate) fn workerless() -> Options {
    Options {
        worker: None,
        ..Options::default()
    }
}

/// Writes `rows` rows under `app`'s active key and activates a new one;
/// their plaintexts by id.
pub(crate) async fn put_rows_off_the_active_key(
    app: &TestApp,
    rows: usize,
) -> HashMap<String, String> {
    let mut plaintexts = HashMap::new();
    let mut inserts = Vec::new();
    for i in 0..rows {
        let (id, value) = (format!("row-{i:04}"), format!("secret {i}"));
        let sealed = app
            .encrypt(value.as_bytes(), &[("connection_id", id.as_str())])
            .await;
        inserts.push((id.clone(), sealed.envelope.unwrap()));
        plaintexts.insert(id, value);
    }
    app.insert_connections(&inserts).await;
    activate_new_key(app, "next").await;
    // A pass ends only once this replica reports the new key.
    app.wait_for_heartbeat().await;
    plaintexts
}

async fn a_paused_job_claims_nothing_and_resumes_where_it_stopped(backend: Backend) {
    let Some((app, plaintexts)) = rows_off_the_active_key(backend, 30).await else {
        return;
    };
    let job_id = start(
        &app,
        StartRotationRequest {
            batch_size: 10,
            ..Default::default()
        },
    )
    .await;
    let worker = app.services.worker(Default::default());
    let step = worker.try_execute_task().await.unwrap();
    assert!(matches!(step, Step::Batch { rows: 10, .. }), "{step:?}");

    let mut admin = app.admin.clone();
    let job = |id: &str| PauseRotationRequest { job_id: id.into() };
    let paused = admin
        .pause_rotation(job(&job_id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(paused.status, RotationStatus::Paused as i32);
    assert_eq!(paused.processed_rows, 10);
    // Paused: no batch is claimed, so no lease is held.
    for _ in 0..3 {
        let step = worker.try_execute_task().await.unwrap();
        assert!(
            matches!(step, Step::Idle),
            "a paused job gave a batch: {step:?}"
        );
    }
    let claimed = app
        .services
        .store
        .claim_batch(
            "probe",
            chrono::Duration::seconds(30),
            &app.services.targets.current(),
        )
        .await
        .unwrap();
    assert!(matches!(
        claimed,
        keyward::store::rotation::ClaimOutcome::Idle
    ));

    // Re-tuned while paused: the next batches are of 5.
    let tuned = admin
        .update_rotation(UpdateRotationRequest {
            job_id: job_id.clone(),
            batch_size: Some(5),
            max_rows_per_second: Some(0),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((tuned.batch_size, tuned.processed_rows), (5, 10));
    let refused = admin
        .update_rotation(UpdateRotationRequest {
            job_id: job_id.clone(),
            batch_size: Some(-1),
            ..Default::default()
        })
        .await;
    assert_code(refused, Code::InvalidArgument);

    let resumed = admin
        .resume_rotation(ResumeRotationRequest {
            job_id: job_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(resumed.status, RotationStatus::Paused as i32);
    let step = worker.try_execute_task().await.unwrap();
    assert!(matches!(step, Step::Batch { rows: 5, .. }), "{step:?}");
    let mut steps = 0;
    let done = loop {
        if let Step::Advanced(job) = worker.try_execute_task().await.unwrap() {
            if job.status.is_terminal() {
                break job;
            }
        }
        steps += 1;
        assert!(steps < 100, "the job never ended");
    };
    assert_eq!(done.counts.succeeded, 30, "{done:?}");
    assert_eq!(decrypt_all(&app).await, plaintexts);

    // A job that has ended cannot be paused.
    let out = keyward_on(&app.database_url, &["rotate", "pause", &job_id]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("only pending or running"),
        "{}",
        stderr(&out)
    );
}

/// A job started with no batch size (the default) is adaptive: its first
/// batch is 500 rows, later ones are sized by each worker to take about
/// the target duration (the sizing itself is unit-tested in
/// `rotation::sizing`), and it moves every row.
async fn an_adaptive_job_moves_every_row(backend: Backend) {
    let Some((app, plaintexts)) = rows_off_the_active_key(backend, 1200).await else {
        return;
    };
    let job_id = start(&app, StartRotationRequest::default()).await;
    let refused = app
        .admin
        .clone()
        .update_rotation(UpdateRotationRequest {
            job_id: job_id.clone(),
            target_batch_ms: Some(5),
            ..Default::default()
        })
        .await;
    assert_code(refused, Code::InvalidArgument);
    let worker = app.services.worker(Default::default());
    let step = worker.try_execute_task().await.unwrap();
    assert!(matches!(step, Step::Batch { rows: 500, .. }), "{step:?}");
    let mut batches = vec![500];
    let done = loop {
        match worker.try_execute_task().await.unwrap() {
            Step::Batch { rows, .. } => batches.push(rows),
            Step::Advanced(job) if job.status.is_terminal() => break job,
            _ => {}
        }
        assert!(batches.len() < 200, "the job never ended: {batches:?}");
    };
    assert_eq!(
        (done.batch_size, done.counts.succeeded),
        (0, 1200),
        "{done:?} {batches:?}"
    );
    assert_eq!(decrypt_all(&app).await, plaintexts);
    eprintln!("adaptive batches: {batches:?}");
}

on_both_backends!(
    a_paused_job_claims_nothing_and_resumes_where_it_stopped,
    an_adaptive_job_moves_every_row,
);
