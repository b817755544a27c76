//! Key-management providers: where key-encryption keys (KEKs) live and how
//! data keys are wrapped under them. Every provider sits behind
//! [`KmsProvider`]; a key record names its provider and KEK
//! (`encryption_keys.kms_key_arn`).

#[cfg(feature = "aws-kms")]
pub mod aws;
pub mod local;
#[cfg(feature = "pkcs11")]
pub mod pkcs11;
pub mod pkcs11_uri;
mod stats;

pub use stats::{KmsCallStats, KmsOperation};

use std::{fmt, sync::Arc, time::Duration};

use async_trait::async_trait;

use super::{context::EncryptionContext, secret::SecretKey};

/// Which provider holds a key record's KEK.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ProviderKind {
    /// The built-in local KMS: KEKs derived from the master secret.
    Local,
    /// AWS KMS (or a KMS-compatible server) through `aws-sdk-kms`.
    AwsKms,
    /// An HSM (or SoftHSM2) through its PKCS#11 module (`cryptoki`).
    Pkcs11,
}

impl ProviderKind {
    pub const ALL: [ProviderKind; 3] = [
        ProviderKind::Local,
        ProviderKind::AwsKms,
        ProviderKind::Pkcs11,
    ];

    /// The name stored in `encryption_keys.provider`.
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Local => "local",
            ProviderKind::AwsKms => "aws-kms",
            ProviderKind::Pkcs11 => "pkcs11",
        }
    }

    /// Parses a stored or requested provider name.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == name)
    }

    /// The provider a bare `kms_key_arn` implies, for rows inserted by hand
    /// (runbook §1.2 inserts no provider): AWS ARNs, `alias/…` names and
    /// bare AWS key ids are AWS KMS; `pkcs11:…` URIs are PKCS#11; `local:…`
    /// and anything else is local.
    pub fn infer(kms_key_arn: &str) -> Self {
        let arn = kms_key_arn.trim();
        if arn.starts_with("arn:aws") || arn.starts_with("alias/") || looks_like_aws_key_id(arn) {
            ProviderKind::AwsKms
        } else if arn.starts_with("pkcs11:") {
            ProviderKind::Pkcs11
        } else {
            ProviderKind::Local
        }
    }
}

impl fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `pad`, so a width in the format string (the CLI's tables) applies.
        f.pad(self.as_str())
    }
}

/// The forms a new key record's `kms_key_arn` may take, for messages.
pub const ACCEPTED_KEY_REFS: &str =
    "an AWS KMS key ARN (arn:aws:kms:…), an AWS key id, an AWS alias \
     (alias/…), a PKCS#11 URI (pkcs11:token=TOKEN;object=LABEL), or a local \
     key name (local:NAME)";

/// Why a `kms_key_arn` names nothing this build can use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyRefError {
    #[error("{0:?} looks like a {1} key; that provider is not in this build (accepted: {ACCEPTED_KEY_REFS})")]
    OtherProvider(String, &'static str),
    #[error("{0:?} is not a key reference keyward understands; give {ACCEPTED_KEY_REFS}")]
    Unknown(String),
    #[error(
        "{0:?} is not a PKCS#11 key reference keyward can use: {1} (accepted: {ACCEPTED_KEY_REFS})"
    )]
    Pkcs11(String, pkcs11_uri::UriError),
}

