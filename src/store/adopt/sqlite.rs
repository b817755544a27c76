//! Adopting an application's SQLite database: what differs from
//! PostgreSQL's.
//!
//! - **Types** are declared, not enforced: a column has the *affinity* its
//!   declared type implies (SQLite's rules, §3.1 of its datatype page), and
//!   [`family`] reads what keyward can use from it (`uuid` and `datetime`,
//!   which have NUMERIC affinity, hold text as written).
//! - **`ALTER TABLE`** adds one column at a time, no column twice, and no
//!   column whose default is not a constant ([`declaration`]); a foreign
//!   key comes only with its column.
//! - **[`apply`]** makes the whole schema change in one transaction (DDL is
//!   transactional here): all of it or nothing. The payload mirror is then
//!   backfilled in batches, each a short transaction of its own, so the
//!   application's writers wait at most one batch; then 0001 is recorded.

use sqlx::{migrate::Migration, SqlitePool};

use super::{
    apply::record_first, AdoptError, AdoptPlan, Column, Dialect, Family, Found, Step,
    ADOPTED_TABLES, BACKFILL_BATCH,
};
use crate::store::BeginWrite as _;

/// How keyward reads a column of declared type `declared`, from the
/// affinity SQLite gives it.
pub(super) fn family(declared: &str) -> Family {
    let t = declared.to_ascii_uppercase();
    let has = |part: &str| t.contains(part);
    if has("INT") {
        Family::Integer
    } else if has("CHAR") || has("CLOB") || has("TEXT") {
        Family::Text
    } else if has("BLOB") || t.trim().is_empty() {
        Family::Bytes
    } else if has("REAL") || has("FLOA") || has("DOUB") {
        Family::Other
    } else if has("BOOL") {
        Family::Boolean
    } else if has("DATE") || has("TIME") {
        Family::TimestampTz
    } else if has("UUID") {
        Family::Uuid
    } else {
        Family::Other
    }
}

/// Whether a column of family `found` serves where `wanted` is needed:
/// times as text (keyward writes RFC 3339) or, for the application's own
/// times, as Unix seconds; booleans as integers; text in a `uuid` column.
pub(super) fn fits(found: Family, wanted: Family) -> bool {
    found.fits(wanted)
        || match wanted {
            Family::TimestampTz => found == Family::Text,
            Family::Timestamp => matches!(found, Family::Text | Family::Integer),
            Family::Boolean => found == Family::Integer,
            Family::Text => found == Family::Uuid,
            _ => false,
        }
}

/// PostgreSQL's `ADD COLUMN` declaration of a column, as SQLite adds it;
/// `None` where it cannot: a NOT NULL column with a default computed per
/// row. A nullable column loses such a default (rows the application
/// inserts later leave it NULL).
pub(super) fn declaration(postgres: &str) -> Option<String> {
    if postgres.contains("NOT NULL DEFAULT now()") {
        return None;
    }
    Some(
        postgres
            .replace(" DEFAULT now()", "")
            .replace("BYTEA", "BLOB")
            .replace("TIMESTAMPTZ", "TEXT")
            .replace("BIGINT", "INTEGER"),
    )
}

/// Columns a later migration of keyward's adds to the application's
/// table (SQLite cannot add a column twice, so adoption leaves them).
pub(super) fn added_later(table: &str, column: &str) -> bool {
    (table, column) == ("connections", "last_error_job_id")
}

/// Reads what the database holds of the adopted tables.
pub async fn inspect(pool: &SqlitePool) -> Result<Found, sqlx::Error> {
    // The names are keyward's constants: safe as literals.
    let names: Vec<String> = ADOPTED_TABLES.iter().map(|t| format!("'{t}'")).collect();
    let rows: Vec<(String, String, String)> = sqlx::query_as(&format!(
        "SELECT m.name, p.name, p.type FROM sqlite_master m, pragma_table_info(m.name) p \
         WHERE m.type = 'table' AND m.name IN ({}) ORDER BY m.name, p.cid",
        names.join(", ")
    ))
    .fetch_all(pool)
    .await?;
    let mut found = Found {
        dialect: Dialect::Sqlite,
        ..Found::default()
    };
    for (table, name, sql_type) in rows {
        found
            .tables
            .entry(table)
            .or_default()
            .push(Column { name, sql_type });
    }
    let migrations: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations')",
    )
    .fetch_one(pool)
    .await?;
    found.keyward_schema = migrations
        && sqlx::query_scalar::<_, bool>(
            "SELECT EXISTS (SELECT 1 FROM _sqlx_migrations WHERE version = 1 AND success)",
        )
        .fetch_one(pool)
        .await?;
    Ok(found)
}

