//! The foreground latency a serve replica publishes for rotation's
//! latency budget (`rotation::throttle`): the p99 of its Encrypt and
//! Decrypt calls over one-second windows.
//!
//! The gRPC layer records each call into [`ForegroundLatency`] (one atomic
//! add into a log-scale bucket, within 4 %); [`publish`] takes a window a
//! second and, while a running job has a budget, writes its p99 into the
//! replica's `keyward_replicas` row, where workers on any host read it
//! within about a second. Batch calls are not counted: their latency grows
//! with their size, not with the load a rotation adds.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio_util::sync::CancellationToken;

use crate::store::Store;

/// The window a p99 covers, how often it is published, and how often a
/// replica looks whether a running job has a budget.
pub const WINDOW: Duration = Duration::from_secs(1);

/// Bucket `i` holds latencies up to `FIRST_BUCKET_US * GROWTH^i` µs.
const FIRST_BUCKET_US: f64 = 10.0;
const GROWTH: f64 = 1.04;
/// 10 µs × 1.04^400 ≈ 66 s: enough for any call.
const BUCKETS: usize = 400;

/// Encrypt/Decrypt latencies of the current window.
pub struct ForegroundLatency {
    buckets: Box<[AtomicU64]>,
}

impl Default for ForegroundLatency {
    fn default() -> Self {
        Self {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl std::fmt::Debug for ForegroundLatency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForegroundLatency").finish_non_exhaustive()
    }
}

/// One window's figures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Window {
    pub calls: u64,
    /// `None` without calls.
    pub p99_ms: Option<f64>,
}

impl ForegroundLatency {
    /// Counts one call.
    pub fn record(&self, elapsed: Duration) {
        self.buckets[bucket_of(elapsed)].fetch_add(1, Ordering::Relaxed);
    }

    /// Ends the window: its figures, and a new empty one.
    pub fn take_window(&self) -> Window {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.swap(0, Ordering::Relaxed))
            .collect();
        let calls = counts.iter().sum();
        Window {
            calls,
            p99_ms: quantile(&counts, calls, 0.99).map(|i| upper_bound_us(i) / 1000.0),
        }
    }
}

fn bucket_of(elapsed: Duration) -> usize {
    let us = elapsed.as_secs_f64() * 1e6;
    if us <= FIRST_BUCKET_US {
        return 0;
    }
    let i = ((us / FIRST_BUCKET_US).ln() / GROWTH.ln()).ceil();
    (i as usize).min(BUCKETS - 1)
}

fn upper_bound_us(bucket: usize) -> f64 {
    FIRST_BUCKET_US * GROWTH.powi(bucket as i32)
}

/// The bucket holding quantile `q` of `calls` calls.
fn quantile(counts: &[u64], calls: u64, q: f64) -> Option<usize> {
    if calls == 0 {
        return None;
    }
    let rank = ((calls as f64) * q).ceil().max(1.0) as u64;
    let mut seen = 0;
    counts.iter().position(|n| {
        seen += n;
        seen >= rank
    })
}

/// Publishes `latency`'s windows as replica `replica`'s until `stop`.
pub async fn publish(
    store: Store,
    latency: Arc<ForegroundLatency>,
    replica: String,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(WINDOW);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let window = latency.take_window();
        // One small read a second; a budgeted job's workers hold until
        // every live replica has published.
        match store.budgeted_job_running().await {
            Ok(true) => {}
            Ok(false) => continue,
            Err(err) => {
                tracing::debug!(error = %err, "cannot read whether a rotation has a latency budget");
                continue;
            }
        }
        let calls = i64::try_from(window.calls).unwrap_or(i64::MAX);
        if let Err(err) = store
            .publish_foreground(&replica, window.p99_ms, calls, chrono::Utc::now())
            .await
        {
            tracing::warn!(error = %err, "cannot publish this replica's foreground latency");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_p99_of_a_window_is_within_four_percent_and_the_next_window_starts_empty() {
        let latency = ForegroundLatency::default();
        for _ in 0..990 {
            latency.record(Duration::from_micros(200));
        }
        for _ in 0..10 {
            latency.record(Duration::from_millis(3));
        }
        let window = latency.take_window();
        assert_eq!(window.calls, 1000);
        let p99 = window.p99_ms.unwrap();
        assert!((0.2..=0.2 * GROWTH).contains(&p99), "{p99}");
        latency.record(Duration::from_millis(3));
        latency.record(Duration::from_millis(3));
        let p99 = latency.take_window().p99_ms.unwrap();
        assert!((3.0..=3.0 * GROWTH).contains(&p99), "{p99}");
        assert_eq!(
            latency.take_window(),
            Window {
                calls: 0,
                p99_ms: None
            }
        );
    }

    #[test]
    fn latencies_off_the_scale_land_in_the_end_buckets() {
        assert_eq!(bucket_of(Duration::ZERO), 0);
        assert_eq!(bucket_of(Duration::from_secs(3600)), BUCKETS - 1);
    }
}
