//! `keyward serve`: the gRPC server (with its in-process rotation worker),
//! and the checks made before it binds: authentication, TLS and plaintext
//! exposure, a development secret, files holding secrets.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::{Args, ValueEnum};

use super::{
    hangup_signals, redact_url, rotation_targets,
    secrets::{dev_master_secret, master_secrets, warn_about_dot_env, warn_if_others_can_read},
    shutdown_signal,
    worker::{ReplicaArgs, WorkerArgs},
    AuditArgs, ConfigError, GlobalArgs,
};
use crate::{
    app::Application,
    auth::{
        audit::{AuditSettings, AuditSink},
        AuthSettings,
    },
    config::{MasterSecrets, Settings, TlsSettings},
    crypto::cache::{CacheMode, CacheSettings},
    service::crypto::Limits,
};

#[derive(Debug, Args)]
pub(super) struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "KEYWARD_LISTEN", default_value = crate::config::DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// Address to serve Prometheus metrics on (GET /metrics); off when unset.
    #[arg(long, env = "KEYWARD_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Zero-setup sandbox: create a master secret file if none is configured,
    /// and seed an active local key if there is none.
    #[arg(long, env = "KEYWARD_DEV", value_parser = clap::builder::BoolishValueParser::new())]
    dev: bool,
    /// Largest plaintext Encrypt accepts, in bytes.
    #[arg(long, env = "KEYWARD_MAX_PLAINTEXT_BYTES", default_value_t = crate::service::crypto::Limits::default().max_plaintext_bytes)]
    max_plaintext_bytes: usize,
    /// Most items in one BatchEncrypt / BatchDecrypt.
    #[arg(long, env = "KEYWARD_MAX_BATCH_ITEMS", default_value_t = crate::service::crypto::Limits::default().max_batch_items)]
    max_batch_items: usize,
    /// Largest gRPC request message, in bytes.
    #[arg(long, env = "KEYWARD_MAX_REQUEST_BYTES", default_value_t = crate::config::DEFAULT_MAX_REQUEST_BYTES)]
    max_request_bytes: usize,
    /// Seconds between reloads of the key catalog from the database.
    #[arg(long, env = "KEYWARD_CATALOG_REFRESH_SECS", default_value_t = crate::config::DEFAULT_CATALOG_REFRESH.as_secs())]
    catalog_refresh_secs: u64,
    /// Seconds in-flight RPCs get to finish after SIGTERM/SIGINT.
    #[arg(long, env = "KEYWARD_SHUTDOWN_GRACE_SECS", default_value_t = crate::config::DEFAULT_SHUTDOWN_GRACE.as_secs())]
    shutdown_grace_secs: u64,
    /// Do not run a rotation worker in this process (run `keyward worker`).
    #[arg(long, env = "KEYWARD_NO_WORKER", value_parser = clap::builder::BoolishValueParser::new())]
    no_worker: bool,
    #[command(flatten)]
    worker: WorkerArgs,
    #[command(flatten)]
    replica: ReplicaArgs,
    /// Most encryption-context entries per request (1 to 64: a larger value
    /// is refused, as keyward cannot honour it).
    #[arg(long, env = "KEYWARD_MAX_CONTEXT_ENTRIES", default_value_t = crate::crypto::context::MAX_ENTRIES as u64,
          value_parser = clap::value_parser!(u64).range(1..=crate::crypto::context::MAX_ENTRIES as u64))]
    max_context_entries: u64,
    /// Most encryption-context bytes per request, keys and values (1 to
    /// 8192: a larger value is refused).
    #[arg(long, env = "KEYWARD_MAX_CONTEXT_BYTES", default_value_t = crate::crypto::context::MAX_BYTES as u64,
          value_parser = clap::value_parser!(u64).range(1..=crate::crypto::context::MAX_BYTES as u64))]
    max_context_bytes: u64,
    #[command(flatten)]
    cache: CacheArgs,
    /// Most concurrent RPCs (HTTP/2 streams) per connection.
    #[arg(long, env = "KEYWARD_MAX_CONCURRENT_STREAMS", default_value_t = crate::config::DEFAULT_MAX_CONCURRENT_STREAMS)]
    max_concurrent_streams: u32,
    /// Seconds a new connection may go without starting a request before
    /// it is closed.
    #[arg(long, env = "KEYWARD_FIRST_REQUEST_TIMEOUT_SECS", default_value_t = crate::idle::IdleLimits::default().first_request.as_secs())]
    first_request_timeout_secs: u64,
    /// Seconds a connection may stay open with no request in progress (a
    /// streaming WatchRotation is one) before it is closed.
    #[arg(long, env = "KEYWARD_IDLE_CONNECTION_TIMEOUT_SECS", default_value_t = crate::idle::IdleLimits::default().idle.as_secs())]
    idle_connection_timeout_secs: u64,
    /// Seconds a request's body may take to arrive.
    #[arg(long, env = "KEYWARD_REQUEST_BODY_TIMEOUT_SECS", default_value_t = crate::idle::IdleLimits::default().request_body.as_secs())]
    request_body_timeout_secs: u64,
    /// Seconds between HTTP/2 keepalive pings on each connection.
    #[arg(long, env = "KEYWARD_HTTP2_KEEPALIVE_SECS", default_value_t = crate::config::DEFAULT_HTTP2_KEEPALIVE.as_secs())]
    http2_keepalive_secs: u64,
    /// Seconds a keepalive ping may go unanswered before the connection is
    /// closed.
    #[arg(long, env = "KEYWARD_HTTP2_KEEPALIVE_TIMEOUT_SECS", default_value_t = crate::config::DEFAULT_HTTP2_KEEPALIVE_TIMEOUT.as_secs())]
    http2_keepalive_timeout_secs: u64,
    /// Browser origin (e.g. https://ops.example.com) allowed to call keyward
    /// over gRPC-Web; comma-separated for several. Default: none.
    #[arg(long, env = "KEYWARD_CORS_ALLOWED_ORIGINS", value_delimiter = ',')]
    cors_allowed_origins: Vec<String>,
    /// Serve this directory (the built dashboard, clients/dashboard/dist)
    /// on the gRPC address for browser GET requests.
    #[arg(long, env = "KEYWARD_DASHBOARD_DIR")]
    dashboard_dir: Option<PathBuf>,
    /// Serve without authentication on any address (every caller may do
    /// everything). `--dev` on a loopback address needs no such flag.
    #[arg(long, env = "KEYWARD_INSECURE_NO_AUTH", value_parser = clap::builder::BoolishValueParser::new())]
    insecure_no_auth: bool,
    /// PEM certificate chain for TLS (with --tls-key).
    #[arg(long, env = "KEYWARD_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for TLS.
    #[arg(long, env = "KEYWARD_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// PEM CA whose client certificates are accepted (mutual TLS).
    #[arg(long, env = "KEYWARD_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// JSON file mapping client-certificate common names to principals:
    /// [{"common_name": "payments", "roles": ["encrypt","decrypt"], "keys": [], "context": {}}].
    #[arg(long, env = "KEYWARD_MTLS_PRINCIPALS")]
    mtls_principals: Option<PathBuf>,
    /// Requests per second each principal may make; 0 = unlimited.
    #[arg(long, env = "KEYWARD_RATE_LIMIT_PER_SECOND", default_value_t = 0)]
    rate_limit_per_second: u32,
    /// Requests a principal may make in a burst above its rate (default: one second's worth).
    #[arg(long, env = "KEYWARD_RATE_LIMIT_BURST")]
    rate_limit_burst: Option<u32>,
    /// Serve gRPC without TLS, or metrics, on an address other than
    /// loopback (behind a mesh or proxy that terminates TLS); without it
    /// such a server refuses to start.
    #[arg(long, env = "KEYWARD_INSECURE_PLAINTEXT", value_parser = clap::builder::BoolishValueParser::new())]
    insecure_plaintext: bool,
}

