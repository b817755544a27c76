//! The scale-out topology as real processes on one PostgreSQL: three
//! `keyward serve` replicas and two `keyward worker`s. A load driver keeps
//! encrypting through all three replicas (and storing the rows, as the
//! application does) while a staged activation and a rotation run; at the
//! end every row is on the new key and decrypts through every replica,
//! GetKeyUsage shows nothing left on the old key, and it retires cleanly.

use std::{
    process::Command,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use futures::StreamExt;
use keyward::api::proto::{
    admin_client::AdminClient, crypto_client::CryptoClient, decrypt_request::Ciphertext,
    ActivateKeyRequest, BatchDecryptRequest, BatchEncryptRequest, CreateKeyRequest, DecryptRequest,
    EncryptRequest, Envelope, GetKeyUsageRequest, RetireKeyRequest, RotationStatus,
    StartRotationRequest, WatchRotationRequest,
};
use sqlx::PgPool;
use tonic::transport::Channel;

use crate::{
    cli::{free_port, keyward, run, stderr, Server},
    helpers::bind_envelope,
    helpers::{ctx, fresh_database, Backend, MASTER},
    workers::WorkerProcess,
};

/// Follow the catalog closely: heartbeat every second, poll every 200 ms.
const REPLICA_FLAGS: &[&str] = &["--heartbeat-secs", "1", "--catalog-poll-ms", "200"];
const PREFILLED: usize = 2000;

/// A stored row: id, then the envelope's data key, its iv, payload, its iv.
type StoredRow = (String, Vec<u8>, Vec<u8>, Vec<u8>, Vec<u8>);

fn plaintext(id: &str) -> String {
    format!("credential of {id}")
}

fn with_database(dir: &std::path::Path, url: &str) -> Command {
    let mut cmd = keyward(dir);
    cmd.env("DATABASE_URL", url)
        .env("ENCRYPTION_MASTER_KEY", MASTER)
        .env("RUST_LOG", "keyward=info");
    cmd
}

const INSERT: &str = "INSERT INTO connections (id, encryption_key_id, data_key_ciphertext, \
     data_key_iv, payload_ciphertext, payload_iv) VALUES ($1, $2, $3, $4, $5, $6)";

async fn store(pool: &PgPool, id: &str, envelope: &Envelope) {
    bind_envelope!(sqlx::query(INSERT), id, envelope)
        .execute(pool)
        .await
        .unwrap();
}

/// Encrypts and stores rows through one replica until `stop`; returns how
/// many it wrote. Any failed Encrypt fails the test.
async fn drive(
    replica: usize,
    channel: Channel,
    pool: PgPool,
    stop: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
) {
    let mut crypto = CryptoClient::new(channel);
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let id = format!("load-{replica}-{n:06}");
        let sealed = crypto
            .encrypt(EncryptRequest {
                plaintext: plaintext(&id).into_bytes().into(),
                context: ctx(&[("connection_id", id.as_str())]),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|status| panic!("Encrypt through replica {replica} failed: {status:?}"))
            .into_inner();
        store(&pool, &id, sealed.envelope.as_ref().unwrap()).await;
        written.fetch_add(1, Ordering::Relaxed);
        n += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_and_two_workers_rotate_under_load() {
    let dir = tempfile::tempdir().unwrap();
    let Some(url) = fresh_database(Backend::Postgres, &dir).await else {
        return;
    };
    let seeded = run(with_database(dir.path(), &url)
        .env("DEFAULT_ENCRYPTION_KEY_ID", "primary")
        .arg("seed-key"));
    assert!(seeded.status.success(), "{}", stderr(&seeded));

    let servers: Vec<Server> = (0..3)
        .map(|_| {
            let addr = format!("127.0.0.1:{}", free_port());
            let mut cmd = with_database(dir.path(), &url);
            cmd.args([
                "serve",
                "--listen",
                &addr,
                "--no-worker",
                "--insecure-no-auth",
            ])
            .args(["--audit-log", "off"])
            .args(REPLICA_FLAGS);
            Server::spawn(cmd, addr)
        })
        .collect();
    for server in &servers {
        server.wait_for_log("Encryption service initialized successfully");
    }
    let workers: Vec<WorkerProcess> = (0..2)
        .map(|_| {
            WorkerProcess::start_with(&url, &[&["--lease-secs", "10"], REPLICA_FLAGS].concat())
        })
        .collect();
    let mut channels = Vec::new();
    for server in &servers {
        channels.push(server.channel().await);
    }
    let admin = |i: usize| AdminClient::new(channels[i].clone());
    let pool = PgPool::connect(&url).await.unwrap();

    // Rows from before: 2000 credentials under the seeded key.
    let mut crypto = CryptoClient::new(channels[0].clone());
    for chunk in (0..PREFILLED).collect::<Vec<_>>().chunks(500) {
        let ids: Vec<String> = chunk.iter().map(|i| format!("old-{i:06}")).collect();
        let sealed = crypto
            .batch_encrypt(BatchEncryptRequest {
                items: ids
                    .iter()
                    .map(|id| EncryptRequest {
                        plaintext: plaintext(id).into_bytes().into(),
                        context: ctx(&[("connection_id", id.as_str())]),
                        ..Default::default()
                    })
                    .collect(),
            })
            .await
            .unwrap()
            .into_inner();
        for (id, result) in ids.iter().zip(sealed.results) {
            let Some(keyward::api::proto::batch_encrypt_result::Result::Ok(ok)) = result.result
            else {
                panic!("BatchEncrypt item failed: {result:?}");
            };
            store(&pool, id, ok.envelope.as_ref().unwrap()).await;
        }
    }

    // The load driver, through all three replicas.
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let drivers: Vec<_> = channels
        .iter()
        .enumerate()
        .map(|(i, channel)| {
            tokio::spawn(drive(
                i,
                channel.clone(),
                pool.clone(),
                Arc::clone(&stop),
                Arc::clone(&written),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // A staged activation through replica 1: all five processes confirm.
    admin(0)
        .create_key(CreateKeyRequest {
            key_id: "next".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let activation = admin(1)
        .activate_key(ActivateKeyRequest {
            key_id: "next".into(),
            staged: true,
            staged_timeout_seconds: 30,
        })
        .await
        .unwrap()
        .into_inner();
    let kinds: Vec<&str> = activation
        .confirmed_replicas
        .iter()
        .map(|r| r.kind.as_str())
        .collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == "serve").count(),
        3,
        "{activation:?}"
    );
    assert_eq!(
        kinds.iter().filter(|k| **k == "worker").count(),
        2,
        "{activation:?}"
    );
    let next = activation.activated.unwrap().id;

    // The rotation, started on replica 2, watched on replica 0.
    let started = Instant::now();
    let job = admin(2)
        .start_rotation(StartRotationRequest {
            batch_size: 250,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut progress = admin(0)
        .watch_rotation(WatchRotationRequest {
            job_id: job.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    while let Some(event) = progress.next().await {
        let event = event.unwrap();
        let terminal = event.terminal;
        last = event.job;
        if terminal {
            break;
        }
    }
    let job = last.unwrap();
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    for driver in drivers {
        driver.await.unwrap();
    }
    assert_eq!(job.status, RotationStatus::Completed as i32, "{job:?}");
    let batches: usize = workers.iter().map(WorkerProcess::batches).sum();
    assert!(
        workers.iter().all(|w| w.batches() > 0),
        "both workers took batches ({batches} in all)"
    );

    // Every row is on the new key…
    let total: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM connections")
        .fetch_one(&pool)
        .await
        .unwrap();
    let off: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM connections WHERE encryption_key_id IS DISTINCT FROM $1",
    )
    .bind(&next)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(off, 0, "{off} of {total} rows are off the new key");
    let load = written.load(Ordering::Relaxed);
    assert_eq!(total as u64, PREFILLED as u64 + load);

    // …and decrypts through every replica.
    let rows: Vec<StoredRow> = sqlx::query_as(
        "SELECT id, data_key_ciphertext, data_key_iv, payload_ciphertext, payload_iv \
         FROM connections ORDER BY id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    for (batch, chunk) in rows.chunks(500).enumerate() {
        for channel in &channels {
            let opened = CryptoClient::new(channel.clone())
                .batch_decrypt(BatchDecryptRequest {
                    items: chunk
                        .iter()
                        .map(|(id, dk, dk_iv, ct, iv)| DecryptRequest {
                            context: ctx(&[("connection_id", id.as_str())]),
                            ciphertext: Some(Ciphertext::Envelope(Envelope {
                                encryption_key_id: next.clone(),
                                data_key_ciphertext: dk.clone().into(),
                                data_key_iv: dk_iv.clone().into(),
                                payload_ciphertext: ct.clone().into(),
                                payload_iv: iv.clone().into(),
                            })),
                        })
                        .collect(),
                })
                .await
                .unwrap()
                .into_inner();
            for ((id, ..), result) in chunk.iter().zip(opened.results) {
                match result.result {
                    Some(keyward::api::proto::batch_decrypt_result::Result::Ok(ok)) => {
                        assert_eq!(ok.plaintext, plaintext(id).as_bytes(), "row {id}")
                    }
                    other => panic!("row {id} (batch {batch}) did not decrypt: {other:?}"),
                }
            }
        }
    }

    // No debt left on the old key: it retires without force.
    let usage = admin(1)
        .get_key_usage(GetKeyUsageRequest {})
        .await
        .unwrap()
        .into_inner()
        .keys;
    let rows_on = |key: &str| usage.iter().find(|u| u.key_id == key).unwrap().rows;
    assert_eq!(rows_on("primary"), 0, "{usage:?}");
    assert_eq!(rows_on("next"), total, "{usage:?}");
    let retired = admin(2)
        .retire_key(RetireKeyRequest {
            key_id: "primary".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(retired.retired, "{retired:?}");
    eprintln!(
        "scale-out: {total} rows ({load} written by the load driver during the run), rotation {took:?} \
         in {} passes, {} late rows caught, {batches} batches over 2 workers",
        job.pass, job.late_rows
    );
    pool.close().await;
}
