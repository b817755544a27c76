//! `keyward-bench`: keyward's benchmarks, a binary of their own (as
//! `redis-benchmark` and `vault-benchmark` are), built on the `keyward`
//! library and the `keyward-client` stubs. The server binary carries none
//! of this.
//!
//! - `throughput` ([`throughput`]): Encrypt, Decrypt and BatchEncrypt
//!   against the `Health/Check` floor, on one channel, in one run;
//! - `rotation` ([`rotation`]): rotation rows/s against a one-`UPDATE`
//!   floor, and Encrypt p99 during a rotation against idle, without and
//!   within a latency budget, measured by `load` ([`load`]): Encrypt at a
//!   fixed rate from a child process;
//! - `soak` ([`soak`]): a bounded soak of a real `keyward serve` process;
//! - `adopt` ([`adopt`]): `migrate` adopting an application's live table;
//! - `kms-cache` ([`kms_cache`]): the data-key cache on a remote KMS or an
//!   HSM;
//! - `aead` ([`aead`]): keyward's AES-256-GCM (aws-lc-rs) against
//!   RustCrypto's `aes-gcm`, the figures behind that choice.
//!
//! [`server`] starts the in-process server the first two measure; [`rows`]
//! writes, reads and removes the benchmark's own rows (every statement
//! scoped to the run's id prefix).

mod adopt;
mod aead;
#[cfg(all(feature = "aws-kms", feature = "pkcs11"))]
mod kms_cache;
mod load;
mod rotation;
mod rows;
mod server;
mod soak;
mod throughput;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// The shipped binary's allocator (`src/main.rs`): the in-process server
/// is measured as `keyward serve` runs.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(name = "keyward-bench", version, about = "Benchmarks of keyward")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Measure Encrypt/Decrypt/BatchEncrypt against the Health/Check floor.
    Throughput(throughput::ThroughputArgs),
    /// Measure rotation rows/s against a single-UPDATE floor, and Encrypt
    /// p99 during a rotation against idle, without a latency budget and
    /// within one (use an empty PostgreSQL database).
    Rotation(rotation::RotationArgs),
    /// Seal and open with the AES-256-GCM keyward runs (aws-lc-rs) and with
    /// RustCrypto's aes-gcm, on the same payloads: ops/s and their ratio.
    Aead(aead::AeadArgs),
    /// Call Encrypt at a fixed rate (an open loop) and report p50/p99 from
    /// when each call was due: the latency `rotation` measures, from a
    /// process of its own.
    Load(load::LoadArgs),
    /// Adopt an application's live `connections` table (--rows rows, uuid
    /// ids) on PostgreSQL while writers update it: migrate's wall time and
    /// the writers' longest stall (in a schema of its own, dropped after).
    Adopt(adopt::AdoptArgs),
    /// Soak a `keyward serve` child process on PostgreSQL: mixed
    /// Encrypt/Decrypt load while it rotates --rows rows, then read every
    /// row back; reports errors, p50/p99 over time and peak RSS (use an
    /// empty database). Exit 0 only if it passed.
    Soak(soak::SoakArgs),
    #[cfg(all(feature = "aws-kms", feature = "pkcs11"))]
    /// Measure Encrypt/Decrypt through an aws-kms key (point
    /// --aws-kms-endpoint at a KMS-compatible server, or use AWS) or, with
    /// --provider pkcs11, an HSM key, with the data-key cache on and off,
    /// against the Health/Check floor, counting KMS (HSM) calls.
    KmsCache(kms_cache::KmsCacheArgs),
}

/// The database a benchmark writes to: its own rows, keys and job, removed
/// when it ends.
#[derive(Debug, Clone, clap::Args)]
struct DatabaseArgs {
    /// Database to benchmark on (an empty PostgreSQL database is the
    /// intended target).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The benchmarks report on stdout; the in-process server's INFO lines
    // would interleave with the tables (RUST_LOG still turns them on).
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("keyward-bench: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(err) => {
            eprintln!("keyward-bench: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs one benchmark; `false` when it ran and failed its own checks.
async fn run(command: Command) -> anyhow::Result<bool> {
    match command {
        Command::Throughput(args) => throughput::run(args).await.map(|_| true),
        Command::Rotation(args) => rotation::run(args).await.map(|()| true),
        Command::Load(args) => load::run(args).await.map(|()| true),
        Command::Aead(args) => aead::run(&args).map(|()| true),
        Command::Soak(args) => soak::run(args).await,
        Command::Adopt(args) => adopt::run(args).await.map(|()| true),
        #[cfg(all(feature = "aws-kms", feature = "pkcs11"))]
        Command::KmsCache(args) => kms_cache::run(args).await.map(|()| true),
    }
}
