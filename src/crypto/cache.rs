//! Bounded data-key caching (design notes §4), for providers where every
//! call is a network round trip.
//!
//! - **Encrypt** reuses one data key per (key record, KMS key, encryption
//!   context) for at most `max_age`, `max_messages` and `max_bytes`, as the
//!   AWS Encryption SDK's caching materials manager does. When an entry is
//!   used up, exactly one caller asks the KMS for the next data key; the
//!   others wait for it (moka's per-key compute lock), so a burst of
//!   concurrent Encrypts costs one KMS call, not one each.
//! - **Decrypt** keeps unwrapped data keys in an LRU with a TTL, keyed by the
//!   key record, KMS key, wrapped data key and encryption context; concurrent
//!   misses on one wrapped key coalesce into one KMS call. A data key the
//!   encrypt side generated is put here too, so reading back recently
//!   written data costs no KMS call at all.
//!
//! Keys are SHA-256 digests of those parts, so the cache holds no context
//! values. Values are `Arc`s of zeroize-on-drop types: an evicted, expired or
//! invalidated entry is wiped when its last user lets go of it.
//! [`DataKeyCache::invalidate_all`] runs whenever the key catalog changes,
//! so a rotated or retired key's data keys are never used for new Encrypts.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use moka::{future::Cache, notification::RemovalCause, ops::compute::CompResult, ops::compute::Op};
use sha2::{Digest, Sha256};

use super::{
    context::{put_bytes, EncryptionContext},
    kms::{GeneratedKey, KekRef, KmsError, ProviderKind, WrappedKey},
    secret::SecretKey,
};

/// Which providers' keys are cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheMode {
    /// Remote providers (`aws-kms`) only; the local KMS needs no cache.
    Auto,
    /// Every provider.
    On,
    /// None.
    Off,
}

/// Bounds of both caches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheSettings {
    pub mode: CacheMode,
    /// Longest an Encrypt data key is reused.
    pub max_age: Duration,
    /// Most messages encrypted under one cached data key.
    pub max_messages: u64,
    /// Most plaintext bytes encrypted under one cached data key.
    pub max_bytes: u64,
    /// Most (key, context) entries on the encrypt side.
    pub encrypt_capacity: u64,
    /// Most unwrapped data keys on the decrypt side.
    pub decrypt_capacity: u64,
    /// Longest an unwrapped data key stays on the decrypt side.
    pub decrypt_ttl: Duration,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            mode: CacheMode::Auto,
            max_age: Duration::from_secs(300),
            max_messages: 4096,
            max_bytes: 256 * 1024 * 1024,
            encrypt_capacity: 1000,
            decrypt_capacity: 10_000,
            decrypt_ttl: Duration::from_secs(300),
        }
    }
}

impl CacheSettings {
    /// Whether keys of `provider` go through the cache.
    pub fn applies_to(&self, provider: ProviderKind) -> bool {
        match self.mode {
            CacheMode::Auto => provider != ProviderKind::Local,
            CacheMode::On => true,
            CacheMode::Off => false,
        }
    }
}

/// Hit, miss and eviction counts of both caches.
#[derive(Debug, Default)]
pub struct CacheStats {
    pub encrypt_hits: AtomicU64,
    pub encrypt_misses: AtomicU64,
    pub decrypt_hits: AtomicU64,
    pub decrypt_misses: AtomicU64,
    /// Entries dropped for size or age (not explicit invalidation).
    pub encrypt_evictions: AtomicU64,
    pub decrypt_evictions: AtomicU64,
}

impl CacheStats {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// A data key the encrypt side hands out, with its usage so far.
#[derive(Debug)]
pub struct CachedDataKey {
    pub plaintext: SecretKey,
    pub wrapped: WrappedKey,
    created: Instant,
    messages: AtomicU64,
    bytes: AtomicU64,
}

impl CachedDataKey {
    fn new(generated: GeneratedKey, first_message_bytes: u64) -> Self {
        Self {
            plaintext: generated.plaintext,
            wrapped: generated.wrapped,
            created: Instant::now(),
            messages: AtomicU64::new(1),
            bytes: AtomicU64::new(first_message_bytes),
        }
    }

