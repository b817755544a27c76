//! Encrypt and Decrypt: the hot path.
//!
//! Encrypt reads the active key from the in-memory catalog, asks its KMS
//! provider for a fresh data key, and seals the payload; no database round
//! trip. Decrypt parses either envelope form, finds the key record in the
//! catalog, unwraps the data key and opens the payload; legacy ciphertexts
//! go to the key derived from the master secret.
//!
//! Keys of remote providers go through the bounded data-key cache
//! (`crypto::cache`) on the API path. Rotation and the self-test bypass it:
//! rotation's contexts are one per row, so caching would only evict what the
//! API path uses, and a self-test must reach the KMS.

use std::sync::Arc;

use rand::{rngs::OsRng, RngCore};

use crate::{
    crypto::{
        aead::{NONCE_LEN, TAG_LEN},
        blob,
        cache::DataKeyCache,
        context::EncryptionContext,
        envelope::{open_payload, seal_payload, Envelope},
        kms::{KmsError, KmsProvider, KmsRegistry, WrappedKey},
        legacy::{LegacyKeys, LegacyLayout},
        secret::{MasterSecret, Plaintext, SecretKey},
    },
    error::{Error, Result},
    keys::{Catalog, KeyCatalog, KeyRecord, KeyStatus},
};

/// Whoever can reload the key catalog when a ciphertext names a key record
/// this process has not loaded (`service::catalog::CatalogLoader`). A
/// trait, so this service does not depend on the one that owns it.
#[async_trait::async_trait]
pub trait ReadThrough: Send + Sync {
    /// Reloads the catalog because `record_id` is unknown here (at most
    /// once per short interval, however many callers ask); why the catalog
    /// could not be read, if it could not (that reload, or the last one
    /// within the interval, failed).
    async fn read_through(&self, record_id: &str) -> std::result::Result<(), String>;
}

/// Request-size limits of the crypto service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest plaintext Encrypt accepts.
    pub max_plaintext_bytes: usize,
    /// Most items a batch request may carry.
    pub max_batch_items: usize,
    /// Most encryption-context entries (at most 64).
    pub max_context_entries: usize,
    /// Most encryption-context bytes, keys and values (at most 8 KiB).
    pub max_context_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_plaintext_bytes: 64 * 1024,
            max_batch_items: 1000,
            max_context_entries: crate::crypto::context::MAX_ENTRIES,
            max_context_bytes: crate::crypto::context::MAX_BYTES,
        }
    }
}

/// A ciphertext as a caller hands it in.
#[derive(Debug, Clone)]
pub enum Ciphertext {
    Envelope(Envelope),
    Blob(Vec<u8>),
}

/// The result of an Encrypt.
#[derive(Debug)]
pub struct Sealed {
    pub envelope: Envelope,
    pub key: Arc<KeyRecord>,
}

/// A ciphertext [`CryptoService::rewrap_to_active`] moved (or found
/// already in place: `rewrapped` false).
pub struct Rewrapped {
    pub sealed: Sealed,
    pub rewrapped: bool,
}

impl Rewrapped {
    fn new(envelope: Envelope, key: Arc<KeyRecord>, rewrapped: bool) -> Self {
        Self {
            sealed: Sealed { envelope, key },
            rewrapped,
        }
    }
}

impl Sealed {
    /// The one-column form of the envelope.
    pub fn blob(&self) -> Result<Vec<u8>> {
        Ok(blob::encode(&self.envelope)?)
    }

    /// The blob form and where each envelope field sits in it.
    pub fn blob_with_ranges(&self) -> Result<(Vec<u8>, blob::FieldRanges)> {
        Ok(blob::encode_with_ranges(&self.envelope)?)
    }
}

/// The result of a Decrypt.
#[derive(Debug)]
pub struct Opened {
    pub plaintext: Plaintext,
    /// The key record it was under; `None` for a legacy ciphertext.
    pub key: Option<Arc<KeyRecord>>,
}

/// Context bound to self-test probes, so a probe can never pass for data.
const SELF_TEST_CONTEXT_KEY: &str = "keyward:self-test";

/// Whether a call may use the data-key cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Caching {
    Use,
    Bypass,
}

