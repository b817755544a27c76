//! The legacy format: credentials the application encrypted itself, before
//! keyward, with a key derived locally from the master secret.
//!
//! Format (documented in `docs/legacy-format.md`):
//! - key: HKDF-SHA256(ikm = master secret, salt = empty, info =
//!   `connections:credentials`), 32 bytes — the runbook's `derived_key`;
//! - AES-256-GCM, random 12-byte IV in `connections.credentials_iv`,
//!   ciphertext||tag in `connections.encrypted_credentials` (mirrored into
//!   `payload_iv` / `payload_ciphertext` by the migration);
//! - no AAD: legacy ciphertexts are bound to nothing, which is one reason to
//!   migrate them.

use hkdf::Hkdf;
use sha2::Sha256;

use super::{
    aead::{Cipher, OpenError, NONCE_LEN},
    secret::{MasterSecret, Plaintext, SecretKey, KEY_LEN},
};

const LEGACY_INFO: &[u8] = b"connections:credentials";

/// The runbook's `derived_key`: the legacy key derived from one master secret.
pub fn derive_legacy_key(master: &MasterSecret) -> SecretKey {
    let hk = Hkdf::<Sha256>::new(None, master.expose());
    SecretKey::derive_with(|out: &mut [u8; KEY_LEN]| {
        // 32 bytes never exceeds HKDF's output limit.
        let _ = hk.expand(LEGACY_INFO, out);
    })
}

/// The legacy keys of every configured master secret, current first.
pub struct LegacyKeys(Vec<Cipher>);

impl LegacyKeys {
    pub fn new<'a>(masters: impl IntoIterator<Item = &'a MasterSecret>) -> Self {
        Self(
            masters
                .into_iter()
                .map(|m| Cipher::new(&derive_legacy_key(m)))
                .collect(),
        )
    }

    /// Decrypts a legacy ciphertext under any configured master secret.
    pub fn decrypt(&self, iv: &[u8], ciphertext: &[u8]) -> Result<Plaintext, OpenError> {
        self.0
            .iter()
            .find_map(|c| c.open(iv, ciphertext, b"").ok())
            .ok_or(OpenError)
    }
}

/// The fixture generator: encrypts the way the old application did, so tests
/// and `keyward legacy-encrypt` can create legacy rows. Returns (iv, ct||tag).
pub fn encrypt_legacy(master: &MasterSecret, plaintext: &[u8]) -> ([u8; NONCE_LEN], Vec<u8>) {
    Cipher::new(&derive_legacy_key(master)).seal(plaintext, b"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixture_rows_decrypt_under_current_or_previous_master() {
        let old = MasterSecret::new("old-master-secret-value").unwrap();
        let new = MasterSecret::new("new-master-secret-value").unwrap();
        let (iv, ct) = encrypt_legacy(&old, b"postgres://u:p@h/db");
        let keys = LegacyKeys::new([&new, &old]);
        assert_eq!(
            keys.decrypt(&iv, &ct).unwrap().as_bytes(),
            b"postgres://u:p@h/db"
        );
        assert!(LegacyKeys::new([&new]).decrypt(&iv, &ct).is_err());
    }

    /// Pins the KDF so the documented format cannot drift silently.
    #[test]
    fn derived_key_is_stable() {
        let m = MasterSecret::new("0123456789abcdef0123456789abcdef").unwrap();
        let k1 = derive_legacy_key(&m);
        let k2 = derive_legacy_key(&m);
        assert_eq!(k1.expose(), k2.expose());
        let hk = Hkdf::<Sha256>::new(None, b"0123456789abcdef0123456789abcdef");
        let mut expected = [0u8; 32];
        hk.expand(b"connections:credentials", &mut expected)
            .unwrap();
        assert_eq!(k1.expose(), &expected);
    }
}