/// The provider a new key record's `kms_key_arn` names. Unlike
/// [`ProviderKind::infer`] (for rows already stored, which may name a
/// local key by a bare word), nothing is guessed: a bare word, or another
/// cloud's key name, is refused. Any `arn:aws…:kms:` string is AWS's to
/// judge when the key is first used.
pub fn provider_of_new_key(kms_key_arn: &str) -> Result<ProviderKind, KeyRefError> {
    let arn = kms_key_arn.trim();
    let is_aws_arn = arn.starts_with("arn:aws") && arn.contains(":kms:");
    if is_aws_arn || arn.starts_with("alias/") || looks_like_aws_key_id(arn) {
        return Ok(ProviderKind::AwsKms);
    }
    if arn
        .strip_prefix("local:")
        .is_some_and(|name| !name.trim().is_empty())
    {
        return Ok(ProviderKind::Local);
    }
    if arn.starts_with("pkcs11:") {
        return match pkcs11_uri::KeyUri::parse(arn) {
            Ok(_) => Ok(ProviderKind::Pkcs11),
            Err(err) => Err(KeyRefError::Pkcs11(arn.to_owned(), err)),
        };
    }
    let other = if arn.starts_with("projects/") && arn.contains("/cryptoKeys/") {
        Some("Google Cloud KMS")
    } else if arn.contains(".vault.azure.net/") {
        Some("Azure Key Vault")
    } else if arn.starts_with("vault:") || arn.starts_with("transit/") {
        Some("HashiCorp Vault")
    } else {
        None
    };
    Err(match other {
        Some(provider) => KeyRefError::OtherProvider(arn.to_owned(), provider),
        None => KeyRefError::Unknown(arn.to_owned()),
    })
}

/// AWS key ids are UUIDs (or `mrk-` + 32 hex digits for multi-Region keys).
fn looks_like_aws_key_id(s: &str) -> bool {
    let hex_dash = |s: &str| s.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
    (s.len() == 36 && hex_dash(s) && s.matches('-').count() == 4)
        || (s.len() == 36 && s.starts_with("mrk-") && s[4..].chars().all(|c| c.is_ascii_hexdigit()))
}

/// How keyward talks to AWS KMS. Every field has a flag and an environment
/// variable (see the README's configuration table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsKmsSettings {
    /// Region; `None` takes the standard chain (`AWS_REGION`, profile, IMDS).
    pub region: Option<String>,
    /// Endpoint override, for a KMS-compatible server (moto in the tests).
    pub endpoint: Option<String>,
    /// Attempts per KMS call, the first included (standard retry mode:
    /// exponential backoff with jitter on throttling and transient faults).
    pub max_attempts: u32,
    /// Backoff before the first retry; doubles per retry.
    pub initial_backoff: Duration,
    /// TCP + TLS connect timeout.
    pub connect_timeout: Duration,
    /// Timeout of one attempt.
    pub attempt_timeout: Duration,
    /// Timeout of a whole call, retries included.
    pub operation_timeout: Duration,
}

impl Default for AwsKmsSettings {
    fn default() -> Self {
        Self {
            region: None,
            endpoint: None,
            max_attempts: 3,
            initial_backoff: Duration::from_millis(100),
            connect_timeout: Duration::from_secs(3),
            attempt_timeout: Duration::from_secs(5),
            operation_timeout: Duration::from_secs(15),
        }
    }
}

/// How keyward reaches an HSM: one PKCS#11 module, one token and its user
/// PIN per process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pkcs11Settings {
    /// The module (`/usr/lib/softhsm/libsofthsm2.so`, a vendor's library).
    pub module: std::path::PathBuf,
    /// The token's label.
    pub token: String,
    /// The user PIN (from a file or the environment, never a flag value).
    pub pin: Pkcs11Pin,
    /// Sessions kept open: an HSM serializes the work of one session, so
    /// this bounds how many wraps and unwraps run at once.
    pub sessions: usize,
}

/// A token's user PIN: zeroized on drop, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Pkcs11Pin(zeroize::Zeroizing<String>);

/// The environment variable a PKCS#11 PIN may come from instead of a file.
pub const PKCS11_PIN_ENV: &str = "KEYWARD_PKCS11_PIN";

impl Pkcs11Settings {
    /// Sessions kept open unless configured: twice the cores.
    pub fn default_sessions() -> usize {
        2 * std::thread::available_parallelism().map_or(1, usize::from)
    }
}

impl Pkcs11Pin {
    pub fn new(pin: String) -> Self {
        Self(zeroize::Zeroizing::new(pin))
    }

