//! Key probes: proof that this process opens what was written under each
//! key, so a replica started with another master secret (or pointed at
//! another KMS key) is caught at once instead of answering "ciphertext was
//! modified" to every Decrypt of the other replicas' rows.
//!
//! A round trip proves nothing here: with the local KMS, any master secret
//! round-trips its own data keys. What proves a process right is opening
//! something another process wrote. Each key therefore carries a probe in
//! `keyward_key_probes` (a fixed, public plaintext sealed under the key,
//! the staged-activation probe), which readiness, heartbeats and the
//! self-test decrypt.
//!
//! Who writes a key's probe decides what is true for it, so the first
//! process to notice a key does not get to: a key created through keyward
//! gets its probe in the transaction that inserts it (no other process ever
//! sees it without one); a key that has rows but no probe (older than
//! probes, or inserted by the runbook's SQL) gets one only from a process
//! that has decrypted a sample of those rows; a key with neither gets one
//! when it is activated. A process that only looks (readiness, heartbeat,
//! self-test) never writes a probe for a key without rows. A probe is never
//! replaced (`Store::insert_key_probe` keeps the first one).
//! A process that cannot open a key's probe, or none of its sampled rows,
//! has the wrong configuration: [`KeyFault::Foreign`], which makes it
//! NOT_SERVING. Any other failure ([`KeyFault::Unchecked`]: the KMS is
//! down, the key is disabled) is reported, and only stops readiness for the
//! active key.

use std::{
    collections::{BTreeMap, HashMap},
    hash::{Hash, Hasher},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use super::{
    crypto::{Ciphertext, CryptoService},
    replica::{probe_context, seal_probe},
};
use crate::{
    crypto::kms::ProviderKind,
    error::{chain, Error, Result},
    keys::{Catalog, KeyRecord, KeyStatus},
    rotation::target::RotationTarget,
    store::Store,
};

/// Rows of each rotation target decrypted before a key gets its probe.
const SAMPLE_ROWS: i64 = 5;

/// Why this process cannot use a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyFault {
    /// What was written under the key does not open here: this process's
    /// master secret (or KMS key) is not the one that wrote it.
    Foreign(String),
    /// The key could not be checked (KMS unreachable, key disabled, …).
    Unchecked(String),
}

impl KeyFault {
    pub fn reason(&self) -> &str {
        match self {
            KeyFault::Foreign(reason) | KeyFault::Unchecked(reason) => reason,
        }
    }

    /// A configuration error of this process (it must not serve).
    pub fn is_foreign(&self) -> bool {
        matches!(self, KeyFault::Foreign(_))
    }
}

impl From<KeyFault> for Error {
    fn from(fault: KeyFault) -> Self {
        match fault {
            KeyFault::Foreign(reason) => Error::ForeignKey(reason),
            KeyFault::Unchecked(reason) => Error::KeyUnchecked(reason),
        }
    }
}

/// What decrypting one sampled row gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SampleOutcome {
    Opened,
    /// The ciphertext did not authenticate under the key.
    NotAuthentic,
    /// Anything else (the KMS failed, the row is malformed).
    Failed(String),
}

/// What a sample of a key's rows says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SampleVerdict {
    /// At least one row opened (or there were none to open): this process
    /// may write the key's probe.
    Proven,
    /// Rows exist and none authenticated.
    Foreign { rows: usize },
    /// Rows exist, none opened, and some failed for another reason.
    Unchecked(String),
}

/// Judges a sample. One opened row is proof enough: another master secret
/// opens none, and a row or two may be corrupt for reasons of their own.
pub fn judge_sample(outcomes: &[SampleOutcome]) -> SampleVerdict {
    if outcomes.is_empty() || outcomes.contains(&SampleOutcome::Opened) {
        return SampleVerdict::Proven;
    }
    match outcomes.iter().find_map(|o| match o {
        SampleOutcome::Failed(reason) => Some(reason.clone()),
        _ => None,
    }) {
        Some(reason) => SampleVerdict::Unchecked(reason),
        None => SampleVerdict::Foreign {
            rows: outcomes.len(),
        },
    }
}

