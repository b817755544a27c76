//! Stores a connection's credentials the way keyward's README recommends:
//! encrypted with the row's own context `{"connection_id": id}`, the
//! envelope in the row's columns; then reads the row back and decrypts it.
//!
//! ```sh
//! keyward serve --dev &                      # a local sandbox
//! cargo run -p keyward-client --example store_row -- http://127.0.0.1:50051
//! ```
//! `KEYWARD_TOKEN` is sent as the bearer token when set.

use keyward_client::{context, proto::Envelope, Client};
use sqlx::{sqlite::SqlitePoolOptions, Row};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "http://127.0.0.1:50051".into());
    let mut builder = Client::builder(url);
    if let Ok(token) = std::env::var("KEYWARD_TOKEN") {
        builder = builder.token(token);
    }
    let client = builder.connect().await?;

    // The application's table (here an in-memory SQLite database).
    let db = SqlitePoolOptions::new()
        .max_connections(1)
        .connect("sqlite::memory:")
        .await?;
    sqlx::query(
        "CREATE TABLE connections (id TEXT PRIMARY KEY, name TEXT, encryption_key_id TEXT, \
         data_key_ciphertext BLOB, data_key_iv BLOB, payload_ciphertext BLOB, payload_iv BLOB)",
    )
    .execute(&db)
    .await?;

    // Write: encrypt with the row's context, store the envelope's fields.
    let id = "42";
    let sealed = client
        .encrypt(
            &br#"{"password":"hunter2"}"#[..],
            &context([("connection_id", id)]),
        )
        .await?;
    let envelope = sealed.envelope.ok_or("the server returned no envelope")?;
    sqlx::query("INSERT INTO connections VALUES ($1, $2, $3, $4, $5, $6, $7)")
        .bind(id)
        .bind("billing database")
        .bind(&envelope.encryption_key_id)
        .bind(envelope.data_key_ciphertext.to_vec())
        .bind(envelope.data_key_iv.to_vec())
        .bind(envelope.payload_ciphertext.to_vec())
        .bind(envelope.payload_iv.to_vec())
        .execute(&db)
        .await?;

    // Read: the row's columns back into an envelope, decrypted with the
    // same row's context.
    let row = sqlx::query("SELECT * FROM connections WHERE id = $1")
        .bind(id)
        .fetch_one(&db)
        .await?;
    let stored = Envelope {
        encryption_key_id: row.try_get("encryption_key_id")?,
        data_key_ciphertext: row.try_get::<Vec<u8>, _>("data_key_ciphertext")?.into(),
        data_key_iv: row.try_get::<Vec<u8>, _>("data_key_iv")?.into(),
        payload_ciphertext: row.try_get::<Vec<u8>, _>("payload_ciphertext")?.into(),
        payload_iv: row.try_get::<Vec<u8>, _>("payload_iv")?.into(),
    };
    let opened = client
        .decrypt(stored.clone(), &context([("connection_id", id)]))
        .await?;
    if &opened.plaintext[..] != br#"{"password":"hunter2"}"# {
        return Err("the credentials did not come back".into());
    }
    println!("row {id} stored under key {} and read back", sealed.key_id);

    // Another row's context does not open it.
    let refused = client
        .decrypt(stored, &context([("connection_id", "43")]))
        .await;
    match refused {
        Err(keyward_client::Error::InvalidArgument(_)) => {
            println!("row 43's context cannot decrypt row 42's credentials");
            Ok(())
        }
        other => Err(format!("expected INVALID_ARGUMENT, got {other:?}").into()),
    }
}
