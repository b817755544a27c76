//! Typed settings for the server, built by the CLI from flags and the
//! environment. Secrets are read from the environment or a file only, never
//! from flags (which `ps` would show).

use std::{net::SocketAddr, path::Path, time::Duration};

use crate::{
    auth::{audit::AuditSettings, AuthSettings},
    crypto::{
        cache::CacheSettings,
        kms::AwsKmsSettings,
        legacy::LegacyFormat,
        secret::{MasterSecret, WeakMasterSecret},
    },
    rotation::{
        definition::ListError,
        target::{RotationTarget, TargetError},
        worker::WorkerOptions,
    },
    service::crypto::Limits,
};

/// The local KMS's master secrets: `current` wraps new data keys; all of
/// them unwrap (runbook §2: a new secret is rolled out beside the old).
/// With them, how the application's legacy key derived from them.
#[derive(Debug, Clone)]
pub struct MasterSecrets {
    pub current: MasterSecret,
    pub previous: Vec<MasterSecret>,
    /// The application's legacy scheme as this process was given it
    /// (`--legacy-*`); `None`: the one the database records, else
    /// keyward's documented default (`service::legacy_format`).
    pub legacy: Option<LegacyFormat>,
}

impl MasterSecrets {
    /// Every secret, current first.
    pub fn all(&self) -> impl Iterator<Item = &MasterSecret> {
        std::iter::once(&self.current).chain(&self.previous)
    }

    /// Parses the current secret and the previous ones.
    pub fn parse(current: &str, previous: &[String]) -> Result<Self, WeakMasterSecret> {
        Ok(Self {
            current: MasterSecret::new(current.trim())?,
            previous: previous
                .iter()
                .map(|p| p.trim())
                .filter(|p| !p.is_empty())
                .map(MasterSecret::new)
                .collect::<Result<_, _>>()?,
            legacy: None,
        })
    }
}

/// KMS providers other than the local one, and the data-key cache.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KmsSettings {
    pub aws: AwsKmsSettings,
    /// The HSM of `pkcs11` keys, if this process has one.
    pub pkcs11: Option<crate::crypto::kms::Pkcs11Settings>,
    pub cache: CacheSettings,
}

/// TLS for the gRPC server (rustls). With `client_ca`, clients may present
/// certificates signed by it (mutual TLS); their subject CN maps to a
/// principal through `AuthSettings::cert_principals`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    pub client_ca: Option<std::path::PathBuf>,
}

/// Everything `Application::build` needs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `sqlite://PATH` or `postgres://…`.
    pub database_url: String,
    /// Address to serve gRPC on.
    pub listen: SocketAddr,
    /// Address to serve Prometheus metrics on (`None`: no metrics).
    pub metrics_listen: Option<SocketAddr>,
    /// The local KMS's secrets; `None` disables the local provider and the
    /// legacy format.
    pub master: Option<MasterSecrets>,
    /// AWS KMS and the data-key cache.
    pub kms: KmsSettings,
    pub limits: Limits,
    /// Largest gRPC request message accepted.
    pub max_request_bytes: usize,
    /// Most concurrent HTTP/2 streams (RPCs) per connection.
    pub max_concurrent_streams: u32,
    /// When a connection that does nothing is closed, and how long a
    /// request body may take to arrive.
    pub idle: crate::idle::IdleLimits,
    /// HTTP/2 keepalive: a ping this often, the connection closed when one
    /// is not answered within `http2_keepalive_timeout`.
    pub http2_keepalive: Duration,
    pub http2_keepalive_timeout: Duration,
    /// Browser origins allowed to call over gRPC-Web (CORS); empty: none
    /// (same-origin pages and non-browser clients need no entry).
    pub cors_allowed_origins: Vec<String>,
    /// A directory of static files (the built rotation dashboard) served
    /// for GET requests that are not gRPC calls.
    pub dashboard_dir: Option<std::path::PathBuf>,
    /// Files holding secrets this process read (a `--master-key-file`):
    /// never served, whatever `dashboard_dir` says.
    pub secret_files: Vec<std::path::PathBuf>,
    /// Who may call, and the per-principal rate limit.
    pub auth: AuthSettings,
    /// Where audit events go.
    pub audit: AuditSettings,
    /// TLS, or plaintext when `None`.
    pub tls: Option<TlsSettings>,
    /// How often the key catalog is reloaded from the database.
    pub catalog_refresh_interval: Duration,
    /// Heartbeat and catalog-version polling (`service::replica`).
    pub replica: crate::service::replica::ReplicaOptions,
    /// How long in-flight RPCs may take to finish after a shutdown signal.
    pub shutdown_grace: Duration,
    /// `serve --dev`: seed an active local key when there is none.
    pub seed_dev_key: bool,
    /// Run a rotation worker in-process (`None`: `--no-worker`).
    pub worker: Option<WorkerOptions>,
    /// Tables of secrets rotated after `connections`.
    pub rotation_targets: Vec<RotationTarget>,
}

/// Where `keyward serve` listens by default.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";
/// How often the whole key catalog is reloaded by default.
pub const DEFAULT_CATALOG_REFRESH: Duration = Duration::from_secs(30);
/// How long in-flight work may run after a shutdown signal by default.
/// HTTP/2 keepalive ping interval and its answer's timeout.
pub const DEFAULT_HTTP2_KEEPALIVE: Duration = Duration::from_secs(30);
pub const DEFAULT_HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Most concurrent RPCs per HTTP/2 connection by default.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 256;

