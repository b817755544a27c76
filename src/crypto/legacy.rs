//! The legacy format: credentials the application encrypted itself, before
//! keyward, with a key derived locally from the master secret.
//!
//! The format is [`LegacyFormat`], configuration with today's scheme as the
//! default (documented in `docs/legacy-format.md`):
//! - key: HKDF-SHA256(ikm = master secret, salt = empty, info =
//!   `connections:credentials`), 32 bytes — the runbook's `derived_key`
//!   ([`LegacyKdf`]: or SHA-256 of the secret, or the secret as 64 hex
//!   digits);
//! - AES-256-GCM, random 12-byte IV in `connections.credentials_iv`,
//!   ciphertext||tag in `connections.encrypted_credentials` ([`LegacyLayout`]:
//!   or IV and tag inside the ciphertext column, in either order);
//! - no AAD: legacy ciphertexts are bound to nothing, which is one reason to
//!   migrate them.

use std::fmt;

use hkdf::Hkdf;
use sha2::{Digest as _, Sha256};

use super::{
    aead::{Cipher, OpenError, NONCE_LEN, TAG_LEN},
    secret::{MasterSecret, Plaintext, SecretKey, KEY_LEN},
};

/// How the legacy key derives from a master secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LegacyKdf {
    /// HKDF-SHA256 with this salt and info (the default: empty salt, info
    /// `connections:credentials`).
    HkdfSha256 { salt: String, info: String },
    /// SHA-256 of the master secret's bytes.
    Sha256,
    /// The master secret is the key itself, as 64 hex digits.
    RawHex,
}

/// Where the IV and the GCM tag of a legacy ciphertext are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LegacyLayout {
    /// The IV in its own column; ciphertext ‖ tag (the default).
    Separate,
    /// IV ‖ ciphertext ‖ tag, all in the ciphertext column.
    IvCiphertextTag,
    /// IV ‖ tag ‖ ciphertext, all in the ciphertext column (Node's
    /// `Buffer.concat([iv, cipher.getAuthTag(), encrypted])`).
    IvTagCiphertext,
}

impl LegacyLayout {
    pub const ALL: [LegacyLayout; 3] = [
        LegacyLayout::Separate,
        LegacyLayout::IvCiphertextTag,
        LegacyLayout::IvTagCiphertext,
    ];

    /// The name configuration uses.
    pub fn as_str(self) -> &'static str {
        match self {
            LegacyLayout::Separate => "separate",
            LegacyLayout::IvCiphertextTag => "iv-ciphertext-tag",
            LegacyLayout::IvTagCiphertext => "iv-tag-ciphertext",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|l| l.as_str() == name)
    }
}

/// The application's legacy scheme. The default is keyward's documented
/// format; a platform whose scheme differs configures it (see the README's
/// `--legacy-*` flags) instead of changing code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegacyFormat {
    pub kdf: LegacyKdf,
    pub layout: LegacyLayout,
}

/// The default HKDF info string: the runbook's `derived_key`.
pub const DEFAULT_INFO: &str = "connections:credentials";

impl Default for LegacyFormat {
    fn default() -> Self {
        Self {
            kdf: LegacyKdf::HkdfSha256 {
                salt: String::new(),
                info: DEFAULT_INFO.to_owned(),
            },
            layout: LegacyLayout::Separate,
        }
    }
}

/// A master secret that the configured KDF cannot take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the legacy KDF raw-hex takes a master secret of 64 hex digits (a 32-byte key)")]
pub struct NotAHexKey;

/// The recorded form of a [`LegacyFormat`] (JSON, as the database keeps
/// it): no secret in it, only how keys derive and where IVs sit.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Recorded {
    kdf: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    salt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    info: Option<String>,
    layout: String,
}

impl LegacyFormat {
    /// The format as one line of JSON (`keyward_settings`).
    pub fn to_json(&self) -> String {
        let (kdf, salt, info) = match &self.kdf {
            LegacyKdf::HkdfSha256 { salt, info } => {
                ("hkdf-sha256", Some(salt.clone()), Some(info.clone()))
            }
            LegacyKdf::Sha256 => ("sha256", None, None),
            LegacyKdf::RawHex => ("raw-hex", None, None),
        };
        let recorded = Recorded {
            kdf: kdf.to_owned(),
            salt,
            info,
            layout: self.layout.as_str().to_owned(),
        };
        // Strings only: it always serializes.
        serde_json::to_string(&recorded).unwrap_or_default()
    }

    /// A format [`Self::to_json`] wrote; `None` for anything else.
    pub fn from_json(json: &str) -> Option<Self> {
        let recorded: Recorded = serde_json::from_str(json).ok()?;
        let kdf = match recorded.kdf.as_str() {
            "hkdf-sha256" => LegacyKdf::HkdfSha256 {
                salt: recorded.salt.unwrap_or_default(),
                info: recorded.info.unwrap_or_else(|| DEFAULT_INFO.to_owned()),
            },
            "sha256" => LegacyKdf::Sha256,
            "raw-hex" => LegacyKdf::RawHex,
            _ => return None,
        };
        Some(Self {
            kdf,
            layout: LegacyLayout::parse(&recorded.layout)?,
        })
    }

