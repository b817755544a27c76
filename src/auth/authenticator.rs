//! Turns credentials into a [`Principal`]: bearer tokens (looked up by
//! hash in an in-memory copy of `keyward_api_tokens`) and client certificates
//! (mapped by subject common name). Also the per-principal rate limit.

use std::{collections::HashMap, num::NonZeroU32, sync::Arc};

use arc_swap::ArcSwap;
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
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
    /// May open legacy ciphertexts although `keys` or `context` limit it
    /// (legacy ciphertexts are bound to neither).
    #[serde(default)]
    pub legacy: bool,
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

/// Most database lookups of unknown tokens per second, so a flood of bad
/// tokens cannot turn into a flood of queries.
const MISS_LOOKUPS_PER_SECOND: u32 = 50;

pub struct Authenticator {
    store: Store,
    required: bool,
    /// The one principal of an unauthenticated server (no allocation per call).
    anonymous: Arc<Principal>,
    tokens: ArcSwap<HashMap<String, Arc<Principal>>>,
    certs: HashMap<String, Arc<Principal>>,
    reload_lock: Mutex<()>,
    miss_lookups: DefaultDirectRateLimiter,
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
                        legacy: c.legacy,
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
            anonymous: Principal::anonymous(),
            tokens: ArcSwap::default(),
            certs,
            reload_lock: Mutex::new(()),
            miss_lookups: RateLimiter::direct(Quota::per_second(
                NonZeroU32::new(MISS_LOOKUPS_PER_SECOND).unwrap_or(NonZeroU32::MIN),
            )),
            limiter,
        })
    }

    /// Whether callers must authenticate.
    pub fn required(&self) -> bool {
        self.required
    }

    /// Reloads the live tokens from `keyward_api_tokens` (revocations take
    /// effect here).
    pub async fn reload(&self) -> Result<(), StoreError> {
        let _one_at_a_time = self.reload_lock.lock().await;
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
            return Ok(Arc::clone(&self.anonymous));
        }
        match cert_common_names {
            [] => {}
            [cn] => {
                if let Some(principal) = self.certs.get(cn) {
                    return Ok(Arc::clone(principal));
                }
            }
            // Which of several names would be "the" identity is a guess an
            // attacker can steer (`CN=nobody, CN=ops-admin`): refuse.
            several => {
                return Err(AuthError::Denied(format!(
                    "the client certificate's subject has {} common names; keyward maps a certificate by exactly one",
                    several.len()
                )))
            }
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
        // look it up, within a global budget of lookups.
        const INVALID: AuthError = AuthError::Unauthenticated("invalid or revoked token");
        if self.miss_lookups.check().is_err() {
            return Err(INVALID);
        }
        match self.store.find_live_token(&hash).await {
            Ok(Some(record)) => {
                let principal = Arc::new(Principal {
                    name: record.name,
                    kind: PrincipalKind::Token,
                    roles: record.roles,
                    scope: record.scope,
                });
                self.tokens.rcu(|current| {
                    let mut next = HashMap::clone(current);
                    next.insert(hash.clone(), Arc::clone(&principal));
                    next
                });
                Ok(principal)
            }
            Ok(None) => Err(INVALID),
            Err(err) => {
                tracing::warn!(error = %err, "looking up an api token failed");
                Err(INVALID)
            }
        }
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
