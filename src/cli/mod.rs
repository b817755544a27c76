//! The `keyward` command line: the binary's edge, where `anyhow` is used.
//!
//! Every flag can also be set from the environment (`env = …`), and those
//! of `serve` and `worker` from a TOML file (`--config`, see
//! [`config_file`]); precedence: flag > environment > file > default. Secrets are
//! read from the environment or a file only: `ENCRYPTION_MASTER_KEY`
//! (fallback `LOCAL_KMS_SECRET`), `ENCRYPTION_MASTER_KEY_PREVIOUS`
//! (comma-separated), or `--master-key-file`.
//!
//! Operator commands other than `serve` and `bench` work on the database
//! directly, like the runbook's scripts; a running server picks their
//! changes up on its catalog refresh timer or on `RefreshKeyMetadata`.

mod audit;
mod config_file;

use std::{
    ffi::OsString,
    io::{Read, Write},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::{bail, Context as _};
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use tracing_subscriber::{fmt, EnvFilter};

use self::audit::OperatorAudit;
use crate::{
    app::{Application, Services},
    auth::{
        audit::{AuditSettings, AuditSink},
        AuthSettings, Role, Scope,
    },
    bench::BenchArgs,
    config::{
        dev_master_key_path, load_rotation_targets, KmsSettings, MasterSecrets, Settings,
        TlsSettings,
    },
    crypto::{
        cache::{CacheMode, CacheSettings},
        kms::AwsKmsSettings,
        legacy::encrypt_legacy,
        secret::MasterSecret,
    },
    keys::{Catalog, KeyRecord},
    rotation::{target::RotationTarget, worker::WorkerOptions, JobStatus, Mode, RotationJob},
    service::{
        admin::{CreateKey, Staging},
        crypto::Limits,
        replica::ReplicaOptions,
        rotation::{Rotations, StartRotation},
    },
    store::replicas::{ReplicaKind, ReplicaRecord},
};

/// Exit status for invalid configuration (sysexits' EX_USAGE).
pub const EXIT_CONFIG: u8 = 64;

#[derive(Debug, Parser)]
#[command(name = "keyward", version, about = "Envelope-encryption key service")]
pub struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct GlobalArgs {
    /// TOML file with settings of `serve` and `worker` (flag names with `_`
    /// for `-`); flags and the environment take precedence over it.
    #[arg(long, env = "KEYWARD_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Database: sqlite://PATH (created if missing) or postgres://USER@HOST/DB.
    #[arg(
        long,
        env = "DATABASE_URL",
        // The URL may hold a password: --help must not print it.
        hide_env_values = true,
        default_value = "sqlite://keyward.db",
        global = true
    )]
    database_url: String,
    /// File holding the local KMS master secret (instead of ENCRYPTION_MASTER_KEY).
    #[arg(long, env = "KEYWARD_MASTER_KEY_FILE", global = true)]
    master_key_file: Option<PathBuf>,
    /// JSON file listing tables of secrets to rotate besides `connections`
    /// (every server and worker must use the same list).
    #[arg(long, env = "KEYWARD_ROTATION_TARGETS", global = true)]
    rotation_targets: Option<PathBuf>,
    /// Log format.
    #[arg(long, env = "KEYWARD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(flatten)]
    kms: KmsArgs,
    #[command(flatten)]
    audit: AuditArgs,
}

/// The audit log: `serve`'s calls and the operator commands that change
/// keys, rotations or tokens write to the same sink.
#[derive(Debug, Args)]
struct AuditArgs {
    /// Audit log: `-` for standard output (`serve`; other commands use
    /// standard error, their output being on standard output), a file path
    /// (appended), or `off`.
    #[arg(long, env = "KEYWARD_AUDIT_LOG", default_value = "-", global = true)]
    audit_log: String,
    /// Let requests and commands through when their audit event cannot be
    /// written (default: fail closed, refusing them).
    #[arg(
        long,
        env = "KEYWARD_AUDIT_FAIL_OPEN",
        value_parser = clap::builder::BoolishValueParser::new(),
        global = true
    )]
    audit_fail_open: bool,
    /// Permissions (octal) of an audit file keyward creates: 600 by default;
    /// 640 lets the file's group of operators read it.
    #[arg(long, env = "KEYWARD_AUDIT_FILE_MODE", default_value = "600", value_parser = parse_file_mode, global = true)]
    audit_file_mode: u32,
}

/// An octal permission mode of at most `0o777` that the owner can write.
fn parse_file_mode(text: &str) -> Result<u32, String> {
    let mode = u32::from_str_radix(text.trim_start_matches("0o"), 8)
        .map_err(|_| format!("{text:?} is not an octal mode such as 600 or 640"))?;
    if mode > 0o777 || mode & 0o600 != 0o600 {
        return Err(format!(
            "{text}: the mode must be at most 777 and let the owner read and write (e.g. 600, 640)"
        ));
    }
    Ok(mode)
}

impl AuditArgs {
    /// The settings, with `-` meaning `dash`.
    fn settings(&self, dash: AuditSink) -> AuditSettings {
        AuditSettings {
            sink: match self.audit_log.as_str() {
                "-" => dash,
                "off" | "" => AuditSink::Off,
                path => AuditSink::File(PathBuf::from(path)),
            },
            fail_closed: !self.audit_fail_open,
            file_mode: self.audit_file_mode,
        }
    }
}

