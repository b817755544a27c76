//! The operations of keyward, independent of transport: no tonic here and
//! no SQL (that is `store`). The gRPC layer and the CLI both call into this.

pub mod admin;
pub mod audited;
pub mod catalog;
pub mod crypto;
pub mod cutover;
pub mod foreground;
pub mod legacy_format;
pub mod probes;
pub mod progress;
pub mod readiness;
pub mod replica;
pub mod retirement;
pub mod rollout;
pub mod rotation;
pub mod targets;
pub mod tokens;