/// The message of a key whose data this process cannot open.
fn foreign(key: &KeyRecord, evidence: &str) -> KeyFault {
    let whose = match key.provider {
        ProviderKind::Local => "this master secret (ENCRYPTION_MASTER_KEY) is not the one",
        _ => "this process's KMS configuration is not the one",
    };
    KeyFault::Foreign(format!(
        "{whose} that wrote key {}: {evidence}; start it with the secret the other replicas use (keep a new one beside it as a previous secret)",
        key.key_id
    ))
}

/// What to do with a key that has neither a probe nor rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vacant {
    /// Write its probe: this process creates or activates the key, and so
    /// defines what its data decrypts with.
    WriteProbe,
    /// Leave it: nothing written under it can be misread yet, and a process
    /// that merely looks at the key must not define its truth (the first
    /// replica to notice it could be the misconfigured one).
    Leave,
}

/// Checks one key: opens its probe, or when it has none, decrypts a sample
/// of its rows and then writes its probe (for a key without rows, only as
/// `vacant` says).
pub(crate) async fn prove_key(
    crypto: &CryptoService,
    store: &Store,
    targets: &[RotationTarget],
    key: &Arc<KeyRecord>,
    probe: Option<&[u8]>,
    vacant: Vacant,
) -> std::result::Result<(), KeyFault> {
    if let Some(probe) = probe {
        return open_probe(crypto, key, probe).await;
    }
    let unchecked = |err: Error| KeyFault::Unchecked(chain(&err));
    let sample = store
        .sample_rows_on_key(targets, &key.id, SAMPLE_ROWS)
        .await
        .map_err(|err| unchecked(err.into()))?;
    let mut outcomes = Vec::with_capacity(sample.len());
    for (index, row) in &sample {
        let Some(target) = targets.get(*index) else {
            continue;
        };
        let outcome = match (&row.malformed, target.context_of(&row.context)) {
            (Some(why), _) => SampleOutcome::Failed(why.clone()),
            (None, Err(err)) => SampleOutcome::Failed(err.to_string()),
            (None, Ok(context)) => {
                match crypto.verify_under(key, &row.envelope(), &context).await {
                    Ok(()) => SampleOutcome::Opened,
                    Err(Error::DecryptionFailed) => SampleOutcome::NotAuthentic,
                    Err(err) => SampleOutcome::Failed(chain(&err)),
                }
            }
        };
        outcomes.push(outcome);
    }
    match judge_sample(&outcomes) {
        SampleVerdict::Foreign { rows } => {
            return Err(foreign(
                key,
                &format!("none of {rows} sampled rows written under it decrypt"),
            ))
        }
        SampleVerdict::Unchecked(reason) => return Err(KeyFault::Unchecked(reason)),
        SampleVerdict::Proven if outcomes.is_empty() && vacant == Vacant::Leave => return Ok(()),
        SampleVerdict::Proven => {}
    }
    let sealed = seal_probe(crypto, key).await.map_err(unchecked)?;
    let stored = store
        .insert_key_probe(&key.id, &sealed)
        .await
        .map_err(|err| unchecked(err.into()))?;
    if stored == sealed {
        tracing::info!(key_id = %key.key_id, sampled_rows = outcomes.len(), "key probe written");
        Ok(())
    } else {
        // Another process wrote one first: that one is the reference.
        open_probe(crypto, key, &stored).await
    }
}

/// Decrypts a key's probe.
async fn open_probe(
    crypto: &CryptoService,
    key: &Arc<KeyRecord>,
    probe: &[u8],
) -> std::result::Result<(), KeyFault> {
    let opened: Result<()> = async {
        let envelope = crypto.parse(Ciphertext::Blob(probe.to_vec()))?;
        crypto
            .verify_under(key, &envelope, &probe_context(&key.id)?)
            .await
    }
    .await;
    match opened {
        Ok(()) => Ok(()),
        Err(Error::DecryptionFailed) => Err(foreign(key, "its probe does not decrypt")),
        Err(err) => Err(KeyFault::Unchecked(chain(&err))),
    }
}

