//! A row of a rotation target as keyward reads it ([`RotationRow`]): its
//! envelope and legacy columns, decoded from the target's
//! [`Encoding`], with their stored form kept for the compare-and-swap that
//! writes it back.

use crate::{
    crypto::envelope::Envelope,
    rotation::target::{Encoding, Stored},
};

/// A row of a rotation target, as the rotation reads it.
#[derive(Debug, Clone)]
pub struct RotationRow {
    pub id: String,
    pub encryption_key_id: Option<String>,
    pub data_key_ciphertext: Option<Vec<u8>>,
    pub data_key_iv: Option<Vec<u8>>,
    pub payload_ciphertext: Option<Vec<u8>>,
    pub payload_iv: Option<Vec<u8>>,
    pub legacy_ciphertext: Option<Vec<u8>>,
    pub legacy_iv: Option<Vec<u8>>,
    /// The values of the target's context columns, in order.
    pub context: Vec<Option<String>>,
    /// A text-encoded target's payload and legacy ciphertexts as stored
    /// (the text), for the compare-and-swap; `None`: as above.
    pub stored: Option<StoredCopies>,
    /// Why a stored value is not in the target's encoding: the row fails
    /// (rotation records why) instead of being misread.
    pub malformed: Option<String>,
}

/// Stored forms of a text-encoded row's compared columns.
#[derive(Debug, Clone, Default)]
pub struct StoredCopies {
    pub payload: Option<Vec<u8>>,
    pub legacy: Option<Vec<u8>>,
}

impl RotationRow {
    /// The row as stored in `encoding`: its ciphertext columns decoded (a
    /// text encoding's value arrives as its text), the stored payload and
    /// legacy ciphertexts kept for the compare-and-swap.
    pub fn decoded(mut self, encoding: Encoding) -> Self {
        if !encoding.is_text() {
            return self;
        }
        self.stored = Some(StoredCopies {
            payload: self.payload_ciphertext.clone(),
            legacy: self.legacy_ciphertext.clone(),
        });
        let mut malformed = None;
        for (name, value) in [
            ("data_key_ciphertext", &mut self.data_key_ciphertext),
            ("data_key_iv", &mut self.data_key_iv),
            ("payload_ciphertext", &mut self.payload_ciphertext),
            ("payload_iv", &mut self.payload_iv),
            ("legacy ciphertext", &mut self.legacy_ciphertext),
            ("legacy IV", &mut self.legacy_iv),
        ] {
            if let Some(stored) = value.as_deref() {
                match encoding.decode(stored) {
                    Ok(bytes) => *value = Some(bytes),
                    Err(why) => {
                        malformed.get_or_insert(format!(
                            "its {name} is {why} (the target's encoding is {})",
                            encoding.as_str()
                        ));
                    }
                }
            }
        }
        self.malformed = malformed;
        self
    }

    /// The payload ciphertext as stored, to compare it with.
    pub fn stored_payload(&self, encoding: Encoding) -> Option<Stored> {
        self.stored_copy(encoding, |s| &s.payload, &self.payload_ciphertext)
    }

    /// The legacy ciphertext as stored, to compare it with.
    pub fn stored_legacy(&self, encoding: Encoding) -> Option<Stored> {
        self.stored_copy(encoding, |s| &s.legacy, &self.legacy_ciphertext)
    }

    fn stored_copy(
        &self,
        encoding: Encoding,
        field: fn(&StoredCopies) -> &Option<Vec<u8>>,
        decoded: &Option<Vec<u8>>,
    ) -> Option<Stored> {
        let raw = match &self.stored {
            Some(stored) => field(stored),
            None => decoded,
        };
        raw.as_deref().map(|raw| encoding.restore(raw))
    }

    /// The row's ciphertext as an envelope. A legacy row (no key id) is read
    /// from its legacy columns while they hold a ciphertext, else from the
    /// payload mirror: the application's old pods write the legacy columns
    /// only, so after the migration's backfill the mirror can be stale, and
    /// the legacy copy is the one they last wrote.
    pub fn envelope(&self) -> Envelope {
        let legacy_copy = self
            .legacy_copy()
            .filter(|copy| self.encryption_key_id.is_none() && !copy.payload_ciphertext.is_empty());
        legacy_copy.unwrap_or_else(|| Envelope {
            encryption_key_id: self.encryption_key_id.clone().unwrap_or_default(),
            data_key_ciphertext: self.data_key_ciphertext.clone().unwrap_or_default(),
            data_key_iv: self.data_key_iv.clone().unwrap_or_default(),
            payload_ciphertext: self.payload_ciphertext.clone().unwrap_or_default(),
            payload_iv: self.payload_iv.clone().unwrap_or_default(),
        })
    }

    /// The row's legacy copy as a legacy envelope (no key id), if it holds
    /// one (its IV column may be empty: the legacy layout may keep the IV
    /// in the ciphertext).
    pub fn legacy_copy(&self) -> Option<Envelope> {
        Some(Envelope {
            payload_ciphertext: self.legacy_ciphertext.clone()?,
            payload_iv: self.legacy_iv.clone().unwrap_or_default(),
            ..Envelope::default()
        })
    }
}

