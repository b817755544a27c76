//! API tokens: what makes a token request valid (name, roles, scope), the
//! secret shown once, and revocation. The CLI (`keyward token`) goes through
//! here rather than writing `keyward_api_tokens` itself.

use zeroize::Zeroizing;

use crate::{
    auth::{token, Role, Scope},
    error::{Error, Result},
    store::{tokens::TokenRecord, Store, StoreError},
};

/// Longest token name accepted.
const MAX_NAME_LEN: usize = 128;

/// A token to create, as an operator states it.
#[derive(Debug, Clone, Default)]
pub struct TokenRequest {
    /// Unique; audit events record it as the principal.
    pub name: String,
    /// `encrypt`, `decrypt`, `admin`.
    pub roles: Vec<String>,
    /// Key records (`key_id` or `id`) the token is limited to; empty: any.
    pub keys: Vec<String>,
    /// `KEY=VALUE` pairs every request must carry.
    pub context: Vec<String>,
    /// Legacy ciphertexts despite `keys` or `context`.
    pub legacy: bool,
}

/// A valid request: what is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidToken {
    pub name: String,
    pub roles: Vec<Role>,
    pub scope: Scope,
}

/// A created token: its record, and the token itself, shown once.
pub struct Issued {
    pub record: TokenRecord,
    pub secret: Zeroizing<String>,
}

/// Checks a request: a name of 1 to 128 characters, known roles (at least
/// one), context pairs of the form `KEY=VALUE` with a non-empty key.
pub fn validate(req: TokenRequest) -> Result<ValidToken> {
    let name = req.name.trim().to_owned();
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(invalid("name", "must be 1 to 128 characters"));
    }
    if req.roles.is_empty() {
        return Err(invalid(
            "roles",
            "give at least one: encrypt, decrypt or admin",
        ));
    }
    let roles = req
        .roles
        .iter()
        .map(|r| {
            Role::parse(r).ok_or_else(|| {
                invalid(
                    "roles",
                    &format!("unknown role {r:?}: use encrypt, decrypt or admin"),
                )
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let context = req
        .context
        .iter()
        .map(|pair| {
            pair.split_once('=')
                .filter(|(k, _)| !k.is_empty())
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| invalid("context", &format!("{pair:?}: use KEY=VALUE")))
        })
        .collect::<Result<_>>()?;
    Ok(ValidToken {
        name,
        roles,
        scope: Scope {
            keys: req.keys,
            context,
            legacy: req.legacy,
        },
    })
}

fn invalid(field: &'static str, reason: &str) -> Error {
    Error::InvalidField {
        field,
        reason: reason.to_owned(),
    }
}

pub struct Tokens {
    store: Store,
}

impl Tokens {
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    /// Stores a validated token's hash; returns the token, to show once.
    pub async fn create(&self, token: &ValidToken) -> Result<Issued> {
        let secret = token::generate();
        let record = self
            .store
            .insert_token(
                &token.name,
                &token::hash(&secret),
                &token.roles,
                &token.scope,
            )
            .await
            .map_err(|err| match err {
                StoreError::Conflict(_) => invalid(
                    "name",
                    &format!("a token named {:?} already exists", token.name),
                ),
                other => Error::Store(other),
            })?;
        Ok(Issued { record, secret })
    }

    /// Every token, revoked ones included, oldest first.
    pub async fn list(&self) -> Result<Vec<TokenRecord>> {
        Ok(self.store.list_tokens().await?)
    }

    /// Revokes a token by name; `false` if no live token has that name.
    pub async fn revoke(&self, name: &str) -> Result<bool> {
        Ok(self.store.revoke_token(name).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> TokenRequest {
        TokenRequest {
            name: "billing".into(),
            roles: vec!["encrypt".into(), "decrypt".into()],
            context: vec!["tenant=acme".into()],
            ..TokenRequest::default()
        }
    }

    #[test]
    fn a_valid_request_becomes_roles_and_a_scope() {
        let token = validate(request()).unwrap();
        assert_eq!(token.roles, [Role::Encrypt, Role::Decrypt]);
        assert_eq!(token.scope.context["tenant"], "acme");
        assert!(!token.scope.allows_legacy());
    }

    #[test]
    fn names_roles_and_pairs_are_checked() {
        for bad in [
            TokenRequest {
                name: " ".into(),
                ..request()
            },
            TokenRequest {
                name: "x".repeat(129),
                ..request()
            },
            TokenRequest {
                roles: vec![],
                ..request()
            },
            TokenRequest {
                roles: vec!["root".into()],
                ..request()
            },
            TokenRequest {
                context: vec!["=acme".into()],
                ..request()
            },
            TokenRequest {
                context: vec!["tenant".into()],
                ..request()
            },
        ] {
            let err = validate(bad.clone()).unwrap_err();
            assert!(matches!(err, Error::InvalidField { .. }), "{bad:?}: {err}");
        }
    }
}