    /// Reserves one message of `len` bytes; `false` once any bound is
    /// reached (the entry then stays used up).
    fn try_use(&self, len: u64, settings: &CacheSettings) -> bool {
        if self.created.elapsed() >= settings.max_age {
            return false;
        }
        let messages = self.messages.fetch_add(1, Ordering::Relaxed) + 1;
        let bytes = self.bytes.fetch_add(len, Ordering::Relaxed) + len;
        messages <= settings.max_messages && bytes <= settings.max_bytes
    }
}

type Digest32 = [u8; 32];

/// Both caches. Cheap to share behind an `Arc`.
pub struct DataKeyCache {
    settings: CacheSettings,
    encrypt: Cache<Digest32, Arc<CachedDataKey>>,
    decrypt: Cache<Digest32, Arc<SecretKey>>,
    stats: Arc<CacheStats>,
}

impl DataKeyCache {
    pub fn new(settings: CacheSettings) -> Self {
        let stats = Arc::new(CacheStats::default());
        let encrypt = Cache::builder()
            .max_capacity(settings.encrypt_capacity)
            .time_to_live(settings.max_age)
            .eviction_listener(count_evictions(Arc::clone(&stats), |s| {
                &s.encrypt_evictions
            }))
            .build();
        let decrypt = Cache::builder()
            .max_capacity(settings.decrypt_capacity)
            .time_to_live(settings.decrypt_ttl)
            .eviction_listener(count_evictions(Arc::clone(&stats), |s| {
                &s.decrypt_evictions
            }))
            .build();
        Self {
            settings,
            encrypt,
            decrypt,
            stats,
        }
    }

    pub fn settings(&self) -> &CacheSettings {
        &self.settings
    }

    pub fn stats(&self) -> &Arc<CacheStats> {
        &self.stats
    }

    /// A data key for encrypting `len` bytes under `kek` and `context`:
    /// the cached one while it is within bounds, else a fresh one from
    /// `generate` (called at most once per used-up entry, however many
    /// callers are waiting).
    pub async fn data_key_for_encrypt<F, Fut>(
        &self,
        kek: KekRef<'_>,
        context: &EncryptionContext,
        len: usize,
        generate: F,
    ) -> Result<Arc<CachedDataKey>, KmsError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<GeneratedKey, KmsError>>,
    {
        let len = u64::try_from(len).unwrap_or(u64::MAX);
        let key = digest(b"encrypt", kek, &[], &[], context);
        if let Some(entry) = self.encrypt.get(&key).await {
            if entry.try_use(len, &self.settings) {
                CacheStats::bump(&self.stats.encrypt_hits);
                return Ok(entry);
            }
        }
        let settings = &self.settings;
        let stats = &self.stats;
        let result = self
            .encrypt
            .entry(key)
            .and_try_compute_with(|existing| async move {
                if let Some(entry) = existing {
                    if entry.value().try_use(len, settings) {
                        CacheStats::bump(&stats.encrypt_hits);
                        return Ok(Op::Nop);
                    }
                }
                CacheStats::bump(&stats.encrypt_misses);
                let generated = generate().await?;
                Ok::<_, KmsError>(Op::Put(Arc::new(CachedDataKey::new(generated, len))))
            })
            .await?;
        let entry = match result {
            CompResult::Inserted(entry)
            | CompResult::ReplacedWith(entry)
            | CompResult::Unchanged(entry) => entry.into_value(),
            CompResult::StillNone(_) | CompResult::Removed(_) => {
                return Err(KmsError::Unavailable {
                    reason: "the data-key cache lost an entry it was filling; retry".into(),
                })
            }
        };
        // Reading back what was just written needs no KMS call.
        let decrypt_key = digest(
            b"decrypt",
            kek,
            &entry.wrapped.ciphertext,
            &entry.wrapped.iv,
            context,
        );
        if !self.decrypt.contains_key(&decrypt_key) {
            self.decrypt
                .insert(decrypt_key, Arc::new(entry.plaintext.clone()))
                .await;
        }
        Ok(entry)
    }

