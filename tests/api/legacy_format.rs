//! A platform whose legacy scheme is not keyward's default is adopted by
//! configuration: its own HKDF salt and info, and Node's `iv ‖ tag ‖
//! ciphertext` in `encrypted_credentials` with no `credentials_iv`. Its
//! rows decrypt, rotate, and are cut over; the format is recorded in the
//! database, so an operator command given none follows it, and one given
//! another refuses to start.

use std::collections::HashMap;

use keyward::{
    api::proto::{decrypt_request::Ciphertext, DecryptRequest, Envelope, StartRotationRequest},
    crypto::{
        legacy::{LegacyFormat, LegacyKdf, LegacyLayout},
        secret::MasterSecret,
    },
};

use crate::{
    cli::{keyward, run, stderr, stdout},
    helpers::{ctx, master, spawn_with, Backend, Options, MASTER},
    on_both_backends,
    rotation::{decrypt_all, start, watch_all},
};

/// The flags naming `format()`.
const FLAGS: [&str; 6] = [
    "--legacy-kdf-salt",
    "platform-salt",
    "--legacy-kdf-info",
    "credentials/v2",
    "--legacy-layout",
    "iv-tag-ciphertext",
];

fn format() -> LegacyFormat {
    LegacyFormat {
        kdf: LegacyKdf::HkdfSha256 {
            salt: "platform-salt".into(),
            info: "credentials/v2".into(),
        },
        layout: LegacyLayout::IvTagCiphertext,
    }
}

async fn a_legacy_scheme_of_the_platforms_own_is_configured(backend: Backend) {
    let mut secrets = master(MASTER, &[]);
    secrets.legacy = Some(format());
    let options = Options {
        master: Some(secrets),
        ..Options::default()
    };
    let Some(app) = spawn_with(backend, options).await else {
        return;
    };
    let secret = MasterSecret::new(MASTER).unwrap();
    let mut plaintexts = HashMap::new();
    for i in 0..3 {
        let id = format!("app-{i}");
        let plaintext = format!("postgres://user:pw-{i}@db/app");
        let (iv, ct) = format().encrypt(&secret, plaintext.as_bytes()).unwrap();
        assert!(iv.is_empty());
        app.insert_legacy_connection(&id, &ct, &iv, true).await;
        plaintexts.insert(id, plaintext);
    }

    // The application's new version sends the column as it is.
    let stored = app.connections().await;
    let opened = app
        .crypto
        .clone()
        .decrypt(DecryptRequest {
            context: ctx(&[("connection_id", "app-0")]),
            ciphertext: Some(Ciphertext::Envelope(Envelope {
                payload_ciphertext: stored[0].encrypted_credentials.clone().unwrap().into(),
                ..Envelope::default()
            })),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(opened.legacy);
    assert_eq!(&opened.plaintext[..], plaintexts["app-0"].as_bytes());

    let job_id = start(&app, StartRotationRequest::default()).await;
    let job = watch_all(&app, &job_id).await.pop().unwrap().job.unwrap();
    assert_eq!((job.succeeded_rows, job.failed_rows), (3, 0), "{job:?}");
    assert_eq!(decrypt_all(&app).await, plaintexts);

    let cutover = |flags: &[&str]| {
        let dir = tempfile::tempdir().unwrap();
        run(keyward(dir.path())
            .env("DATABASE_URL", &app.database_url)
            .env("ENCRYPTION_MASTER_KEY", MASTER)
            .args(flags)
            .args(["legacy", "cutover", "--old-pods-stopped"]))
    };
    // The server recorded the format: a process given another refuses to
    // start, naming both, and clears nothing.
    let out = cutover(&["--legacy-layout", "separate"]);
    assert_eq!(
        out.status.code(),
        Some(64),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("differs from the one the database records"),
        "{}",
        stderr(&out)
    );
    assert!(app
        .connections()
        .await
        .iter()
        .all(|r| r.encrypted_credentials.is_some()));
    // Its own flags agree; no flags follow the record.
    let out = cutover(&FLAGS[..2]);
    assert_eq!(
        out.status.code(),
        Some(64),
        "a partial format is another format"
    );
    let dir = tempfile::tempdir().unwrap();
    let shown = run(keyward(dir.path())
        .env("DATABASE_URL", &app.database_url)
        .args(["legacy", "format"]));
    assert!(
        stdout(&shown).contains("iv-tag-ciphertext"),
        "{}",
        stdout(&shown)
    );
    let out = cutover(&[]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains("cleared 3 legacy copies"),
        "{}",
        stdout(&out)
    );
    assert!(app
        .connections()
        .await
        .iter()
        .all(|row| row.encrypted_credentials.is_none()));
    assert_eq!(decrypt_all(&app).await, plaintexts);
}

on_both_backends!(a_legacy_scheme_of_the_platforms_own_is_configured);
