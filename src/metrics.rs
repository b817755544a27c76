//! Prometheus metrics (text format 0.0.4) on their own listen address
//! (`serve --metrics-listen`, off by default).
//!
//! One [`Metrics`] per server, with its own registry (no global recorder,
//! so servers in one process — the tests — never mix their figures):
//! - RPCs by service, method and code, with latency (families the gRPC
//!   layer owns and feeds, `api::observe::RpcMetrics`, registered here);
//! - KMS calls by provider, operation and outcome, with latency (read from
//!   the registry's [`KmsCallStats`] at scrape time);
//! - data-key cache hits, misses and evictions ([`CacheStats`]);
//! - audit events written and failed ([`AuditLog`]);
//! - bearer tokens this process did not hold, and the shared database
//!   checks they cost ([`TokenStats`]);
//! - each non-retired key's last scheduled check in this process
//!   (`keyward_key_ready`, from `service::probes`, no KMS call at scrape);
//! - rotation jobs by status, and rows and rate of each running job, read
//!   from the database at scrape time, so every replica reports the same;
//! - re-encryption debt: rows per key (legacy included) and rotation
//!   target, and the age of the oldest, also read at scrape time.

use std::{fmt, sync::Arc, time::Duration};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, NoLabelSet},
    metrics::{
        counter::ConstCounter,
        family::Family,
        gauge::{ConstGauge, Gauge},
        MetricType,
    },
    registry::Registry,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    api::observe::RpcMetrics,
    auth::{audit::AuditLog, TokenStats},
    crypto::{
        cache::CacheStats,
        kms::{KmsCallStats, KmsOperation, ProviderKind},
    },
    rotation::{throttle::Signal, JobStatus},
    service::{admin::KeyAdmin, rotation::Progress},
    store::Store,
};

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StatusLabels {
    status: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct JobLabels {
    job_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KeyRowsLabels {
    /// The key's `key_id`; `(legacy)` for legacy rows (no key_id can
    /// contain parentheses); the record id for rows naming no record.
    key_id: String,
    status: &'static str,
    target: String,
}

/// Re-encryption debt, set from the database on each scrape.
#[derive(Debug, Default)]
struct UsageGauges {
    rows: Family<KeyRowsLabels, Gauge>,
    oldest_age: Family<KeyRowsLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    legacy_copies: Family<KeyRowsLabels, Gauge>,
    legacy_conflicts: Family<KeyRowsLabels, Gauge>,
}

/// Rotation figures, set from the database on each scrape.
#[derive(Debug, Default)]
struct RotationGauges {
    jobs: Family<StatusLabels, Gauge>,
    rows_total: Family<JobLabels, Gauge>,
    rows_processed: Family<JobLabels, Gauge>,
    rows_failed: Family<JobLabels, Gauge>,
    rows_per_second: Family<JobLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    rows_late: Family<JobLabels, Gauge>,
    /// 1 while a running job is paused or throttled.
    throttled: Family<JobLabels, Gauge>,
    /// Worker-seconds each running job spent throttled, by signal: a
    /// counter read from the job rows (`ThrottleCollector`).
    throttled_seconds: Arc<std::sync::Mutex<Vec<(ThrottleLabels, f64)>>>,
    /// 1 when the last scrape could read the jobs, else 0.
    up: Gauge,
}

/// What a server exposes; see the module docs.
pub struct Metrics {
    registry: Registry,
    rpc: Arc<RpcMetrics>,
    rotation: Arc<RotationGauges>,
    usage: Arc<UsageGauges>,
    store: Store,
    admin: Arc<KeyAdmin>,
    /// One scrape at a time updates the rotation gauges.
    scrape: tokio::sync::Mutex<()>,
}

impl Metrics {
    pub fn new(
        store: Store,
        admin: Arc<KeyAdmin>,
        kms: Arc<KmsCallStats>,
        cache: Arc<CacheStats>,
        audit: Arc<AuditLog>,
        tokens: Arc<TokenStats>,
    ) -> Self {
        let mut registry = Registry::with_prefix("keyward");
        // The gRPC layer owns its families; this endpoint only serves them.
        let rpc = Arc::new(RpcMetrics::default());
        rpc.register(&mut registry);
        let rotation = Arc::new(RotationGauges::default());
        registry.register(
            "rotation_jobs",
            "Rotation jobs by status",
            rotation.jobs.clone(),
        );
        for (name, help, family) in [
            (
                "rotation_job_rows_total",
                "Rows a running rotation job has to move (grows when a pass finds late rows)",
                &rotation.rows_total,
            ),
            (
                "rotation_job_rows_processed",
                "Rows a running rotation job has processed",
                &rotation.rows_processed,
            ),
            (
                "rotation_job_rows_failed",
                "Rows a running rotation job could not rotate",
                &rotation.rows_failed,
            ),
            (
                "rotation_job_rows_late",
                "Rows a running rotation job's later passes caught, written off target while it ran",
                &rotation.rows_late,
            ),
            (
                "rotation_job_throttled",
                "1 while a running rotation job is paused or throttled (see its throttle_reason)",
                &rotation.throttled,
            ),
        ] {
            registry.register(name, help, family.clone());
        }
        registry.register(
            "rotation_job_rows_per_second",
            "Rows per second of a running rotation job since it started (as WatchRotation reports)",
            rotation.rows_per_second.clone(),
        );
        let usage = Arc::new(UsageGauges::default());
        registry.register(
            "key_rows",
            "Rows on each key (re-encryption debt), by key_id, key status and rotation target",
            usage.rows.clone(),
        );
        registry.register(
            "key_oldest_row_age_seconds",
            "Age of the oldest row on each key (its updated_at), by key_id, key status and rotation target",
            usage.oldest_age.clone(),
        );
        registry.register(
            "key_legacy_copies",
            "Rows on each key that still hold a legacy ciphertext (cleared by keyward legacy cutover), \
             by key_id, key status and rotation target",
            usage.legacy_copies.clone(),
        );
        registry.register(
            "key_legacy_conflicts",
            "Of those, rows the last keyward legacy cutover check (a dry run too) found holding \
             another plaintext than their envelope, by key_id, key status and rotation target",
            usage.legacy_conflicts.clone(),
        );
        registry.register(
            "rotation_metrics_up",
            "1 when the last scrape could read the rotation jobs from the database",
            rotation.up.clone(),
        );
        registry.register_collector(Box::new(ThrottleCollector(Arc::clone(
            &rotation.throttled_seconds,
        ))));
        registry.register_collector(Box::new(KmsCollector(kms)));
        registry.register_collector(Box::new(CacheCollector(cache)));
        registry.register_collector(Box::new(AuditCollector(audit)));
        registry.register_collector(Box::new(TokenCollector(tokens)));
        registry.register_collector(Box::new(KeyCheckCollector(Arc::clone(&admin))));
        Self {
            registry,
            rpc,
            rotation,
            usage,
            store,
            admin,
            scrape: tokio::sync::Mutex::new(()),
        }
    }

    /// The RPC half, for the observe layer.
    pub fn rpc(&self) -> Arc<RpcMetrics> {
        Arc::clone(&self.rpc)
    }

    /// The exposition text: reads the rotation jobs, then encodes.
    pub async fn render(&self) -> String {
        let _one_at_a_time = self.scrape.lock().await;
        self.update_rotation().await;
        self.update_usage().await;
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry);
        text
    }

    async fn update_rotation(&self) {
        let gauges = &self.rotation;
        let read = async {
            let counts = self.store.count_jobs_by_status().await?;
            let running = self.store.running_jobs().await?;
            Ok::<_, crate::store::StoreError>((counts, running))
        };
        let (counts, running) = match tokio::time::timeout(Duration::from_secs(5), read).await {
            Ok(Ok(read)) => read,
            Ok(Err(err)) => {
                tracing::warn!(error = %err, "metrics: cannot read rotation jobs");
                gauges.up.set(0);
                return;
            }
            Err(_) => {
                tracing::warn!("metrics: reading rotation jobs timed out");
                gauges.up.set(0);
                return;
            }
        };
        gauges.up.set(1);
        for status in JobStatus::ALL {
            let n = counts
                .iter()
                .find(|(s, _)| *s == status)
                .map_or(0, |(_, n)| *n);
            gauges
                .jobs
                .get_or_create(&StatusLabels {
                    status: status.as_str(),
                })
                .set(n);
        }
        for family in [
            &gauges.rows_total,
            &gauges.rows_processed,
            &gauges.rows_failed,
            &gauges.rows_late,
            &gauges.throttled,
        ] {
            family.clear();
        }
        let mut throttled_seconds = Vec::new();
        let now = chrono::Utc::now();
        gauges.rows_per_second.clear();
        for job in running {
            let labels = JobLabels {
                job_id: job.id.clone(),
            };
            let progress = Progress::of(job);
            let counts = &progress.job.counts;
            gauges.rows_total.get_or_create(&labels).set(counts.total);
            gauges
                .rows_processed
                .get_or_create(&labels)
                .set(counts.processed);
            gauges.rows_failed.get_or_create(&labels).set(counts.failed);
            gauges.rows_late.get_or_create(&labels).set(counts.late);
            let job = &progress.job;
            gauges
                .throttled
                .get_or_create(&labels)
                .set(i64::from(job.throttle_reason(now).is_some()));
            for (signal, seconds) in [
                (Signal::Foreground, job.throttle.foreground_seconds),
                (Signal::Lag, job.throttle.lag_seconds),
            ] {
                throttled_seconds.push((
                    ThrottleLabels {
                        job_id: job.id.clone(),
                        reason: signal.label(),
                    },
                    seconds,
                ));
            }
            gauges
                .rows_per_second
                .get_or_create(&labels)
                .set(progress.rows_per_second);
        }
        *gauges
            .throttled_seconds
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = throttled_seconds;
    }

    /// Rows per key and target; on failure the gauges keep their last
    /// values and `rotation_metrics_up` (set by the job read) tells.
    async fn update_usage(&self) {
        let reports =
            match tokio::time::timeout(Duration::from_secs(5), self.admin.key_usage()).await {
                Ok(Ok(reports)) => reports,
                Ok(Err(err)) => {
                    tracing::warn!(error = %err, "metrics: cannot read key usage");
                    return;
                }
                Err(_) => {
                    tracing::warn!("metrics: reading key usage timed out");
                    return;
                }
            };
        self.usage.rows.clear();
        self.usage.oldest_age.clear();
        self.usage.legacy_copies.clear();
        self.usage.legacy_conflicts.clear();
        let now = chrono::Utc::now();
        for report in reports {
            let (key_id, status) = match (&report.key, &report.key_record_id) {
                (Some(key), _) => (key.key_id.clone(), key.status.as_str()),
                (None, None) => ("(legacy)".to_owned(), "legacy"),
                (None, Some(id)) => (id.clone(), "unknown"),
            };
            for usage in report.targets {
                let labels = KeyRowsLabels {
                    key_id: key_id.clone(),
                    status,
                    target: usage.target,
                };
                self.usage.rows.get_or_create(&labels).set(usage.rows);
                self.usage
                    .legacy_copies
                    .get_or_create(&labels)
                    .set(usage.legacy_copies);
                self.usage
                    .legacy_conflicts
                    .get_or_create(&labels)
                    .set(usage.legacy_conflicts);
                if let Some(oldest) = usage.oldest_written_at {
                    let age = (now - oldest).num_milliseconds().max(0) as f64 / 1000.0;
                    self.usage.oldest_age.get_or_create(&labels).set(age);
                }
            }
        }
    }

    /// Serves `GET /metrics` on `listener` until `stop`.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        stop: CancellationToken,
    ) -> std::io::Result<()> {
        use axum::{http::header, routing::get, Router};
        let router = Router::new().route(
            "/metrics",
            get(
                |axum::extract::State(metrics): axum::extract::State<Arc<Metrics>>| async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                        )],
                        metrics.render().await,
                    )
                },
            ),
        );
        axum::serve(listener, router.with_state(self))
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
    }
}