/// How often a key is checked again by default: at most one KMS round
/// trip per key per five minutes per process (`serve --key-check-secs`).
pub const DEFAULT_KEY_CHECK: Duration = Duration::from_secs(300);

/// Whether a key checked at `checked_at` is due for another check at `now`.
/// Proven or failing, a key waits `interval` plus its jitter (`jitter` in
/// [0, 1): up to a tenth more, so replicas started together spread their
/// KMS calls). The active key, while it fails, is due at every look: this
/// process serves nothing until it passes, and the looks (heartbeats,
/// catalog reloads) are few.
pub fn check_due(
    checked_at: Instant,
    now: Instant,
    interval: Duration,
    jitter: f64,
    failing_active: bool,
) -> bool {
    failing_active || now.duration_since(checked_at) >= interval.mul_f64(1.0 + jitter / 10.0)
}

/// One key's last check.
#[derive(Debug, Clone)]
struct Checked {
    /// What was checked: the KMS key and the probe.
    seen: u64,
    at: Instant,
    jitter: f64,
    fault: Option<KeyFault>,
}

/// The keys' checks, on a schedule: each non-retired key is checked again
/// when what was checked (KMS key, probe) changes, or when its interval
/// has passed ([`check_due`]).
pub(crate) struct KeyProofs {
    checked: tokio::sync::Mutex<HashMap<String, Checked>>,
    /// The last result of every key, for readers that must not wait for a
    /// check in flight (metrics).
    last: std::sync::Mutex<BTreeMap<String, Option<String>>>,
    interval_ms: AtomicU64,
}

