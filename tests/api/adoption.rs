//! keyward on an application's own PostgreSQL database (issue: adoption).
//! The fixture is the runbook's platform as it stood before keyward: a
//! Drizzle-made `connections` table with `uuid` (or `bigint` identity) ids,
//! NOT NULL columns of its own and 300 rows the application encrypted in
//! the legacy format. `keyward migrate` (the real binary, twice) adopts it
//! without touching the application's columns; keyward then decrypts the
//! legacy rows and rotates every row onto the active key, paging by the id
//! in its own type.

use std::collections::HashMap;

use keyward::{
    api::proto::{decrypt_request::Ciphertext, DecryptRequest, Envelope, StartRotationRequest},
    crypto::{
        legacy::{encrypt_legacy, LegacyKeys},
        secret::MasterSecret,
    },
};
use sqlx::PgPool;

use crate::{
    cli::{keyward, run, stderr, stdout},
    helpers::bind_envelope,
    helpers::{ctx, spawn_on, Backend, ConnectionRow, Options, TestApp, MASTER, PRIMARY},
    postgres,
};

/// The application's schema, as its Drizzle migrations made it, with ids
/// of type `id`.
fn app_schema(id: &str) -> String {
    include_str!("../fixtures/application_schema.sql").replace("{ID}", id)
}

/// The application's own columns, every row, as one text.
const APP_COLUMNS: &str =
    "SELECT string_agg(ROW(id, workspace_id, name, type, encrypted_credentials, \
     credentials_iv, created_at, updated_at)::text, '|' ORDER BY id) FROM connections";

/// A database of its own holding the application's schema and `rows`
/// legacy rows; returns its URL and each row's plaintext by id.
async fn application_database(id: &str, rows: usize) -> Option<(String, HashMap<String, String>)> {
    let server = postgres::server_or_skip()?;
    let url = postgres::create_database(server, "app").await;
    let pool = PgPool::connect(&url).await.unwrap();
    sqlx::raw_sql(&app_schema(id)).execute(&pool).await.unwrap();
    let workspace: String = sqlx::query_scalar(
        "INSERT INTO workspaces (name) VALUES ('acme') RETURNING CAST(id AS TEXT)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let mut plaintexts = HashMap::new();
    for (n, plaintext, iv, ct) in legacy_credentials(rows) {
        let row_id: String = sqlx::query_scalar(
            "INSERT INTO connections (workspace_id, name, type, encrypted_credentials, credentials_iv) \
             VALUES (CAST($1 AS uuid), $2, 'postgres', $3, $4) RETURNING CAST(id AS TEXT)",
        )
        .bind(&workspace)
        .bind(format!("db-{n}"))
        .bind(ct)
        .bind(iv)
        .fetch_one(&pool)
        .await
        .unwrap();
        plaintexts.insert(row_id, plaintext);
    }
    pool.close().await;
    Some((url, plaintexts))
}

/// The application's `rows` credentials, each encrypted in the legacy
/// format: `(n, plaintext, iv, ciphertext)`.
pub(crate) fn legacy_credentials(
    rows: usize,
) -> impl Iterator<Item = (usize, String, Vec<u8>, Vec<u8>)> {
    let master = MasterSecret::new(MASTER).unwrap();
    (0..rows).map(move |n| {
        let plaintext = format!("{{\"password\":\"secret-{n}\"}}");
        let (iv, ct) = encrypt_legacy(&master, plaintext.as_bytes());
        (n, plaintext, iv.to_vec(), ct)
    })
}

/// An application's database with uuid ids and `rows` legacy rows, after
/// `sql` (the application's own later migrations) ran on it.
async fn uuid_application_with(rows: usize, sql: &str) -> Option<(String, PgPool)> {
    let (url, _) = application_database("uuid DEFAULT gen_random_uuid()", rows).await?;
    let pool = PgPool::connect(&url).await.unwrap();
    sqlx::raw_sql(sql).execute(&pool).await.unwrap();
    Some((url, pool))
}

/// The declared type of `table.column`.
async fn column_type(pool: &PgPool, table: &str, column: &str) -> String {
    scalar(
        pool,
        &format!(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute \
             WHERE attrelid = '{table}'::regclass AND attname = '{column}'"
        ),
    )
    .await
}

/// Starts a rotation to the active key and waits for its end.
pub(crate) async fn rotate_to_end(app: &TestApp) -> keyward::api::proto::RotationJob {
    let job = app
        .admin
        .clone()
        .start_rotation(StartRotationRequest::default())
        .await
        .unwrap()
        .into_inner();
    crate::workers::final_job(app, &job.id).await
}

/// `keyward ARGS…` on the database at `url`, with the master secret.
pub(crate) fn keyward_on(url: &str, args: &[&str]) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    run(keyward(dir.path())
        .env("DATABASE_URL", url)
        .env("ENCRYPTION_MASTER_KEY", MASTER)
        .args(args))
}

