//! The one-column form of an envelope: a versioned, self-describing byte
//! string. The layout is documented byte by byte in `docs/blob-format.md`;
//! the parser reads it with bounds checks only, never indexing or panicking,
//! whatever the input.

use std::ops::Range;

use super::{
    aead::{NONCE_LEN, TAG_LEN},
    envelope::{Envelope, FORMAT_VERSION},
};

/// First two bytes of every blob: "KW".
pub const MAGIC: [u8; 2] = *b"KW";
/// Longest wrapped data key a blob may carry (AWS KMS blobs are ~180 bytes).
pub const MAX_WRAPPED_KEY_LEN: usize = 1024;

/// Why bytes are not a blob. Messages name the problem, never the content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BlobError {
    /// Fewer bytes than the fixed header.
    #[error("blob is truncated")]
    Truncated,
    /// The first two bytes are not "KW".
    #[error("not a keyward blob (bad magic bytes)")]
    BadMagic,
    /// A version this build does not read.
    #[error("unsupported blob version {0}; this server reads version {FORMAT_VERSION}")]
    UnsupportedVersion(u8),
    /// The key id is empty or not UTF-8.
    #[error("blob has an invalid key id")]
    BadKeyId,
    /// The wrapped key is empty or longer than [`MAX_WRAPPED_KEY_LEN`].
    #[error("blob has an invalid wrapped data key length")]
    BadWrappedKey,
    /// The payload nonce is not 12 bytes.
    #[error("blob has an invalid payload nonce length")]
    BadNonce,
    /// The payload is shorter than its authentication tag.
    #[error("blob payload is shorter than its authentication tag")]
    ShortPayload,
}

/// Where each byte-string field of the envelope sits in its encoded blob,
/// so the structured form can share the blob's buffer instead of copying.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldRanges {
    pub data_key_ciphertext: Range<usize>,
    pub data_key_iv: Range<usize>,
    pub payload_iv: Range<usize>,
    pub payload_ciphertext: Range<usize>,
}

/// Serializes an envelope. Fails only when a field is out of the ranges the
/// format can express, which envelopes made by keyward never are.
pub fn encode(envelope: &Envelope) -> Result<Vec<u8>, BlobError> {
    encode_with_ranges(envelope).map(|(blob, _)| blob)
}

/// [`encode`], also saying where each field went.
pub fn encode_with_ranges(envelope: &Envelope) -> Result<(Vec<u8>, FieldRanges), BlobError> {
    let key_id = envelope.encryption_key_id.as_bytes();
    let key_id_len = u8::try_from(key_id.len()).map_err(|_| BlobError::BadKeyId)?;
    if key_id.is_empty() {
        return Err(BlobError::BadKeyId);
    }
    let wrapped = &envelope.data_key_ciphertext;
    if wrapped.is_empty() || wrapped.len() > MAX_WRAPPED_KEY_LEN {
        return Err(BlobError::BadWrappedKey);
    }
    let wrapped_len = u16::try_from(wrapped.len()).map_err(|_| BlobError::BadWrappedKey)?;
    let dk_iv_len =
        u8::try_from(envelope.data_key_iv.len()).map_err(|_| BlobError::BadWrappedKey)?;
    if envelope.payload_iv.len() != NONCE_LEN {
        return Err(BlobError::BadNonce);
    }
    if envelope.payload_ciphertext.len() < TAG_LEN {
        return Err(BlobError::ShortPayload);
    }

    let mut out = Vec::with_capacity(
        8 + key_id.len()
            + wrapped.len()
            + envelope.data_key_iv.len()
            + NONCE_LEN
            + envelope.payload_ciphertext.len(),
    );
    out.extend_from_slice(&MAGIC);
    out.push(FORMAT_VERSION);
    out.push(key_id_len);
    out.extend_from_slice(key_id);
    out.extend_from_slice(&wrapped_len.to_be_bytes());
    let data_key_ciphertext = append(&mut out, wrapped);
    out.push(dk_iv_len);
    let data_key_iv = append(&mut out, &envelope.data_key_iv);
    out.push(NONCE_LEN as u8);
    let payload_iv = append(&mut out, &envelope.payload_iv);
    let payload_ciphertext = append(&mut out, &envelope.payload_ciphertext);
    let ranges = FieldRanges {
        data_key_ciphertext,
        data_key_iv,
        payload_iv,
        payload_ciphertext,
    };
    Ok((out, ranges))
}

/// Appends `bytes` and returns where they landed.
fn append(out: &mut Vec<u8>, bytes: &[u8]) -> Range<usize> {
    let start = out.len();
    out.extend_from_slice(bytes);
    start..out.len()
}

