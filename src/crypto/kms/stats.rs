//! Counts of KMS calls by provider, operation and outcome.
//!
//! Every provider in a [`super::KmsRegistry`] is wrapped in [`Counted`], so
//! the counts are of calls keyward actually made to a KMS (cache hits never
//! reach it). The data-key cache benchmark reads them; so can metrics.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

use async_trait::async_trait;

use super::{GeneratedKey, KekRef, KmsError, KmsProvider, ProviderKind, WrappedKey};
use crate::crypto::{context::EncryptionContext, secret::SecretKey};

/// The KMS operations keyward makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KmsOperation {
    GenerateDataKey,
    Encrypt,
    Decrypt,
    ReEncrypt,
    DescribeKey,
}

impl KmsOperation {
    pub const ALL: [KmsOperation; 5] = [
        Self::GenerateDataKey,
        Self::Encrypt,
        Self::Decrypt,
        Self::ReEncrypt,
        Self::DescribeKey,
    ];

    /// The AWS KMS API name of the operation.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::GenerateDataKey => "GenerateDataKey",
            Self::Encrypt => "Encrypt",
            Self::Decrypt => "Decrypt",
            Self::ReEncrypt => "ReEncrypt",
            Self::DescribeKey => "DescribeKey",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

const OPS: usize = KmsOperation::ALL.len();
const PROVIDERS: usize = ProviderKind::ALL.len();

/// Call counters, shared by every [`Counted`] provider of a registry.
#[derive(Debug, Default)]
pub struct KmsCallStats {
    ok: [[AtomicU64; OPS]; PROVIDERS],
    failed: [[AtomicU64; OPS]; PROVIDERS],
}

impl KmsCallStats {
    /// Successful calls of `op` to `provider`.
    pub fn ok(&self, provider: ProviderKind, op: KmsOperation) -> u64 {
        self.ok[provider_index(provider)][op.index()].load(Ordering::Relaxed)
    }

    /// Failed calls of `op` to `provider`.
    pub fn failed(&self, provider: ProviderKind, op: KmsOperation) -> u64 {
        self.failed[provider_index(provider)][op.index()].load(Ordering::Relaxed)
    }

    /// Every call to `provider`, any operation, any outcome.
    pub fn total(&self, provider: ProviderKind) -> u64 {
        KmsOperation::ALL
            .into_iter()
            .map(|op| self.ok(provider, op) + self.failed(provider, op))
            .sum()
    }

    fn record<T>(&self, provider: ProviderKind, op: KmsOperation, result: &Result<T, KmsError>) {
        let table = if result.is_ok() {
            &self.ok
        } else {
            &self.failed
        };
        table[provider_index(provider)][op.index()].fetch_add(1, Ordering::Relaxed);
    }
}

fn provider_index(kind: ProviderKind) -> usize {
    ProviderKind::ALL
        .iter()
        .position(|k| *k == kind)
        .unwrap_or_default()
}

/// A provider whose calls are counted in a shared [`KmsCallStats`].
pub(super) struct Counted {
    pub(super) inner: Arc<dyn KmsProvider>,
    pub(super) stats: Arc<KmsCallStats>,
}

#[async_trait]
impl KmsProvider for Counted {
    fn kind(&self) -> ProviderKind {
        self.inner.kind()
    }

    async fn generate_data_key(
        &self,
        kek: KekRef<'_>,
        context: &EncryptionContext,
    ) -> Result<GeneratedKey, KmsError> {
        let result = self.inner.generate_data_key(kek, context).await;
        self.stats
            .record(self.kind(), KmsOperation::GenerateDataKey, &result);
        result
    }

    async fn wrap_data_key(
        &self,
        kek: KekRef<'_>,
        data_key: &SecretKey,
        context: &EncryptionContext,
    ) -> Result<WrappedKey, KmsError> {
        let result = self.inner.wrap_data_key(kek, data_key, context).await;
        self.stats
            .record(self.kind(), KmsOperation::Encrypt, &result);
        result
    }

    async fn decrypt_data_key(
        &self,
        kek: KekRef<'_>,
        wrapped_key: &[u8],
        wrapped_iv: &[u8],
        context: &EncryptionContext,
    ) -> Result<SecretKey, KmsError> {
        let result = self
            .inner
            .decrypt_data_key(kek, wrapped_key, wrapped_iv, context)
            .await;
        self.stats
            .record(self.kind(), KmsOperation::Decrypt, &result);
        result
    }

    async fn reencrypt_data_key(
        &self,
        source: KekRef<'_>,
        wrapped_key: &[u8],
        wrapped_iv: &[u8],
        target: KekRef<'_>,
        context: &EncryptionContext,
    ) -> Result<Option<WrappedKey>, KmsError> {
        let result = self
            .inner
            .reencrypt_data_key(source, wrapped_key, wrapped_iv, target, context)
            .await;
        // `Ok(None)` means the provider cannot: no call was made.
        if !matches!(result, Ok(None)) {
            self.stats
                .record(self.kind(), KmsOperation::ReEncrypt, &result);
        }
        result
    }

    async fn check_key(&self, kek: KekRef<'_>) -> Result<(), KmsError> {
        let result = self.inner.check_key(kek).await;
        self.stats
            .record(self.kind(), KmsOperation::DescribeKey, &result);
        result
    }
}