pub(crate) fn migrate(url: &str, args: &[&str]) -> std::process::Output {
    keyward_on(url, &[&["migrate"], args].concat())
}

/// `migrate` exits 65 (nothing changed), saying `why` on standard error.
pub(crate) fn migrate_refuses(url: &str, why: &str) {
    let out = migrate(url, &[]);
    assert_eq!(out.status.code(), Some(65), "{}", stderr(&out));
    assert!(stderr(&out).contains(why), "{}", stderr(&out));
}

async fn scalar<T>(pool: &PgPool, sql: &str) -> T
where
    T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send + Unpin,
{
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

async fn adopts_and_rotates(id: &str, id_type: &str) {
    let Some((url, mut plaintexts)) = application_database(id, 300).await else {
        return;
    };
    let pool = PgPool::connect(&url).await.unwrap();
    let before: String = scalar(&pool, APP_COLUMNS).await;

    let plan = migrate(&url, &["--dry-run"]);
    assert!(plan.status.success(), "{}", stderr(&plan));
    let plan = stdout(&plan);
    assert!(plan.contains("is an application's database"), "{plan}");
    assert!(plan.contains("CREATE INDEX CONCURRENTLY"), "{plan}");
    assert!(
        plan.contains(&format!("connection_id {id_type} NOT NULL")),
        "{plan}"
    );
    let untouched: bool = scalar(&pool, "SELECT to_regclass('encryption_keys') IS NULL").await;
    assert!(untouched, "the dry run changed the database");

    for _ in 0..2 {
        let out = migrate(&url, &[]);
        assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    }
    let after: String = scalar(&pool, APP_COLUMNS).await;
    assert_eq!(before, after, "the application's columns changed");
    let migrations: i64 =
        scalar(&pool, "SELECT COUNT(*) FROM _sqlx_migrations WHERE success").await;
    let embedded = std::fs::read_dir("migrations/postgres").unwrap().count();
    assert_eq!(migrations, embedded as i64, "every migration ran once");
    let token_fk = column_type(&pool, "connection_scoped_tokens", "connection_id").await;
    assert_eq!(token_fk, id_type);
    let valid: bool = scalar(
        &pool,
        "SELECT bool_and(convalidated) FROM pg_constraint WHERE conrelid = 'connections'::regclass \
         AND contype = 'f'",
    )
    .await;
    assert!(valid, "a foreign key was left NOT VALID");
    let index_valid: bool = scalar(
        &pool,
        "SELECT indisvalid FROM pg_index WHERE indexrelid = 'connections_encryption_key_id_idx'::regclass",
    )
    .await;
    assert!(index_valid);
    let mirrored: i64 = scalar(
        &pool,
        "SELECT COUNT(*) FROM connections WHERE payload_ciphertext = encrypted_credentials",
    )
    .await;
    assert_eq!(mirrored, 300, "the payload mirror was not backfilled");

    let app = spawn_on(Backend::Postgres, url.clone(), Options::default()).await;
    let target = app.active_record_id();
    let rows = app.connections().await;
    assert_eq!(rows.len(), 300);
    legacy_rows_decrypt(&app, &rows, &plaintexts).await;

    // Rotation pages through the table by its own id type, so the primary
    // key's index can serve the page (with sequential scans off, as on a
    // table large enough for the planner to prefer the index; a CAST of
    // the id to text could not use it at all).
    let target_sql = &app.services.targets.current()[0];
    assert_eq!(
        target_sql.id_type.as_ref().map(|t| t.as_str()),
        Some(id_type)
    );
    let mut conn = pool.acquire().await.unwrap();
    sqlx::query("SET enable_seqscan = off")
        .execute(&mut *conn)
        .await
        .unwrap();
    let explain: Vec<String> = sqlx::query_scalar(&format!(
        "EXPLAIN {}",
        target_sql
            .select_batch_sql(false)
            .replace("$1", "'k'")
            .replace("$2", "'j'")
            .replace(
                "$3",
                "(SELECT CAST(c.id AS TEXT) FROM connections c ORDER BY c.id LIMIT 1)"
            )
            .replace("$4", "100")
            // A master-secret rollover's job: rows on its key are read too.
            .replace("$5", "decode('4b01aabbccddeeff0011', 'hex')")
    ))
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    drop(conn);
    let explain = explain.join("\n");
    assert!(
        explain.contains(&format!("Index Cond: (id > ($0)::{id_type})"))
            && explain.contains("connections_pkey")
            && !explain.contains("Sort Key: ((connections.id)::text)"),
        "{explain}"
    );

    let by_id = format!("id = CAST($1 AS {id_type})");
    old_pods_rewrite(&app, &rows, &mut plaintexts, &by_id).await;

    rotates_every_row(&app, &target, &plaintexts).await;
    assert_eq!(
        app.services
            .admin
            .catalog_snapshot()
            .active()
            .unwrap()
            .key_id,
        PRIMARY
    );
    cuts_over(&app, &target, &url, &pool, &mut plaintexts, id_type).await;
}

/// `keyward ARGS… legacy cutover --old-pods-stopped` clears `copies`
/// legacy copies and finishes.
pub(crate) fn cutover_clears(url: &str, args: &[&str], copies: usize) {
    let out = keyward_on(
        url,
        &[args, &["legacy", "cutover", "--old-pods-stopped"]].concat(),
    );
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains(&format!("cleared {copies} legacy copies")),
        "{}",
        stdout(&out)
    );
}

