//! `keyward token create|list|revoke`: the bearer tokens callers
//! authenticate with (only their SHA-256 is stored).

use std::process::ExitCode;

use clap::Subcommand;

use super::{
    audit::{audited, operator_audit_if},
    ConfigError, GlobalArgs,
};
use crate::auth::{Role, Scope};

#[derive(Debug, Subcommand)]
pub(super) enum TokenCommand {
    /// Create a token; prints it once (only its SHA-256 is stored).
    Create {
        /// Unique name; audit events record it as the principal.
        #[arg(long)]
        name: String,
        /// encrypt, decrypt or admin; repeat for several.
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
    match cmd {
        TokenCommand::Create {
            name,
            roles,
            keys,
            context,
            legacy,
        } => {
            if name.trim().is_empty() || name.len() > 128 {
                return Err(ConfigError("--name must be 1 to 128 characters".into()).into());
            }
            let roles = roles
                .iter()
                .map(|r| {
                    Role::parse(r).ok_or_else(|| {
                        ConfigError(format!("unknown role {r:?}: use encrypt, decrypt or admin"))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let context = context
                .iter()
                .map(|pair| {
                    pair.split_once('=')
                        .filter(|(k, _)| !k.is_empty())
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                        .ok_or_else(|| ConfigError(format!("--context {pair:?}: use KEY=VALUE")))
                })
                .collect::<Result<_, _>>()?;
            let scope = Scope {
                keys,
                context,
                legacy,
            };
            let secret = crate::auth::token::generate();
            let mut detail = format!("name={name} roles={}", role_list(&roles));
            if scope.legacy {
                detail.push_str(" legacy");
            }
            let hash = crate::auth::token::hash(&secret);
            let insert = store.insert_token(&name, &hash, &roles, &scope);
            let record = audited(&audit, "cli/token create", None, detail, insert).await?;
            eprintln!(
                "token {} created with roles {}; it is shown once, store it now:",
                record.name,
                role_list(&record.roles)
            );
            println!("{}", secret.as_str());
        }
        TokenCommand::List => {
            for t in store.list_tokens().await? {
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
            let revoke = store.revoke_token(&name);
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
