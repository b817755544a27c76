//! Ciphertext the application stores as text (issue: adoption). A Node
//! application often keeps `encrypted_credentials` as base64 (or hex) in a
//! `text` column. keyward adopts such a table (its own columns beside them
//! are text too), refuses to start until the target's encoding is
//! declared, then reads and writes every ciphertext column in that form:
//! rotation (whose wrap-tag predicate compares the stored text), a second
//! rotation that finds nothing to do, a value not in the encoding failing
//! its row alone, the master-secret status, and the cutover's
//! compare-and-swap.

use std::collections::HashMap;

use keyward::{
    api::proto::{decrypt_request::Ciphertext, DecryptRequest, Envelope},
    config::load_rotation_targets,
    rotation::target::Encoding,
};
use sqlx::{PgPool, SqlitePool};

use crate::{
    adoption::{cutover_clears, keyward_on, legacy_credentials, migrate, rotate_to_end},
    cli::{stderr, stdout},
    helpers::{ctx, spawn_on, Backend, Options},
    postgres,
};

/// Runs `$body` with `$pool` on the database at `$url`, either backend.
macro_rules! with_pool {
    ($url:expr, |$pool:ident| $body:expr) => {
        if $url.starts_with("postgres") {
            let $pool = PgPool::connect($url).await.unwrap();
            $body
        } else {
            let $pool = SqlitePool::connect($url).await.unwrap();
            $body
        }
    };
}

/// A row as stored: id, key id, data key, its IV, payload, its IV and the
/// legacy ciphertext, every ciphertext as text.
type StoredRow = (
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
);

const ROWS: &str = "SELECT CAST(id AS TEXT), encryption_key_id, data_key_ciphertext, data_key_iv, \
     payload_ciphertext, payload_iv, encrypted_credentials FROM connections ORDER BY id";

/// An application database whose legacy columns hold text in `encoding`,
/// with `rows` legacy rows and one whose ciphertext is not in the
/// encoding; its URL, the plaintexts by id and the malformed row's id.
async fn text_application(
    backend: Backend,
    encoding: Encoding,
    rows: usize,
    dir: &tempfile::TempDir,
) -> Option<(String, HashMap<String, String>, String)> {
    let (url, id_type, schema) = match backend {
        Backend::Postgres => (
            postgres::create_database(postgres::server_or_skip()?, "text").await,
            "uuid",
            "CREATE TABLE connections (id uuid PRIMARY KEY, name text NOT NULL, \
             encrypted_credentials text, credentials_iv text, \
             updated_at timestamp NOT NULL DEFAULT now())",
        ),
        Backend::Sqlite => (
            format!("sqlite://{}?mode=rwc", dir.path().join("app.db").display()),
            "TEXT",
            "CREATE TABLE connections (id text PRIMARY KEY NOT NULL, name text NOT NULL, \
             encrypted_credentials text, credentials_iv text, \
             updated_at text NOT NULL DEFAULT CURRENT_TIMESTAMP)",
        ),
    };
    let insert = format!(
        "INSERT INTO connections (id, name, encrypted_credentials, credentials_iv) \
         VALUES (CAST($1 AS {id_type}), $2, $3, $4)"
    );
    let text = |bytes: &[u8]| encoding.encode(bytes).into_text();
    let mut plaintexts = HashMap::new();
    let malformed = uuid::Uuid::new_v4().to_string();
    with_pool!(&url, |pool| {
        sqlx::query(schema).execute(&pool).await.unwrap();
        for (n, plaintext, iv, ct) in legacy_credentials(rows) {
            let id = uuid::Uuid::new_v4().to_string();
            sqlx::query(&insert)
                .bind(&id)
                .bind(format!("db-{n}"))
                .bind(text(&ct))
                .bind(text(&iv))
                .execute(&pool)
                .await
                .unwrap();
            plaintexts.insert(id, plaintext);
        }
        sqlx::query(&insert)
            .bind(&malformed)
            .bind("bad")
            .bind("%% not a ciphertext %%")
            .bind("%%")
            .execute(&pool)
            .await
            .unwrap();
    });
    Some((url, plaintexts, malformed))
}

