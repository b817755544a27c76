//! Retiring a key (runbook §1.6): what stands in the way, and what to run
//! next. The admin service gathers the facts (rows on the key, live jobs,
//! replicas still encrypting with it); [`plan`] decides from them alone.

use crate::{
    keys::{KeyRecord, KeyStatus},
    rotation::RotationJob,
    store::replicas::{KeyUsage, ReplicaRecord},
};

use super::replica;

/// What stands between a key and its retirement, and what to do about it.
#[derive(Debug, Clone)]
pub struct RetirePlan {
    pub key: KeyRecord,
    /// Rows still on the key, per rotation target (targets with none left out).
    pub rows: Vec<KeyUsage>,
    /// Rotation jobs still pending or running.
    pub jobs: Vec<RotationJob>,
    /// Live `serve` replicas that still encrypt with the key.
    pub replicas: Vec<ReplicaRecord>,
    /// Rows of every target that still hold a legacy ciphertext.
    pub legacy_copies: i64,
    /// Of those, rows the last legacy check found in conflict.
    pub legacy_conflicts: i64,
    /// Each reason the key cannot be retired now; empty: it can.
    pub blockers: Vec<String>,
    /// What to run next, in order.
    pub next_steps: Vec<String>,
}

impl RetirePlan {
    pub fn rows_total(&self) -> i64 {
        self.rows.iter().map(|u| u.rows).sum()
    }
}

/// What the plan is made from.
#[derive(Debug, Clone)]
pub struct RetireFacts {
    pub key: KeyRecord,
    /// Rows still on the key, per rotation target (none left out as zero).
    pub rows: Vec<KeyUsage>,
    /// Rotation jobs still pending or running.
    pub jobs: Vec<RotationJob>,
    /// Live `serve` replicas that still encrypt with the key.
    pub replicas: Vec<ReplicaRecord>,
    /// `key_id` of the active key, if any.
    pub active_key_id: Option<String>,
    /// Rows of every target that still hold a legacy ciphertext (the
    /// application's pre-keyward copy, under the master secret).
    pub legacy_copies: i64,
    /// Of those, rows the last `legacy cutover` check found holding
    /// another plaintext than their envelope.
    pub legacy_conflicts: i64,
}

/// The blockers and next steps of retiring `facts.key`.
pub fn plan(facts: RetireFacts) -> RetirePlan {
    let RetireFacts {
        key,
        rows,
        jobs,
        replicas,
        active_key_id: active,
        legacy_copies,
        legacy_conflicts,
    } = facts;
    let mut blockers = Vec::new();
    let mut next_steps = Vec::new();
    match key.status {
        KeyStatus::Rotating => {}
        KeyStatus::Retired => blockers.push("the key is already retired".to_owned()),
        KeyStatus::Active => {
            blockers.push("the key is active: new Encrypts use it".to_owned());
            next_steps.push("register its successor and activate that: keyward keys create --key-id NEW, then keyward keys activate NEW --staged".to_owned());
        }
        KeyStatus::Pending => blockers.push(
            "the key is pending: only a rotating key (a former active key) is retired".to_owned(),
        ),
    }
    for replica in &replicas {
        blockers.push(format!(
            "replica {} still encrypts with it (catalog version {})",
            replica::describe(replica),
            replica.catalog_version
        ));
    }
    if !replicas.is_empty() {
        next_steps.push("let those replicas reload the catalog (call keyward.v1.Admin/RefreshKeyMetadata on each, or wait for their catalog refresh); check with: keyward replicas list".to_owned());
    }
    let total: i64 = rows.iter().map(|u| u.rows).sum();
    if total > 0 {
        let per_target: Vec<String> = rows
            .iter()
            .map(|u| format!("{} in {}", u.rows, u.target))
            .collect();
        blockers.push(format!(
            "{total} rows are still on it ({})",
            per_target.join(", ")
        ));
    }
    for job in &jobs {
        blockers.push(format!("rotation job {} is {}", job.id, job.status));
    }
    match (jobs.first(), total > 0) {
        (Some(job), _) => next_steps.push(format!(
            "wait for the rotation job to finish: keyward rotate watch {}",
            job.id
        )),
        (None, true) => next_steps.push(format!(
            "re-encrypt them to the active key: keyward rotate start{}",
            active.map(|a| format!(" --target {a}")).unwrap_or_default()
        )),
        (None, false) => {}
    }
    if blockers.is_empty() {
        next_steps.push(format!("keyward keys retire {}", key.key_id));
    } else if key.status == KeyStatus::Rotating {
        next_steps.push(format!(
            "then: keyward keys retire {} --dry-run, and retire it once nothing blocks",
            key.key_id
        ));
    }
    // Not the key's: the legacy copies are under the master secret, and
    // the application's old pods read them. Runbook §1.6.2.
    if legacy_copies > 0 {
        next_steps.push(format!(
            "{legacy_copies} rows still hold a legacy ciphertext: once no pod of the old application \
             version runs, review and clear them: keyward legacy cutover --dry-run"
        ));
    }
    if legacy_conflicts > 0 {
        next_steps.push(format!(
            "{legacy_conflicts} of them hold another plaintext than their envelope (an old pod \
             wrote them after rotation): decide by hand which is right; the cutover lists them \
             and never clears them: keyward legacy cutover --dry-run"
        ));
    }
    RetirePlan {
        key,
        rows,
        jobs,
        replicas,
        legacy_copies,
        legacy_conflicts,
        blockers,
        next_steps,
    }
}

