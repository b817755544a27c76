//! The end of a rotation pass, decided from its facts.
//!
//! A pass ends when a worker finds no row after the job's cursor and no
//! other worker holds a live batch. What happens then depends only on what
//! the store read at that moment ([`PassFacts`]), so the decision is this
//! pure function, tested case by case; `store::rotation` gathers the facts
//! and writes the outcome.

use chrono::{DateTime, Duration, Utc};

use super::JobStatus;

/// How long a job that has no rows left waits for `serve` replicas that
/// still encrypt with another key before it completes anyway (saying so).
pub const STALE_REPLICA_WAIT: Duration = Duration::seconds(120);

/// What the store knows at the end of a pass.
#[derive(Debug, Clone)]
pub struct PassFacts<'a> {
    pub now: DateTime<Utc>,
    /// Rows still off the target key (and not failed by this job).
    pub remaining: i64,
    /// Live `serve` replicas encrypting with another key than the (active)
    /// target: (replica id, host). Empty for a dry run.
    pub behind: &'a [(String, String)],
    /// Since when the job has been waiting for such replicas.
    pub waited_since: Option<DateTime<Utc>>,
    pub dry_run: bool,
    /// The job's counters so far.
    pub total: i64,
    pub processed: i64,
    pub failed: i64,
}

/// What the job does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PassEnd {
    /// No rows are left, but replicas still encrypt with an older key:
    /// park at the end of the pass (the wait's clock starts now, unless it
    /// runs already) and look again.
    WaitForReplicas,
    /// One more pass over the `remaining` rows: `late` of them were written
    /// off target while the pass ran (the rest are batches dead workers
    /// dropped). `final_pass` when the replicas have just switched, to catch
    /// what they wrote before; the wait's clock then stops, else it keeps
    /// running across passes (`waited_since`).
    NextPass {
        late: i64,
        final_pass: bool,
        waited_since: Option<DateTime<Utc>>,
    },
    /// The job is over.
    Complete {
        status: JobStatus,
        /// Why rows may stay off the target (replicas that never switched).
        last_error: Option<String>,
    },
}

