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
//! Every RPC of both services has a method of its own, named after it
//! (`Encrypt` is [`Client::encrypt`], `PauseRotation` is
//! [`Client::pause_rotation`]); `tests/api/clients.rs` in the server's
//! repository calls each one and checks the server saw every method of the
//! proto. Errors are [`Error`]s, one variant per gRPC code a caller acts
//! on. Batch calls return one result per item: an item's failure never
//! fails the others. [`Client::watch_rotation`] is a
//! [`Stream`](futures::Stream) of progress events that ends after the
//! job's last one.

#![forbid(unsafe_code)]

use std::collections::HashMap;

use tonic::transport::Channel;

mod admin;
mod connect;
mod crypto;
mod error;

pub use connect::{Authed, Bearer, ClientBuilder};
pub use crypto::{Ciphertext, Opened, Rewrapped, Sealed};
pub use error::Error;

/// The generated `keyward.v1` messages and stubs, committed in
/// `src/gen` (so the crate builds on its own, with no `proto/` and no
/// `protoc`); `tests/stubs.rs` fails when they drift from the proto.
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    include!("gen/keyward.v1.rs");
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

/// A keyward client; cheap to clone (clones share one connection).
#[derive(Clone)]
pub struct Client {
    crypto: CryptoClient<Authed>,
    admin: AdminClient<Authed>,
}

impl Client {
    /// A builder for `url` (`http://HOST:PORT`, or `https://…` with TLS).
    pub fn builder(url: impl Into<String>) -> ClientBuilder {
        ClientBuilder::new(url.into())
    }

    /// Connects to `url` without a token (a `serve --dev` sandbox).
    pub async fn connect(url: impl Into<String>) -> Result<Self, Error> {
        Self::builder(url).connect().await
    }

    pub(crate) fn new(channel: Channel, bearer: Bearer) -> Self {
        Self {
            crypto: CryptoClient::with_interceptor(channel.clone(), bearer.clone()),
            admin: AdminClient::with_interceptor(channel, bearer),
        }
    }

    /// The generated Admin client (with this client's token): every Admin
    /// call has a method of its own on [`Client`]; this gives the raw
    /// `tonic::Request`/`Response` (metadata, streaming details).
    pub fn admin(&self) -> AdminClient<Authed> {
        self.admin.clone()
    }

    /// The generated Crypto client (with this client's token), as
    /// [`Client::admin`].
    pub fn crypto(&self) -> CryptoClient<Authed> {
        self.crypto.clone()
    }
}
