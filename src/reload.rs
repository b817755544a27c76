//! What a running server reads again without a restart (`serve` does it on
//! SIGHUP): the audit file is reopened by its path (after logrotate renamed
//! it), the TLS certificate, key and client CA are read again for new
//! connections, and the key catalog and api tokens are reloaded from the
//! database. Each part stands alone: one that fails keeps what it had, is
//! logged, and does not stop the others. Nothing else changes: flags,
//! configuration file and environment are read at start only.

use std::sync::Arc;

use crate::{
    auth::{audit::AuditLog, Authenticator},
    service::admin::KeyAdmin,
};

/// A handle on a server's reloadable parts ([`crate::app::Application::reloader`]).
#[derive(Clone)]
pub struct Reloader {
    pub(crate) audit: Arc<AuditLog>,
    pub(crate) auth: Arc<Authenticator>,
    pub(crate) admin: Arc<KeyAdmin>,
    #[cfg(feature = "tls")]
    pub(crate) tls: Option<Arc<crate::tls::TlsFiles>>,
}

/// What one reload did: the parts reloaded, and those that failed with why.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reloaded {
    pub done: Vec<&'static str>,
    pub failed: Vec<(&'static str, String)>,
}

impl Reloaded {
    fn note<E: std::fmt::Display>(&mut self, part: &'static str, result: Result<bool, E>) {
        match result {
            Ok(true) => self.done.push(part),
            Ok(false) => {}
            Err(err) => {
                tracing::error!(part, error = %err, "reload failed; keeping what was loaded");
                self.failed.push((part, err.to_string()));
            }
        }
    }
}

impl Reloader {
    /// Reloads every part this server has (see the module documentation).
    pub async fn reload(&self) -> Reloaded {
        let mut reloaded = Reloaded::default();
        reloaded.note("audit log", self.audit.reopen());
        #[cfg(feature = "tls")]
        if let Some(tls) = &self.tls {
            reloaded.note("tls", tls.reload().map(|()| true));
        }
        reloaded.note("key catalog", self.admin.refresh().await.map(|_| true));
        reloaded.note("api tokens", self.auth.reload().await.map(|()| true));
        tracing::info!(done = ?reloaded.done, failed = reloaded.failed.len(), "reloaded");
        reloaded
    }
}
