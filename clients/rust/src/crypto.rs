//! The Crypto service: Encrypt, Decrypt, Rewrap and their batch forms,
//! with the types they take and return.

use bytes::Bytes;
use tonic::Code;

use crate::{proto, Client, Context, Error};

/// A ciphertext to decrypt: the one-column blob, or the structured envelope.
#[derive(Debug, Clone)]
pub enum Ciphertext {
    Blob(Bytes),
    Envelope(proto::Envelope),
}

impl From<Bytes> for Ciphertext {
    fn from(blob: Bytes) -> Self {
        Self::Blob(blob)
    }
}

impl From<Vec<u8>> for Ciphertext {
    fn from(blob: Vec<u8>) -> Self {
        Self::Blob(blob.into())
    }
}

impl From<proto::Envelope> for Ciphertext {
    fn from(envelope: proto::Envelope) -> Self {
        Self::Envelope(envelope)
    }
}

impl From<Ciphertext> for proto::decrypt_request::Ciphertext {
    fn from(c: Ciphertext) -> Self {
        match c {
            Ciphertext::Blob(blob) => Self::Blob(blob),
            Ciphertext::Envelope(envelope) => Self::Envelope(envelope),
        }
    }
}

impl From<Ciphertext> for proto::rewrap_request::Ciphertext {
    fn from(c: Ciphertext) -> Self {
        match c {
            Ciphertext::Blob(blob) => Self::Blob(blob),
            Ciphertext::Envelope(envelope) => Self::Envelope(envelope),
        }
    }
}

/// An Encrypt's result: store either the blob (one column) or the
/// envelope's five fields.
#[derive(Debug, Clone)]
pub struct Sealed {
    pub blob: Bytes,
    pub envelope: Option<proto::Envelope>,
    /// The `key_id` of the key it is under.
    pub key_id: String,
}

impl From<proto::EncryptResponse> for Sealed {
    fn from(r: proto::EncryptResponse) -> Self {
        Self {
            blob: r.blob,
            envelope: r.envelope,
            key_id: r.key_id,
        }
    }
}

/// A Rewrap's result: the same secret under the active key, bound to the
/// same context. Store it in place of what was given.
#[derive(Debug, Clone)]
pub struct Rewrapped {
    pub blob: Bytes,
    pub envelope: Option<proto::Envelope>,
    /// The `key_id` of the key it is under now (the active key).
    pub key_id: String,
    /// False: it already was on the active key under the current
    /// key-encryption key, and came back as given.
    pub rewrapped: bool,
}

impl From<proto::RewrapResponse> for Rewrapped {
    fn from(r: proto::RewrapResponse) -> Self {
        Self {
            blob: r.blob,
            envelope: r.envelope,
            key_id: r.key_id,
            rewrapped: r.rewrapped,
        }
    }
}

/// A Decrypt's result.
#[derive(Clone)]
pub struct Opened {
    pub plaintext: Bytes,
    /// `encryption_keys.id` of the key it was under (empty for legacy).
    pub encryption_key_id: String,
    /// It was in the pre-keyward legacy format.
    pub legacy: bool,
}

impl std::fmt::Debug for Opened {
    // Never print a plaintext.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opened")
            .field(
                "plaintext",
                &format_args!("<{} bytes>", self.plaintext.len()),
            )
            .field("encryption_key_id", &self.encryption_key_id)
            .field("legacy", &self.legacy)
            .finish()
    }
}

impl From<proto::DecryptResponse> for Opened {
    fn from(r: proto::DecryptResponse) -> Self {
        Self {
            plaintext: r.plaintext,
            encryption_key_id: r.encryption_key_id,
            legacy: r.legacy,
        }
    }
}

impl Client {
    /// The same secret under the active key, never returned in plaintext
    /// (role `rewrap`, which does not grant `decrypt`): give it the
    /// ciphertext and the context it was encrypted with.
    pub async fn rewrap(
        &self,
        ciphertext: impl Into<Ciphertext>,
        context: &Context,
    ) -> Result<Rewrapped, Error> {
        let response = self
            .crypto
            .clone()
            .rewrap(rewrap_request(ciphertext.into(), context.clone()))
            .await?;
        Ok(response.into_inner().into())
    }

