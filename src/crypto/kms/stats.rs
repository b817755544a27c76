//! KMS calls by provider, operation and outcome, with their latency.
//!
//! Every provider in a [`super::KmsRegistry`] is wrapped in [`Counted`], so
//! the figures are of calls keyward actually made to a KMS (cache hits never
//! reach it). The data-key cache benchmark and the metrics endpoint read them.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
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

/// Latency histograms, one per provider × operation × outcome, shared by
/// every [`Counted`] provider of a registry; a histogram's count is the
/// number of calls.
#[derive(Debug)]
pub struct KmsCallStats {
    /// Indexed by [`Self::slot`].
    latency: Vec<LatencyHistogram>,
}

impl Default for KmsCallStats {
    fn default() -> Self {
        Self {
            latency: (0..PROVIDERS * OPS * 2)
                .map(|_| LatencyHistogram::default())
                .collect(),
        }
    }
}

/// Latency buckets with a finite bound: 50 µs (the local KMS) doubling to
/// about 3.3 s (a remote KMS retrying); one more bucket takes the rest.
const LATENCY_BUCKETS: usize = 17;
const FIRST_BOUND_NANOS: u64 = 50_000;

/// A latency histogram kept in atomics alone. The local KMS is called on
/// every Encrypt from every worker thread; prometheus-client's `Histogram`
/// takes a mutex per observation, which the two cores of a busy server
/// passed back and forth. Read at scrape time by the metrics endpoint.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// Observations per bucket (not cumulative); the last bucket is +Inf.
    counts: [AtomicU64; LATENCY_BUCKETS + 1],
    sum_nanos: AtomicU64,
}

/// A [`LatencyHistogram`] read at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct LatencySnapshot {
    /// Seconds, summed over every observation.
    pub sum: f64,
    /// Observations (the sum of the bucket counts).
    pub count: u64,
    /// (upper bound in seconds, observations in that bucket alone); the
    /// last bound is `f64::INFINITY`.
    pub buckets: Vec<(f64, u64)>,
}

impl LatencyHistogram {
    fn observe(&self, took: Duration) {
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        let bucket = (0..LATENCY_BUCKETS)
            .find(|&i| nanos <= FIRST_BOUND_NANOS << i)
            .unwrap_or(LATENCY_BUCKETS);
        if let Some(count) = self.counts.get(bucket) {
            count.fetch_add(1, Ordering::Relaxed);
        }
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.counts.iter().map(|n| n.load(Ordering::Relaxed)).sum()
    }

    /// Every bucket, the count and the sum, as the metrics endpoint writes
    /// them.
    pub fn snapshot(&self) -> LatencySnapshot {
        let buckets: Vec<(f64, u64)> = self
            .counts
            .iter()
            .enumerate()
            .map(|(i, count)| {
                let bound = if i < LATENCY_BUCKETS {
                    (FIRST_BOUND_NANOS << i) as f64 / 1e9
                } else {
                    f64::INFINITY
                };
                (bound, count.load(Ordering::Relaxed))
            })
            .collect();
        LatencySnapshot {
            sum: self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
            count: buckets.iter().map(|(_, n)| n).sum(),
            buckets,
        }
    }
}

impl KmsCallStats {
    fn slot(provider: ProviderKind, op: KmsOperation, ok: bool) -> usize {
        (provider_index(provider) * OPS + op.index()) * 2 + usize::from(!ok)
    }

    /// Latency in seconds of the calls of `op` to `provider` that succeeded
    /// (`ok`) or failed.
    pub fn latency(&self, provider: ProviderKind, op: KmsOperation, ok: bool) -> &LatencyHistogram {
        // `slot` is always in range: the vector has one entry per slot.
        &self.latency[Self::slot(provider, op, ok)]
    }

    /// Calls of `op` to `provider` that succeeded (`ok`) or failed.
    pub fn calls(&self, provider: ProviderKind, op: KmsOperation, ok: bool) -> u64 {
        self.latency(provider, op, ok).count()
    }

