//! The built-in local KMS, the embedded default.
//!
//! Each KEK is derived from a master secret with HKDF-SHA256 (salt
//! `keyward.local-kms.v1`, info = the record's `kms_key_arn`), so each key
//! record gets its own KEK and no KEK is ever stored. Data keys are wrapped
//! with AES-256-GCM; the wrap's nonce is returned as `data_key_iv`, and its
//! AAD binds the KEK name, the key record id and the encryption context.
//!
//! Several master secrets may be configured: the first wraps new data keys,
//! and all of them are tried when unwrapping, so runbook §2 (a new master
//! secret is distributed) loses nothing that was wrapped under the old one.

use std::{collections::HashMap, sync::Arc};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use hkdf::Hkdf;
use sha2::Sha256;

use super::{GeneratedKey, KekRef, KmsError, KmsProvider, ProviderKind, WrappedKey};
use crate::crypto::{
    aead::Cipher,
    context::{put_bytes, EncryptionContext},
    secret::{MasterSecret, SecretKey, KEY_LEN},
};

const KEK_SALT: &[u8] = b"keyward.local-kms.v1";
const WRAP_AAD_LABEL: &[u8] = b"keyward.local-wrap.v1";

/// The local KMS. Cheap to clone.
#[derive(Clone)]
pub struct LocalKms {
    masters: Arc<[MasterSecret]>,
    /// The KEKs derived so far, one per master secret, by key name. Read on
    /// every call without a lock; a new key name copies the map once.
    keks: Arc<ArcSwap<HashMap<String, Arc<[Cipher]>>>>,
}

impl LocalKms {
    /// `current` wraps new keys; `previous` only unwrap.
    pub fn new(current: MasterSecret, previous: Vec<MasterSecret>) -> Self {
        let masters: Vec<MasterSecret> = std::iter::once(current).chain(previous).collect();
        Self {
            masters: masters.into(),
            keks: Arc::default(),
        }
    }

    /// Runs `f` on the KEK ciphers of one KMS key name, in the order of
    /// `masters`. The common case borrows them from the current map (no
    /// lock, no reference count touched); a name seen for the first time
    /// has its KEKs derived and added.
    fn with_keks<R>(&self, kms_key_arn: &str, f: impl FnOnce(&[Cipher]) -> R) -> R {
        if let Some(found) = self.keks.load().get(kms_key_arn) {
            return f(found);
        }
        let derived: Arc<[Cipher]> = self
            .masters
            .iter()
            .map(|master| Cipher::new(&derive_kek(master, kms_key_arn)))
            .collect();
        self.keks.rcu(|keks| {
            let mut keks = HashMap::clone(keks);
            keks.entry(kms_key_arn.to_owned())
                .or_insert_with(|| Arc::clone(&derived));
            keks
        });
        f(&derived)
    }

    /// Wraps `data_key` under the current master secret's KEK.
    fn wrap(
        &self,
        kek: KekRef<'_>,
        data_key: &SecretKey,
        context: &EncryptionContext,
    ) -> Result<WrappedKey, KmsError> {
        check_ref(kek)?;
        let aad = wrap_aad(kek, context);
        let (iv, ciphertext) = self.with_keks(kek.kms_key_arn, |keks| {
            keks.first()
                .map(|current| current.seal(data_key.expose(), &aad))
                .ok_or(KmsError::Unavailable {
                    reason: "the local KMS has no master secret".into(),
                })
        })?;
        Ok(WrappedKey {
            ciphertext,
            iv: iv.to_vec(),
        })
    }
}

/// HKDF-SHA256(master, salt = "keyward.local-kms.v1", info = kms_key_arn).
fn derive_kek(master: &MasterSecret, kms_key_arn: &str) -> SecretKey {
    let hk = Hkdf::<Sha256>::new(Some(KEK_SALT), master.expose());
    SecretKey::derive_with(|out: &mut [u8; KEY_LEN]| {
        // 32 bytes is far below HKDF-SHA256's 8160-byte limit, so expand
        // cannot fail; a failure would leave an all-zero key that no real
        // wrap authenticates under.
        let _ = hk.expand(kms_key_arn.as_bytes(), out);
    })
}

fn wrap_aad(kek: KekRef<'_>, context: &EncryptionContext) -> Vec<u8> {
    let mut aad = Vec::with_capacity(
        WRAP_AAD_LABEL.len()
            + 8
            + kek.kms_key_arn.len()
            + kek.record_id.len()
            + context.canonical_len(),
    );
    aad.extend_from_slice(WRAP_AAD_LABEL);
    put_bytes(&mut aad, kek.kms_key_arn.as_bytes());
    put_bytes(&mut aad, kek.record_id.as_bytes());
    context.write_canonical(&mut aad);
    aad
}

