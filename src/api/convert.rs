//! Conversions between `keyward.v1` messages and domain types.

use std::collections::HashMap;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use tonic::Status;

use super::proto;
use crate::{
    crypto::{context::EncryptionContext, envelope::Envelope},
    error::Error,
    keys::{Catalog, KeyRecord, KeyStatus},
    rotation::{JobStatus, Mode, RotationJob},
    service::{
        admin::KeyUsageReport,
        crypto::{Ciphertext, Limits, Sealed},
        retirement::RetirePlan,
        rotation::Progress,
    },
    store::{
        replicas::{KeyUsage, ReplicaRecord},
        LegacyCheck,
    },
};

pub fn context(map: HashMap<String, String>, limits: Limits) -> Result<EncryptionContext, Error> {
    Ok(EncryptionContext::parse_limited(
        map,
        limits.max_context_entries,
        limits.max_context_bytes,
    )?)
}

pub fn envelope_to_proto(env: Envelope) -> proto::Envelope {
    proto::Envelope {
        encryption_key_id: env.encryption_key_id,
        data_key_ciphertext: env.data_key_ciphertext.into(),
        data_key_iv: env.data_key_iv.into(),
        payload_ciphertext: env.payload_ciphertext.into(),
        payload_iv: env.payload_iv.into(),
    }
}

pub fn envelope_from_proto(env: proto::Envelope) -> Envelope {
    Envelope {
        encryption_key_id: env.encryption_key_id,
        data_key_ciphertext: env.data_key_ciphertext.into(),
        data_key_iv: env.data_key_iv.into(),
        payload_ciphertext: env.payload_ciphertext.into(),
        payload_iv: env.payload_iv.into(),
    }
}

/// The response with the forms the caller asked for.
pub fn sealed_to_proto(
    sealed: Sealed,
    form: proto::EnvelopeForm,
) -> Result<proto::EncryptResponse, Error> {
    use proto::EnvelopeForm as Form;
    let key_id = sealed.key.key_id.clone();
    let (envelope, blob) = match form {
        Form::Fields => (Some(envelope_to_proto(sealed.envelope)), Bytes::new()),
        Form::Blob => (None, sealed.blob()?.into()),
        Form::Unspecified | Form::Both => {
            // The structured fields are slices of the blob: one buffer and
            // one reference count, where four separate buffers would each
            // allocate a reference count when the response is encoded
            // (prost's encoder clones every `Bytes` field).
            let (blob, at) = sealed.blob_with_ranges()?;
            let blob = Bytes::from(blob);
            let envelope = proto::Envelope {
                encryption_key_id: sealed.envelope.encryption_key_id,
                data_key_ciphertext: blob.slice(at.data_key_ciphertext),
                data_key_iv: blob.slice(at.data_key_iv),
                payload_ciphertext: blob.slice(at.payload_ciphertext),
                payload_iv: blob.slice(at.payload_iv),
            };
            (Some(envelope), blob)
        }
    };
    Ok(proto::EncryptResponse {
        key_id,
        envelope,
        blob,
    })
}

pub fn ciphertext(ct: Option<proto::decrypt_request::Ciphertext>) -> Result<Ciphertext, Error> {
    match ct {
        Some(proto::decrypt_request::Ciphertext::Envelope(env)) => {
            Ok(Ciphertext::Envelope(envelope_from_proto(env)))
        }
        Some(proto::decrypt_request::Ciphertext::Blob(blob)) if !blob.is_empty() => {
            Ok(Ciphertext::Blob(blob.into()))
        }
        _ => Err(Error::MissingCiphertext),
    }
}

/// A RewrapRequest's ciphertext, read as Decrypt reads its own.
pub fn rewrap_ciphertext(
    ct: Option<proto::rewrap_request::Ciphertext>,
) -> Result<Ciphertext, Error> {
    use proto::{decrypt_request::Ciphertext as Decrypt, rewrap_request::Ciphertext as Rewrap};
    ciphertext(ct.map(|ct| match ct {
        Rewrap::Envelope(env) => Decrypt::Envelope(env),
        Rewrap::Blob(blob) => Decrypt::Blob(blob),
    }))
}

pub fn item_error(status: &Status) -> proto::ItemError {
    proto::ItemError {
        code: status.code() as i32,
        message: status.message().to_owned(),
    }
}

