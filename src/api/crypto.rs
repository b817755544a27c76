//! `keyward.v1.Crypto` over the crypto service, with the caller's scope
//! checks (keys, encryption-context values) and the Decrypt audit events.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{
    auth::Caller,
    convert,
    observe::note_key_id,
    proto::{self, crypto_server::Crypto},
    status::{code_name, code_of, to_status},
};
use crate::{
    auth::{
        audit::{AuditEvent, AuditLog},
        AuthError, Principal,
    },
    crypto::context::EncryptionContext,
    error::Error,
    service::crypto::{Ciphertext, CryptoService},
};

const DECRYPT: &str = "keyward.v1.Crypto/Decrypt";
const BATCH_DECRYPT: &str = "keyward.v1.Crypto/BatchDecrypt";
const REWRAP: &str = "keyward.v1.Crypto/Rewrap";
const BATCH_REWRAP: &str = "keyward.v1.Crypto/BatchRewrap";

/// The keys (by key_id) a call used, recorded in its span once at the end:
/// a batch of 500 items under one key names it once, instead of formatting
/// and appending it to the span 500 times. A call under one key (every
/// unary call) allocates nothing beyond that key's name.
#[derive(Default)]
struct KeysUsed {
    first: Option<String>,
    more: Vec<String>,
}

impl KeysUsed {
    /// Distinct keys named in a span, at most (a batch may mix keys).
    const MAX: usize = 8;

    fn add(&mut self, key_id: &str) {
        match &self.first {
            None => self.first = Some(key_id.to_owned()),
            Some(first) if first == key_id => {}
            Some(_) => {
                if self.more.len() + 1 < Self::MAX && !self.more.iter().any(|k| k == key_id) {
                    self.more.push(key_id.to_owned());
                }
            }
        }
    }

    /// The names to record: the one key as it is, several joined by ",".
    fn names(&self) -> Option<std::borrow::Cow<'_, str>> {
        let first = self.first.as_deref()?;
        if self.more.is_empty() {
            return Some(first.into());
        }
        let all: Vec<&str> = std::iter::once(first)
            .chain(self.more.iter().map(String::as_str))
            .collect();
        Some(all.join(",").into())
    }

    fn record(&self) {
        if let Some(names) = self.names() {
            note_key_id(&names);
        }
    }
}

pub struct CryptoApi {
    service: Arc<CryptoService>,
    audit: Arc<AuditLog>,
}

impl CryptoApi {
    pub fn new(service: Arc<CryptoService>, audit: Arc<AuditLog>) -> Self {
        Self { service, audit }
    }

    async fn encrypt_one(
        &self,
        caller: &Caller,
        req: proto::EncryptRequest,
        keys: &mut KeysUsed,
    ) -> Result<proto::EncryptResponse, Error> {
        // An unknown form number (a newer client) gets both forms.
        let form = proto::EnvelopeForm::try_from(req.form).unwrap_or(proto::EnvelopeForm::Both);
        let context = convert::context(req.context, self.service.limits())?;
        let principal = &caller.principal;
        check_context(principal, &context)?;
        let sealed = self
            .service
            .encrypt_if(&req.plaintext, &context, |key| {
                principal.scope.allows_key(key)
            })
            .await?;
        keys.add(&sealed.key.key_id);
        convert::sealed_to_proto(sealed, form)
    }