    /// The legacy key of one master secret.
    pub fn derive(&self, master: &MasterSecret) -> Result<SecretKey, NotAHexKey> {
        match &self.kdf {
            LegacyKdf::HkdfSha256 { salt, info } => Ok(hkdf(master, salt, info)),
            LegacyKdf::Sha256 => Ok(SecretKey::derive_with(|out: &mut [u8; KEY_LEN]| {
                out.copy_from_slice(&Sha256::digest(master.expose()));
            })),
            LegacyKdf::RawHex => {
                let mut out = [0u8; KEY_LEN];
                let hex_digits = std::str::from_utf8(master.expose()).map_err(|_| NotAHexKey)?;
                hex::decode_to_slice(hex_digits.trim(), &mut out).map_err(|_| NotAHexKey)?;
                let key = SecretKey::from_slice(&out).ok_or(NotAHexKey);
                zeroize::Zeroize::zeroize(&mut out);
                key
            }
        }
    }

    /// `(iv, ciphertext ‖ tag)` of a stored legacy copy (its IV column and
    /// its ciphertext column); `None` when too short to hold them.
    fn split<'a>(&self, iv: &'a [u8], stored: &'a [u8]) -> Option<(&'a [u8], Vec<u8>)> {
        match self.layout {
            LegacyLayout::Separate => Some((iv, stored.to_vec())),
            LegacyLayout::IvCiphertextTag => (stored.len() >= NONCE_LEN + TAG_LEN).then(|| {
                let (iv, rest) = stored.split_at(NONCE_LEN);
                (iv, rest.to_vec())
            }),
            LegacyLayout::IvTagCiphertext => (stored.len() >= NONCE_LEN + TAG_LEN).then(|| {
                let (iv, rest) = stored.split_at(NONCE_LEN);
                let (tag, body) = rest.split_at(TAG_LEN);
                (iv, [body, tag].concat())
            }),
        }
    }

    /// The fixture generator: encrypts the way the old application did, so
    /// tests and `keyward legacy-encrypt` can create legacy rows. Returns
    /// (IV column, ciphertext column); the IV column is empty when the IV
    /// sits in the ciphertext column.
    pub fn encrypt(
        &self,
        master: &MasterSecret,
        plaintext: &[u8],
    ) -> Result<(Vec<u8>, Vec<u8>), NotAHexKey> {
        let (iv, sealed) = Cipher::new(&self.derive(master)?).seal(plaintext, b"");
        Ok(match self.layout {
            LegacyLayout::Separate => (iv.to_vec(), sealed),
            LegacyLayout::IvCiphertextTag => (Vec::new(), [&iv[..], &sealed].concat()),
            LegacyLayout::IvTagCiphertext => {
                let (body, tag) = sealed.split_at(sealed.len() - TAG_LEN);
                (Vec::new(), [&iv[..], tag, body].concat())
            }
        })
    }
}

impl fmt::Display for LegacyFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kdf {
            LegacyKdf::HkdfSha256 { salt, info } => {
                write!(f, "HKDF-SHA256 (salt {salt:?}, info {info:?})")?
            }
            LegacyKdf::Sha256 => f.write_str("SHA-256 of the master secret")?,
            LegacyKdf::RawHex => f.write_str("the master secret as a hex key")?,
        }
        write!(f, ", layout {}", self.layout.as_str())
    }
}

/// HKDF-SHA256 of a master secret (an empty salt is no salt).
fn hkdf(master: &MasterSecret, salt: &str, info: &str) -> SecretKey {
    let salt = (!salt.is_empty()).then_some(salt.as_bytes());
    let hk = Hkdf::<Sha256>::new(salt, master.expose());
    SecretKey::derive_with(|out: &mut [u8; KEY_LEN]| {
        // 32 bytes never exceeds HKDF's output limit.
        let _ = hk.expand(info.as_bytes(), out);
    })
}

/// The runbook's `derived_key` under the default format.
pub fn derive_legacy_key(master: &MasterSecret) -> SecretKey {
    hkdf(master, "", DEFAULT_INFO)
}

/// The legacy keys of every configured master secret, current first.
pub struct LegacyKeys {
    format: LegacyFormat,
    ciphers: Vec<Cipher>,
}