    /// Successful calls of `op` to `provider`.
    pub fn ok(&self, provider: ProviderKind, op: KmsOperation) -> u64 {
        self.calls(provider, op, true)
    }

    /// Failed calls of `op` to `provider`.
    pub fn failed(&self, provider: ProviderKind, op: KmsOperation) -> u64 {
        self.calls(provider, op, false)
    }

    /// Every call to `provider`, any operation, any outcome.
    pub fn total(&self, provider: ProviderKind) -> u64 {
        KmsOperation::ALL
            .into_iter()
            .map(|op| self.ok(provider, op) + self.failed(provider, op))
            .sum()
    }

    fn record<T>(
        &self,
        provider: ProviderKind,
        op: KmsOperation,
        result: &Result<T, KmsError>,
        took: Duration,
    ) {
        self.latency[Self::slot(provider, op, result.is_ok())].observe(took);
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
        let started = Instant::now();
        let result = self.inner.generate_data_key(kek, context).await;
        self.stats.record(
            self.kind(),
            KmsOperation::GenerateDataKey,
            &result,
            started.elapsed(),
        );
        result
    }

    async fn wrap_data_key(
        &self,
        kek: KekRef<'_>,
        data_key: &SecretKey,
        context: &EncryptionContext,
    ) -> Result<WrappedKey, KmsError> {
        let started = Instant::now();
        let result = self.inner.wrap_data_key(kek, data_key, context).await;
        self.stats.record(
            self.kind(),
            KmsOperation::Encrypt,
            &result,
            started.elapsed(),
        );
        result
    }

    async fn decrypt_data_key(
        &self,
        kek: KekRef<'_>,
        wrapped_key: &[u8],
        wrapped_iv: &[u8],
        context: &EncryptionContext,
    ) -> Result<SecretKey, KmsError> {
        let started = Instant::now();
        let result = self
            .inner
            .decrypt_data_key(kek, wrapped_key, wrapped_iv, context)
            .await;
        self.stats.record(
            self.kind(),
            KmsOperation::Decrypt,
            &result,
            started.elapsed(),
        );
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
        let started = Instant::now();
        let result = self
            .inner
            .reencrypt_data_key(source, wrapped_key, wrapped_iv, target, context)
            .await;
        // `Ok(None)` means the provider cannot: no call was made.
        if !matches!(result, Ok(None)) {
            self.stats.record(
                self.kind(),
                KmsOperation::ReEncrypt,
                &result,
                started.elapsed(),
            );
        }
        result
    }

    fn wrap_tag(&self) -> Option<Vec<u8>> {
        self.inner.wrap_tag()
    }

    async fn check_key(&self, kek: KekRef<'_>) -> Result<(), KmsError> {
        let started = Instant::now();
        let result = self.inner.check_key(kek).await;
        self.stats.record(
            self.kind(),
            KmsOperation::DescribeKey,
            &result,
            started.elapsed(),
        );
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_buckets_are_inclusive_upper_bounds_and_the_count_matches_them() {
        let h = LatencyHistogram::default();
        h.observe(Duration::from_micros(50)); // on the first bound
        h.observe(Duration::from_micros(51)); // the second bucket (100 µs)
        h.observe(Duration::from_secs(10)); // beyond the last bound
        let snap = h.snapshot();
        assert_eq!(snap.buckets.len(), LATENCY_BUCKETS + 1);
        assert_eq!(snap.buckets[0], (0.000_05, 1));
        assert_eq!(snap.buckets[1], (0.000_1, 1));
        assert_eq!(snap.buckets[LATENCY_BUCKETS], (f64::INFINITY, 1));
        assert!((snap.buckets[LATENCY_BUCKETS - 1].0 - 3.2768).abs() < 1e-9);
        assert_eq!(snap.count, 3);
        assert_eq!(h.count(), 3);
        assert!((snap.sum - 10.000_101).abs() < 1e-9);
    }
}
