//! How to reach a keyward server: [`ClientBuilder`] (URL, token, TLS,
//! deadlines) and the interceptor that adds the bearer token to each call.

use std::time::Duration;

use tonic::{
    metadata::{Ascii, MetadataValue},
    service::interceptor::InterceptedService,
    transport::{Channel, Endpoint},
    Request, Status,
};

use crate::{Client, Error};

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// The generated stubs' transport: the channel, with the bearer token added
/// to each call.
pub type Authed = InterceptedService<Channel, Bearer>;

/// How to reach a keyward server.
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    url: String,
    token: Option<String>,
    timeout: Option<Duration>,
    connect_timeout: Duration,
    #[cfg(feature = "tls")]
    tls: Option<tonic::transport::ClientTlsConfig>,
}

impl ClientBuilder {
    pub(crate) fn new(url: String) -> Self {
        Self {
            url,
            token: None,
            timeout: None,
            connect_timeout: Duration::from_secs(5),
            #[cfg(feature = "tls")]
            tls: None,
        }
    }

    /// A bearer token (`keyward token create`).
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// A deadline for each unary call (not for WatchRotation).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Trust this PEM CA for the server's certificate (an `https://` URL).
    #[cfg(feature = "tls")]
    pub fn ca_certificate(mut self, pem: impl AsRef<[u8]>) -> Self {
        let tls = self.tls.take().unwrap_or_default();
        self.tls = Some(tls.ca_certificate(tonic::transport::Certificate::from_pem(pem)));
        self
    }

    /// Present this client certificate and key (mutual TLS).
    #[cfg(feature = "tls")]
    pub fn client_identity(
        mut self,
        cert_pem: impl AsRef<[u8]>,
        key_pem: impl AsRef<[u8]>,
    ) -> Self {
        let tls = self.tls.take().unwrap_or_default();
        self.tls = Some(tls.identity(tonic::transport::Identity::from_pem(cert_pem, key_pem)));
        self
    }

    /// The name to check the server's certificate against, when it is not
    /// the URL's host.
    #[cfg(feature = "tls")]
    pub fn tls_domain(mut self, name: impl Into<String>) -> Self {
        let tls = self.tls.take().unwrap_or_default();
        self.tls = Some(tls.domain_name(name));
        self
    }

    fn endpoint(&self) -> Result<Endpoint, Error> {
        let mut endpoint = Endpoint::from_shared(self.url.clone())
            .map_err(|e| Error::Config(format!("url {:?}: {e}", self.url)))?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true);
        if let Some(timeout) = self.timeout {
            endpoint = endpoint.timeout(timeout);
        }
        #[cfg(feature = "tls")]
        if let Some(tls) = &self.tls {
            endpoint = endpoint.tls_config(tls.clone())?;
        }
        Ok(endpoint)
    }

    fn bearer(&self) -> Result<Bearer, Error> {
        self.token
            .as_deref()
            .map(|t| {
                format!("Bearer {t}")
                    .parse::<MetadataValue<Ascii>>()
                    .map_err(|_| Error::Config("the token is not printable ASCII".into()))
            })
            .transpose()
            .map(Bearer)
    }

    /// Connects now; fails if the server cannot be reached.
    pub async fn connect(self) -> Result<Client, Error> {
        let bearer = self.bearer()?;
        let channel = self.endpoint()?.connect().await?;
        Ok(Client::new(channel, bearer))
    }

    /// Connects on first use.
    pub fn connect_lazy(self) -> Result<Client, Error> {
        let bearer = self.bearer()?;
        Ok(Client::new(self.endpoint()?.connect_lazy(), bearer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_must_be_ascii() {
        let built = Client::builder("http://127.0.0.1:1")
            .token("bad\ntoken")
            .connect_lazy();
        assert!(matches!(built, Err(Error::Config(_))));
    }
}