/// The `keyward …` command lines `plan`'s next steps name (each up to the
/// `,`, `;` or `)` that ends it), so a test can check that each exists.
pub fn commands(plan: &RetirePlan) -> Vec<String> {
    plan.next_steps
        .iter()
        .flat_map(|step| {
            step.match_indices("keyward ")
                .map(move |(at, _)| &step[at..])
        })
        .map(|tail| {
            let end = tail.find([',', ';', ')']).unwrap_or(tail.len());
            tail[..end].trim().to_owned()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(status: KeyStatus) -> KeyRecord {
        KeyRecord::local_for_test("rec-old", "old", status)
    }

    fn facts(status: KeyStatus) -> RetireFacts {
        RetireFacts {
            key: key(status),
            rows: Vec::new(),
            jobs: Vec::new(),
            replicas: Vec::new(),
            active_key_id: Some("new".into()),
            legacy_copies: 0,
            legacy_conflicts: 0,
        }
    }

    fn rows(target: &str, rows: i64) -> KeyUsage {
        KeyUsage {
            target: target.into(),
            key_record_id: Some("rec-old".into()),
            rows,
            oldest_written_at: None,
            legacy_copies: 0,
            legacy_conflicts: 0,
        }
    }

    fn running_job() -> RotationJob {
        RotationJob::running_for_test("job-1", "rec-new")
    }

    #[test]
    fn a_rotating_key_with_nothing_on_it_can_be_retired() {
        let plan = plan(facts(KeyStatus::Rotating));
        assert!(plan.blockers.is_empty(), "{:?}", plan.blockers);
        assert_eq!(plan.next_steps, ["keyward keys retire old"]);
    }

    #[test]
    fn an_active_or_pending_key_is_not_retired() {
        let active = plan(facts(KeyStatus::Active));
        assert!(active.blockers[0].contains("active"));
        assert!(active.next_steps[0].contains("keys activate NEW --staged"));
        let pending = plan(facts(KeyStatus::Pending));
        assert!(pending.blockers[0].contains("pending"));
    }

    #[test]
    fn rows_left_without_a_job_call_for_a_rotation_to_the_active_key() {
        let plan = plan(RetireFacts {
            rows: vec![rows("connections", 40), rows("api_tokens", 2)],
            ..facts(KeyStatus::Rotating)
        });
        assert_eq!(plan.rows_total(), 42);
        assert_eq!(
            plan.blockers,
            ["42 rows are still on it (40 in connections, 2 in api_tokens)"]
        );
        assert_eq!(
            plan.next_steps[0],
            "re-encrypt them to the active key: keyward rotate start --target new"
        );
        assert!(plan.next_steps[1].starts_with("then: keyward keys retire old --dry-run"));
    }

    #[test]
    fn legacy_copies_name_the_cutover_without_blocking() {
        let plan = plan(RetireFacts {
            legacy_copies: 300,
            ..facts(KeyStatus::Rotating)
        });
        assert!(plan.blockers.is_empty(), "{:?}", plan.blockers);
        assert_eq!(plan.next_steps[0], "keyward keys retire old");
        assert!(plan.next_steps[1].starts_with("300 rows still hold a legacy ciphertext"));
        assert_eq!(commands(&plan)[1], "keyward legacy cutover --dry-run");
        assert_eq!(plan.next_steps.len(), 2, "no conflicts, no step about them");
    }

    #[test]
    fn legacy_conflicts_are_left_to_a_person() {
        let plan = plan(RetireFacts {
            legacy_copies: 300,
            legacy_conflicts: 2,
            ..facts(KeyStatus::Rotating)
        });
        assert!(plan.blockers.is_empty(), "{:?}", plan.blockers);
        assert!(plan.next_steps[2].starts_with("2 of them hold another plaintext"));
        assert_eq!(commands(&plan)[2], "keyward legacy cutover --dry-run");
    }

    #[test]
    fn a_live_job_is_waited_for() {
        let plan = plan(RetireFacts {
            rows: vec![rows("connections", 5)],
            jobs: vec![running_job()],
            ..facts(KeyStatus::Rotating)
        });
        assert!(plan
            .blockers
            .iter()
            .any(|b| b == "rotation job job-1 is running"));
        assert_eq!(
            plan.next_steps[0],
            "wait for the rotation job to finish: keyward rotate watch job-1"
        );
    }
}
