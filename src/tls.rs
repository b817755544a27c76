//! TLS for the gRPC server, reloadable without a restart.
//!
//! [`TlsFiles`] builds the rustls configuration from the certificate, key
//! and client-CA files (`--tls-cert`, `--tls-key`, `--tls-client-ca`) and
//! holds it so that [`TlsFiles::reload`] (SIGHUP) swaps in what the files
//! hold now: connections accepted afterwards use the new certificate and
//! CA, open ones keep the session they have. A reload whose files do not
//! make a valid configuration (a certificate renewed without its key yet)
//! changes nothing.
//!
//! [`TlsFiles::secure`] runs the handshakes of accepted connections, many
//! at once and each under a timeout, in front of tonic, which then serves
//! each connection as already secured; tonic's `TlsConnectInfo` still
//! carries the client certificate to the authentication layer.

use std::{
    io,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use arc_swap::ArcSwap;
use futures::{Stream, StreamExt as _};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::{
    rustls::{
        crypto::aws_lc_rs,
        pki_types::{pem::PemObject as _, CertificateDer, PrivateKeyDer},
        server::WebPkiClientVerifier,
        RootCertStore, ServerConfig,
    },
    server::TlsStream,
    TlsAcceptor,
};

/// Handshakes in progress at once; further connections wait in the
/// listen backlog until one ends (each ends within its timeout).
const MAX_HANDSHAKES: usize = 1024;

/// The files do not make a TLS configuration. Names the file, never its
/// contents.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: io::Error,
    },
    #[error("{path}: {what}")]
    File {
        path: std::path::PathBuf,
        what: String,
    },
    #[error("the certificate and key do not make a TLS configuration: {0}")]
    Config(#[from] tokio_rustls::rustls::Error),
}

/// Where the server's certificate chain, key and (optional) client CA are.
#[derive(Debug, Clone)]
pub struct TlsPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// The server's TLS configuration and the files it is read from.
pub struct TlsFiles {
    paths: TlsPaths,
    current: ArcSwap<ServerConfig>,
}

impl TlsFiles {
    /// Reads the files.
    pub fn load(paths: TlsPaths) -> Result<Self, TlsError> {
        Ok(Self {
            current: ArcSwap::from_pointee(server_config(&paths)?),
            paths,
        })
    }

    /// Reads the files again; on success new connections use them, on
    /// failure the configuration in use stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        self.current.store(Arc::new(server_config(&self.paths)?));
        Ok(())
    }

    /// The connections of `incoming` once their handshake is done (under
    /// the configuration current when each was accepted). A connection
    /// whose handshake fails or takes longer than `timeout` is closed;
    /// accept errors pass through.
    pub fn secure<S, IO>(
        self: Arc<Self>,
        incoming: S,
        timeout: Duration,
    ) -> impl Stream<Item = io::Result<TlsStream<IO>>>
    where
        S: Stream<Item = io::Result<IO>>,
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        incoming
            .map(move |accepted| {
                let acceptor = TlsAcceptor::from(self.current.load_full());
                async move {
                    let io = match accepted {
                        Ok(io) => io,
                        Err(err) => return Some(Err(err)),
                    };
                    match tokio::time::timeout(timeout, acceptor.accept(io)).await {
                        Ok(Ok(secured)) => Some(Ok(secured)),
                        Ok(Err(err)) => {
                            tracing::debug!(error = %err, "TLS handshake failed");
                            None
                        }
                        Err(_) => {
                            tracing::debug!(?timeout, "TLS handshake timed out");
                            None
                        }
                    }
                }
            })
            .buffer_unordered(MAX_HANDSHAKES)
            .filter_map(std::future::ready)
    }
}

/// The rustls configuration: certificate and key, and with a client CA,
/// optional client certificates (callers may also use bearer tokens).
/// HTTP/2 is offered by ALPN; HTTP/1.1 callers (gRPC-Web) send none.
fn server_config(tls: &TlsPaths) -> Result<ServerConfig, TlsError> {
    let provider = Arc::new(aws_lc_rs::default_provider());
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()?;
    let builder = match &tls.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            let (added, _) = roots.add_parsable_certificates(certificates(path)?);
            if added == 0 {
                return Err(file_error(path, "no usable CA certificate"));
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|err| file_error(path, &err.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let key = PrivateKeyDer::from_pem_slice(&read(&tls.key)?)
        .map_err(|_| file_error(&tls.key, "no PEM private key"))?;
    let mut config = builder.with_single_cert(certificates(&tls.cert)?, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Every certificate in a PEM file; at least one.
fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(&read(path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| file_error(path, &format!("not a PEM certificate file: {err}")))?;
    if certs.is_empty() {
        return Err(file_error(path, "no PEM certificate"));
    }
    Ok(certs)
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn file_error(path: &Path, what: &str) -> TlsError {
    TlsError::File {
        path: path.to_owned(),
        what: what.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path, name: &str) -> TlsPaths {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let settings = TlsPaths {
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
            client_ca: None,
        };
        std::fs::write(&settings.cert, cert.pem()).unwrap();
        std::fs::write(&settings.key, key.serialize_pem()).unwrap();
        settings
    }

    #[test]
    fn a_reload_that_fails_keeps_the_configuration_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let settings = write_pair(dir.path(), "server");
        let files = TlsFiles::load(settings.clone()).unwrap();
        let before = files.current.load_full();

        // A renewed certificate whose key has not been written yet.
        let renewed = write_pair(dir.path(), "renewed");
        std::fs::copy(&renewed.cert, &settings.cert).unwrap();
        let err = files.reload().unwrap_err();
        assert!(matches!(err, TlsError::Config(_)), "{err}");
        assert!(Arc::ptr_eq(&before, &files.current.load_full()));

        std::fs::copy(&renewed.key, &settings.key).unwrap();
        files.reload().unwrap();
        assert!(!Arc::ptr_eq(&before, &files.current.load_full()));
    }

    #[test]
    fn errors_name_the_file_and_never_its_contents() {
        let dir = tempfile::tempdir().unwrap();
        let settings = write_pair(dir.path(), "server");
        let secret = std::fs::read_to_string(&settings.key).unwrap();
        std::fs::write(&settings.key, secret.replace("PRIVATE KEY", "SOMETHING")).unwrap();
        let err = TlsFiles::load(settings.clone()).err().unwrap().to_string();
        assert!(
            err.contains("server.key") && err.contains("no PEM private key"),
            "{err}"
        );
        let body = secret.lines().nth(1).unwrap();
        assert!(!err.contains(body), "{err}");

        std::fs::write(&settings.cert, "").unwrap();
        let missing_ca = TlsPaths {
            client_ca: Some(dir.path().join("nowhere.pem")),
            ..settings
        };
        let err = TlsFiles::load(missing_ca).err().unwrap().to_string();
        assert!(
            err.contains("cannot read") && err.contains("nowhere.pem"),
            "{err}"
        );
    }
}
