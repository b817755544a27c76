//! Bearer tokens: 256 random bits, shown once, stored only as a hash.
//!
//! A token is `kw_` followed by 43 base64url characters. Tokens are high-
//! entropy, so a plain SHA-256 is the right hash (a slow password hash
//! would only add latency to every call); lookup is by hash, so comparing
//! never touches the token itself.

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};
use rand::RngCore;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

const PREFIX: &str = "kw_";

/// A fresh token. The caller prints it once and stores [`hash`] of it.
pub fn generate() -> Zeroizing<String> {
    let mut bytes = Zeroizing::new([0u8; 32]);
    rand::rngs::OsRng.fill_bytes(bytes.as_mut());
    Zeroizing::new(format!(
        "{PREFIX}{}",
        URL_SAFE_NO_PAD.encode(bytes.as_ref())
    ))
}

/// The stored form of a token: lowercase hex SHA-256.
pub fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Whether `token` has the shape keyward issues (cheap check before a lookup).
pub fn looks_valid(token: &str) -> bool {
    token.len() == PREFIX.len() + 43
        && token.starts_with(PREFIX)
        && token[PREFIX.len()..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_unique_well_formed_and_hashed() {
        let (a, b) = (generate(), generate());
        assert_ne!(*a, *b);
        assert!(looks_valid(&a), "{}", a.len());
        assert!(!looks_valid("kw_short"));
        assert!(!looks_valid(&a.replace("kw_", "xx_")));
        assert_eq!(hash(&a).len(), 64);
        assert_ne!(hash(&a), hash(&b));
    }
}
