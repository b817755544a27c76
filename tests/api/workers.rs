//! Rotation across `keyward worker` processes on one PostgreSQL: several
//! workers share a job; a worker killed with SIGKILL mid-job is taken over
//! once its lease expires; a worker stopped with SIGTERM releases its lease
//! and another continues at once. PostgreSQL only (the scale-out backend).

use std::{
    collections::HashMap,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use futures::StreamExt;
use keyward::api::proto::{
    decrypt_request::Ciphertext, DecryptRequest, GetRotationJobRequest, RotationStatus,
    StartRotationRequest, WatchRotationRequest,
};

use crate::{
    helpers::{ctx, spawn_with, Backend, Options, TestApp, MASTER},
    rotation::{activate_new_key, start},
};

const BIN: &str = env!("CARGO_BIN_EXE_keyward");

/// A PostgreSQL test app without an in-process worker, holding `rows`
/// connections under the seeded key, with a new key activated.
async fn prepared(rows: usize) -> Option<(TestApp, HashMap<String, String>, String)> {
    let app = spawn_with(
        Backend::Postgres,
        Options {
            worker: None,
            ..Options::default()
        },
    )
    .await?;
    let mut expected = HashMap::new();
    let mut inserts = Vec::new();
    for i in 0..rows {
        let id = format!("conn-{i:05}");
        let value = format!("credential {i}");
        let sealed = app
            .encrypt(value.as_bytes(), &[("connection_id", id.as_str())])
            .await;
        inserts.push((id.clone(), sealed.envelope.unwrap()));
        expected.insert(id, value);
    }
    app.insert_connections(&inserts).await;
    let target = activate_new_key(&app, "next").await;
    // A pass ends only once every serve replica encrypts with the target
    // (it waits for one that does not, a Waiting step these tests do not
    // expect): let this one's heartbeat report the new key first.
    app.wait_for_heartbeat().await;
    Some((app, expected, target))
}

/// A `keyward worker` process; its stderr goes to a file we can read.
pub(crate) struct WorkerProcess {
    child: Child,
    log: tempfile::NamedTempFile,
}

impl WorkerProcess {
    fn start(database_url: &str, lease_secs: u64) -> Self {
        let worker = Self::start_with(database_url, &["--lease-secs", &lease_secs.to_string()]);
        // Runbook §2.2: every pod that can use the keys says so.
        worker.wait_for_log("🔐 Encryption service initialized successfully");
        worker
    }

    /// A worker polling every 50 ms, with further `worker` flags.
    pub(crate) fn start_with(database_url: &str, args: &[&str]) -> Self {
        let log = tempfile::NamedTempFile::new().unwrap();
        let child = Command::new(BIN)
            .args(["worker", "--poll-ms", "50"])
            .args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("DATABASE_URL", database_url)
            .env("ENCRYPTION_MASTER_KEY", MASTER)
            .env("RUST_LOG", "keyward=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log.reopen().unwrap())
            .spawn()
            .unwrap();
        let worker = Self { child, log };
        worker.wait_for_log("rotation worker started");
        worker
    }

    /// Sends `signal` (`STOP`, `CONT`, …) to the process.
    pub(crate) fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    fn wait_for_log(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.log().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "worker never logged {needle:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub(crate) fn batches(&self) -> usize {
        self.log().matches("rotation batch written").count()
    }

    /// Sends SIGTERM and waits for the exit; returns how long it took.
    pub(crate) fn terminate(&mut self) -> (std::process::ExitStatus, Duration) {
        let sent = Instant::now();
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, sent.elapsed());
            }
            assert!(
                sent.elapsed() < Duration::from_secs(30),
                "the worker ignored SIGTERM:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Starts a job in batches of 10 at `rate` rows/s and waits until
/// `worker` has moved 40 rows of it; returns the job id.
async fn start_and_progress(app: &TestApp, rate: i64, worker: &WorkerProcess) -> String {
    let job_id = start(
        app,
        StartRotationRequest {
            batch_size: 10,
            max_rows_per_second: rate,
            ..Default::default()
        },
    )
    .await;
    wait_for_progress(app, &job_id, 40, worker).await;
    job_id
}

/// Waits until the job has processed at least `rows`.
async fn wait_for_progress(app: &TestApp, job_id: &str, rows: i64, worker: &WorkerProcess) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let job = app
            .admin
            .clone()
            .get_rotation_job(GetRotationJobRequest {
                job_id: job_id.into(),
            })
            .await
            .unwrap()
            .into_inner();
        if job.processed_rows >= rows {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the worker made no progress: {}",
            worker.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) async fn final_job(app: &TestApp, job_id: &str) -> keyward::api::proto::RotationJob {
    let mut stream = app
        .admin
        .clone()
        .watch_rotation(WatchRotationRequest {
            job_id: job_id.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while let Some(event) = tokio::time::timeout_at(deadline, stream.next())
        .await
        .expect("job did not finish")
    {
        last = event.unwrap().job;
    }
    last.unwrap()
}

pub(crate) async fn assert_all_rotated(
    app: &TestApp,
    target: &str,
    expected: &HashMap<String, String>,
) {
    let rows = app.connections().await;
    assert_eq!(rows.len(), expected.len());
    let mut client = app.crypto.clone();
    for row in rows {
        assert_eq!(
            row.encryption_key_id.as_deref(),
            Some(target),
            "row {} not rotated",
            row.id
        );
        let opened = client
            .decrypt(DecryptRequest {
                context: ctx(&[("connection_id", row.id.as_str())]),
                ciphertext: Some(Ciphertext::Envelope(row.envelope())),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            std::str::from_utf8(&opened.plaintext).unwrap(),
            expected[&row.id]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_share_one_job() {
    let Some((app, expected, target)) = prepared(300).await else {
        return;
    };
    let workers: Vec<WorkerProcess> = (0..3)
        .map(|_| WorkerProcess::start(&app.database_url, 10))
        .collect();
    // 100 rows/s per worker in batches of 10: no single worker can take it all.
    let job_id = start(
        &app,
        StartRotationRequest {
            batch_size: 10,
            max_rows_per_second: 100,
            ..Default::default()
        },
    )
    .await;
    let job = final_job(&app, &job_id).await;
    assert_eq!(job.status, RotationStatus::Completed as i32, "{job:?}");
    assert_eq!(
        (
            job.total_rows,
            job.processed_rows,
            job.succeeded_rows,
            job.failed_rows,
            job.skipped_rows
        ),
        (300, 300, 300, 0, 0)
    );
    let batches: Vec<usize> = workers.iter().map(WorkerProcess::batches).collect();
    assert_eq!(batches.iter().sum::<usize>(), 30, "{batches:?}");
    assert!(
        batches.iter().filter(|b| **b > 0).count() >= 2,
        "the job was shared: {batches:?}"
    );
    assert_all_rotated(&app, &target, &expected).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_is_taken_over_after_its_lease() {
    let Some((app, expected, target)) = prepared(200).await else {
        return;
    };
    let mut first = WorkerProcess::start(&app.database_url, 2);
    let job_id = start_and_progress(&app, 50, &first).await;
    first.child.kill().unwrap(); // SIGKILL: no chance to release anything
    first.child.wait().unwrap();

    let second = WorkerProcess::start(&app.database_url, 2);
    let job = final_job(&app, &job_id).await;
    assert_eq!(job.status, RotationStatus::Completed as i32, "{job:?}");
    assert_eq!((job.succeeded_rows, job.failed_rows), (200, 0), "{job:?}");
    assert!(second.batches() > 0);
    assert_all_rotated(&app, &target, &expected).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_releases_the_lease_and_a_second_worker_continues_at_once() {
    let Some((app, expected, target)) = prepared(300).await else {
        return;
    };
    // Leases of ten minutes: a second worker that had to wait for one to
    // expire would never finish within this test's deadlines.
    let mut first = WorkerProcess::start(&app.database_url, 600);
    let job_id = start_and_progress(&app, 100, &first).await;
    let (status, took) = first.terminate();
    assert!(status.success(), "{status:?}\n{}", first.log());
    assert!(
        took < Duration::from_secs(10),
        "exited after {took:?}, beyond the grace period"
    );
    assert!(
        first.log().contains("rotation worker stopped"),
        "{}",
        first.log()
    );
    assert_eq!(
        app.count("SELECT COUNT(*) FROM encryption_rotation_claims")
            .await,
        0,
        "the stopped worker left a lease behind"
    );

    let resumed = Instant::now();
    let second = WorkerProcess::start(&app.database_url, 600);
    let job = final_job(&app, &job_id).await;
    assert!(
        resumed.elapsed() < Duration::from_secs(60),
        "{:?}",
        resumed.elapsed()
    );
    assert_eq!(job.status, RotationStatus::Completed as i32, "{job:?}");
    assert_eq!(
        (
            job.total_rows,
            job.processed_rows,
            job.succeeded_rows,
            job.failed_rows,
            job.skipped_rows
        ),
        (300, 300, 300, 0, 0),
        "{job:?}"
    );
    assert!(second.batches() > 0);
    assert_all_rotated(&app, &target, &expected).await;
}

/// A job in batches of 10, and its first batch claimed by `worker` for
/// `lease`.
async fn started_and_claimed(
    app: &TestApp,
    worker: &str,
    lease: chrono::Duration,
) -> (String, keyward::store::rotation::Claim) {
    let job_id = start(
        app,
        StartRotationRequest {
            batch_size: 10,
            ..Default::default()
        },
    )
    .await;
    let keyward::store::rotation::ClaimOutcome::Batch(claim) = app
        .services
        .store
        .claim_batch(worker, lease, &app.services.targets.current())
        .await
        .unwrap()
    else {
        panic!("expected a batch");
    };
    (job_id, claim)
}

/// A zombie worker: paused past its lease, resumed after another worker
/// finished the job without it. Its batch writes nothing and moves no
/// counter (it used to add its rows to `processed` and `skipped` of the
/// completed job).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_resumed_after_its_lease_expired_changes_nothing() {
    let Some((app, expected, target)) = prepared(30).await else {
        return;
    };
    let (job_id, zombie) =
        started_and_claimed(&app, "zombie", chrono::Duration::milliseconds(1)).await;
    let store = &app.services.store;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let worker = app.services.worker(Default::default());
    for _ in 0..20 {
        if let keyward::rotation::worker::Step::Advanced(job) =
            worker.try_execute_task().await.unwrap()
        {
            if job.status.is_terminal() {
                break;
            }
        }
    }
    let counts = |job: &keyward::api::proto::RotationJob| {
        (
            job.total_rows,
            job.processed_rows,
            job.succeeded_rows,
            job.skipped_rows,
        )
    };
    let done = final_job(&app, &job_id).await;
    assert_eq!(counts(&done), (30, 30, 30, 0), "{done:?}");

    // The zombie resumes and writes what it had.
    let outcomes: Vec<_> = zombie
        .rows
        .iter()
        .map(|_| keyward::store::rotation::RowOutcome::Failed("zombie".into()))
        .collect();
    let written = store
        .finish_batch(
            &zombie,
            &app.services.targets.current()[0],
            &target,
            &outcomes,
        )
        .await
        .unwrap();
    assert!(written.is_none(), "{written:?}");
    let after = final_job(&app, &job_id).await;
    assert_eq!(counts(&after), (30, 30, 30, 0), "{after:?}");
    assert_eq!(
        app.count("SELECT COUNT(*) FROM connections WHERE last_error IS NOT NULL")
            .await,
        0
    );
    assert_all_rotated(&app, &target, &expected).await;
}

/// A batch abandoned at shutdown (its crypto cut short) writes nothing and
/// releases its lease: the next worker's pass redoes its rows at once, and
/// the counts come out exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_batch_is_redone_by_the_next_pass_without_waiting() {
    let Some((app, expected, target)) = prepared(30).await else {
        return;
    };
    let (job_id, claim) =
        started_and_claimed(&app, "stopping-worker", chrono::Duration::minutes(10)).await;
    let store = &app.services.store;
    assert_eq!(claim.rows.len(), 10);
    store
        .release_claim(&claim, "stopping-worker")
        .await
        .unwrap();
    assert_eq!(
        app.count("SELECT COUNT(*) FROM encryption_rotation_claims")
            .await,
        0
    );

    let worker = app
        .services
        .worker(keyward::rotation::worker::WorkerOptions {
            lease: Duration::from_secs(600),
            ..Default::default()
        });
    let mut passes = Vec::new();
    for _ in 0..20 {
        match worker.try_execute_task().await.unwrap() {
            keyward::rotation::worker::Step::Advanced(job) => {
                passes.push(job.pass);
                if job.status.is_terminal() {
                    break;
                }
            }
            keyward::rotation::worker::Step::Waiting => {
                panic!("the released lease still held the pass open")
            }
            _ => {}
        }
    }
    let job = final_job(&app, &job_id).await;
    assert_eq!(job.status, RotationStatus::Completed as i32, "{job:?}");
    // Pass 1 did 20 rows, pass 2 the 10 abandoned ones.
    assert_eq!(job.pass, 2, "{job:?} {passes:?}");
    assert_eq!(
        (
            job.total_rows,
            job.processed_rows,
            job.succeeded_rows,
            job.failed_rows
        ),
        (30, 30, 30, 0),
        "{job:?}"
    );
    assert_all_rotated(&app, &target, &expected).await;
}
