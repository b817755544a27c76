//! Throttling a rotation on its callers' latency and its standbys' lag:
//! the decisions, kept free of I/O so they can be tested as functions.
//!
//! - **Latency budget** (`max_foreground_p99_ms`): a [`Governor`] per
//!   worker caps its rows per second like TCP's AIMD. It starts slow, at a
//!   tenth of the worker's unthrottled rate. While the worst live serve
//!   replica's p99 is over the budget the cap is halved (at most once per
//!   [`WINDOW`], the replicas' measuring window, so a cut is seen before
//!   the next); while it is within, the cap rises by a tenth of the
//!   worker's unthrottled rate per window until it is lifted. Well over the
//!   budget ([`WELL_OVER`] times it) the worker claims nothing, unless the
//!   job insists on `min_rows_per_second`: then the cap stays at that
//!   floor, and the reason says the budget is being broken on purpose.
//! - **Replication lag** (`max_replication_lag_ms`, PostgreSQL): like
//!   gh-ost's `--max-lag-millis`, the worker claims nothing while any
//!   standby is further behind, or while the lag cannot be read. The lag
//!   is estimated by a [`LagTracker`] from the primary's WAL positions, so
//!   a standby whose replay is paused is seen falling behind (PostgreSQL's
//!   own `replay_lag` stands still then).

use std::{collections::VecDeque, time::Duration};

use tokio::time::Instant;

use super::Limits;

/// How often a worker's cap moves at most: the serve replicas' window.
pub const WINDOW: Duration = Duration::from_secs(1);
/// Over the budget by this factor, a worker claims nothing.
pub const WELL_OVER: f64 = 2.0;
/// The lowest cap (rows per second) a cut leaves.
const MIN_CAP: f64 = 10.0;
/// The rate assumed before a worker has measured its own.
const ASSUMED_RATE: f64 = 1000.0;
/// How long a capped batch aims to take before its pause.
const CAPPED_BATCH: Duration = Duration::from_millis(250);

/// One streaming standby as `pg_stat_replication` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Standby {
    /// `application_name` (the standby's `cluster_name`, or `walreceiver`).
    pub name: String,
    /// `false`: the row's columns are hidden from this role (it lacks
    /// `pg_read_all_stats`).
    pub readable: bool,
    /// What it has replayed; `None` while it starts.
    pub replay_lsn: Option<i64>,
    /// PostgreSQL's own `replay_lag`, in ms (NULL once a standby has been
    /// idle and caught up for a while).
    pub replay_lag_ms: Option<f64>,
}

/// The primary's WAL position and its standbys.
#[derive(Debug, Clone, PartialEq)]
pub struct Replication {
    pub current_lsn: i64,
    pub standbys: Vec<Standby>,
}

/// What a worker throttles on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// The serve replicas' Encrypt/Decrypt p99 against the budget.
    Foreground,
    /// A standby's replay lag against the limit.
    Lag,
}

impl Signal {
    /// The `reason` label of `keyward_rotation_throttled_seconds_total`.
    pub fn label(self) -> &'static str {
        match self {
            Signal::Foreground => "foreground_p99",
            Signal::Lag => "replication_lag",
        }
    }
}

/// How far a worker is held back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// It claims nothing.
    Held,
    /// Its rate is cut (or kept at its floor) while a signal is over.
    Slowed,
    /// The signal is within its limit again; the rate climbs back.
    Recovering,
}

/// Why a worker is slower than it could be.
#[derive(Debug, Clone, PartialEq)]
pub struct Reason {
    pub signal: Signal,
    pub phase: Phase,
    /// What operators read, e.g. `standby s1 lag 3.2 s > 1.0 s`.
    pub text: String,
}

impl Reason {
    fn new(signal: Signal, phase: Phase, text: String) -> Option<Self> {
        Some(Self {
            signal,
            phase,
            text,
        })
    }
}

/// The worst live serve replica's p99 in its last window.
#[derive(Debug, Clone, PartialEq)]
pub struct Foreground {
    /// The replica, as operators know it (its address).
    pub replica: String,
    pub p99_ms: f64,
}

/// The standbys' lag, as far as it can be read.
#[derive(Debug, Clone, PartialEq)]
pub enum LagReading {
    /// The furthest-behind standby.
    Behind { standby: String, lag: Duration },
    /// `pg_stat_replication` hides the positions from this role.
    Unreadable,
}