    /// The PIN in `file` (its line ending dropped), else in
    /// [`PKCS11_PIN_ENV`]; why not, when neither gives one. The message
    /// never holds the PIN.
    pub fn load(file: Option<&std::path::Path>) -> Result<Self, String> {
        match file {
            Some(path) => std::fs::read_to_string(path)
                .map(|pin| Self::new(pin.trim_end_matches(['\n', '\r']).to_owned()))
                .map_err(|e| format!("cannot read PKCS#11 PIN file {}: {e}", path.display())),
            None => std::env::var(PKCS11_PIN_ENV).map(Self::new).map_err(|_| {
                format!("the token's user PIN is needed: --pkcs11-pin-file or {PKCS11_PIN_ENV}")
            }),
        }
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Pkcs11Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pkcs11Pin(<redacted>)")
    }
}

/// The KEK a call is about: the key record and the KMS key it names.
#[derive(Debug, Clone, Copy)]
pub struct KekRef<'a> {
    /// `encryption_keys.id`; the local provider binds it into the wrap.
    pub record_id: &'a str,
    /// `encryption_keys.kms_key_arn`.
    pub kms_key_arn: &'a str,
}

/// A data key as stored: the provider's ciphertext and optional nonce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrappedKey {
    pub ciphertext: Vec<u8>,
    pub iv: Vec<u8>,
}

/// A fresh data key, in plaintext (zeroized on drop) and wrapped.
#[derive(Debug)]
pub struct GeneratedKey {
    pub plaintext: SecretKey,
    pub wrapped: WrappedKey,
}

/// What can go wrong inside a provider. Messages name keys, never data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KmsError {
    /// The wrapped data key did not authenticate under this KEK and context:
    /// a modified ciphertext, a different context, or another key's data.
    #[error("the data key could not be unwrapped: the ciphertext was modified, belongs to another key, or the encryption context differs")]
    UnwrapFailed,
    /// The KMS key exists but is disabled or pending deletion.
    #[error("kms key {key} is disabled; enable it in the KMS or restore the key")]
    KeyDisabled { key: String },
    /// The KMS key does not exist.
    #[error("kms key {key} was not found in the KMS; check encryption_keys.kms_key_arn")]
    KeyNotFound { key: String },
    /// The KMS refused this principal.
    #[error("access to kms key {key} was denied; grant GenerateDataKey and Decrypt on it")]
    AccessDenied { key: String },
    /// The KMS could not be reached or is throttling.
    #[error("kms is unavailable: {reason}")]
    Unavailable { reason: String },
    /// The provider lacks configuration it needs (region, credentials).
    #[error("kms provider {provider} is not configured: {reason}")]
    NotConfigured {
        provider: ProviderKind,
        reason: String,
    },
    /// The key reference is not one this provider understands.
    #[error("invalid kms key reference {key:?}: {reason}")]
    InvalidKeyRef { key: String, reason: &'static str },
}

/// A source of key-encryption keys.
#[async_trait]
pub trait KmsProvider: Send + Sync {
    /// Which provider this is.
    fn kind(&self) -> ProviderKind;

    /// Generates a fresh 256-bit data key and wraps it under `kek`, bound to
    /// `context`.
    async fn generate_data_key(
        &self,
        kek: KekRef<'_>,
        context: &EncryptionContext,
    ) -> Result<GeneratedKey, KmsError>;

    /// Wraps an existing data key under `kek`, bound to `context` (REWRAP
    /// rotation moves a data key to a new KEK this way).
    async fn wrap_data_key(
        &self,
        kek: KekRef<'_>,
        data_key: &SecretKey,
        context: &EncryptionContext,
    ) -> Result<WrappedKey, KmsError>;

    /// Unwraps a data key made by [`Self::generate_data_key`] under the same
    /// KEK and context.
    async fn decrypt_data_key(
        &self,
        kek: KekRef<'_>,
        wrapped_key: &[u8],
        wrapped_iv: &[u8],
        context: &EncryptionContext,
    ) -> Result<SecretKey, KmsError>;

