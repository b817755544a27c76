//! Who may call what: principals, roles and scopes, the authenticator that
//! turns a bearer token or a client certificate into a principal, and the
//! audit log.
//!
//! Authentication and the per-RPC role check happen in one place for every
//! RPC (`api::auth`, a tower layer in front of all services); the finer
//! scope checks (which keys, which encryption-context values) need the
//! request's contents and happen in the crypto handlers. Health and
//! reflection stay open.

pub mod audit;
mod authenticator;
mod live_tokens;
pub mod refusals;
pub mod token;

use std::{collections::BTreeMap, fmt, sync::Arc};

pub use authenticator::{AuthSettings, Authenticator, CertPrincipal};
pub use live_tokens::TokenStats;

use crate::{crypto::context::EncryptionContext, keys::KeyRecord};

/// What a principal may do. Each keyward RPC needs exactly one role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// `Crypto/Encrypt`, `Crypto/BatchEncrypt`.
    Encrypt,
    /// `Crypto/Decrypt`, `Crypto/BatchDecrypt`.
    Decrypt,
    /// `Crypto/Rewrap`, `Crypto/BatchRewrap`: moves ciphertexts to the
    /// active key without ever seeing their plaintext (a batch migration
    /// service), so it does not grant `decrypt`.
    Rewrap,
    /// Every `Admin` RPC.
    Admin,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Encrypt, Role::Decrypt, Role::Rewrap, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Encrypt => "encrypt",
            Role::Decrypt => "decrypt",
            Role::Rewrap => "rewrap",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Self::ALL.into_iter().find(|r| r.as_str() == s.trim())
    }

    /// The role a gRPC method (`/package.Service/Method`) needs, `None` for
    /// the open services (health, reflection). Unknown keyward methods need
    /// `admin`: deny by default.
    pub fn required_for(path: &str) -> Option<Role> {
        let Some((service, method)) = path.trim_start_matches('/').split_once('/') else {
            return Some(Role::Admin);
        };
        match service {
            "keyward.v1.Crypto" => Some(match method {
                "Encrypt" | "BatchEncrypt" => Role::Encrypt,
                "Decrypt" | "BatchDecrypt" => Role::Decrypt,
                "Rewrap" | "BatchRewrap" => Role::Rewrap,
                _ => Role::Admin,
            }),
            "grpc.health.v1.Health"
            | "grpc.reflection.v1.ServerReflection"
            | "grpc.reflection.v1alpha.ServerReflection" => None,
            // keyward.v1.Admin, and anything not listed above.
            _ => Some(Role::Admin),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `pad`, so a width in the format string (the CLI's tables) applies.
        f.pad(self.as_str())
    }
}

/// How a principal proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrincipalKind {
    /// A bearer token from `keyward_api_tokens`.
    Token,
    /// A client certificate (mutual TLS).
    Certificate,
    /// Authentication is off (`serve --dev` on loopback, or
    /// `--insecure-no-auth`): every caller is this one principal.
    Anonymous,
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Token name or certificate mapping name; what the audit log records.
    pub name: String,
    pub kind: PrincipalKind,
    pub roles: Vec<Role>,
    pub scope: Scope,
}

impl Principal {
    /// The principal of a server running without authentication.
    pub fn anonymous() -> Arc<Principal> {
        Arc::new(Principal {
            name: "anonymous".into(),
            kind: PrincipalKind::Anonymous,
            roles: Role::ALL.to_vec(),
            scope: Scope::default(),
        })
    }

    pub fn has(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }
}

/// Limits on what a principal's crypto calls may touch. Empty means any.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    /// Key records (by `key_id` or `id`) the principal may use.
    pub keys: Vec<String>,
    /// Encryption-context pairs every request must carry.
    pub context: BTreeMap<String, String>,
    /// Explicitly granted access to legacy ciphertexts (`keyward token
    /// create --legacy`, `legacy = true` in a certificate mapping) despite
    /// the limits above.
    pub legacy: bool,
}

