//! Adaptive batches (a job whose `batch_size` is 0, the default): each
//! worker sizes its next batch so that it takes about the job's target
//! batch duration (`target_batch_ms`, 250 ms unless set; the idea of
//! pt-online-schema-change's `--chunk-time`), from the rows per second its
//! last batch achieved. A batch at most halves or doubles the size, so one
//! slow batch (a lock wait, a cold cache) does not swing it, and the size
//! stays within [`MIN_ADAPTIVE_BATCH`, `MAX_BATCH_SIZE`].

use std::time::Duration;

use super::MAX_BATCH_SIZE;

/// The duration a batch aims at when the job names none.
pub const DEFAULT_TARGET_BATCH: Duration = Duration::from_millis(250);
/// The smallest adaptive batch: below it, a batch's fixed costs (the claim
/// and write transactions) dominate.
pub const MIN_ADAPTIVE_BATCH: i64 = 50;
/// An adaptive job's first batch.
pub const FIRST_ADAPTIVE_BATCH: i64 = super::DEFAULT_BATCH_SIZE;
/// Bounds of a job's target batch duration, in milliseconds.
pub const TARGET_BATCH_MS: std::ops::RangeInclusive<i64> = 10..=60_000;

/// The size of the next batch, after one of `rows` rows took `took` and
/// the target is `target`.
pub fn next_batch_size(current: i64, rows: usize, took: Duration, target: Duration) -> i64 {
    if rows == 0 || took.is_zero() {
        return current;
    }
    let ideal = rows as f64 / took.as_secs_f64() * target.as_secs_f64();
    let low = (current / 2).max(MIN_ADAPTIVE_BATCH);
    let high = current
        .saturating_mul(2)
        .clamp(MIN_ADAPTIVE_BATCH, MAX_BATCH_SIZE);
    (ideal.round() as i64).clamp(low.min(high), high)
}

/// A job's target batch duration (`None`: the default).
pub fn target_of(target_batch_ms: Option<i64>) -> Duration {
    target_batch_ms
        .and_then(|ms| u64::try_from(ms).ok())
        .map_or(DEFAULT_TARGET_BATCH, Duration::from_millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TARGET: Duration = DEFAULT_TARGET_BATCH;

    #[test]
    fn a_batch_grows_or_shrinks_toward_the_target_duration() {
        // 500 rows in 125 ms: twice as fast as the target wants.
        assert_eq!(
            next_batch_size(500, 500, Duration::from_millis(125), TARGET),
            1000
        );
        // 500 rows in 500 ms: half.
        assert_eq!(
            next_batch_size(500, 500, Duration::from_millis(500), TARGET),
            250
        );
        // On target: unchanged.
        assert_eq!(next_batch_size(500, 500, TARGET, TARGET), 500);
        // Far too fast or too slow: at most double, at least half.
        assert_eq!(
            next_batch_size(500, 500, Duration::from_millis(1), TARGET),
            1000
        );
        assert_eq!(
            next_batch_size(500, 500, Duration::from_secs(60), TARGET),
            250
        );
    }

    #[test]
    fn the_size_stays_within_its_bounds() {
        assert_eq!(
            next_batch_size(MAX_BATCH_SIZE, 10_000, Duration::from_millis(1), TARGET),
            MAX_BATCH_SIZE
        );
        assert_eq!(
            next_batch_size(60, 60, Duration::from_secs(10), TARGET),
            MIN_ADAPTIVE_BATCH
        );
        // A short last batch of a pass says nothing: rows per second count.
        assert_eq!(
            next_batch_size(800, 20, Duration::from_millis(10), TARGET),
            500
        );
        assert_eq!(next_batch_size(500, 0, Duration::ZERO, TARGET), 500);
        assert_eq!(target_of(None), TARGET);
        assert_eq!(target_of(Some(100)), Duration::from_millis(100));
    }
}