/// What a worker read of its signals.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reading {
    /// `None`: no serve replica reported a p99 (no calls, or none live).
    pub foreground: Option<Foreground>,
    /// A live serve replica that has published no p99 lately (it does
    /// every second while a job has a budget): its callers' latency is
    /// unknown.
    pub silent: Option<String>,
    /// `None`: no standby (or not asked).
    pub lag: Option<LagReading>,
}

/// What a worker does next.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// Claim nothing for now.
    pub hold: bool,
    /// The most rows per second to go at; `None`: no cap.
    pub cap: Option<f64>,
    /// Why the worker is slower than it could be, if it is.
    pub reason: Option<Reason>,
}

impl Verdict {
    fn go(cap: Option<f64>, reason: Option<Reason>) -> Self {
        Self {
            hold: false,
            cap,
            reason,
        }
    }

    fn hold(signal: Signal, reason: String) -> Self {
        Self {
            hold: true,
            cap: None,
            reason: Reason::new(signal, Phase::Held, reason),
        }
    }
}

/// One worker's rate cap under a latency budget (see the module docs).
#[derive(Debug, Default)]
pub struct Governor {
    cap: Option<f64>,
    adjusted: Option<Instant>,
    /// The rows per second this worker's batches achieve when nothing
    /// holds them back (a moving average).
    full_rate: Option<f64>,
}

impl Governor {
    /// Learns the worker's own speed from a batch of `rows` that took
    /// `took` to process (pauses excluded).
    pub fn observe(&mut self, rows: usize, took: Duration) {
        if rows == 0 || took.is_zero() {
            return;
        }
        let rate = rows as f64 / took.as_secs_f64();
        self.full_rate = Some(match self.full_rate {
            Some(average) => 0.7 * average + 0.3 * rate,
            None => rate,
        });
    }

    /// The next step under `limits`, given `reading`.
    pub fn decide(&mut self, limits: &Limits, reading: &Reading, now: Instant) -> Verdict {
        if let Some(limit_ms) = limits.max_replication_lag_ms {
            match &reading.lag {
                Some(LagReading::Unreadable) => {
                    return Verdict::hold(
                        Signal::Lag,
                        "replication lag unreadable: grant pg_read_all_stats".into(),
                    )
                }
                Some(LagReading::Behind { standby, lag })
                    if lag.as_secs_f64() * 1000.0 > limit_ms as f64 =>
                {
                    return Verdict::hold(
                        Signal::Lag,
                        format!(
                            "standby {standby} lag {:.1} s > {:.1} s",
                            lag.as_secs_f64(),
                            limit_ms as f64 / 1000.0
                        ),
                    )
                }
                _ => {}
            }
        }
        let Some(budget) = limits.max_foreground_p99_ms else {
            self.cap = None;
            return Verdict::go(None, None);
        };
        let floor = limits.min_rows_per_second.map(|r| r as f64);
        let full = self.full_rate.unwrap_or(ASSUMED_RATE);
        if self.adjusted.is_none() {
            // Slow start: nothing is known yet of what this job does to
            // the callers.
            let start = (full / 10.0).max(MIN_CAP);
            self.cap = Some(floor.map_or(start, |floor| start.max(floor)));
            self.adjusted = Some(now);
        }
        let may_adjust = self.adjusted.is_none_or(|at| now >= at + WINDOW);
        match &reading.foreground {
            Some(Foreground { replica, p99_ms }) if *p99_ms > budget => {
                let over = format!(
                    "foreground p99 {p99_ms:.2} ms > budget {budget:.2} ms on replica {replica}"
                );
                if *p99_ms > budget * WELL_OVER {
                    self.adjusted = Some(now);
                    return match floor {
                        Some(floor) => {
                            self.cap = Some(floor);
                            Verdict::go(
                                Some(floor),
                                Reason::new(
                                    Signal::Foreground,
                                    Phase::Slowed,
                                    format!("{over}; over budget on purpose: min_rows_per_second {floor:.0}"),
                                ),
                            )
                        }
                        None => {
                            self.cap = Some(MIN_CAP);
                            Verdict::hold(Signal::Foreground, over)
                        }
                    };
                }
                if may_adjust {
                    let cut = (self.cap.unwrap_or(full) / 2.0).max(MIN_CAP);
                    self.cap = Some(floor.map_or(cut, |floor| cut.max(floor)));
                    self.adjusted = Some(now);
                }
                let cap = self.cap.unwrap_or(full);
                Verdict::go(
                    Some(cap),
                    Reason::new(
                        Signal::Foreground,
                        Phase::Slowed,
                        format!("{over}; {cap:.0} rows/s"),
                    ),
                )
            }
            _ if reading.silent.is_some() => {
                let replica = reading.silent.as_deref().unwrap_or_default();
                Verdict::hold(
                    Signal::Foreground,
                    format!(
                        "no foreground p99 from replica {replica}: a replica publishes one every \
                         second while a job has a latency budget (a keyward older than this one never does)"
                    ),
                )
            }
            _ => {
                if let Some(cap) = self.cap {
                    if may_adjust {
                        let raised = cap + (full / 10.0).max(MIN_CAP);
                        self.cap = (raised < full).then_some(raised);
                        self.adjusted = Some(now);
                    }
                }
                let reason = self.cap.and_then(|cap| {
                    Reason::new(
                        Signal::Foreground,
                        Phase::Recovering,
                        format!("climbing under latency budget {budget:.2} ms; {cap:.0} rows/s"),
                    )
                });
                Verdict::go(self.cap, reason)
            }
        }
    }
}