impl LegacyKeys {
    /// Under the default format.
    pub fn new<'a>(masters: impl IntoIterator<Item = &'a MasterSecret>) -> Self {
        Self::with_format(LegacyFormat::default(), masters)
    }

    /// Under `format`. A master secret the format's KDF cannot take (not
    /// a hex key, for raw-hex) has no legacy key: nothing decrypts under
    /// it, and `keyward` says so at start.
    pub fn with_format<'a>(
        format: LegacyFormat,
        masters: impl IntoIterator<Item = &'a MasterSecret>,
    ) -> Self {
        let ciphers = masters
            .into_iter()
            .filter_map(|m| format.derive(m).ok())
            .map(|key| Cipher::new(&key))
            .collect();
        Self { format, ciphers }
    }

    /// The format these keys decrypt.
    pub fn format(&self) -> &LegacyFormat {
        &self.format
    }

    /// Decrypts a legacy copy (its IV column, empty when the layout keeps
    /// the IV in the ciphertext, and its ciphertext column) under any
    /// configured master secret.
    pub fn decrypt(&self, iv: &[u8], ciphertext: &[u8]) -> Result<Plaintext, OpenError> {
        let (iv, sealed) = self.format.split(iv, ciphertext).ok_or(OpenError)?;
        if iv.len() != NONCE_LEN || sealed.len() < TAG_LEN {
            return Err(OpenError);
        }
        self.ciphers
            .iter()
            .find_map(|c| c.open(iv, &sealed, b"").ok())
            .ok_or(OpenError)
    }
}

/// The fixture generator under the default format. Returns (iv, ct||tag).
pub fn encrypt_legacy(master: &MasterSecret, plaintext: &[u8]) -> ([u8; NONCE_LEN], Vec<u8>) {
    Cipher::new(&derive_legacy_key(master)).seal(plaintext, b"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_format_is_recorded_and_read_back() {
        let formats = [
            LegacyFormat::default(),
            LegacyFormat {
                kdf: LegacyKdf::HkdfSha256 {
                    salt: "platform-salt".into(),
                    info: "credentials/v2".into(),
                },
                layout: LegacyLayout::IvTagCiphertext,
            },
            LegacyFormat {
                kdf: LegacyKdf::RawHex,
                layout: LegacyLayout::IvCiphertextTag,
            },
        ];
        for format in formats {
            assert_eq!(LegacyFormat::from_json(&format.to_json()), Some(format));
        }
        assert_eq!(
            LegacyFormat::default().to_json(),
            r#"{"kdf":"hkdf-sha256","salt":"","info":"connections:credentials","layout":"separate"}"#
        );
        assert_eq!(
            LegacyFormat::from_json(r#"{"kdf":"md5","layout":"separate"}"#),
            None
        );
    }

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

    #[test]
    fn every_layout_and_kdf_round_trips_and_rejects_the_others() {
        let master =
            MasterSecret::new("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef")
                .unwrap();
        let kdfs = [
            LegacyFormat::default().kdf,
            LegacyKdf::HkdfSha256 {
                salt: "app-salt".into(),
                info: "creds-v2".into(),
            },
            LegacyKdf::Sha256,
            LegacyKdf::RawHex,
        ];
        for kdf in kdfs {
            for layout in LegacyLayout::ALL {
                let format = LegacyFormat {
                    kdf: kdf.clone(),
                    layout,
                };
                let (iv, ct) = format.encrypt(&master, b"s3cret").unwrap();
                assert_eq!(iv.is_empty(), layout != LegacyLayout::Separate, "{format}");
                let keys = LegacyKeys::with_format(format.clone(), [&master]);
                assert_eq!(
                    keys.decrypt(&iv, &ct).unwrap().as_bytes(),
                    b"s3cret",
                    "{format}"
                );
                let default = LegacyKeys::new([&master]);
                assert!(
                    format == LegacyFormat::default() || default.decrypt(&iv, &ct).is_err(),
                    "{format}"
                );
            }
        }
        let short = LegacyFormat {
            layout: LegacyLayout::IvTagCiphertext,
            ..LegacyFormat::default()
        };
        assert!(LegacyKeys::with_format(short, [&master])
            .decrypt(&[], &[0; 20])
            .is_err());
    }

    /// Node's `iv ‖ authTag ‖ ciphertext`, made by hand, opens.
    #[test]
    fn the_iv_tag_ciphertext_layout_is_nodes() {
        let master = MasterSecret::new("a-master-secret-of-the-app").unwrap();
        let format = LegacyFormat {
            kdf: LegacyKdf::Sha256,
            layout: LegacyLayout::IvTagCiphertext,
        };
        let key = format.derive(&master).unwrap();
        let (iv, sealed) = Cipher::new(&key).seal(b"postgres://u:p@h/db", b"");
        let (body, tag) = sealed.split_at(sealed.len() - TAG_LEN);
        let stored = [&iv[..], tag, body].concat();
        let keys = LegacyKeys::with_format(format, [&master]);
        assert_eq!(
            keys.decrypt(&[], &stored).unwrap().as_bytes(),
            b"postgres://u:p@h/db"
        );
    }

    #[test]
    fn raw_hex_needs_a_hex_key() {
        let format = LegacyFormat {
            kdf: LegacyKdf::RawHex,
            layout: LegacyLayout::Separate,
        };
        let not_hex = MasterSecret::new("this is a passphrase, not hex").unwrap();
        assert_eq!(format.derive(&not_hex).unwrap_err(), NotAHexKey);
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
