//! Turns credentials into a [`Principal`]: bearer tokens (looked up by
//! hash in an in-memory copy of `keyward_api_tokens`) and client certificates
//! (mapped by subject common name). Also the per-principal rate limit.

use std::{
    collections::HashMap,
    num::NonZeroU32,
    sync::Arc,
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio::sync::Mutex;

use super::{token, AuthError, Principal, PrincipalKind, Role, Scope};
use crate::store::{Store, StoreError};

/// A client-certificate identity: certificates whose subject CN is
/// `common_name` act as principal `name`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertPrincipal {
    pub common_name: String,
    /// The principal's name in audit events; default the common name.
    #[serde(default)]
    pub name: Option<String>,
    pub roles: Vec<String>,
    /// Key ids the principal may use; empty: any.
    #[serde(default)]
    pub keys: Vec<String>,
    /// Context pairs every request must carry.
    #[serde(default)]
    pub context: std::collections::BTreeMap<String, String>,
}

/// How the server authenticates.
#[derive(Debug, Clone, Default)]
pub struct AuthSettings {
    /// `false`: every caller is [`Principal::anonymous`] (`serve --dev` on
    /// loopback, or `--insecure-no-auth`).
    pub required: bool,
    /// Client-certificate identities (mutual TLS).
    pub cert_principals: Vec<CertPrincipal>,
    /// Requests per second per principal (`None`: unlimited), and burst.
    pub rate_limit: Option<(NonZeroU32, NonZeroU32)>,
}

/// Least time between two token reloads triggered by unknown tokens, so a
/// flood of bad tokens cannot turn into a flood of queries.
const MISS_RELOAD_INTERVAL: Duration = Duration::from_secs(1);

pub struct Authenticator {
    store: Store,
    required: bool,
    tokens: ArcSwap<HashMap<String, Arc<Principal>>>,
    certs: HashMap<String, Arc<Principal>>,
    last_reload: Mutex<Option<Instant>>,
    limiter: Option<(DefaultKeyedRateLimiter<String>, u32)>,
}

impl Authenticator {
    /// Builds the authenticator; fails on a certificate mapping with an
    /// unknown role.
    pub fn new(store: Store, settings: &AuthSettings) -> Result<Self, String> {
        let certs = settings
            .cert_principals
            .iter()
            .map(|c| {
                let roles = parse_roles(&c.roles).map_err(|r| {
                    format!(
                        "certificate principal {}: unknown role {r:?}",
                        c.common_name
                    )
                })?;
                let principal = Principal {
                    name: c.name.clone().unwrap_or_else(|| c.common_name.clone()),
                    kind: PrincipalKind::Certificate,
                    roles,
                    scope: Scope {
                        keys: c.keys.clone(),
                        context: c.context.clone(),
                    },
                };
                Ok((c.common_name.clone(), Arc::new(principal)))
            })
            .collect::<Result<_, String>>()?;
        let limiter = settings.rate_limit.map(|(per_second, burst)| {
            (
                RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst)),
                per_second.get(),
            )
        });
        Ok(Self {
            store,
            required: settings.required,
            tokens: ArcSwap::default(),
            certs,
            last_reload: Mutex::new(None),
            limiter,
        })
    }

    /// Whether callers must authenticate.
    pub fn required(&self) -> bool {
        self.required
    }

    /// Reloads the live tokens from `keyward_api_tokens`.
    pub async fn reload(&self) -> Result<(), StoreError> {
        let mut last = self.last_reload.lock().await;
        self.reload_locked(&mut last).await
    }

    async fn reload_locked(&self, last: &mut Option<Instant>) -> Result<(), StoreError> {
        let map = self
            .store
            .list_tokens()
            .await?
            .into_iter()
            .filter(|t| t.revoked_at.is_none())
            .map(|t| {
                let principal = Principal {
                    name: t.name,
                    kind: PrincipalKind::Token,
                    roles: t.roles,
                    scope: t.scope,
                };
                (t.token_hash, Arc::new(principal))
            })
            .collect();
        self.tokens.store(Arc::new(map));
        *last = Some(Instant::now());
        Ok(())
    }

    /// The principal behind a request's credentials: the client
    /// certificate's common name if it maps to one, else the bearer token
    /// (`authorization` metadata, `Bearer <token>`).
    pub async fn authenticate(
        &self,
        authorization: Option<&str>,
        cert_common_names: &[String],
    ) -> Result<Arc<Principal>, AuthError> {
        if !self.required {
            return Ok(Principal::anonymous());
        }
        if let Some(principal) = cert_common_names.iter().find_map(|cn| self.certs.get(cn)) {
            return Ok(Arc::clone(principal));
        }
        let Some(header) = authorization else {
            return Err(AuthError::Unauthenticated(
                "no credentials: send `authorization: Bearer <token>` (keyward token create) or a client certificate",
            ));
        };
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .map(str::trim)
            .unwrap_or_default();
        if !token::looks_valid(token) {
            return Err(AuthError::Unauthenticated(
                "malformed credentials: expected `authorization: Bearer kw_…`",
            ));
        }
        let hash = token::hash(token);
        if let Some(principal) = self.tokens.load().get(&hash) {
            return Ok(Arc::clone(principal));
        }
        // Perhaps created since the last reload (keyward token create):
        // reload, at most once per interval.
        {
            let mut last = self.last_reload.lock().await;
            let stale = last.is_none_or(|at| at.elapsed() >= MISS_RELOAD_INTERVAL);
            if stale {
                if let Err(err) = self.reload_locked(&mut last).await {
                    tracing::warn!(error = %err, "reloading api tokens failed");
                }
            }
        }
        self.tokens
            .load()
            .get(&hash)
            .cloned()
            .ok_or(AuthError::Unauthenticated("invalid or revoked token"))
    }

    /// Checks that `principal` may make a call needing `role`, and spends
    /// one request of its rate limit.
    pub fn authorize(&self, principal: &Principal, role: Role) -> Result<(), AuthError> {
        if !principal.has(role) {
            return Err(AuthError::Denied(format!(
                "principal {} lacks the {role} role for this call",
                principal.name
            )));
        }
        if let Some((limiter, per_second)) = &self.limiter {
            if limiter.check_key(&principal.name).is_err() {
                return Err(AuthError::RateLimited {
                    principal: principal.name.clone(),
                    per_second: *per_second,
                });
            }
        }
        Ok(())
    }
}

fn parse_roles(names: &[String]) -> Result<Vec<Role>, String> {
    names
        .iter()
        .map(|n| Role::parse(n).ok_or_else(|| n.clone()))
        .collect()
}
