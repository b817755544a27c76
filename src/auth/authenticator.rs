//! Turns credentials into a [`Principal`]: bearer tokens (by hash, in the
//! in-memory set of live tokens, `auth::live_tokens`) and client
//! certificates (mapped by subject common name). Also the per-principal
//! rate limit.

use std::{collections::HashMap, net::IpAddr, num::NonZeroU32, sync::Arc};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use super::{
    live_tokens::{LiveTokens, TokenStats},
    token, AuthError, Principal, PrincipalKind, Role, Scope,
};
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

pub struct Authenticator {
    store: Store,
    required: bool,
    /// The one principal of an unauthenticated server (no allocation per call).
    anonymous: Arc<Principal>,
    tokens: LiveTokens,
    certs: HashMap<String, Arc<Principal>>,
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
            tokens: LiveTokens::default(),
            certs,
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
        self.tokens.reload(&self.store).await
    }

    /// What happened to tokens this process did not hold (for the metrics).
    pub fn token_stats(&self) -> Arc<TokenStats> {
        Arc::clone(self.tokens.stats())
    }

    /// The principal behind a request's credentials: the client
    /// certificate's common name if it maps to one, else the bearer token
    /// (`authorization` metadata, `Bearer <token>`). `peer` is the
    /// caller's address, which budgets its unknown tokens.
    pub async fn authenticate(
        &self,
        authorization: Option<&str>,
        cert_common_names: &[String],
        peer: Option<IpAddr>,
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
            if let [cn] = cert_common_names {
                return Err(AuthError::UnmappedCertificate(cn.clone()));
            }
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
        if let Some(principal) = self.tokens.get(&hash) {
            return Ok(principal);
        }
        // Made up, or created a moment ago (keyward token create).
        self.tokens
            .find_new(&self.store, &hash, peer)
            .await
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
