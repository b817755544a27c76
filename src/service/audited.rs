//! The one audited path for changes to keys, rotations and tokens. The gRPC
//! Admin API and the operator commands both run their changes through
//! [`audited`], with who made them as a parameter ([`Actor`]): a
//! `requested` event first (fail-closed: no event, no change), then the
//! outcome (best effort: the change is done by then). A forced retirement
//! adds one event naming what it overrode ([`record_forced_retirement`]).

use std::future::Future;

use super::admin::Retirement;
use crate::{
    auth::audit::{AuditEvent, AuditLog},
    error::{Error, Result},
};

/// Who makes a change, as the audit log records it.
#[derive(Debug, Clone)]
pub struct Actor {
    /// The principal's name (`cli:$USER` for the operator commands).
    pub principal: String,
    /// The caller's address, when the change came over the network.
    pub peer: Option<String>,
    /// How a failed change's outcome is named: the API's gRPC code names
    /// (`PERMISSION_DENIED`, …), the CLI's `error`.
    pub failure: fn(&Error) -> &'static str,
}

/// What an audited change is about.
#[derive(Debug, Clone)]
pub struct Change<'a> {
    /// The RPC or command (`keyward.v1.Admin/RetireKey`, `cli/keys retire`).
    pub rpc: &'static str,
    pub key_id: Option<&'a str>,
    /// What else identifies it (`force=true`, a job id).
    pub detail: Option<String>,
}

impl Actor {
    fn event<'a>(&'a self, change: &Change<'a>) -> AuditEvent<'a> {
        AuditEvent {
            principal: &self.principal,
            rpc: change.rpc,
            key_id: change.key_id,
            peer: self.peer.clone(),
            detail: change.detail.clone(),
            ..AuditEvent::default()
        }
    }
}

/// Runs `run` as an audited change of `actor`'s.
pub async fn audited<T>(
    log: &AuditLog,
    actor: &Actor,
    change: Change<'_>,
    run: impl Future<Output = Result<T>>,
) -> Result<T> {
    let outcome = |result: &Result<T>| match result {
        Ok(_) => "ok",
        Err(err) => (actor.failure)(err),
    };
    log.audit_change(actor.event(&change), outcome, run)
        .await
        .map_err(Error::from)?
}

/// After a forced retirement, one event saying exactly what it overrode
/// (nothing when nothing was).
pub fn record_forced_retirement(
    log: &AuditLog,
    actor: &Actor,
    rpc: &'static str,
    retirement: &Retirement,
) {
    if retirement.overridden.is_empty() {
        return;
    }
    let change = Change {
        rpc,
        key_id: Some(&retirement.key.key_id),
        detail: Some(format!("overridden: {}", retirement.overridden.join("; "))),
    };
    let event = AuditEvent {
        result: "forced",
        ..actor.event(&change)
    };
    if let Err(err) = log.record(&event) {
        tracing::warn!(error = %err, "audit event of a forced retirement lost");
    }
}
