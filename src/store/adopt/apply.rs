//! The adoption's SQL: reading what the database holds ([`inspect`]) and
//! running a plan on the live tables ([`apply`]): every statement under
//! [`LOCK_TIMEOUT`], retried while a lock is not granted in time.

use sqlx::{
    migrate::{Migrate as _, Migration},
    PgPool, Row as _,
};

use super::{
    statuses::{needed, StatusCheck, StatusColumn},
    AdoptError, AdoptPlan, Column, Found, Step, ADOPTED_TABLES, BACKFILL_BATCH, LOCK_ATTEMPTS,
    LOCK_TIMEOUT,
};

/// The type of `table.column` in the current schema, if both exist.
pub async fn column_type(
    pool: &PgPool,
    table: &str,
    column: &str,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a \
         WHERE a.attrelid = to_regclass(quote_ident($1)) AND a.attname = $2 \
           AND a.attnum > 0 AND NOT a.attisdropped",
    )
    .bind(table)
    .bind(column)
    .fetch_optional(pool)
    .await
}

/// Reads what the database holds of the adopted tables.
pub async fn inspect(pool: &PgPool) -> Result<Found, sqlx::Error> {
    let mut found = Found::default();
    let rows = sqlx::query(
        "SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod) \
         FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid \
         WHERE c.relnamespace = to_regnamespace(current_schema())::oid AND c.relkind IN ('r', 'p') \
           AND c.relname = ANY($1) AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
    )
    .bind(ADOPTED_TABLES.to_vec())
    .fetch_all(pool)
    .await?;
    for row in rows {
        let (table, name, sql_type): (String, String, String) =
            (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
        found
            .tables
            .entry(table)
            .or_default()
            .push(Column { name, sql_type });
    }
    found.keyward_schema =
        sqlx::query_scalar::<_, bool>("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
            .fetch_one(pool)
            .await?
            && sqlx::query_scalar::<_, bool>(
                "SELECT EXISTS (SELECT 1 FROM _sqlx_migrations WHERE version = 1 AND success)",
            )
            .fetch_one(pool)
            .await?;
    found.key_index_valid = sqlx::query_scalar(
        "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
         WHERE c.relname = 'connections_encryption_key_id_idx' \
           AND c.relnamespace = to_regnamespace(current_schema())::oid",
    )
    .fetch_optional(pool)
    .await?;
    found.key_foreign_key = sqlx::query_as(
        "SELECT conname::text, convalidated FROM pg_constraint WHERE contype = 'f' \
           AND conrelid = to_regclass('connections') AND confrelid = to_regclass('encryption_keys') \
         ORDER BY convalidated DESC, conname LIMIT 1",
    )
    .fetch_optional(pool)
    .await?;
    for table in ["encryption_keys", "encryption_rotation_jobs"] {
        if found.column(table, "status").is_some() {
            let column = status_column(pool, table).await?;
            found.statuses.insert(table.to_owned(), column);
        }
    }
    Ok(found)
}

/// How `table` declares its `status` column: an enum type (with its
/// labels), and the CHECK constraints on that column alone, each with the
/// statuses keyward writes that it rejects (found by evaluating the
/// constraint's own expression on each of them).
async fn status_column(pool: &PgPool, table: &str) -> Result<StatusColumn, sqlx::Error> {
    let enum_type: Option<String> = sqlx::query_scalar(
        "SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a \
         JOIN pg_type t ON t.oid = a.atttypid \
         WHERE a.attrelid = to_regclass($1) AND a.attname = 'status' AND t.typtype = 'e'",
    )
    .bind(table)
    .fetch_optional(pool)
    .await?;
    let mut column = StatusColumn::default();
    if let Some(type_name) = enum_type {
        let labels: Vec<String> = sqlx::query_scalar(
            "SELECT e.enumlabel::text FROM pg_attribute a JOIN pg_enum e ON e.enumtypid = a.atttypid \
             WHERE a.attrelid = to_regclass($1) AND a.attname = 'status' ORDER BY e.enumsortorder",
        )
        .bind(table)
        .fetch_all(pool)
        .await?;
        column.enum_type = Some((type_name, labels));
        // Values outside the enum cannot even be cast to test a CHECK.
        return Ok(column);
    }
    let checks: Vec<(String, String)> = sqlx::query_as(
        "SELECT c.conname::text, pg_get_expr(c.conbin, c.conrelid) FROM pg_constraint c \
         JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attname = 'status' \
         WHERE c.contype = 'c' AND c.conrelid = to_regclass($1) AND c.conkey = ARRAY[a.attnum] \
         ORDER BY c.conname",
    )
    .bind(table)
    .fetch_all(pool)
    .await?;
    for (name, expression) in checks {
        // A row passes a CHECK unless its expression is false.
        let rejects: Vec<String> = sqlx::query_scalar(&format!(
            "SELECT s.v FROM unnest(CAST($1 AS text[])) AS s(v) \
             WHERE NOT COALESCE((SELECT {expression} FROM (SELECT s.v AS status) AS q), TRUE)"
        ))
        .bind(needed(table))
        .fetch_all(pool)
        .await?;
        column.checks.push(StatusCheck {
            name,
            expression,
            rejects,
        });
    }
    Ok(column)
}

/// Runs `plan`, which [`super::adopt`] has checked, on the live tables,
/// then records the first migration, `first`, as applied.
pub(super) async fn apply(
    pool: &PgPool,
    plan: &AdoptPlan,
    first: &Migration,
) -> Result<(), AdoptError> {
    // A connection of its own, closed when done: the pool's must not keep
    // the short lock timeout for later work.
    let mut conn = pool.acquire().await?.detach();
    set_lock_timeout(&mut conn).await?;
    for step in &plan.app_changes {
        tracing::warn!(step = %step, "changing the application's schema, as --allow-app-schema-changes allows");
        if let Step::Sql { sql, .. } = step {
            patient(&mut conn, sql, None).await?;
        }
    }
    for step in &plan.steps {
        tracing::info!(step = %step, "adopting the application's database");
        match step {
            Step::Sql { sql, .. } => patient(&mut conn, sql, None).await?,
            Step::Index { name, sql, .. } => {
                let invalid: bool = sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
                     WHERE c.relname = $1 AND NOT i.indisvalid)",
                )
                .bind(name)
                .fetch_one(&mut conn)
                .await?;
                if invalid {
                    let drop = format!("DROP INDEX CONCURRENTLY IF EXISTS {name}");
                    patient(&mut conn, &drop, None).await?;
                }
                patient(&mut conn, sql, None).await?;
            }
            Step::ForeignKey {
                table,
                name,
                definition,
                ..
            } => {
                if let Some(definition) = definition {
                    let add =
                        format!("ALTER TABLE {table} ADD CONSTRAINT {name} {definition} NOT VALID");
                    patient(&mut conn, &add, None).await?;
                }
                // The name may be the application's: quoted as an identifier.
                let quoted = name.replace('"', "\"\"");
                let validate = format!("ALTER TABLE {table} VALIDATE CONSTRAINT \"{quoted}\"");
                patient(&mut conn, &validate, None).await?;
            }
            Step::BackfillMirror { id_type } => backfill_mirror(&mut conn, id_type).await?,
        }
    }
    record_first::<sqlx::Postgres>(&mut conn, first).await
}

