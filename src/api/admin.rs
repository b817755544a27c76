//! `keyward.v1.Admin` over the key administration service.

use std::{pin::Pin, sync::Arc};

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::{
    auth::Caller,
    convert,
    proto::{self, admin_server::Admin},
    status::{code_name, code_of},
};
use crate::{
    auth::audit::AuditLog,
    error::Error,
    service::{
        admin::{CreateKey, KeyAdmin, Staging},
        audited::{audited, record_forced_retirement, Actor, Change},
        rotation::{Retune, Rotations, StartRotation},
    },
};

pub struct AdminApi {
    admin: Arc<KeyAdmin>,
    rotations: Arc<Rotations>,
    audit: Arc<AuditLog>,
}

impl AdminApi {
    pub fn new(admin: Arc<KeyAdmin>, rotations: Arc<Rotations>, audit: Arc<AuditLog>) -> Self {
        Self {
            admin,
            rotations,
            audit,
        }
    }

    /// Runs an audited change of `caller`'s (`service::audited`); a
    /// failure's outcome is its gRPC code name.
    async fn audited<T>(
        &self,
        caller: &Caller,
        change: Change<'_>,
        run: impl std::future::Future<Output = Result<T, Error>>,
    ) -> Result<T, Status> {
        // Key changes log events of their own: they carry who and which key.
        super::observe::write_notes();
        if let Some(key_id) = change.key_id {
            super::observe::note_key_id(key_id);
        }
        Ok(audited(&self.audit, &actor(caller), change, run).await?)
    }

    /// Runs an audited change of a rotation job; the job after it.
    async fn change_job(
        &self,
        caller: &Caller,
        rpc: &'static str,
        job_id: &str,
        detail: String,
        run: impl std::future::Future<Output = Result<crate::rotation::RotationJob, Error>>,
    ) -> Result<Response<proto::RotationJob>, Status> {
        let change = Change {
            rpc,
            key_id: None,
            detail: Some(format!("job_id={job_id}{detail}")),
        };
        let job = self.audited(caller, change, run).await?;
        Ok(Response::new(self.job(&job)))
    }

    /// Runs an audited change of the rotation targets; the list after it.
    async fn change_targets(
        &self,
        caller: &Caller,
        rpc: &'static str,
        detail: String,
        run: impl std::future::Future<Output = Result<(), Error>>,
    ) -> Result<Response<proto::ListRotationTargetsResponse>, Status> {
        let change = Change {
            rpc,
            key_id: None,
            detail: Some(detail),
        };
        self.audited(caller, change, run).await?;
        Ok(Response::new(self.targets()))
    }

    fn targets(&self) -> proto::ListRotationTargetsResponse {
        convert::rotation_targets(&self.admin.targets().current())
    }

    fn job(&self, job: &crate::rotation::RotationJob) -> proto::RotationJob {
        convert::rotation_job(job, &self.admin.catalog_snapshot())
    }
}

/// A caller as the audited path records it.
fn actor(caller: &Caller) -> Actor {
    Actor {
        principal: caller.principal.name.clone(),
        peer: caller.peer_string(),
        failure: |err| code_name(code_of(err)),
    }
}

/// How long a staged activation waits for replicas when the request does
/// not say.
pub const DEFAULT_STAGED_TIMEOUT_SECS: u64 = 60;

type ProgressStream = Pin<Box<dyn Stream<Item = Result<proto::RotationProgress, Status>> + Send>>;

#[tonic::async_trait]
impl Admin for AdminApi {
    async fn list_keys(
        &self,
        _request: Request<proto::ListKeysRequest>,
    ) -> Result<Response<proto::ListKeysResponse>, Status> {
        let keys = self.admin.list_keys().await?;
        Ok(Response::new(proto::ListKeysResponse {
            keys: keys.iter().map(convert::key).collect(),
        }))
    }