    /// The unwrapped data key for a wrapped one: cached, or from `unwrap`
    /// (concurrent misses on the same wrapped key share one call).
    pub async fn data_key_for_decrypt<F, Fut>(
        &self,
        kek: KekRef<'_>,
        wrapped_key: &[u8],
        wrapped_iv: &[u8],
        context: &EncryptionContext,
        unwrap: F,
    ) -> Result<Arc<SecretKey>, KmsError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<SecretKey, KmsError>>,
    {
        let key = digest(b"decrypt", kek, wrapped_key, wrapped_iv, context);
        let stats = &self.stats;
        let mut missed = false;
        let result = self
            .decrypt
            .try_get_with(key, async {
                missed = true;
                unwrap().await.map(Arc::new)
            })
            .await;
        CacheStats::bump(if missed {
            &stats.decrypt_misses
        } else {
            &stats.decrypt_hits
        });
        result.map_err(|err| (*err).clone())
    }

    /// Drops every entry (the key catalog changed).
    pub fn invalidate_all(&self) {
        self.encrypt.invalidate_all();
        self.decrypt.invalidate_all();
    }
}

/// An eviction listener counting evictions for size or age.
fn count_evictions<V>(
    stats: Arc<CacheStats>,
    counter: fn(&CacheStats) -> &AtomicU64,
) -> impl Fn(Arc<Digest32>, V, RemovalCause) + Send + Sync + 'static {
    move |_key, _value, cause| {
        if cause.was_evicted() {
            CacheStats::bump(counter(&stats));
        }
    }
}

