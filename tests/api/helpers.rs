//! Test harness: spawn the real server on port 0 with a fresh database, and
//! gRPC clients connected to it.

use std::collections::HashMap;

use keyward::{
    api::proto::{
        admin_client::AdminClient, crypto_client::CryptoClient, EncryptRequest, EncryptResponse,
    },
    app::{Application, Services},
    config::{KmsSettings, MasterSecrets, Settings},
    rotation::worker::WorkerOptions,
    service::{admin::CreateKey, crypto::Limits},
};
use sqlx::{PgPool, SqlitePool};
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::transport::Channel;
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

use crate::postgres;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Generates one `#[tokio::test]` per backend for each listed `async fn(Backend)`.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),+ $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::helpers::Backend::Sqlite).await
                }
            )+
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::helpers::Backend::Postgres).await
                }
            )+
        }
    };
}

/// Runs `$body` with a fresh pool on the app's database, whichever backend.
macro_rules! on_db {
    ($app:expr, |$pool:ident| $body:expr) => {
        match $app.backend {
            Backend::Sqlite => {
                let $pool = SqlitePool::connect(&$app.database_url).await.unwrap();
                let out = $body;
                $pool.close().await;
                out
            }
            Backend::Postgres => {
                let $pool = PgPool::connect(&$app.database_url).await.unwrap();
                let out = $body;
                $pool.close().await;
                out
            }
        }
    };
}

/// Binds `$1` = id and `$2..$6` = the envelope's five fields.
macro_rules! bind_envelope {
    ($query:expr, $id:expr, $envelope:expr) => {
        $query
            .bind($id)
            .bind(&$envelope.encryption_key_id)
            .bind($envelope.data_key_ciphertext.to_vec())
            .bind($envelope.data_key_iv.to_vec())
            .bind($envelope.payload_ciphertext.to_vec())
            .bind($envelope.payload_iv.to_vec())
    };
}
pub(crate) use bind_envelope;

pub const MASTER: &str = "test-master-secret-0123456789abcdef";
pub const PRIMARY: &str = "primary";

pub fn master(current: &str, previous: &[&str]) -> MasterSecrets {
    let previous: Vec<String> = previous.iter().map(|s| s.to_string()).collect();
    MasterSecrets::parse(current, &previous).unwrap()
}

/// JSON lines (a server's JSON log, an audit log), parsed; a line that is
/// not JSON fails the test.
/// Every key record, through the Admin API.
pub async fn list_keys(admin: &mut AdminClient<Channel>) -> Vec<keyward::api::proto::Key> {
    admin
        .list_keys(keyward::api::proto::ListKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .keys
}

pub fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {e}: {l}")))
        .collect()
}

