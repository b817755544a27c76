//! `keyward.v1.Crypto` over the crypto service.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{
    convert,
    proto::{self, crypto_server::Crypto},
    status::to_status,
};
use crate::{error::Error, service::crypto::CryptoService};

pub struct CryptoApi {
    service: Arc<CryptoService>,
}

impl CryptoApi {
    pub fn new(service: Arc<CryptoService>) -> Self {
        Self { service }
    }

    async fn encrypt_one(
        &self,
        req: proto::EncryptRequest,
    ) -> Result<proto::EncryptResponse, Error> {
        // An unknown form number (a newer client) gets both forms.
        let form = proto::EnvelopeForm::try_from(req.form).unwrap_or(proto::EnvelopeForm::Both);
        let context = convert::context(req.context)?;
        let sealed = self.service.encrypt(&req.plaintext, &context).await?;
        convert::sealed_to_proto(sealed, form)
    }

    async fn decrypt_one(
        &self,
        req: proto::DecryptRequest,
    ) -> Result<proto::DecryptResponse, Error> {
        let context = convert::context(req.context)?;
        let ciphertext = convert::ciphertext(req.ciphertext)?;
        let opened = self.service.decrypt(ciphertext, &context).await?;
        Ok(proto::DecryptResponse {
            encryption_key_id: opened
                .key
                .as_ref()
                .map(|k| k.id.clone())
                .unwrap_or_default(),
            legacy: opened.key.is_none(),
            plaintext: opened.plaintext.into_vec().into(),
        })
    }
}

#[tonic::async_trait]
impl Crypto for CryptoApi {
    async fn encrypt(
        &self,
        request: Request<proto::EncryptRequest>,
    ) -> Result<Response<proto::EncryptResponse>, Status> {
        Ok(Response::new(self.encrypt_one(request.into_inner()).await?))
    }

    async fn decrypt(
        &self,
        request: Request<proto::DecryptRequest>,
    ) -> Result<Response<proto::DecryptResponse>, Status> {
        Ok(Response::new(self.decrypt_one(request.into_inner()).await?))
    }

    async fn batch_encrypt(
        &self,
        request: Request<proto::BatchEncryptRequest>,
    ) -> Result<Response<proto::BatchEncryptResponse>, Status> {
        let items = request.into_inner().items;
        self.service.check_batch(items.len())?;
        let mut results = Vec::with_capacity(items.len());
        for item in items {
            let result = match self.encrypt_one(item).await {
                Ok(ok) => proto::batch_encrypt_result::Result::Ok(ok),
                Err(err) => proto::batch_encrypt_result::Result::Error(convert::item_error(
                    &to_status(&err),
                )),
            };
            results.push(proto::BatchEncryptResult {
                result: Some(result),
            });
        }
        Ok(Response::new(proto::BatchEncryptResponse { results }))
    }

    async fn batch_decrypt(
        &self,
        request: Request<proto::BatchDecryptRequest>,
    ) -> Result<Response<proto::BatchDecryptResponse>, Status> {
        let items = request.into_inner().items;
        self.service.check_batch(items.len())?;
        let mut results = Vec::with_capacity(items.len());
        for item in items {
            let result = match self.decrypt_one(item).await {
                Ok(ok) => proto::batch_decrypt_result::Result::Ok(ok),
                Err(err) => proto::batch_decrypt_result::Result::Error(convert::item_error(
                    &to_status(&err),
                )),
            };
            results.push(proto::BatchDecryptResult {
                result: Some(result),
            });
        }
        Ok(Response::new(proto::BatchDecryptResponse { results }))
    }
}
