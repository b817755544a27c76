//! keyward: an envelope-encryption key service.
//!
//! Applications call `keyward.v1.Crypto` over gRPC to encrypt and decrypt
//! secrets and never see a data key; operators call `keyward.v1.Admin` (or
//! the `keyward` CLI) to manage the key catalog.
//!
//! # Layout
//! - [`api`]: the gRPC layer (the only place that knows proto types);
//! - [`service`]: the operations, transport-free;
//! - [`crypto`]: envelope format, AES-256-GCM, KMS providers, secrets;
//! - [`keys`]: key records and the in-memory catalog;
//! - [`report`]: an error and its causes as one line (a leaf);
//! - [`store`]: the database (SQLite or PostgreSQL), the only place with SQL;
//! - [`app`]: wiring and the server's lifecycle;
//! - [`metrics`]: the Prometheus endpoint;
//! - [`transport`]: write coalescing for the gRPC connections;
//! - [`cli`]: the `keyward` command line (the binary's edge, uses `anyhow`);
//!
//! See `ARCHITECTURE.md` for the map and the invariants.

#![forbid(unsafe_code)]

pub mod api;
pub mod app;
pub mod auth;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod error;
pub mod idle;
pub mod keys;
pub mod metrics;
pub mod reload;
pub mod report;
pub mod rotation;
pub mod service;
pub mod store;
#[cfg(feature = "tls")]
pub mod tls;
pub mod transport;
