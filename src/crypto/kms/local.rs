//! The built-in local KMS, the embedded default.
//!
//! Each KEK is derived from a master secret with HKDF-SHA256 (salt
//! `keyward.local-kms.v1`, info = the record's `kms_key_arn`), so each key
//! record gets its own KEK and no KEK is ever stored. Data keys are wrapped
//! with AES-256-GCM; the wrap's nonce is returned as `data_key_iv`, and its
//! AAD binds the KEK name, the key record id and the encryption context.
//!
//! Several master secrets may be configured (current first, then the
//! previous ones), and all of them unwrap. A data key is wrapped under one
//! of them, and its wrapped bytes begin with a header naming that secret by
//! its fingerprint ([`WRAP_TAG_LEN`] bytes: `K`, version 1, the
//! fingerprint), so a rotation can find the rows a previous secret still
//! holds and the operator can tell when it may go (runbook §2.1). Keys
//! wrapped before the header existed (48 bytes, no header) still unwrap by
//! trying every secret.
//!
//! Which secret wraps is [`Wrapping`], set by the replica agent from the
//! fingerprints every live replica reports ([`choose_wrapping`]): a new
//! secret wraps only once every replica can unwrap under it.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use hkdf::Hkdf;
use sha2::Sha256;

use super::{GeneratedKey, KekRef, KmsError, KmsProvider, ProviderKind, WrappedKey};
use crate::crypto::{
    aead::Cipher,
    context::{put_bytes, EncryptionContext},
    secret::{Fingerprint, MasterSecret, SecretKey, KEY_LEN},
};

const KEK_SALT: &[u8] = b"keyward.local-kms.v1";
const WRAP_AAD_LABEL: &[u8] = b"keyward.local-wrap.v1";
/// The first bytes of a tagged wrapped key: a mark and the format version.
const TAG_MARK: [u8; 2] = [b'K', 1];
/// Length of a wrapped key's header: mark, version, fingerprint.
pub const WRAP_TAG_LEN: usize = TAG_MARK.len() + Fingerprint::LEN;
/// A wrapped data key without header: the key and the GCM tag.
const UNTAGGED_LEN: usize = KEY_LEN + 16;

/// Which master secret wraps new data keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wrapping {
    /// The secret at this index (0: the current one), with the header.
    Tagged(usize),
    /// The current secret, without the header: the only form a keyward
    /// from before fingerprints reads, while one still runs.
    Untagged,
}

impl Wrapping {
    fn encode(self) -> usize {
        match self {
            Wrapping::Tagged(index) => index,
            Wrapping::Untagged => usize::MAX,
        }
    }

    fn decode(value: usize) -> Self {
        match value {
            usize::MAX => Wrapping::Untagged,
            index => Wrapping::Tagged(index),
        }
    }
}

/// Which of `mine` (this process's secrets, current first) wraps new data
/// keys, given the fingerprints each other live replica reports (`None`:
/// a keyward from before fingerprints; empty: no master secret, so no
/// local key to read). The first secret that every replica has; untagged
/// while an older keyward runs. With no secret in common (replicas on
/// unrelated secrets, which their key checks report), the current one.
pub fn choose_wrapping(mine: &[Fingerprint], others: &[Option<Vec<Fingerprint>>]) -> Wrapping {
    if others.iter().any(Option::is_none) {
        return Wrapping::Untagged;
    }
    let everywhere = |fp: &Fingerprint| {
        others
            .iter()
            .flatten()
            .filter(|theirs| !theirs.is_empty())
            .all(|theirs| theirs.contains(fp))
    };
    Wrapping::Tagged(mine.iter().position(everywhere).unwrap_or(0))
}

/// The master secret a wrapped data key names in its header; `None` for a
/// key wrapped without one (or not by the local KMS).
pub fn wrapped_by(wrapped_key: &[u8]) -> Option<Fingerprint> {
    tag_names(split_tag(wrapped_key)?.0)
}

/// The master secret a wrap tag ([`KmsProvider::wrap_tag`], the first
/// [`WRAP_TAG_LEN`] bytes of a wrapped key) names.
pub fn tag_names(tag: &[u8]) -> Option<Fingerprint> {
    let fingerprint = tag.strip_prefix(&TAG_MARK)?;
    Some(Fingerprint(fingerprint.try_into().ok()?))
}

/// `(header, rest)` of a tagged wrapped key.
fn split_tag(wrapped_key: &[u8]) -> Option<(&[u8], &[u8])> {
    (wrapped_key.len() == WRAP_TAG_LEN + UNTAGGED_LEN && wrapped_key.starts_with(&TAG_MARK))
        .then(|| wrapped_key.split_at(WRAP_TAG_LEN))
}