/// Encodes one family of counters or gauges from `(labels, value)` pairs.
fn encode_values<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    kind: MetricType,
    values: impl IntoIterator<Item = (L, u64)>,
) -> Result<(), fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in values {
        let metric = family.encode_family(&labels)?;
        ConstCounter::new(value).encode(metric)?;
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KmsLabels {
    provider: &'static str,
    operation: &'static str,
    outcome: &'static str,
}

fn kms_series() -> impl Iterator<Item = (ProviderKind, KmsOperation, bool, KmsLabels)> {
    ProviderKind::ALL.into_iter().flat_map(|provider| {
        KmsOperation::ALL.into_iter().flat_map(move |op| {
            [true, false].into_iter().map(move |ok| {
                let labels = KmsLabels {
                    provider: provider.as_str(),
                    operation: op.as_str(),
                    outcome: if ok { "ok" } else { "failed" },
                };
                (provider, op, ok, labels)
            })
        })
    })
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ThrottleLabels {
    job_id: String,
    reason: &'static str,
}

/// `keyward_rotation_throttled_seconds_total{job_id, reason}`: as the
/// running jobs' rows held it at the last scrape.
#[derive(Debug)]
struct ThrottleCollector(Arc<std::sync::Mutex<Vec<(ThrottleLabels, f64)>>>);

impl Collector for ThrottleCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), fmt::Error> {
        let values = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut family = encoder.encode_descriptor(
            "rotation_throttled_seconds",
            "Worker-seconds a running rotation job's workers spent throttled, by job and reason \
             (foreground_p99: its latency budget; replication_lag: a standby)",
            None,
            MetricType::Counter,
        )?;
        for (labels, seconds) in values.iter() {
            ConstCounter::new(*seconds).encode(family.encode_family(labels)?)?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KeyLabels {
    key_id: String,
    status: &'static str,
}

/// `keyward_key_ready{key_id, status}`: each non-retired key's last
/// scheduled check in this process (its KMS round trip and probe), read
/// without calling any KMS.
struct KeyCheckCollector(Arc<KeyAdmin>);

impl fmt::Debug for KeyCheckCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyCheckCollector")
    }
}

impl Collector for KeyCheckCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), fmt::Error> {
        let checks = self.0.catalog().health().last_key_checks();
        let catalog = self.0.catalog_snapshot();
        let mut family = encoder.encode_descriptor(
            "key_ready",
            "1 when this process's last check of a non-retired key (a KMS round trip, its probe) \
             passed, 0 when it failed (Decrypt under it fails here; an active key's failure is \
             also NOT_SERVING), by key_id and status",
            None,
            MetricType::Gauge,
        )?;
        for key in catalog.keys() {
            let Some(fault) = checks.get(&key.id) else {
                continue;
            };
            let labels = KeyLabels {
                key_id: key.key_id.clone(),
                status: key.status.as_str(),
            };
            ConstGauge::new(i64::from(fault.is_none())).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

struct KmsCollector(Arc<KmsCallStats>);

impl fmt::Debug for KmsCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KmsCollector")
    }
}