/// The cache key: a digest of the key record, KMS key, wrapped key and the
/// canonical context, each length-prefixed so no two inputs collide.
fn digest(
    side: &[u8],
    kek: KekRef<'_>,
    wrapped_key: &[u8],
    wrapped_iv: &[u8],
    context: &EncryptionContext,
) -> Digest32 {
    let parts: [&[u8]; 5] = [
        side,
        kek.record_id.as_bytes(),
        kek.kms_key_arn.as_bytes(),
        wrapped_key,
        wrapped_iv,
    ];
    let mut buf = Vec::with_capacity(
        parts.iter().map(|p| 4 + p.len()).sum::<usize>() + context.canonical_len(),
    );
    for part in parts {
        put_bytes(&mut buf, part);
    }
    context.write_canonical(&mut buf);
    Sha256::digest(&buf).into()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    const KEK: KekRef<'static> = KekRef {
        record_id: "rec-1",
        kms_key_arn: "alias/app",
    };

    fn fresh() -> GeneratedKey {
        GeneratedKey {
            plaintext: SecretKey::generate(),
            wrapped: WrappedKey {
                ciphertext: SecretKey::generate().expose().to_vec(),
                iv: Vec::new(),
            },
        }
    }

    fn settings(max_messages: u64, max_bytes: u64) -> CacheSettings {
        CacheSettings {
            mode: CacheMode::On,
            max_messages,
            max_bytes,
            ..CacheSettings::default()
        }
    }

    async fn encrypt_n(
        cache: &DataKeyCache,
        ctx: &EncryptionContext,
        n: usize,
        len: usize,
    ) -> usize {
        let calls = AtomicUsize::new(0);
        for _ in 0..n {
            cache
                .data_key_for_encrypt(KEK, ctx, len, || async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Ok(fresh())
                })
                .await
                .unwrap();
        }
        calls.into_inner()
    }

    #[tokio::test]
    async fn encrypt_reuses_a_data_key_within_its_message_bound() {
        let cache = DataKeyCache::new(settings(10, u64::MAX));
        let ctx = EncryptionContext::empty();
        assert_eq!(encrypt_n(&cache, &ctx, 25, 1).await, 3);
    }

    #[tokio::test]
    async fn encrypt_respects_the_byte_bound() {
        let cache = DataKeyCache::new(settings(u64::MAX, 100));
        let ctx = EncryptionContext::empty();
        // 40 bytes each: two fit under 100, the third needs a new key.
        assert_eq!(encrypt_n(&cache, &ctx, 4, 40).await, 2);
    }

    #[tokio::test]
    async fn contexts_and_keys_do_not_share_data_keys() {
        let cache = DataKeyCache::new(settings(100, u64::MAX));
        let a = EncryptionContext::from_pairs([("tenant", "a")]).unwrap();
        let b = EncryptionContext::from_pairs([("tenant", "b")]).unwrap();
        assert_eq!(encrypt_n(&cache, &a, 5, 1).await, 1);
        assert_eq!(encrypt_n(&cache, &b, 5, 1).await, 1);
        assert_eq!(encrypt_n(&cache, &a, 5, 1).await, 0);
    }

    #[tokio::test]
    async fn concurrent_misses_make_one_kms_call() {
        let cache = Arc::new(DataKeyCache::new(settings(1000, u64::MAX)));
        let calls = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..32)
            .map(|_| {
                let (cache, calls) = (Arc::clone(&cache), Arc::clone(&calls));
                tokio::spawn(async move {
                    let ctx = EncryptionContext::empty();
                    cache
                        .data_key_for_encrypt(KEK, &ctx, 1, || async {
                            calls.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            Ok(fresh())
                        })
                        .await
                        .unwrap()
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_generated_key_decrypts_without_a_call_and_invalidation_forgets_it() {
        let cache = DataKeyCache::new(settings(100, u64::MAX));
        let ctx = EncryptionContext::empty();
        let entry = cache
            .data_key_for_encrypt(KEK, &ctx, 1, || async { Ok(fresh()) })
            .await
            .unwrap();
        let unwrap_calls = AtomicUsize::new(0);
        let unwrap = || async {
            unwrap_calls.fetch_add(1, Ordering::SeqCst);
            Err(KmsError::UnwrapFailed)
        };
        let got = cache
            .data_key_for_decrypt(KEK, &entry.wrapped.ciphertext, &[], &ctx, unwrap)
            .await
            .unwrap();
        assert_eq!(got.expose(), entry.plaintext.expose());
        assert_eq!(unwrap_calls.load(Ordering::SeqCst), 0);

        cache.invalidate_all();
        let err = cache
            .data_key_for_decrypt(KEK, &entry.wrapped.ciphertext, &[], &ctx, unwrap)
            .await
            .unwrap_err();
        assert_eq!(err, KmsError::UnwrapFailed);
        assert_eq!(unwrap_calls.load(Ordering::SeqCst), 1);
        assert_eq!(encrypt_n(&cache, &ctx, 1, 1).await, 1);
    }

    #[tokio::test]
    async fn cached_entries_never_print_their_data_key() {
        let cache = DataKeyCache::new(settings(10, u64::MAX));
        let ctx = EncryptionContext::empty();
        let entry = cache
            .data_key_for_encrypt(KEK, &ctx, 1, || async { Ok(fresh()) })
            .await
            .unwrap();
        let printed = format!("{entry:?}");
        let key = entry.plaintext.dangerous_bytes();
        assert!(!printed.contains(&hex::encode(key)));
        assert!(!printed.contains(&format!("{:?}", &key[..])));
        assert!(
            printed.contains("redacted") || printed.contains("SecretKey"),
            "{printed}"
        );
    }

    #[test]
    fn auto_mode_caches_remote_providers_only() {
        let auto = CacheSettings::default();
        assert!(auto.applies_to(ProviderKind::AwsKms));
        assert!(!auto.applies_to(ProviderKind::Local));
        let off = CacheSettings {
            mode: CacheMode::Off,
            ..auto
        };
        assert!(!off.applies_to(ProviderKind::AwsKms));
    }
}
