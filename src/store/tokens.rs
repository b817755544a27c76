//! `keyward_api_tokens`: callers' bearer tokens, by hash.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use super::{on_pool, Store, StoreError};
use crate::auth::{Role, Scope};

const TOKEN_COLUMNS: &str =
    "name, token_hash, roles, key_scope, context_scope, legacy_access, created_at, revoked_at";

/// A token's record; the token itself is never stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    pub name: String,
    pub token_hash: String,
    pub roles: Vec<Role>,
    pub scope: Scope,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

#[derive(sqlx::FromRow)]
struct TokenRow {
    name: String,
    token_hash: String,
    roles: String,
    key_scope: Option<String>,
    context_scope: Option<String>,
    legacy_access: bool,
    created_at: DateTime<Utc>,
    revoked_at: Option<DateTime<Utc>>,
}

impl TryFrom<TokenRow> for TokenRecord {
    type Error = StoreError;

    fn try_from(row: TokenRow) -> Result<Self, StoreError> {
        let roles = row
            .roles
            .split(',')
            .filter(|r| !r.trim().is_empty())
            .map(|r| {
                Role::parse(r).ok_or_else(|| {
                    StoreError::Corrupt(format!("token {} has role {r:?}", row.name))
                })
            })
            .collect::<Result<_, _>>()?;
        let keys = row
            .key_scope
            .as_deref()
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(str::to_owned)
            .collect();
        let context: BTreeMap<String, String> = match row.context_scope.as_deref() {
            None | Some("") => BTreeMap::new(),
            Some(json) => serde_json::from_str(json).map_err(|_| {
                StoreError::Corrupt(format!("token {} has an invalid context_scope", row.name))
            })?,
        };
        Ok(TokenRecord {
            name: row.name,
            token_hash: row.token_hash,
            roles,
            scope: Scope {
                keys,
                context,
                legacy: row.legacy_access,
            },
            created_at: row.created_at,
            revoked_at: row.revoked_at,
        })
    }
}

impl Store {
    /// Stores a new token's hash.
    pub async fn insert_token(
        &self,
        name: &str,
        token_hash: &str,
        roles: &[Role],
        scope: &Scope,
    ) -> Result<TokenRecord, StoreError> {
        let roles: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
        let keys = (!scope.keys.is_empty()).then(|| scope.keys.join(","));
        let context = (!scope.context.is_empty())
            .then(|| serde_json::to_string(&scope.context))
            .transpose()
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let sql = format!(
            "INSERT INTO keyward_api_tokens (id, name, token_hash, roles, key_scope, context_scope, legacy_access, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING {TOKEN_COLUMNS}"
        );
        let row: TokenRow = on_pool!(self, |pool| sqlx::query_as(&sql)
            .bind(uuid::Uuid::new_v4().to_string())
            .bind(name)
            .bind(token_hash)
            .bind(roles.join(","))
            .bind(&keys)
            .bind(&context)
            .bind(scope.legacy)
            .bind(Utc::now())
            .fetch_one(pool)
            .await)?;
        row.try_into()
    }

    /// Every token, revoked ones included, oldest first.
    pub async fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let sql =
            format!("SELECT {TOKEN_COLUMNS} FROM keyward_api_tokens ORDER BY created_at, name");
        let rows: Vec<TokenRow> =
            on_pool!(self, |pool| sqlx::query_as(&sql).fetch_all(pool).await)?;
        rows.into_iter().map(TokenRecord::try_from).collect()
    }

    /// Revokes a token by name; `false` if no live token has that name.
    pub async fn revoke_token(&self, name: &str) -> Result<bool, StoreError> {
        let done = on_pool!(self, |pool| {
            sqlx::query(
            "UPDATE keyward_api_tokens SET revoked_at = $2 WHERE name = $1 AND revoked_at IS NULL"
        )
        .bind(name)
        .bind(Utc::now())
        .execute(pool)
        .await
        .map(|r| r.rows_affected())
        })?;
        Ok(done > 0)
    }
}