/// On each SIGHUP: reopens the audit file, reads the TLS files again and
/// reloads the key catalog and api tokens (`reload`).
async fn reload_on_hangup(
    mut hangups: tokio::signal::unix::Signal,
    reloader: crate::reload::Reloader,
) {
    while hangups.recv().await.is_some() {
        tracing::info!(
            "SIGHUP received: reopening the audit log, reloading TLS files, keys and tokens"
        );
        reloader.reload().await;
    }
}

impl ServeArgs {
    /// Authentication, audit and TLS settings; refuses `--dev` (which
    /// serves without authentication) on a non-loopback address unless
    /// `--insecure-no-auth` says so.
    pub(super) fn security(
        &self,
        audit: &AuditArgs,
    ) -> anyhow::Result<(AuthSettings, AuditSettings, Option<TlsSettings>)> {
        let loopback = self.listen.ip().is_loopback();
        if self.dev && !loopback && !self.insecure_no_auth {
            return Err(ConfigError(format!(
                "--dev serves without authentication, which is allowed on loopback only, not on {}; \
                 listen on 127.0.0.1, or pass --insecure-no-auth to accept anyone on the network",
                self.listen
            ))
            .into());
        }
        let exposed = plaintext_exposure(self.listen, self.metrics_listen, self.tls_cert.is_some());
        if let Some(first) = exposed.first() {
            if !self.insecure_plaintext {
                return Err(ConfigError(format!(
                    "{first} would carry tokens and plaintext secrets unencrypted over the network: \
                     give --tls-cert and --tls-key, listen on 127.0.0.1, or pass --insecure-plaintext \
                     (KEYWARD_INSECURE_PLAINTEXT=true) when a mesh or proxy terminates TLS in front of keyward"
                ))
                .into());
            }
            for exposure in &exposed {
                tracing::warn!("INSECURE: {exposure} without TLS (--insecure-plaintext): anyone on that network path sees tokens and secrets unless something in front of keyward encrypts it");
            }
        }
        let cert_principals = match &self.mtls_principals {
            None => Vec::new(),
            Some(path) => {
                if self.tls_client_ca.is_none() {
                    return Err(ConfigError(
                        "--mtls-principals needs --tls-client-ca (and --tls-cert, --tls-key)"
                            .into(),
                    )
                    .into());
                }
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading --mtls-principals {}", path.display()))?;
                serde_json::from_str(&text).map_err(|e| {
                    ConfigError(format!("--mtls-principals {}: {e}", path.display()))
                })?
            }
        };
        let rate_limit = std::num::NonZeroU32::new(self.rate_limit_per_second).map(|rate| {
            let burst = self
                .rate_limit_burst
                .and_then(std::num::NonZeroU32::new)
                .unwrap_or(rate);
            (rate, burst)
        });
        let auth = AuthSettings {
            required: !(self.insecure_no_auth || (self.dev && loopback)),
            cert_principals,
            rate_limit,
        };
        let audit = audit.settings(AuditSink::Stdout, || AuditSink::Stdout);
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(TlsSettings {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: self.tls_client_ca.clone(),
            }),
            _ => None,
        };
        Ok((auth, audit, tls))
    }
}

