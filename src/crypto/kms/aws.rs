//! AWS KMS (or any KMS-protocol server, such as moto) through `aws-sdk-kms`.
//!
//! A key record's `kms_key_arn` names the KMS key (key ARN, key id, alias
//! name or alias ARN). The caller's encryption context is passed to KMS as
//! the KMS encryption context, so KMS itself refuses a data key presented
//! under another context. Data keys come from `GenerateDataKey` (AES_256);
//! `ReEncrypt` moves a wrapped data key between two KMS keys without the
//! plaintext data key ever reaching keyward.
//!
//! The client is built on first use with the standard credential chain
//! (environment, profile, web identity, instance role) and the retry and
//! timeout settings in [`AwsKmsSettings`], so a process that never touches
//! an `aws-kms` key never probes for AWS credentials or a region.
//!
//! Known limit: the SDK keeps its own copies of a plaintext data key while it
//! decodes the response (base64 in JSON); keyward zeroizes the copies it
//! owns, not the SDK's.

use std::collections::HashMap;

use async_trait::async_trait;
use aws_config::{retry::RetryConfig, timeout::TimeoutConfig, BehaviorVersion, Region};
use aws_credential_types::provider::ProvideCredentials;
use aws_sdk_kms::{
    error::{ProvideErrorMetadata, SdkError},
    primitives::Blob,
    types::{DataKeySpec, KeyState},
    Client,
};
use tokio::sync::OnceCell;
use zeroize::Zeroize;

use super::{GeneratedKey, KekRef, KmsError, KmsProvider, ProviderKind, WrappedKey};
use crate::crypto::{context::EncryptionContext, secret::SecretKey};

pub use super::AwsKmsSettings;

/// The `aws-kms` provider.
pub struct AwsKms {
    settings: AwsKmsSettings,
    /// The region the standard chain gives (`--aws-region`, `AWS_REGION`,
    /// profile), read on first use; `None` when it gives none.
    configured_region: OnceCell<Option<String>>,
    /// One SDK client per region, built on first use.
    clients: tokio::sync::RwLock<HashMap<String, Client>>,
}

impl AwsKms {
    pub fn new(settings: AwsKmsSettings) -> Self {
        Self {
            settings,
            configured_region: OnceCell::new(),
            clients: tokio::sync::RwLock::default(),
        }
    }

    /// The SDK client for `key`: in the region its ARN names
    /// (`arn:aws:kms:REGION:…`, which fixes where the key lives), else the
    /// configured one. A region and credentials must resolve; until they
    /// do, every call fails with [`KmsError::NotConfigured`] and the next
    /// call tries again (a role's credentials may appear after start-up).
    async fn client(&self, key: &str) -> Result<Client, KmsError> {
        let region = match arn_region(key) {
            Some(region) => region.to_owned(),
            None => self
                .configured_region
                .get_or_init(|| async {
                    load_sdk_config(&self.settings)
                        .await
                        .region()
                        .map(ToString::to_string)
                })
                .await
                .clone()
                .ok_or_else(|| KmsError::NotConfigured {
                    provider: ProviderKind::AwsKms,
                    reason: format!(
                        "no AWS region for {key}: name the key by its ARN \
                         (arn:aws:kms:REGION:ACCOUNT:key/ID), or set AWS_REGION or --aws-region"
                    ),
                })?,
        };
        if let Some(client) = self.clients.read().await.get(&region) {
            return Ok(client.clone());
        }
        let settings = AwsKmsSettings {
            region: Some(region.clone()),
            ..self.settings.clone()
        };
        let config = load_sdk_config(&settings).await;
        let credentials = config
            .credentials_provider()
            .ok_or_else(|| KmsError::NotConfigured {
                provider: ProviderKind::AwsKms,
                reason: "no AWS credentials provider".into(),
            })?;
        credentials
            .provide_credentials()
            .await
            .map_err(|err| KmsError::NotConfigured {
                provider: ProviderKind::AwsKms,
                reason: format!(
                    "no AWS credentials could be loaded (environment, profile, web identity, \
                     instance role): {}",
                    crate::report::chain(&err)
                ),
            })?;
        let client = Client::new(&config);
        self.clients.write().await.insert(region, client.clone());
        Ok(client)
    }
}

/// The region a KMS key ARN names (`arn:PARTITION:kms:REGION:ACCOUNT:…`);
/// `None` for a key id or an alias name.
fn arn_region(key: &str) -> Option<&str> {
    let mut parts = key.splitn(6, ':');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("arn"), Some(_partition), Some("kms"), Some(region)) if !region.is_empty() => {
            Some(region)
        }
        _ => None,
    }
}

