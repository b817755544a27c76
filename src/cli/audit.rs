//! Audit events for the operator commands that change keys, rotations or
//! tokens.
//!
//! The gRPC API audits every such change (`api::admin`). The same changes
//! made from the command line (the runbook's `keys retire --force`, a
//! `token create`) go to the same log (`--audit-log`), with `cli:` and the
//! operating-system user as the principal, so the log holds every key
//! change whichever way it was made. Both go through one path,
//! `service::audited`: a `requested` event first, and no change when it
//! cannot be written (fail-closed); then the outcome.
//!
//! Where the events go when no `--audit-log` is configured: not into the
//! operator's terminal around the command's own output, and not nowhere,
//! but appended to the operator's state directory
//! (`$XDG_STATE_HOME/keyward/audit.log`, else
//! `~/.local/state/keyward/audit.log`), with one warning naming the file
//! and how to share the server's log instead. Without a home directory
//! (a container's job) they go to standard error, as `-` says.

use std::{future::Future, path::PathBuf};

use super::GlobalArgs;
use crate::{
    auth::audit::{AuditLog, AuditSettings, AuditSink},
    service::{
        admin::Retirement,
        audited::{self, Actor, Change},
    },
};

/// The name of the account the process runs as (a cron job or a
/// container often has no `$USER`): its user id, looked up in
/// `/etc/passwd`; `uid:N` when no entry names it.
fn os_user() -> String {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(uid) = std::fs::metadata("/proc/self").map(|m| m.uid()) else {
        return "unknown".to_owned();
    };
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    account_of(&passwd, uid).unwrap_or_else(|| format!("uid:{uid}"))
}

/// The account name `passwd` (the `/etc/passwd` format) gives user id `uid`.
fn account_of(passwd: &str, uid: u32) -> Option<String> {
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let id = fields.nth(1)?;
        (id.parse() == Ok(uid) && !name.is_empty()).then(|| name.to_owned())
    })
}

/// The audit log as the operator commands write it.
pub struct OperatorAudit {
    log: AuditLog,
    actor: Actor,
}

impl OperatorAudit {
    /// Opens the sink; the principal is `cli:` and the user running the
    /// command (`$USER`, else `$LOGNAME`, else the account of the process's
    /// user id, as `/etc/passwd` names it, else `uid:N`).
    pub fn open(settings: &AuditSettings) -> anyhow::Result<Self> {
        let log = AuditLog::open(settings).map_err(|e| {
            anyhow::anyhow!("cannot open the audit log ({e}); the command was not run")
        })?;
        let user = ["USER", "LOGNAME"]
            .iter()
            .find_map(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
            .unwrap_or_else(os_user);
        Ok(Self {
            log,
            actor: Actor {
                principal: format!("cli:{user}"),
                peer: None,
                failure: |_| "error",
            },
        })
    }

    /// Runs `change` between a `requested` event and its outcome (`ok` or
    /// `error`). When `requested` cannot be written and the log is
    /// fail-closed, `change` does not run.
    pub async fn audited<T>(
        &self,
        command: &'static str,
        key_id: Option<&str>,
        detail: Option<String>,
        run: impl Future<Output = crate::error::Result<T>>,
    ) -> anyhow::Result<T> {
        let change = Change {
            rpc: command,
            key_id,
            detail,
        };
        Ok(audited::audited(&self.log, &self.actor, change, run).await?)
    }

    /// After `keys retire --force`: what it overrode.
    pub fn record_forced_retirement(&self, retirement: &Retirement) {
        audited::record_forced_retirement(&self.log, &self.actor, "cli/keys retire", retirement);
    }
}

/// The audit log of the operator commands (`-` is standard error here).
pub(super) fn operator_audit(global: &GlobalArgs) -> anyhow::Result<OperatorAudit> {
    OperatorAudit::open(&global.audit.settings(AuditSink::Stderr, unconfigured_sink))
}

/// The sink of an operator command run without `--audit-log`.
fn unconfigured_sink() -> AuditSink {
    let env = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    match default_audit_file(env("XDG_STATE_HOME"), env("HOME")) {
        Some(path) => {
            tracing::warn!(
                "no --audit-log configured: this change is audited to {} \
                 (point --audit-log or KEYWARD_AUDIT_LOG at the server's audit file to keep one log)",
                path.display()
            );
            AuditSink::File(path)
        }
        None => AuditSink::Stderr,
    }
}

/// `$XDG_STATE_HOME/keyward/audit.log`, else `$HOME/.local/state/…`, as
/// the XDG base-directory specification places a program's state; the
/// directory is created (700) if missing. `None` without either variable
/// or when the directory cannot be made.
fn default_audit_file(
    state_home: Option<std::ffi::OsString>,
    home: Option<std::ffi::OsString>,
) -> Option<PathBuf> {
    let state = match (state_home, home) {
        (Some(state), _) => PathBuf::from(state),
        (None, Some(home)) => PathBuf::from(home).join(".local/state"),
        (None, None) => return None,
    };
    let dir = state.join("keyward");
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(&dir).ok()?;
    Some(dir.join("audit.log"))
}

/// [`operator_audit`] for a command that `changes` something; a read-only
/// command neither opens nor needs the log.
pub(super) fn operator_audit_if(
    global: &GlobalArgs,
    changes: bool,
) -> anyhow::Result<Option<OperatorAudit>> {
    changes.then(|| operator_audit(global)).transpose()
}

/// Runs a change through the operator audit log; every command that
/// changes something opens one, so `None` only means nothing to audit.
pub(super) async fn audited<T>(
    audit: &Option<OperatorAudit>,
    command: &'static str,
    key_id: Option<&str>,
    detail: String,
    change: impl std::future::Future<Output = crate::error::Result<T>>,
) -> anyhow::Result<T> {
    match audit {
        Some(audit) => audit.audited(command, key_id, Some(detail), change).await,
        None => change.await.map_err(Into::into),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_account_is_found_by_its_user_id() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\n\
                      # comment\n\
                      deploy:x:1001:1001::/home/deploy:/bin/sh\n";
        assert_eq!(account_of(passwd, 1001).as_deref(), Some("deploy"));
        assert_eq!(account_of(passwd, 0).as_deref(), Some("root"));
        assert_eq!(account_of(passwd, 42), None);
        assert!(!os_user().is_empty());
    }

    #[test]
    fn the_unconfigured_audit_file_follows_the_xdg_state_directory() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let home = dir.path().join("home");
        assert_eq!(
            default_audit_file(Some(state.clone().into()), Some(home.clone().into())),
            Some(state.join("keyward/audit.log"))
        );
        assert_eq!(
            default_audit_file(None, Some(home.clone().into())),
            Some(home.join(".local/state/keyward/audit.log"))
        );
        assert!(home.join(".local/state/keyward").is_dir());
        assert_eq!(default_audit_file(None, None), None);
    }
}