fn tag_of(fingerprint: Fingerprint) -> Vec<u8> {
    let mut tag = Vec::with_capacity(WRAP_TAG_LEN);
    tag.extend_from_slice(&TAG_MARK);
    tag.extend_from_slice(&fingerprint.0);
    tag
}

/// The local KMS. Cheap to clone; clones share the wrapping choice.
#[derive(Clone)]
pub struct LocalKms {
    masters: Arc<[MasterSecret]>,
    fingerprints: Arc<[Fingerprint]>,
    /// [`Wrapping`], encoded.
    wrapping: Arc<AtomicUsize>,
    /// The KEKs derived so far, one per master secret, by key name. Read on
    /// every call without a lock; a new key name copies the map once.
    keks: Arc<ArcSwap<HashMap<String, Arc<[Cipher]>>>>,
}

impl LocalKms {
    /// `current` wraps new keys (until [`Self::set_wrapping`] says
    /// otherwise); `previous` only unwrap.
    pub fn new(current: MasterSecret, previous: Vec<MasterSecret>) -> Self {
        let masters: Vec<MasterSecret> = std::iter::once(current).chain(previous).collect();
        Self {
            fingerprints: masters.iter().map(MasterSecret::fingerprint).collect(),
            masters: masters.into(),
            wrapping: Arc::new(AtomicUsize::new(Wrapping::Tagged(0).encode())),
            keks: Arc::default(),
        }
    }

    /// The fingerprints of this process's secrets, current first.
    pub fn fingerprints(&self) -> &[Fingerprint] {
        &self.fingerprints
    }

    /// Which secret wraps new data keys now.
    pub fn wrapping(&self) -> Wrapping {
        Wrapping::decode(self.wrapping.load(Ordering::Acquire))
    }

    /// Wraps new data keys as `wrapping` says (an index past the secrets
    /// means the current one); returns whether that changed.
    pub fn set_wrapping(&self, wrapping: Wrapping) -> bool {
        let wrapping = match wrapping {
            Wrapping::Tagged(index) if index >= self.masters.len() => Wrapping::Tagged(0),
            other => other,
        };
        self.wrapping.swap(wrapping.encode(), Ordering::AcqRel) != wrapping.encode()
    }

    /// The fingerprint of the secret that wraps new data keys now.
    pub fn wrapping_fingerprint(&self) -> Option<Fingerprint> {
        self.fingerprints.get(self.wrapping_now().0).copied()
    }

