//! The `keyward` command line: the binary's edge, where `anyhow` is used.
//!
//! Every flag can also be set from the environment (`env = …`), and those
//! of `serve` and `worker` from a TOML file (`--config`, see
//! [`config_file`]); precedence: flag > environment > file > default. Secrets are
//! read from the environment or a file only: `ENCRYPTION_MASTER_KEY`
//! (fallback `LOCAL_KMS_SECRET`), `ENCRYPTION_MASTER_KEY_PREVIOUS`
//! (comma-separated), or `--master-key-file`.
//!
//! Operator commands other than `serve` work on the database
//! directly, like the runbook's scripts; a running server picks their
//! changes up on its catalog refresh timer or on `RefreshKeyMetadata`.
//!
//! Layout (cargo's `commands/` and mini-redis's `cmd/`): this file holds the
//! global flags, the [`Command`] enum and the dispatcher; each command
//! family owns its `Args` and its `run` in a file of its own — `serve`,
//! `worker` (with the worker and replica flags `serve` shares), `keys`
//! (`seed-key`, `keys`, `replicas`, `self-test`), `migrate`, `rotate` (with
//! `prune-tokens`), `token`, `legacy`, `master` (`master-secret`);
//! `secrets` reads master secrets and
//! checks key files; `audit` writes the operator commands' audit events;
//! `config_file` turns `--config` into flags.

mod audit;
mod config_file;
mod hsm;
mod keys;
mod legacy;
mod master;
mod migrate;
mod rotate;
mod secrets;
mod serve;
mod targets;
mod token;
mod worker;

use std::{ffi::OsString, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use tracing_subscriber::{fmt, EnvFilter};

use self::secrets::master_secrets;
use crate::{
    app::Services,
    auth::audit::{AuditSettings, AuditSink},
    config::{load_rotation_targets, KmsSettings},
    crypto::{cache::CacheSettings, kms::AwsKmsSettings},
    rotation::target::RotationTarget,
    service::crypto::Limits,
};

/// A duration in whole milliseconds, as the `…_ms` flags take it.
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

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
    /// JSON file of rotation targets: seeds the database's list when it is
    /// empty; otherwise it must agree with it, or the process refuses to
    /// start (keyward targets list).
    #[arg(long, env = "KEYWARD_ROTATION_TARGETS", global = true)]
    rotation_targets: Option<PathBuf>,
    /// Log format.
    #[arg(long, env = "KEYWARD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    /// Log at INFO as `serve` and `worker` do; other commands log only
    /// warnings and errors by default, so their output is what was asked
    /// for (`RUST_LOG` overrides both).
    #[arg(short, long, env = "KEYWARD_VERBOSE", global = true, value_parser = clap::builder::BoolishValueParser::new())]
    verbose: bool,
    #[command(flatten)]
    aws: AwsArgs,
    #[command(flatten)]
    pkcs11: hsm::Pkcs11Args,
    #[command(flatten)]
    audit: AuditArgs,
    #[command(flatten)]
    legacy: secrets::LegacyFormatArgs,
}

/// The audit log: `serve`'s calls and the operator commands that change
/// keys, rotations or tokens write to the same sink.
#[derive(Debug, Args)]
struct AuditArgs {
    /// Audit log: `-` for standard output (`serve`; other commands use
    /// standard error, their output being on standard output), a file path
    /// (appended), or `off`. Unset: `serve` writes to standard output, the
    /// commands that change keys, rotations or tokens append to
    /// $XDG_STATE_HOME/keyward/audit.log (~/.local/state/…), and say so.
    #[arg(long, env = "KEYWARD_AUDIT_LOG", global = true)]
    audit_log: Option<String>,
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
    /// The settings, with `-` meaning `dash` and no `--audit-log` at all
    /// meaning `unset`.
    fn settings(&self, dash: AuditSink, unset: impl FnOnce() -> AuditSink) -> AuditSettings {
        AuditSettings {
            sink: match self.audit_log.as_deref() {
                None => unset(),
                Some("-") => dash,
                Some("off" | "") => AuditSink::Off,
                Some(path) => AuditSink::File(PathBuf::from(path)),
            },
            fail_closed: !self.audit_fail_open,
            file_mode: self.audit_file_mode,
        }
    }
}