/// The AWS SDK configuration for `settings`: the standard chains for
/// region and credentials, keyward's retry and timeout settings, and the
/// endpoint override. Shared by the provider and `bench-kms-cache`.
pub async fn load_sdk_config(settings: &AwsKmsSettings) -> aws_config::SdkConfig {
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .retry_config(
            RetryConfig::standard()
                .with_max_attempts(settings.max_attempts.max(1))
                .with_initial_backoff(settings.initial_backoff)
                .with_max_backoff(settings.initial_backoff.saturating_mul(8)),
        )
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(settings.connect_timeout)
                .operation_attempt_timeout(settings.attempt_timeout)
                .operation_timeout(settings.operation_timeout)
                .build(),
        );
    if let Some(region) = &settings.region {
        loader = loader.region(Region::new(region.clone()));
    }
    if let Some(endpoint) = &settings.endpoint {
        loader = loader.endpoint_url(endpoint.clone());
    }
    loader.load().await
}

/// The KMS encryption context for a keyward encryption context.
fn kms_context(context: &EncryptionContext) -> Option<HashMap<String, String>> {
    (!context.is_empty()).then(|| {
        context
            .iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    })
}

/// Takes a plaintext data key out of an SDK blob, zeroizing the blob's copy.
fn take_data_key(blob: Option<Blob>, key: &str) -> Result<SecretKey, KmsError> {
    let mut bytes = blob.map(Blob::into_inner).unwrap_or_default();
    let data_key = SecretKey::from_slice(&bytes);
    bytes.zeroize();
    data_key.ok_or_else(|| KmsError::Unavailable {
        reason: format!("kms key {key} returned a data key that is not 32 bytes"),
    })
}

/// Maps an SDK error to a [`KmsError`] naming the key, never the data.
fn map_error<E, R>(err: SdkError<E, R>, key: &str) -> KmsError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    let key = key.to_owned();
    if let SdkError::ServiceError(service) = &err {
        let code = service.err().code().unwrap_or_default();
        let message = service.err().message().unwrap_or_default();
        return map_service_code(code, message, key);
    }
    KmsError::Unavailable {
        reason: format!(
            "calling kms for key {key} failed after retries: {}",
            crate::report::chain(&err)
        ),
    }
}

/// The part of [`map_error`] that depends only on the KMS error code.
fn map_service_code(code: &str, message: &str, key: String) -> KmsError {
    match code {
        "DisabledException" | "KMSInvalidStateException" => KmsError::KeyDisabled { key },
        "NotFoundException" => KmsError::KeyNotFound { key },
        "AccessDeniedException" | "UnrecognizedClientException" | "InvalidSignatureException" => {
            KmsError::AccessDenied { key }
        }
        "InvalidCiphertextException" | "IncorrectKeyException" => KmsError::UnwrapFailed,
        "InvalidKeyUsageException" | "ValidationException" | "InvalidArnException" => {
            KmsError::InvalidKeyRef {
                key,
                reason: "kms refused the key for this operation (a symmetric ENCRYPT_DECRYPT key is needed)",
            }
        }
        _ => KmsError::Unavailable {
            reason: format!(
                "kms error {} for key {key}: {message}",
                if code.is_empty() { "(no code)" } else { code }
            ),
        },
    }
}

#[async_trait]
impl KmsProvider for AwsKms {
    fn kind(&self) -> ProviderKind {
        ProviderKind::AwsKms
    }

    async fn generate_data_key(
        &self,
        kek: KekRef<'_>,
        context: &EncryptionContext,
    ) -> Result<GeneratedKey, KmsError> {
        let out = self
            .client(kek.kms_key_arn)
            .await?
            .generate_data_key()
            .key_id(kek.kms_key_arn)
            .key_spec(DataKeySpec::Aes256)
            .set_encryption_context(kms_context(context))
            .send()
            .await
            .map_err(|e| map_error(e, kek.kms_key_arn))?;
        let ciphertext = out
            .ciphertext_blob
            .clone()
            .map(Blob::into_inner)
            .unwrap_or_default();
        let plaintext = take_data_key(out.plaintext, kek.kms_key_arn)?;
        Ok(GeneratedKey {
            plaintext,
            wrapped: WrappedKey {
                ciphertext,
                iv: Vec::new(),
            },
        })
    }

    async fn wrap_data_key(
        &self,
        kek: KekRef<'_>,
        data_key: &SecretKey,
        context: &EncryptionContext,
    ) -> Result<WrappedKey, KmsError> {
        let out = self
            .client(kek.kms_key_arn)
            .await?
            .encrypt()
            .key_id(kek.kms_key_arn)
            .plaintext(Blob::new(data_key.expose().to_vec()))
            .set_encryption_context(kms_context(context))
            .send()
            .await
            .map_err(|e| map_error(e, kek.kms_key_arn))?;
        Ok(WrappedKey {
            ciphertext: out
                .ciphertext_blob
                .map(Blob::into_inner)
                .unwrap_or_default(),
            iv: Vec::new(),
        })
    }