pub struct CryptoService {
    catalog: Arc<KeyCatalog>,
    kms: KmsRegistry,
    legacy: Option<LegacyKeys>,
    limits: Limits,
    cache: DataKeyCache,
    /// What the cache was last valid for: (id, kms_key_arn, status) of
    /// every key record.
    cache_epoch: std::sync::Mutex<Vec<(String, String, KeyStatus)>>,
    /// Reloads the catalog when a ciphertext names a key this process does
    /// not know yet (another replica created it moments ago). Weak: the
    /// catalog's owner (the admin service) holds this service.
    read_through: std::sync::OnceLock<std::sync::Weak<dyn ReadThrough>>,
    /// Set while this process cannot open what another process wrote under
    /// some key (`service::probes`): Encrypt is refused, since whatever it
    /// wrote no other replica could read.
    foreign: arc_swap::ArcSwapOption<String>,
}

impl CryptoService {
    pub fn new(
        catalog: Arc<KeyCatalog>,
        kms: KmsRegistry,
        legacy: Option<LegacyKeys>,
        limits: Limits,
        cache: DataKeyCache,
    ) -> Self {
        Self {
            catalog,
            kms,
            legacy,
            limits,
            cache,
            cache_epoch: std::sync::Mutex::default(),
            read_through: std::sync::OnceLock::new(),
            foreign: arc_swap::ArcSwapOption::empty(),
        }
    }

    /// Why this process cannot open some key's data (another master secret
    /// wrote it), as the last key check found; `None` when it can.
    pub fn foreign(&self) -> Option<String> {
        self.foreign
            .load_full()
            .map(|reason| String::clone(&reason))
    }

    /// Records the last key check's finding (`service::probes`).
    pub fn set_foreign(&self, reason: Option<String>) {
        self.foreign.store(reason.map(Arc::new));
    }

    /// Lets an unknown key id reload the catalog through `source` (the
    /// admin service: once, rate-limited) before a Decrypt fails with
    /// NOT_FOUND.
    pub fn set_read_through(&self, source: std::sync::Weak<dyn ReadThrough>) {
        let _ = self.read_through.set(source);
    }

    /// A key record by `encryption_keys.id`; an id this process does not
    /// know triggers one read-through catalog reload first.
    /// `None`: there is no such record; an error: the catalog cannot be
    /// read now to tell.
    pub async fn lookup_key(&self, id: &str) -> Result<Option<Arc<KeyRecord>>> {
        if let Some(key) = self.catalog.get(id) {
            return Ok(Some(key));
        }
        let Some(source) = self.read_through.get().and_then(std::sync::Weak::upgrade) else {
            return Ok(None);
        };
        source
            .read_through(id)
            .await
            .map_err(|reason| Error::CatalogUnavailable {
                key: id.to_owned(),
                reason,
            })?;
        Ok(self.catalog.get(id))
    }

    /// A service with only the local KMS under `master`, one active key
    /// record `id` (KMS key `local:<key_id>`) and no database: for property
    /// tests and fuzzing of the decrypt path. Deterministic, so ciphertexts
    /// made by one such service open in another with the same arguments.
    pub fn standalone_local(master: MasterSecret, id: &str, key_id: &str) -> Self {
        let catalog = Arc::new(KeyCatalog::default());
        let now = chrono::Utc::now();
        catalog.replace(
            vec![KeyRecord {
                id: id.to_owned(),
                key_id: key_id.to_owned(),
                kms_key_arn: format!("local:{key_id}"),
                alias: None,
                provider: crate::crypto::kms::ProviderKind::Local,
                status: KeyStatus::Active,
                created_at: now,
                updated_at: now,
                rotated_at: None,
            }],
            1,
        );
        let legacy = LegacyKeys::new([&master]);
        let kms = KmsRegistry::default()
            .with_local(crate::crypto::kms::local::LocalKms::new(master, Vec::new()));
        Self::new(
            catalog,
            kms,
            Some(legacy),
            Limits::default(),
            DataKeyCache::new(crate::crypto::cache::CacheSettings::default()),
        )
    }

    /// The KMS providers, with their call counts.
    pub fn kms(&self) -> &KmsRegistry {
        &self.kms
    }