impl Default for KeyProofs {
    fn default() -> Self {
        Self {
            checked: Default::default(),
            last: Default::default(),
            interval_ms: AtomicU64::new(millis(DEFAULT_KEY_CHECK)),
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl KeyProofs {
    /// Checks each key again after `interval` (from its last check on).
    pub(crate) fn set_interval(&self, interval: Duration) {
        self.interval_ms.store(millis(interval), Ordering::Relaxed);
    }

    /// Each non-retired key's last result (record id → why it failed),
    /// without checking anything.
    pub(crate) fn last(&self) -> BTreeMap<String, Option<String>> {
        self.last
            .lock()
            .map(|last| last.clone())
            .unwrap_or_default()
    }

    /// Checks every non-retired key of `catalog` that is due: `None` where
    /// this process can use the key, else why not. `fresh` checks every key
    /// now, each with a round trip (the self-test).
    pub(crate) async fn check(
        &self,
        crypto: &CryptoService,
        store: &Store,
        targets: &[RotationTarget],
        catalog: &Catalog,
        fresh: bool,
    ) -> Result<BTreeMap<String, Option<KeyFault>>> {
        let mut checked = self.checked.lock().await;
        let probes: HashMap<String, Vec<u8>> = store.key_probes().await?.into_iter().collect();
        let interval = Duration::from_millis(self.interval_ms.load(Ordering::Relaxed));
        let mut results = BTreeMap::new();
        for key in catalog
            .keys()
            .iter()
            .filter(|k| k.status != KeyStatus::Retired)
        {
            let probe = probes.get(&key.id).map(Vec::as_slice);
            let seen = fingerprint(&key.kms_key_arn, probe);
            let now = Instant::now();
            if let Some(last) = checked.get(&key.id) {
                let failing_active = key.status == KeyStatus::Active && last.fault.is_some();
                if !fresh
                    && last.seen == seen
                    && !check_due(last.at, now, interval, last.jitter, failing_active)
                {
                    results.insert(key.id.clone(), last.fault.clone());
                    continue;
                }
            }
            let fault = check_key(crypto, store, targets, key, probe, fresh)
                .await
                .err();
            // Remembered by the probe's bytes: one written just now counts
            // from the next look.
            let probe = match probe {
                Some(probe) => Some(probe.to_vec()),
                None => store.key_probe(&key.id).await?,
            };
            if let Some(fault) = &fault {
                tracing::warn!(
                    key_id = %key.key_id,
                    status = key.status.as_str(),
                    reason = fault.reason(),
                    "this process cannot use a key: {}",
                    consequence(key.status)
                );
            }
            checked.insert(
                key.id.clone(),
                Checked {
                    seen: fingerprint(&key.kms_key_arn, probe.as_deref()),
                    at: now,
                    jitter: rand::random::<f64>(),
                    fault: fault.clone(),
                },
            );
            results.insert(key.id.clone(), fault);
        }
        checked.retain(|id, _| results.contains_key(id));
        if let Ok(mut last) = self.last.lock() {
            *last = results
                .iter()
                .map(|(id, fault)| (id.clone(), fault.as_ref().map(|f| f.reason().to_owned())))
                .collect();
        }
        Ok(results)
    }
}

/// What a key that fails its check means for callers.
fn consequence(status: KeyStatus) -> &'static str {
    match status {
        KeyStatus::Active => "Encrypt is refused and health is NOT_SERVING until it passes",
        KeyStatus::Rotating => {
            "Decrypt of the rows still on it fails (and rotation of them) until it passes; health stays SERVING"
        }
        _ => "it cannot be activated, and Decrypt of anything under it fails, until it passes; health stays SERVING",
    }
}

/// One key's check: a round trip through its KMS for the active key
/// (which must encrypt), for a key without a probe (whose probe check may
/// call no KMS) and for every key in a self-test (`full`), else a look at
/// its KMS key (a disabled key shows there before a Decrypt would fail);
/// then its probe opened, or a sample of its rows.
async fn check_key(
    crypto: &CryptoService,
    store: &Store,
    targets: &[RotationTarget],
    key: &Arc<KeyRecord>,
    probe: Option<&[u8]>,
    full: bool,
) -> std::result::Result<(), KeyFault> {
    let kms = if full || key.status == KeyStatus::Active || probe.is_none() {
        crypto.round_trip(key).await
    } else {
        crypto.check_kms_key(key).await
    };
    kms.map_err(|err| KeyFault::Unchecked(chain(&err)))?;
    prove_key(crypto, store, targets, key, probe, Vacant::Leave).await
}

fn fingerprint(kms_key_arn: &str, probe: Option<&[u8]>) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    kms_key_arn.hash(&mut hasher);
    probe.hash(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::{check_due, judge_sample, SampleOutcome as O, SampleVerdict as V};

    #[test]
    fn a_key_is_checked_again_once_its_interval_and_jitter_have_passed() {
        let at = Instant::now();
        let five_minutes = Duration::from_secs(300);
        let check = |after: u64, jitter: f64| {
            check_due(
                at,
                at + Duration::from_secs(after),
                five_minutes,
                jitter,
                false,
            )
        };
        assert!(!check(0, 0.0));
        assert!(!check(299, 0.0));
        assert!(check(300, 0.0));
        // Jitter only ever lengthens the wait, by up to a tenth.
        assert!(!check(300, 0.5));
        assert!(!check(314, 0.5));
        assert!(check(315, 0.5));
        assert!(check(330, 0.999));
    }

    #[test]
    fn a_failing_active_key_is_due_at_every_look() {
        let at = Instant::now();
        assert!(check_due(at, at, Duration::from_secs(300), 0.3, true));
    }

    #[test]
    fn a_key_without_rows_or_with_one_readable_row_is_proven() {
        assert_eq!(judge_sample(&[]), V::Proven);
        assert_eq!(
            judge_sample(&[O::NotAuthentic, O::Opened, O::NotAuthentic]),
            V::Proven
        );
    }

    #[test]
    fn rows_that_all_fail_to_authenticate_mean_another_secret() {
        assert_eq!(
            judge_sample(&[O::NotAuthentic, O::NotAuthentic]),
            V::Foreign { rows: 2 }
        );
    }

    #[test]
    fn other_failures_leave_the_key_unchecked_not_foreign() {
        assert_eq!(
            judge_sample(&[O::NotAuthentic, O::Failed("kms unavailable".into())]),
            V::Unchecked("kms unavailable".into())
        );
    }
}