/// Parses a blob into an envelope. Total on every input: returns an error,
/// never panics, and allocates no more than the input's length.
pub fn parse(bytes: &[u8]) -> Result<Envelope, BlobError> {
    let mut r = Reader(bytes);
    if r.take(2)? != MAGIC {
        return Err(BlobError::BadMagic);
    }
    let version = r.u8()?;
    if version != FORMAT_VERSION {
        return Err(BlobError::UnsupportedVersion(version));
    }
    let key_id_len = usize::from(r.u8()?);
    if key_id_len == 0 {
        return Err(BlobError::BadKeyId);
    }
    let key_id = std::str::from_utf8(r.take(key_id_len)?).map_err(|_| BlobError::BadKeyId)?;
    let wrapped_len = usize::from(r.u16()?);
    if wrapped_len == 0 || wrapped_len > MAX_WRAPPED_KEY_LEN {
        return Err(BlobError::BadWrappedKey);
    }
    let wrapped = r.take(wrapped_len)?;
    let dk_iv_len = usize::from(r.u8()?);
    let dk_iv = r.take(dk_iv_len)?;
    let nonce_len = usize::from(r.u8()?);
    if nonce_len != NONCE_LEN {
        return Err(BlobError::BadNonce);
    }
    let nonce = r.take(nonce_len)?;
    let payload = r.0;
    if payload.len() < TAG_LEN {
        return Err(BlobError::ShortPayload);
    }
    Ok(Envelope {
        encryption_key_id: key_id.to_owned(),
        data_key_ciphertext: wrapped.to_vec(),
        data_key_iv: dk_iv.to_vec(),
        payload_ciphertext: payload.to_vec(),
        payload_iv: nonce.to_vec(),
    })
}

/// A forward-only cursor whose reads fail instead of running past the end.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], BlobError> {
        if self.0.len() < n {
            return Err(BlobError::Truncated);
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, BlobError> {
        match self.take(1)? {
            [b] => Ok(*b),
            _ => Err(BlobError::Truncated),
        }
    }

    fn u16(&mut self) -> Result<u16, BlobError> {
        match self.take(2)? {
            [hi, lo] => Ok(u16::from_be_bytes([*hi, *lo])),
            _ => Err(BlobError::Truncated),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Envelope {
        Envelope {
            encryption_key_id: "0f8e2c4a-key".into(),
            data_key_ciphertext: vec![1; 48],
            data_key_iv: vec![2; 12],
            payload_ciphertext: vec![3; 40],
            payload_iv: vec![4; 12],
        }
    }

    #[test]
    fn round_trip() {
        let blob = encode(&sample()).unwrap();
        assert_eq!(&blob[..3], b"KW\x01");
        assert_eq!(parse(&blob).unwrap(), sample());
    }

    #[test]
    fn ranges_point_at_each_field() {
        let env = sample();
        let (blob, at) = encode_with_ranges(&env).unwrap();
        assert_eq!(blob, encode(&env).unwrap());
        assert_eq!(
            &blob[at.data_key_ciphertext],
            env.data_key_ciphertext.as_slice()
        );
        assert_eq!(&blob[at.data_key_iv], env.data_key_iv.as_slice());
        assert_eq!(&blob[at.payload_iv], env.payload_iv.as_slice());
        assert_eq!(at.payload_ciphertext.end, blob.len());
        assert_eq!(
            &blob[at.payload_ciphertext],
            env.payload_ciphertext.as_slice()
        );
    }

    #[test]
    fn round_trip_without_key_iv() {
        let env = Envelope {
            data_key_iv: vec![],
            ..sample()
        };
        assert_eq!(parse(&encode(&env).unwrap()).unwrap(), env);
    }

    #[test]
    fn every_truncation_is_an_error() {
        let blob = encode(&sample()).unwrap();
        // Cutting into the tag leaves a payload too short; cutting earlier
        // runs out of header: both are errors, never a panic.
        for len in 0..blob.len() - 40 + TAG_LEN {
            assert!(parse(&blob[..len]).is_err(), "prefix of {len} bytes parsed");
        }
    }

    #[test]
    fn header_errors_are_specific() {
        let blob = encode(&sample()).unwrap();
        let mut bad = blob.clone();
        bad[0] = b'X';
        assert_eq!(parse(&bad), Err(BlobError::BadMagic));
        let mut bad = blob.clone();
        bad[2] = 9;
        assert_eq!(parse(&bad), Err(BlobError::UnsupportedVersion(9)));
        let mut bad = blob.clone();
        bad[3] = 0;
        assert_eq!(parse(&bad), Err(BlobError::BadKeyId));
        assert_eq!(parse(b""), Err(BlobError::Truncated));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic sweep; the fuzz target covers the rest.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for len in 0..512usize {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    (state >> 24) as u8
                })
                .collect();
            let mut with_magic = b"KW\x01".to_vec();
            with_magic.extend_from_slice(&bytes);
            let _ = parse(&bytes);
            let _ = parse(&with_magic);
        }
    }
}
