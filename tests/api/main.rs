//! End-to-end tests: each starts the real keyward server on a random port
//! (in-process, or the built binary for CLI and signal tests) and talks to
//! it through the generated gRPC clients. One test binary keeps link time
//! down; each test gets its own database.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail loudly by design

mod admin;
mod adoption;
mod adoption_sqlite;
mod audit_bounds;
mod aws_kms;
mod budget;
mod cli;
mod clients;
mod config;
mod crypto;
mod encodings;
mod faults;
mod grpc_web;
mod grpcurl;
mod helpers;
mod hostile;
mod job_control;
mod legacy_format;
mod legacy_scope;
mod master_secret;
mod metrics;
mod moto;
mod pkcs11;
mod postgres;
mod progress;
mod replicas;
mod rewrap;
mod rollover;
mod rotation;
mod scale_out;
mod security;
mod softhsm;
mod targets;
mod tidy;
mod transport;
mod workers;
