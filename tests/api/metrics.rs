//! The metrics endpoint during real Encrypt, Decrypt and rotation traffic,
//! read by a real Prometheus text parser (Python's
//! `prometheus_client.parser`, installed into `.tools/venv` by
//! scripts/test).

use std::{
    collections::BTreeMap,
    io::Write,
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use keyward::{
    api::proto::{
        decrypt_request::Ciphertext, DecryptRequest, RotationStatus, StartRotationRequest,
    },
    auth::audit::{AuditSettings, AuditSink},
    config::KmsSettings,
    crypto::cache::{CacheMode, CacheSettings},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{
    helpers::{ctx, spawn_with, Backend, Options, TestApp},
    rotation::{activate_new_key, insert_row, start, watch_all},
};

/// One sample of a scrape.
#[derive(Debug, serde::Deserialize)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

struct Scrape(Vec<Sample>);

impl Scrape {
    /// The value of the sample `name` whose labels include `labels`, or 0
    /// when there is none (a series not created yet).
    /// Whether a series with these labels was exported at all.
    fn has(&self, name: &str, labels: &[(&str, &str)]) -> bool {
        self.0.iter().any(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let matching: Vec<&Sample> = self
            .0
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect();
        assert!(
            matching.len() <= 1,
            "{name} {labels:?} is ambiguous: {matching:?}"
        );
        matching.first().map_or(0.0, |s| s.value)
    }

    fn rpc(&self, method: &str, code: &str) -> f64 {
        self.get(
            "keyward_rpc_requests_total",
            &[("grpc_method", method), ("grpc_code", code)],
        )
    }
}

fn python() -> Option<PathBuf> {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".tools/venv/bin/python");
    let ok = venv.is_file()
        && Command::new(&venv)
            .args(["-c", "import prometheus_client"])
            .status()
            .is_ok_and(|s| s.success());
    if ok {
        return Some(venv);
    }
    let why = "Python's prometheus_client is not in .tools/venv (scripts/test installs it)";
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{why}");
    }
    eprintln!("SKIPPED ({why})");
    None
}

/// Parses exposition text with `prometheus_client.parser`.
fn parse(python: &PathBuf, text: &str) -> Scrape {
    const SCRIPT: &str = "import json, sys\n\
        from prometheus_client.parser import text_string_to_metric_families\n\
        print(json.dumps([{'name': s.name, 'labels': s.labels, 'value': s.value}\n\
            for f in text_string_to_metric_families(sys.stdin.read()) for s in f.samples]))";
    let mut child = Command::new(python)
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the Prometheus parser rejected the exposition: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    Scrape(serde_json::from_slice(&out.stdout).unwrap())
}

/// `GET /metrics` over plain HTTP/1.1.
pub(crate) async fn scrape_text(app: &TestApp) -> String {
    let addr = app.metrics_addr.expect("metrics are on");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: keyward\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    body.to_owned()
}

async fn scrape(app: &TestApp, python: &PathBuf) -> Scrape {
    parse(python, &scrape_text(app).await)
}

async fn metrics_follow_traffic_rotation_and_audit(backend: Backend) {
    let Some(python) = python() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let Some(app) = spawn_with(
        backend,
        Options {
            metrics: true,
            audit: AuditSettings {
                sink: AuditSink::File(dir.path().join("audit.log")),
                ..AuditSettings::default()
            },
            kms: KmsSettings {
                cache: CacheSettings {
                    mode: CacheMode::On,
                    ..CacheSettings::default()
                },
                ..KmsSettings::default()
            },
            ..Options::default()
        },
    )
    .await
    else {
        return;
    };
    let before = scrape(&app, &python).await;

    // Ten Encrypts under one context: one data key, nine cache hits.
    let mut sealed = Vec::new();
    for i in 0..10 {
        sealed.push(
            app.encrypt(format!("secret {i}").as_bytes(), &[("tenant", "a")])
                .await,
        );
    }
    let mut crypto = app.crypto.clone();
    crypto
        .decrypt(DecryptRequest {
            context: ctx(&[("tenant", "a")]),
            ciphertext: Some(Ciphertext::Blob(sealed[0].blob.clone())),
        })
        .await
        .unwrap();
    let refused = crypto
        .decrypt(DecryptRequest {
            context: ctx(&[("tenant", "a")]),
            ciphertext: Some(Ciphertext::Blob(b"not a blob".to_vec().into())),
        })
        .await;
    assert_eq!(refused.unwrap_err().code(), tonic::Code::InvalidArgument);
    let after = scrape(&app, &python).await;
    let delta =
        |name: &str, labels: &[(&str, &str)]| after.get(name, labels) - before.get(name, labels);

    assert_eq!(
        after.rpc("Encrypt", "OK") - before.rpc("Encrypt", "OK"),
        10.0
    );
    assert_eq!(
        after.rpc("Decrypt", "OK") - before.rpc("Decrypt", "OK"),
        1.0
    );
    assert_eq!(
        after.rpc("Decrypt", "INVALID_ARGUMENT") - before.rpc("Decrypt", "INVALID_ARGUMENT"),
        1.0
    );
    let encrypt_latency = [("grpc_method", "Encrypt"), ("grpc_code", "OK")];
    assert_eq!(
        delta("keyward_rpc_duration_seconds_count", &encrypt_latency),
        10.0
    );
    assert!(delta("keyward_rpc_duration_seconds_sum", &encrypt_latency) > 0.0);
    assert_eq!(
        delta(
            "keyward_rpc_duration_seconds_bucket",
            &[
                ("grpc_method", "Encrypt"),
                ("grpc_code", "OK"),
                ("le", "+Inf")
            ]
        ),
        10.0
    );
    assert_eq!(
        delta("keyward_data_key_cache_hits_total", &[("cache", "encrypt")]),
        9.0
    );
    assert_eq!(
        delta(
            "keyward_data_key_cache_misses_total",
            &[("cache", "encrypt")]
        ),
        1.0
    );
    fn local(op: &str) -> [(&str, &str); 3] {
        [("provider", "local"), ("operation", op), ("outcome", "ok")]
    }
    assert_eq!(
        delta("keyward_kms_calls_total", &local("GenerateDataKey")),
        1.0
    );
    assert_eq!(
        delta(
            "keyward_kms_call_duration_seconds_count",
            &local("GenerateDataKey")
        ),
        1.0
    );
    // One event per Decrypt, refused or not.
    assert_eq!(
        delta("keyward_audit_events_total", &[("outcome", "written")]),
        2.0
    );
    assert_eq!(
        after.get("keyward_audit_events_total", &[("outcome", "failed")]),
        0.0
    );

    // A rotation, throttled so it is scraped while it runs.
    for i in 0..150 {
        insert_row(&app, &format!("conn-{i:03}"), &format!("credential {i}")).await;
    }
    activate_new_key(&app, "next").await;
    let rotation_start = scrape(&app, &python).await;
    // Re-encryption debt: every row still on the old key.
    let on = |key: &'static str, status: &'static str| {
        [
            ("key_id", key),
            ("status", status),
            ("target", "connections"),
        ]
    };
    assert_eq!(
        rotation_start.get("keyward_key_rows", &on("primary", "rotating")),
        150.0
    );
    assert_eq!(
        rotation_start.get("keyward_key_rows", &on("next", "active")),
        0.0
    );
    assert_eq!(
        rotation_start.get("keyward_key_rows", &on("(legacy)", "legacy")),
        0.0
    );
    assert!(rotation_start.has(
        "keyward_key_oldest_row_age_seconds",
        &on("primary", "rotating")
    ));
    let job_id = start(
        &app,
        StartRotationRequest {
            batch_size: 10,
            max_rows_per_second: 100,
            ..Default::default()
        },
    )
    .await;
    let job = [("job_id", job_id.as_str())];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let running = loop {
        let now = scrape(&app, &python).await;
        if now.get("keyward_rotation_job_rows_processed", &job) > 0.0 {
            break now;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the job never showed progress"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        running.get("keyward_rotation_jobs", &[("status", "running")]),
        1.0
    );
    assert_eq!(running.get("keyward_rotation_job_rows_total", &job), 150.0);
    assert!(running.get("keyward_rotation_job_rows_processed", &job) < 150.0);
    assert!(running.get("keyward_rotation_job_rows_per_second", &job) > 0.0);
    assert_eq!(running.get("keyward_rotation_job_rows_failed", &job), 0.0);
    assert_eq!(running.get("keyward_rotation_metrics_up", &[]), 1.0);
    // No limits: never throttled (the throttled paths are tests/api/budget.rs).
    assert_eq!(running.get("keyward_rotation_job_throttled", &job), 0.0);
    for reason in ["foreground_p99", "replication_lag"] {
        let labels = [("job_id", job_id.as_str()), ("reason", reason)];
        assert!(running.has("keyward_rotation_throttled_seconds_total", &labels));
        assert_eq!(
            running.get("keyward_rotation_throttled_seconds_total", &labels),
            0.0
        );
    }

    let events = watch_all(&app, &job_id).await;
    let last = events.last().unwrap().job.clone().unwrap();
    assert_eq!(last.status, RotationStatus::Completed as i32);
    let done = scrape(&app, &python).await;
    assert_eq!(
        done.get("keyward_rotation_jobs", &[("status", "running")]),
        0.0
    );
    assert_eq!(
        done.get("keyward_rotation_jobs", &[("status", "completed")]),
        1.0
    );
    assert_eq!(
        done.get("keyward_key_rows", &on("primary", "rotating")),
        0.0
    );
    assert_eq!(done.get("keyward_key_rows", &on("next", "active")), 150.0);
    assert!(!done.has(
        "keyward_key_oldest_row_age_seconds",
        &on("primary", "rotating")
    ));
    // A finished job's per-job series are gone.
    assert!(!done
        .0
        .iter()
        .any(|s| s.labels.get("job_id") == Some(&job_id)));
    // Rotation bypasses the cache: every row's data key was unwrapped by
    // the KMS and a fresh one generated.
    let rotated = |op: &str| {
        done.get("keyward_kms_calls_total", &local(op))
            - rotation_start.get("keyward_kms_calls_total", &local(op))
    };
    assert!(rotated("Decrypt") >= 150.0, "{}", rotated("Decrypt"));
    assert!(
        rotated("GenerateDataKey") >= 150.0,
        "{}",
        rotated("GenerateDataKey")
    );
    // WatchRotation is a server stream: counted once it ended.
    assert_eq!(
        done.rpc("WatchRotation", "OK") - running.rpc("WatchRotation", "OK"),
        1.0
    );
}

crate::on_both_backends!(metrics_follow_traffic_rotation_and_audit);
