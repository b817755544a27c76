//! keyward on an application's own SQLite database: the adoption suite of
//! `adoption.rs`, where SQLite has the types. The fixture is a Drizzle
//! (sqlite-core) `connections` table with text uuid ids, NOT NULL columns of
//! its own, integer timestamps and 300 rows the application encrypted in
//! the legacy format.

use std::collections::HashMap;

use sqlx::SqlitePool;

use crate::{
    adoption::{
        cutover_clears, legacy_copies_hold, legacy_credentials, legacy_rows_decrypt, migrate,
        migrate_refuses, old_pods_rewrite, rotate_to_end, rotates_every_row,
    },
    cli::{stderr, stdout},
    helpers::{spawn_on, Backend, Options, PRIMARY},
};

/// The application's own columns, every row, as one text.
const APP_COLUMNS: &str = "SELECT group_concat(id || '|' || workspace_id || '|' || name || '|' \
     || type || '|' || hex(encrypted_credentials) || '|' || hex(credentials_iv) || '|' \
     || created_at || '|' || updated_at, ',') FROM (SELECT * FROM connections ORDER BY id)";

/// When the application last wrote row `n` (Unix seconds).
fn written_at(n: usize) -> i64 {
    1_700_000_000 + n as i64
}

/// A SQLite database holding the application's schema, `rows` legacy rows
/// and then `sql` (the application's own later migrations); its URL, a
/// pool on it, each row's plaintext by id, and the directory that holds it.
async fn application_database(
    rows: usize,
    sql: &str,
) -> (
    String,
    SqlitePool,
    HashMap<String, String>,
    tempfile::TempDir,
) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("app.db").display());
    let pool = SqlitePool::connect(&url).await.unwrap();
    let schema = include_str!("../fixtures/application_schema_sqlite.sql");
    let workspace = "INSERT INTO workspaces (id, name) VALUES ('w-1', 'acme');";
    sqlx::raw_sql(&format!("{schema}\n{workspace}"))
        .execute(&pool)
        .await
        .unwrap();
    let mut plaintexts = HashMap::new();
    for (n, plaintext, iv, ct) in legacy_credentials(rows) {
        let id = uuid::Uuid::new_v4().to_string();
        sqlx::query(
            "INSERT INTO connections (id, workspace_id, name, type, encrypted_credentials, \
             credentials_iv, created_at, updated_at) VALUES ($1, 'w-1', $2, 'postgres', $3, $4, $5, $5)",
        )
        .bind(&id)
        .bind(format!("db-{n}"))
        .bind(ct)
        .bind(iv)
        .bind(written_at(n))
        .execute(&pool)
        .await
        .unwrap();
        plaintexts.insert(id, plaintext);
    }
    sqlx::raw_sql(sql).execute(&pool).await.unwrap();
    (url, pool, plaintexts, dir)
}

async fn scalar<T>(pool: &SqlitePool, sql: &str) -> T
where
    T: for<'r> sqlx::Decode<'r, sqlx::Sqlite> + sqlx::Type<sqlx::Sqlite> + Send + Unpin,
{
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// State (a): only the application's `connections`. `migrate` (twice)
/// adds keyward's columns and tables without touching the application's;
/// legacy rows decrypt, rotate onto the active key (rows the old pods
/// changed from what they last wrote), keep their legacy copies for the
/// old pods until the cutover clears them, and every row still decrypts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_sqlite_database_is_adopted() {
    let (url, pool, mut plaintexts, _dir) = application_database(300, "").await;
    let before: String = scalar(&pool, APP_COLUMNS).await;

    let plan = migrate(&url, &["--dry-run"]);
    assert!(plan.status.success(), "{}", stderr(&plan));
    let plan = stdout(&plan);
    assert!(plan.contains("is an application's database"), "{plan}");
    assert!(
        plan.contains(
            "ALTER TABLE connections ADD COLUMN encryption_key_id TEXT REFERENCES encryption_keys (id)"
        ),
        "{plan}"
    );
    assert!(
        plan.contains("connection_id TEXT NOT NULL REFERENCES connections (id)"),
        "{plan}"
    );
    let tables: i64 = scalar(
        &pool,
        "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table'",
    )
    .await;
    assert_eq!(tables, 2, "the dry run changed the database");

    for _ in 0..2 {
        let out = migrate(&url, &[]);
        assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    }
    assert_eq!(
        before,
        scalar::<String>(&pool, APP_COLUMNS).await,
        "the application's columns changed"
    );
    let migrations: i64 =
        scalar(&pool, "SELECT COUNT(*) FROM _sqlx_migrations WHERE success").await;
    let embedded = std::fs::read_dir("migrations/sqlite").unwrap().count();
    assert_eq!(migrations, embedded as i64, "every migration ran once");
    let mirrored: i64 = scalar(
        &pool,
        "SELECT COUNT(*) FROM connections WHERE payload_ciphertext = encrypted_credentials",
    )
    .await;
    assert_eq!(mirrored, 300, "the payload mirror was not backfilled");
    let broken: Vec<(String,)> = sqlx::query_as("SELECT \"table\" FROM pragma_foreign_key_check")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert!(broken.is_empty(), "{broken:?}");

    let app = spawn_on(Backend::Sqlite, url.clone(), Options::default()).await;
    let target = app.active_record_id();
    let rows = app.connections().await;
    assert_eq!(rows.len(), 300);
    legacy_rows_decrypt(&app, &rows, &plaintexts).await;
    // The application's integer timestamps are read as Unix seconds.
    let usage = app.services.admin.key_usage().await.unwrap();
    let legacy = usage.iter().find(|u| u.key_record_id.is_none()).unwrap();
    assert_eq!(
        legacy.oldest_written_at().map(|t| t.timestamp()),
        Some(written_at(0))
    );

    old_pods_rewrite(&app, &rows, &mut plaintexts, "id = $1").await;
    rotates_every_row(&app, &target, &plaintexts).await;

    legacy_copies_hold(&app.connections().await, &plaintexts);
    cutover_clears(&url, &[], 300);
    let copies: i64 = scalar(
        &pool,
        "SELECT COUNT(encrypted_credentials) FROM connections",
    )
    .await;
    assert_eq!(copies, 0);
    crate::workers::assert_all_rotated(&app, &target, &plaintexts).await;
}