    async fn create_key(
        &self,
        mut request: Request<proto::CreateKeyRequest>,
    ) -> Result<Response<proto::Key>, Status> {
        let caller = Caller::take(&mut request)?;
        let req = request.into_inner();
        let change = Change {
            rpc: "keyward.v1.Admin/CreateKey",
            key_id: Some(&req.key_id),
            detail: Some(format!(
                "kms_key_arn={} activate={}",
                req.kms_key_arn, req.activate
            )),
        };
        let create = self.admin.create_key(CreateKey {
            key_id: req.key_id.clone(),
            kms_key_arn: req.kms_key_arn.clone(),
            alias: Some(req.alias.clone()),
            provider: req.provider.clone(),
            activate: req.activate,
        });
        let record = self.audited(&caller, change, create).await?;
        Ok(Response::new(convert::key(&record)))
    }

    async fn activate_key(
        &self,
        mut request: Request<proto::ActivateKeyRequest>,
    ) -> Result<Response<proto::ActivateKeyResponse>, Status> {
        let caller = Caller::take(&mut request)?;
        let req = request.into_inner();
        let staging = if req.staged {
            Staging::Staged {
                timeout: std::time::Duration::from_secs(match req.staged_timeout_seconds {
                    0 => DEFAULT_STAGED_TIMEOUT_SECS,
                    n => u64::from(n),
                }),
            }
        } else {
            Staging::Immediate
        };
        let change = Change {
            rpc: "keyward.v1.Admin/ActivateKey",
            key_id: Some(&req.key_id),
            detail: Some(format!("staged={}", req.staged)),
        };
        let activation = self
            .audited(
                &caller,
                change,
                self.admin.activate_key(&req.key_id, staging),
            )
            .await?;
        let catalog = self.admin.catalog_snapshot();
        let now = chrono::Utc::now();
        Ok(Response::new(proto::ActivateKeyResponse {
            activated: Some(convert::key(&activation.activated)),
            previous: activation.previous.as_ref().map(convert::key),
            confirmed_replicas: activation
                .confirmed
                .iter()
                .map(|r| convert::replica(r, &catalog, now))
                .collect(),
        }))
    }

    async fn retire_key(
        &self,
        mut request: Request<proto::RetireKeyRequest>,
    ) -> Result<Response<proto::RetireKeyResponse>, Status> {
        let caller = Caller::take(&mut request)?;
        let req = request.into_inner();
        if req.dry_run {
            let plan = self.admin.retire_plan(&req.key_id).await?;
            return Ok(Response::new(convert::retire_plan(
                &plan,
                &self.admin.catalog_snapshot(),
                chrono::Utc::now(),
            )));
        }
        let change = Change {
            rpc: "keyward.v1.Admin/RetireKey",
            key_id: Some(&req.key_id),
            detail: Some(format!("force={}", req.force)),
        };
        let retirement = self
            .audited(
                &caller,
                change,
                self.admin.retire_key(&req.key_id, req.force),
            )
            .await?;
        record_forced_retirement(
            &self.audit,
            &actor(&caller),
            "keyward.v1.Admin/RetireKey",
            &retirement,
        );
        Ok(Response::new(proto::RetireKeyResponse {
            key: Some(convert::key(&retirement.key)),
            referencing_rows: retirement.referencing_rows,
            retired: true,
            blockers: retirement.overridden,
            ..Default::default()
        }))
    }

    async fn list_replicas(
        &self,
        _request: Request<proto::ListReplicasRequest>,
    ) -> Result<Response<proto::ListReplicasResponse>, Status> {
        let (replicas, catalog_version) = self.admin.list_replicas().await?;
        let catalog = self.admin.catalog_snapshot();
        let now = chrono::Utc::now();
        Ok(Response::new(proto::ListReplicasResponse {
            replicas: replicas
                .iter()
                .map(|r| convert::replica(r, &catalog, now))
                .collect(),
            catalog_version,
        }))
    }

    async fn get_key_usage(
        &self,
        _request: Request<proto::GetKeyUsageRequest>,
    ) -> Result<Response<proto::GetKeyUsageResponse>, Status> {
        let usage = self.admin.key_usage().await?;
        let checks = self.admin.legacy_checks().await?;
        let now = chrono::Utc::now();
        Ok(Response::new(proto::GetKeyUsageResponse {
            keys: usage.iter().map(|u| convert::key_usage(u, now)).collect(),
            legacy_checks: checks.iter().map(convert::legacy_check).collect(),
        }))
    }

