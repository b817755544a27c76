//! AES-256-GCM with random 96-bit nonces: the one AEAD keyward uses for
//! payloads, local key wrapping and the legacy format.
//!
//! The implementation is AWS-LC's (`aws-lc-rs`, which TLS and the AWS SDK
//! already build): its AVX-512/VAES code seals a 1 KiB payload under a
//! fresh key in 0.4 µs where the pure-Rust `aes-gcm` crate took 0.8 µs
//! alone in a loop; inside the server the crypto of a BatchEncrypt item
//! went from 0.55 to 0.45 µs (perf). The key schedule is the only copy of
//! the key aws-lc-rs keeps: it lives in memory AWS-LC allocates and
//! cleanses when it frees it (`OPENSSL_free`), when the `Cipher` is dropped.

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use rand::RngCore;
use zeroize::Zeroize;

use super::secret::{Plaintext, SecretKey};

/// Nonce length: 96 bits, the GCM standard.
pub const NONCE_LEN: usize = 12;
/// Authentication tag length appended to every ciphertext.
pub const TAG_LEN: usize = 16;

/// The ciphertext could not be authenticated: wrong key, wrong AAD, a
/// modified ciphertext or a malformed nonce. Deliberately says no more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("authentication failed")]
pub struct OpenError;

/// An AES-256-GCM key schedule, built once and reused (the local KMS keeps
/// one per key-encryption key). No `Debug`: nothing about a key is printed.
pub struct Cipher(LessSafeKey);

impl Cipher {
    pub fn new(key: &SecretKey) -> Self {
        match UnboundKey::new(&AES_256_GCM, key.expose()) {
            Ok(key) => Self(LessSafeKey::new(key)),
            // The key is AES-256's length by its type, so AWS-LC refuses it
            // only when it cannot allocate the context: an allocation
            // failure, handled as Rust handles every other one.
            Err(_) => std::alloc::handle_alloc_error(std::alloc::Layout::new::<LessSafeKey>()),
        }
    }

    /// Encrypts under a fresh random nonce; returns (nonce, ciphertext||tag).
    pub fn seal(&self, plaintext: &[u8], aad: &[u8]) -> ([u8; NONCE_LEN], Vec<u8>) {
        let mut nonce = [0u8; NONCE_LEN];
        rand::thread_rng().fill_bytes(&mut nonce);
        let sealed = self.seal_with_nonce(&nonce, plaintext, aad);
        (nonce, sealed)
    }

    /// Encrypts under a caller-chosen nonce. Only for known-answer tests and
    /// the legacy fixture generator: reusing a nonce under one key is fatal.
    pub(crate) fn seal_with_nonce(
        &self,
        nonce: &[u8; NONCE_LEN],
        plaintext: &[u8],
        aad: &[u8],
    ) -> Vec<u8> {
        let mut sealed = Vec::with_capacity(plaintext.len() + TAG_LEN);
        sealed.extend_from_slice(plaintext);
        let nonce = Nonce::assume_unique_for_key(*nonce);
        // AES-GCM refuses only inputs over 2^36 bytes, far above any limit
        // keyward accepts. The buffer may then hold plaintext: it is wiped,
        // and the empty result fails to open instead of leaking.
        if self
            .0
            .seal_in_place_append_tag(nonce, Aad::from(aad), &mut sealed)
            .is_err()
        {
            sealed.zeroize();
        }
        sealed
    }

