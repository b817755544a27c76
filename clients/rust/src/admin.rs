//! The Admin service: the key catalog, replicas, self-test, rotation jobs
//! and targets, scoped-token pruning. Each RPC has a method named after it;
//! requests with many optional fields take the generated message (build it
//! with `..Default::default()`).

use futures::{Stream, StreamExt};

use crate::{proto, Client, Error};

impl Client {
    /// Queues a rotation job (admin role).
    pub async fn start_rotation(
        &self,
        request: proto::StartRotationRequest,
    ) -> Result<proto::RotationJob, Error> {
        Ok(self
            .admin
            .clone()
            .start_rotation(request)
            .await?
            .into_inner())
    }

    /// One job as it stands.
    pub async fn get_rotation_job(&self, job_id: &str) -> Result<proto::RotationJob, Error> {
        let request = proto::GetRotationJobRequest {
            job_id: job_id.to_owned(),
        };
        Ok(self
            .admin
            .clone()
            .get_rotation_job(request)
            .await?
            .into_inner())
    }

    /// [`Client::get_rotation_job`], under its earlier name.
    pub async fn rotation_job(&self, job_id: &str) -> Result<proto::RotationJob, Error> {
        self.get_rotation_job(job_id).await
    }

    /// The job's progress: its state at once, then an event per change (or
    /// every second); the stream ends after the terminal event.
    pub async fn watch_rotation(
        &self,
        job_id: &str,
    ) -> Result<impl Stream<Item = Result<proto::RotationProgress, Error>> + Send + 'static, Error>
    {
        let request = proto::WatchRotationRequest {
            job_id: job_id.to_owned(),
        };
        let stream = self
            .admin
            .clone()
            .watch_rotation(request)
            .await?
            .into_inner();
        Ok(stream.map(|event| event.map_err(Error::from)))
    }

    /// Every key record, newest first.
    pub async fn list_keys(&self) -> Result<Vec<proto::Key>, Error> {
        let request = proto::ListKeysRequest {};
        Ok(self.admin().list_keys(request).await?.into_inner().keys)
    }

    /// Registers a key record (`pending`, or `active` with `activate`).
    pub async fn create_key(&self, request: proto::CreateKeyRequest) -> Result<proto::Key, Error> {
        Ok(self.admin().create_key(request).await?.into_inner())
    }

    /// Makes a key active (`staged`: once every live replica proves it can
    /// decrypt under it); the previous active key becomes `rotating`.
    pub async fn activate_key(
        &self,
        request: proto::ActivateKeyRequest,
    ) -> Result<proto::ActivateKeyResponse, Error> {
        Ok(self.admin().activate_key(request).await?.into_inner())
    }

    /// Retires a rotating key (`dry_run`: only the plan).
    pub async fn retire_key(
        &self,
        request: proto::RetireKeyRequest,
    ) -> Result<proto::RetireKeyResponse, Error> {
        Ok(self.admin().retire_key(request).await?.into_inner())
    }

    /// Every keyward process that heartbeats into the database.
    pub async fn list_replicas(&self) -> Result<Vec<proto::Replica>, Error> {
        let request = proto::ListReplicasRequest {};
        Ok(self
            .admin()
            .list_replicas(request)
            .await?
            .into_inner()
            .replicas)
    }

    /// Re-encryption debt: per key, the rows of each target still on it.
    pub async fn get_key_usage(&self) -> Result<proto::GetKeyUsageResponse, Error> {
        let request = proto::GetKeyUsageRequest {};
        Ok(self.admin().get_key_usage(request).await?.into_inner())
    }

    /// Reloads the server's in-memory key catalog from the database.
    pub async fn refresh_key_metadata(&self) -> Result<proto::RefreshKeyMetadataResponse, Error> {
        let request = proto::RefreshKeyMetadataRequest {};
        Ok(self
            .admin()
            .refresh_key_metadata(request)
            .await?
            .into_inner())
    }

