//! `keyward.v1.Admin` over the key administration service.

use std::{pin::Pin, sync::Arc};

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::{
    convert,
    proto::{self, admin_server::Admin},
};
use crate::service::{
    admin::{CreateKey, KeyAdmin},
    rotation::{Rotations, StartRotation},
};

pub struct AdminApi {
    admin: Arc<KeyAdmin>,
    rotations: Arc<Rotations>,
}

impl AdminApi {
    pub fn new(admin: Arc<KeyAdmin>, rotations: Arc<Rotations>) -> Self {
        Self { admin, rotations }
    }

    fn job(&self, job: &crate::rotation::RotationJob) -> proto::RotationJob {
        convert::rotation_job(job, &self.admin.catalog_snapshot())
    }
}

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
        request: Request<proto::CreateKeyRequest>,
    ) -> Result<Response<proto::Key>, Status> {
        let req = request.into_inner();
        let record = self
            .admin
            .create_key(CreateKey {
                key_id: req.key_id,
                kms_key_arn: req.kms_key_arn,
                alias: Some(req.alias),
                provider: req.provider,
                activate: req.activate,
            })
            .await?;
        Ok(Response::new(convert::key(&record)))
    }

    async fn activate_key(
        &self,
        request: Request<proto::ActivateKeyRequest>,
    ) -> Result<Response<proto::ActivateKeyResponse>, Status> {
        let activation = self
            .admin
            .activate_key(&request.into_inner().key_id)
            .await?;
        Ok(Response::new(proto::ActivateKeyResponse {
            activated: Some(convert::key(&activation.activated)),
            previous: activation.previous.as_ref().map(convert::key),
        }))
    }

    async fn retire_key(
        &self,
        request: Request<proto::RetireKeyRequest>,
    ) -> Result<Response<proto::RetireKeyResponse>, Status> {
        let req = request.into_inner();
        let retirement = self.admin.retire_key(&req.key_id, req.force).await?;
        Ok(Response::new(proto::RetireKeyResponse {
            key: Some(convert::key(&retirement.key)),
            referencing_rows: retirement.referencing_rows,
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
                    ok: check.error.is_none(),
                    error: check.error.clone().unwrap_or_default(),
                })
                .collect(),
        }))
    }

    async fn start_rotation(
        &self,
        request: Request<proto::StartRotationRequest>,
    ) -> Result<Response<proto::RotationJob>, Status> {
        let req = request.into_inner();
        let job = self
            .rotations
            .start(StartRotation {
                target: req.target_key_id,
                mode: convert::rotation_mode(req.mode),
                dry_run: req.dry_run,
                batch_size: req.batch_size,
                max_rows_per_second: req.max_rows_per_second,
            })
            .await?;
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
        request: Request<proto::CancelRotationRequest>,
    ) -> Result<Response<proto::RotationJob>, Status> {
        let job = self.rotations.cancel(&request.into_inner().job_id).await?;
        Ok(Response::new(self.job(&job)))
    }

    async fn requeue_rotation(
        &self,
        request: Request<proto::RequeueRotationRequest>,
    ) -> Result<Response<proto::RotationJob>, Status> {
        let job = self.rotations.requeue(&request.into_inner().job_id).await?;
        Ok(Response::new(self.job(&job)))
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
}