impl Scope {
    pub fn is_unlimited(&self) -> bool {
        self.keys.is_empty() && self.context.is_empty()
    }

    /// Whether the principal may open a legacy ciphertext. Legacy
    /// ciphertexts are bound to no key record and no context, so a key or
    /// context limit cannot be checked against them: only an unlimited
    /// principal, or one explicitly granted legacy access, opens them.
    pub fn allows_legacy(&self) -> bool {
        self.is_unlimited() || self.legacy
    }

    /// Whether `key` is within the scope.
    pub fn allows_key(&self, key: &KeyRecord) -> bool {
        self.keys.is_empty() || self.keys.iter().any(|k| *k == key.key_id || *k == key.id)
    }

    /// Whether `context` carries every required pair.
    pub fn allows_context(&self, context: &EncryptionContext) -> bool {
        self.context.iter().all(|(k, v)| {
            context
                .iter()
                .any(|(ck, cv)| ck == k.as_str() && cv == v.as_str())
        })
    }
}

/// Why a call was refused. Messages never say whether a key or job exists.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No credential, or one that is not valid.
    #[error("{0}")]
    Unauthenticated(&'static str),
    /// A client certificate the CA signed whose common name no
    /// `--mtls-principals` entry maps, and no bearer token.
    #[error("the client certificate's common name {0:?} is not mapped to a principal (--mtls-principals): map it, or send `authorization: Bearer <token>`")]
    UnmappedCertificate(String),
    /// A valid credential without the right to this call.
    #[error("{0}")]
    Denied(String),
    /// The principal's rate limit is used up.
    #[error("rate limit of {per_second} requests/s for {principal} exceeded; retry later")]
    RateLimited { principal: String, per_second: u32 },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_maps_to_a_role_and_unknown_ones_need_admin() {
        assert_eq!(
            Role::required_for("/keyward.v1.Crypto/Encrypt"),
            Some(Role::Encrypt)
        );
        assert_eq!(
            Role::required_for("/keyward.v1.Crypto/BatchDecrypt"),
            Some(Role::Decrypt)
        );
        assert_eq!(
            Role::required_for("/keyward.v1.Crypto/Unknown"),
            Some(Role::Admin)
        );
        assert_eq!(
            Role::required_for("/keyward.v1.Admin/ListKeys"),
            Some(Role::Admin)
        );
        assert_eq!(Role::required_for("/other.Service/Call"), Some(Role::Admin));
        assert_eq!(Role::required_for("/grpc.health.v1.Health/Check"), None);
        assert_eq!(
            Role::required_for("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            None
        );
        assert_eq!(Role::required_for("/garbage"), Some(Role::Admin));
    }

    #[test]
    fn scopes_limit_keys_and_context() {
        let scope = Scope {
            keys: vec!["k1".into()],
            context: BTreeMap::from([("tenant".into(), "acme".into())]),
            legacy: false,
        };
        let acme = EncryptionContext::from_pairs([("tenant", "acme"), ("row", "1")]).unwrap();
        let other = EncryptionContext::from_pairs([("tenant", "globex")]).unwrap();
        assert!(scope.allows_context(&acme));
        assert!(!scope.allows_context(&other));
        assert!(!scope.allows_context(&EncryptionContext::empty()));
        assert!(Scope::default().allows_context(&EncryptionContext::empty()));
    }

    #[test]
    fn only_unlimited_or_granted_principals_open_legacy_ciphertexts() {
        assert!(Scope::default().allows_legacy());
        let context_scoped = Scope {
            context: BTreeMap::from([("tenant".into(), "acme".into())]),
            ..Scope::default()
        };
        let key_scoped = Scope {
            keys: vec!["k1".into()],
            ..Scope::default()
        };
        assert!(!context_scoped.allows_legacy());
        assert!(!key_scoped.allows_legacy());
        let granted = Scope {
            legacy: true,
            ..context_scoped
        };
        assert!(granted.allows_legacy());
    }
}
