//! The envelope: a payload sealed under a per-message data key, and the
//! wrapped data key beside it.
//!
//! The payload's AAD binds the envelope format version and the canonical
//! encryption context. The key record is bound where the data key is wrapped
//! (see `kms`), not here, so that a REWRAP rotation can move a data key to a
//! new key-encryption key without touching the payload.

use super::{
    aead::{Cipher, OpenError, NONCE_LEN},
    context::EncryptionContext,
    secret::{Plaintext, SecretKey},
};

/// Version of the envelope format; part of every payload's AAD.
pub const FORMAT_VERSION: u8 = 1;

const PAYLOAD_AAD_LABEL: &[u8] = b"keyward.payload";

/// A ciphertext in its structured form: one field per `connections` column.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Envelope {
    /// `encryption_keys.id` of the record whose KMS key wrapped the data key.
    pub encryption_key_id: String,
    /// The wrapped data key.
    pub data_key_ciphertext: Vec<u8>,
    /// The nonce of the wrap, for providers that return one (local KMS).
    pub data_key_iv: Vec<u8>,
    /// AES-256-GCM ciphertext || tag.
    pub payload_ciphertext: Vec<u8>,
    /// The payload's 96-bit nonce.
    pub payload_iv: Vec<u8>,
}

/// The AAD of a payload: label, format version, canonical context.
pub fn payload_aad(context: &EncryptionContext) -> Vec<u8> {
    let mut aad = Vec::with_capacity(PAYLOAD_AAD_LABEL.len() + 1 + context.canonical_len());
    aad.extend_from_slice(PAYLOAD_AAD_LABEL);
    aad.push(FORMAT_VERSION);
    context.write_canonical(&mut aad);
    aad
}

/// Seals a payload under a data key; returns (nonce, ciphertext||tag).
pub fn seal_payload(
    data_key: &SecretKey,
    context: &EncryptionContext,
    plaintext: &[u8],
) -> ([u8; NONCE_LEN], Vec<u8>) {
    Cipher::new(data_key).seal(plaintext, &payload_aad(context))
}

/// Opens a payload sealed by [`seal_payload`] under the same context.
pub fn open_payload(
    data_key: &SecretKey,
    context: &EncryptionContext,
    nonce: &[u8],
    ciphertext: &[u8],
) -> Result<Plaintext, OpenError> {
    Cipher::new(data_key).open(nonce, ciphertext, &payload_aad(context))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_is_bound_to_its_context() {
        let key = SecretKey::generate();
        let ctx = EncryptionContext::from_pairs([("connection_id", "1")]).unwrap();
        let (iv, ct) = seal_payload(&key, &ctx, b"p@ss");
        assert_eq!(
            open_payload(&key, &ctx, &iv, &ct).unwrap().as_bytes(),
            b"p@ss"
        );
        let other = EncryptionContext::from_pairs([("connection_id", "2")]).unwrap();
        assert!(open_payload(&key, &other, &iv, &ct).is_err());
        assert!(open_payload(&key, &EncryptionContext::empty(), &iv, &ct).is_err());
    }
}