/// Decides the end of a pass; see [`PassEnd`].
pub fn pass_end(facts: &PassFacts<'_>) -> PassEnd {
    let done = facts.remaining == 0;
    let behind = !facts.behind.is_empty();
    let waited_enough = facts
        .waited_since
        .is_some_and(|since| facts.now - since >= STALE_REPLICA_WAIT);
    if done && behind && !waited_enough {
        return PassEnd::WaitForReplicas;
    }
    // After waiting for replicas, one more (final) pass catches what they
    // wrote before they switched.
    let final_pass = done && !behind && facts.waited_since.is_some();
    // Past the wait, a replica that never switches cannot keep the job from
    // ending: it ends, naming the replicas.
    let gave_up = waited_enough && behind;
    if (done && !final_pass) || facts.dry_run || gave_up {
        let status = if facts.failed > 0 || (gave_up && facts.remaining > 0) {
            JobStatus::CompletedWithErrors
        } else {
            JobStatus::Completed
        };
        let last_error = behind.then(|| {
            format!(
                "replicas still encrypt with another key after {}s: {}; {} rows are off the target key, and rows they write stay off it (see keyward replicas list and keyward keys usage)",
                STALE_REPLICA_WAIT.num_seconds(),
                facts
                    .behind
                    .iter()
                    .map(|(id, host)| format!("{id} on {host}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                facts.remaining
            )
        });
        return PassEnd::Complete { status, last_error };
    }
    // Rows off target again: late rows (written under an older key during
    // the pass) and rows of batches that dead workers dropped
    // (`total - processed`).
    let dropped = (facts.total - facts.processed).max(0);
    PassEnd::NextPass {
        late: (facts.remaining - dropped).max(0),
        final_pass,
        waited_since: if behind { facts.waited_since } else { None },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(remaining: i64, behind: &[(String, String)]) -> PassFacts<'_> {
        PassFacts {
            now: Utc::now(),
            remaining,
            behind,
            waited_since: None,
            dry_run: false,
            total: 100,
            processed: 100,
            failed: 0,
        }
    }

    fn replica() -> Vec<(String, String)> {
        vec![("serve-1".into(), "host-a".into())]
    }

    #[test]
    fn no_rows_and_no_stale_replica_completes() {
        assert_eq!(
            pass_end(&facts(0, &[])),
            PassEnd::Complete {
                status: JobStatus::Completed,
                last_error: None
            }
        );
        let failed = PassFacts {
            failed: 3,
            ..facts(0, &[])
        };
        assert!(matches!(
            pass_end(&failed),
            PassEnd::Complete {
                status: JobStatus::CompletedWithErrors,
                ..
            }
        ));
    }

    #[test]
    fn rows_left_start_another_pass_counting_late_ones() {
        // 100 of 100 processed: all 7 rows found are late.
        assert_eq!(
            pass_end(&facts(7, &[])),
            PassEnd::NextPass {
                late: 7,
                final_pass: false,
                waited_since: None
            }
        );
        // A dead worker dropped 5 rows: they are not late.
        let dropped = PassFacts {
            processed: 95,
            ..facts(7, &[])
        };
        assert!(matches!(
            pass_end(&dropped),
            PassEnd::NextPass { late: 2, .. }
        ));
    }

    #[test]
    fn a_stale_replica_makes_a_finished_job_wait() {
        let behind = replica();
        assert_eq!(pass_end(&facts(0, &behind)), PassEnd::WaitForReplicas);
        let waiting = PassFacts {
            waited_since: Some(Utc::now() - Duration::seconds(30)),
            ..facts(0, &behind)
        };
        assert_eq!(pass_end(&waiting), PassEnd::WaitForReplicas);
    }

    #[test]
    fn once_the_replicas_switched_a_final_pass_runs() {
        let switched = PassFacts {
            waited_since: Some(Utc::now() - Duration::seconds(30)),
            ..facts(0, &[])
        };
        assert_eq!(
            pass_end(&switched),
            PassEnd::NextPass {
                late: 0,
                final_pass: true,
                waited_since: None
            }
        );
    }

    #[test]
    fn rows_left_while_waiting_keep_the_waits_clock() {
        let behind = replica();
        let since = Utc::now() - Duration::seconds(30);
        let waiting = PassFacts {
            waited_since: Some(since),
            ..facts(4, &behind)
        };
        assert_eq!(
            pass_end(&waiting),
            PassEnd::NextPass {
                late: 4,
                final_pass: false,
                waited_since: Some(since)
            }
        );
    }

    #[test]
    fn past_the_wait_the_job_ends_naming_the_replicas() {
        let behind = replica();
        let now = Utc::now();
        let expired = PassFacts {
            now,
            waited_since: Some(now - STALE_REPLICA_WAIT),
            ..facts(3, &behind)
        };
        match pass_end(&expired) {
            PassEnd::Complete {
                status: JobStatus::CompletedWithErrors,
                last_error: Some(message),
            } => {
                assert!(message.contains("serve-1 on host-a"), "{message}");
                assert!(message.contains("3 rows"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        // Nothing left to move: it completes, still naming them.
        let clean = PassFacts {
            remaining: 0,
            ..expired
        };
        assert!(matches!(
            pass_end(&clean),
            PassEnd::Complete {
                status: JobStatus::Completed,
                last_error: Some(_)
            }
        ));
    }

    #[test]
    fn a_dry_run_ends_after_one_pass() {
        let dry = PassFacts {
            dry_run: true,
            ..facts(10, &[])
        };
        assert!(matches!(
            pass_end(&dry),
            PassEnd::Complete {
                status: JobStatus::Completed,
                ..
            }
        ));
    }
}