    /// Rewraps many items in one call; one result per item, in order.
    pub async fn batch_rewrap(
        &self,
        items: impl IntoIterator<Item = (Ciphertext, Context)>,
    ) -> Result<Vec<Result<Rewrapped, Error>>, Error> {
        let items = items
            .into_iter()
            .map(|(ciphertext, context)| rewrap_request(ciphertext, context))
            .collect();
        let response = self
            .crypto
            .clone()
            .batch_rewrap(proto::BatchRewrapRequest { items })
            .await?;
        Ok(response
            .into_inner()
            .results
            .into_iter()
            .map(|r| {
                item(r.result.map(|r| match r {
                    proto::batch_rewrap_result::Result::Ok(ok) => Ok(ok),
                    proto::batch_rewrap_result::Result::Error(e) => Err(e),
                }))
            })
            .collect())
    }

    /// Encrypts `plaintext` bound to `context`.
    pub async fn encrypt(
        &self,
        plaintext: impl Into<Bytes>,
        context: &Context,
    ) -> Result<Sealed, Error> {
        let response = self
            .crypto
            .clone()
            .encrypt(encrypt_request(plaintext.into(), context.clone()))
            .await?;
        Ok(response.into_inner().into())
    }

    /// Decrypts a blob or an envelope with the context it was encrypted
    /// with.
    pub async fn decrypt(
        &self,
        ciphertext: impl Into<Ciphertext>,
        context: &Context,
    ) -> Result<Opened, Error> {
        let response = self
            .crypto
            .clone()
            .decrypt(decrypt_request(ciphertext.into(), context.clone()))
            .await?;
        Ok(response.into_inner().into())
    }

    /// Encrypts many items in one call; one result per item, in order.
    pub async fn batch_encrypt(
        &self,
        items: impl IntoIterator<Item = (Bytes, Context)>,
    ) -> Result<Vec<Result<Sealed, Error>>, Error> {
        let items = items
            .into_iter()
            .map(|(plaintext, context)| encrypt_request(plaintext, context))
            .collect();
        let response = self
            .crypto
            .clone()
            .batch_encrypt(proto::BatchEncryptRequest { items })
            .await?;
        Ok(response
            .into_inner()
            .results
            .into_iter()
            .map(|r| {
                item(r.result.map(|r| match r {
                    proto::batch_encrypt_result::Result::Ok(ok) => Ok(ok),
                    proto::batch_encrypt_result::Result::Error(e) => Err(e),
                }))
            })
            .collect())
    }

    /// Decrypts many items in one call; one result per item, in order.
    pub async fn batch_decrypt(
        &self,
        items: impl IntoIterator<Item = (Ciphertext, Context)>,
    ) -> Result<Vec<Result<Opened, Error>>, Error> {
        let items = items
            .into_iter()
            .map(|(ciphertext, context)| decrypt_request(ciphertext, context))
            .collect();
        let response = self
            .crypto
            .clone()
            .batch_decrypt(proto::BatchDecryptRequest { items })
            .await?;
        Ok(response
            .into_inner()
            .results
            .into_iter()
            .map(|r| {
                item(r.result.map(|r| match r {
                    proto::batch_decrypt_result::Result::Ok(ok) => Ok(ok),
                    proto::batch_decrypt_result::Result::Error(e) => Err(e),
                }))
            })
            .collect())
    }
}

/// One batch item's outcome as a `Result`.
fn item<T, U: Into<T>>(result: Option<Result<U, proto::ItemError>>) -> Result<T, Error> {
    match result {
        Some(Ok(ok)) => Ok(ok.into()),
        Some(Err(e)) => Err(e.into()),
        None => Err(Error::Other {
            code: Code::Internal,
            message: "empty batch result".into(),
        }),
    }
}

fn encrypt_request(plaintext: Bytes, context: Context) -> proto::EncryptRequest {
    proto::EncryptRequest {
        plaintext,
        context,
        ..Default::default()
    }
}

fn rewrap_request(ciphertext: Ciphertext, context: Context) -> proto::RewrapRequest {
    proto::RewrapRequest {
        context,
        ciphertext: Some(ciphertext.into()),
        ..Default::default()
    }
}

fn decrypt_request(ciphertext: Ciphertext, context: Context) -> proto::DecryptRequest {
    proto::DecryptRequest {
        context,
        ciphertext: Some(ciphertext.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintexts_do_not_print() {
        let opened = Opened {
            plaintext: Bytes::from_static(b"hunter2"),
            encryption_key_id: "k".into(),
            legacy: false,
        };
        assert!(!format!("{opened:?}").contains("hunter2"));
    }
}