/// AWS KMS: used by every command that opens the key catalog.
#[derive(Debug, Args)]
struct AwsArgs {
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
        default_value_t = crate::crypto::kms::AwsKmsSettings::default().max_attempts,
        global = true
    )]
    aws_kms_max_attempts: u32,
    /// Backoff before the first KMS retry, in ms (doubles per retry).
    #[arg(
        long,
        env = "KEYWARD_AWS_KMS_INITIAL_BACKOFF_MS",
        default_value_t = millis(crate::crypto::kms::AwsKmsSettings::default().initial_backoff),
        global = true
    )]
    aws_kms_initial_backoff_ms: u64,
    /// KMS connect timeout, in ms.
    #[arg(
        long,
        env = "KEYWARD_AWS_KMS_CONNECT_TIMEOUT_MS",
        default_value_t = millis(crate::crypto::kms::AwsKmsSettings::default().connect_timeout),
        global = true
    )]
    aws_kms_connect_timeout_ms: u64,
    /// Timeout of one KMS attempt, in ms.
    #[arg(
        long,
        env = "KEYWARD_AWS_KMS_ATTEMPT_TIMEOUT_MS",
        default_value_t = millis(crate::crypto::kms::AwsKmsSettings::default().attempt_timeout),
        global = true
    )]
    aws_kms_attempt_timeout_ms: u64,
    /// Timeout of a whole KMS call with its retries, in ms.
    #[arg(
        long,
        env = "KEYWARD_AWS_KMS_TIMEOUT_MS",
        default_value_t = millis(crate::crypto::kms::AwsKmsSettings::default().operation_timeout),
        global = true
    )]
    aws_kms_timeout_ms: u64,
}

impl AwsArgs {
    fn settings(&self) -> AwsKmsSettings {
        let ms = Duration::from_millis;
        AwsKmsSettings {
            region: self.aws_region.clone().filter(|r| !r.is_empty()),
            endpoint: self.aws_kms_endpoint.clone().filter(|e| !e.is_empty()),
            max_attempts: self.aws_kms_max_attempts.max(1),
            initial_backoff: ms(self.aws_kms_initial_backoff_ms),
            connect_timeout: ms(self.aws_kms_connect_timeout_ms),
            attempt_timeout: ms(self.aws_kms_attempt_timeout_ms),
            operation_timeout: ms(self.aws_kms_timeout_ms),
        }
    }
}

impl GlobalArgs {
    /// The HSM of pkcs11 keys, if configured.
    fn pkcs11_settings(&self) -> anyhow::Result<Option<crate::crypto::kms::Pkcs11Settings>> {
        self.pkcs11.settings()
    }