    /// Decrypts one item and writes its audit event before the plaintext
    /// can leave; if the event cannot be written (fail-closed), the
    /// plaintext is dropped and the call fails.
    async fn decrypt_one(
        &self,
        caller: &Caller,
        rpc: &str,
        req: proto::DecryptRequest,
        keys: &mut KeysUsed,
    ) -> Result<proto::DecryptResponse, Error> {
        let mut context = None;
        let mut key_id = None;
        let result = async {
            let ctx = context.insert(convert::context(req.context, self.service.limits())?);
            let ciphertext = convert::ciphertext(req.ciphertext)?;
            let envelope = self.service.parse(ciphertext)?;
            key_id = Some(envelope.encryption_key_id.clone()).filter(|id| !id.is_empty());
            self.check_decrypt_scope(&caller.principal, &envelope.encryption_key_id, ctx)
                .await?;
            self.service
                .decrypt(Ciphertext::Envelope(envelope), ctx)
                .await
        }
        .await;
        let key_name = result
            .as_ref()
            .ok()
            .and_then(|o| o.key.as_ref().map(|k| k.key_id.clone()));
        self.record_use(
            caller,
            rpc,
            key_name,
            key_id,
            context.as_ref(),
            &result,
            keys,
        )?;
        let opened = result?;
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

    /// Rewraps one item and writes its audit event, as Decrypt does: the
    /// source key's scope and the legacy rule are Decrypt's, and the
    /// caller must also be allowed the active key the result is under.
    async fn rewrap_one(
        &self,
        caller: &Caller,
        rpc: &str,
        req: proto::RewrapRequest,
        keys: &mut KeysUsed,
    ) -> Result<proto::RewrapResponse, Error> {
        let form = proto::EnvelopeForm::try_from(req.form).unwrap_or(proto::EnvelopeForm::Both);
        let mut context = None;
        let mut key_id = None;
        let result = async {
            let ctx = context.insert(convert::context(req.context, self.service.limits())?);
            let ciphertext = convert::rewrap_ciphertext(req.ciphertext)?;
            let envelope = self.service.parse(ciphertext)?;
            key_id = Some(envelope.encryption_key_id.clone()).filter(|id| !id.is_empty());
            self.check_decrypt_scope(&caller.principal, &envelope.encryption_key_id, ctx)
                .await?;
            let principal = &caller.principal;
            self.service
                .rewrap_to_active(envelope, ctx, |key| principal.scope.allows_key(key))
                .await
        }
        .await;
        let key_name = result.as_ref().ok().map(|r| r.sealed.key.key_id.clone());
        self.record_use(
            caller,
            rpc,
            key_name,
            key_id,
            context.as_ref(),
            &result,
            keys,
        )?;
        let rewrapped = result?;
        let sealed = convert::sealed_to_proto(rewrapped.sealed, form)?;
        Ok(proto::RewrapResponse {
            envelope: sealed.envelope,
            blob: sealed.blob,
            key_id: sealed.key_id,
            rewrapped: rewrapped.rewrapped,
        })
    }

    /// Notes the key a Decrypt or Rewrap used and writes its audit event
    /// (fail-closed: an error here fails the call). The key is named by
    /// `key_id`, as Encrypt's span and events name it (`used`, when the
    /// call got that far); a record this server does not know keeps the
    /// envelope's id (`named`).
    #[allow(clippy::too_many_arguments)]
    fn record_use<T>(
        &self,
        caller: &Caller,
        rpc: &str,
        used: Option<String>,
        named: Option<String>,
        context: Option<&EncryptionContext>,
        result: &Result<T, Error>,
        keys: &mut KeysUsed,
    ) -> Result<(), Error> {
        let key_name = used.or_else(|| {
            named.map(|id| {
                self.service
                    .catalog()
                    .get(&id)
                    .map_or(id, |key| key.key_id.clone())
            })
        });
        if let Some(key) = &key_name {
            keys.add(key);
        }
        self.audit.record(&AuditEvent {
            principal: &caller.principal.name,
            rpc,
            key_id: key_name.as_deref(),
            context,
            result: match result {
                Ok(_) => "ok",
                Err(err) => code_name(code_of(err)),
            },
            peer: caller.peer_string(),
            detail: None,
        })?;
        Ok(())
    }

    /// A scoped principal may decrypt only under its keys and contexts. The
    /// refusal is the same whether or not the named key exists. A legacy
    /// ciphertext (no key record) is bound to no context, so the context the
    /// caller sends proves nothing about it: only a principal without limits
    /// or with an explicit legacy grant opens one.
    async fn check_decrypt_scope(
        &self,
        principal: &Principal,
        encryption_key_id: &str,
        context: &EncryptionContext,
    ) -> Result<(), Error> {
        check_context(principal, context)?;
        if encryption_key_id.is_empty() {
            return if principal.scope.allows_legacy() {
                Ok(())
            } else {
                Err(AuthError::Denied(format!(
                    "principal {} is limited to keys or encryption contexts and may not open legacy ciphertexts, which are bound to neither: grant it legacy access (keyward token create --legacy) until rotation has moved its rows",
                    principal.name
                ))
                .into())
            };
        }
        if principal.scope.keys.is_empty() {
            return Ok(());
        }
        let allowed = self
            .service
            .lookup_key(encryption_key_id)
            .await?
            .is_some_and(|key| principal.scope.allows_key(&key));
        if allowed {
            Ok(())
        } else {
            Err(AuthError::Denied(format!(
                "principal {} may not decrypt under key {:?}",
                principal.name, encryption_key_id
            ))
            .into())
        }
    }
}

fn check_context(principal: &Principal, context: &EncryptionContext) -> Result<(), Error> {
    if principal.scope.allows_context(context) {
        Ok(())
    } else {
        Err(AuthError::Denied(format!(
            "principal {} may only use encryption contexts with {}",
            principal.name,
            principal
                .scope
                .context
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(", ")
        ))
        .into())
    }
}

#[tonic::async_trait]
impl Crypto for CryptoApi {
    async fn encrypt(
        &self,
        mut request: Request<proto::EncryptRequest>,
    ) -> Result<Response<proto::EncryptResponse>, Status> {
        let caller = Caller::take(&mut request)?;
        let mut keys = KeysUsed::default();
        let result = self
            .encrypt_one(&caller, request.into_inner(), &mut keys)
            .await;
        keys.record();
        Ok(Response::new(result?))
    }

