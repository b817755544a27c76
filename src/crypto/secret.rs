//! Key material and plaintext holders: zeroized on drop, never printed.
//!
//! Every type here has a `Debug` that prints a fixed placeholder, and none
//! implements `Display`, so a secret cannot reach a log line or an error
//! message through formatting.

use std::fmt;

use rand::RngCore;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// Length of every symmetric key keyward handles: AES-256.
pub const KEY_LEN: usize = 32;

/// A 256-bit symmetric key: a data key, a local key-encryption key or the
/// legacy derived key.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct SecretKey([u8; KEY_LEN]);

impl SecretKey {
    /// A fresh key from the thread-local CSPRNG (ChaCha12, seeded and
    /// periodically reseeded from the operating system): as strong as the OS
    /// generator without a system call per key on the hot path.
    pub fn generate() -> Self {
        let mut key = Self([0u8; KEY_LEN]);
        rand::thread_rng().fill_bytes(&mut key.0);
        key
    }

    /// Takes a key of exactly [`KEY_LEN`] bytes; `None` for any other length.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        let array: [u8; KEY_LEN] = bytes.try_into().ok()?;
        Some(Self(array))
    }

    /// Fills a key in place from a closure (used by HKDF), so the key bytes
    /// never sit in an unzeroized temporary.
    pub(crate) fn derive_with(fill: impl FnOnce(&mut [u8; KEY_LEN])) -> Self {
        let mut key = Self([0u8; KEY_LEN]);
        fill(&mut key.0);
        key
    }

    /// The raw bytes, for the AEAD layer only.
    pub(crate) fn expose(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// The raw bytes, for code outside keyward that must have them (the
    /// no-leak test searches logs for them). Never print or log them.
    pub fn dangerous_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey([REDACTED])")
    }
}

/// A master secret of the local KMS (`ENCRYPTION_MASTER_KEY` and friends).
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct MasterSecret(Vec<u8>);

impl MasterSecret {
    /// Shortest master secret accepted: 16 bytes (128 bits if random).
    pub const MIN_LEN: usize = 16;

    /// Wraps a master secret, refusing one shorter than [`Self::MIN_LEN`].
    pub fn new(secret: impl Into<Vec<u8>>) -> Result<Self, WeakMasterSecret> {
        let bytes = Zeroizing::new(secret.into());
        if bytes.len() < Self::MIN_LEN {
            return Err(WeakMasterSecret { len: bytes.len() });
        }
        Ok(Self(bytes.to_vec()))
    }

    /// A new random secret, hex encoded (64 characters), for `serve --dev`.
    pub fn generate_hex() -> Zeroizing<String> {
        let key = SecretKey::generate();
        Zeroizing::new(hex::encode(key.expose()))
    }

    pub(crate) fn expose(&self) -> &[u8] {
        &self.0
    }

    /// Which master secret this is, for data keys' headers, heartbeats and
    /// operators: HKDF-SHA256 of the secret under its own salt, 8 bytes.
    /// It names the secret without revealing it (a wrapped key under the
    /// secret tells a guesser no less).
    pub fn fingerprint(&self) -> Fingerprint {
        let hk = hkdf::Hkdf::<sha2::Sha256>::new(Some(FINGERPRINT_SALT), &self.0);
        let mut out = [0u8; Fingerprint::LEN];
        // 8 bytes is far below HKDF-SHA256's limit: expand cannot fail.
        let _ = hk.expand(b"fingerprint", &mut out);
        Fingerprint(out)
    }
}

const FINGERPRINT_SALT: &[u8] = b"keyward.master-fingerprint.v1";

/// A master secret's public name ([`MasterSecret::fingerprint`]), shown as
/// 16 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(pub [u8; Fingerprint::LEN]);

impl Fingerprint {
    pub const LEN: usize = 8;

    /// Parses the 16 hex digits [`fmt::Display`] writes.
    pub fn parse(hex_digits: &str) -> Option<Self> {
        let bytes = hex::decode(hex_digits.trim()).ok()?;
        Some(Self(bytes.try_into().ok()?))
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&hex::encode(self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

impl fmt::Debug for MasterSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterSecret([REDACTED])")
    }
}

/// A master secret that is too short to be one.
#[derive(Debug, thiserror::Error)]
#[error("master secret is {len} bytes; use at least 16 (e.g. 64 hex characters from a CSPRNG)")]
pub struct WeakMasterSecret {
    len: usize,
}

/// Decrypted data on its way back to a caller: zeroized when dropped.
#[derive(Clone, Zeroize, ZeroizeOnDrop, PartialEq, Eq)]
pub struct Plaintext(Vec<u8>);

impl Plaintext {
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    /// `len` zero bytes, for a decryption to write into.
    pub(crate) fn zeroed(len: usize) -> Self {
        Self(vec![0; len])
    }

    pub(crate) fn as_mut_bytes(&mut self) -> &mut [u8] {
        &mut self.0
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Hands the bytes over (e.g. to a protobuf message) without a copy.
    pub fn into_vec(mut self) -> Vec<u8> {
        std::mem::take(&mut self.0)
    }
}

impl fmt::Debug for Plaintext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Plaintext([REDACTED; {} bytes])", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_bytes() {
        let key = SecretKey::from_slice(&[0xab; KEY_LEN]).unwrap();
        assert_eq!(format!("{key:?}"), "SecretKey([REDACTED])");
        let master = MasterSecret::new("correct horse battery staple").unwrap();
        assert!(!format!("{master:?}").contains("horse"));
        let plain = Plaintext::new(b"hunter2".to_vec());
        assert_eq!(format!("{plain:?}"), "Plaintext([REDACTED; 7 bytes])");
    }

    #[test]
    fn fingerprints_name_a_secret_without_showing_it() {
        let one = MasterSecret::new("correct horse battery staple").unwrap();
        let two = MasterSecret::new("correct horse battery stapler").unwrap();
        assert_eq!(one.fingerprint(), one.clone().fingerprint());
        assert_ne!(one.fingerprint(), two.fingerprint());
        let shown = one.fingerprint().to_string();
        assert_eq!(shown.len(), 16);
        assert_eq!(Fingerprint::parse(&shown), Some(one.fingerprint()));
        assert_eq!(Fingerprint::parse("xyz"), None);
    }

    #[test]
    fn short_master_secrets_are_refused() {
        assert!(MasterSecret::new("short").is_err());
        assert!(MasterSecret::new(vec![7u8; 16]).is_ok());
    }

    #[test]
    fn generated_keys_differ() {
        assert_ne!(
            SecretKey::generate().expose(),
            SecretKey::generate().expose()
        );
        assert_eq!(MasterSecret::generate_hex().len(), 64);
    }
}
