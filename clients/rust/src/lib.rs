//! A typed Rust client for keyward, the envelope-encryption key service.
//!
//! ```no_run
//! # async fn demo() -> Result<(), keyward_client::Error> {
//! use keyward_client::{context, Client};
//!
//! let client = Client::builder("http://127.0.0.1:50051")
//!     .token("kw_…") // from `keyward token create`
//!     .connect()
//!     .await?;
//! // Bind the ciphertext to the row it is stored in.
//! let row = context([("connection_id", "42")]);
//! let sealed = client.encrypt(&b"hunter2"[..], &row).await?;
//! let opened = client.decrypt(sealed.blob.clone(), &row).await?;
//! assert_eq!(&opened.plaintext[..], b"hunter2");
//! # Ok(()) }
//! ```
//!
//! Errors are [`Error`]s, one variant per gRPC code a caller acts on.
//! Batch calls return one result per item: an item's failure never fails
//! the others. [`Client::watch_rotation`] is a [`Stream`] of progress
//! events that ends after the job's last one.

#![forbid(unsafe_code)]

use std::{collections::HashMap, time::Duration};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use tonic::{
    metadata::{Ascii, MetadataValue},
    service::interceptor::InterceptedService,
    transport::{Channel, Endpoint},
    Code, Request, Status,
};

/// The generated `keyward.v1` messages and stubs.
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("keyward.v1");
}

use proto::{admin_client::AdminClient, crypto_client::CryptoClient};

/// An encryption context: the key/value pairs a ciphertext is bound to.
/// The same pairs must be given to decrypt it.
pub type Context = HashMap<String, String>;

/// A context from pairs: `context([("connection_id", "42")])`.
pub fn context<K: Into<String>, V: Into<String>>(
    pairs: impl IntoIterator<Item = (K, V)>,
) -> Context {
    pairs
        .into_iter()
        .map(|(k, v)| (k.into(), v.into()))
        .collect()
}

/// What a call failed with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Bad input: a wrong context, a damaged or foreign ciphertext, limits.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// No such key record or rotation job.
    #[error("not found: {0}")]
    NotFound(String),
    /// The server cannot do it in its current state (no active key, a
    /// disabled KMS key, a job in the wrong state).
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// No valid token or client certificate.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// The caller's role or scope does not allow it.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// Rate limit, or a request larger than the server accepts.
    #[error("resource exhausted: {0}")]
    ResourceExhausted(String),
    /// The server or its KMS is unreachable for now: retry later.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// Any other gRPC code.
    #[error("{code:?}: {message}")]
    Other { code: Code, message: String },
    /// The connection could not be made.
    #[error("cannot connect: {0}")]
    Connect(#[from] tonic::transport::Error),
    /// The client was configured wrongly (e.g. a token that is not ASCII).
    #[error("invalid client configuration: {0}")]
    Config(String),
}

impl Error {
    fn from_code(code: Code, message: String) -> Self {
        match code {
            Code::InvalidArgument => Self::InvalidArgument(message),
            Code::NotFound => Self::NotFound(message),
            Code::FailedPrecondition => Self::FailedPrecondition(message),
            Code::Unauthenticated => Self::Unauthenticated(message),
            Code::PermissionDenied => Self::PermissionDenied(message),
            Code::ResourceExhausted => Self::ResourceExhausted(message),
            Code::Unavailable => Self::Unavailable(message),
            code => Self::Other { code, message },
        }
    }

    /// The gRPC code, for errors the server returned.
    pub fn code(&self) -> Option<Code> {
        Some(match self {
            Self::InvalidArgument(_) => Code::InvalidArgument,
            Self::NotFound(_) => Code::NotFound,
            Self::FailedPrecondition(_) => Code::FailedPrecondition,
            Self::Unauthenticated(_) => Code::Unauthenticated,
            Self::PermissionDenied(_) => Code::PermissionDenied,
            Self::ResourceExhausted(_) => Code::ResourceExhausted,
            Self::Unavailable(_) => Code::Unavailable,
            Self::Other { code, .. } => *code,
            Self::Connect(_) | Self::Config(_) => return None,
        })
    }
}

impl From<Status> for Error {
    fn from(status: Status) -> Self {
        Self::from_code(status.code(), status.message().to_owned())
    }
}

impl From<proto::ItemError> for Error {
    fn from(item: proto::ItemError) -> Self {
        Self::from_code(Code::from_i32(item.code), item.message)
    }
}

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

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

type Authed = InterceptedService<Channel, Bearer>;

/// How to reach a keyward server.
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    url: String,
    token: Option<String>,
    timeout: Option<Duration>,
    connect_timeout: Duration,
    #[cfg(feature = "tls")]
    tls: Option<tonic::transport::ClientTlsConfig>,
}

impl ClientBuilder {
    /// A bearer token (`keyward token create`).
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// A deadline for each unary call (not for WatchRotation).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Trust this PEM CA for the server's certificate (an `https://` URL).
    #[cfg(feature = "tls")]
    pub fn ca_certificate(mut self, pem: impl AsRef<[u8]>) -> Self {
        let tls = self.tls.take().unwrap_or_default();
        self.tls = Some(tls.ca_certificate(tonic::transport::Certificate::from_pem(pem)));
        self
    }