pub fn key_status(status: KeyStatus) -> proto::KeyStatus {
    match status {
        KeyStatus::Pending => proto::KeyStatus::Pending,
        KeyStatus::Active => proto::KeyStatus::Active,
        KeyStatus::Rotating => proto::KeyStatus::Rotating,
        KeyStatus::Retired => proto::KeyStatus::Retired,
    }
}

fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        // subsec_nanos is below 2e9 and fits an i32.
        nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

pub fn key(record: &KeyRecord) -> proto::Key {
    proto::Key {
        id: record.id.clone(),
        key_id: record.key_id.clone(),
        kms_key_arn: record.kms_key_arn.clone(),
        alias: record.alias.clone().unwrap_or_default(),
        provider: record.provider.as_str().to_owned(),
        status: key_status(record.status) as i32,
        created_at: Some(timestamp(record.created_at)),
        updated_at: Some(timestamp(record.updated_at)),
        rotated_at: record.rotated_at.map(timestamp),
    }
}

pub fn rotation_mode(mode: i32) -> Option<Mode> {
    match proto::RotationMode::try_from(mode).unwrap_or(proto::RotationMode::Unspecified) {
        proto::RotationMode::Unspecified => None,
        proto::RotationMode::Reencrypt => Some(Mode::Reencrypt),
        proto::RotationMode::Rewrap => Some(Mode::Rewrap),
    }
}

/// A job's status as callers see it: a paused job that has not ended is
/// PAUSED.
fn rotation_status(status: JobStatus, paused: bool) -> proto::RotationStatus {
    if paused && !status.is_terminal() {
        return proto::RotationStatus::Paused;
    }
    match status {
        JobStatus::Pending => proto::RotationStatus::Pending,
        JobStatus::Running => proto::RotationStatus::Running,
        JobStatus::Completed => proto::RotationStatus::Completed,
        JobStatus::CompletedWithErrors => proto::RotationStatus::CompletedWithErrors,
        JobStatus::Failed => proto::RotationStatus::Failed,
        JobStatus::Cancelled => proto::RotationStatus::Cancelled,
    }
}

pub fn rotation_job(job: &RotationJob, catalog: &Catalog) -> proto::RotationJob {
    let reason = job.throttle_reason(chrono::Utc::now());
    proto::RotationJob {
        id: job.id.clone(),
        status: rotation_status(job.status, job.paused) as i32,
        target_encryption_key_id: job.target_key_id.clone(),
        target_key_id: catalog
            .get(&job.target_key_id)
            .map(|k| k.key_id.clone())
            .unwrap_or_default(),
        mode: match job.mode {
            Mode::Reencrypt => proto::RotationMode::Reencrypt,
            Mode::Rewrap => proto::RotationMode::Rewrap,
        } as i32,
        dry_run: job.dry_run,
        batch_size: job.batch_size,
        max_rows_per_second: job.max_rows_per_second.unwrap_or(0),
        total_rows: job.counts.total,
        processed_rows: job.counts.processed,
        succeeded_rows: job.counts.succeeded,
        failed_rows: job.counts.failed,
        skipped_rows: job.counts.skipped,
        pass: job.pass,
        last_error: job.last_error.clone().unwrap_or_default(),
        cancel_requested: job.cancel_requested,
        created_at: Some(timestamp(job.created_at)),
        updated_at: Some(timestamp(job.updated_at)),
        started_at: job.started_at.map(timestamp),
        completed_at: job.completed_at.map(timestamp),
        late_rows: job.counts.late,
        target_batch_ms: job.target_batch_ms.unwrap_or(0),
        max_foreground_p99_ms: job.limits.max_foreground_p99_ms.unwrap_or(0.0),
        min_rows_per_second: job.limits.min_rows_per_second.unwrap_or(0),
        max_replication_lag_ms: job.limits.max_replication_lag_ms.unwrap_or(0),
        throttled: reason.is_some(),
        throttle_reason: reason.unwrap_or_default().to_owned(),
        throttled_foreground_seconds: job.throttle.foreground_seconds,
        throttled_lag_seconds: job.throttle.lag_seconds,
    }
}