    async fn refresh_key_metadata(
        &self,
        _request: Request<proto::RefreshKeyMetadataRequest>,
    ) -> Result<Response<proto::RefreshKeyMetadataResponse>, Status> {
        let summary = self.admin.refresh().await?;
        Ok(Response::new(proto::RefreshKeyMetadataResponse {
            key_count: i32::try_from(summary.key_count).unwrap_or(i32::MAX),
            active_key_id: summary.active_key_id.unwrap_or_default(),
        }))
    }

    async fn self_test(
        &self,
        _request: Request<proto::SelfTestRequest>,
    ) -> Result<Response<proto::SelfTestResponse>, Status> {
        let report = self.admin.self_test().await?;
        Ok(Response::new(proto::SelfTestResponse {
            passed: report.passed(),
            keys: report
                .keys
                .iter()
                .map(|check| proto::KeySelfTest {
                    key_id: check.key.key_id.clone(),
                    provider: check.key.provider.as_str().to_owned(),
                    status: convert::key_status(check.key.status) as i32,
                    ok: check.problems().is_none(),
                    error: check.problems().unwrap_or_default(),
                })
                .collect(),
        }))
    }

    async fn start_rotation(
        &self,
        mut request: Request<proto::StartRotationRequest>,
    ) -> Result<Response<proto::RotationJob>, Status> {
        let caller = Caller::take(&mut request)?;
        let req = request.into_inner();
        let change = Change {
            rpc: "keyward.v1.Admin/StartRotation",
            key_id: Some(&req.target_key_id)
                .filter(|k| !k.is_empty())
                .map(|k| k.as_str()),
            detail: Some(format!("mode={} dry_run={}", req.mode, req.dry_run)),
        };
        let start = self.rotations.start(StartRotation {
            target: req.target_key_id.clone(),
            mode: convert::rotation_mode(req.mode),
            dry_run: req.dry_run,
            batch_size: req.batch_size,
            max_rows_per_second: req.max_rows_per_second,
            target_batch_ms: req.target_batch_ms,
            max_foreground_p99_ms: req.max_foreground_p99_ms,
            min_rows_per_second: req.min_rows_per_second,
            max_replication_lag_ms: req.max_replication_lag_ms,
        });
        let job = self.audited(&caller, change, start).await?;
        Ok(Response::new(self.job(&job)))
    }

    type WatchRotationStream = ProgressStream;

    async fn watch_rotation(
        &self,
        request: Request<proto::WatchRotationRequest>,
    ) -> Result<Response<Self::WatchRotationStream>, Status> {
        let stream = self.rotations.watch(&request.into_inner().job_id).await?;
        let admin = Arc::clone(&self.admin);
        let events = stream.map(move |item| {
            item.map(|progress| convert::rotation_progress(&progress, &admin.catalog_snapshot()))
                .map_err(Status::from)
        });
        Ok(Response::new(Box::pin(events)))
    }

    async fn get_rotation_job(
        &self,
        request: Request<proto::GetRotationJobRequest>,
    ) -> Result<Response<proto::RotationJob>, Status> {
        let job = self.rotations.get(&request.into_inner().job_id).await?;
        Ok(Response::new(self.job(&job)))
    }

    async fn list_rotation_jobs(
        &self,
        request: Request<proto::ListRotationJobsRequest>,
    ) -> Result<Response<proto::ListRotationJobsResponse>, Status> {
        let limit = match request.into_inner().limit {
            0 => 50,
            n => i64::from(n),
        };
        let jobs = self.rotations.list(limit).await?;
        Ok(Response::new(proto::ListRotationJobsResponse {
            jobs: jobs.iter().map(|j| self.job(j)).collect(),
        }))
    }

    async fn cancel_rotation(
        &self,
        mut request: Request<proto::CancelRotationRequest>,
    ) -> Result<Response<proto::RotationJob>, Status> {
        let caller = Caller::take(&mut request)?;
        let job_id = request.into_inner().job_id;
        let cancel = self.rotations.cancel(&job_id);
        self.change_job(
            &caller,
            "keyward.v1.Admin/CancelRotation",
            &job_id,
            String::new(),
            cancel,
        )
        .await
    }