fn check_ref(kek: KekRef<'_>) -> Result<(), KmsError> {
    if kek.kms_key_arn.trim().is_empty() {
        return Err(KmsError::InvalidKeyRef {
            key: kek.kms_key_arn.to_owned(),
            reason: "the local KMS needs a non-empty key name",
        });
    }
    Ok(())
}

#[async_trait]
impl KmsProvider for LocalKms {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Local
    }

    async fn generate_data_key(
        &self,
        kek: KekRef<'_>,
        context: &EncryptionContext,
    ) -> Result<GeneratedKey, KmsError> {
        let plaintext = SecretKey::generate();
        let wrapped = self.wrap(kek, &plaintext, context)?;
        Ok(GeneratedKey { plaintext, wrapped })
    }

    async fn wrap_data_key(
        &self,
        kek: KekRef<'_>,
        data_key: &SecretKey,
        context: &EncryptionContext,
    ) -> Result<WrappedKey, KmsError> {
        self.wrap(kek, data_key, context)
    }

    async fn decrypt_data_key(
        &self,
        kek: KekRef<'_>,
        wrapped_key: &[u8],
        wrapped_iv: &[u8],
        context: &EncryptionContext,
    ) -> Result<SecretKey, KmsError> {
        check_ref(kek)?;
        let aad = wrap_aad(kek, context);
        self.with_keks(kek.kms_key_arn, |keks| {
            keks.iter()
                .find_map(|cipher| cipher.open(wrapped_iv, wrapped_key, &aad).ok())
        })
        .and_then(|plain| SecretKey::from_slice(plain.as_bytes()))
        .ok_or(KmsError::UnwrapFailed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn master(s: &str) -> MasterSecret {
        MasterSecret::new(s).unwrap()
    }

    const KEK: KekRef<'static> = KekRef {
        record_id: "rec-1",
        kms_key_arn: "local:default",
    };

    fn ctx() -> EncryptionContext {
        EncryptionContext::from_pairs([("connection_id", "42")]).unwrap()
    }

    #[tokio::test]
    async fn wrap_round_trip_is_bound_to_kek_record_and_context() {
        let kms = LocalKms::new(master("master-secret-one!"), vec![]);
        let key = kms.generate_data_key(KEK, &ctx()).await.unwrap();
        let w = &key.wrapped;
        let back = kms
            .decrypt_data_key(KEK, &w.ciphertext, &w.iv, &ctx())
            .await
            .unwrap();
        assert_eq!(back.expose(), key.plaintext.expose());

        let other_arn = KekRef {
            kms_key_arn: "local:other",
            ..KEK
        };
        let other_rec = KekRef {
            record_id: "rec-2",
            ..KEK
        };
        for kek in [other_arn, other_rec] {
            let err = kms
                .decrypt_data_key(kek, &w.ciphertext, &w.iv, &ctx())
                .await;
            assert_eq!(err.unwrap_err(), KmsError::UnwrapFailed);
        }
        let err = kms
            .decrypt_data_key(KEK, &w.ciphertext, &w.iv, &EncryptionContext::empty())
            .await;
        assert_eq!(err.unwrap_err(), KmsError::UnwrapFailed);
    }

    #[tokio::test]
    async fn previous_master_secret_still_unwraps() {
        let old = LocalKms::new(master("the-old-master-secret"), vec![]);
        let key = old.generate_data_key(KEK, &ctx()).await.unwrap();
        let w = &key.wrapped;

        let rotated = LocalKms::new(
            master("the-new-master-secret"),
            vec![master("the-old-master-secret")],
        );
        let back = rotated
            .decrypt_data_key(KEK, &w.ciphertext, &w.iv, &ctx())
            .await
            .unwrap();
        assert_eq!(back.expose(), key.plaintext.expose());

        let forgotten = LocalKms::new(master("the-new-master-secret"), vec![]);
        assert!(forgotten
            .decrypt_data_key(KEK, &w.ciphertext, &w.iv, &ctx())
            .await
            .is_err());
    }

    #[test]
    fn keks_differ_per_key_name() {
        let m = master("master-secret-one!");
        assert_ne!(
            derive_kek(&m, "local:a").expose(),
            derive_kek(&m, "local:b").expose()
        );
    }
}