/// State (b): the application's own migrations already made the runbook's
/// tables and columns, in SQLite's types (times as text written by
/// `CURRENT_TIMESTAMP`, with a space). keyward adds only what they lack,
/// then works on them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_sqlite_database_with_the_runbooks_tables_is_adopted() {
    let (url, pool, _, _dir) = application_database(
        10,
        "CREATE TABLE encryption_keys (
             id text PRIMARY KEY NOT NULL,
             key_id text NOT NULL UNIQUE,
             kms_key_arn text NOT NULL,
             status text NOT NULL DEFAULT 'pending',
             created_at text NOT NULL DEFAULT CURRENT_TIMESTAMP,
             updated_at text NOT NULL DEFAULT CURRENT_TIMESTAMP
         );
         ALTER TABLE connections ADD COLUMN encryption_key_id text REFERENCES encryption_keys (id);
         ALTER TABLE connections ADD COLUMN data_key_ciphertext blob;
         ALTER TABLE connections ADD COLUMN payload_ciphertext blob;
         ALTER TABLE connections ADD COLUMN payload_iv blob;
         CREATE TABLE encryption_rotation_jobs (
             id text PRIMARY KEY NOT NULL,
             status text NOT NULL DEFAULT 'pending',
             target_key_id text NOT NULL REFERENCES encryption_keys (id),
             created_at text NOT NULL DEFAULT CURRENT_TIMESTAMP,
             updated_at text NOT NULL DEFAULT CURRENT_TIMESTAMP
         );
         CREATE TABLE connection_scoped_tokens (
             id text PRIMARY KEY NOT NULL,
             connection_id text NOT NULL REFERENCES connections (id) ON DELETE CASCADE,
             token_hash text NOT NULL UNIQUE,
             expires_at text NOT NULL
         );
         INSERT INTO encryption_keys (id, key_id, kms_key_arn, status)
             VALUES ('k-app', 'app-key', 'local:app-key', 'retired');",
    )
    .await;
    let before: String = scalar(&pool, APP_COLUMNS).await;
    for _ in 0..2 {
        let out = migrate(&url, &[]);
        assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    }
    assert_eq!(before, scalar::<String>(&pool, APP_COLUMNS).await);
    let added: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM pragma_table_info('connections') WHERE name IN \
         ('data_key_iv', 'last_error', 'last_error_job_id', 'encryption_key_id') ORDER BY name",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        added,
        [
            "data_key_iv",
            "encryption_key_id",
            "last_error",
            "last_error_job_id"
        ]
    );

    let app = spawn_on(Backend::Sqlite, url.clone(), Options::default()).await;
    let sealed = app
        .encrypt(b"new credential", &[("connection_id", "n-1")])
        .await;
    assert_eq!(sealed.key_id, PRIMARY);
    // The application's own key record, with its CURRENT_TIMESTAMP times.
    let keys = app.services.admin.list_keys().await.unwrap();
    assert!(keys.iter().any(|k| k.key_id == "app-key"), "{keys:?}");
    let job = rotate_to_end(&app).await;
    assert_eq!((job.succeeded_rows, job.failed_rows), (10, 0), "{job:?}");
}

/// A column keyward needs that the application declared with another type
/// is refused before anything changes, naming table, column and types.
#[tokio::test]
async fn an_incompatible_sqlite_column_is_refused_and_nothing_changes() {
    let (url, pool, _, _dir) = application_database(
        3,
        "ALTER TABLE connections ADD COLUMN payload_ciphertext integer",
    )
    .await;
    let before: String = scalar(&pool, APP_COLUMNS).await;
    migrate_refuses(
        &url,
        "connections.payload_ciphertext is INTEGER; keyward needs BLOB",
    );
    let tables: i64 = scalar(
        &pool,
        "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table'",
    )
    .await;
    assert_eq!(tables, 2, "a refused adoption created tables");
    let columns: i64 = scalar(
        &pool,
        "SELECT COUNT(*) FROM pragma_table_info('connections')",
    )
    .await;
    assert_eq!(columns, 9, "a refused adoption added columns");
    assert_eq!(before, scalar::<String>(&pool, APP_COLUMNS).await);
}