pub fn ctx(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn init_logs() {
    if std::env::var_os("TEST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// A fresh, empty database of `backend`: `None` (with a note on stderr) when
/// PostgreSQL cannot be had here, and a panic instead when `CI=true`, so
/// CI never passes by skipping.
pub async fn fresh_database(backend: Backend, dir: &tempfile::TempDir) -> Option<String> {
    match backend {
        Backend::Sqlite => Some(format!(
            "sqlite://{}",
            dir.path().join("keyward.db").display()
        )),
        Backend::Postgres => {
            Some(postgres::create_database(postgres::server_or_skip()?, "kw").await)
        }
    }
}

/// How to start a test server.
pub struct Options {
    pub master: Option<MasterSecrets>,
    /// Seed and activate key `primary`.
    pub seed: bool,
    pub limits: Limits,
    /// The in-process rotation worker (`None`: like `serve --no-worker`).
    pub worker: Option<WorkerOptions>,
    /// When connections that do nothing are closed.
    pub idle: keyward::idle::IdleLimits,
    /// Rotation targets beyond `connections`.
    pub targets: Vec<keyward::rotation::target::RotationTarget>,
    /// AWS KMS endpoint and the data-key cache.
    pub kms: KmsSettings,
    /// Authentication (off by default in tests, as on `serve --dev`).
    pub auth: keyward::auth::AuthSettings,
    pub audit: keyward::auth::audit::AuditSettings,
    /// TLS; the test's default clients are then not connected (build your
    /// own channel to `TestApp::addr`).
    pub tls: Option<keyward::config::TlsSettings>,
    /// Serve metrics on a random loopback port (`TestApp::metrics_addr`).
    pub metrics: bool,
    /// Origins allowed to call over gRPC-Web.
    pub cors_allowed_origins: Vec<String>,
    /// Static files served for browser GETs (the dashboard).
    pub dashboard_dir: Option<std::path::PathBuf>,
    /// Heartbeat and catalog following.
    pub replica: keyward::service::replica::ReplicaOptions,
    /// The timer that reloads the whole catalog.
    pub catalog_refresh: std::time::Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            master: Some(master(MASTER, &[])),
            seed: true,
            limits: Limits::default(),
            worker: Some(WorkerOptions {
                lease: std::time::Duration::from_secs(30),
                idle_poll: std::time::Duration::from_millis(50),
                ..WorkerOptions::default()
            }),
            targets: Vec::new(),
            kms: KmsSettings::default(),
            auth: Default::default(),
            idle: Default::default(),
            audit: Default::default(),
            tls: None,
            metrics: false,
            cors_allowed_origins: Vec::new(),
            dashboard_dir: None,
            replica: keyward::service::replica::ReplicaOptions {
                catalog_poll: std::time::Duration::from_millis(100),
                ..Default::default()
            },
            catalog_refresh: std::time::Duration::from_secs(30),
        }
    }
}

/// A running server with clients on it; stopped when dropped.
pub struct TestApp {
    pub backend: Backend,
    pub database_url: String,
    pub crypto: CryptoClient<Channel>,
    pub admin: AdminClient<Channel>,
    pub health: HealthClient<Channel>,
    /// The server's domain services (KMS call and cache counts).
    pub services: Services,
    pub addr: std::net::SocketAddr,
    /// Where metrics are served, with `Options::metrics`.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// What `serve` does on SIGHUP.
    pub reloader: keyward::reload::Reloader,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<()>>,
    dir: tempfile::TempDir,
}

pub async fn spawn(backend: Backend) -> Option<TestApp> {
    spawn_with(backend, Options::default()).await
}

pub async fn spawn_with(backend: Backend, options: Options) -> Option<TestApp> {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let database_url = fresh_database(backend, &dir).await?;
    Some(start(backend, database_url, dir, options).await)
}

/// A server on an existing database (one a test prepared, such as an
/// application's).
pub async fn spawn_on(backend: Backend, database_url: String, options: Options) -> TestApp {
    init_logs();
    start(backend, database_url, tempfile::tempdir().unwrap(), options).await
}

async fn start(
    backend: Backend,
    database_url: String,
    dir: tempfile::TempDir,
    options: Options,
) -> TestApp {
    let mut settings = Settings::for_database(database_url.clone(), options.master);
    settings.limits = options.limits;
    settings.worker = options.worker;
    settings.rotation_targets = options.targets;
    settings.kms = options.kms;
    settings.auth = options.auth;
    settings.idle = options.idle;
    settings.audit = options.audit;
    settings.cors_allowed_origins = options.cors_allowed_origins;
    settings.dashboard_dir = options.dashboard_dir;
    settings.replica = options.replica;
    settings.catalog_refresh_interval = options.catalog_refresh;
    settings.metrics_listen = options
        .metrics
        .then(|| std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    let tls = options.tls.is_some();
    settings.tls = options.tls;
    let app = Application::build(settings).await.unwrap();
    let services = app.services().clone();
    if options.seed {
        app.services()
            .admin
            .seed_key(CreateKey {
                key_id: PRIMARY.into(),
                ..CreateKey::default()
            })
            .await
            .unwrap();
    }
    let addr = app.local_addr().unwrap();
    let metrics_addr = app.metrics_addr();
    let reloader = app.reloader();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        app.run_until_stopped(async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    let endpoint = Channel::from_shared(format!("http://{addr}")).unwrap();
    let channel = if tls {
        endpoint.connect_lazy()
    } else {
        endpoint.connect().await.unwrap()
    };
    let app = TestApp {
        backend,
        database_url,
        crypto: CryptoClient::new(channel.clone()),
        admin: AdminClient::new(channel.clone()),
        health: HealthClient::new(channel),
        services,
        addr,
        metrics_addr,
        reloader,
        stop: Some(stop),
        server: Some(server),
        dir,
    };
    app.wait_for_heartbeat().await;
    app
}

impl TestApp {
    /// Stops the server gracefully and starts a new one on the same
    /// database with other options (e.g. a rotated master secret).
    pub async fn restart(mut self, options: Options) -> TestApp {
        self.shutdown().await;
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        start(self.backend, self.database_url.clone(), dir, options).await
    }

    /// Starts another server on this one's database (a replica): nothing
    /// is seeded, whatever `options.seed` says.
    pub async fn replica(&self, options: Options) -> TestApp {
        let options = Options {
            seed: false,
            ..options
        };
        start(
            self.backend,
            self.database_url.clone(),
            tempfile::tempdir().unwrap(),
            options,
        )
        .await
    }

    pub async fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.unwrap();
        }
    }

    pub async fn encrypt(&self, plaintext: &[u8], context: &[(&str, &str)]) -> EncryptResponse {
        self.crypto
            .clone()
            .encrypt(EncryptRequest {
                plaintext: plaintext.to_vec().into(),
                context: ctx(context),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
    }

    /// The overall health status ("" service) as its proto integer.
    pub async fn health_status(&self) -> i32 {
        self.health
            .clone()
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .status
    }

    /// Waits (up to 5 s) for the overall health status to become `expected`
    /// (1 SERVING, 2 NOT_SERVING): health follows readiness asynchronously.
    pub async fn wait_for_health(&self, expected: i32) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let status = self.health_status().await;
            if status == expected {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "health stayed {status}, expected {expected}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// The single integer a query returns (e.g. a `COUNT(*)`).
    pub async fn count(&self, query: &str) -> i64 {
        on_db!(self, |pool| sqlx::query_scalar::<_, i64>(query)
            .fetch_one(&pool)
            .await)
        .unwrap()
    }

    /// Waits until this server has heartbeat the current catalog (its key
    /// checks for it are done), so tests count only their own KMS calls.
    pub async fn wait_for_heartbeat(&self) {
        let sql = format!(
            "SELECT COUNT(*) FROM keyward_replicas r, keyward_catalog_version v \
             WHERE r.listen = '{}' AND r.catalog_version = v.version",
            self.addr
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while self.count(&sql).await == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "no heartbeat from {}",
                self.addr
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Runs one SQL statement on the app's database (test set-up only).
    pub async fn sql(&self, statement: &str) {
        on_db!(self, |pool| sqlx::raw_sql(statement)
            .execute(&pool)
            .await
            .map(|_| ()))
        .unwrap();
    }

    /// Inserts a `connections` row holding an envelope, as an application would.
    pub async fn insert_connection(&self, id: &str, envelope: &keyward::api::proto::Envelope) {
        self.insert_connections(&[(id.to_owned(), envelope.clone())])
            .await;
    }

    /// Inserts many rows over one connection.
    pub async fn insert_connections(&self, rows: &[(String, keyward::api::proto::Envelope)]) {
        const SQL: &str = "INSERT INTO connections (id, encryption_key_id, data_key_ciphertext, \
             data_key_iv, payload_ciphertext, payload_iv, name) VALUES ($1, $2, $3, $4, $5, $6, $1)";
        // One transaction: the rows appear together, as one application
        // write would make them (a rotation never sees half of them).
        on_db!(self, |pool| {
            let mut tx = pool.begin().await.unwrap();
            for (id, envelope) in rows {
                bind_envelope!(sqlx::query(SQL), id, envelope)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
            }
            tx.commit().await.unwrap();
        });
    }
}

/// A `connections` row as the tests read it back.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ConnectionRow {
    pub id: String,
    pub encryption_key_id: Option<String>,
    pub data_key_ciphertext: Option<Vec<u8>>,
    pub data_key_iv: Option<Vec<u8>>,
    pub payload_ciphertext: Option<Vec<u8>>,
    pub payload_iv: Option<Vec<u8>>,
    pub encrypted_credentials: Option<Vec<u8>>,
    pub credentials_iv: Option<Vec<u8>>,
    pub last_error: Option<String>,
}

impl ConnectionRow {
    pub fn envelope(&self) -> keyward::api::proto::Envelope {
        keyward::api::proto::Envelope {
            encryption_key_id: self.encryption_key_id.clone().unwrap_or_default(),
            data_key_ciphertext: self.data_key_ciphertext.clone().unwrap_or_default().into(),
            data_key_iv: self.data_key_iv.clone().unwrap_or_default().into(),
            payload_ciphertext: self.payload_ciphertext.clone().unwrap_or_default().into(),
            payload_iv: self.payload_iv.clone().unwrap_or_default().into(),
        }
    }
}

impl TestApp {
    /// Every `connections` row, ordered by id.
    pub async fn connections(&self) -> Vec<ConnectionRow> {
        const SQL: &str = "SELECT CAST(id AS TEXT) AS id, encryption_key_id, data_key_ciphertext, data_key_iv, payload_ciphertext, \
             payload_iv, encrypted_credentials, credentials_iv, last_error FROM connections ORDER BY id";
        on_db!(self, |pool| sqlx::query_as(SQL).fetch_all(&pool).await).unwrap()
    }

    /// Writes a row's legacy columns only, as the application's old pods
    /// do; `by_id` finds the row by `$1` (`id = $1`, or a cast to its type).
    pub async fn write_legacy_copy(&self, by_id: &str, id: &str, ciphertext: &[u8], iv: &[u8]) {
        let sql = format!(
            "UPDATE connections SET encrypted_credentials = $2, credentials_iv = $3 WHERE {by_id}"
        );
        self.write_legacy(&sql, id, ciphertext, Some(iv)).await;
    }

    /// Runs `sql`, binding $1 id, $2 legacy ciphertext, $3 legacy IV.
    async fn write_legacy(&self, sql: &str, id: &str, ciphertext: &[u8], iv: Option<&[u8]>) {
        on_db!(self, |pool| sqlx::query(sql)
            .bind(id)
            .bind(ciphertext)
            .bind(iv)
            .execute(&pool)
            .await
            .map(|_| ()))
        .unwrap();
    }

    /// `encryption_keys.id` of the active key.
    pub fn active_record_id(&self) -> String {
        let catalog = self.services.admin.catalog_snapshot();
        catalog
            .active()
            .map(|k| k.id.clone())
            .expect("an active key")
    }

    /// Inserts a legacy row (pre-keyward format); with `mirror`, also the
    /// payload mirror that the migration backfills.
    pub async fn insert_legacy_connection(
        &self,
        id: &str,
        ciphertext: &[u8],
        iv: &[u8],
        mirror: bool,
    ) {
        let sql = if mirror {
            "INSERT INTO connections (id, encrypted_credentials, credentials_iv, payload_ciphertext, payload_iv) \
             VALUES ($1, $2, $3, $2, $3)"
        } else {
            "INSERT INTO connections (id, encrypted_credentials, credentials_iv) VALUES ($1, $2, $3)"
        };
        // An empty IV is none: the legacy layout keeps it in the ciphertext.
        let iv = (!iv.is_empty()).then_some(iv);
        self.write_legacy(sql, id, ciphertext, iv).await;
    }

    /// Replaces a row's envelope columns, as an application rewriting a
    /// credential would.
    pub async fn update_connection(&self, id: &str, envelope: &keyward::api::proto::Envelope) {
        const SQL: &str =
            "UPDATE connections SET encryption_key_id = $2, data_key_ciphertext = $3, \
             data_key_iv = $4, payload_ciphertext = $5, payload_iv = $6 WHERE id = $1";
        on_db!(self, |pool| bind_envelope!(sqlx::query(SQL), id, envelope)
            .execute(&pool)
            .await
            .map(|_| ()))
        .unwrap();
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Asserts a gRPC call failed with `code`, and that its message has no
/// sign of an internal failure.
#[track_caller]
pub fn assert_code<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    code: tonic::Code,
) -> tonic::Status {
    let status = result.expect_err("the call should have failed");
    assert_eq!(status.code(), code, "unexpected status: {status:?}");
    assert!(!status.message().is_empty());
    status
}
