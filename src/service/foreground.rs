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
//!
//! A handler's clock starts when the runtime first polls the call; what a
//! caller waits before that (the connection's task queued behind other
//! work, the process starved of CPU by a rotation's database or workers)
//! is invisible to it, and it is most of what a rotation adds on a busy
//! host. So two probes measure that wait directly, 200 times a second
//! each while a job has a budget (once a second otherwise, recording
//! nothing): [`probe_scheduling`], how long a task that yields waits to run
//! again on the runtime, and [`probe_wakeups`], how late a sleeping thread
//! of this process is woken (the operating system's run queue, which a
//! runtime thread parked until a request arrives waits in too). The
//! published p99 is the handlers' p99 plus both waits' p99: an upper
//! estimate of what callers see, which is what the budget is for.

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

/// How often the probes run while a job has a budget, and otherwise.
const PROBE_EVERY: Duration = Duration::from_millis(5);
const IDLE_PROBE_EVERY: Duration = Duration::from_secs(1);

/// A log-scale histogram of one window, atomics only.
struct Buckets(Box<[AtomicU64]>);

impl Default for Buckets {
    fn default() -> Self {
        Self((0..BUCKETS).map(|_| AtomicU64::new(0)).collect())
    }
}

impl Buckets {
    fn record(&self, elapsed: Duration) {
        self.0[bucket_of(elapsed)].fetch_add(1, Ordering::Relaxed);
    }

    /// The window's count and p99 (ms), emptied.
    fn take(&self) -> (u64, Option<f64>) {
        let counts: Vec<u64> = self
            .0
            .iter()
            .map(|b| b.swap(0, Ordering::Relaxed))
            .collect();
        let calls = counts.iter().sum();
        let p99 = quantile(&counts, calls, 0.99).map(|i| upper_bound_us(i) / 1000.0);
        (calls, p99)
    }
}

/// Encrypt/Decrypt latencies, and the runtime's scheduling wait, of the
/// current window.
#[derive(Default)]
pub struct ForegroundLatency {
    calls: Buckets,
    waits: Buckets,
    wakeups: Buckets,
    /// Whether a running job has a budget ([`publish`] keeps it): the
    /// probes run fast and record only then.
    measuring: std::sync::atomic::AtomicBool,
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
    /// The handlers' p99 plus the scheduling wait's; `None` without calls.
    pub p99_ms: Option<f64>,
}

impl ForegroundLatency {
    /// Counts one call.
    pub fn record(&self, elapsed: Duration) {
        self.calls.record(elapsed);
    }

    /// Counts one scheduling wait ([`probe_scheduling`]).
    pub fn record_wait(&self, waited: Duration) {
        self.waits.record(waited);
    }

    /// Counts one late wake-up ([`probe_wakeups`]).
    pub fn record_wakeup(&self, late: Duration) {
        self.wakeups.record(late);
    }

    fn set_measuring(&self, measuring: bool) {
        self.measuring.store(measuring, Ordering::Relaxed);
    }

    fn measuring(&self) -> bool {
        self.measuring.load(Ordering::Relaxed)
    }

    /// How long the probes sleep between two measurements.
    fn probe_every(&self) -> Duration {
        if self.measuring() {
            PROBE_EVERY
        } else {
            IDLE_PROBE_EVERY
        }
    }

    /// Ends the window: its figures, and a new empty one.
    pub fn take_window(&self) -> Window {
        let (calls, p99) = self.calls.take();
        let (_, wait_p99) = self.waits.take();
        let (_, wakeup_p99) = self.wakeups.take();
        Window {
            calls,
            p99_ms: p99.map(|p99| p99 + wait_p99.unwrap_or(0.0) + wakeup_p99.unwrap_or(0.0)),
        }
    }
}

/// Measures how long a ready task waits to run on this runtime, every
/// [`PROBE_EVERY`] while a job has a budget, until `stop`.
pub async fn probe_scheduling(latency: Arc<ForegroundLatency>, stop: CancellationToken) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(latency.probe_every()) => {}
            () = stop.cancelled() => return,
        }
        if latency.measuring() {
            let queued = tokio::time::Instant::now();
            tokio::task::yield_now().await;
            latency.record_wait(queued.elapsed());
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

/// Measures how late a sleeping thread of this process wakes, every
/// [`PROBE_EVERY`] while a job has a budget, on a thread of its own until
/// `stop`.
pub fn probe_wakeups(latency: Arc<ForegroundLatency>, stop: CancellationToken) {
    let probe = move || {
        while !stop.is_cancelled() {
            let every = latency.probe_every();
            let asleep = std::time::Instant::now();
            std::thread::sleep(every);
            if latency.measuring() {
                latency.record_wakeup(asleep.elapsed().saturating_sub(every));
            }
        }
    };
    if let Err(err) = std::thread::Builder::new()
        .name("keyward-wakeup-probe".into())
        .spawn(probe)
    {
        tracing::warn!(error = %err, "cannot start the wake-up probe: the published p99 leaves out the operating system's run queue");
    }
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
        let budgeted = match store.budgeted_job_running().await {
            Ok(budgeted) => budgeted,
            Err(err) => {
                tracing::debug!(error = %err, "cannot read whether a rotation has a latency budget");
                false
            }
        };
        latency.set_measuring(budgeted);
        if !budgeted {
            continue;
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
    fn the_published_p99_adds_the_waits_before_a_handler_runs() {
        let latency = ForegroundLatency::default();
        for _ in 0..100 {
            latency.record(Duration::from_micros(200));
            latency.record_wait(Duration::from_millis(2));
            latency.record_wakeup(Duration::from_millis(1));
        }
        let p99 = latency.take_window().p99_ms.unwrap();
        assert!((3.2..=3.2 * GROWTH).contains(&p99), "{p99}");
        // Waits without calls publish no p99.
        latency.record_wait(Duration::from_millis(2));
        assert_eq!(latency.take_window().p99_ms, None);
    }

    #[test]
    fn latencies_off_the_scale_land_in_the_end_buckets() {
        assert_eq!(bucket_of(Duration::ZERO), 0);
        assert_eq!(bucket_of(Duration::from_secs(3600)), BUCKETS - 1);
    }
}
