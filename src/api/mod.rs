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

/// For a tower middleware's `call`: the inner service that `poll_ready`
/// readied, leaving a fresh clone in its place (the readied one must be
/// the one called, and the future must own it).
fn take_ready<S: Clone>(inner: &mut S) -> S {
    let clone = inner.clone();
    std::mem::replace(inner, clone)
}
