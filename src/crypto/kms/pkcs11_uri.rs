//! PKCS#11 key references: RFC 7512 URIs in `encryption_keys.kms_key_arn`,
//! such as `pkcs11:token=keyward;object=kek-2026-12`. keyward reads the
//! path attributes `token` (the token's label; optional, and then it must
//! be the token this process is configured with), `object` (the key
//! object's `CKA_LABEL`, required) and `type` (`secret-key` if given).
//! Values are percent-decoded. Query attributes (`?pin-value=…`) are
//! refused: a PIN does not belong in the catalog.

use std::fmt;

/// A parsed key reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyUri {
    /// The token's label, when the URI names one.
    pub token: Option<String>,
    /// The key object's label.
    pub object: String,
}

/// Why a string is not a key reference keyward can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UriError {
    Scheme,
    NoObject,
    Query,
    Malformed,
    NotSecretKey,
}

impl UriError {
    /// What is wrong, for messages (`KmsError::InvalidKeyRef` carries it).
    pub fn reason(self) -> &'static str {
        match self {
            UriError::Scheme => "it does not begin with pkcs11:",
            UriError::NoObject => "it names no object (object=LABEL)",
            UriError::Query => "it has query attributes (a PIN does not belong in kms_key_arn: give it with --pkcs11-pin-file or KEYWARD_PKCS11_PIN)",
            UriError::Malformed => "an attribute is not NAME=VALUE, or its value is not valid percent-encoded UTF-8",
            UriError::NotSecretKey => "type must be secret-key (keyward's key objects are AES keys)",
        }
    }
}

impl fmt::Display for UriError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason())
    }
}

impl std::error::Error for UriError {}

impl KeyUri {
    pub fn parse(uri: &str) -> Result<Self, UriError> {
        let path = uri.trim().strip_prefix("pkcs11:").ok_or(UriError::Scheme)?;
        if path.contains('?') {
            return Err(UriError::Query);
        }
        let mut token = None;
        let mut object = None;
        for attribute in path.split(';').filter(|a| !a.is_empty()) {
            let (name, value) = attribute.split_once('=').ok_or(UriError::Malformed)?;
            let value = percent_decode(value).ok_or(UriError::Malformed)?;
            match name {
                "token" => token = Some(value),
                "object" => object = Some(value),
                "type" if value != "secret-key" => return Err(UriError::NotSecretKey),
                // Other attributes (manufacturer, model, serial, id, …)
                // narrow what the module matches; keyward finds keys by
                // label on the configured token.
                _ => {}
            }
        }
        let object = object.filter(|o| !o.is_empty()).ok_or(UriError::NoObject)?;
        Ok(Self { token, object })
    }
}

impl fmt::Display for KeyUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("pkcs11:")?;
        if let Some(token) = &self.token {
            write!(f, "token={};", percent_encode(token))?;
        }
        write!(f, "object={}", percent_encode(&self.object))
    }
}

fn percent_decode(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = value.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// RFC 7512's `pchar` set, less `;` and `=` (attribute separators), kept
/// as is; everything else percent-encoded.
fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~:@&+$,!*'()".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_and_object_are_read_and_decoded() {
        let uri = KeyUri::parse("pkcs11:token=keyward;object=kek-2026-12").unwrap();
        assert_eq!(uri.token.as_deref(), Some("keyward"));
        assert_eq!(uri.object, "kek-2026-12");
        let spaced = KeyUri::parse("pkcs11:token=My%20Token;type=secret-key;object=a%3Bb").unwrap();
        assert_eq!(spaced.token.as_deref(), Some("My Token"));
        assert_eq!(spaced.object, "a;b");
        assert_eq!(spaced.to_string(), "pkcs11:token=My%20Token;object=a%3Bb");
        assert_eq!(KeyUri::parse(&spaced.to_string()), Ok(spaced));
        let bare = KeyUri::parse("pkcs11:object=k;manufacturer=SoftHSM").unwrap();
        assert_eq!((bare.token, bare.object.as_str()), (None, "k"));
    }

    #[test]
    fn references_keyward_cannot_use_are_refused() {
        assert_eq!(KeyUri::parse("local:k"), Err(UriError::Scheme));
        assert_eq!(KeyUri::parse("pkcs11:token=t"), Err(UriError::NoObject));
        assert_eq!(KeyUri::parse("pkcs11:object="), Err(UriError::NoObject));
        assert_eq!(
            KeyUri::parse("pkcs11:object=k?pin-value=1234"),
            Err(UriError::Query)
        );
        assert_eq!(KeyUri::parse("pkcs11:object"), Err(UriError::Malformed));
        assert_eq!(KeyUri::parse("pkcs11:object=%zz"), Err(UriError::Malformed));
        assert_eq!(
            KeyUri::parse("pkcs11:object=k;type=private"),
            Err(UriError::NotSecretKey)
        );
    }
}