    /// The KMS settings of a command: AWS and PKCS#11 as configured, and
    /// `cache` (commands that serve no API call keep the defaults: only
    /// `serve`'s API path uses the cache; rotation and the self-test
    /// bypass it).
    fn kms_settings(&self, cache: CacheSettings) -> anyhow::Result<KmsSettings> {
        Ok(KmsSettings {
            aws: self.aws.settings(),
            pkcs11: self.pkcs11_settings()?,
            cache,
        })
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
    Serve(Box<serve::ServeArgs>),
    /// Apply database migrations and exit; on an application's existing
    /// database, adopt it first (--dry-run prints what that takes).
    Migrate(migrate::MigrateArgs),
    /// Upsert the active key (the runbook's `npm run seed:encryption-key`).
    SeedKey(keys::SeedArgs),
    /// List, create, activate or retire key records.
    #[command(subcommand)]
    Keys(keys::KeysCommand),
    /// See the keyward processes (serve replicas, workers) on this database.
    #[command(subcommand)]
    Replicas(keys::ReplicasCommand),
    /// Round-trip every non-retired key through its KMS; exit 0 only if all pass.
    SelfTest,
    /// Write a connections row the way the pre-keyward application did
    /// (legacy format; plaintext read from stdin). A fixture generator.
    LegacyEncrypt(legacy::LegacyArgs),
    /// Clear the legacy copies once the old application pods are gone.
    #[command(subcommand)]
    Legacy(legacy::LegacyCommand),
    /// Where a master-secret rollover stands (runbook §2.1): which secret
    /// wraps, what still needs the previous one, when it may be removed.
    #[command(subcommand)]
    MasterSecret(master::MasterSecretCommand),
    /// Run the rotation worker alone (the runbook's `npm run start:rotation`).
    Worker(worker::StandaloneWorkerArgs),
    /// Start, watch, inspect, cancel or requeue re-encryption jobs.
    #[command(subcommand)]
    Rotate(rotate::RotateCommand),
    /// Remove expired or used connection_scoped_tokens (--dry-run: list
    /// them for review and remove nothing).
    PruneTokens(rotate::PruneArgs),
    /// Create, list or revoke the bearer tokens callers authenticate with.
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// List, add or remove the rotation targets (the tables of secrets
    /// rotation walks), kept in the database for every process.
    #[command(subcommand)]
    Targets(targets::TargetsCommand),
    /// Print a commented configuration file listing every setting with its
    /// default (the repository's keyward.example.toml).
    ConfigExample,
}

/// Parses arguments, runs the command on a Tokio runtime, maps the outcome
/// to an exit status.
pub fn main() -> ExitCode {
    // The runbook's services read `.env` in their working directory; so
    // does keyward, before anything reads the environment. Variables the
    // environment already has win, and flags win over both.
    let dot_env = dotenvy::from_path(".env");
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
    let level = if cli.global.verbose || cli.command.is_service() {
        "info"
    } else {
        "warn"
    };
    init_logging(cli.global.log_format, level);
    report_dot_env(dot_env);
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
            if err.downcast_ref::<ConfigError>().is_some() || disagrees_with_database(&err) {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Whether the process refused to start because its configuration (a
/// `--rotation-targets` file, `--legacy-*` flags) disagrees with the
/// database: a usage error.
fn disagrees_with_database(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<crate::error::Error>(),
            Some(
                crate::error::Error::TargetsDiffer(_)
                    | crate::error::Error::LegacyFormatDiffers { .. }
            )
        )
    })
}

/// Says why `.env` was not (wholly) read, never what it holds: a parse
/// error's text would quote the line, which may be a master secret.
fn report_dot_env(loaded: dotenvy::Result<()>) {
    match loaded {
        Ok(_) => {}
        Err(err) if err.not_found() => {}
        Err(dotenvy::Error::Io(err)) => tracing::warn!(error = %err, "cannot read .env"),
        Err(_) => tracing::warn!(
            "a line of .env cannot be parsed (KEY=VALUE expected): it and the lines after it were not read"
        ),
    }
}

impl Command {
    /// A long-running process whose log is its output (`serve`, `worker`),
    /// rather than a command that prints an answer.
    fn is_service(&self) -> bool {
        matches!(self, Command::Serve(_) | Command::Worker(_))
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

/// Logs to stderr, filtered by `RUST_LOG`, else at `level`.
fn init_logging(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
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
        Command::Serve(args) => serve::serve(&global, *args).await,
        Command::Migrate(args) => migrate::migrate(&global, args).await,
        Command::SeedKey(args) => keys::seed_key(&global, args).await,
        Command::Keys(cmd) => keys::keys(&global, cmd).await,
        Command::Replicas(cmd) => keys::replicas(&global, cmd).await,
        Command::SelfTest => keys::self_test(&global).await,
        Command::LegacyEncrypt(args) => legacy::legacy_encrypt(&global, args).await,
        Command::Legacy(cmd) => legacy::legacy(&global, cmd).await,
        Command::MasterSecret(cmd) => master::master_secret(&global, cmd).await,
        Command::Worker(args) => worker::worker(&global, args).await,
        Command::Rotate(cmd) => rotate::rotate(&global, cmd).await,
        Command::Token(cmd) => token::token(&global, cmd).await,
        Command::Targets(cmd) => targets::targets(&global, cmd).await,
        Command::ConfigExample => {
            print!("{}", config_file::example(&Cli::command()));
            Ok(ExitCode::SUCCESS)
        }
        Command::PruneTokens(args) => rotate::prune_tokens(&global, args).await,
    }
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

/// SIGHUP, from now on delivered here instead of ending the process (its
/// default): `serve` and `worker` reload on it.
fn hangup_signals() -> std::io::Result<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
}

async fn open(global: &GlobalArgs) -> anyhow::Result<Services> {
    let master = master_secrets(global)?;
    Ok(Services::open_with_targets(
        &global.database_url,
        master.as_ref(),
        &global.kms_settings(CacheSettings::default())?,
        Limits::default(),
        rotation_targets(global)?,
    )
    .await?)
}

/// The rotation targets of `--rotation-targets`, if given: they seed the
/// database's list when it is empty and must agree with it otherwise.
fn rotation_targets(global: &GlobalArgs) -> anyhow::Result<Vec<RotationTarget>> {
    match &global.rotation_targets {
        None => Ok(Vec::new()),
        Some(path) => load_rotation_targets(path).map_err(|e| ConfigError(e.to_string()).into()),
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

    /// The README's promise: every global flag and every flag of `serve`
    /// and `worker` (the long-running processes) has an environment
    /// variable. The operator commands' own arguments do not.
    #[test]
    fn every_process_flag_has_an_environment_variable() {
        use clap::CommandFactory;
        let cli = Cli::command();
        let flags = |cmd: &clap::Command| -> Vec<String> {
            cmd.get_arguments()
                .filter(|a| {
                    !a.is_positional() && !matches!(a.get_id().as_str(), "help" | "version")
                })
                .filter(|a| a.get_env().is_none())
                .map(|a| a.get_id().to_string())
                .collect()
        };
        let mut missing = flags(&cli);
        for name in ["serve", "worker"] {
            let sub = cli.find_subcommand(name).expect("the subcommand exists");
            missing.extend(flags(sub).into_iter().map(|f| format!("{name} --{f}")));
        }
        assert!(
            missing.is_empty(),
            "flags without an environment variable: {missing:?}"
        );
    }

    /// Every command a retirement plan tells the operator to run exists
    /// and takes the flags it is given.
    #[test]
    fn the_retirement_plan_names_only_commands_that_exist() {
        use chrono::Utc;

        use crate::{
            keys::{KeyRecord, KeyStatus},
            rotation::RotationJob,
            service::retirement::{commands, plan, RetireFacts},
            store::replicas::{KeyUsage, ReplicaKind, ReplicaRecord},
        };
        let facts = |status| RetireFacts {
            key: KeyRecord::local_for_test("rec-old", "old", status),
            rows: Vec::new(),
            jobs: Vec::new(),
            replicas: Vec::new(),
            active_key_id: Some("new".into()),
            legacy_copies: 0,
            legacy_conflicts: 0,
        };
        let rows = vec![KeyUsage {
            target: "connections".into(),
            key_record_id: Some("rec-old".into()),
            rows: 3,
            oldest_written_at: None,
            legacy_copies: 0,
            legacy_conflicts: 0,
        }];
        let job = RotationJob::running_for_test("job-1", "rec-new");
        let replica = ReplicaRecord {
            id: "r1".into(),
            kind: ReplicaKind::Serve,
            host: "h".into(),
            pid: 1,
            listen: Some("127.0.0.1:50051".into()),
            version: "0".into(),
            started_at: Utc::now(),
            heartbeat_at: Utc::now(),
            expires_at: Utc::now(),
            catalog_version: 1,
            active_key_id: Some("rec-old".into()),
            master_fingerprints: Some(Vec::new()),
            active_since: None,
            key_readiness: Default::default(),
        };
        let plans = [
            plan(facts(KeyStatus::Rotating)),
            plan(facts(KeyStatus::Active)),
            plan(RetireFacts {
                rows: rows.clone(),
                ..facts(KeyStatus::Rotating)
            }),
            plan(RetireFacts {
                rows,
                jobs: vec![job],
                ..facts(KeyStatus::Rotating)
            }),
            plan(RetireFacts {
                replicas: vec![replica],
                legacy_copies: 3,
                legacy_conflicts: 1,
                ..facts(KeyStatus::Rotating)
            }),
        ];
        let named: Vec<String> = plans.iter().flat_map(commands).collect();
        assert!(named.len() >= 8, "{named:?}");
        for line in named {
            let argv: Vec<OsString> = line.split_whitespace().map(OsString::from).collect();
            if let Err(err) = Cli::try_parse_from(argv) {
                panic!("the plan names {line:?}, which keyward refuses:\n{err}");
            }
        }
    }
}