    /// The index of the secret that wraps now and the header its keys
    /// begin with (empty when untagged), from one read of [`Wrapping`].
    fn wrapping_now(&self) -> (usize, Vec<u8>) {
        match self.wrapping() {
            Wrapping::Tagged(index) => (
                index,
                self.fingerprints
                    .get(index)
                    .map(|fp| tag_of(*fp))
                    .unwrap_or_default(),
            ),
            Wrapping::Untagged => (0, Vec::new()),
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

    /// Wraps `data_key` under the KEK of the secret [`Self::wrapping`] names.
    fn wrap(
        &self,
        kek: KekRef<'_>,
        data_key: &SecretKey,
        context: &EncryptionContext,
    ) -> Result<WrappedKey, KmsError> {
        check_ref(kek)?;
        let (index, header) = self.wrapping_now();
        let aad = wrap_aad(kek, context, &header);
        let (iv, sealed) = self.with_keks(kek.kms_key_arn, |keks| {
            keks.get(index)
                .map(|cipher| cipher.seal(data_key.expose(), &aad))
                .ok_or(KmsError::Unavailable {
                    reason: "the local KMS has no master secret".into(),
                })
        })?;
        let mut ciphertext = header;
        ciphertext.extend_from_slice(&sealed);
        Ok(WrappedKey {
            ciphertext,
            iv: iv.to_vec(),
        })
    }

    /// Unwraps a data key: under the secret its header names, or, without
    /// a header, under whichever secret authenticates it.
    fn unwrap(
        &self,
        kek: KekRef<'_>,
        wrapped_key: &[u8],
        wrapped_iv: &[u8],
        context: &EncryptionContext,
    ) -> Option<SecretKey> {
        let plain = match split_tag(wrapped_key) {
            Some((tag, sealed)) => {
                let fingerprint = wrapped_by(wrapped_key)?;
                let index = self.fingerprints.iter().position(|fp| *fp == fingerprint)?;
                let aad = wrap_aad(kek, context, tag);
                self.with_keks(kek.kms_key_arn, |keks| {
                    keks.get(index)?.open(wrapped_iv, sealed, &aad).ok()
                })?
            }
            None => {
                let aad = wrap_aad(kek, context, &[]);
                self.with_keks(kek.kms_key_arn, |keks| {
                    keks.iter()
                        .find_map(|cipher| cipher.open(wrapped_iv, wrapped_key, &aad).ok())
                })?
            }
        };
        SecretKey::from_slice(plain.as_bytes())
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

/// The wrap's AAD: label, the wrapped key's header (empty for an untagged
/// key, so those keep their AAD), KEK name, record id, context.
fn wrap_aad(kek: KekRef<'_>, context: &EncryptionContext, header: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(
        WRAP_AAD_LABEL.len()
            + header.len()
            + 8
            + kek.kms_key_arn.len()
            + kek.record_id.len()
            + context.canonical_len(),
    );
    aad.extend_from_slice(WRAP_AAD_LABEL);
    aad.extend_from_slice(header);
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

    fn wrap_tag(&self) -> Option<Vec<u8>> {
        let (_, header) = self.wrapping_now();
        (!header.is_empty()).then_some(header)
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
        self.unwrap(kek, wrapped_key, wrapped_iv, context)
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

    #[tokio::test]
    async fn a_wrapped_key_names_its_master_secret() {
        let (new, old) = (
            master("the-new-master-secret"),
            master("the-old-master-secret"),
        );
        let kms = LocalKms::new(new.clone(), vec![old.clone()]);
        let tagged = kms.generate_data_key(KEK, &ctx()).await.unwrap().wrapped;
        assert_eq!(wrapped_by(&tagged.ciphertext), Some(new.fingerprint()));
        assert_eq!(kms.wrap_tag().unwrap(), tagged.ciphertext[..WRAP_TAG_LEN]);

        // Until every replica has the new secret, the old one wraps.
        assert!(kms.set_wrapping(Wrapping::Tagged(1)));
        assert!(!kms.set_wrapping(Wrapping::Tagged(1)));
        let under_old = kms.generate_data_key(KEK, &ctx()).await.unwrap();
        let w = &under_old.wrapped;
        assert_eq!(wrapped_by(&w.ciphertext), Some(old.fingerprint()));
        let only_old = LocalKms::new(old.clone(), vec![]);
        let back = only_old
            .decrypt_data_key(KEK, &w.ciphertext, &w.iv, &ctx())
            .await
            .unwrap();
        assert_eq!(back.expose(), under_old.plaintext.expose());

        // The header is authenticated: naming another secret fails.
        let mut renamed = w.ciphertext.clone();
        renamed[2..WRAP_TAG_LEN].copy_from_slice(&new.fingerprint().0);
        let err = kms.decrypt_data_key(KEK, &renamed, &w.iv, &ctx()).await;
        assert_eq!(err.unwrap_err(), KmsError::UnwrapFailed);
    }

    #[tokio::test]
    async fn untagged_keys_are_the_format_before_fingerprints() {
        let kms = LocalKms::new(master("the-new-master-secret"), vec![]);
        kms.set_wrapping(Wrapping::Untagged);
        assert_eq!(kms.wrap_tag(), None);
        let key = kms.generate_data_key(KEK, &ctx()).await.unwrap();
        let w = &key.wrapped;
        assert_eq!(w.ciphertext.len(), UNTAGGED_LEN);
        assert_eq!(wrapped_by(&w.ciphertext), None);
        kms.set_wrapping(Wrapping::Tagged(0));
        let back = kms
            .decrypt_data_key(KEK, &w.ciphertext, &w.iv, &ctx())
            .await
            .unwrap();
        assert_eq!(back.expose(), key.plaintext.expose());
    }

    #[test]
    fn a_new_secret_wraps_once_every_replica_has_it() {
        let (a, b) = (
            master("master-secret-a-0123").fingerprint(),
            master("master-secret-b-0123").fingerprint(),
        );
        let mine = [b, a];
        // Alone: the current secret.
        assert_eq!(choose_wrapping(&mine, &[]), Wrapping::Tagged(0));
        // Another replica still on A only: A, the one both have.
        assert_eq!(
            choose_wrapping(&mine, &[Some(vec![a])]),
            Wrapping::Tagged(1)
        );
        // Both restarted with B: B.
        assert_eq!(
            choose_wrapping(&mine, &[Some(vec![b, a])]),
            Wrapping::Tagged(0)
        );
        // A keyward from before fingerprints: the form it reads.
        assert_eq!(
            choose_wrapping(&mine, &[Some(vec![b, a]), None]),
            Wrapping::Untagged
        );
        // A replica without a master secret reads no local key.
        assert_eq!(
            choose_wrapping(&mine, &[Some(vec![a]), Some(vec![])]),
            Wrapping::Tagged(1)
        );
        // Nothing in common: the current secret, as before.
        let c = master("master-secret-c-0123").fingerprint();
        assert_eq!(
            choose_wrapping(&mine, &[Some(vec![c])]),
            Wrapping::Tagged(0)
        );
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