    /// What every data key wrapped now under `key` begins with
    /// ([`KmsProvider::wrap_tag`]: the local KMS's master-secret tag);
    /// `None` when its provider tags nothing.
    pub fn wrap_tag_of(&self, key: &KeyRecord) -> Option<Vec<u8>> {
        self.kms
            .get(key.provider)
            .and_then(|provider| provider.wrap_tag())
    }

    /// The data-key cache, with its hit and miss counts.
    pub fn cache(&self) -> &DataKeyCache {
        &self.cache
    }

    /// Called after every catalog reload: when any key record's KMS key or
    /// status changed, every cached data key is dropped, so a rotated,
    /// retired or re-pointed key's data keys are never used again.
    pub fn catalog_changed(&self, catalog: &Catalog) {
        let mut epoch: Vec<_> = catalog
            .keys()
            .iter()
            .map(|k| (k.id.clone(), k.kms_key_arn.clone(), k.status))
            .collect();
        epoch.sort();
        let mut last = self
            .cache_epoch
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *last != epoch {
            self.cache.invalidate_all();
            *last = epoch;
        }
    }

    /// The key catalog this service encrypts from.
    pub fn catalog(&self) -> &KeyCatalog {
        &self.catalog
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Refuses a batch over the item limit.
    pub fn check_batch(&self, len: usize) -> Result<()> {
        if len > self.limits.max_batch_items {
            return Err(Error::BatchTooLarge {
                len,
                max: self.limits.max_batch_items,
            });
        }
        Ok(())
    }

    /// Encrypts under the active key.
    pub async fn encrypt(&self, plaintext: &[u8], context: &EncryptionContext) -> Result<Sealed> {
        self.encrypt_if(plaintext, context, |_| true).await
    }

    /// Encrypts under the active key if `allowed` accepts it (a caller's
    /// key scope), judged on the same catalog snapshot that is used.
    pub async fn encrypt_if(
        &self,
        plaintext: &[u8],
        context: &EncryptionContext,
        allowed: impl Fn(&KeyRecord) -> bool,
    ) -> Result<Sealed> {
        self.check_plaintext(plaintext)?;
        if let Some(reason) = self.foreign.load().as_deref() {
            return Err(Error::NotServing(reason.clone()));
        }
        let key = self.catalog.active().ok_or(Error::NoActiveKey)?;
        if !allowed(&key) {
            return Err(crate::auth::AuthError::Denied(
                "the caller may not encrypt under the active key".into(),
            )
            .into());
        }
        self.seal(key, plaintext, context, Caching::Use).await
    }

    /// The structured envelope of either ciphertext form.
    pub fn parse(&self, ciphertext: Ciphertext) -> Result<Envelope> {
        Ok(match ciphertext {
            Ciphertext::Blob(bytes) => blob::parse(&bytes)?,
            Ciphertext::Envelope(envelope) => envelope,
        })
    }

    /// Encrypts under a given key record with a fresh data key, bypassing
    /// the cache (rotation targets, self-test).
    pub async fn encrypt_with(
        &self,
        key: &Arc<KeyRecord>,
        plaintext: &[u8],
        context: &EncryptionContext,
    ) -> Result<Sealed> {
        self.seal(Arc::clone(key), plaintext, context, Caching::Bypass)
            .await
    }

    async fn seal(
        &self,
        key: Arc<KeyRecord>,
        plaintext: &[u8],
        context: &EncryptionContext,
        caching: Caching,
    ) -> Result<Sealed> {
        let provider = self.provider(&key)?;
        let generate = || provider.generate_data_key(key.kek(), context);
        let cached = caching == Caching::Use
            && key.status == KeyStatus::Active
            && self.cache.settings().applies_to(key.provider)
            && (plaintext.len() as u64) <= self.cache.settings().max_bytes;
        let (payload_iv, payload_ciphertext, wrapped) = if cached {
            let entry = self
                .cache
                .data_key_for_encrypt(key.kek(), context, plaintext.len(), generate)
                .await?;
            let (iv, ct) = seal_payload(&entry.plaintext, context, plaintext);
            (iv, ct, entry.wrapped.clone())
        } else {
            let data_key = generate().await?;
            let (iv, ct) = seal_payload(&data_key.plaintext, context, plaintext);
            (iv, ct, data_key.wrapped)
        };
        let envelope = Envelope {
            encryption_key_id: key.id.clone(),
            data_key_ciphertext: wrapped.ciphertext,
            data_key_iv: wrapped.iv,
            payload_ciphertext,
            payload_iv: payload_iv.to_vec(),
        };
        Ok(Sealed { envelope, key })
    }

    /// Decrypts either form of a ciphertext bound to `context`.
    pub async fn decrypt(
        &self,
        ciphertext: Ciphertext,
        context: &EncryptionContext,
    ) -> Result<Opened> {
        let envelope = self.parse(ciphertext)?;
        self.open(&envelope, context, Caching::Use).await
    }

    /// Decrypts a stored ciphertext (either form) bound to `context`.
    pub async fn open_stored(
        &self,
        envelope: &Envelope,
        context: &EncryptionContext,
    ) -> Result<Opened> {
        self.open(envelope, context, Caching::Use).await
    }

    /// Decrypts a stored row with a fresh KMS call (rotation's dry run).
    pub async fn verify(&self, envelope: &Envelope, context: &EncryptionContext) -> Result<()> {
        self.open(envelope, context, Caching::Bypass)
            .await
            .map(drop)
    }

    /// Decrypts a stored row and encrypts it again under `target` with a
    /// fresh data key (REENCRYPT rotation; legacy rows included).
    pub async fn reencrypt(
        &self,
        envelope: &Envelope,
        context: &EncryptionContext,
        target: &Arc<KeyRecord>,
    ) -> Result<Envelope> {
        let opened = self.open(envelope, context, Caching::Bypass).await?;
        let sealed = self
            .seal(
                Arc::clone(target),
                opened.plaintext.as_bytes(),
                context,
                Caching::Bypass,
            )
            .await?;
        Ok(sealed.envelope)
    }

    async fn open(
        &self,
        envelope: &Envelope,
        context: &EncryptionContext,
        caching: Caching,
    ) -> Result<Opened> {
        // A legacy copy's layout may keep its IV inside the ciphertext:
        // the legacy format checks its own shape.
        if envelope.encryption_key_id.is_empty() {
            return self.decrypt_legacy(envelope);
        }
        check_payload_shape(envelope)?;
        let key = self.key_of(envelope).await?;
        self.open_under(key, envelope, context, caching).await
    }

    /// Decrypts a stored ciphertext of key record `key` with a fresh KMS
    /// call, without looking the key up (a key's probe, a sample of its
    /// rows: `service::probes`).
    pub async fn verify_under(
        &self,
        key: &Arc<KeyRecord>,
        envelope: &Envelope,
        context: &EncryptionContext,
    ) -> Result<()> {
        check_payload_shape(envelope)?;
        if envelope.encryption_key_id != key.id || envelope.data_key_ciphertext.is_empty() {
            return Err(Error::MalformedEnvelope(
                "the ciphertext names another key record, or has no data key",
            ));
        }
        self.open_under(Arc::clone(key), envelope, context, Caching::Bypass)
            .await
            .map(drop)
    }

    async fn open_under(
        &self,
        key: Arc<KeyRecord>,
        envelope: &Envelope,
        context: &EncryptionContext,
        caching: Caching,
    ) -> Result<Opened> {
        let data_key = self
            .unwrap_data_key(&key, envelope, context, caching)
            .await?;
        let plaintext = open_payload(
            &data_key,
            context,
            &envelope.payload_iv,
            &envelope.payload_ciphertext,
        )
        .map_err(|_| Error::DecryptionFailed)?;
        Ok(Opened {
            plaintext,
            key: Some(key),
        })
    }

    /// Moves an envelope's data key under `target` without touching the
    /// payload (REWRAP rotation).
    ///
    /// Between two keys of a provider that can move a wrapped key itself
    /// (AWS KMS `ReEncrypt`), the plaintext data key never reaches keyward,
    /// and so the payload cannot be checked on the way: a row whose payload
    /// was already corrupt stays corrupt (a dry run finds it). Otherwise the
    /// data key is unwrapped, the payload opened (so a corrupt row fails
    /// here instead of being carried over) and the key wrapped under
    /// `target`.
    pub async fn rewrap(
        &self,
        envelope: Envelope,
        context: &EncryptionContext,
        target: &Arc<KeyRecord>,
    ) -> Result<Envelope> {
        check_payload_shape(&envelope)?;
        let source = self.key_of(&envelope).await?;
        let target_provider = self.provider(target)?;
        let moved = if source.provider == target.provider {
            target_provider
                .reencrypt_data_key(
                    source.kek(),
                    &envelope.data_key_ciphertext,
                    &envelope.data_key_iv,
                    target.kek(),
                    context,
                )
                .await
                .map_err(unwrap_error)?
        } else {
            None
        };
        let wrapped: WrappedKey = match moved {
            Some(wrapped) => wrapped,
            None => {
                let data_key = self
                    .unwrap_data_key(&source, &envelope, context, Caching::Bypass)
                    .await?;
                open_payload(
                    &data_key,
                    context,
                    &envelope.payload_iv,
                    &envelope.payload_ciphertext,
                )
                .map_err(|_| Error::DecryptionFailed)?;
                target_provider
                    .wrap_data_key(target.kek(), &data_key, context)
                    .await?
            }
        };
        Ok(Envelope {
            encryption_key_id: target.id.clone(),
            data_key_ciphertext: wrapped.ciphertext,
            data_key_iv: wrapped.iv,
            ..envelope
        })
    }

    /// Moves a caller's ciphertext to the active key without returning its
    /// plaintext (Crypto/Rewrap), bound to the same `context`: an envelope
    /// has its data key rewrapped ([`Self::rewrap`]; AWS KMS ReEncrypt
    /// between two aws-kms keys, so the data key never leaves the KMS); a
    /// legacy ciphertext is sealed into an envelope. One already on the
    /// active key and wrapped under the current key-encryption key is only
    /// checked to open under `context` and comes back as given. `allowed`
    /// decides whether the caller may use the active key.
    pub async fn rewrap_to_active(
        &self,
        envelope: Envelope,
        context: &EncryptionContext,
        allowed: impl Fn(&KeyRecord) -> bool,
    ) -> Result<Rewrapped> {
        if let Some(reason) = self.foreign.load().as_deref() {
            return Err(Error::NotServing(reason.clone()));
        }
        let key = self.catalog.active().ok_or(Error::NoActiveKey)?;
        if !allowed(&key) {
            return Err(crate::auth::AuthError::Denied(
                "the caller may not use the active key, which a rewrap moves the ciphertext to"
                    .into(),
            )
            .into());
        }
        if envelope.encryption_key_id.is_empty() {
            let envelope = self.reencrypt(&envelope, context, &key).await?;
            return Ok(Rewrapped::new(envelope, key, true));
        }
        let current_wrap = self
            .wrap_tag_of(&key)
            .is_none_or(|tag| envelope.data_key_ciphertext.starts_with(&tag));
        if envelope.encryption_key_id == key.id && current_wrap {
            self.open(&envelope, context, Caching::Use).await?;
            return Ok(Rewrapped::new(envelope, key, false));
        }
        let envelope = self.rewrap(envelope, context, &key).await?;
        Ok(Rewrapped::new(envelope, key, true))
    }

    /// Checks `key`'s KMS key is enabled, then round-trips a random probe
    /// through its provider (never through the cache).
    pub async fn round_trip(&self, key: &Arc<KeyRecord>) -> Result<()> {
        self.check_kms_key(key).await?;
        let context = EncryptionContext::from_pairs([(SELF_TEST_CONTEXT_KEY, key.id.as_str())])?;
        let mut probe = [0u8; 32];
        OsRng.fill_bytes(&mut probe);
        let sealed = self.encrypt_with(key, &probe, &context).await?;
        let data_key = self
            .provider(key)?
            .decrypt_data_key(
                key.kek(),
                &sealed.envelope.data_key_ciphertext,
                &sealed.envelope.data_key_iv,
                &context,
            )
            .await?;
        let opened = open_payload(
            &data_key,
            &context,
            &sealed.envelope.payload_iv,
            &sealed.envelope.payload_ciphertext,
        )
        .map_err(|_| Error::DecryptionFailed)?;
        if opened.as_bytes() == probe {
            Ok(())
        } else {
            Err(Error::DecryptionFailed)
        }
    }

    /// The key record an (enveloped, non-legacy) ciphertext names.
    async fn key_of(&self, envelope: &Envelope) -> Result<Arc<KeyRecord>> {
        if envelope.data_key_ciphertext.is_empty() {
            return Err(Error::MalformedEnvelope("data_key_ciphertext is empty"));
        }
        self.lookup_key(&envelope.encryption_key_id)
            .await?
            .ok_or_else(|| Error::UnknownKey(envelope.encryption_key_id.clone()))
    }

    /// Unwraps the envelope's data key under `key`, through the cache when
    /// `caching` allows and the provider is cached. Any authentication
    /// failure is [`Error::DecryptionFailed`].
    async fn unwrap_data_key(
        &self,
        key: &KeyRecord,
        envelope: &Envelope,
        context: &EncryptionContext,
        caching: Caching,
    ) -> Result<Arc<SecretKey>> {
        let provider = self.provider(key)?;
        let unwrap = || async {
            provider
                .decrypt_data_key(
                    key.kek(),
                    &envelope.data_key_ciphertext,
                    &envelope.data_key_iv,
                    context,
                )
                .await
        };
        let result = if caching == Caching::Use && self.cache.settings().applies_to(key.provider) {
            self.cache
                .data_key_for_decrypt(
                    key.kek(),
                    &envelope.data_key_ciphertext,
                    &envelope.data_key_iv,
                    context,
                    unwrap,
                )
                .await
        } else {
            unwrap().await.map(Arc::new)
        };
        result.map_err(unwrap_error)
    }

    fn decrypt_legacy(&self, envelope: &Envelope) -> Result<Opened> {
        if !envelope.data_key_ciphertext.is_empty() || !envelope.data_key_iv.is_empty() {
            return Err(Error::MalformedEnvelope(
                "encryption_key_id is empty but a data key is set",
            ));
        }
        let legacy = self.legacy.as_ref().ok_or(Error::LegacyUnavailable)?;
        if legacy.format().layout == LegacyLayout::Separate {
            check_payload_shape(envelope)?;
        }
        let plaintext = legacy
            .decrypt(&envelope.payload_iv, &envelope.payload_ciphertext)
            .map_err(|_| Error::DecryptionFailed)?;
        Ok(Opened {
            plaintext,
            key: None,
        })
    }

    fn check_plaintext(&self, plaintext: &[u8]) -> Result<()> {
        if plaintext.is_empty() {
            return Err(Error::EmptyPlaintext);
        }
        if plaintext.len() > self.limits.max_plaintext_bytes {
            return Err(Error::PlaintextTooLarge {
                len: plaintext.len(),
                max: self.limits.max_plaintext_bytes,
            });
        }
        Ok(())
    }

    /// Asks the key's KMS whether its key is usable (enabled, reachable):
    /// one call (`DescribeKey` on AWS KMS), no data key.
    pub async fn check_kms_key(&self, key: &KeyRecord) -> Result<()> {
        Ok(self.provider(key)?.check_key(key.kek()).await?)
    }

    fn provider(&self, key: &KeyRecord) -> Result<&dyn KmsProvider> {
        self.kms
            .get(key.provider)
            .ok_or(Error::ProviderUnavailable(key.provider))
    }
}

/// A KMS failure to unwrap is a decryption failure; the rest stay KMS errors.
fn unwrap_error(err: KmsError) -> Error {
    match err {
        KmsError::UnwrapFailed => Error::DecryptionFailed,
        other => Error::Kms(other),
    }
}

/// Cheap shape checks before any KMS call, so obviously broken envelopes
/// fail with a precise message instead of a generic authentication error.
fn check_payload_shape(envelope: &Envelope) -> Result<()> {
    if envelope.payload_iv.len() != NONCE_LEN {
        return Err(Error::MalformedEnvelope("payload_iv must be 12 bytes"));
    }
    if envelope.payload_ciphertext.len() < TAG_LEN {
        return Err(Error::MalformedEnvelope(
            "payload_ciphertext is shorter than its 16-byte tag",
        ));
    }
    Ok(())
}