async fn stored_rows(url: &str) -> Vec<StoredRow> {
    with_pool!(url, |pool| sqlx::query_as(ROWS)
        .fetch_all(&pool)
        .await
        .unwrap())
}

async fn text_ciphertext_rotates(backend: Backend, encoding: Encoding) {
    let dir = tempfile::tempdir().unwrap();
    let Some((url, plaintexts, malformed)) = text_application(backend, encoding, 40, &dir).await
    else {
        return;
    };
    let out = migrate(&url, &[]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));

    // Text columns, and no encoding declared: refused, naming what to do.
    let refused = keyward_on(&url, &["keys", "usage"]);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("connections.data_key_ciphertext is")
            && stderr(&refused).contains("but the rotation target's encoding is bytes"),
        "{}",
        stderr(&refused)
    );

    let targets = dir.path().join("targets.json");
    std::fs::write(
        &targets,
        format!(
            r#"[{{"table": "connections", "encoding": "{}"}}]"#,
            encoding.as_str()
        ),
    )
    .unwrap();
    let options = Options {
        targets: load_rotation_targets(&targets).unwrap(),
        ..Options::default()
    };
    let app = spawn_on(backend, url.clone(), options).await;
    let job = rotate_to_end(&app).await;
    assert_eq!(
        (job.total_rows, job.succeeded_rows, job.failed_rows),
        (41, 40, 1),
        "{job:?}"
    );
    assert!(
        job.last_error
            .contains(&format!("not {}", encoding.as_str())),
        "{}",
        job.last_error
    );

    // Every row is an envelope stored as text, and decrypts.
    let decode = |text: &Option<String>| encoding.decode(text.as_deref().unwrap().as_bytes());
    let mut client = app.crypto.clone();
    for (id, key, dk, dk_iv, ct, iv, legacy) in stored_rows(&url).await {
        if id == malformed {
            continue;
        }
        assert!(legacy.is_some(), "rotation cleared a legacy copy");
        let envelope = Envelope {
            encryption_key_id: key.unwrap(),
            data_key_ciphertext: decode(&dk).unwrap().into(),
            data_key_iv: decode(&dk_iv).unwrap().into(),
            payload_ciphertext: decode(&ct).unwrap().into(),
            payload_iv: decode(&iv).unwrap().into(),
        };
        let opened = client
            .decrypt(DecryptRequest {
                context: ctx(&[("connection_id", id.as_str())]),
                ciphertext: Some(Ciphertext::Envelope(envelope)),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(&opened.plaintext[..], plaintexts[&id].as_bytes());
    }

    // Rows on the key, wrapped by the current master secret, are found
    // done by comparing the stored text: a second rotation has nothing but
    // the malformed row.
    let again = rotate_to_end(&app).await;
    assert_eq!(
        (again.total_rows, again.succeeded_rows),
        (1, 0),
        "{again:?}"
    );
    let targets_arg = targets.to_str().unwrap();
    let status = keyward_on(
        &url,
        &["--rotation-targets", targets_arg, "master-secret", "status"],
    );
    assert!(
        stdout(&status).contains("(current): 40"),
        "{}{}",
        stdout(&status),
        stderr(&status)
    );

    // The cutover compares and clears the legacy copies as stored.
    with_pool!(&url, |pool| sqlx::query(&format!(
        "DELETE FROM connections WHERE CAST(id AS TEXT) = '{malformed}'"
    ))
    .execute(&pool)
    .await
    .map(|_| ())
    .unwrap());
    cutover_clears(&url, &["--rotation-targets", targets_arg], 40);
    assert!(stored_rows(&url).await.iter().all(|row| row.6.is_none()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base64_text_ciphertext_is_adopted_and_rotated_on_postgres() {
    text_ciphertext_rotates(Backend::Postgres, Encoding::Base64).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hex_text_ciphertext_is_adopted_and_rotated_on_sqlite() {
    text_ciphertext_rotates(Backend::Sqlite, Encoding::Hex).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base64_text_ciphertext_is_adopted_and_rotated_on_sqlite() {
    text_ciphertext_rotates(Backend::Sqlite, Encoding::Base64).await;
}