/// Refuses a plan with refusals, or with changes to the application's
/// schema that were not allowed; nothing has been changed then.
pub(super) fn refuse_if_needed(
    plan: &AdoptPlan,
    allow_app_changes: bool,
) -> Result<(), AdoptError> {
    if !plan.refusals.is_empty() {
        return Err(AdoptError::Incompatible(plan.refusals.clone()));
    }
    if !plan.app_changes.is_empty() && !allow_app_changes {
        return Err(AdoptError::AppSchemaChanges(plan.app_changes.clone()));
    }
    Ok(())
}

/// Records keyward's first migration as applied (its checksum, as sqlx
/// would): adoption did what it does on a database of keyward's own.
pub(super) async fn record_first<DB>(
    conn: &mut DB::Connection,
    first: &Migration,
) -> Result<(), AdoptError>
where
    DB: sqlx::Database,
    DB::Connection: sqlx::migrate::Migrate,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> &'q [u8]: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> DB::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
{
    conn.ensure_migrations_table().await?;
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES ($1, $2, TRUE, $3, 0)",
    )
    .bind(first.version)
    .bind(first.description.as_ref())
    .bind(first.checksum.as_ref())
    .execute(conn)
    .await?;
    Ok(())
}

/// Bounds every lock wait of this session by [`LOCK_TIMEOUT`].
pub async fn set_lock_timeout(conn: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query(&format!(
        "SET lock_timeout = '{}ms'",
        LOCK_TIMEOUT.as_millis()
    ))
    .execute(conn)
    .await
    .map(drop)
}

/// Whether `err` is a lock wait that ran out of [`LOCK_TIMEOUT`].
pub fn is_lock_timeout(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.code().as_deref() == Some("55P03"))
}

/// Runs `sql` (binding `ids` if given), retrying while it times out
/// waiting for a lock.
async fn patient(
    conn: &mut sqlx::PgConnection,
    sql: &str,
    ids: Option<&[String]>,
) -> Result<(), AdoptError> {
    for _ in 0..LOCK_ATTEMPTS {
        let query = sqlx::query(sql);
        let query = match ids {
            Some(ids) => query.bind(ids),
            None => query,
        };
        match query.execute(&mut *conn).await {
            Ok(_) => return Ok(()),
            Err(err) if is_lock_timeout(&err) => tokio::time::sleep(LOCK_TIMEOUT / 2).await,
            Err(err) => return Err(err.into()),
        }
    }
    Err(AdoptError::Busy {
        sql: sql.to_owned(),
    })
}

/// Copies the legacy ciphertext of rows without a payload into the mirror,
/// a batch of ids at a time in `connections.id` order (its own type, so
/// the primary key's index pages through the table).
async fn backfill_mirror(conn: &mut sqlx::PgConnection, id_type: &str) -> Result<(), AdoptError> {
    let mut cursor: Option<String> = None;
    loop {
        let page = format!(
            "SELECT CAST(connections.id AS TEXT) FROM connections {} \
             ORDER BY connections.id LIMIT {BACKFILL_BATCH}",
            if cursor.is_some() {
                format!("WHERE connections.id > CAST($1 AS {id_type})")
            } else {
                "WHERE $1::text IS NULL".to_owned()
            }
        );
        let ids: Vec<String> = sqlx::query_scalar(&page)
            .bind(&cursor)
            .fetch_all(&mut *conn)
            .await?;
        let Some(last) = ids.last().cloned() else {
            return Ok(());
        };
        let update = format!(
            "UPDATE connections SET payload_ciphertext = encrypted_credentials, \
             payload_iv = credentials_iv WHERE id = ANY(CAST($1 AS {id_type}[])) \
             AND payload_ciphertext IS NULL AND encrypted_credentials IS NOT NULL"
        );
        patient(conn, &update, Some(&ids)).await?;
        cursor = Some(last);
    }
}