impl Collector for KmsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), fmt::Error> {
        let stats = &self.0;
        encode_values(
            &mut encoder,
            "kms_calls",
            "Calls keyward made to a KMS, by provider, operation and outcome",
            MetricType::Counter,
            kms_series().map(|(p, op, ok, labels)| (labels, stats.calls(p, op, ok))),
        )?;
        let mut family = encoder.encode_descriptor(
            "kms_call_duration_seconds",
            "KMS call latency, retries included, by provider, operation and outcome",
            None,
            MetricType::Histogram,
        )?;
        for (p, op, ok, labels) in kms_series() {
            let latency = stats.latency(p, op, ok).snapshot();
            if latency.count > 0 {
                family
                    .encode_family(&labels)?
                    .encode_histogram::<NoLabelSet>(
                        latency.sum,
                        latency.count,
                        &latency.buckets,
                        None,
                    )?;
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CacheLabels {
    cache: &'static str,
}

struct CacheCollector(Arc<CacheStats>);

impl fmt::Debug for CacheCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CacheCollector")
    }
}

impl Collector for CacheCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), fmt::Error> {
        use std::sync::atomic::Ordering::Relaxed;
        let s = &self.0;
        let by_cache = |encrypt: &std::sync::atomic::AtomicU64,
                        decrypt: &std::sync::atomic::AtomicU64| {
            [
                (CacheLabels { cache: "encrypt" }, encrypt.load(Relaxed)),
                (CacheLabels { cache: "decrypt" }, decrypt.load(Relaxed)),
            ]
        };
        encode_values(
            &mut encoder,
            "data_key_cache_hits",
            "Data keys served from the cache, by cache (encrypt, decrypt)",
            MetricType::Counter,
            by_cache(&s.encrypt_hits, &s.decrypt_hits),
        )?;
        encode_values(
            &mut encoder,
            "data_key_cache_misses",
            "Data-key cache lookups that went to the KMS, by cache (encrypt, decrypt)",
            MetricType::Counter,
            by_cache(&s.encrypt_misses, &s.decrypt_misses),
        )?;
        encode_values(
            &mut encoder,
            "data_key_cache_evictions",
            "Cached data keys dropped for size or age, by cache (encrypt, decrypt)",
            MetricType::Counter,
            by_cache(&s.encrypt_evictions, &s.decrypt_evictions),
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct AuditLabels {
    outcome: &'static str,
}

struct AuditCollector(Arc<AuditLog>);

impl fmt::Debug for AuditCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AuditCollector")
    }
}

impl Collector for AuditCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), fmt::Error> {
        encode_values(
            &mut encoder,
            "audit_events",
            "Audit events by outcome (written; failed: refused when fail-closed, lost when fail-open)",
            MetricType::Counter,
            [
                (AuditLabels { outcome: "written" }, self.0.written()),
                (AuditLabels { outcome: "failed" }, self.0.failed()),
            ],
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TokenLabels {
    outcome: &'static str,
}

/// Bearer tokens that were not in memory, read at scrape time.
struct TokenCollector(Arc<TokenStats>);

impl fmt::Debug for TokenCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenCollector")
    }
}

impl Collector for TokenCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), fmt::Error> {
        encode_values(
            &mut encoder,
            "unknown_tokens",
            "Bearer tokens this process did not hold, by outcome (found by a shared check; \
             unknown after one; over_peer_budget: refused at once)",
            MetricType::Counter,
            self.0
                .misses()
                .map(|(outcome, count)| (TokenLabels { outcome }, count)),
        )?;
        let checks = encoder.encode_descriptor(
            "token_checks",
            "Shared database checks for new bearer tokens (at most 10 a second, whatever the number of unknown tokens)",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(self.0.checks()).encode(checks)
    }
}
