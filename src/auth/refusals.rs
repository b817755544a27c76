//! Bounds what refused calls write to the audit log.
//!
//! A refused call costs its sender almost nothing (HPACK sends a repeated
//! 4 KB path as one byte), so one event per refusal lets any unauthenticated
//! peer fill the audit disk, and a full disk stops every Decrypt
//! (fail-closed). Refusals are therefore written like a rate-limited log:
//! per window, the first refusal of each (principal, peer address, result)
//! is written in full, later ones only counted and written as one summary
//! event when the window closes; at most [`RefusalThrottle::per_window`]
//! distinct senders per window are written individually (a load balancer
//! may make every caller one peer, an attacker may use many addresses),
//! the rest are counted in one overflow summary. The RPC path is truncated
//! before it is logged.
//!
//! The decisions are a pure function of the events and the clock passed
//! in, so they are unit-tested here; `auth::audit` does the writing.

use std::{
    collections::HashMap,
    net::IpAddr,
    time::{Duration, Instant},
};

/// Longest RPC path (in bytes) an audit event records; the rest is cut.
pub const MAX_LOGGED_PATH: usize = 128;

/// What a refusal's audit event may say of the RPC path: the first
/// [`MAX_LOGGED_PATH`] bytes (at a character boundary) and how long it was.
pub fn truncate_path(path: &str) -> std::borrow::Cow<'_, str> {
    if path.len() <= MAX_LOGGED_PATH {
        return path.into();
    }
    let mut end = MAX_LOGGED_PATH;
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…({} bytes)", &path[..end], path.len()).into()
}

/// Most distinct senders beyond the budget told apart in one window.
const MAX_COUNTED_SENDERS: usize = 4096;

/// Who was refused, as refusals are grouped.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Sender {
    /// The principal's name, or `unauthenticated`.
    pub principal: String,
    pub ip: Option<IpAddr>,
    /// The gRPC code name of the refusal.
    pub result: String,
}

/// Refusals that were counted instead of written, reported when their
/// window closes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Summary {
    /// `count` more refusals of `sender` (the last one for `rpc`).
    Repeated {
        sender: Sender,
        rpc: String,
        count: u64,
    },
    /// `count` refusals of `senders` distinct senders (told apart up to
    /// 4096) beyond the window's budget.
    Overflow { count: u64, senders: u64 },
}

/// Whether to write a refusal's event now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Write,
    Count,
}

#[derive(Debug, Default)]
struct Counted {
    count: u64,
    rpc: String,
}

/// The per-window bookkeeping (see the module documentation).
#[derive(Debug)]
pub struct RefusalThrottle {
    window: Duration,
    per_window: usize,
    started: Option<Instant>,
    /// Senders written this window, with what was counted since.
    written: HashMap<Sender, Counted>,
    /// Refusals (and distinct senders) beyond the budget this window.
    overflow: u64,
    overflow_senders: std::collections::HashSet<Sender>,
}

impl RefusalThrottle {
    /// A throttle writing at most `per_window` senders individually per
    /// `window`.
    pub fn new(window: Duration, per_window: usize) -> Self {
        Self {
            window,
            per_window,
            started: None,
            written: HashMap::new(),
            overflow: 0,
            overflow_senders: Default::default(),
        }
    }

    /// The most senders written individually per window.
    pub fn per_window(&self) -> usize {
        self.per_window
    }

    /// Judges one refusal at `now`; returns the verdict and the summaries
    /// of a window that closed before it.
    pub fn admit(&mut self, now: Instant, sender: Sender, rpc: &str) -> (Verdict, Vec<Summary>) {
        let closed = self.close_if_over(now);
        if self.started.is_none() {
            self.started = Some(now);
        }
        if let Some(counted) = self.written.get_mut(&sender) {
            counted.count += 1;
            rpc.clone_into(&mut counted.rpc);
            return (Verdict::Count, closed);
        }
        if self.written.len() < self.per_window {
            self.written.insert(sender, Counted::default());
            return (Verdict::Write, closed);
        }
        self.overflow += 1;
        // The set of overflowing senders is bounded too: past it, only the
        // count grows.
        if self.overflow_senders.len() < MAX_COUNTED_SENDERS {
            self.overflow_senders.insert(sender);
        }
        (Verdict::Count, closed)
    }

