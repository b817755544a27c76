//! The encryption context: caller-supplied key/value pairs bound to a
//! ciphertext as additional authenticated data, and their canonical bytes.

use std::collections::HashMap;

/// Most entries a context may have, unless configured otherwise.
pub const MAX_ENTRIES: usize = 64;
/// Most bytes a context may hold, keys and values together, unless
/// configured otherwise.
pub const MAX_BYTES: usize = 8 * 1024;

/// Why a context was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ContextError {
    /// A key was the empty string.
    #[error("encryption context keys must not be empty")]
    EmptyKey,
    /// More pairs than the limit.
    #[error("encryption context has {len} entries; the limit is {max}")]
    TooManyEntries { len: usize, max: usize },
    /// More bytes of keys and values than the limit.
    #[error("encryption context is {size} bytes; the limit is {max}")]
    TooLarge { size: usize, max: usize },
}

/// A validated encryption context, ordered by key so that its encoding is
/// canonical whatever order the caller sent. Kept as pairs sorted by key
/// (keys unique): contexts are small, and one `Vec` costs one allocation
/// where a `BTreeMap` node costs a larger one on every Encrypt.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EncryptionContext(Vec<(String, String)>);

impl EncryptionContext {
    /// The empty context.
    pub fn empty() -> Self {
        Self::default()
    }

    /// Validates a caller's map ("parse, don't validate": every
    /// `EncryptionContext` in the process is within the limits).
    pub fn parse(map: HashMap<String, String>) -> Result<Self, ContextError> {
        Self::from_pairs(map)
    }

    /// Like [`Self::parse`], with configured limits (at most the built-in
    /// ones, which every context in the process stays within).
    pub fn parse_limited(
        map: HashMap<String, String>,
        max_entries: usize,
        max_bytes: usize,
    ) -> Result<Self, ContextError> {
        let (max_entries, max_bytes) = (max_entries.min(MAX_ENTRIES), max_bytes.min(MAX_BYTES));
        if map.len() > max_entries {
            return Err(ContextError::TooManyEntries {
                len: map.len(),
                max: max_entries,
            });
        }
        let size: usize = map.iter().map(|(k, v)| k.len() + v.len()).sum();
        if size > max_bytes {
            return Err(ContextError::TooLarge {
                size,
                max: max_bytes,
            });
        }
        Self::from_pairs(map)
    }

    /// Builds a context from pairs, with the same checks as [`Self::parse`].
    pub fn from_pairs<K, V>(pairs: impl IntoIterator<Item = (K, V)>) -> Result<Self, ContextError>
    where
        K: Into<String>,
        V: Into<String>,
    {
        let mut map: Vec<(String, String)> = pairs
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        // A stable sort keeps repeated keys in the order given; the last
        // value of a repeated key wins, as in a map built from the pairs.
        map.sort_by(|a, b| a.0.cmp(&b.0));
        map.dedup_by(|later, kept| {
            let same = later.0 == kept.0;
            if same {
                std::mem::swap(&mut later.1, &mut kept.1);
            }
            same
        });
        if map.len() > MAX_ENTRIES {
            return Err(ContextError::TooManyEntries {
                len: map.len(),
                max: MAX_ENTRIES,
            });
        }
        if map.iter().any(|(k, _)| k.is_empty()) {
            return Err(ContextError::EmptyKey);
        }
        let size: usize = map.iter().map(|(k, v)| k.len() + v.len()).sum();
        if size > MAX_BYTES {
            return Err(ContextError::TooLarge {
                size,
                max: MAX_BYTES,
            });
        }
        Ok(Self(map))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Bytes [`Self::write_canonical`] appends: callers size their buffer
    /// with it once.
    pub fn canonical_len(&self) -> usize {
        4 + self
            .0
            .iter()
            .map(|(k, v)| 8 + k.len() + v.len())
            .sum::<usize>()
    }

    /// Canonical encoding: entry count, then each key and value in key order,
    /// each as a big-endian u32 length and its UTF-8 bytes. Unambiguous, so
    /// two different contexts never encode alike.
    pub fn write_canonical(&self, out: &mut Vec<u8>) {
        put_u32_len(out, self.0.len());
        for (k, v) in &self.0 {
            put_bytes(out, k.as_bytes());
            put_bytes(out, v.as_bytes());
        }
    }
}

/// Appends a length-prefixed byte string (u32, big-endian).
pub(crate) fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_u32_len(out, bytes.len());
    out.extend_from_slice(bytes);
}

fn put_u32_len(out: &mut Vec<u8>, len: usize) {
    // Every length here is bounded far below u32::MAX by the limits above
    // and by the request size limit; saturate rather than wrap regardless.
    out.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canonical(ctx: &EncryptionContext) -> Vec<u8> {
        let mut out = Vec::new();
        ctx.write_canonical(&mut out);
        out
    }

    #[test]
    fn order_does_not_matter() {
        let a = EncryptionContext::from_pairs([("b", "2"), ("a", "1")]).unwrap();
        let b = EncryptionContext::from_pairs([("a", "1"), ("b", "2")]).unwrap();
        assert_eq!(canonical(&a), canonical(&b));
    }

    #[test]
    fn a_repeated_key_keeps_its_last_value() {
        let ctx = EncryptionContext::from_pairs([("b", "1"), ("a", "x"), ("b", "2"), ("b", "3")])
            .unwrap();
        let pairs: Vec<_> = ctx.iter().collect();
        assert_eq!(pairs, vec![("a", "x"), ("b", "3")]);
    }

    #[test]
    fn encoding_is_unambiguous() {
        let a = EncryptionContext::from_pairs([("ab", "c")]).unwrap();
        let b = EncryptionContext::from_pairs([("a", "bc")]).unwrap();
        assert_ne!(canonical(&a), canonical(&b));
        assert_ne!(canonical(&EncryptionContext::empty()), canonical(&a));
    }

    #[test]
    fn canonical_len_is_what_is_written() {
        for ctx in [
            EncryptionContext::empty(),
            EncryptionContext::from_pairs([("connection_id", "42"), ("tenant", "é")]).unwrap(),
        ] {
            assert_eq!(ctx.canonical_len(), canonical(&ctx).len());
        }
    }

    #[test]
    fn limits_are_enforced() {
        assert_eq!(
            EncryptionContext::from_pairs([("", "x")]),
            Err(ContextError::EmptyKey)
        );
        let many = (0..=MAX_ENTRIES).map(|i| (i.to_string(), String::new()));
        assert_eq!(
            EncryptionContext::from_pairs(many),
            Err(ContextError::TooManyEntries {
                len: MAX_ENTRIES + 1,
                max: MAX_ENTRIES
            })
        );
        let big = "x".repeat(MAX_BYTES);
        assert!(matches!(
            EncryptionContext::from_pairs([("k", big)]),
            Err(ContextError::TooLarge { .. })
        ));
    }
}