/// A rotation moves every row onto the active key, `target`, and each
/// decrypts to its plaintext.
pub(crate) async fn rotates_every_row(
    app: &TestApp,
    target: &str,
    plaintexts: &HashMap<String, String>,
) {
    let job = rotate_to_end(app).await;
    let rows = plaintexts.len() as i64;
    assert_eq!(
        (job.total_rows, job.succeeded_rows, job.failed_rows),
        (rows, rows, 0),
        "{job:?}"
    );
    crate::workers::assert_all_rotated(app, target, plaintexts).await;
}

/// The first 20 `rows` decrypt through the API, as legacy rows.
pub(crate) async fn legacy_rows_decrypt(
    app: &TestApp,
    rows: &[ConnectionRow],
    plaintexts: &HashMap<String, String>,
) {
    let mut client = app.crypto.clone();
    for row in rows.iter().take(20) {
        let opened = client
            .decrypt(DecryptRequest {
                context: ctx(&[("connection_id", row.id.as_str())]),
                ciphertext: Some(Ciphertext::Envelope(Envelope {
                    payload_ciphertext: row.encrypted_credentials.clone().unwrap().into(),
                    payload_iv: row.credentials_iv.clone().unwrap().into(),
                    ..Envelope::default()
                })),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(opened.legacy);
        assert_eq!(&opened.plaintext[..], plaintexts[&row.id].as_bytes());
    }
}

/// Old pods keep writing the legacy columns only: the mirror the migration
/// filled goes stale, and rotation must take what they last wrote. The
/// first five `rows` get a new legacy copy (`by_id` finds a row by `$1`).
pub(crate) async fn old_pods_rewrite(
    app: &TestApp,
    rows: &[ConnectionRow],
    plaintexts: &mut HashMap<String, String>,
    by_id: &str,
) {
    let master = MasterSecret::new(MASTER).unwrap();
    for row in rows.iter().take(5) {
        let newer = format!("{{\"password\":\"changed-by-an-old-pod-{}\"}}", row.id);
        let (iv, ct) = encrypt_legacy(&master, newer.as_bytes());
        app.write_legacy_copy(by_id, &row.id, &ct, &iv).await;
        plaintexts.insert(row.id.clone(), newer);
    }
}

/// Every row's legacy copy still decrypts, with the legacy key, to its
/// plaintext: the old pods can read it.
pub(crate) fn legacy_copies_hold(rows: &[ConnectionRow], plaintexts: &HashMap<String, String>) {
    let master = MasterSecret::new(MASTER).unwrap();
    let legacy = LegacyKeys::new([&master]);
    for row in rows {
        let opened = legacy
            .decrypt(
                row.credentials_iv.as_deref().unwrap(),
                row.encrypted_credentials.as_deref().unwrap(),
            )
            .unwrap();
        assert_eq!(opened.as_bytes(), plaintexts[&row.id].as_bytes());
    }
}

/// The old pods' legacy copies survive rotation; `keyward legacy cutover`
/// clears them only where both copies agree, lists a conflict, and clears
/// the rest once the conflict is resolved.
async fn cuts_over(
    app: &TestApp,
    target: &str,
    url: &str,
    pool: &PgPool,
    plaintexts: &mut HashMap<String, String>,
    id_type: &str,
) {
    let master = MasterSecret::new(MASTER).unwrap();
    let rows = app.connections().await;
    legacy_copies_hold(&rows, plaintexts);
    // An old pod still runs and changes one row after its rotation: a
    // conflict (which copy is right is the operator's call).
    let conflicted = rows[7].id.clone();
    let newer = "{\"password\":\"written-after-rotation\"}";
    let (iv, ct) = encrypt_legacy(&master, newer.as_bytes());
    sqlx::query(&format!(
        "UPDATE connections SET encrypted_credentials = $2, credentials_iv = $3 \
         WHERE id = CAST($1 AS {id_type})"
    ))
    .bind(&conflicted)
    .bind(ct)
    .bind(iv.to_vec())
    .execute(pool)
    .await
    .unwrap();
    let copies = "SELECT COUNT(encrypted_credentials) FROM connections";
    let cutover = |args: &[&str]| keyward_on(url, &[&["legacy", "cutover"], args].concat());

    let refused = cutover(&[]);
    assert_eq!(refused.status.code(), Some(64), "{}", stderr(&refused));
    assert!(stderr(&refused).contains("--old-pods-stopped"));
    let dry = cutover(&["--dry-run"]);
    assert_eq!(dry.status.code(), Some(65), "{}", stderr(&dry));
    let report = stdout(&dry);
    assert!(report.contains("would clear 299 legacy copies"), "{report}");
    assert!(
        report.contains(&format!("conflict    connections {conflicted}:")),
        "{report}"
    );
    assert_eq!(
        scalar::<i64>(pool, copies).await,
        300,
        "the dry run cleared"
    );
    // The dry run's check is recorded: usage, the metrics and the
    // retirement plan count the conflict on the key its row is on.
    assert_eq!(
        legacy_conflicts(app).await,
        (1, vec![("connections".into(), 1)])
    );
    let usage = keyward_on(url, &["keys", "usage"]);
    assert!(
        stdout(&usage).contains("legacy copies of connections last checked")
            && stdout(&usage).contains(": 1 in conflict with their envelope"),
        "{}",
        stdout(&usage)
    );

    let archive_dir = tempfile::tempdir().unwrap();
    let archive = archive_dir.path().join("legacy.jsonl");
    let archive_arg = archive.to_str().unwrap();
    let out = cutover(&["--old-pods-stopped", "--archive-to", archive_arg]);
    assert_eq!(out.status.code(), Some(65), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("cleared 299 legacy copies"),
        "{}",
        stdout(&out)
    );
    let left: Vec<String> = sqlx::query_scalar(
        "SELECT CAST(id AS TEXT) FROM connections WHERE encrypted_credentials IS NOT NULL",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(left, std::slice::from_ref(&conflicted));
    let archived = std::fs::read_to_string(&archive).unwrap();
    // By the archived ids: the conflicted id's digits may occur inside
    // another line's base64 ciphertext.
    let ids: Vec<String> = crate::helpers::json_lines(&archived)
        .iter()
        .map(|line| line["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 299);
    assert!(!ids.contains(&conflicted));

    // The operator decides the old pod's write is right and stores it
    // through keyward; both copies agree, and the cutover finishes.
    let sealed = app
        .encrypt(newer.as_bytes(), &[("connection_id", conflicted.as_str())])
        .await;
    let envelope = sealed.envelope.unwrap();
    let update = format!(
        "UPDATE connections SET encryption_key_id = $2, data_key_ciphertext = $3, data_key_iv = $4, \
         payload_ciphertext = $5, payload_iv = $6 WHERE id = CAST($1 AS {id_type})"
    );
    bind_envelope!(sqlx::query(&update), &conflicted, envelope)
        .execute(pool)
        .await
        .unwrap();
    plaintexts.insert(conflicted, newer.to_owned());
    let out = cutover(&["--old-pods-stopped", "--archive-to", archive_arg]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains("no legacy copy is left"),
        "{}",
        stdout(&out)
    );
    assert_eq!(scalar::<i64>(pool, copies).await, 0);
    assert_eq!(
        legacy_conflicts(app).await,
        (0, vec![("connections".into(), 0)])
    );
    assert_eq!(
        std::fs::read_to_string(&archive).unwrap().lines().count(),
        300
    );
    crate::workers::assert_all_rotated(app, target, plaintexts).await;
}

/// Rows in conflict by key usage, and each target's last check.
async fn legacy_conflicts(app: &TestApp) -> (i64, Vec<(String, i64)>) {
    let admin = &app.services.admin;
    let usage = admin.key_usage().await.unwrap();
    let checks = admin.legacy_checks().await.unwrap();
    (
        usage.iter().map(|r| r.legacy_conflicts()).sum(),
        checks
            .into_iter()
            .map(|c| (c.target, c.conflicts))
            .collect(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_database_with_uuid_ids_is_adopted() {
    adopts_and_rotates("uuid DEFAULT gen_random_uuid()", "uuid").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_database_with_bigint_ids_is_adopted() {
    adopts_and_rotates("bigint GENERATED ALWAYS AS IDENTITY", "bigint").await;
}

/// A column keyward needs that the application declared with another type
/// is refused before anything changes, naming table, column and types.
#[tokio::test]
async fn an_incompatible_column_is_refused_and_nothing_changes() {
    let Some((url, pool)) = uuid_application_with(
        3,
        "ALTER TABLE connections ADD COLUMN payload_ciphertext integer",
    )
    .await
    else {
        return;
    };
    let before: String = scalar(&pool, APP_COLUMNS).await;
    let out = migrate(&url, &[]);
    assert_eq!(out.status.code(), Some(65), "{}", stderr(&out));
    let message = stderr(&out);
    assert!(
        message.contains("connections.payload_ciphertext is integer; keyward needs bytea"),
        "{message}"
    );
    assert!(message.contains("nothing was changed"), "{message}");
    let nothing: bool = scalar(
        &pool,
        "SELECT to_regclass('encryption_keys') IS NULL AND to_regclass('_sqlx_migrations') IS NULL \
         AND NOT EXISTS (SELECT 1 FROM information_schema.columns \
                         WHERE table_name = 'connections' AND column_name = 'data_key_ciphertext')",
    )
    .await;
    assert!(nothing, "a refused adoption changed the database");
    assert_eq!(before, scalar::<String>(&pool, APP_COLUMNS).await);
    let dry = stdout(&migrate(&url, &["--dry-run"]));
    assert!(dry.contains("and refuses it (exit status 65"), "{dry}");
}

/// Legacy columns the application declared NOT NULL cannot be cleared:
/// the cutover says so, with the statement the application's migrations
/// must run, and clears nothing (keyward does not change the application's
/// constraints); once they allow NULL, it finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cutover_refuses_legacy_columns_declared_not_null() {
    let Some((url, pool)) = uuid_application_with(
        5,
        "ALTER TABLE connections ALTER COLUMN encrypted_credentials SET NOT NULL, \
         ALTER COLUMN credentials_iv SET NOT NULL",
    )
    .await
    else {
        return;
    };
    let out = migrate(&url, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut app = spawn_on(Backend::Postgres, url.clone(), Options::default()).await;
    rotate_to_end(&app).await;
    app.shutdown().await;

    let out = keyward_on(&url, &["legacy", "cutover", "--old-pods-stopped"]);
    let shown = stdout(&out);
    assert_eq!(out.status.code(), Some(65), "{shown}{}", stderr(&out));
    for column in ["encrypted_credentials", "credentials_iv"] {
        assert!(
            shown.contains(&format!("refused     connections.{column} is NOT NULL")),
            "{shown}"
        );
        assert!(
            shown.contains(&format!(
                "ALTER TABLE connections ALTER COLUMN {column} DROP NOT NULL;"
            )),
            "{shown}"
        );
    }
    assert!(shown.contains("nothing was cleared"), "{shown}");
    let kept: i64 = scalar(
        &pool,
        "SELECT COUNT(*) FROM connections WHERE encrypted_credentials IS NOT NULL",
    )
    .await;
    assert_eq!(kept, 5);

    sqlx::raw_sql(
        "ALTER TABLE connections ALTER COLUMN encrypted_credentials DROP NOT NULL, \
         ALTER COLUMN credentials_iv DROP NOT NULL",
    )
    .execute(&pool)
    .await
    .unwrap();
    cutover_clears(&url, &[], 5);
}

/// State (b): the application's own migrations already made the runbook's
/// tables and columns (varchar ids, a smaller jobs table, uuid
/// connection ids for its scoped tokens). keyward adds only what they
/// lack, then works on them: a key is seeded and a new row round-trips.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_database_with_the_runbooks_tables_is_adopted() {
    let Some((url, pool)) = uuid_application_with(
        10,
        "CREATE TABLE encryption_keys (
             id varchar(36) PRIMARY KEY DEFAULT gen_random_uuid()::text,
             key_id varchar(255) NOT NULL UNIQUE,
             kms_key_arn text NOT NULL,
             alias varchar(255),
             status varchar(16) NOT NULL DEFAULT 'pending',
             created_at timestamp with time zone NOT NULL DEFAULT now(),
             updated_at timestamp with time zone NOT NULL DEFAULT now()
         );
         ALTER TABLE connections
             ADD COLUMN encryption_key_id varchar(36) REFERENCES encryption_keys (id),
             ADD COLUMN data_key_ciphertext bytea,
             ADD COLUMN data_key_iv bytea,
             ADD COLUMN payload_ciphertext bytea,
             ADD COLUMN payload_iv bytea;
         CREATE TABLE encryption_rotation_jobs (
             id text PRIMARY KEY DEFAULT gen_random_uuid()::text,
             status varchar(32) NOT NULL DEFAULT 'pending',
             target_key_id varchar(36) NOT NULL REFERENCES encryption_keys (id),
             created_at timestamp with time zone NOT NULL DEFAULT now(),
             updated_at timestamp with time zone NOT NULL DEFAULT now()
         );
         CREATE TABLE connection_scoped_tokens (
             id text PRIMARY KEY DEFAULT gen_random_uuid()::text,
             connection_id uuid NOT NULL REFERENCES connections (id) ON DELETE CASCADE,
             token_hash text NOT NULL UNIQUE,
             expires_at timestamp NOT NULL
         );",
    )
    .await
    else {
        return;
    };
    let before: String = scalar(&pool, APP_COLUMNS).await;
    for _ in 0..2 {
        let out = migrate(&url, &[]);
        assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    }
    assert_eq!(before, scalar::<String>(&pool, APP_COLUMNS).await);
    let id_type = column_type(&pool, "encryption_keys", "id").await;
    assert_eq!(
        id_type, "character varying(36)",
        "the application's type was changed"
    );
    let one_active: bool = scalar(
        &pool,
        "SELECT to_regclass('encryption_keys_one_active') IS NOT NULL",
    )
    .await;
    assert!(one_active, "no unique index keeps one active key at most");
    // The provider column adoption added takes pkcs11 keys (0014), and no
    // provider keyward does not know.
    let insert = |provider: &'static str| {
        sqlx::query(
            "INSERT INTO encryption_keys (key_id, kms_key_arn, provider) \
             VALUES ('hsm-' || $1, 'pkcs11:token=t;object=o', $1)",
        )
        .bind(provider)
        .execute(&pool)
    };
    insert("pkcs11").await.unwrap();
    assert!(
        insert("gcp").await.is_err(),
        "an unknown provider was stored"
    );
    sqlx::query("DELETE FROM encryption_keys WHERE key_id = 'hsm-pkcs11'")
        .execute(&pool)
        .await
        .unwrap();

    let app = spawn_on(Backend::Postgres, url.clone(), Options::default()).await;
    let sealed = app
        .encrypt(b"new credential", &[("connection_id", "n-1")])
        .await;
    assert_eq!(sealed.key_id, PRIMARY);
    let opened = app
        .crypto
        .clone()
        .decrypt(DecryptRequest {
            context: ctx(&[("connection_id", "n-1")]),
            ciphertext: Some(Ciphertext::Envelope(sealed.envelope.unwrap())),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(&opened.plaintext[..], b"new credential");
    // Its legacy rows rotate onto the seeded key.
    let job = rotate_to_end(&app).await;
    assert_eq!((job.succeeded_rows, job.failed_rows), (10, 0), "{job:?}");
}

/// The application declares statuses of its own: `encryption_keys.status`
/// a Drizzle `pgEnum` without `pending`, `encryption_rotation_jobs.status`
/// a CHECK without `pending`, `completed_with_errors` or `cancelled`. The
/// dry run prints the changes; `migrate` refuses to make them (exit 65,
/// nothing changed) unless `--allow-app-schema-changes`; then keys and
/// jobs go through every status keyward writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statuses_the_application_lacks_are_added_only_when_allowed() {
    let Some((url, pool)) = uuid_application_with(
        4,
        "CREATE TYPE encryption_key_status AS ENUM ('active', 'rotating', 'retired');
         CREATE TABLE encryption_keys (
             id text PRIMARY KEY DEFAULT gen_random_uuid()::text,
             key_id text NOT NULL UNIQUE,
             kms_key_arn text NOT NULL,
             status encryption_key_status NOT NULL DEFAULT 'active',
             created_at timestamp with time zone NOT NULL DEFAULT now(),
             updated_at timestamp with time zone NOT NULL DEFAULT now()
         );
         CREATE TABLE encryption_rotation_jobs (
             id text PRIMARY KEY DEFAULT gen_random_uuid()::text,
             status varchar(32) NOT NULL DEFAULT 'queued'
                 CHECK (status IN ('queued', 'running', 'completed', 'failed')),
             target_key_id text NOT NULL REFERENCES encryption_keys (id),
             created_at timestamp with time zone NOT NULL DEFAULT now(),
             updated_at timestamp with time zone NOT NULL DEFAULT now()
         );",
    )
    .await
    else {
        return;
    };

    let dry = stdout(&migrate(&url, &["--dry-run"]));
    assert!(
        dry.contains("first changes the application's own schema"),
        "{dry}"
    );
    assert!(
        dry.contains("ALTER TYPE encryption_key_status ADD VALUE IF NOT EXISTS 'pending'"),
        "{dry}"
    );
    assert!(
        dry.contains(
            "CHECK constraint encryption_rotation_jobs_status_check rejects 'pending', \
             'completed_with_errors', 'cancelled'"
        ),
        "{dry}"
    );

    migrate_refuses(&url, "--allow-app-schema-changes");
    let untouched: bool = scalar(
        &pool,
        "SELECT to_regclass('_sqlx_migrations') IS NULL AND NOT EXISTS (SELECT 1 FROM pg_enum \
         WHERE enumtypid = 'encryption_key_status'::regtype AND enumlabel = 'pending')",
    )
    .await;
    assert!(untouched, "a refused adoption changed the database");

    let out = migrate(&url, &["--allow-app-schema-changes"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let out = migrate(&url, &[]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let kept = column_type(&pool, "encryption_keys", "status").await;
    assert_eq!(
        kept, "encryption_key_status",
        "the application's type was changed"
    );

    // Every status keyward writes now fits: a pending key, a rotation to
    // it (pending, running, completed), the old key retired.
    let mut app = spawn_on(Backend::Postgres, url.clone(), Options::default()).await;
    let out = keyward_on(
        &url,
        &[
            "keys",
            "create",
            "--key-id",
            "next",
            "--kms-key-arn",
            "local:next",
        ],
    );
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let out = keyward_on(&url, &["keys", "activate", "next"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    app.services.admin.refresh().await.unwrap();
    let job = rotate_to_end(&app).await;
    assert_eq!((job.succeeded_rows, job.failed_rows), (4, 0), "{job:?}");
    app.shutdown().await;
    let out = keyward_on(&url, &["keys", "retire", PRIMARY]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let statuses: String = scalar(
        &pool,
        "SELECT string_agg(key_id || '=' || status::text, ',' ORDER BY key_id) FROM encryption_keys",
    )
    .await;
    assert_eq!(statuses, format!("next=active,{PRIMARY}=retired"));
}