/// An adaptive batch's size under a rate cap: small enough that its pause
/// stays short, so a change of the cap is felt soon.
pub fn batch_under_cap(size: i64, cap: Option<f64>) -> i64 {
    match cap {
        Some(cap) => size.min(((cap * CAPPED_BATCH.as_secs_f64()).round() as i64).max(1)),
        None => size,
    }
}

/// Estimates each standby's replay lag from the primary's WAL positions
/// over time: a standby that has replayed up to `r` is behind by at least
/// the age of the first position seen past `r`.
#[derive(Debug, Default)]
pub struct LagTracker {
    /// (when first seen, WAL position), positions increasing.
    samples: VecDeque<(Instant, i64)>,
}

/// Positions kept at most (hours of readings every 250 ms).
const MAX_SAMPLES: usize = 100_000;

impl LagTracker {
    /// Records the primary's position now and reads the furthest-behind
    /// standby; `None` when there is none.
    pub fn observe(&mut self, now: Instant, replication: &Replication) -> Option<LagReading> {
        if replication.standbys.is_empty() {
            self.samples.clear();
            return None;
        }
        if self
            .samples
            .back()
            .is_none_or(|(_, lsn)| replication.current_lsn > *lsn)
        {
            self.samples.push_back((now, replication.current_lsn));
            if self.samples.len() > MAX_SAMPLES {
                self.samples.pop_front();
            }
        }
        if replication.standbys.iter().any(|s| !s.readable) {
            return Some(LagReading::Unreadable);
        }
        let mut worst: Option<(String, Duration)> = None;
        for standby in &replication.standbys {
            let Some(replayed) = standby.replay_lsn else {
                continue;
            };
            let estimated = self
                .samples
                .iter()
                .find(|(_, lsn)| *lsn > replayed)
                .map_or(Duration::ZERO, |(seen, _)| {
                    now.saturating_duration_since(*seen)
                });
            let reported = standby
                .replay_lag_ms
                .filter(|ms| ms.is_finite() && *ms > 0.0)
                .map_or(Duration::ZERO, |ms| Duration::from_secs_f64(ms / 1000.0));
            let lag = estimated.max(reported);
            if worst.as_ref().is_none_or(|(_, w)| lag > *w) {
                worst = Some((standby.name.clone(), lag));
            }
        }
        // Positions every standby has replayed are not needed any more.
        if let Some(oldest) = replication
            .standbys
            .iter()
            .map(|s| s.replay_lsn.unwrap_or(0))
            .min()
        {
            while self.samples.len() > 1
                && self.samples.front().is_some_and(|(_, lsn)| *lsn <= oldest)
            {
                self.samples.pop_front();
            }
        }
        worst.map(|(standby, lag)| LagReading::Behind { standby, lag })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(ms: f64) -> Limits {
        Limits {
            max_foreground_p99_ms: Some(ms),
            ..Limits::default()
        }
    }

    fn p99(ms: f64) -> Reading {
        Reading {
            foreground: Some(Foreground {
                replica: "10.0.0.1:50051".into(),
                p99_ms: ms,
            }),
            lag: None,
            silent: None,
        }
    }

    fn governor_at(rate: f64) -> Governor {
        let mut governor = Governor::default();
        governor.observe(rate as usize, Duration::from_secs(1));
        governor
    }

    #[test]
    fn a_budgeted_worker_starts_slow_halves_over_budget_and_climbs_back_within_it() {
        let start = Instant::now();
        let mut governor = governor_at(1000.0);
        let limits = budget(1.0);
        let first = governor.decide(&limits, &p99(0.5), start);
        assert_eq!(first.cap, Some(100.0));
        let reason = first.reason.unwrap();
        assert_eq!(reason.phase, Phase::Recovering);
        assert_eq!(
            reason.text,
            "climbing under latency budget 1.00 ms; 100 rows/s"
        );
        let cut = governor.decide(&limits, &p99(1.5), start + WINDOW);
        assert!(!cut.hold);
        assert_eq!(cut.cap, Some(50.0));
        let reason = cut.reason.unwrap();
        assert_eq!(
            (reason.signal, reason.phase),
            (Signal::Foreground, Phase::Slowed)
        );
        assert_eq!(
            reason.text,
            "foreground p99 1.50 ms > budget 1.00 ms on replica 10.0.0.1:50051; 50 rows/s"
        );
        // Within the same window: not cut again.
        let again = governor.decide(&limits, &p99(1.5), start + WINDOW + WINDOW / 3);
        assert_eq!(again.cap, Some(50.0));
        let next = governor.decide(&limits, &p99(1.5), start + 2 * WINDOW);
        assert_eq!(next.cap, Some(25.0));
        // Within budget: +100 rows/s (a tenth of the full rate) a window.
        let mut at = start + 2 * WINDOW;
        let mut caps = Vec::new();
        loop {
            at += WINDOW;
            let verdict = governor.decide(&limits, &p99(0.5), at);
            assert!(!verdict.hold);
            caps.push(verdict.cap);
            if verdict.cap.is_none() {
                assert_eq!(verdict.reason, None);
                break;
            }
            assert_eq!(verdict.reason.unwrap().phase, Phase::Recovering);
        }
        let climb: Vec<Option<f64>> = (1..=9)
            .map(|n| Some(25.0 + 100.0 * f64::from(n)))
            .chain([None])
            .collect();
        assert_eq!(caps, climb);
    }

    #[test]
    fn well_over_budget_holds_unless_a_floor_is_insisted_on() {
        let now = Instant::now();
        let mut governor = governor_at(1000.0);
        let held = governor.decide(&budget(1.0), &p99(2.5), now);
        assert!(held.hold);
        assert_eq!(
            held.reason.unwrap().text,
            "foreground p99 2.50 ms > budget 1.00 ms on replica 10.0.0.1:50051"
        );
        let limits = Limits {
            min_rows_per_second: Some(200),
            ..budget(1.0)
        };
        let mut governor = governor_at(1000.0);
        let kept = governor.decide(&limits, &p99(2.5), now);
        assert!(!kept.hold);
        assert_eq!(kept.cap, Some(200.0));
        assert!(kept
            .reason
            .unwrap()
            .text
            .ends_with("over budget on purpose: min_rows_per_second 200"));
        // A cut never goes below the floor.
        let cut = governor.decide(&limits, &p99(1.5), now + WINDOW);
        assert_eq!(cut.cap, Some(200.0));
        let cut = governor.decide(&limits, &p99(1.5), now + 2 * WINDOW);
        assert_eq!(cut.cap, Some(200.0));
    }

    #[test]
    fn without_a_budget_the_worker_is_left_alone() {
        let now = Instant::now();
        let mut governor = governor_at(1000.0);
        assert_eq!(
            governor.decide(&Limits::default(), &p99(50.0), now),
            Verdict::go(None, None)
        );
        // No replica reports a p99 (none has callers): a budgeted worker
        // still starts slow, and climbs.
        let first = governor.decide(&budget(1.0), &Reading::default(), now);
        assert_eq!(first.cap, Some(100.0));
        let later = governor.decide(&budget(1.0), &Reading::default(), now + WINDOW);
        assert_eq!(later.cap, Some(200.0));
    }

    #[test]
    fn a_replica_that_publishes_no_latency_holds_a_budgeted_worker() {
        let mut governor = governor_at(1000.0);
        let reading = Reading {
            silent: Some("10.0.0.2:50051".into()),
            ..Reading::default()
        };
        let held = governor.decide(&budget(1.0), &reading, Instant::now());
        assert!(held.hold);
        assert!(held
            .reason
            .unwrap()
            .text
            .starts_with("no foreground p99 from replica 10.0.0.2:50051"));
        // Without a budget it does not matter.
        assert!(
            !governor
                .decide(&Limits::default(), &reading, Instant::now())
                .hold
        );
    }

    #[test]
    fn a_standby_behind_the_limit_or_unreadable_holds_the_worker() {
        let now = Instant::now();
        let limits = Limits {
            max_replication_lag_ms: Some(1000),
            ..Limits::default()
        };
        let behind = |ms| Reading {
            foreground: None,
            silent: None,
            lag: Some(LagReading::Behind {
                standby: "standby1".into(),
                lag: Duration::from_millis(ms),
            }),
        };
        let mut governor = Governor::default();
        assert!(!governor.decide(&limits, &behind(900), now).hold);
        let held = governor.decide(&limits, &behind(3200), now);
        assert!(held.hold);
        assert_eq!(
            held.reason,
            Reason::new(
                Signal::Lag,
                Phase::Held,
                "standby standby1 lag 3.2 s > 1.0 s".into()
            )
        );
        let unreadable = Reading {
            foreground: None,
            silent: None,
            lag: Some(LagReading::Unreadable),
        };
        assert_eq!(
            governor.decide(&limits, &unreadable, now).reason,
            Reason::new(
                Signal::Lag,
                Phase::Held,
                "replication lag unreadable: grant pg_read_all_stats".into()
            )
        );
        // Without a limit, lag is not looked at.
        assert!(
            !governor
                .decide(&Limits::default(), &behind(60_000), now)
                .hold
        );
    }

    fn replication(current: i64, replayed: Option<i64>) -> Replication {
        Replication {
            current_lsn: current,
            standbys: vec![Standby {
                name: "standby1".into(),
                readable: true,
                replay_lsn: replayed,
                replay_lag_ms: None,
            }],
        }
    }

    #[test]
    fn a_paused_standby_is_seen_falling_behind_and_a_caught_up_one_is_not() {
        let start = Instant::now();
        let mut tracker = LagTracker::default();
        let lag = |reading: Option<LagReading>| match reading {
            Some(LagReading::Behind { lag, .. }) => lag,
            other => panic!("{other:?}"),
        };
        // Caught up: no lag.
        assert_eq!(
            lag(tracker.observe(start, &replication(100, Some(100)))),
            Duration::ZERO
        );
        // The primary writes on; the standby stops at 150.
        tracker.observe(start + Duration::from_secs(1), &replication(150, Some(150)));
        tracker.observe(start + Duration::from_secs(2), &replication(200, Some(150)));
        let behind =
            lag(tracker.observe(start + Duration::from_secs(5), &replication(200, Some(150))));
        assert_eq!(behind, Duration::from_secs(3));
        // Replay resumes.
        assert_eq!(
            lag(tracker.observe(start + Duration::from_secs(6), &replication(200, Some(200)))),
            Duration::ZERO
        );
        // No standby: nothing to read.
        let none = Replication {
            current_lsn: 300,
            standbys: Vec::new(),
        };
        assert_eq!(tracker.observe(start, &none), None);
    }

    #[test]
    fn hidden_standby_columns_read_as_unreadable() {
        let mut tracker = LagTracker::default();
        let mut hidden = replication(100, None);
        hidden.standbys[0].readable = false;
        assert_eq!(
            tracker.observe(Instant::now(), &hidden),
            Some(LagReading::Unreadable)
        );
    }

    #[test]
    fn a_capped_batch_is_a_quarter_second_of_rows() {
        assert_eq!(batch_under_cap(500, None), 500);
        assert_eq!(batch_under_cap(500, Some(400.0)), 100);
        assert_eq!(batch_under_cap(50, Some(4000.0)), 50);
        assert_eq!(batch_under_cap(500, Some(1.0)), 1);
    }
}