/// Runs `plan`, which [`super::adopt`] has checked: the schema change in
/// one transaction, the mirror's backfill in batches, then `first` recorded.
pub(super) async fn apply(
    pool: &SqlitePool,
    plan: &AdoptPlan,
    first: &Migration,
) -> Result<(), AdoptError> {
    let mut tx = pool.begin_write().await?;
    let mut backfill = false;
    for step in plan.app_changes.iter().chain(&plan.steps) {
        tracing::info!(step = %step, "adopting the application's database");
        match step {
            Step::Sql { sql, .. } | Step::Index { sql, .. } => {
                sqlx::query(sql).execute(&mut *tx).await?;
            }
            Step::BackfillMirror { .. } => backfill = true,
            Step::ForeignKey { name, .. } => {
                return Err(AdoptError::Database(sqlx::Error::Protocol(format!(
                    "SQLite cannot add the constraint {name} to an existing table"
                ))))
            }
        }
    }
    tx.commit().await?;
    if backfill {
        backfill_mirror(pool).await?;
    }
    let mut conn = pool.acquire().await?;
    record_first::<sqlx::Sqlite>(&mut conn, first).await
}

/// Copies the legacy ciphertext of rows without a payload into the mirror,
/// [`BACKFILL_BATCH`] ids at a time in id order (the primary key's index).
async fn backfill_mirror(pool: &SqlitePool) -> Result<(), sqlx::Error> {
    const FILL: &str = "UPDATE connections SET payload_ciphertext = encrypted_credentials, \
                        payload_iv = credentials_iv \
                        WHERE payload_ciphertext IS NULL AND encrypted_credentials IS NOT NULL \
                          AND id IN (SELECT id FROM connections";
    let mut cursor: Option<String> = None;
    loop {
        let after = match cursor {
            Some(_) => "WHERE id > $1",
            None => "WHERE $1 IS NULL",
        };
        let page = format!(" {after} ORDER BY id LIMIT {BACKFILL_BATCH})");
        let mut tx = pool.begin_write().await?;
        let last: Option<String> = sqlx::query_scalar(&format!(
            "SELECT CAST(MAX(id) AS TEXT) FROM (SELECT id FROM connections{page}"
        ))
        .bind(&cursor)
        .fetch_one(&mut *tx)
        .await?;
        let Some(last) = last else {
            return tx.commit().await;
        };
        sqlx::query(&format!("{FILL}{page}"))
            .bind(&cursor)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        cursor = Some(last);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declared_types_are_read_by_their_affinity() {
        let cases: [(Family, &[&str]); 7] = [
            (Family::Text, &["TEXT", "varchar(36)"]),
            (Family::Integer, &["integer", "BIGINT"]),
            (Family::Bytes, &["blob", ""]),
            (Family::Uuid, &["uuid"]),
            (Family::TimestampTz, &["datetime", "timestamp"]),
            (Family::Boolean, &["boolean"]),
            (Family::Other, &["real", "numeric"]),
        ];
        for (family, declared) in cases {
            for declared in declared {
                assert_eq!(super::family(declared), family, "{declared}");
            }
        }
        // Drizzle's integer timestamps serve as the application's own
        // times, not as the runbook tables' (keyward writes those).
        assert!(fits(Family::Integer, Family::Timestamp));
        assert!(!fits(Family::Integer, Family::TimestampTz));
        assert!(fits(Family::Text, Family::TimestampTz));
        assert!(fits(Family::Text, Family::Bytes), "base64 or hex");
        assert!(!fits(Family::Integer, Family::Bytes));
    }

    #[test]
    fn columns_with_a_computed_default_are_added_only_when_nullable() {
        assert_eq!(declaration("BYTEA").as_deref(), Some("BLOB"));
        assert_eq!(
            declaration("TIMESTAMPTZ DEFAULT now()").as_deref(),
            Some("TEXT")
        );
        assert_eq!(declaration("TIMESTAMPTZ NOT NULL DEFAULT now()"), None);
        assert_eq!(
            declaration("BIGINT NOT NULL DEFAULT 500").as_deref(),
            Some("INTEGER NOT NULL DEFAULT 500")
        );
    }
}
