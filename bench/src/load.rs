//! `keyward-bench load`: Encrypt calls at a fixed rate (an open loop, as
//! wrk2 and ghz's `--rps` do), measured by a process that is not the
//! server. Each call is sent on schedule whatever the earlier ones are
//! doing, so a server that stalls is charged for every call it holds up
//! (no coordinated omission); a call's latency counts from when it was
//! sent (the schedule's own 1 ms timer granularity is not charged).
//! `rotation` runs it as a child process for each phase; it can also be
//! pointed at any server.
//!
//! It runs for `--seconds`, or until its standard input closes, then
//! prints one line: `calls=N errors=N p50_us=N p99_us=N max_us=N`.

use std::{sync::Arc, time::Duration};

use clap::Args;
use hdrhistogram::Histogram;
use tokio::{io::AsyncReadExt as _, sync::Mutex, time::Instant};

use keyward_client::proto::{crypto_client::CryptoClient, EncryptRequest, EnvelopeForm};

#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    /// The server, e.g. http://127.0.0.1:50051.
    #[arg(long)]
    pub target: String,
    /// Encrypt calls per second.
    #[arg(long, default_value_t = 1500)]
    pub rate: u32,
    /// Run this long; unset: until standard input closes.
    #[arg(long)]
    pub seconds: Option<f64>,
    /// Plaintext bytes per call.
    #[arg(long, default_value_t = 300)]
    pub payload_bytes: usize,
}

/// What a load run measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadResult {
    pub calls: u64,
    pub errors: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

impl LoadResult {
    pub fn p99_ms(&self) -> f64 {
        self.p99_us as f64 / 1000.0
    }

    /// The line `run` prints.
    fn line(&self) -> String {
        format!(
            "calls={} errors={} p50_us={} p99_us={} max_us={}",
            self.calls, self.errors, self.p50_us, self.p99_us, self.max_us
        )
    }

    /// Reads [`Self::line`] back.
    pub fn parse(line: &str) -> Option<Self> {
        let field = |name: &str| -> Option<u64> {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))?
                .parse()
                .ok()
        };
        Some(Self {
            calls: field("calls")?,
            errors: field("errors")?,
            p50_us: field("p50_us")?,
            p99_us: field("p99_us")?,
            max_us: field("max_us")?,
        })
    }
}

pub async fn run(args: LoadArgs) -> anyhow::Result<()> {
    let stop = tokio_util::sync::CancellationToken::new();
    match args.seconds {
        Some(seconds) => {
            let stop = stop.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
                stop.cancel();
            });
        }
        None => {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut sink = Vec::new();
                let _ = tokio::io::stdin().read_to_end(&mut sink).await;
                stop.cancel();
            });
        }
    }
    let result = generate(&args, stop).await?;
    println!("{}", result.line());
    Ok(())
}

async fn generate(
    args: &LoadArgs,
    stop: tokio_util::sync::CancellationToken,
) -> anyhow::Result<LoadResult> {
    let channel = tonic::transport::Endpoint::from_shared(args.target.clone())?
        .connect()
        .await?;
    let client = CryptoClient::new(channel);
    let request = EncryptRequest {
        plaintext: vec![7u8; args.payload_bytes.max(1)].into(),
        context: [("connection_id".to_owned(), "bench-load".to_owned())].into(),
        form: EnvelopeForm::Blob as i32,
    };
    let hist = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(
        1, 60_000_000, 3,
    )?));
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tick =
        tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(args.rate.max(1))));
    // Late ticks fire at once: the schedule is kept, not stretched.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut calls = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => break,
        }
        let sent = Instant::now();
        let mut client = client.clone();
        let request = request.clone();
        let hist = Arc::clone(&hist);
        let errors = Arc::clone(&errors);
        calls.spawn(async move {
            match client.encrypt(request).await {
                Ok(_) => {
                    let us = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
                    hist.lock().await.saturating_record(us.max(1));
                }
                Err(_) => {
                    errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        });
        // Reap finished calls as we go.
        while calls.try_join_next().is_some() {}
    }
    while calls.join_next().await.is_some() {}
    let hist = hist.lock().await;
    Ok(LoadResult {
        calls: hist.len(),
        errors: errors.load(std::sync::atomic::Ordering::Relaxed),
        p50_us: hist.value_at_quantile(0.5),
        p99_us: hist.value_at_quantile(0.99),
        max_us: hist.max(),
    })
}

/// `keyward-bench load` as a child process, until [`LoadChild::finish`].
pub struct LoadChild {
    child: tokio::process::Child,
}

impl LoadChild {
    /// Starts this binary's `load` at `rate` calls a second against
    /// `target`.
    pub fn start(target: &str, rate: u32) -> anyhow::Result<Self> {
        let child = tokio::process::Command::new(std::env::current_exe()?)
            .args(["load", "--target", target, "--rate", &rate.to_string()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        Ok(Self { child })
    }

    /// Stops the load (closes its input) and reads what it measured.
    pub async fn finish(mut self) -> anyhow::Result<LoadResult> {
        drop(self.child.stdin.take());
        let out = self.child.wait_with_output().await?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            anyhow::bail!("the load generator failed ({}): {text}", out.status);
        }
        LoadResult::parse(text.trim())
            .ok_or_else(|| anyhow::anyhow!("unreadable load result: {text:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_result_line_reads_back() {
        let result = LoadResult {
            calls: 15_000,
            errors: 2,
            p50_us: 180,
            p99_us: 420,
            max_us: 9000,
        };
        assert_eq!(LoadResult::parse(&result.line()), Some(result));
        assert_eq!(LoadResult::parse("calls=1"), None);
    }
}