    /// Round-trips a probe through every non-retired key's KMS.
    pub async fn self_test(&self) -> Result<proto::SelfTestResponse, Error> {
        let request = proto::SelfTestRequest {};
        Ok(self.admin().self_test(request).await?.into_inner())
    }

    /// Jobs, newest first; `limit` 0: the server's default.
    pub async fn list_rotation_jobs(&self, limit: i32) -> Result<Vec<proto::RotationJob>, Error> {
        let request = proto::ListRotationJobsRequest { limit };
        Ok(self
            .admin()
            .list_rotation_jobs(request)
            .await?
            .into_inner()
            .jobs)
    }

    /// Cancels a job: a pending one at once, a running one between batches.
    pub async fn cancel_rotation(&self, job_id: &str) -> Result<proto::RotationJob, Error> {
        let request = proto::CancelRotationRequest {
            job_id: job_id.to_owned(),
        };
        Ok(self.admin().cancel_rotation(request).await?.into_inner())
    }

    /// Puts a failed or cancelled job back in the queue.
    pub async fn requeue_rotation(&self, job_id: &str) -> Result<proto::RotationJob, Error> {
        let request = proto::RequeueRotationRequest {
            job_id: job_id.to_owned(),
        };
        Ok(self.admin().requeue_rotation(request).await?.into_inner())
    }

    /// Pauses a pending or running job: it claims nothing and keeps its
    /// counts.
    pub async fn pause_rotation(&self, job_id: &str) -> Result<proto::RotationJob, Error> {
        let request = proto::PauseRotationRequest {
            job_id: job_id.to_owned(),
        };
        Ok(self.admin().pause_rotation(request).await?.into_inner())
    }

    /// Resumes a paused job where it stopped.
    pub async fn resume_rotation(&self, job_id: &str) -> Result<proto::RotationJob, Error> {
        let request = proto::ResumeRotationRequest {
            job_id: job_id.to_owned(),
        };
        Ok(self.admin().resume_rotation(request).await?.into_inner())
    }

    /// Re-tunes a pending or running job from its next batch on (the
    /// fields left `None` stay as they are).
    pub async fn update_rotation(
        &self,
        request: proto::UpdateRotationRequest,
    ) -> Result<proto::RotationJob, Error> {
        Ok(self.admin().update_rotation(request).await?.into_inner())
    }

    /// Removes expired or used connection-scoped tokens; returns how many.
    pub async fn prune_expired_scoped_tokens(&self) -> Result<i64, Error> {
        let request = proto::PruneExpiredScopedTokensRequest {};
        let response = self.admin().prune_expired_scoped_tokens(request).await?;
        Ok(response.into_inner().removed)
    }

    /// The rotation targets every process follows, in the order rotation
    /// walks them.
    pub async fn list_rotation_targets(&self) -> Result<Vec<proto::RotationTarget>, Error> {
        let request = proto::ListRotationTargetsRequest {};
        let response = self.admin().list_rotation_targets(request).await?;
        Ok(response.into_inner().targets)
    }

    /// Lists a table (its definition, as a `--rotation-targets` entry
    /// spells it, in JSON); returns the targets after the change.
    pub async fn add_rotation_target(
        &self,
        definition_json: &str,
    ) -> Result<Vec<proto::RotationTarget>, Error> {
        let request = proto::AddRotationTargetRequest {
            definition_json: definition_json.to_owned(),
        };
        let response = self.admin().add_rotation_target(request).await?;
        Ok(response.into_inner().targets)
    }

    /// Stops listing a table (`force`: even while it holds envelopes);
    /// returns the targets after the change.
    pub async fn remove_rotation_target(
        &self,
        table: &str,
        force: bool,
    ) -> Result<Vec<proto::RotationTarget>, Error> {
        let request = proto::RemoveRotationTargetRequest {
            table: table.to_owned(),
            force,
        };
        let response = self.admin().remove_rotation_target(request).await?;
        Ok(response.into_inner().targets)
    }
}