/// AWS KMS and the data-key cache: used by every command that touches keys.
#[derive(Debug, Args)]
struct KmsArgs {
    /// AWS region for aws-kms keys (default: the standard AWS chain).
    #[arg(long, env = "AWS_REGION", global = true)]
    aws_region: Option<String>,
    /// Endpoint of a KMS-compatible server instead of AWS's (e.g. moto).
    #[arg(long, env = "KEYWARD_AWS_KMS_ENDPOINT", global = true)]
    aws_kms_endpoint: Option<String>,
    /// Attempts per KMS call, the first included (exponential backoff between).
    #[arg(
        long,
        env = "KEYWARD_AWS_KMS_MAX_ATTEMPTS",
        default_value_t = 3,
        global = true
    )]
    aws_kms_max_attempts: u32,
    /// Backoff before the first KMS retry, in ms (doubles per retry).
    #[arg(
        long,
        env = "KEYWARD_AWS_KMS_INITIAL_BACKOFF_MS",
        default_value_t = 100,
        global = true
    )]
    aws_kms_initial_backoff_ms: u64,
    /// KMS connect timeout, in ms.
    #[arg(
        long,
        env = "KEYWARD_AWS_KMS_CONNECT_TIMEOUT_MS",
        default_value_t = 3000,
        global = true
    )]
    aws_kms_connect_timeout_ms: u64,
    /// Timeout of one KMS attempt, in ms.
    #[arg(
        long,
        env = "KEYWARD_AWS_KMS_ATTEMPT_TIMEOUT_MS",
        default_value_t = 5000,
        global = true
    )]
    aws_kms_attempt_timeout_ms: u64,
    /// Timeout of a whole KMS call with its retries, in ms.
    #[arg(
        long,
        env = "KEYWARD_AWS_KMS_TIMEOUT_MS",
        default_value_t = 15000,
        global = true
    )]
    aws_kms_timeout_ms: u64,
    /// Data-key cache: auto (remote KMS providers only), on (all), off.
    #[arg(long, env = "KEYWARD_DATA_KEY_CACHE", value_enum, default_value_t = CacheModeArg::Auto, global = true)]
    data_key_cache: CacheModeArg,
    /// Longest an Encrypt data key is reused, in seconds.
    #[arg(
        long,
        env = "KEYWARD_DATA_KEY_CACHE_MAX_AGE_SECS",
        default_value_t = 300,
        global = true
    )]
    data_key_cache_max_age_secs: u64,
    /// Most messages encrypted under one cached data key.
    #[arg(
        long,
        env = "KEYWARD_DATA_KEY_CACHE_MAX_MESSAGES",
        default_value_t = 4096,
        global = true
    )]
    data_key_cache_max_messages: u64,
    /// Most plaintext bytes encrypted under one cached data key.
    #[arg(long, env = "KEYWARD_DATA_KEY_CACHE_MAX_BYTES", default_value_t = 256 * 1024 * 1024, global = true)]
    data_key_cache_max_bytes: u64,
    /// Most (key, encryption context) entries in the Encrypt cache.
    #[arg(
        long,
        env = "KEYWARD_DATA_KEY_CACHE_ENTRIES",
        default_value_t = 1000,
        global = true
    )]
    data_key_cache_entries: u64,
    /// Most unwrapped data keys in the Decrypt cache.
    #[arg(
        long,
        env = "KEYWARD_DECRYPT_CACHE_ENTRIES",
        default_value_t = 10_000,
        global = true
    )]
    decrypt_cache_entries: u64,
    /// Longest an unwrapped data key stays in the Decrypt cache, in seconds.
    #[arg(
        long,
        env = "KEYWARD_DECRYPT_CACHE_TTL_SECS",
        default_value_t = 300,
        global = true
    )]
    decrypt_cache_ttl_secs: u64,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum CacheModeArg {
    Auto,
    On,
    Off,
}

