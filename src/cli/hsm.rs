//! The pkcs11 provider's settings, shared by every command that opens the
//! key catalog: the module, the token and the user PIN (from a file, or
//! `KEYWARD_PKCS11_PIN`; never a flag value, which `ps` would show).

use std::path::PathBuf;

use clap::Args;

use super::{secrets::warn_if_others_can_read, ConfigError};
use crate::crypto::kms::{Pkcs11Pin, Pkcs11Settings};

#[derive(Debug, Args)]
pub(super) struct Pkcs11Args {
    /// PKCS#11 module of the HSM holding pkcs11 keys (e.g.
    /// /usr/lib/softhsm/libsofthsm2.so); loaded on first use.
    #[arg(long, env = "KEYWARD_PKCS11_MODULE", global = true)]
    pkcs11_module: Option<PathBuf>,
    /// Label of the token holding the keys.
    #[arg(long, env = "KEYWARD_PKCS11_TOKEN", global = true)]
    pkcs11_token: Option<String>,
    /// File holding the token's user PIN (or set KEYWARD_PKCS11_PIN).
    #[arg(long, env = "KEYWARD_PKCS11_PIN_FILE", global = true)]
    pkcs11_pin_file: Option<PathBuf>,
    /// PKCS#11 sessions kept open (an HSM serializes each session's work);
    /// default twice the cores.
    #[arg(long, env = "KEYWARD_PKCS11_SESSIONS", global = true)]
    pkcs11_sessions: Option<usize>,
}

impl Pkcs11Args {
    /// `None` without `--pkcs11-module`; with it, the token and a PIN are
    /// required.
    pub(super) fn settings(&self) -> anyhow::Result<Option<Pkcs11Settings>> {
        let Some(module) = self.pkcs11_module.clone() else {
            return Ok(None);
        };
        let token = self
            .pkcs11_token
            .clone()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                ConfigError("--pkcs11-module needs --pkcs11-token (the token's label)".into())
            })?;
        if let Some(path) = &self.pkcs11_pin_file {
            warn_if_others_can_read(path, "PKCS#11 PIN file");
        }
        let pin = Pkcs11Pin::load(self.pkcs11_pin_file.as_deref())
            .map_err(|why| ConfigError(format!("--pkcs11-module: {why}")))?;
        Ok(Some(Pkcs11Settings {
            module,
            token,
            pin,
            sessions: self
                .pkcs11_sessions
                .unwrap_or_else(Pkcs11Settings::default_sessions)
                .max(1),
        }))
    }
}