    async fn decrypt(
        &self,
        mut request: Request<proto::DecryptRequest>,
    ) -> Result<Response<proto::DecryptResponse>, Status> {
        let caller = Caller::take(&mut request)?;
        let mut keys = KeysUsed::default();
        let result = self
            .decrypt_one(&caller, DECRYPT, request.into_inner(), &mut keys)
            .await;
        keys.record();
        Ok(Response::new(result?))
    }

    async fn batch_encrypt(
        &self,
        mut request: Request<proto::BatchEncryptRequest>,
    ) -> Result<Response<proto::BatchEncryptResponse>, Status> {
        use proto::batch_encrypt_result::Result as Item;
        let caller = Caller::take(&mut request)?;
        let items = request.into_inner().items;
        self.service.check_batch(items.len())?;
        let mut keys = KeysUsed::default();
        let mut results = Vec::with_capacity(items.len());
        for item in items {
            let result = match batch_item(self.encrypt_one(&caller, item, &mut keys).await) {
                Ok(result) => result,
                Err(status) => {
                    keys.record();
                    return Err(status);
                }
            };
            results.push(proto::BatchEncryptResult {
                result: Some(result.map_or_else(Item::Error, Item::Ok)),
            });
        }
        keys.record();
        Ok(Response::new(proto::BatchEncryptResponse { results }))
    }

    async fn batch_decrypt(
        &self,
        mut request: Request<proto::BatchDecryptRequest>,
    ) -> Result<Response<proto::BatchDecryptResponse>, Status> {
        use proto::batch_decrypt_result::Result as Item;
        let caller = Caller::take(&mut request)?;
        let items = request.into_inner().items;
        self.service.check_batch(items.len())?;
        let mut keys = KeysUsed::default();
        let mut results = Vec::with_capacity(items.len());
        for item in items {
            let result = match batch_item(
                self.decrypt_one(&caller, BATCH_DECRYPT, item, &mut keys)
                    .await,
            ) {
                Ok(result) => result,
                Err(status) => {
                    keys.record();
                    return Err(status);
                }
            };
            results.push(proto::BatchDecryptResult {
                result: Some(result.map_or_else(Item::Error, Item::Ok)),
            });
        }
        keys.record();
        Ok(Response::new(proto::BatchDecryptResponse { results }))
    }

    async fn rewrap(
        &self,
        mut request: Request<proto::RewrapRequest>,
    ) -> Result<Response<proto::RewrapResponse>, Status> {
        let caller = Caller::take(&mut request)?;
        let mut keys = KeysUsed::default();
        let result = self
            .rewrap_one(&caller, REWRAP, request.into_inner(), &mut keys)
            .await;
        keys.record();
        Ok(Response::new(result?))
    }

    async fn batch_rewrap(
        &self,
        mut request: Request<proto::BatchRewrapRequest>,
    ) -> Result<Response<proto::BatchRewrapResponse>, Status> {
        use proto::batch_rewrap_result::Result as Item;
        let caller = Caller::take(&mut request)?;
        let items = request.into_inner().items;
        self.service.check_batch(items.len())?;
        let mut keys = KeysUsed::default();
        let mut results = Vec::with_capacity(items.len());
        for item in items {
            let result = match batch_item(
                self.rewrap_one(&caller, BATCH_REWRAP, item, &mut keys)
                    .await,
            ) {
                Ok(result) => result,
                Err(status) => {
                    keys.record();
                    return Err(status);
                }
            };
            results.push(proto::BatchRewrapResult {
                result: Some(result.map_or_else(Item::Error, Item::Ok)),
            });
        }
        keys.record();
        Ok(Response::new(proto::BatchRewrapResponse { results }))
    }
}

/// One batch item's outcome: its answer, or the error it would have failed
/// with by itself; a fail-closed audit failure instead fails the whole
/// batch (nothing leaves unaudited).
fn batch_item<T>(result: Result<T, Error>) -> Result<Result<T, proto::ItemError>, Status> {
    match result {
        Ok(ok) => Ok(Ok(ok)),
        Err(err @ Error::Audit(_)) => Err(to_status(&err)),
        Err(err) => Ok(Err(convert::item_error(&to_status(&err)))),
    }
}

#[cfg(test)]
mod tests {
    use super::KeysUsed;

    #[test]
    fn keys_used_names_each_key_once_up_to_the_limit() {
        let mut keys = KeysUsed::default();
        assert_eq!(keys.names(), None);
        for _ in 0..3 {
            keys.add("primary");
        }
        assert_eq!(keys.names().as_deref(), Some("primary"));
        keys.add("next");
        keys.add("primary");
        keys.add("next");
        assert_eq!(keys.names().as_deref(), Some("primary,next"));
        for i in 0..20 {
            keys.add(&format!("k{i}"));
        }
        let names = keys.names().unwrap_or_default();
        assert_eq!(names.split(',').count(), KeysUsed::MAX, "{names}");
    }
}