    async fn decrypt_data_key(
        &self,
        kek: KekRef<'_>,
        wrapped_key: &[u8],
        wrapped_iv: &[u8],
        context: &EncryptionContext,
    ) -> Result<SecretKey, KmsError> {
        if !wrapped_iv.is_empty() {
            // AWS KMS ciphertexts carry their own nonce.
            return Err(KmsError::UnwrapFailed);
        }
        let out = self
            .client(kek.kms_key_arn)
            .await?
            .decrypt()
            .key_id(kek.kms_key_arn)
            .ciphertext_blob(Blob::new(wrapped_key.to_vec()))
            .set_encryption_context(kms_context(context))
            .send()
            .await
            .map_err(|e| map_error(e, kek.kms_key_arn))?;
        take_data_key(out.plaintext, kek.kms_key_arn)
    }

    async fn reencrypt_data_key(
        &self,
        source: KekRef<'_>,
        wrapped_key: &[u8],
        wrapped_iv: &[u8],
        target: KekRef<'_>,
        context: &EncryptionContext,
    ) -> Result<Option<WrappedKey>, KmsError> {
        if !wrapped_iv.is_empty() {
            return Err(KmsError::UnwrapFailed);
        }
        let out = self
            .client(target.kms_key_arn)
            .await?
            .re_encrypt()
            .ciphertext_blob(Blob::new(wrapped_key.to_vec()))
            .source_key_id(source.kms_key_arn)
            .set_source_encryption_context(kms_context(context))
            .destination_key_id(target.kms_key_arn)
            .set_destination_encryption_context(kms_context(context))
            .send()
            .await
            .map_err(|e| map_error(e, target.kms_key_arn))?;
        Ok(Some(WrappedKey {
            ciphertext: out
                .ciphertext_blob
                .map(Blob::into_inner)
                .unwrap_or_default(),
            iv: Vec::new(),
        }))
    }

    async fn check_key(&self, kek: KekRef<'_>) -> Result<(), KmsError> {
        let out = self
            .client(kek.kms_key_arn)
            .await?
            .describe_key()
            .key_id(kek.kms_key_arn)
            .send()
            .await
            .map_err(|e| map_error(e, kek.kms_key_arn))?;
        let key = kek.kms_key_arn.to_owned();
        match out.key_metadata {
            None => Err(KmsError::KeyNotFound { key }),
            Some(meta) => match meta.key_state {
                Some(KeyState::Enabled) if meta.enabled => Ok(()),
                _ => Err(KmsError::KeyDisabled { key }),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_arn_names_its_region() {
        assert_eq!(
            arn_region("arn:aws:kms:eu-west-1:111122223333:key/1234abcd"),
            Some("eu-west-1")
        );
        assert_eq!(
            arn_region("arn:aws-us-gov:kms:us-gov-west-1:111122223333:alias/app"),
            Some("us-gov-west-1")
        );
        assert_eq!(arn_region("1234abcd-12ab-34cd-56ef-1234567890ab"), None);
        assert_eq!(arn_region("alias/app"), None);
        assert_eq!(arn_region("arn:aws:s3:::bucket"), None);
    }

    #[test]
    fn kms_codes_map_to_keyward_errors() {
        let key = || "alias/app".to_owned();
        assert!(matches!(
            map_service_code("DisabledException", "", key()),
            KmsError::KeyDisabled { .. }
        ));
        assert!(matches!(
            map_service_code("KMSInvalidStateException", "", key()),
            KmsError::KeyDisabled { .. }
        ));
        assert!(matches!(
            map_service_code("NotFoundException", "", key()),
            KmsError::KeyNotFound { .. }
        ));
        assert!(matches!(
            map_service_code("AccessDeniedException", "", key()),
            KmsError::AccessDenied { .. }
        ));
        assert_eq!(
            map_service_code("InvalidCiphertextException", "", key()),
            KmsError::UnwrapFailed
        );
        assert!(matches!(
            map_service_code("ThrottlingException", "slow down", key()),
            KmsError::Unavailable { .. }
        ));
    }

    #[test]
    fn empty_context_is_sent_as_none() {
        assert_eq!(kms_context(&EncryptionContext::empty()), None);
        let ctx = EncryptionContext::from_pairs([("tenant", "acme")]).unwrap();
        assert_eq!(
            kms_context(&ctx),
            Some(HashMap::from([("tenant".to_owned(), "acme".to_owned())]))
        );
    }
}
