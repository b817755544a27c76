//! Wiring: builds the services from settings, binds the listener, and runs
//! the gRPC server until a shutdown future resolves.
//!
//! `Application::build` does all fallible start-up work (database,
//! migrations, catalog, self-test) and exposes `local_addr()`, so tests bind
//! port 0 and talk to the real server; `run_until_stopped(shutdown)` serves,
//! then on shutdown turns health NOT_SERVING, drains RPCs under the grace
//! period, and returns.

use std::{future::Future, net::SocketAddr, pin::Pin, sync::Arc};

#[cfg(feature = "tls")]
use crate::tls::TlsFiles;
use futures::TryStreamExt as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::{server::TcpIncoming, Server};
use tonic_health::{server::HealthReporter, ServingStatus};

use crate::{
    api::{
        auth::AuthLayer,
        dashboard::{DashboardDir, DashboardLayer},
        observe::ObserveLayer,
        proto::{admin_server::AdminServer, crypto_server::CryptoServer, FILE_DESCRIPTOR_SET},
        AdminApi, CryptoApi,
    },
    auth::{audit::AuditLog, Authenticator},
    config::{KmsSettings, MasterSecrets, Settings},
    crypto::{
        cache::DataKeyCache,
        kms::{local::LocalKms, KmsRegistry},
        legacy::LegacyKeys,
    },
    error::Error,
    idle::{Connections, IdleLayer},
    keys::KeyCatalog,
    metrics::Metrics,
    rotation::{
        target::RotationTarget,
        worker::{Worker, WorkerOptions},
    },
    service::{
        admin::{CreateKey, KeyAdmin, Readiness},
        crypto::{CryptoService, Limits},
        foreground::{self, ForegroundLatency},
        replica::{ReplicaAgent, ReplicaOptions},
        rotation::Rotations,
        targets::TargetList,
    },
    store::{replicas::ReplicaKind, Store, StoreError},
    transport::CoalescingStream,
};

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartupError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The database could not be opened or migrated.
    #[error("database: {0}")]
    Store(#[from] StoreError),
    /// A key operation during start-up failed.
    #[error("keys: {0}")]
    Keys(#[from] Error),
    /// A setting every process shares (the legacy format) disagrees with
    /// the one the database records.
    #[error("{0}")]
    Settings(#[source] Error),
    /// The rotation targets cannot be loaded, or a `--rotation-targets`
    /// file disagrees with the database's list.
    #[error("rotation targets: {0}")]
    Targets(#[source] Error),
    /// The metrics listen address could not be bound.
    #[error("cannot listen for metrics on {addr}: {source}")]
    MetricsBind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The audit log could not be opened.
    #[error("audit log: {0}")]
    Audit(#[source] std::io::Error),
    /// The authentication settings are invalid.
    #[error("authentication: {0}")]
    Auth(String),
    /// The TLS certificate, key or client CA could not be read or used.
    #[cfg(feature = "tls")]
    #[error("tls: {0}")]
    Tls(#[from] crate::tls::TlsError),
    /// `--dashboard-dir` is missing, or holds the database or a key file.
    #[error("dashboard directory: {0}")]
    Dashboard(String),
    /// A `--cors-allowed-origins` entry is not a valid origin.
    #[error("cors: {0:?} is not a valid origin (scheme://host[:port])")]
    CorsOrigin(String),
    /// Server reflection could not be built from the descriptors.
    #[error("server reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The transport failed while serving.
    #[error("grpc transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// The domain services, opened on a database: shared by the server and the
/// operator CLI.
#[derive(Clone)]
pub struct Services {
    pub store: Store,
    pub catalog: Arc<KeyCatalog>,
    pub crypto: Arc<CryptoService>,
    pub admin: Arc<KeyAdmin>,
    pub rotations: Arc<Rotations>,
    /// The tables rotation walks: `connections`, then those listed in the
    /// database.
    pub targets: Arc<TargetList>,
}

impl Services {
    /// A rotation worker over these services.
    pub fn worker(&self, options: WorkerOptions) -> Worker {
        Worker::new(
            self.store.clone(),
            Arc::clone(&self.targets),
            Arc::clone(&self.crypto),
            Arc::clone(&self.admin),
            options,
        )
    }

    /// This process's heartbeat and catalog follower.
    pub fn replica_agent(
        &self,
        kind: ReplicaKind,
        listen: Option<SocketAddr>,
        options: ReplicaOptions,
    ) -> ReplicaAgent {
        self.admin
            .catalog()
            .health()
            .set_key_check_interval(options.key_check);
        ReplicaAgent::new(
            kind,
            listen,
            self.store.clone(),
            Arc::clone(&self.admin),
            options,
        )
    }

    /// Connects, applies migrations and loads the key catalog.
    pub async fn open(
        database_url: &str,
        master: Option<&MasterSecrets>,
        limits: Limits,
    ) -> Result<Self, StartupError> {
        Self::open_with_targets(
            database_url,
            master,
            &KmsSettings::default(),
            limits,
            Vec::new(),
        )
        .await
    }

    /// Like [`Self::open`], with the targets of a `--rotation-targets`
    /// file (`connections` among them or not), which seed the database's
    /// list when it is empty and must agree with it otherwise; empty: the
    /// database's list as it is.
    pub async fn open_with_targets(
        database_url: &str,
        master: Option<&MasterSecrets>,
        kms_settings: &KmsSettings,
        limits: Limits,
        extra_targets: Vec<RotationTarget>,
    ) -> Result<Self, StartupError> {
        let store = Store::connect(database_url).await?;
        store.migrate().await?;
        let file = (!extra_targets.is_empty()).then(|| {
            // An entry for `connections` (its encoding) replaces the default.
            let (own, extra): (Vec<_>, Vec<_>) = extra_targets
                .into_iter()
                .partition(|t| t.table.as_str() == "connections");
            let connections = own
                .into_iter()
                .next()
                .unwrap_or_else(RotationTarget::connections);
            std::iter::once(connections)
                .chain(extra)
                .collect::<Vec<_>>()
        });
        let targets = TargetList::open(store.clone(), file.as_deref())
            .await
            .map_err(StartupError::Targets)?;
        let targets = Arc::new(targets);
        #[allow(unused_mut)] // only the aws-kms and pkcs11 builds add a provider here
        let mut kms = KmsRegistry::default();
        // The AWS client is built on first use, so registering it costs a
        // local-only deployment nothing.
        #[cfg(feature = "aws-kms")]
        {
            kms = kms.with(Arc::new(crate::crypto::kms::aws::AwsKms::new(
                kms_settings.aws.clone(),
            )));
        }
        // Likewise the PKCS#11 module is loaded on first use.
        #[cfg(feature = "pkcs11")]
        {
            kms = kms.with(Arc::new(crate::crypto::kms::pkcs11::Pkcs11Kms::new(
                kms_settings.pkcs11.clone(),
            )));
        }
        #[cfg(not(any(feature = "aws-kms", feature = "pkcs11")))]
        let _ = kms_settings;
        let mut legacy = None;
        if let Some(master) = master {
            kms = kms.with_local(LocalKms::new(
                master.current.clone(),
                master.previous.clone(),
            ));
            let format = crate::service::legacy_format::resolve(&store, master.legacy.as_ref())
                .await
                .map_err(StartupError::Settings)?;
            for secret in master.all() {
                if let Err(err) = format.derive(secret) {
                    tracing::warn!(master_secret = %secret.fingerprint(), "{err}: legacy rows cannot be decrypted under master secret {}", secret.fingerprint());
                }
            }
            legacy = Some(LegacyKeys::with_format(format, master.all()));
        }
        let catalog = Arc::new(KeyCatalog::default());
        let crypto = Arc::new(CryptoService::new(
            Arc::clone(&catalog),
            kms,
            legacy,
            limits,
            DataKeyCache::new(kms_settings.cache.clone()),
        ));
        let admin = Arc::new(KeyAdmin::new(
            store.clone(),
            Arc::clone(&catalog),
            Arc::clone(&crypto),
            Arc::clone(&targets),
        ));
        let source: Arc<dyn crate::service::crypto::ReadThrough> = admin.catalog().clone();
        crypto.set_read_through(Arc::downgrade(&source));
        admin.refresh().await?;
        crate::service::replica::sync_wrapping(&store, &crypto, None).await?;
        let rotations = Arc::new(Rotations::new(
            store.clone(),
            Arc::clone(&targets),
            Arc::clone(&catalog),
            Arc::clone(&admin),
        ));
        Ok(Self {
            store,
            catalog,
            crypto,
            admin,
            rotations,
            targets,
        })
    }
}

/// HTTP/2 flow-control windows (bytes) for the server and keyward's clients.
pub const HTTP2_CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
pub const HTTP2_STREAM_WINDOW: u32 = 4 * 1024 * 1024;

/// The gRPC server running, until its shutdown future resolves.
type Serving = Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>>;

/// The key id `serve --dev` seeds when the catalog has no active key.
pub const DEV_KEY_ID: &str = "dev-local";

pub struct Application {
    listener: TcpListener,
    /// The metrics endpoint, when `--metrics-listen` is set.
    metrics: Option<(Arc<Metrics>, TcpListener)>,
    services: Services,
    settings: Settings,
    auth: Arc<Authenticator>,
    audit: Arc<AuditLog>,
    dashboard: Option<DashboardDir>,
    #[cfg(feature = "tls")]
    tls: Option<Arc<TlsFiles>>,
}

impl Application {
    /// Binds `settings.listen` and builds the services.
    pub async fn build(settings: Settings) -> Result<Self, StartupError> {
        let listener =
            TcpListener::bind(settings.listen)
                .await
                .map_err(|source| StartupError::Bind {
                    addr: settings.listen,
                    source,
                })?;
        Self::build_with_listener(settings, listener).await
    }

    /// Builds the services around an already bound listener.
    pub async fn build_with_listener(
        settings: Settings,
        listener: TcpListener,
    ) -> Result<Self, StartupError> {
        let dashboard = settings
            .dashboard_dir
            .as_deref()
            .map(|dir| dashboard_dir(dir, &settings))
            .transpose()?;
        let services = Services::open_with_targets(
            &settings.database_url,
            settings.master.as_ref(),
            &settings.kms,
            settings.limits,
            settings.rotation_targets.clone(),
        )
        .await?;
        if settings.seed_dev_key {
            refuse_foreign_keys(&services).await?;
        }
        if settings.seed_dev_key && services.catalog.active().is_none() {
            let key = services
                .admin
                .seed_key(CreateKey {
                    key_id: DEV_KEY_ID.into(),
                    alias: Some("seeded by serve --dev".into()),
                    ..CreateKey::default()
                })
                .await?;
            tracing::warn!(key_id = %key.key_id, "--dev: no active key was found, so a local key was seeded and activated");
        }
        let audit = Arc::new(AuditLog::open(&settings.audit).map_err(StartupError::Audit)?);
        let auth = Arc::new(
            Authenticator::new(services.store.clone(), &settings.auth)
                .map_err(StartupError::Auth)?,
        );
        auth.reload().await?;
        if !auth.required() {
            tracing::warn!(
                "authentication is off: every caller may encrypt, decrypt and administer keys"
            );
        }
        let metrics = match settings.metrics_listen {
            None => None,
            Some(addr) => {
                // Bound here, so tests learn its address before serving.
                let listener = TcpListener::bind(addr)
                    .await
                    .map_err(|source| StartupError::MetricsBind { addr, source })?;
                let metrics = Metrics::new(
                    services.store.clone(),
                    Arc::clone(&services.admin),
                    Arc::clone(services.crypto.kms().stats()),
                    Arc::clone(services.crypto.cache().stats()),
                    Arc::clone(&audit),
                    auth.token_stats(),
                );
                Some((Arc::new(metrics), listener))
            }
        };
        #[cfg(feature = "tls")]
        let tls = settings
            .tls
            .as_ref()
            .map(|tls| {
                TlsFiles::load(crate::tls::TlsPaths {
                    cert: tls.cert.clone(),
                    key: tls.key.clone(),
                    client_ca: tls.client_ca.clone(),
                })
                .map(Arc::new)
            })
            .transpose()?;
        #[cfg(not(feature = "tls"))]
        if settings.tls.is_some() {
            return Err(StartupError::Auth(
                "this build has no TLS support (cargo feature `tls`)".into(),
            ));
        }
        Ok(Self {
            listener,
            metrics,
            services,
            settings,
            auth,
            audit,
            dashboard,
            #[cfg(feature = "tls")]
            tls,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Where metrics are served, when they are.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics
            .as_ref()
            .and_then(|(_, listener)| listener.local_addr().ok())
    }

    /// A handle that reloads the audit file, TLS files, key catalog and
    /// api tokens of this server while it runs (`serve` calls it on SIGHUP).
    pub fn reloader(&self) -> crate::reload::Reloader {
        crate::reload::Reloader {
            audit: Arc::clone(&self.audit),
            auth: Arc::clone(&self.auth),
            admin: Arc::clone(&self.services.admin),
            #[cfg(feature = "tls")]
            tls: self.tls.clone(),
        }
    }

    pub fn services(&self) -> &Services {
        &self.services
    }

    /// Serves until `shutdown` resolves, then drains under the grace period.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), StartupError> {
        let Self {
            listener,
            metrics,
            services,
            settings,
            auth,
            audit,
            dashboard,
            #[cfg(feature = "tls")]
            tls,
        } = self;
        let stop = CancellationToken::new();

        let rpc_metrics = metrics.as_ref().map(|(metrics, _)| metrics.rpc());
        if let Some((metrics, listener)) = metrics {
            let stop = stop.clone();
            tokio::spawn(async move {
                if let Err(err) = metrics.serve(listener, stop).await {
                    tracing::error!(error = %err, "the metrics endpoint stopped");
                }
            });
        }
        let (health, health_service) = tonic_health::server::health_reporter();
        set_health(&health, ServingStatus::NotServing).await;
        tokio::spawn(follow_readiness(
            services.admin.readiness(),
            audit.writable(),
            health.clone(),
            stop.clone(),
        ));
        tokio::spawn(audit_upkeep(Arc::clone(&audit), stop.clone()));
        let worker = settings.worker.map(|options| {
            let worker = services.worker(options);
            let stop = stop.clone();
            tokio::spawn(async move { worker.run(stop).await })
        });
        let agent = services.replica_agent(
            ReplicaKind::Serve,
            listener.local_addr().ok(),
            settings.replica,
        );
        // Encrypt/Decrypt latency, published for rotations with a latency
        // budget under this replica's heartbeat row.
        let foreground = Arc::new(ForegroundLatency::default());
        tokio::spawn(foreground::probe_scheduling(
            Arc::clone(&foreground),
            stop.clone(),
        ));
        foreground::probe_wakeups(Arc::clone(&foreground), stop.clone());
        tokio::spawn(foreground::publish(
            services.store.clone(),
            Arc::clone(&foreground),
            agent.id().to_owned(),
            stop.clone(),
        ));
        let agent = tokio::spawn(agent.run(stop.clone()));
        tokio::spawn(refresh_catalog_periodically(
            Arc::clone(&services.admin),
            Arc::clone(&auth),
            settings.catalog_refresh_interval,
            stop.clone(),
        ));

        // grpcurl speaks v1 or v1alpha depending on its version: serve both,
        // each listing every service including both reflection versions.
        let reflection_v1 = reflection().build_v1()?;
        let reflection_v1alpha = reflection().build_v1alpha()?;
        let max = settings.max_request_bytes;
        let crypto = CryptoServer::new(CryptoApi::new(
            Arc::clone(&services.crypto),
            Arc::clone(&audit),
        ))
        .max_decoding_message_size(max)
        .max_encoding_message_size(usize::MAX);
        let admin = AdminServer::new(AdminApi::new(
            Arc::clone(&services.admin),
            Arc::clone(&services.rotations),
            Arc::clone(&audit),
        ))
        .max_decoding_message_size(max);

        let cors = cors_layer(&settings.cors_allowed_origins)?;
        let connections = Arc::new(Connections::default());
        let idle = settings.idle;
        let drain = stop.clone();
        let router = Server::builder()
            // HTTP/2's default 64 KiB windows stall many concurrent or large
            // messages (batches) behind WINDOW_UPDATE round trips.
            .initial_connection_window_size(Some(HTTP2_CONNECTION_WINDOW))
            .initial_stream_window_size(Some(HTTP2_STREAM_WINDOW))
            .max_concurrent_streams(Some(settings.max_concurrent_streams))
            // Peers that are gone are found by pings; connections that do
            // nothing are closed (`idle`).
            .http2_keepalive_interval(Some(settings.http2_keepalive))
            .http2_keepalive_timeout(Some(settings.http2_keepalive_timeout))
            // gRPC-Web (browsers, the dashboard) over HTTP/1.1 as well as
            // HTTP/2, translated to gRPC before anything else sees it; CORS
            // preflights for the configured origins are answered first.
            .accept_http1(true)
            // Each request counted open on its connection, its body bounded.
            .layer(IdleLayer::new(Arc::clone(&connections), settings.idle))
            // The dashboard's files, for browser GETs that are no RPC.
            .layer(DashboardLayer::new(dashboard))
            .layer(tower::util::option_layer(cors))
            .layer(tonic_web::GrpcWebLayer::new())
            // Every RPC gets a span, a log line and its metrics here…
            .layer(ObserveLayer::new(rpc_metrics, Some(foreground)))
            // …and passes authentication and its role check here.
            .layer(AuthLayer::new(auth, audit, max))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(crypto)
            .add_service(admin);
        // Small responses must not wait out Nagle + delayed ACK; each
        // connection's frames are written many per system call.
        let incoming = TcpIncoming::from(listener)
            .with_nodelay(Some(true))
            .map_ok(move |stream| CoalescingStream::accepted(stream, &connections, idle));
        let drain = drain.cancelled_owned();
        // A TLS handshake gets as long as a connection has to start its
        // first request.
        #[cfg(feature = "tls")]
        let server: Serving = match tls {
            Some(tls) => Box::pin(
                router
                    .serve_with_incoming_shutdown(tls.secure(incoming, idle.first_request), drain),
            ),
            None => Box::pin(router.serve_with_incoming_shutdown(incoming, drain)),
        };
        #[cfg(not(feature = "tls"))]
        let server: Serving = Box::pin(router.serve_with_incoming_shutdown(incoming, drain));
        tokio::pin!(server);

        tokio::select! {
            result = &mut server => {
                stop.cancel();
                return result.map_err(StartupError::from);
            }
            () = shutdown => {}
        }
        tracing::info!(grace = ?settings.shutdown_grace, "shutting down: health is NOT_SERVING, draining in-flight RPCs");
        stop.cancel();
        set_health(&health, ServingStatus::NotServing).await;
        // The worker finishes its current batch (releasing its lease) while
        // the server drains; both share the grace period.
        let drained = async {
            let served = server.await;
            if let Some(worker) = worker {
                let _ = worker.await;
            }
            // Its heartbeat row is deleted: other replicas stop waiting.
            let _ = agent.await;
            served
        };
        let result = match tokio::time::timeout(settings.shutdown_grace, drained).await {
            Ok(result) => result.map_err(StartupError::from),
            Err(_) => {
                tracing::warn!("grace period elapsed with RPCs or a rotation batch still in flight; closing them");
                Ok(())
            }
        };
        services.store.close().await;
        tracing::info!("stopped");
        result
    }
}

/// CORS for gRPC-Web callers from `origins`; `None` when there are none.
fn cors_layer(origins: &[String]) -> Result<Option<tower_http::cors::CorsLayer>, StartupError> {
    use http::{header, HeaderName, HeaderValue, Method};
    if origins.is_empty() {
        return Ok(None);
    }
    let origins = origins
        .iter()
        .map(|o| {
            HeaderValue::from_str(o.trim_end_matches('/'))
                .ok()
                .filter(|_| o.starts_with("http://") || o.starts_with("https://"))
                .ok_or_else(|| StartupError::CorsOrigin(o.clone()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some(
        tower_http::cors::CorsLayer::new()
            .allow_origin(origins)
            .allow_methods([Method::POST])
            .allow_headers([
                header::CONTENT_TYPE,
                header::AUTHORIZATION,
                HeaderName::from_static("x-grpc-web"),
                HeaderName::from_static("x-user-agent"),
                HeaderName::from_static("grpc-timeout"),
            ])
            .expose_headers([
                HeaderName::from_static("grpc-status"),
                HeaderName::from_static("grpc-message"),
                HeaderName::from_static("grpc-status-details-bin"),
            ])
            .max_age(std::time::Duration::from_secs(24 * 3600)),
    ))
}

/// A reflection builder that knows every service this server runs.
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .include_reflection_service(false)
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
}

/// Sets the overall status ("") and both keyward services alike.
async fn set_health(health: &HealthReporter, status: ServingStatus) {
    for service in ["", "keyward.v1.Crypto", "keyward.v1.Admin"] {
        health.set_service_status(service, status).await;
    }
}

/// Opens `--dashboard-dir`, refusing one that holds a file keyward knows
/// to be secret: the SQLite database (and its journal files), the master
/// key files, the TLS key, the audit log. Dotfiles such as `.env` are never
/// served anyway (`api::dashboard`).
fn dashboard_dir(dir: &std::path::Path, settings: &Settings) -> Result<DashboardDir, StartupError> {
    let files = DashboardDir::open(dir)
        .map_err(|err| StartupError::Dashboard(format!("{}: {err}", dir.display())))?;
    let mut secret: Vec<std::path::PathBuf> = settings.secret_files.clone();
    secret.push(crate::config::dev_master_key_path(&settings.database_url));
    if let Some(db) = crate::config::sqlite_path(&settings.database_url) {
        for suffix in ["", "-wal", "-shm", "-journal"] {
            let mut name = db.clone().into_os_string();
            name.push(suffix);
            secret.push(name.into());
        }
    }
    secret.extend(settings.tls.as_ref().map(|tls| tls.key.clone()));
    if let crate::auth::audit::AuditSink::File(path) = &settings.audit.sink {
        secret.push(path.clone());
    }
    for path in secret {
        let inside = path
            .canonicalize()
            .is_ok_and(|p| p.starts_with(files.root()));
        if inside {
            return Err(StartupError::Dashboard(format!(
                "{} holds {}, which must never be served: point --dashboard-dir at the built dashboard only (clients/dashboard/dist)",
                files.root().display(),
                path.display()
            )));
        }
    }
    files
        .check_built()
        .map_err(|err| StartupError::Dashboard(format!("{}: {err}", dir.display())))?;
    Ok(files)
}

/// `serve --dev` does not start on a database holding keys its master
/// secret cannot open (a served sandbox would only answer "ciphertext was
/// modified"); a production server starts NOT_SERVING instead, saying why.
async fn refuse_foreign_keys(services: &Services) -> Result<(), StartupError> {
    let catalog = services.catalog.snapshot();
    let faults = services.admin.key_faults(&catalog, false).await?;
    match faults.into_values().flatten().find(|f| f.is_foreign()) {
        Some(fault) => Err(StartupError::Keys(Error::ForeignKey(format!(
            "serve --dev refuses this database: {}",
            fault.reason()
        )))),
        None => Ok(()),
    }
}

/// Mirrors service readiness, and whether the audit log can be written,
/// into gRPC health until `stop`.
async fn follow_readiness(
    mut readiness: tokio::sync::watch::Receiver<Readiness>,
    mut audit_writable: tokio::sync::watch::Receiver<bool>,
    health: HealthReporter,
    stop: CancellationToken,
) {
    let mut announced = false;
    loop {
        let current = readiness.borrow_and_update().clone();
        let writable = *audit_writable.borrow_and_update();
        match current {
            Readiness::Ready if writable => {
                if !announced {
                    tracing::info!("🔐 Encryption service initialized successfully");
                    announced = true;
                }
                set_health(&health, ServingStatus::Serving).await;
            }
            Readiness::Ready => {
                tracing::warn!("the audit log cannot be written (fail-closed): health is NOT_SERVING until it can");
                set_health(&health, ServingStatus::NotServing).await;
            }
            Readiness::NotReady(reason) => {
                tracing::warn!(%reason, "not ready: health is NOT_SERVING");
                set_health(&health, ServingStatus::NotServing).await;
            }
            Readiness::Starting => {}
        }
        tokio::select! {
            changed = readiness.changed() => if changed.is_err() { return },
            changed = audit_writable.changed() => if changed.is_err() { return },
            () = stop.cancelled() => return,
        }
    }
}

/// Writes the counts of refusals grouped by the audit log, and retries an
/// audit sink that could not be written, once per refusal window.
async fn audit_upkeep(audit: Arc<AuditLog>, stop: CancellationToken) {
    let mut ticker = tokio::time::interval(crate::auth::audit::REFUSAL_WINDOW);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => audit.upkeep(),
            () = stop.cancelled() => return,
        }
    }
}

/// Reloads the key catalog on a timer, so key changes made elsewhere (the
/// CLI, another replica, hand-written SQL) reach this process, and the api
/// tokens after every catalog load: a token change moves the catalog
/// version (migration 0006), which the replica agent follows within a
/// catalog poll (at once on PostgreSQL), so a revocation takes effect there
/// and the timer is only the backstop.
async fn refresh_catalog_periodically(
    admin: Arc<KeyAdmin>,
    auth: Arc<Authenticator>,
    every: std::time::Duration,
    stop: CancellationToken,
) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    let mut loads = admin.catalog_loads();
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                if let Err(err) = admin.refresh().await {
                    tracing::warn!(error = %err, "periodic key catalog refresh failed; keeping the previous catalog");
                }
            }
            Ok(()) = loads.changed() => {
                if let Err(err) = auth.reload().await {
                    tracing::warn!(error = %err, "api token reload failed; keeping the previous tokens");
                }
            }
            () = stop.cancelled() => return,
        }
    }
}
