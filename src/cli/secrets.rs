//! Master secrets and the files that hold key material: reading them from
//! the environment or a file, `serve --dev`'s generated secret, the
//! application's legacy format (how its legacy key derived from them), and
//! the warnings about files others can read.

use std::{io::Write, path::Path};

use anyhow::Context as _;
use clap::{Args, ValueEnum};

use super::{ConfigError, GlobalArgs};
use crate::{
    config::{dev_master_key_path, MasterSecrets},
    crypto::{
        legacy::{LegacyFormat, LegacyKdf, LegacyLayout, DEFAULT_INFO},
        secret::MasterSecret,
    },
};

/// How the application encrypted its credentials before keyward (the
/// legacy format), for a platform whose scheme is not keyward's default.
#[derive(Debug, Args)]
#[command(next_help_heading = "Legacy format")]
pub(super) struct LegacyFormatArgs {
    /// How the legacy key derives from the master secret [default:
    /// hkdf-sha256]. Given any --legacy-* flag, the format is recorded in
    /// the database for every process; given none, the recorded one holds.
    #[arg(long, env = "KEYWARD_LEGACY_KDF", value_enum, global = true)]
    legacy_kdf: Option<KdfName>,
    /// HKDF salt of the legacy key [default: none].
    #[arg(long, env = "KEYWARD_LEGACY_KDF_SALT", global = true)]
    legacy_kdf_salt: Option<String>,
    /// HKDF info string of the legacy key [default: connections:credentials].
    #[arg(long, env = "KEYWARD_LEGACY_KDF_INFO", global = true)]
    legacy_kdf_info: Option<String>,
    /// Where a legacy ciphertext's IV and tag are: the IV in
    /// credentials_iv (separate), or both in encrypted_credentials
    /// [default: separate].
    #[arg(long, env = "KEYWARD_LEGACY_LAYOUT", value_enum, global = true)]
    legacy_layout: Option<LayoutName>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum KdfName {
    /// HKDF-SHA256 with --legacy-kdf-salt and --legacy-kdf-info.
    HkdfSha256,
    /// SHA-256 of the master secret.
    Sha256,
    /// The master secret is the key, as 64 hex digits.
    RawHex,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LayoutName {
    /// IV in credentials_iv; ciphertext and tag in encrypted_credentials.
    Separate,
    /// IV, ciphertext, tag in encrypted_credentials.
    IvCiphertextTag,
    /// IV, tag, ciphertext in encrypted_credentials (Node's usual concat).
    IvTagCiphertext,
}

impl LegacyFormatArgs {
    /// The format these flags give; `None` when none is given (the
    /// database's record holds).
    pub(super) fn format(&self) -> Option<LegacyFormat> {
        let given = self.legacy_kdf.is_some()
            || self.legacy_kdf_salt.is_some()
            || self.legacy_kdf_info.is_some()
            || self.legacy_layout.is_some();
        given.then(|| LegacyFormat {
            kdf: match self.legacy_kdf.unwrap_or(KdfName::HkdfSha256) {
                KdfName::HkdfSha256 => LegacyKdf::HkdfSha256 {
                    salt: self.legacy_kdf_salt.clone().unwrap_or_default(),
                    info: self
                        .legacy_kdf_info
                        .clone()
                        .unwrap_or_else(|| DEFAULT_INFO.to_owned()),
                },
                KdfName::Sha256 => LegacyKdf::Sha256,
                KdfName::RawHex => LegacyKdf::RawHex,
            },
            layout: match self.legacy_layout.unwrap_or(LayoutName::Separate) {
                LayoutName::Separate => LegacyLayout::Separate,
                LayoutName::IvCiphertextTag => LegacyLayout::IvCiphertextTag,
                LayoutName::IvTagCiphertext => LegacyLayout::IvTagCiphertext,
            },
        })
    }
}

/// The configured master secrets, from the environment or a file.
pub(super) fn master_secrets(global: &GlobalArgs) -> anyhow::Result<Option<MasterSecrets>> {
    let from_env = ["ENCRYPTION_MASTER_KEY", "LOCAL_KMS_SECRET"]
        .iter()
        .find_map(|name| std::env::var(name).ok().filter(|v| !v.trim().is_empty()));
    // A flag wins over the environment (and `.env`), as for every setting.
    let current = match (&global.master_key_file, from_env) {
        (Some(path), _) => Some(read_secret_file(path)?),
        (None, from_env) => from_env,
    };
    let previous: Vec<String> = std::env::var("ENCRYPTION_MASTER_KEY_PREVIOUS")
        .map(|v| v.split(',').map(str::to_owned).collect())
        .unwrap_or_default();
    let secrets = current
        .map(|c| MasterSecrets::parse(&c, &previous))
        .transpose()
        .map_err(|e| ConfigError(format!("master secret: {e}")))?;
    Ok(secrets.map(|secrets| MasterSecrets {
        legacy: global.legacy.format(),
        ..secrets
    }))
}

pub(super) fn read_secret_file(path: &Path) -> anyhow::Result<String> {
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

/// Warns when a file holding key material can be read by users other than
/// its owner (group or world bits set): keyward cannot fix that for the
/// operator, but must not accept it silently.
pub(super) fn warn_if_others_can_read(path: &Path, what: &str) {
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
pub(super) fn warn_about_dot_env() {
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
pub(super) async fn dev_master_secret(database_url: &str) -> anyhow::Result<MasterSecrets> {
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

pub(super) fn write_private_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(contents)?;
    file.write_all(b"\n")
}