/// Reads a row selected by `RotationTarget::select_batch_sql` (or
/// `sample_on_key_sql`): the envelope and legacy columns by name, then the
/// context columns `ctx_0`, `ctx_1`, … in the order they were selected.
/// A ciphertext column may hold bytes or text (a text-encoded target):
/// either arrives as bytes, for [`RotationRow::decoded`].
impl<'r, R: sqlx::Row> sqlx::FromRow<'r, R> for RotationRow
where
    &'static str: sqlx::ColumnIndex<R>,
    usize: sqlx::ColumnIndex<R>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Vec<u8>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    fn from_row(row: &'r R) -> Result<Self, sqlx::Error> {
        use sqlx::Column as _;
        let bytes = |name: &'static str| -> Result<Option<Vec<u8>>, sqlx::Error> {
            row.try_get::<Option<Vec<u8>>, _>(name).or_else(|_| {
                row.try_get::<Option<String>, _>(name)
                    .map(|text| text.map(String::into_bytes))
            })
        };
        Ok(RotationRow {
            id: row.try_get("id")?,
            encryption_key_id: row.try_get("encryption_key_id")?,
            data_key_ciphertext: bytes("data_key_ciphertext")?,
            data_key_iv: bytes("data_key_iv")?,
            payload_ciphertext: bytes("payload_ciphertext")?,
            payload_iv: bytes("payload_iv")?,
            legacy_ciphertext: bytes("legacy_ciphertext")?,
            legacy_iv: bytes("legacy_iv")?,
            context: row
                .columns()
                .iter()
                .enumerate()
                .filter(|(_, column)| column.name().starts_with("ctx_"))
                .map(|(i, _)| row.try_get::<Option<String>, _>(i))
                .collect::<Result<_, _>>()?,
            stored: None,
            malformed: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(key: Option<&str>, mirror: Option<&[u8]>, legacy: Option<&[u8]>) -> RotationRow {
        RotationRow {
            id: "r".into(),
            encryption_key_id: key.map(Into::into),
            data_key_ciphertext: key.map(|_| b"dk".to_vec()),
            data_key_iv: None,
            payload_ciphertext: mirror.map(<[u8]>::to_vec),
            payload_iv: mirror.map(|_| b"mirror-iv".to_vec()),
            legacy_ciphertext: legacy.map(<[u8]>::to_vec),
            legacy_iv: legacy.map(|_| b"legacy-iv".to_vec()),
            context: Vec::new(),
            stored: None,
            malformed: None,
        }
    }

    #[test]
    fn a_legacy_row_is_read_from_what_the_old_pods_last_wrote() {
        // An old pod rewrote the legacy copy after the backfill: the mirror
        // is stale, the legacy copy wins.
        let e = row(None, Some(b"stale"), Some(b"fresh")).envelope();
        assert_eq!(
            (e.payload_ciphertext, e.payload_iv),
            (b"fresh".to_vec(), b"legacy-iv".to_vec())
        );
        // No legacy copy (cut over, or a mirror only): the mirror.
        let e = row(None, Some(b"mirror"), None).envelope();
        assert_eq!(e.payload_ciphertext, b"mirror".to_vec());
        // An envelope row is read from its envelope whatever its legacy copy.
        let e = row(Some("k"), Some(b"sealed"), Some(b"old")).envelope();
        assert_eq!(
            (e.payload_ciphertext, e.encryption_key_id),
            (b"sealed".to_vec(), "k".to_owned())
        );
    }

    #[test]
    fn a_text_encoded_row_is_decoded_and_compared_as_stored() {
        let mut stored = row(Some("k"), Some(b"c2VhbGVk"), Some(b"6f6c64"));
        stored.data_key_ciphertext = Some(b"ZGs=".to_vec());
        stored.payload_iv = Some(b"aXY=".to_vec());
        let decoded = stored.clone().decoded(Encoding::Base64);
        assert_eq!(decoded.payload_ciphertext.as_deref(), Some(&b"sealed"[..]));
        assert_eq!(decoded.data_key_ciphertext.as_deref(), Some(&b"dk"[..]));
        assert_eq!(
            decoded.stored_payload(Encoding::Base64),
            Some(Stored::Text("c2VhbGVk".into()))
        );
        // The hex legacy copy is no base64: the row is malformed, not misread.
        assert!(
            decoded
                .malformed
                .as_deref()
                .is_some_and(|why| why.starts_with("its legacy ciphertext is not base64")),
            "{:?}",
            decoded.malformed
        );
        let bytes = stored.decoded(Encoding::Bytes);
        assert_eq!(
            bytes.stored_payload(Encoding::Bytes),
            Some(Stored::Bytes(b"c2VhbGVk".to_vec()))
        );
        assert!(bytes.malformed.is_none());
    }
}