    /// Present this client certificate and key (mutual TLS).
    #[cfg(feature = "tls")]
    pub fn client_identity(
        mut self,
        cert_pem: impl AsRef<[u8]>,
        key_pem: impl AsRef<[u8]>,
    ) -> Self {
        let tls = self.tls.take().unwrap_or_default();
        self.tls = Some(tls.identity(tonic::transport::Identity::from_pem(cert_pem, key_pem)));
        self
    }

    /// The name to check the server's certificate against, when it is not
    /// the URL's host.
    #[cfg(feature = "tls")]
    pub fn tls_domain(mut self, name: impl Into<String>) -> Self {
        let tls = self.tls.take().unwrap_or_default();
        self.tls = Some(tls.domain_name(name));
        self
    }

    fn endpoint(&self) -> Result<Endpoint, Error> {
        let mut endpoint = Endpoint::from_shared(self.url.clone())
            .map_err(|e| Error::Config(format!("url {:?}: {e}", self.url)))?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true);
        if let Some(timeout) = self.timeout {
            endpoint = endpoint.timeout(timeout);
        }
        #[cfg(feature = "tls")]
        if let Some(tls) = &self.tls {
            endpoint = endpoint.tls_config(tls.clone())?;
        }
        Ok(endpoint)
    }

    fn bearer(&self) -> Result<Bearer, Error> {
        self.token
            .as_deref()
            .map(|t| {
                format!("Bearer {t}")
                    .parse::<MetadataValue<Ascii>>()
                    .map_err(|_| Error::Config("the token is not printable ASCII".into()))
            })
            .transpose()
            .map(Bearer)
    }

    /// Connects now; fails if the server cannot be reached.
    pub async fn connect(self) -> Result<Client, Error> {
        let bearer = self.bearer()?;
        let channel = self.endpoint()?.connect().await?;
        Ok(Client::new(channel, bearer))
    }

    /// Connects on first use.
    pub fn connect_lazy(self) -> Result<Client, Error> {
        let bearer = self.bearer()?;
        Ok(Client::new(self.endpoint()?.connect_lazy(), bearer))
    }
}

/// A keyward client; cheap to clone (clones share one connection).
#[derive(Clone)]
pub struct Client {
    crypto: CryptoClient<Authed>,
    admin: AdminClient<Authed>,
}

impl Client {
    /// A builder for `url` (`http://HOST:PORT`, or `https://…` with TLS).
    pub fn builder(url: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            url: url.into(),
            token: None,
            timeout: None,
            connect_timeout: Duration::from_secs(5),
            #[cfg(feature = "tls")]
            tls: None,
        }
    }

    /// Connects to `url` without a token (a `serve --dev` sandbox).
    pub async fn connect(url: impl Into<String>) -> Result<Self, Error> {
        Self::builder(url).connect().await
    }

    fn new(channel: Channel, bearer: Bearer) -> Self {
        Self {
            crypto: CryptoClient::with_interceptor(channel.clone(), bearer.clone()),
            admin: AdminClient::with_interceptor(channel, bearer),
        }
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

    /// Queues a rotation job (admin role).
    pub async fn start_rotation(
        &self,
        request: proto::StartRotationRequest,
    ) -> Result<proto::RotationJob, Error> {
        Ok(self
            .admin
            .clone()
            .start_rotation(request)
            .await?
            .into_inner())
    }

    /// One job as it stands.
    pub async fn rotation_job(&self, job_id: &str) -> Result<proto::RotationJob, Error> {
        let request = proto::GetRotationJobRequest {
            job_id: job_id.to_owned(),
        };
        Ok(self
            .admin
            .clone()
            .get_rotation_job(request)
            .await?
            .into_inner())
    }

    /// The job's progress: its state at once, then an event per change (or
    /// every second); the stream ends after the terminal event.
    pub async fn watch_rotation(
        &self,
        job_id: &str,
    ) -> Result<impl Stream<Item = Result<proto::RotationProgress, Error>> + Send + 'static, Error>
    {
        let request = proto::WatchRotationRequest {
            job_id: job_id.to_owned(),
        };
        let stream = self
            .admin
            .clone()
            .watch_rotation(request)
            .await?
            .into_inner();
        Ok(stream.map(|event| event.map_err(Error::from)))
    }

    /// The generated Admin client (with this client's token), for the calls
    /// this crate does not wrap.
    pub fn admin(&self) -> AdminClient<Authed> {
        self.admin.clone()
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
    fn codes_map_to_variants_and_back() {
        for code in [
            Code::InvalidArgument,
            Code::NotFound,
            Code::FailedPrecondition,
            Code::Unauthenticated,
            Code::PermissionDenied,
            Code::ResourceExhausted,
            Code::Unavailable,
            Code::Internal,
            Code::Aborted,
        ] {
            let error = Error::from(Status::new(code, "m"));
            assert_eq!(error.code(), Some(code));
        }
        assert!(matches!(
            Error::from(proto::ItemError {
                code: Code::InvalidArgument as i32,
                message: "bad".into()
            }),
            Error::InvalidArgument(m) if m == "bad"
        ));
    }

    #[test]
    fn plaintexts_do_not_print() {
        let opened = Opened {
            plaintext: Bytes::from_static(b"hunter2"),
            encryption_key_id: "k".into(),
            legacy: false,
        };
        assert!(!format!("{opened:?}").contains("hunter2"));
    }

    #[test]
    fn a_token_must_be_ascii() {
        let built = Client::builder("http://127.0.0.1:1")
            .token("bad\ntoken")
            .connect_lazy();
        assert!(matches!(built, Err(Error::Config(_))));
    }
}
