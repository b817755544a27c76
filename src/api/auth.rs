//! Authentication and the per-RPC role check, as one tower layer in front of
//! every service, so no keyward RPC — present or future — is reachable
//! without it. Health and reflection pass through. A refused call gets
//! UNAUTHENTICATED, PERMISSION_DENIED or RESOURCE_EXHAUSTED and one audit
//! event; an admitted call carries its [`Caller`] in the request extensions
//! for the handlers' finer scope checks and audit events.

use std::{net::SocketAddr, sync::Arc};

#[cfg(feature = "tls")]
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tower::{Layer, Service};

use super::status::{code_name, to_status};
use crate::{
    auth::{
        audit::{AuditEvent, AuditLog},
        Authenticator, Principal, Role,
    },
    error::Error,
};

/// Who is calling, put in the request extensions by [`AuthLayer`].
#[derive(Debug, Clone)]
pub struct Caller {
    pub principal: Arc<Principal>,
    pub peer: Option<SocketAddr>,
}

impl Caller {
    /// Takes the caller of an admitted request out of its extensions
    /// (taken, not cloned: the principal's reference count is shared by all
    /// of its calls on every core); UNAUTHENTICATED if the request did not
    /// pass the layer (never the case on keyward's server).
    pub fn take<T>(request: &mut tonic::Request<T>) -> Result<Caller, tonic::Status> {
        request
            .extensions_mut()
            .remove::<Caller>()
            .ok_or_else(|| tonic::Status::unauthenticated("no authenticated caller"))
    }

    pub fn peer_string(&self) -> Option<String> {
        self.peer.map(|p| p.to_string())
    }
}

#[derive(Clone)]
pub struct AuthLayer {
    auth: Arc<Authenticator>,
    audit: Arc<AuditLog>,
    too_large: http::HeaderValue,
}

impl AuthLayer {
    /// `max_request_bytes` is the server's `--max-request-bytes`, which the
    /// answer to a larger request states.
    pub fn new(auth: Arc<Authenticator>, audit: Arc<AuditLog>, max_request_bytes: usize) -> Self {
        let message = format!(
            "request message is larger than the {max_request_bytes} bytes the server accepts \
             (--max-request-bytes): send smaller requests or split the batch"
        );
        Self {
            auth,
            audit,
            // Digits, letters, spaces and punctuation: a valid header value.
            too_large: http::HeaderValue::from_str(&message)
                .unwrap_or_else(|_| http::HeaderValue::from_static("request message too large")),
        }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            auth: Arc::clone(&self.auth),
            audit: Arc::clone(&self.audit),
            too_large: self.too_large.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    auth: Arc<Authenticator>,
    audit: Arc<AuditLog>,
    too_large: http::HeaderValue,
}

impl<S, B> Service<http::Request<B>> for AuthService<S>
where
    S: super::HttpService<B>,
    B: Send + 'static,
{
    super::middleware_head!();

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let mut inner = super::take_ready(&mut self.inner);
        let (auth, audit) = (Arc::clone(&self.auth), Arc::clone(&self.audit));
        let too_large = self.too_large.clone();
        Box::pin(async move {
            let Some(role) = Role::required_for(request.uri().path()) else {
                return inner.call(request).await;
            };
            let (peer, common_names) = connection_identity(&request);
            let authorization = request
                .headers()
                .get(http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            // The principal moves on to the handler: its reference count is
            // shared by all of its calls on every core, so it is not cloned.
            let admitted = match auth
                .authenticate(authorization, &common_names, peer.map(|p| p.ip()))
                .await
            {
                Ok(principal) => match auth.authorize(&principal, role) {
                    Ok(()) => Ok(principal),
                    Err(err) => Err((Some(principal), err)),
                },
                Err(err) => Err((None, err)),
            };
            match admitted {
                Ok(principal) => {
                    super::observe::note_principal(&principal.name);
                    request.extensions_mut().insert(Caller { principal, peer });
                    let mut response = inner.call(request).await?;
                    too_large_is_resource_exhausted(&mut response, too_large);
                    Ok(response)
                }
                Err((principal, err)) => {
                    let status = to_status(&Error::Auth(err));
                    let name = principal.as_ref().map(|p| p.name.as_str());
                    if let Some(name) = name {
                        super::observe::note_principal(name);
                    }
                    audit.record_refusal(
                        &AuditEvent {
                            principal: name.unwrap_or("unauthenticated"),
                            rpc: request.uri().path().trim_start_matches('/'),
                            result: code_name(status.code()),
                            peer: peer.map(|p| p.to_string()),
                            ..AuditEvent::default()
                        },
                        peer.map(|p| p.ip()),
                    );
                    Ok(status.into_http())
                }
            }
        })
    }
}

/// tonic answers a request message over `--max-request-bytes` with
/// OUT_OF_RANGE before any handler runs; gRPC's convention (and keyward's
/// documented contract) is RESOURCE_EXHAUSTED. keyward itself never returns
/// OUT_OF_RANGE, so the code alone identifies the case.
fn too_large_is_resource_exhausted(
    response: &mut http::Response<tonic::body::Body>,
    message: http::HeaderValue,
) {
    let headers = response.headers_mut();
    if headers.get("grpc-status").map(|v| v.as_bytes()) == Some(b"11") {
        headers.insert("grpc-status", http::HeaderValue::from_static("8"));
        headers.insert("grpc-message", message);
    }
}

/// The peer address and the common names of a client certificate, if the
/// connection presented one.
fn connection_identity<B>(request: &http::Request<B>) -> (Option<SocketAddr>, Vec<String>) {
    let peer = crate::idle::peer_of(request);
    #[cfg(feature = "tls")]
    if let Some(tls) = request.extensions().get::<TlsConnectInfo<TcpConnectInfo>>() {
        let names = tls
            .peer_certs()
            .and_then(|certs| certs.first().map(|leaf| common_names(leaf.as_ref())))
            .unwrap_or_default();
        return (peer, names);
    }
    (peer, Vec::new())
}

#[cfg(feature = "tls")]
/// The subject common names of a DER certificate (rustls has already
/// verified it against the client CA).
fn common_names(der: &[u8]) -> Vec<String> {
    match x509_parser::parse_x509_certificate(der) {
        Ok((_, cert)) => cert
            .subject()
            .iter_common_name()
            .filter_map(|cn| cn.as_str().ok().map(str::to_owned))
            .collect(),
        Err(_) => Vec::new(),
    }
}