    async fn requeue_rotation(
        &self,
        mut request: Request<proto::RequeueRotationRequest>,
    ) -> Result<Response<proto::RotationJob>, Status> {
        let caller = Caller::take(&mut request)?;
        let job_id = request.into_inner().job_id;
        let requeue = self.rotations.requeue(&job_id);
        self.change_job(
            &caller,
            "keyward.v1.Admin/RequeueRotation",
            &job_id,
            String::new(),
            requeue,
        )
        .await
    }

    async fn pause_rotation(
        &self,
        mut request: Request<proto::PauseRotationRequest>,
    ) -> Result<Response<proto::RotationJob>, Status> {
        let caller = Caller::take(&mut request)?;
        let job_id = request.into_inner().job_id;
        self.change_job(
            &caller,
            "keyward.v1.Admin/PauseRotation",
            &job_id,
            String::new(),
            self.rotations.set_paused(&job_id, true),
        )
        .await
    }

    async fn resume_rotation(
        &self,
        mut request: Request<proto::ResumeRotationRequest>,
    ) -> Result<Response<proto::RotationJob>, Status> {
        let caller = Caller::take(&mut request)?;
        let job_id = request.into_inner().job_id;
        self.change_job(
            &caller,
            "keyward.v1.Admin/ResumeRotation",
            &job_id,
            String::new(),
            self.rotations.set_paused(&job_id, false),
        )
        .await
    }

    async fn update_rotation(
        &self,
        mut request: Request<proto::UpdateRotationRequest>,
    ) -> Result<Response<proto::RotationJob>, Status> {
        let caller = Caller::take(&mut request)?;
        let req = request.into_inner();
        let retune = Retune {
            batch_size: req.batch_size,
            max_rows_per_second: req.max_rows_per_second,
            target_batch_ms: req.target_batch_ms,
            max_foreground_p99_ms: req.max_foreground_p99_ms,
            min_rows_per_second: req.min_rows_per_second,
            max_replication_lag_ms: req.max_replication_lag_ms,
        };
        let detail = format!(" {retune:?}");
        let tune = self.rotations.tune(&req.job_id, retune);
        self.change_job(
            &caller,
            "keyward.v1.Admin/UpdateRotation",
            &req.job_id,
            detail,
            tune,
        )
        .await
    }

    async fn prune_expired_scoped_tokens(
        &self,
        _request: Request<proto::PruneExpiredScopedTokensRequest>,
    ) -> Result<Response<proto::PruneExpiredScopedTokensResponse>, Status> {
        let removed = self.rotations.prune_scoped_tokens().await?;
        Ok(Response::new(proto::PruneExpiredScopedTokensResponse {
            removed: i64::try_from(removed).unwrap_or(i64::MAX),
        }))
    }

    async fn list_rotation_targets(
        &self,
        _request: Request<proto::ListRotationTargetsRequest>,
    ) -> Result<Response<proto::ListRotationTargetsResponse>, Status> {
        self.admin.targets().reload().await?;
        Ok(Response::new(self.targets()))
    }

    async fn add_rotation_target(
        &self,
        mut request: Request<proto::AddRotationTargetRequest>,
    ) -> Result<Response<proto::ListRotationTargetsResponse>, Status> {
        let caller = Caller::take(&mut request)?;
        let target = crate::service::targets::parse(&request.get_ref().definition_json)?;
        let detail = crate::rotation::definition::TargetDefinition::of(&target).to_json();
        let add = self.admin.targets().add(target);
        self.change_targets(&caller, "keyward.v1.Admin/AddRotationTarget", detail, add)
            .await
    }

    async fn remove_rotation_target(
        &self,
        mut request: Request<proto::RemoveRotationTargetRequest>,
    ) -> Result<Response<proto::ListRotationTargetsResponse>, Status> {
        let caller = Caller::take(&mut request)?;
        let req = request.into_inner();
        let detail = format!("table={} force={}", req.table, req.force);
        let remove = self.admin.targets().remove(&req.table, req.force);
        self.change_targets(
            &caller,
            "keyward.v1.Admin/RemoveRotationTarget",
            detail,
            remove,
        )
        .await
    }
}
