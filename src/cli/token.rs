//! `keyward token create|list|revoke`: the bearer tokens callers
//! authenticate with (only their SHA-256 is stored).

use std::process::ExitCode;

use clap::Subcommand;

use super::{
    audit::{audited, operator_audit_if},
    ConfigError, GlobalArgs,
};
use crate::{
    auth::Role,
    service::tokens::{self, TokenRequest, Tokens},
};

#[derive(Debug, Subcommand)]
pub(super) enum TokenCommand {
    /// Create a token; prints it once (only its SHA-256 is stored).
    Create {
        /// Unique name; audit events record it as the principal.
        #[arg(long)]
        name: String,
        /// encrypt, decrypt, rewrap or admin; repeat for several.
        #[arg(long = "role", required = true)]
        roles: Vec<String>,
        /// Limit to these keys (key_id or id); repeat for several; default any.
        #[arg(long = "key")]
        keys: Vec<String>,
        /// Require this encryption-context pair (KEY=VALUE) on every request;
        /// repeat for several.
        #[arg(long = "context")]
        context: Vec<String>,
        /// Let a token limited by --key or --context open legacy
        /// ciphertexts, which are bound to no key and no context (an
        /// application reading its rows until rotation has moved them).
        /// A token without limits opens them anyway.
        #[arg(long)]
        legacy: bool,
    },
    /// List tokens (names, roles, scopes; never the tokens).
    List,
    /// Revoke a token by name (servers stop accepting it within a catalog
    /// poll, --catalog-poll-ms; at once on PostgreSQL with LISTEN; at the
    /// latest --catalog-refresh-secs later).
    Revoke { name: String },
}

pub(super) async fn token(global: &GlobalArgs, cmd: TokenCommand) -> anyhow::Result<ExitCode> {
    let changes = !matches!(cmd, TokenCommand::List);
    let audit = operator_audit_if(global, changes)?;
    let store = crate::store::Store::connect(&global.database_url).await?;
    store.migrate().await?;
    let tokens = Tokens::new(store.clone());
    match cmd {
        TokenCommand::Create {
            name,
            roles,
            keys,
            context,
            legacy,
        } => {
            let token = tokens::validate(TokenRequest {
                name,
                roles,
                keys,
                context,
                legacy,
            })
            .map_err(|err| ConfigError(err.to_string()))?;
            let mut detail = format!("name={} roles={}", token.name, role_list(&token.roles));
            if token.scope.legacy {
                detail.push_str(" legacy");
            }
            let issued = audited(
                &audit,
                "cli/token create",
                None,
                detail,
                tokens.create(&token),
            )
            .await?;
            eprintln!(
                "token {} created with roles {}; it is shown once, store it now:",
                issued.record.name,
                role_list(&issued.record.roles)
            );
            println!("{}", issued.secret.as_str());
        }
        TokenCommand::List => {
            for t in tokens.list().await? {
                let state = match t.revoked_at {
                    Some(at) => format!("revoked {}", at.format("%Y-%m-%d %H:%M")),
                    None => "live".to_owned(),
                };
                let keys = if t.scope.keys.is_empty() {
                    "any key".to_owned()
                } else {
                    t.scope.keys.join(",")
                };
                let context = t
                    .scope
                    .context
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",");
                let legacy = if t.scope.allows_legacy() {
                    "legacy"
                } else {
                    "no legacy"
                };
                println!(
                    "{:<24} {:<22} {:<20} {:<24} {legacy:<10} {state}",
                    t.name,
                    role_list(&t.roles),
                    keys,
                    if context.is_empty() {
                        "any context"
                    } else {
                        &context
                    }
                );
            }
        }
        TokenCommand::Revoke { name } => {
            let revoke = tokens.revoke(&name);
            if !audited(
                &audit,
                "cli/token revoke",
                None,
                format!("name={name}"),
                revoke,
            )
            .await?
            {
                eprintln!("no live token named {name:?}");
                return Ok(ExitCode::FAILURE);
            }
            println!("token {name} revoked");
        }
    }
    store.close().await;
    Ok(ExitCode::SUCCESS)
}

pub(super) fn role_list(roles: &[Role]) -> String {
    roles
        .iter()
        .map(|r| r.as_str())
        .collect::<Vec<_>>()
        .join(",")
}