    /// The summaries of the current window if it is over at `now` (called
    /// on a timer, so counts are written when refusals stop coming).
    pub fn close_if_over(&mut self, now: Instant) -> Vec<Summary> {
        match self.started {
            Some(started) if now.saturating_duration_since(started) >= self.window => {
                self.started = None;
                self.drain()
            }
            _ => Vec::new(),
        }
    }

    fn drain(&mut self) -> Vec<Summary> {
        let mut summaries: Vec<Summary> = self
            .written
            .drain()
            .filter(|(_, counted)| counted.count > 0)
            .map(|(sender, counted)| Summary::Repeated {
                sender,
                rpc: counted.rpc,
                count: counted.count,
            })
            .collect();
        if self.overflow > 0 {
            summaries.push(Summary::Overflow {
                count: self.overflow,
                senders: self.overflow_senders.len() as u64,
            });
        }
        self.overflow = 0;
        self.overflow_senders.clear();
        summaries
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sender(ip: [u8; 4]) -> Sender {
        Sender {
            principal: "unauthenticated".into(),
            ip: Some(IpAddr::from(ip)),
            result: "UNAUTHENTICATED".into(),
        }
    }

    #[test]
    fn long_paths_are_cut_at_a_character_boundary() {
        assert_eq!(
            truncate_path("/keyward.v1.Crypto/Decrypt"),
            "/keyward.v1.Crypto/Decrypt"
        );
        let long = format!("/{}", "é".repeat(3000));
        let cut = truncate_path(&long);
        assert!(cut.len() < MAX_LOGGED_PATH + 20, "{}", cut.len());
        assert!(cut.ends_with(&format!("…({} bytes)", long.len())), "{cut}");
    }

    #[test]
    fn a_flood_from_one_peer_is_one_event_and_one_count_per_window() {
        let mut throttle = RefusalThrottle::new(Duration::from_secs(1), 4);
        let t0 = Instant::now();
        let (verdict, closed) = throttle.admit(t0, sender([10, 0, 0, 1]), "/a");
        assert_eq!((verdict, closed.len()), (Verdict::Write, 0));
        for i in 0..999 {
            let at = t0 + Duration::from_micros(i);
            let (verdict, closed) = throttle.admit(at, sender([10, 0, 0, 1]), "/b");
            assert_eq!((verdict, closed.len()), (Verdict::Count, 0));
        }
        // Nothing more until the window is over; then one summary.
        assert!(throttle
            .close_if_over(t0 + Duration::from_millis(999))
            .is_empty());
        let summaries = throttle.close_if_over(t0 + Duration::from_secs(1));
        assert_eq!(
            summaries,
            vec![Summary::Repeated {
                sender: sender([10, 0, 0, 1]),
                rpc: "/b".into(),
                count: 999
            }]
        );
        // A new window writes the sender again; an idle window says nothing.
        let t1 = t0 + Duration::from_secs(5);
        assert_eq!(
            throttle.admit(t1, sender([10, 0, 0, 1]), "/a").0,
            Verdict::Write
        );
        assert!(throttle
            .close_if_over(t1 + Duration::from_secs(2))
            .is_empty());
    }

    #[test]
    fn senders_beyond_the_budget_are_counted_together() {
        let mut throttle = RefusalThrottle::new(Duration::from_secs(1), 2);
        let t0 = Instant::now();
        let verdicts: Vec<Verdict> = (0..10u8)
            .map(|i| throttle.admit(t0, sender([10, 0, 0, i]), "/x").0)
            .collect();
        assert_eq!(verdicts.iter().filter(|v| **v == Verdict::Write).count(), 2);
        // The next refusal after the window reports the overflow first.
        let (verdict, closed) =
            throttle.admit(t0 + Duration::from_secs(1), sender([10, 0, 0, 9]), "/x");
        assert_eq!(verdict, Verdict::Write);
        assert_eq!(
            closed,
            vec![Summary::Overflow {
                count: 8,
                senders: 8
            }]
        );
    }
}
