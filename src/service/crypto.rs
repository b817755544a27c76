//! Encrypt and Decrypt: the hot path.
//!
//! Encrypt reads the active key from the in-memory catalog, asks its KMS
//! provider for a fresh data key, and seals the payload; no database round
//! trip. Decrypt parses either envelope form, finds the key record in the
//! catalog, unwraps the data key and opens the payload; legacy ciphertexts
//! go to the key derived from the master secret.

use std::sync::Arc;

use rand::{rngs::OsRng, RngCore};

use crate::{
    crypto::{
        aead::{NONCE_LEN, TAG_LEN},
        blob,
        context::EncryptionContext,
        envelope::{open_payload, seal_payload, Envelope},
        kms::{KmsError, KmsProvider, KmsRegistry},
        legacy::LegacyKeys,
        secret::{Plaintext, SecretKey},
    },
    error::{Error, Result},
    keys::{KeyCatalog, KeyRecord},
};

/// Request-size limits of the crypto service.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest plaintext Encrypt accepts.
    pub max_plaintext_bytes: usize,
    /// Most items a batch request may carry.
    pub max_batch_items: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_plaintext_bytes: 64 * 1024,
            max_batch_items: 1000,
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

impl Sealed {
    /// The one-column form of the envelope.
    pub fn blob(&self) -> Result<Vec<u8>> {
        Ok(blob::encode(&self.envelope)?)
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

pub struct CryptoService {
    catalog: Arc<KeyCatalog>,
    kms: KmsRegistry,
    legacy: Option<LegacyKeys>,
    limits: Limits,
}

impl CryptoService {
    pub fn new(
        catalog: Arc<KeyCatalog>,
        kms: KmsRegistry,
        legacy: Option<LegacyKeys>,
        limits: Limits,
    ) -> Self {
        Self {
            catalog,
            kms,
            legacy,
            limits,
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
        self.check_plaintext(plaintext)?;
        let catalog = self.catalog.snapshot();
        let key = catalog.active().ok_or(Error::NoActiveKey)?;
        self.encrypt_with(key, plaintext, context).await
    }

    /// Encrypts under a given key record (rotation targets, self-test).
    pub async fn encrypt_with(
        &self,
        key: &Arc<KeyRecord>,
        plaintext: &[u8],
        context: &EncryptionContext,
    ) -> Result<Sealed> {
        let data_key = self
            .provider(key)?
            .generate_data_key(key.kek(), context)
            .await?;
        let (payload_iv, payload_ciphertext) =
            seal_payload(&data_key.plaintext, context, plaintext);
        let envelope = Envelope {
            encryption_key_id: key.id.clone(),
            data_key_ciphertext: data_key.wrapped.ciphertext,
            data_key_iv: data_key.wrapped.iv,
            payload_ciphertext,
            payload_iv: payload_iv.to_vec(),
        };
        Ok(Sealed {
            envelope,
            key: Arc::clone(key),
        })
    }

    /// Decrypts either form of a ciphertext bound to `context`.
    pub async fn decrypt(
        &self,
        ciphertext: Ciphertext,
        context: &EncryptionContext,
    ) -> Result<Opened> {
        let envelope = match ciphertext {
            Ciphertext::Blob(bytes) => blob::parse(&bytes)?,
            Ciphertext::Envelope(envelope) => envelope,
        };
        check_payload_shape(&envelope)?;
        if envelope.encryption_key_id.is_empty() {
            return self.decrypt_legacy(&envelope);
        }
        let key = self.key_of(&envelope)?;
        let (_, plaintext) = self.open_with(&key, &envelope, context).await?;
        Ok(Opened {
            plaintext,
            key: Some(key),
        })
    }

    /// Moves an envelope's data key under `target` without touching the
    /// payload (REWRAP rotation). The payload is opened first, so a corrupt
    /// row fails here instead of being carried over.
    pub async fn rewrap(
        &self,
        envelope: Envelope,
        context: &EncryptionContext,
        target: &Arc<KeyRecord>,
    ) -> Result<Envelope> {
        check_payload_shape(&envelope)?;
        let source = self.key_of(&envelope)?;
        let (data_key, _) = self.open_with(&source, &envelope, context).await?;
        let wrapped = self
            .provider(target)?
            .wrap_data_key(target.kek(), &data_key, context)
            .await?;
        Ok(Envelope {
            encryption_key_id: target.id.clone(),
            data_key_ciphertext: wrapped.ciphertext,
            data_key_iv: wrapped.iv,
            ..envelope
        })
    }

    /// Round-trips a random probe through `key`'s KMS provider.
    pub async fn round_trip(&self, key: &Arc<KeyRecord>) -> Result<()> {
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
    fn key_of(&self, envelope: &Envelope) -> Result<Arc<KeyRecord>> {
        if envelope.data_key_ciphertext.is_empty() {
            return Err(Error::MalformedEnvelope("data_key_ciphertext is empty"));
        }
        self.catalog
            .snapshot()
            .get(&envelope.encryption_key_id)
            .cloned()
            .ok_or_else(|| Error::UnknownKey(envelope.encryption_key_id.clone()))
    }

    /// Unwraps the envelope's data key under `key` and opens the payload.
    /// Any authentication failure is [`Error::DecryptionFailed`].
    async fn open_with(
        &self,
        key: &KeyRecord,
        envelope: &Envelope,
        context: &EncryptionContext,
    ) -> Result<(SecretKey, Plaintext)> {
        let data_key = self
            .provider(key)?
            .decrypt_data_key(
                key.kek(),
                &envelope.data_key_ciphertext,
                &envelope.data_key_iv,
                context,
            )
            .await
            .map_err(|err| match err {
                KmsError::UnwrapFailed => Error::DecryptionFailed,
                other => Error::Kms(other),
            })?;
        let plaintext = open_payload(
            &data_key,
            context,
            &envelope.payload_iv,
            &envelope.payload_ciphertext,
        )
        .map_err(|_| Error::DecryptionFailed)?;
        Ok((data_key, plaintext))
    }

    fn decrypt_legacy(&self, envelope: &Envelope) -> Result<Opened> {
        if !envelope.data_key_ciphertext.is_empty() || !envelope.data_key_iv.is_empty() {
            return Err(Error::MalformedEnvelope(
                "encryption_key_id is empty but a data key is set",
            ));
        }
        let legacy = self.legacy.as_ref().ok_or(Error::LegacyUnavailable)?;
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

    fn provider(&self, key: &KeyRecord) -> Result<&dyn KmsProvider> {
        self.kms
            .get(key.provider)
            .ok_or(Error::ProviderUnavailable(key.provider))
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