impl KmsArgs {
    fn settings(&self) -> KmsSettings {
        let ms = Duration::from_millis;
        KmsSettings {
            aws: AwsKmsSettings {
                region: self.aws_region.clone().filter(|r| !r.is_empty()),
                endpoint: self.aws_kms_endpoint.clone().filter(|e| !e.is_empty()),
                max_attempts: self.aws_kms_max_attempts.max(1),
                initial_backoff: ms(self.aws_kms_initial_backoff_ms),
                connect_timeout: ms(self.aws_kms_connect_timeout_ms),
                attempt_timeout: ms(self.aws_kms_attempt_timeout_ms),
                operation_timeout: ms(self.aws_kms_timeout_ms),
            },
            cache: CacheSettings {
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
            },
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve keyward.v1.Crypto, keyward.v1.Admin, health and reflection.
    Serve(Box<ServeArgs>),
    /// Apply database migrations and exit.
    Migrate,
    /// Upsert the active key (the runbook's `npm run seed:encryption-key`).
    SeedKey(SeedArgs),
    /// List, create, activate or retire key records.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// See the keyward processes (serve replicas, workers) on this database.
    #[command(subcommand)]
    Replicas(ReplicasCommand),
    /// Round-trip every non-retired key through its KMS; exit 0 only if all pass.
    SelfTest,
    /// Write a connections row the way the pre-keyward application did
    /// (legacy format; plaintext read from stdin). A fixture generator.
    LegacyEncrypt(LegacyArgs),
    /// Run the rotation worker alone (the runbook's `npm run start:rotation`).
    Worker(StandaloneWorkerArgs),
    /// Start, watch, inspect, cancel or requeue re-encryption jobs.
    #[command(subcommand)]
    Rotate(RotateCommand),
    /// Remove expired or used connection_scoped_tokens.
    PruneTokens,
    /// Create, list or revoke the bearer tokens callers authenticate with.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Print a commented configuration file listing every setting with its
    /// default (the repository's keyward.example.toml).
    ConfigExample,
    /// Measure Encrypt/Decrypt/BatchEncrypt against the Health/Check floor.
    Bench(BenchArgs),
    /// Measure rotation rows/s against a single-UPDATE floor, and Encrypt
    /// p99 during a rotation against idle (use an empty PostgreSQL database).
    BenchRotation(crate::bench_rotation::RotationBenchArgs),
    /// Soak a `keyward serve` child process on PostgreSQL: mixed
    /// Encrypt/Decrypt load while it rotates --rows rows, then read every
    /// row back; reports errors, p50/p99 over time and peak RSS (use an
    /// empty database). Exit 0 only if it passed.
    BenchSoak(crate::bench_soak::SoakArgs),
    #[cfg(feature = "aws-kms")]
    /// Measure Encrypt/Decrypt through an aws-kms key with the data-key
    /// cache on and off, counting KMS calls (point --aws-kms-endpoint at a
    /// KMS-compatible server, or use AWS).
    BenchKmsCache(crate::bench_kms_cache::KmsCacheBenchArgs),
}

/// The rotation worker's tuning, in `serve` (its in-process worker) and
/// `worker`.
#[derive(Debug, Args)]
struct WorkerArgs {
    /// Seconds a claimed batch stays this worker's; a crashed worker's
    /// batch is taken over after this.
    #[arg(long, env = "KEYWARD_WORKER_LEASE_SECS", default_value_t = 30)]
    lease_secs: u64,
    /// Milliseconds between polls of an empty queue.
    #[arg(long, env = "KEYWARD_WORKER_POLL_MS", default_value_t = 500)]
    poll_ms: u64,
}

/// Heartbeat and catalog following, in `serve` and `worker`.
#[derive(Debug, Args)]
struct ReplicaArgs {
    /// Seconds between this process's heartbeats into keyward_replicas; it
    /// counts as gone after three missed.
    #[arg(long, env = "KEYWARD_HEARTBEAT_SECS", default_value_t = 5)]
    heartbeat_secs: u64,
    /// Milliseconds between checks of the catalog version (PostgreSQL also
    /// announces changes at once with LISTEN/NOTIFY).
    #[arg(long, env = "KEYWARD_CATALOG_POLL_MS", default_value_t = 1000)]
    catalog_poll_ms: u64,
    /// Do not LISTEN for catalog changes on PostgreSQL (e.g. behind a
    /// connection pooler in transaction mode); the version poll remains.
    #[arg(long, env = "KEYWARD_NO_CATALOG_LISTEN", value_parser = clap::builder::BoolishValueParser::new())]
    no_catalog_listen: bool,
}

impl ReplicaArgs {
    fn options(&self) -> ReplicaOptions {
        ReplicaOptions {
            heartbeat: Duration::from_secs(self.heartbeat_secs.max(1)),
            catalog_poll: Duration::from_millis(self.catalog_poll_ms.max(50)),
            listen: !self.no_catalog_listen,
        }
    }
}

impl WorkerArgs {
    /// On shutdown a batch in flight gets half the grace period to finish;
    /// the other half is for abandoning it (releasing its lease) and the
    /// rest of the shutdown.
    fn options(&self, shutdown_grace: Duration) -> WorkerOptions {
        WorkerOptions {
            lease: Duration::from_secs(self.lease_secs.max(1)),
            idle_poll: Duration::from_millis(self.poll_ms.max(10)),
            batch_grace: shutdown_grace / 2,
        }
    }
}

#[derive(Debug, Args)]
struct StandaloneWorkerArgs {
    #[command(flatten)]
    worker: WorkerArgs,
    /// Seconds the worker gets to stop after SIGTERM/SIGINT: the batch in
    /// flight finishes within half of it or is abandoned, and the lease is
    /// released at once either way.
    #[arg(long, env = "KEYWARD_SHUTDOWN_GRACE_SECS", default_value_t = 10)]
    shutdown_grace_secs: u64,
    #[command(flatten)]
    replica: ReplicaArgs,
}

#[derive(Debug, Subcommand)]
enum RotateCommand {
    /// Queue a job moving every connections row to the target key.
    Start {
        /// Target key (key_id or id); default the active key.
        #[arg(long)]
        target: Option<String>,
        /// reencrypt (fresh data key) or rewrap (data key re-wrapped only).
        #[arg(long, value_enum, default_value_t = RotateMode::Reencrypt)]
        mode: RotateMode,
        /// Decrypt-verify every row and write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Rows per batch (1..10000).
        #[arg(long, default_value_t = 500)]
        batch_size: i64,
        /// Rows per second per worker; 0 = unthrottled.
        #[arg(long, default_value_t = 0)]
        max_rows_per_second: i64,
        /// Follow progress until the job ends; exit 0 only if it completed cleanly.
        #[arg(long)]
        watch: bool,
    },
    /// Follow a job's progress until it ends.
    Watch { job_id: String },
    /// Show one job.
    Status { job_id: String },
    /// List jobs, newest first.
    List {
        #[arg(long, default_value_t = 20)]
        limit: i64,
    },
    /// Cancel a job (a running one stops between batches).
    Cancel { job_id: String },
    /// Put a failed or cancelled job back in the queue.
    Requeue { job_id: String },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum RotateMode {
    Reencrypt,
    Rewrap,
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "KEYWARD_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Address to serve Prometheus metrics on (GET /metrics); off when unset.
    #[arg(long, env = "KEYWARD_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Zero-setup sandbox: create a master secret file if none is configured,
    /// and seed an active local key if there is none.
    #[arg(long, env = "KEYWARD_DEV", value_parser = clap::builder::BoolishValueParser::new())]
    dev: bool,
    /// Largest plaintext Encrypt accepts, in bytes.
    #[arg(long, env = "KEYWARD_MAX_PLAINTEXT_BYTES", default_value_t = 65536)]
    max_plaintext_bytes: usize,
    /// Most items in one BatchEncrypt / BatchDecrypt.
    #[arg(long, env = "KEYWARD_MAX_BATCH_ITEMS", default_value_t = 1000)]
    max_batch_items: usize,
    /// Largest gRPC request message, in bytes.
    #[arg(long, env = "KEYWARD_MAX_REQUEST_BYTES", default_value_t = crate::config::DEFAULT_MAX_REQUEST_BYTES)]
    max_request_bytes: usize,
    /// Seconds between reloads of the key catalog from the database.
    #[arg(long, env = "KEYWARD_CATALOG_REFRESH_SECS", default_value_t = 30)]
    catalog_refresh_secs: u64,
    /// Seconds in-flight RPCs get to finish after SIGTERM/SIGINT.
    #[arg(long, env = "KEYWARD_SHUTDOWN_GRACE_SECS", default_value_t = 10)]
    shutdown_grace_secs: u64,
    /// Do not run a rotation worker in this process (run `keyward worker`).
    #[arg(long, env = "KEYWARD_NO_WORKER", value_parser = clap::builder::BoolishValueParser::new())]
    no_worker: bool,
    #[command(flatten)]
    worker: WorkerArgs,
    #[command(flatten)]
    replica: ReplicaArgs,
    /// Most encryption-context entries per request (at most 64).
    #[arg(long, env = "KEYWARD_MAX_CONTEXT_ENTRIES", default_value_t = 64)]
    max_context_entries: usize,
    /// Most encryption-context bytes per request, keys and values (at most 8192).
    #[arg(long, env = "KEYWARD_MAX_CONTEXT_BYTES", default_value_t = 8192)]
    max_context_bytes: usize,
    /// Most concurrent RPCs (HTTP/2 streams) per connection.
    #[arg(long, env = "KEYWARD_MAX_CONCURRENT_STREAMS", default_value_t = 256)]
    max_concurrent_streams: u32,
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

impl ServeArgs {
    /// Authentication, audit and TLS settings; refuses `--dev` (which
    /// serves without authentication) on a non-loopback address unless
    /// `--insecure-no-auth` says so.
    fn security(
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
        let audit = audit.settings(AuditSink::Stdout);
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

#[derive(Debug, Args)]
struct SeedArgs {
    /// key_id of the seeded key.
    #[arg(long, env = "DEFAULT_ENCRYPTION_KEY_ID", default_value = "primary")]
    key_id: String,
    /// Alias recorded with the key.
    #[arg(long, env = "DEFAULT_ENCRYPTION_KEY_ALIAS")]
    alias: Option<String>,
    /// KMS key; default `local:<key_id>` (the built-in local KMS).
    #[arg(long, env = "DEFAULT_ENCRYPTION_KMS_KEY_ARN")]
    kms_key_arn: Option<String>,
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// List every key record.
    List,
    /// Register a key record (pending unless --activate).
    Create {
        #[arg(long)]
        key_id: String,
        /// KMS key ARN / id / alias, or local:NAME; default local:<key_id>.
        #[arg(long, default_value = "")]
        kms_key_arn: String,
        #[arg(long)]
        alias: Option<String>,
        /// local or aws-kms; default inferred from --kms-key-arn.
        #[arg(long, default_value = "")]
        provider: String,
        /// Activate at once (the previous active key becomes rotating).
        #[arg(long)]
        activate: bool,
    },
    /// Make a key active; the previous active key becomes rotating.
    Activate {
        key_id: String,
        /// First wait until every live replica can decrypt under the key
        /// (keyward replicas list); a replica that cannot stops activation.
        #[arg(long)]
        staged: bool,
        /// How long --staged waits for the replicas.
        #[arg(long, default_value_t = 60)]
        staged_timeout_secs: u64,
    },
    /// Retire a rotating key; refuses while rows are on it, a rotation job
    /// is live or a replica still encrypts with it, unless --force.
    Retire {
        key_id: String,
        #[arg(long)]
        force: bool,
        /// Only report what blocks the retirement and what to run next.
        #[arg(long)]
        dry_run: bool,
    },
    /// Re-encryption debt: rows per key (legacy included) in each rotation
    /// target, and the age of the oldest.
    Usage,
}

#[derive(Debug, Subcommand)]
enum ReplicasCommand {
    /// Every keyward process heartbeating into this database: catalog
    /// version, last heartbeat, active key and key readiness.
    List,
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create a token; prints it once (only its SHA-256 is stored).
    Create {
        /// Unique name; audit events record it as the principal.
        #[arg(long)]
        name: String,
        /// encrypt, decrypt or admin; repeat for several.
        #[arg(long = "role", required = true)]
        roles: Vec<String>,
        /// Limit to these keys (key_id or id); repeat for several; default any.
        #[arg(long = "key")]
        keys: Vec<String>,
        /// Require this encryption-context pair (KEY=VALUE) on every request;
        /// repeat for several.
        #[arg(long = "context")]
        context: Vec<String>,
        /// Let a token limited by --key or --context open legacy
        /// ciphertexts, which are bound to no key and no context (an
        /// application reading its rows until rotation has moved them).
        /// A token without limits opens them anyway.
        #[arg(long)]
        legacy: bool,
    },
    /// List tokens (names, roles, scopes; never the tokens).
    List,
    /// Revoke a token by name (servers stop accepting it within a catalog
    /// poll, --catalog-poll-ms; at once on PostgreSQL with LISTEN; at the
    /// latest --catalog-refresh-secs later).
    Revoke { name: String },
}

#[derive(Debug, Args)]
struct LegacyArgs {
    /// connections.id of the row to write (created or overwritten).
    #[arg(long)]
    connection_id: String,
    /// connections.name of the row.
    #[arg(long)]
    name: Option<String>,
}

/// Parses arguments, runs the command on a Tokio runtime, maps the outcome
/// to an exit status.
pub fn main() -> ExitCode {
    let cli = match parse(std::env::args_os().collect()) {
        Ok(cli) => cli,
        Err(Invalid::Clap(err)) => {
            let _ = err.print();
            return if err.use_stderr() {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::SUCCESS // --help, --version
            };
        }
        Err(Invalid::Config(err)) => {
            eprintln!("keyward: {err}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    init_logging(cli.global.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("keyward: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("keyward: {err:#}");
            if err.downcast_ref::<ConfigError>().is_some() {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Why the command line (with its configuration file) was not accepted.
enum Invalid {
    /// clap's own error, help or version text.
    Clap(clap::Error),
    Config(ConfigError),
}

/// Parses `argv`; with `--config`, parses again with the file's settings
/// appended as flags for whatever the first parse took from a default.
fn parse(argv: Vec<OsString>) -> Result<Cli, Invalid> {
    let command = Cli::command();
    let matches = command
        .clone()
        .try_get_matches_from(&argv)
        .map_err(Invalid::Clap)?;
    let Some(path) = matches.get_one::<PathBuf>("config").cloned() else {
        return Cli::from_arg_matches(&matches).map_err(Invalid::Clap);
    };
    let extra = config_file::arguments(&command, &matches, &path).map_err(Invalid::Config)?;
    let matches = command
        .try_get_matches_from(argv.into_iter().chain(extra))
        .map_err(|e| {
            Invalid::Config(ConfigError(format!(
                "with the settings of {}: {}",
                path.display(),
                e.to_string().trim_start_matches("error: ").trim_end()
            )))
        })?;
    Cli::from_arg_matches(&matches).map_err(Invalid::Clap)
}

/// Configuration that cannot work; exits with [`EXIT_CONFIG`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    // Installing fails only if a subscriber is already set; keep that one.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let global = cli.global;
    match cli.command {
        Command::Serve(args) => serve(&global, *args).await,
        Command::Migrate => {
            let store = crate::store::Store::connect(&global.database_url).await?;
            store.migrate().await?;
            println!("migrations applied to {}", redact_url(&global.database_url));
            Ok(ExitCode::SUCCESS)
        }
        Command::SeedKey(args) => {
            let audit = operator_audit(&global)?;
            let services = open(&global).await?;
            let detail = format!(
                "kms_key_arn={}",
                args.kms_key_arn.as_deref().unwrap_or("local:<key_id>")
            );
            let key_id = args.key_id.clone();
            let seed = services.admin.seed_key(CreateKey {
                key_id: args.key_id,
                kms_key_arn: args.kms_key_arn.unwrap_or_default(),
                alias: args.alias,
                ..CreateKey::default()
            });
            let key = audit
                .audited("cli/seed-key", Some(&key_id), Some(detail), seed)
                .await?;
            tracing::info!(id = %key.id, key_id = %key.key_id, "active key seeded");
            println!("{}", key.id);
            Ok(ExitCode::SUCCESS)
        }
        Command::Keys(cmd) => keys(&global, cmd).await,
        Command::Replicas(ReplicasCommand::List) => {
            let services = open(&global).await?;
            let (replicas, version) = services.admin.list_replicas().await?;
            print_replicas(&replicas, &services.admin.catalog_snapshot(), version);
            Ok(ExitCode::SUCCESS)
        }
        Command::SelfTest => {
            let services = open(&global).await?;
            let report = services.admin.self_test().await?;
            for check in &report.keys {
                match &check.problems() {
                    None => println!(
                        "ok    {} ({}, {})",
                        check.key.key_id, check.key.provider, check.key.status
                    ),
                    Some(err) => println!(
                        "FAIL  {} ({}, {}): {err}",
                        check.key.key_id, check.key.provider, check.key.status
                    ),
                }
            }
            if report.passed() {
                println!("Encryption self-test: ✅ passed");
                Ok(ExitCode::SUCCESS)
            } else {
                if !report
                    .keys
                    .iter()
                    .any(|c| c.key.status == crate::keys::KeyStatus::Active)
                {
                    println!("no active key");
                }
                println!("Encryption self-test: ❌ failed");
                Ok(ExitCode::FAILURE)
            }
        }
        Command::LegacyEncrypt(args) => legacy_encrypt(&global, args).await,
        Command::Worker(args) => {
            let services = open(&global).await?;
            let grace = Duration::from_secs(args.shutdown_grace_secs);
            let worker = services.worker(args.worker.options(grace));
            let stop = tokio_util::sync::CancellationToken::new();
            let signal_stop = stop.clone();
            tokio::spawn(async move {
                shutdown_signal().await;
                signal_stop.cancel();
            });
            let agent = services.replica_agent(ReplicaKind::Worker, None, args.replica.options());
            let agent = tokio::spawn(agent.run(stop.clone()));
            worker.run(stop).await;
            let _ = agent.await;
            services.store.close().await;
            Ok(ExitCode::SUCCESS)
        }
        Command::Rotate(cmd) => rotate(&global, cmd).await,
        Command::Token(cmd) => token(&global, cmd).await,
        Command::ConfigExample => {
            print!("{}", config_file::example(&Cli::command()));
            Ok(ExitCode::SUCCESS)
        }
        Command::PruneTokens => {
            let services = open(&global).await?;
            let removed = services.rotations.prune_scoped_tokens().await?;
            println!("removed {removed} expired or used scoped tokens");
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(args) => {
            crate::bench::run(args).await?;
            Ok(ExitCode::SUCCESS)
        }
        #[cfg(feature = "aws-kms")]
        Command::BenchKmsCache(args) => {
            crate::bench_kms_cache::run(global.kms.settings(), args).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::BenchRotation(args) => {
            crate::bench_rotation::run(&global.database_url, args).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::BenchSoak(args) => {
            let passed = crate::bench_soak::run(&global.database_url, args).await?;
            Ok(if passed {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

async fn serve(global: &GlobalArgs, args: ServeArgs) -> anyhow::Result<ExitCode> {
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
    let settings = Settings {
        listen: args.listen,
        metrics_listen: args.metrics_listen,
        limits: Limits {
            max_plaintext_bytes: args.max_plaintext_bytes,
            max_batch_items: args.max_batch_items,
            max_context_entries: args.max_context_entries,
            max_context_bytes: args.max_context_bytes,
        },
        max_request_bytes: args.max_request_bytes,
        max_concurrent_streams: args.max_concurrent_streams.max(1),
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
        kms: global.kms.settings(),
        ..Settings::for_database(global.database_url.clone(), Some(master))
    };
    let app = Application::build(settings).await?;
    tracing::info!(addr = %app.local_addr()?, database = %redact_url(&global.database_url), "keyward listening");
    app.run_until_stopped(shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

async fn token(global: &GlobalArgs, cmd: TokenCommand) -> anyhow::Result<ExitCode> {
    let changes = !matches!(cmd, TokenCommand::List);
    let audit = operator_audit_if(global, changes)?;
    let store = crate::store::Store::connect(&global.database_url).await?;
    store.migrate().await?;
    match cmd {
        TokenCommand::Create {
            name,
            roles,
            keys,
            context,
            legacy,
        } => {
            if name.trim().is_empty() || name.len() > 128 {
                return Err(ConfigError("--name must be 1 to 128 characters".into()).into());
            }
            let roles = roles
                .iter()
                .map(|r| {
                    Role::parse(r).ok_or_else(|| {
                        ConfigError(format!("unknown role {r:?}: use encrypt, decrypt or admin"))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let context = context
                .iter()
                .map(|pair| {
                    pair.split_once('=')
                        .filter(|(k, _)| !k.is_empty())
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                        .ok_or_else(|| ConfigError(format!("--context {pair:?}: use KEY=VALUE")))
                })
                .collect::<Result<_, _>>()?;
            let scope = Scope {
                keys,
                context,
                legacy,
            };
            let secret = crate::auth::token::generate();
            let mut detail = format!("name={name} roles={}", role_list(&roles));
            if scope.legacy {
                detail.push_str(" legacy");
            }
            let hash = crate::auth::token::hash(&secret);
            let insert = store.insert_token(&name, &hash, &roles, &scope);
            let record = audited(&audit, "cli/token create", None, detail, insert).await?;
            eprintln!(
                "token {} created with roles {}; it is shown once, store it now:",
                record.name,
                role_list(&record.roles)
            );
            println!("{}", secret.as_str());
        }
        TokenCommand::List => {
            for t in store.list_tokens().await? {
                let state = match t.revoked_at {
                    Some(at) => format!("revoked {}", at.format("%Y-%m-%d %H:%M")),
                    None => "live".to_owned(),
                };
                let keys = if t.scope.keys.is_empty() {
                    "any key".to_owned()
                } else {
                    t.scope.keys.join(",")
                };
                let context = t
                    .scope
                    .context
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",");
                let legacy = if t.scope.allows_legacy() {
                    "legacy"
                } else {
                    "no legacy"
                };
                println!(
                    "{:<24} {:<22} {:<20} {:<24} {legacy:<10} {state}",
                    t.name,
                    role_list(&t.roles),
                    keys,
                    if context.is_empty() {
                        "any context"
                    } else {
                        &context
                    }
                );
            }
        }
        TokenCommand::Revoke { name } => {
            let revoke = store.revoke_token(&name);
            if !audited(
                &audit,
                "cli/token revoke",
                None,
                format!("name={name}"),
                revoke,
            )
            .await?
            {
                eprintln!("no live token named {name:?}");
                return Ok(ExitCode::FAILURE);
            }
            println!("token {name} revoked");
        }
    }
    store.close().await;
    Ok(ExitCode::SUCCESS)
}

fn role_list(roles: &[Role]) -> String {
    roles
        .iter()
        .map(|r| r.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

/// Resolves when SIGTERM or SIGINT arrives.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sig) => {
                sig.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received"),
        () = term => tracing::info!("SIGTERM received"),
    }
}

/// The configured master secrets, from the environment or a file.
fn master_secrets(global: &GlobalArgs) -> anyhow::Result<Option<MasterSecrets>> {
    let from_env = ["ENCRYPTION_MASTER_KEY", "LOCAL_KMS_SECRET"]
        .iter()
        .find_map(|name| std::env::var(name).ok().filter(|v| !v.trim().is_empty()));
    let current = match (from_env, &global.master_key_file) {
        (Some(secret), _) => Some(secret),
        (None, Some(path)) => Some(read_secret_file(path)?),
        (None, None) => None,
    };
    let previous: Vec<String> = std::env::var("ENCRYPTION_MASTER_KEY_PREVIOUS")
        .map(|v| v.split(',').map(str::to_owned).collect())
        .unwrap_or_default();
    current
        .map(|c| MasterSecrets::parse(&c, &previous))
        .transpose()
        .map_err(|e| ConfigError(format!("master secret: {e}")).into())
}

fn read_secret_file(path: &Path) -> anyhow::Result<String> {
    warn_if_others_can_read(path, "master key file");
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .map_err(|e| {
            ConfigError(format!(
                "cannot read master key file {}: {e}",
                path.display()
            ))
            .into()
        })
}

/// Whether the database already has live api tokens: a `serve --dev`
/// pointed at a database someone secured keeps authentication on.
async fn has_live_tokens(global: &GlobalArgs) -> anyhow::Result<bool> {
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

/// Warns when a file holding key material can be read by users other than
/// its owner (group or world bits set): keyward cannot fix that for the
/// operator, but must not accept it silently.
fn warn_if_others_can_read(path: &Path, what: &str) {
    use std::os::unix::fs::PermissionsExt as _;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), "the {what} can be read by other users: chmod 600 it");
        }
    }
}

/// A `.env` in the working directory (how the runbook's Node services and
/// compose files pass ENCRYPTION_MASTER_KEY) that holds a master secret is
/// key material too.
fn warn_about_dot_env() {
    let path = Path::new(".env");
    let holds_secret = std::fs::read_to_string(path).is_ok_and(|text| {
        text.lines().any(|line| {
            let line = line.trim_start().trim_start_matches("export ");
            ["ENCRYPTION_MASTER_KEY", "LOCAL_KMS_SECRET"]
                .iter()
                .any(|name| line.starts_with(name))
        })
    });
    if holds_secret {
        warn_if_others_can_read(path, ".env file (it holds a master secret)");
    }
}

/// `serve --dev`: reuse or create a 0600 master secret file. A new secret
/// is generated only for a database without local keys: anything such a
/// database holds was written with another secret, which a new one would
/// never open.
async fn dev_master_secret(database_url: &str) -> anyhow::Result<MasterSecrets> {
    let path = dev_master_key_path(database_url);
    let secret = if path.exists() {
        tracing::warn!(path = %path.display(), "--dev: using the development master secret in this file");
        read_secret_file(&path)?
    } else {
        let store = crate::store::Store::connect(database_url).await?;
        store.migrate().await?;
        let local_keys: Vec<String> = store
            .list_keys()
            .await?
            .into_iter()
            .filter(|k| k.provider == crate::crypto::kms::ProviderKind::Local)
            .map(|k| k.key_id)
            .collect();
        store.close().await;
        if !local_keys.is_empty() {
            return Err(ConfigError(format!(
                "--dev would generate a new master secret ({} does not exist), but this database already holds local keys ({}) written with another one, which a new secret can never open: set ENCRYPTION_MASTER_KEY (or --master-key-file) to the secret that wrote them",
                path.display(),
                local_keys.join(", ")
            ))
            .into());
        }
        let secret = MasterSecret::generate_hex();
        write_private_file(&path, secret.as_bytes())
            .with_context(|| format!("cannot create {}", path.display()))?;
        tracing::warn!(
            path = %path.display(),
            "--dev: NO MASTER SECRET WAS CONFIGURED, so a new one was generated and written to this file (mode 0600). \
             Anything encrypted is only as safe as that file. Do not use --dev in production: set ENCRYPTION_MASTER_KEY."
        );
        secret.to_string()
    };
    MasterSecrets::parse(&secret, &[])
        .map_err(|e| ConfigError(format!("{}: {e}", path.display())).into())
}

/// The listeners that would serve plaintext beyond this machine: gRPC on a
/// non-loopback address without TLS, and metrics (always plain HTTP) on a
/// non-loopback address.
fn plaintext_exposure(
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

fn write_private_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(contents)?;
    file.write_all(b"\n")
}

async fn open(global: &GlobalArgs) -> anyhow::Result<Services> {
    let master = master_secrets(global)?;
    Ok(Services::open_with_targets(
        &global.database_url,
        master.as_ref(),
        &global.kms.settings(),
        Limits::default(),
        rotation_targets(global)?,
    )
    .await?)
}

/// The extra rotation targets of `--rotation-targets`, if given.
fn rotation_targets(global: &GlobalArgs) -> anyhow::Result<Vec<RotationTarget>> {
    match &global.rotation_targets {
        None => Ok(Vec::new()),
        Some(path) => load_rotation_targets(path).map_err(|e| ConfigError(e.to_string()).into()),
    }
}

/// The audit log of the operator commands (`-` is standard error here).
fn operator_audit(global: &GlobalArgs) -> anyhow::Result<OperatorAudit> {
    OperatorAudit::open(&global.audit.settings(AuditSink::Stderr))
}

/// [`operator_audit`] for a command that `changes` something; a read-only
/// command neither opens nor needs the log.
fn operator_audit_if(global: &GlobalArgs, changes: bool) -> anyhow::Result<Option<OperatorAudit>> {
    changes.then(|| operator_audit(global)).transpose()
}

/// Runs a change through the operator audit log; every command that
/// changes something opens one, so `None` only means nothing to audit.
async fn audited<T, E: Into<anyhow::Error>>(
    audit: &Option<OperatorAudit>,
    command: &'static str,
    key_id: Option<&str>,
    detail: String,
    change: impl std::future::Future<Output = Result<T, E>>,
) -> anyhow::Result<T> {
    match audit {
        Some(audit) => audit.audited(command, key_id, Some(detail), change).await,
        None => change.await.map_err(Into::into),
    }
}

async fn keys(global: &GlobalArgs, cmd: KeysCommand) -> anyhow::Result<ExitCode> {
    let changes = matches!(
        cmd,
        KeysCommand::Create { .. }
            | KeysCommand::Activate { .. }
            | KeysCommand::Retire { dry_run: false, .. }
    );
    let audit = operator_audit_if(global, changes)?;
    let services = open(global).await?;
    let admin = &services.admin;
    match cmd {
        KeysCommand::List => print_keys(&admin.list_keys().await?),
        KeysCommand::Create {
            key_id,
            kms_key_arn,
            alias,
            provider,
            activate,
        } => {
            let detail = format!("kms_key_arn={kms_key_arn} activate={activate}");
            let create = admin.create_key(CreateKey {
                key_id: key_id.clone(),
                kms_key_arn,
                alias,
                provider,
                activate,
            });
            let key = audited(&audit, "cli/keys create", Some(&key_id), detail, create).await?;
            print_keys(&[key]);
        }
        KeysCommand::Activate {
            key_id,
            staged,
            staged_timeout_secs,
        } => {
            let staging = if staged {
                Staging::Staged {
                    timeout: Duration::from_secs(staged_timeout_secs),
                }
            } else {
                Staging::Immediate
            };
            let activate = admin.activate_key(&key_id, staging);
            let detail = format!("staged={staged}");
            let activation =
                audited(&audit, "cli/keys activate", Some(&key_id), detail, activate).await?;
            for replica in &activation.confirmed {
                println!(
                    "confirmed by {}",
                    crate::service::replica::describe(replica)
                );
            }
            print_keys(&[activation.activated]);
            if let Some(previous) = activation.previous {
                println!("previous active key {} is now rotating", previous.key_id);
            }
            println!("running servers load it within a second (catalog version), or at once on PostgreSQL");
        }
        KeysCommand::Retire {
            key_id,
            force: _,
            dry_run: true,
        } => {
            let plan = admin.retire_plan(&key_id).await?;
            if plan.blockers.is_empty() {
                println!("key {} can be retired", plan.key.key_id);
            } else {
                println!("key {} cannot be retired yet:", plan.key.key_id);
                for blocker in &plan.blockers {
                    println!("  - {blocker}");
                }
            }
            println!("next:");
            for step in &plan.next_steps {
                println!("  - {step}");
            }
            return Ok(if plan.blockers.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        KeysCommand::Retire {
            key_id,
            force,
            dry_run: false,
        } => {
            let retire = admin.retire_key(&key_id, force);
            let detail = format!("force={force}");
            let retirement =
                audited(&audit, "cli/keys retire", Some(&key_id), detail, retire).await?;
            if let (Some(audit), false) = (&audit, retirement.overridden.is_empty()) {
                // A forced retirement says exactly what it overrode.
                let detail = format!("overridden: {}", retirement.overridden.join("; "));
                if let Err(err) =
                    audit.record("cli/keys retire", Some(&key_id), "forced", Some(detail))
                {
                    tracing::warn!(error = %err, "audit event of a forced retirement lost");
                }
            }
            print_keys(&[retirement.key]);
            for overridden in &retirement.overridden {
                tracing::warn!(key_id = %key_id, %overridden, "forced retirement overrode a blocker");
                println!("warning: retired with --force although {overridden}");
            }
        }
        KeysCommand::Usage => {
            let now = chrono::Utc::now();
            println!(
                "{:<20}  {:<8}  {:<16}  {:>10}  OLDEST",
                "KEY_ID", "STATUS", "TARGET", "ROWS"
            );
            for report in admin.key_usage().await? {
                let (name, status) = match (&report.key, &report.key_record_id) {
                    (Some(key), _) => (key.key_id.clone(), key.status.to_string()),
                    (None, None) => ("(legacy)".to_owned(), "-".to_owned()),
                    (None, Some(id)) => (id.clone(), "unknown".to_owned()),
                };
                for usage in &report.targets {
                    let oldest = usage.oldest_written_at.map_or("-".to_owned(), |t| {
                        format!("{} ({}s ago)", t.to_rfc3339(), (now - t).num_seconds())
                    });
                    println!(
                        "{name:<20}  {status:<8}  {:<16}  {:>10}  {oldest}",
                        usage.target, usage.rows
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_replicas(replicas: &[ReplicaRecord], catalog: &Catalog, version: i64) {
    let now = chrono::Utc::now();
    let name = |id: &str| catalog.get(id).map_or(id.to_owned(), |k| k.key_id.clone());
    println!("catalog version {version}");
    println!(
        "{:<20}  {:<6}  {:<5}  {:<24}  {:>7}  {:>9}  {:<20}  KEYS",
        "ID", "KIND", "LIVE", "HOST / LISTEN", "CATALOG", "HEARTBEAT", "ACTIVE KEY"
    );
    for r in replicas {
        let keys: Vec<String> = r
            .key_readiness
            .iter()
            .map(|(id, err)| match err {
                None => format!("{} ok", name(id)),
                Some(reason) => format!("{} NOT READY ({reason})", name(id)),
            })
            .collect();
        println!(
            "{:<20}  {:<6}  {:<5}  {:<24}  {:>7}  {:>8}s  {:<20}  {}",
            r.id,
            r.kind.as_str(),
            if r.is_live(now) { "yes" } else { "no" },
            match &r.listen {
                Some(listen) => format!("{}/{listen}", r.host),
                None => r.host.clone(),
            },
            r.catalog_version,
            (now - r.heartbeat_at).num_seconds(),
            r.active_key_id.as_deref().map(name).unwrap_or_default(),
            keys.join(", ")
        );
    }
}

fn print_keys(keys: &[KeyRecord]) {
    println!(
        "{:<36}  {:<20}  {:<8}  {:<8}  {:<40}  ALIAS",
        "ID", "KEY_ID", "STATUS", "PROVIDER", "KMS_KEY_ARN"
    );
    for k in keys {
        println!(
            "{:<36}  {:<20}  {:<8}  {:<8}  {:<40}  {}",
            k.id,
            k.key_id,
            k.status,
            k.provider,
            k.kms_key_arn,
            k.alias.as_deref().unwrap_or("")
        );
    }
}

async fn legacy_encrypt(global: &GlobalArgs, args: LegacyArgs) -> anyhow::Result<ExitCode> {
    let Some(master) = master_secrets(global)? else {
        bail!(ConfigError(
            "legacy-encrypt needs the master secret: set ENCRYPTION_MASTER_KEY".into()
        ));
    };
    let mut plaintext = zeroize::Zeroizing::new(Vec::new());
    std::io::stdin().read_to_end(&mut plaintext)?;
    if plaintext.is_empty() {
        bail!("no plaintext on standard input");
    }
    let (iv, ciphertext) = encrypt_legacy(&master.current, &plaintext);
    let store = crate::store::Store::connect(&global.database_url).await?;
    store.migrate().await?;
    store
        .write_legacy_connection(&args.connection_id, args.name.as_deref(), &ciphertext, &iv)
        .await?;
    println!("{}", args.connection_id);
    Ok(ExitCode::SUCCESS)
}

async fn rotate(global: &GlobalArgs, cmd: RotateCommand) -> anyhow::Result<ExitCode> {
    let changes = matches!(
        cmd,
        RotateCommand::Start { .. } | RotateCommand::Cancel { .. } | RotateCommand::Requeue { .. }
    );
    let audit = operator_audit_if(global, changes)?;
    let services = open(global).await?;
    let rotations = &services.rotations;
    match cmd {
        RotateCommand::Start {
            target,
            mode,
            dry_run,
            batch_size,
            max_rows_per_second,
            watch,
        } => {
            let target = target.unwrap_or_default();
            let detail = format!("mode={mode:?} dry_run={dry_run}");
            let start = rotations.start(StartRotation {
                target: target.clone(),
                mode: Some(match mode {
                    RotateMode::Reencrypt => Mode::Reencrypt,
                    RotateMode::Rewrap => Mode::Rewrap,
                }),
                dry_run,
                batch_size,
                max_rows_per_second,
            });
            let key_id = Some(target.as_str()).filter(|t| !t.is_empty());
            let job = audited(&audit, "cli/rotate start", key_id, detail, start).await?;
            println!("Rotation job started: {}", job.id);
            if watch {
                return watch_job(rotations, &job.id).await;
            }
            Ok(ExitCode::SUCCESS)
        }
        RotateCommand::Watch { job_id } => watch_job(rotations, &job_id).await,
        RotateCommand::Status { job_id } => {
            print_jobs(&[rotations.get(&job_id).await?]);
            Ok(ExitCode::SUCCESS)
        }
        RotateCommand::List { limit } => {
            print_jobs(&rotations.list(limit).await?);
            Ok(ExitCode::SUCCESS)
        }
        RotateCommand::Cancel { job_id } => {
            let cancel = rotations.cancel(&job_id);
            let job = audited(
                &audit,
                "cli/rotate cancel",
                None,
                format!("job_id={job_id}"),
                cancel,
            );
            print_jobs(&[job.await?]);
            Ok(ExitCode::SUCCESS)
        }
        RotateCommand::Requeue { job_id } => {
            let requeue = rotations.requeue(&job_id);
            let job = audited(
                &audit,
                "cli/rotate requeue",
                None,
                format!("job_id={job_id}"),
                requeue,
            );
            print_jobs(&[job.await?]);
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// A live progress bar until the job ends; the exit status says whether
/// it completed cleanly.
async fn watch_job(rotations: &Rotations, job_id: &str) -> anyhow::Result<ExitCode> {
    use futures::StreamExt;
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} [{bar:40}] {pos}/{len} rows  {msg}")?
            .progress_chars("=> "),
    );
    let mut events = Box::pin(rotations.watch(job_id).await?);
    let mut last = None;
    while let Some(event) = events.next().await {
        let progress = event?;
        let job = &progress.job;
        bar.set_length(job.counts.total.max(job.counts.processed).max(0) as u64);
        bar.set_position(job.counts.processed.max(0) as u64);
        let eta = progress
            .eta_seconds
            .map(|s| format!("eta {s:.0}s"))
            .unwrap_or_else(|| "eta -".into());
        bar.set_message(format!(
            "{} pass {}  {:.0} rows/s  {eta}  failed {}",
            job.status, job.pass, progress.rows_per_second, job.counts.failed
        ));
        last = Some(progress);
    }
    bar.finish();
    let Some(last) = last else {
        bail!("the watch ended without an event");
    };
    let job = last.job;
    println!(
        "job {}: {} — total {}, processed {}, succeeded {}, failed {}, skipped {}, late {}{}",
        job.id,
        job.status,
        job.counts.total,
        job.counts.processed,
        job.counts.succeeded,
        job.counts.failed,
        job.counts.skipped,
        job.counts.late,
        job.last_error
            .map(|e| format!("; last error: {e}"))
            .unwrap_or_default()
    );
    Ok(if job.status == JobStatus::Completed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_jobs(jobs: &[RotationJob]) {
    println!(
        "{:<36}  {:<22}  {:<9}  {:>4}  {:>8}  {:>9}  {:>8}  {:>7}  {:>7}  {:>5}  LAST_ERROR",
        "ID",
        "STATUS",
        "MODE",
        "PASS",
        "TOTAL",
        "PROCESSED",
        "SUCCEEDED",
        "FAILED",
        "SKIPPED",
        "LATE"
    );
    for j in jobs {
        println!(
            "{:<36}  {:<22}  {:<9}  {:>4}  {:>8}  {:>9}  {:>8}  {:>7}  {:>7}  {:>5}  {}",
            j.id,
            format!("{}{}", j.status, if j.dry_run { " (dry run)" } else { "" }),
            j.mode.as_str(),
            j.pass,
            j.counts.total,
            j.counts.processed,
            j.counts.succeeded,
            j.counts.failed,
            j.counts.skipped,
            j.counts.late,
            j.last_error.as_deref().unwrap_or("")
        );
    }
}

/// A database URL without its password, for logs.
fn redact_url(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let mut out = match (base.find("://"), base.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &base[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}://{}:***@{}", &base[..scheme], user, &base[at + 1..])
        }
        _ => base.to_owned(),
    };
    // libpq also takes the password as a parameter (`?password=…`).
    if let Some(query) = query {
        let params: Vec<String> = query
            .split('&')
            .map(|param| match param.split_once('=') {
                Some((name, _)) if name.eq_ignore_ascii_case("password") => format!("{name}=***"),
                _ => param.to_owned(),
            })
            .collect();
        out.push('?');
        out.push_str(&params.join("&"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact_url("postgres://u:pw@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact_url("sqlite://keyward.db"), "sqlite://keyward.db");
        assert_eq!(
            redact_url("postgres://h/db?sslmode=require&password=pw"),
            "postgres://h/db?sslmode=require&password=***"
        );
        assert_eq!(
            redact_url("postgres://u:p@ss@h/db?PASSWORD=x"),
            "postgres://u:***@h/db?PASSWORD=***"
        );
    }

    #[test]
    fn cli_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