    /// Moves a wrapped data key from `source` to `target` inside the KMS, so
    /// the plaintext data key never leaves it (AWS KMS `ReEncrypt`). `None`
    /// when this provider cannot; the caller then unwraps and wraps.
    async fn reencrypt_data_key(
        &self,
        _source: KekRef<'_>,
        _wrapped_key: &[u8],
        _wrapped_iv: &[u8],
        _target: KekRef<'_>,
        _context: &EncryptionContext,
    ) -> Result<Option<WrappedKey>, KmsError> {
        Ok(None)
    }

    /// The bytes every data key this provider wraps now begins with, when
    /// they name what wrapped it (the local KMS: its master secret). A
    /// rotation also rewraps the rows on its target key that do not begin
    /// with them. `None`: nothing to tell apart.
    fn wrap_tag(&self) -> Option<Vec<u8>> {
        None
    }

    /// Checks the KEK is usable without using it: exists, enabled. The
    /// self-test runs this before its round trip.
    async fn check_key(&self, _kek: KekRef<'_>) -> Result<(), KmsError> {
        Ok(())
    }
}

/// The providers this process has configured, by kind, each counted in
/// one shared [`KmsCallStats`].
#[derive(Clone, Default)]
pub struct KmsRegistry {
    providers: Vec<Arc<dyn KmsProvider>>,
    stats: Arc<KmsCallStats>,
    /// The local provider, also by its own type: the replica agent sets
    /// which master secret wraps.
    local: Option<local::LocalKms>,
}

impl KmsRegistry {
    /// Adds the local provider.
    pub fn with_local(mut self, provider: local::LocalKms) -> Self {
        self.local = Some(provider.clone());
        self.with(Arc::new(provider))
    }

    /// The local provider, if this process has a master secret.
    pub fn local(&self) -> Option<&local::LocalKms> {
        self.local.as_ref()
    }

    /// Adds (or replaces) the provider of its kind.
    pub fn with(mut self, provider: Arc<dyn KmsProvider>) -> Self {
        self.providers.retain(|p| p.kind() != provider.kind());
        self.providers.push(Arc::new(stats::Counted {
            inner: provider,
            stats: Arc::clone(&self.stats),
        }));
        self
    }

    /// The provider of `kind`, if this process has it configured.
    pub fn get(&self, kind: ProviderKind) -> Option<&dyn KmsProvider> {
        self.providers
            .iter()
            .find(|p| p.kind() == kind)
            .map(|p| p.as_ref())
    }

    /// How many calls each provider has had.
    pub fn stats(&self) -> &Arc<KmsCallStats> {
        &self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_is_inferred_from_the_arn() {
        for arn in [
            "arn:aws:kms:us-east-1:123456789012:key/alias/app/master",
            "alias/app/master",
            "1234abcd-12ab-34cd-56ef-1234567890ab",
            "mrk-1234abcd12ab34cd56ef1234567890ab",
        ] {
            assert_eq!(ProviderKind::infer(arn), ProviderKind::AwsKms, "{arn}");
        }
        for arn in ["local:default", "my-key", ""] {
            assert_eq!(ProviderKind::infer(arn), ProviderKind::Local, "{arn}");
        }
        assert_eq!(
            ProviderKind::infer("pkcs11:token=keyward;object=kek"),
            ProviderKind::Pkcs11
        );
    }

    #[test]
    fn new_pkcs11_keys_need_a_usable_uri() {
        assert_eq!(
            provider_of_new_key("pkcs11:token=keyward;object=kek"),
            Ok(ProviderKind::Pkcs11)
        );
        assert!(matches!(
            provider_of_new_key("pkcs11:token=keyward"),
            Err(KeyRefError::Pkcs11(_, pkcs11_uri::UriError::NoObject))
        ));
    }

    #[test]
    fn a_pin_never_prints() {
        let pin = Pkcs11Pin::new("123456".into());
        assert!(!format!("{pin:?}").contains("123456"));
    }

    #[test]
    fn names_round_trip() {
        for kind in ProviderKind::ALL {
            assert_eq!(ProviderKind::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(ProviderKind::parse("gcp"), None);
    }
}