    /// Decrypts and authenticates ciphertext||tag.
    pub fn open(
        &self,
        nonce: &[u8],
        ciphertext: &[u8],
        aad: &[u8],
    ) -> Result<Plaintext, OpenError> {
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| OpenError)?;
        let body_len = ciphertext.len().checked_sub(TAG_LEN).ok_or(OpenError)?;
        let (body, tag) = ciphertext.split_at(body_len);
        // Decrypted straight into the zeroize-on-drop buffer it is returned
        // in; on failure whatever was written there is wiped with it.
        let mut plaintext = Plaintext::zeroed(body_len);
        self.0
            .open_separate_gather(nonce, Aad::from(aad), body, tag, plaintext.as_mut_bytes())
            .map_err(|_| OpenError)?;
        Ok(plaintext)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Project Wycheproof's AES-GCM vectors: every AES-256 vector with a
    /// 96-bit nonce and 128-bit tag must behave as the vector says (valid:
    /// seals to the same bytes and opens; invalid: refused); every AES-256
    /// vector with another nonce or tag size must be refused, since keyward
    /// accepts only the standard sizes. AES-128/192 vectors do not apply.
    #[test]
    fn wycheproof_aes_gcm_vectors() {
        let set = wycheproof::aead::TestSet::load(wycheproof::aead::TestName::AesGcm).unwrap();
        let (mut standard, mut refused) = (0, 0);
        for group in set.test_groups {
            if group.key_size != 256 {
                continue;
            }
            for test in group.tests {
                let key = SecretKey::from_slice(&test.key).unwrap();
                let cipher = Cipher::new(&key);
                let sealed: Vec<u8> = test.ct.iter().chain(test.tag.iter()).copied().collect();
                let opened = cipher.open(&test.nonce, &sealed, &test.aad);
                let standard_sizes = group.nonce_size == 96 && group.tag_size == 128;
                if standard_sizes && test.result == wycheproof::TestResult::Valid {
                    assert_eq!(
                        opened.map(|p| p.as_bytes().to_vec()).ok(),
                        Some(test.pt.to_vec()),
                        "tc {} ({})",
                        test.tc_id,
                        test.comment
                    );
                    let nonce: [u8; NONCE_LEN] = test.nonce[..].try_into().unwrap();
                    assert_eq!(
                        cipher.seal_with_nonce(&nonce, &test.pt, &test.aad),
                        sealed,
                        "tc {}",
                        test.tc_id
                    );
                    standard += 1;
                } else {
                    assert!(
                        opened.is_err(),
                        "tc {} ({}) must be refused",
                        test.tc_id,
                        test.comment
                    );
                    refused += 1;
                }
            }
        }
        assert!(
            standard > 20 && refused > 20,
            "{standard} valid, {refused} refused"
        );
        eprintln!(
            "wycheproof AES-256-GCM: {standard} valid vectors sealed and opened, {refused} refused"
        );
    }

    fn cipher() -> Cipher {
        Cipher::new(&SecretKey::generate())
    }

    #[test]
    fn round_trip_with_aad() {
        let c = cipher();
        let (nonce, ct) = c.seal(b"secret", b"aad");
        assert_eq!(ct.len(), 6 + TAG_LEN);
        assert_eq!(c.open(&nonce, &ct, b"aad").unwrap().as_bytes(), b"secret");
    }

    #[test]
    fn any_change_fails() {
        let c = cipher();
        let (nonce, ct) = c.seal(b"secret", b"aad");
        assert_eq!(c.open(&nonce, &ct, b"other"), Err(OpenError));
        let mut flipped = ct.clone();
        flipped[0] ^= 1;
        assert_eq!(c.open(&nonce, &flipped, b"aad"), Err(OpenError));
        assert_eq!(c.open(&nonce[..11], &ct, b"aad"), Err(OpenError));
        assert_eq!(c.open(&nonce, &ct[..10], b"aad"), Err(OpenError));
        assert_eq!(cipher().open(&nonce, &ct, b"aad"), Err(OpenError));
    }

    /// NIST GCM test vector (gcmEncryptExtIV256, Count 0 with 16-byte PT).
    #[test]
    fn known_answer() {
        let key = SecretKey::from_slice(
            &hex::decode("31bdadd96698c204aa9ce1448ea94ae1fb4a9a0b3c9d773b51bb1822666b8f22")
                .unwrap(),
        )
        .unwrap();
        let nonce: [u8; 12] = hex::decode("0d18e06c7c725ac9e362e1ce")
            .unwrap()
            .try_into()
            .unwrap();
        let pt = hex::decode("2db5168e932556f8089a0622981d017d").unwrap();
        let ct = Cipher::new(&key).seal_with_nonce(&nonce, &pt, b"");
        assert_eq!(
            hex::encode(ct),
            "fa4362189661d163fcd6a56d8bf0405ad636ac1bbedd5cc3ee727dc2ab4a9489"
        );
    }
}
