//! `keyward.v1.Admin` over the key administration service.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{
    convert,
    proto::{self, admin_server::Admin},
};
use crate::service::admin::{CreateKey, KeyAdmin};

pub struct AdminApi {
    admin: Arc<KeyAdmin>,
}

impl AdminApi {
    pub fn new(admin: Arc<KeyAdmin>) -> Self {
        Self { admin }
    }
}

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
}