/// A replica's heartbeat; keys are named by `key_id` where the catalog
/// knows them.
pub fn replica(replica: &ReplicaRecord, catalog: &Catalog, now: DateTime<Utc>) -> proto::Replica {
    let name = |id: &str| catalog.get(id).map_or(id.to_owned(), |k| k.key_id.clone());
    proto::Replica {
        id: replica.id.clone(),
        kind: replica.kind.as_str().to_owned(),
        host: replica.host.clone(),
        pid: replica.pid,
        listen: replica.listen.clone().unwrap_or_default(),
        version: replica.version.clone(),
        started_at: Some(timestamp(replica.started_at)),
        heartbeat_at: Some(timestamp(replica.heartbeat_at)),
        live: replica.is_live(now),
        catalog_version: replica.catalog_version,
        active_key_id: replica
            .active_key_id
            .as_deref()
            .map(name)
            .unwrap_or_default(),
        active_since: replica.active_since.map(timestamp),
        master_fingerprints: replica
            .master_fingerprints
            .iter()
            .flatten()
            .map(ToString::to_string)
            .collect(),
        keys: replica
            .key_readiness
            .iter()
            .map(|(id, error)| proto::ReplicaKeyReadiness {
                key_id: name(id),
                ready: error.is_none(),
                error: error.clone().unwrap_or_default(),
            })
            .collect(),
    }
}

pub fn target_usage(usage: &KeyUsage) -> proto::TargetUsage {
    proto::TargetUsage {
        target: usage.target.clone(),
        rows: usage.rows,
        oldest_written_at: usage.oldest_written_at.map(timestamp),
        legacy_copies: usage.legacy_copies,
        legacy_conflicts: usage.legacy_conflicts,
    }
}

pub fn legacy_check(check: &LegacyCheck) -> proto::LegacyCheck {
    proto::LegacyCheck {
        target: check.target.clone(),
        checked_at: Some(timestamp(check.checked_at)),
        conflicts: check.conflicts,
    }
}

pub fn key_usage(report: &KeyUsageReport, now: DateTime<Utc>) -> proto::KeyUsage {
    let oldest = report.oldest_written_at();
    proto::KeyUsage {
        key_id: report
            .key
            .as_ref()
            .map(|k| k.key_id.clone())
            .unwrap_or_default(),
        encryption_key_id: report.key_record_id.clone().unwrap_or_default(),
        status: report
            .key
            .as_ref()
            .map_or(proto::KeyStatus::Unspecified, |k| key_status(k.status)) as i32,
        legacy: report.key_record_id.is_none(),
        rows: report.rows(),
        oldest_written_at: oldest.map(timestamp),
        oldest_age_seconds: oldest
            .map(|t| (now - t).num_milliseconds().max(0) as f64 / 1000.0)
            .unwrap_or(0.0),
        targets: report.targets.iter().map(target_usage).collect(),
        legacy_copies: report.legacy_copies(),
        legacy_conflicts: report.legacy_conflicts(),
    }
}

/// A retirement plan (dry run or refusal details).
pub fn retire_plan(
    plan: &RetirePlan,
    catalog: &Catalog,
    now: DateTime<Utc>,
) -> proto::RetireKeyResponse {
    proto::RetireKeyResponse {
        key: Some(key(&plan.key)),
        referencing_rows: plan.rows_total(),
        retired: false,
        blockers: plan.blockers.clone(),
        next_steps: plan.next_steps.clone(),
        rows: plan.rows.iter().map(target_usage).collect(),
        live_job_ids: plan.jobs.iter().map(|j| j.id.clone()).collect(),
        replicas_using_key: plan
            .replicas
            .iter()
            .map(|r| replica(r, catalog, now))
            .collect(),
        legacy_copies: plan.legacy_copies,
        legacy_conflicts: plan.legacy_conflicts,
    }
}

pub fn rotation_progress(progress: &Progress, catalog: &Catalog) -> proto::RotationProgress {
    proto::RotationProgress {
        job: Some(rotation_job(&progress.job, catalog)),
        rows_per_second: progress.rows_per_second,
        eta_seconds: progress.eta_seconds.unwrap_or(-1.0),
        terminal: progress.job.status.is_terminal(),
    }
}

/// The rotation targets, in the order rotation walks them.
pub fn rotation_targets(
    targets: &[crate::rotation::target::RotationTarget],
) -> proto::ListRotationTargetsResponse {
    proto::ListRotationTargetsResponse {
        targets: targets
            .iter()
            .map(|t| proto::RotationTarget {
                table: t.table.as_str().to_owned(),
                definition_json: crate::rotation::definition::TargetDefinition::of(t).to_json(),
                encoding: t.encoding.as_str().to_owned(),
            })
            .collect(),
    }
}