/// The largest gRPC request message `keyward serve` accepts by default.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 16 * 1024 * 1024;

impl Settings {
    /// Defaults for a given database, listening on a random loopback port
    /// (tests and the in-process benchmark start from here).
    pub fn for_database(database_url: impl Into<String>, master: Option<MasterSecrets>) -> Self {
        Self {
            database_url: database_url.into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            metrics_listen: None,
            master,
            kms: KmsSettings::default(),
            limits: Limits::default(),
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            idle: crate::idle::IdleLimits::default(),
            http2_keepalive: DEFAULT_HTTP2_KEEPALIVE,
            http2_keepalive_timeout: DEFAULT_HTTP2_KEEPALIVE_TIMEOUT,
            cors_allowed_origins: Vec::new(),
            dashboard_dir: None,
            secret_files: Vec::new(),
            auth: AuthSettings::default(),
            audit: AuditSettings::default(),
            tls: None,
            catalog_refresh_interval: DEFAULT_CATALOG_REFRESH,
            replica: crate::service::replica::ReplicaOptions::default(),
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            seed_dev_key: false,
            worker: Some(WorkerOptions::default()),
            rotation_targets: Vec::new(),
        }
    }
}

/// Why a `--rotation-targets` file was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TargetsFileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a valid rotation target list: {source}")]
    Parse {
        path: String,
        source: serde_json::Error,
    },
    #[error("{path}: {source}")]
    Invalid { path: String, source: TargetError },
}

/// Reads rotation targets from a JSON file (a list of
/// [`crate::rotation::definition::TargetDefinition`]s): the list a
/// database is seeded with, or checked against.
pub fn load_rotation_targets(path: &Path) -> Result<Vec<RotationTarget>, TargetsFileError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| TargetsFileError::Read {
        path: name.clone(),
        source,
    })?;
    crate::rotation::definition::parse_list(&text).map_err(|err| match err {
        ListError::Json(source) => TargetsFileError::Parse { path: name, source },
        ListError::Target(source) => TargetsFileError::Invalid { path: name, source },
    })
}

/// Where `serve --dev` keeps its generated master secret: beside a SQLite
/// database file, else in the working directory.
pub fn dev_master_key_path(database_url: &str) -> std::path::PathBuf {
    const FILE: &str = "keyward.master.key";
    match sqlite_path(database_url) {
        Some(db) => db
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(|p| p.join(FILE))
            .unwrap_or_else(|| FILE.into()),
        None => FILE.into(),
    }
}

/// The file of a `sqlite:` database URL (`None` for another database or
/// an in-memory one).
pub fn sqlite_path(database_url: &str) -> Option<std::path::PathBuf> {
    database_url
        .strip_prefix("sqlite://")
        .or_else(|| database_url.strip_prefix("sqlite:"))
        .map(|rest| rest.split('?').next().unwrap_or(rest))
        .filter(|db| !db.is_empty() && *db != ":memory:")
        .map(std::path::PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rotation::target::Encoding;

    #[test]
    fn a_targets_file_declares_encodings_and_only_that_for_connections() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("targets.json");
        let load = |json: &str| {
            std::fs::write(&path, json).unwrap();
            load_rotation_targets(&path)
        };
        let targets = load(
            r#"[{"table": "connections", "encoding": "base64"},
                {"table": "api_tokens", "context": {"token_id": "id"}, "encoding": "hex"}]"#,
        )
        .unwrap();
        let encodings: Vec<(&str, Encoding)> = targets
            .iter()
            .map(|t| (t.table.as_str(), t.encoding))
            .collect();
        assert_eq!(
            encodings,
            [
                ("connections", Encoding::Base64),
                ("api_tokens", Encoding::Hex)
            ]
        );
        assert!(targets[0].legacy.is_some(), "the runbook's connections");
        let refused = |json: &str| match load(json) {
            Err(TargetsFileError::Invalid { source, .. }) => source,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            refused(r#"[{"table": "connections", "context": {"x": "id"}}]"#),
            TargetError::ConnectionsFixed
        );
        assert_eq!(
            refused(r#"[{"table": "t", "context": {"x": "id"}, "encoding": "b64"}]"#),
            TargetError::BadEncoding("b64".into())
        );
    }

    #[test]
    fn dev_key_sits_beside_the_database() {
        assert_eq!(
            dev_master_key_path("sqlite://keyward.db"),
            Path::new("keyward.master.key")
        );
        assert_eq!(
            dev_master_key_path("sqlite:///var/lib/kw/keyward.db?mode=rwc"),
            Path::new("/var/lib/kw/keyward.master.key")
        );
        assert_eq!(
            dev_master_key_path("postgres://h/db"),
            Path::new("keyward.master.key")
        );
    }

    #[test]
    fn previous_secrets_are_parsed() {
        let m = MasterSecrets::parse(
            "current-secret-123",
            &["old-secret-456789".into(), " ".into()],
        )
        .unwrap();
        assert_eq!(m.all().count(), 2);
        assert!(MasterSecrets::parse("short", &[]).is_err());
    }
}
