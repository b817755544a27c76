//! Cryptography: the envelope format, AES-256-GCM, KMS providers, the legacy
//! format, and the zeroizing types that hold key material. Nothing here does
//! I/O except a KMS provider's own calls; nothing here knows gRPC or SQL.

pub mod aead;
pub mod blob;
pub mod cache;
pub mod context;
pub mod envelope;
pub mod kms;
pub mod legacy;
pub mod secret;
