//! The gRPC layer: thin adapters from `keyward.v1` messages to the service
//! layer. This is the only module that imports generated proto types;
//! conversions live in `convert`, and domain errors become `tonic::Status`
//! in `status`, in one place.

mod admin;
pub mod auth;
pub mod codec;
mod convert;
mod crypto;
pub mod dashboard;
pub mod observe;
pub mod status;

pub use admin::AdminApi;
pub use crypto::CryptoApi;

/// The generated `keyward.v1` types, servers and clients.
pub mod proto {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("keyward.v1");

    /// The encoded descriptor set, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("keyward_descriptor");
}

/// The HTTP service a keyward middleware wraps: tonic's router, or another
/// middleware around it.
pub trait HttpService<B>:
    tower::Service<
        http::Request<B>,
        Response = http::Response<tonic::body::Body>,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static
{
}

impl<S, B> HttpService<B> for S where
    S: tower::Service<
            http::Request<B>,
            Response = http::Response<tonic::body::Body>,
            Future: Send + 'static,
        > + Clone
        + Send
        + 'static
{
}

/// The associated types and `poll_ready` of a middleware over an
/// [`HttpService`] `S` held in its `inner` field, whose `call` boxes its
/// future: readiness is the inner service's.
macro_rules! middleware_head {
    () => {
        type Response = http::Response<tonic::body::Body>;
        type Error = S::Error;
        type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

        fn poll_ready(
            &mut self,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Self::Error>> {
            self.inner.poll_ready(cx)
        }
    };
}
use middleware_head;

/// For a tower middleware's `call`: the inner service that `poll_ready`
/// readied, leaving a fresh clone in its place (the readied one must be
/// the one called, and the future must own it).
fn take_ready<S: Clone>(inner: &mut S) -> S {
    let clone = inner.clone();
    std::mem::replace(inner, clone)
}