pub(super) async fn serve(global: &GlobalArgs, args: ServeArgs) -> anyhow::Result<ExitCode> {
    let (mut auth, audit, tls) = args.security(&global.audit)?;
    if !auth.required && args.dev && !args.insecure_no_auth && has_live_tokens(global).await? {
        tracing::warn!("--dev: this database holds api tokens, so authentication stays on (pass --insecure-no-auth to turn it off)");
        auth.required = true;
    }
    warn_about_dot_env();
    if let Some(tls) = &tls {
        warn_if_others_can_read(&tls.key, "TLS private key");
    }
    let master = match master_secrets(global)? {
        Some(master) => master,
        None if args.dev => dev_master_secret(&global.database_url).await?,
        None => {
            return Err(ConfigError(
                "no master secret: set ENCRYPTION_MASTER_KEY (or LOCAL_KMS_SECRET, or --master-key-file), \
                 or run `keyward serve --dev` for a local sandbox"
                    .into(),
            )
            .into())
        }
    };
    let settings = args.settings(global, master, auth, audit, tls)?;
    // Installed before the server listens: SIGHUP's default would kill it.
    let hangups = hangup_signals()?;
    let app = Application::build(settings).await?;
    tokio::spawn(reload_on_hangup(hangups, app.reloader()));
    tracing::info!(addr = %app.local_addr()?, database = %redact_url(&global.database_url), "keyward listening");
    app.run_until_stopped(shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

impl ServeArgs {
    /// The server's settings from these flags, with the security settings
    /// and master secret decided by the caller.
    fn settings(
        self,
        global: &GlobalArgs,
        master: MasterSecrets,
        auth: AuthSettings,
        audit: AuditSettings,
        tls: Option<TlsSettings>,
    ) -> anyhow::Result<Settings> {
        let args = self;
        Ok(Settings {
            listen: args.listen,
            metrics_listen: args.metrics_listen,
            limits: Limits {
                max_plaintext_bytes: args.max_plaintext_bytes,
                max_batch_items: args.max_batch_items,
                // In range (the parser's bounds), so they fit.
                max_context_entries: usize::try_from(args.max_context_entries)
                    .unwrap_or(crate::crypto::context::MAX_ENTRIES),
                max_context_bytes: usize::try_from(args.max_context_bytes)
                    .unwrap_or(crate::crypto::context::MAX_BYTES),
            },
            max_request_bytes: args.max_request_bytes,
            max_concurrent_streams: args.max_concurrent_streams.max(1),
            idle: crate::idle::IdleLimits {
                first_request: Duration::from_secs(args.first_request_timeout_secs.max(1)),
                idle: Duration::from_secs(args.idle_connection_timeout_secs.max(1)),
                request_body: Duration::from_secs(args.request_body_timeout_secs.max(1)),
            },
            http2_keepalive: Duration::from_secs(args.http2_keepalive_secs.max(1)),
            http2_keepalive_timeout: Duration::from_secs(args.http2_keepalive_timeout_secs.max(1)),
            cors_allowed_origins: args.cors_allowed_origins,
            dashboard_dir: args.dashboard_dir,
            secret_files: global.master_key_file.iter().cloned().collect(),
            auth,
            audit,
            tls,
            catalog_refresh_interval: Duration::from_secs(args.catalog_refresh_secs.max(1)),
            replica: args.replica.options(),
            shutdown_grace: Duration::from_secs(args.shutdown_grace_secs),
            seed_dev_key: args.dev,
            worker: (!args.no_worker).then(|| {
                args.worker
                    .options(Duration::from_secs(args.shutdown_grace_secs))
            }),
            rotation_targets: rotation_targets(global)?,
            kms: global.kms_settings(args.cache.settings())?,
            ..Settings::for_database(global.database_url.clone(), Some(master))
        })
    }
}

/// Whether the database already has live api tokens: a `serve --dev`
/// pointed at a database someone secured keeps authentication on.
pub(super) async fn has_live_tokens(global: &GlobalArgs) -> anyhow::Result<bool> {
    let store = crate::store::Store::connect(&global.database_url).await?;
    store.migrate().await?;
    let live = store
        .list_tokens()
        .await?
        .iter()
        .any(|t| t.revoked_at.is_none());
    store.close().await;
    Ok(live)
}

/// The listeners that would serve plaintext beyond this machine: gRPC on a
/// non-loopback address without TLS, and metrics (always plain HTTP) on a
/// non-loopback address.
pub(super) fn plaintext_exposure(
    listen: std::net::SocketAddr,
    metrics_listen: Option<std::net::SocketAddr>,
    tls: bool,
) -> Vec<String> {
    let mut exposed = Vec::new();
    if !tls && !listen.ip().is_loopback() {
        exposed.push(format!("gRPC on {listen}"));
    }
    if let Some(metrics) = metrics_listen.filter(|m| !m.ip().is_loopback()) {
        exposed.push(format!("metrics on {metrics}"));
    }
    exposed
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, FromArgMatches as _};

    use super::*;
    use crate::{
        config::KmsSettings, crypto::secret::MasterSecret, rotation::worker::WorkerOptions,
        service::replica::ReplicaOptions,
    };

    /// `keyward ARGS` as clap parses it with no environment variable
    /// consulted (every `env = …` is dropped from the command), no
    /// `--config` file and no `.env` (only `cli::main` loads one).
    fn parse_without_env(args: &[&str]) -> super::super::Cli {
        fn strip(command: clap::Command) -> clap::Command {
            command
                .mut_args(|arg| arg.env(None::<&str>))
                .mut_subcommands(strip)
        }
        let matches = strip(super::super::Cli::command())
            .try_get_matches_from(args)
            .unwrap();
        super::super::Cli::from_arg_matches(&matches).unwrap()
    }

    #[test]
    fn serve_without_flags_has_the_library_defaults() {
        let cli = parse_without_env(&["keyward", "serve"]);
        let super::super::Command::Serve(args) = cli.command else {
            panic!("not serve");
        };
        let audit = cli
            .global
            .audit
            .settings(AuditSink::Stdout, || AuditSink::Stdout);
        let master = MasterSecrets {
            current: MasterSecret::new("0123456789abcdef0123456789abcdef").unwrap(),
            previous: Vec::new(),
            legacy: Default::default(),
        };
        let settings = args
            .settings(
                &cli.global,
                master,
                AuthSettings::default(),
                audit.clone(),
                None,
            )
            .unwrap();
        let library = Settings::for_database("sqlite://keyward.db", None);
        assert_eq!(settings.database_url, library.database_url);
        assert_eq!(settings.listen.to_string(), crate::config::DEFAULT_LISTEN);
        assert_eq!(settings.metrics_listen, None);
        assert_eq!(settings.limits, Limits::default());
        assert_eq!(settings.max_request_bytes, library.max_request_bytes);
        assert_eq!(
            settings.max_concurrent_streams,
            library.max_concurrent_streams
        );
        assert_eq!(
            settings.catalog_refresh_interval,
            library.catalog_refresh_interval
        );
        assert_eq!(settings.shutdown_grace, library.shutdown_grace);
        assert_eq!(settings.idle, library.idle);
        assert_eq!(
            (settings.http2_keepalive, settings.http2_keepalive_timeout),
            (library.http2_keepalive, library.http2_keepalive_timeout)
        );
        assert_eq!(settings.replica, ReplicaOptions::default());
        assert_eq!(settings.worker, Some(WorkerOptions::default()));
        assert_eq!(settings.kms, KmsSettings::default());
        assert_eq!(audit.fail_closed, AuditSettings::default().fail_closed);
        assert_eq!(audit.file_mode, AuditSettings::default().file_mode);
        assert!(!settings.seed_dev_key);
        assert!(settings.rotation_targets.is_empty());
    }

    #[test]
    fn only_loopback_or_tls_listeners_are_not_exposed() {
        let addr = |s: &str| s.parse::<std::net::SocketAddr>().unwrap();
        assert!(plaintext_exposure(addr("127.0.0.1:1"), None, false).is_empty());
        assert!(plaintext_exposure(addr("[::1]:1"), Some(addr("127.0.0.1:2")), false).is_empty());
        assert!(plaintext_exposure(addr("0.0.0.0:1"), None, true).is_empty());
        assert_eq!(
            plaintext_exposure(addr("0.0.0.0:1"), Some(addr("10.0.0.1:9")), false),
            ["gRPC on 0.0.0.0:1", "metrics on 10.0.0.1:9"]
        );
        assert_eq!(
            plaintext_exposure(addr("0.0.0.0:1"), Some(addr("0.0.0.0:9")), true),
            ["metrics on 0.0.0.0:9"]
        );
    }
}

/// The data-key cache of `serve`'s API path (Encrypt reuses a data key
/// within bounds, Decrypt keeps unwrapped ones); only `serve` reads these.
#[derive(Debug, Args)]
pub(super) struct CacheArgs {
    /// Data-key cache: auto (remote KMS providers only), on (all), off.
    #[arg(long, env = "KEYWARD_DATA_KEY_CACHE", value_enum, default_value_t = CacheModeArg::Auto)]
    data_key_cache: CacheModeArg,
    /// Longest an Encrypt data key is reused, in seconds.
    #[arg(
        long,
        env = "KEYWARD_DATA_KEY_CACHE_MAX_AGE_SECS",
        default_value_t = crate::crypto::cache::CacheSettings::default().max_age.as_secs(),
    )]
    data_key_cache_max_age_secs: u64,
    /// Most messages encrypted under one cached data key.
    #[arg(
        long,
        env = "KEYWARD_DATA_KEY_CACHE_MAX_MESSAGES",
        default_value_t = crate::crypto::cache::CacheSettings::default().max_messages,
    )]
    data_key_cache_max_messages: u64,
    /// Most plaintext bytes encrypted under one cached data key.
    #[arg(long, env = "KEYWARD_DATA_KEY_CACHE_MAX_BYTES", default_value_t = crate::crypto::cache::CacheSettings::default().max_bytes)]
    data_key_cache_max_bytes: u64,
    /// Most (key, encryption context) entries in the Encrypt cache.
    #[arg(
        long,
        env = "KEYWARD_DATA_KEY_CACHE_ENTRIES",
        default_value_t = crate::crypto::cache::CacheSettings::default().encrypt_capacity,
    )]
    data_key_cache_entries: u64,
    /// Most unwrapped data keys in the Decrypt cache.
    #[arg(
        long,
        env = "KEYWARD_DECRYPT_CACHE_ENTRIES",
        default_value_t = crate::crypto::cache::CacheSettings::default().decrypt_capacity,
    )]
    decrypt_cache_entries: u64,
    /// Longest an unwrapped data key stays in the Decrypt cache, in seconds.
    #[arg(
        long,
        env = "KEYWARD_DECRYPT_CACHE_TTL_SECS",
        default_value_t = crate::crypto::cache::CacheSettings::default().decrypt_ttl.as_secs(),
    )]
    decrypt_cache_ttl_secs: u64,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum CacheModeArg {
    Auto,
    On,
    Off,
}

impl CacheArgs {
    fn settings(&self) -> CacheSettings {
        CacheSettings {
            mode: match self.data_key_cache {
                CacheModeArg::Auto => CacheMode::Auto,
                CacheModeArg::On => CacheMode::On,
                CacheModeArg::Off => CacheMode::Off,
            },
            max_age: Duration::from_secs(self.data_key_cache_max_age_secs),
            max_messages: self.data_key_cache_max_messages,
            max_bytes: self.data_key_cache_max_bytes,
            encrypt_capacity: self.data_key_cache_entries,
            decrypt_capacity: self.decrypt_cache_entries,
            decrypt_ttl: Duration::from_secs(self.decrypt_cache_ttl_secs),
        }
    }
}
