//! `keyward-bench aead`: the AES-256-GCM keyward runs (AWS-LC through
//! `aws-lc-rs`, [`keyward::crypto::aead::Cipher`]) against RustCrypto's
//! `aes-gcm`, the design card's choice, on the same payloads in one run:
//! the figures behind the decision recorded in ARCHITECTURE.md. `aes-gcm`
//! is a dependency of this benchmark only; the server carries one AES
//! implementation.
//!
//! Each round seals and opens `--ops` payloads with one implementation,
//! then the other (their order alternating by round, so drift in the
//! machine's speed hits both alike); the ratio is reported per payload
//! size as the median of the rounds, with the lowest and highest.

use std::time::Instant;

use aes_gcm::{
    aead::{Aead, Payload},
    Aes256Gcm, KeyInit,
};
use anyhow::{bail, Context as _};
use clap::Args;
use keyward::crypto::{aead::Cipher, secret::SecretKey};

use crate::rotation::median;

#[derive(Debug, Clone, Args)]
pub struct AeadArgs {
    /// Plaintext sizes to measure, in bytes.
    #[arg(long, value_delimiter = ',', default_value = "32,300,1024,16384")]
    pub payload_bytes: Vec<usize>,
    /// Rounds per size (each times both implementations).
    #[arg(long, default_value_t = 11)]
    pub rounds: usize,
    /// Seal-and-open pairs per implementation per round.
    #[arg(long, default_value_t = 20_000)]
    pub ops: usize,
}

const AAD: &[u8] = b"keyward benchmark associated data, about as long as a context";

pub fn run(args: &AeadArgs) -> anyhow::Result<()> {
    let key_bytes = [0x5au8; 32];
    let key = SecretKey::from_slice(&key_bytes).context("a 32-byte key")?;
    let ours = Cipher::new(&key);
    let theirs = Aes256Gcm::new_from_slice(&key_bytes)?;
    println!(
        "keyward-bench aead: seal+open pairs per second, {} rounds of {} pairs each",
        args.rounds, args.ops
    );
    println!(
        "{:>8} {:>16} {:>16} {:>22}",
        "bytes", "aws-lc-rs op/s", "aes-gcm op/s", "ratio (min/med/max)"
    );
    for &size in &args.payload_bytes {
        let plaintext = vec![0x42u8; size];
        let (mut ours_rates, mut theirs_rates, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..args.rounds.max(1) {
            let time_ours = || -> anyhow::Result<f64> {
                let started = Instant::now();
                for _ in 0..args.ops {
                    let (nonce, sealed) = ours.seal(&plaintext, AAD);
                    let opened = ours
                        .open(&nonce, &sealed, AAD)
                        .map_err(|_| anyhow::anyhow!("aws-lc-rs refused its own ciphertext"))?;
                    if opened.as_bytes().len() != size {
                        bail!("aws-lc-rs opened the wrong length");
                    }
                }
                Ok(args.ops as f64 / started.elapsed().as_secs_f64())
            };
            let time_theirs = || -> anyhow::Result<f64> {
                let started = Instant::now();
                for n in 0..args.ops {
                    let mut nonce = [0u8; 12];
                    nonce[..8].copy_from_slice(&(n as u64).to_le_bytes());
                    let nonce = aes_gcm::Nonce::from(nonce);
                    let sealed = theirs
                        .encrypt(
                            &nonce,
                            Payload {
                                msg: &plaintext,
                                aad: AAD,
                            },
                        )
                        .map_err(|_| anyhow::anyhow!("aes-gcm failed to seal"))?;
                    let opened = theirs
                        .decrypt(
                            &nonce,
                            Payload {
                                msg: &sealed,
                                aad: AAD,
                            },
                        )
                        .map_err(|_| anyhow::anyhow!("aes-gcm refused its own ciphertext"))?;
                    if opened.len() != size {
                        bail!("aes-gcm opened the wrong length");
                    }
                }
                Ok(args.ops as f64 / started.elapsed().as_secs_f64())
            };
            let (a, b) = if round % 2 == 0 {
                let a = time_ours()?;
                (a, time_theirs()?)
            } else {
                let b = time_theirs()?;
                (time_ours()?, b)
            };
            ours_rates.push(a);
            theirs_rates.push(b);
            ratios.push(a / b);
        }
        ratios.sort_by(f64::total_cmp);
        println!(
            "{:>8} {:>16.0} {:>16.0} {:>22}",
            size,
            median(ours_rates),
            median(theirs_rates),
            format!(
                "{:.2} / {:.2} / {:.2}",
                ratios.first().copied().unwrap_or(0.0),
                median(ratios.clone()),
                ratios.last().copied().unwrap_or(0.0)
            )
        );
    }
    Ok(())
}
