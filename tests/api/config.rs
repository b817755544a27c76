//! `--config keyward.toml` with the real binary: settings from the file,
//! precedence (flag > environment > file > default), configuration errors
//! (exit status 64, naming the setting), and keyward.example.toml.

use std::{path::Path, process::Command, time::Duration};

use keyward::api::proto::{
    admin_client::AdminClient, crypto_client::CryptoClient, decrypt_request::Ciphertext,
    CreateKeyRequest, DecryptRequest, EncryptRequest,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

use crate::{
    cli::{free_port, keyward, run, stderr, stdout, Server},
    helpers::{ctx, json_lines},
};

fn write_config(dir: &Path, text: &str) -> String {
    let path = dir.join("keyward.toml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// Starts `keyward --config FILE serve [args]` expecting it on `addr`;
/// returns it once health is SERVING there.
async fn serve(mut cmd: Command, config: &str, args: &[&str], addr: &str) -> Server {
    cmd.args(["--config", config, "serve"]).args(args);
    let server = Server::spawn(cmd, addr.to_owned());
    server.wait_for_log("Encryption service initialized successfully");
    let mut health = HealthClient::new(server.channel().await);
    let status = health
        .check(HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, 1, "SERVING on {addr}");
    server
}

async fn http_get(addr: &str, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: k\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

/// Principal and key id are written into an RPC's span when its completion
/// event is written (not on every call): at DEBUG a successful Encrypt's
/// line has them, and an Admin change's own events carry them as well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn span_fields_reach_success_lines_and_admin_events() {
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let config = write_config(
        dir.path(),
        &format!("listen = \"{addr}\"\ndev = true\nlog_format = \"json\"\naudit_log = \"off\"\n"),
    );
    let mut cmd = keyward(dir.path());
    cmd.env("RUST_LOG", "info,keyward::api::observe=debug");
    let mut server = serve(cmd, &config, &[], &addr).await;
    let channel = server.channel().await;
    CryptoClient::new(channel.clone())
        .encrypt(EncryptRequest {
            plaintext: b"x".to_vec().into(),
            context: ctx(&[("connection_id", "a")]),
            ..Default::default()
        })
        .await
        .unwrap();
    AdminClient::new(channel)
        .create_key(CreateKeyRequest {
            key_id: "next".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    // Its "rpc finished" line is written once the response has gone out.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let lines = loop {
        let lines = json_lines(&server.log());
        let done = lines.iter().any(|l| {
            l["fields"]["message"] == "rpc finished" && l["span"]["method"] == "CreateKey"
        });
        if done {
            break lines;
        }
        assert!(std::time::Instant::now() < deadline, "{}", server.log());
        std::thread::sleep(std::time::Duration::from_millis(25));
    };
    let finished = |method: &str| {
        lines
            .iter()
            .find(|l| l["fields"]["message"] == "rpc finished" && l["span"]["method"] == method)
            .unwrap_or_else(|| panic!("no finish line for {method}"))
            .clone()
    };
    let encrypt = finished("Encrypt");
    assert_eq!(encrypt["level"], "DEBUG", "{encrypt}");
    assert_eq!(encrypt["span"]["principal"], "anonymous", "{encrypt}");
    assert_eq!(encrypt["span"]["key_id"], "dev-local", "{encrypt}");
    assert_eq!(encrypt["span"]["code"], "OK", "{encrypt}");
    assert_eq!(finished("CreateKey")["span"]["key_id"], "next");
    // An event the handler logs before the call ends.
    let registered = lines
        .iter()
        .find(|l| l["fields"]["message"] == "key registered" && l["fields"]["key_id"] == "next")
        .expect("the key change's own event");
    assert_eq!(registered["span"]["method"], "CreateKey", "{registered}");
    assert_eq!(registered["span"]["principal"], "anonymous", "{registered}");
    assert_eq!(registered["span"]["key_id"], "next", "{registered}");
    server.signal("-TERM");
    assert!(server.wait_exit(Duration::from_secs(15)).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_settings_apply_below_environment_and_flags() {
    let dir = tempfile::tempdir().unwrap();
    let [from_file, from_env, from_flag, metrics] =
        [(); 4].map(|()| format!("127.0.0.1:{}", free_port()));
    let config = write_config(
        dir.path(),
        &format!(
            "# keyward.toml\n\
             listen = \"{from_file}\"\n\
             metrics_listen = \"{metrics}\"\n\
             dev = true\n\
             log_format = \"json\"\n\
             audit_log = \"off\"\n\
             catalog_refresh_secs = 5\n\
             lease_secs = 45\n"
        ),
    );

    // The file alone: its address, its metrics endpoint, its log format.
    let mut server = serve(keyward(dir.path()), &config, &[], &from_file).await;
    let scrape = http_get(&metrics, "/metrics").await;
    assert!(scrape.starts_with("HTTP/1.1 200"), "{scrape}");
    assert!(scrape.contains("keyward_rpc_requests_total"), "{scrape}");
    // JSON logs, and an RPC refused (INFO) logs its span: method,
    // principal, key id and code, never the payload.
    let mut crypto = CryptoClient::new(server.channel().await);
    let sealed = crypto
        .encrypt(EncryptRequest {
            plaintext: b"payload-never-logged".to_vec().into(),
            context: ctx(&[("connection_id", "a")]),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let refused = crypto
        .decrypt(DecryptRequest {
            context: ctx(&[("connection_id", "b")]),
            ciphertext: Some(Ciphertext::Blob(sealed.blob)),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    server.wait_for_log("rpc finished");
    let log = server.log();
    // log_format = json, from the file: every line is JSON.
    let lines = json_lines(&log);
    let rpc = lines
        .iter()
        .find(|l| l["fields"]["message"] == "rpc finished")
        .unwrap();
    assert_eq!(rpc["level"], "INFO", "{rpc}");
    let span = &rpc["span"];
    assert_eq!(span["name"], "rpc", "{rpc}");
    assert_eq!(span["service"], "keyward.v1.Crypto", "{rpc}");
    assert_eq!(span["method"], "Decrypt", "{rpc}");
    assert_eq!(span["principal"], "anonymous", "{rpc}");
    assert_eq!(span["key_id"], "dev-local", "{rpc}");
    assert_eq!(span["code"], "INVALID_ARGUMENT", "{rpc}");
    assert!(rpc["fields"]["elapsed_ms"].as_f64().is_some(), "{rpc}");
    assert!(!log.contains("payload-never-logged"));
    server.signal("-TERM");
    assert!(server.wait_exit(Duration::from_secs(15)).success());

    // The environment beats the file.
    let mut cmd = keyward(dir.path());
    cmd.env("KEYWARD_LISTEN", &from_env);
    let mut server = serve(cmd, &config, &[], &from_env).await;
    assert!(std::net::TcpStream::connect(&from_file).is_err());
    server.signal("-TERM");
    assert!(server.wait_exit(Duration::from_secs(15)).success());

    // A flag beats both.
    let mut cmd = keyward(dir.path());
    cmd.env("KEYWARD_LISTEN", &from_env);
    let mut server = serve(cmd, &config, &["--listen", &from_flag], &from_flag).await;
    assert!(std::net::TcpStream::connect(&from_env).is_err());
    assert!(std::net::TcpStream::connect(&from_file).is_err());
    server.signal("-TERM");
    assert!(server.wait_exit(Duration::from_secs(15)).success());
}

#[test]
fn bad_configuration_exits_64_and_names_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, &[&str]); 6] = [
        (
            "lisen = \"127.0.0.1:1\"\n",
            &["unknown setting `lisen`", "did you mean `listen`?"],
        ),
        (
            "listen = \"nowhere\"\n",
            &["setting `listen`", "invalid value 'nowhere'"],
        ),
        (
            "dev = \"yes\"\n",
            &["setting `dev`", "expects true or false"],
        ),
        (
            "log_format = \"xml\"\n",
            &["setting `log_format`", "invalid value 'xml'"],
        ),
        (
            "max_batch_items = [1, 2]\n",
            &[
                "setting `max_batch_items`",
                "expects a string, a number or a boolean",
            ],
        ),
        ("listen = \n", &["invalid TOML"]),
    ];
    for (text, expected) in cases {
        let config = write_config(dir.path(), text);
        // No master secret: a bad setting that slipped through would fail
        // for that instead (and miss the message), never start a server.
        let out = run(keyward(dir.path()).args(["--config", &config, "serve"]));
        assert_eq!(out.status.code(), Some(64), "{text}: {}", stderr(&out));
        for needle in expected {
            assert!(
                stderr(&out).contains(needle),
                "{text}: no {needle:?} in {}",
                stderr(&out)
            );
        }
        assert!(stderr(&out).contains("keyward.toml"), "{}", stderr(&out));
    }

    // A file that is not there.
    let out = run(keyward(dir.path()).args(["--config", "/nonexistent/keyward.toml", "serve"]));
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(stderr(&out).contains("cannot read configuration file"));

    // Invalid values from the environment and flags are configuration
    // errors too.
    let out = run(keyward(dir.path())
        .env("KEYWARD_MAX_BATCH_ITEMS", "lots")
        .arg("serve"));
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("--max-batch-items"),
        "{}",
        stderr(&out)
    );
    let out = run(keyward(dir.path()).args(["serve", "--listen", "nowhere"]));
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));

    // Settings of other commands are no error: one file serves `serve`,
    // `worker` and the operator commands.
    let config = write_config(dir.path(), "listen = \"127.0.0.1:1\"\nlease_secs = 5\n");
    let out = run(keyward(dir.path()).args(["--config", &config, "migrate"]));
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn example_configuration_is_current_and_accepted() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let generated = run(keyward(dir.path()).arg("config-example"));
    assert!(generated.status.success());
    let example = std::fs::read_to_string(repo.join("keyward.example.toml")).unwrap();
    assert!(
        example == stdout(&generated),
        "keyward.example.toml is out of date: run `cargo run -- config-example > keyward.example.toml`"
    );
    for setting in [
        "database_url",
        "listen",
        "metrics_listen",
        "lease_secs",
        "log_format",
    ] {
        assert!(example.contains(&format!("# {setting} = ")), "{setting}");
    }
    // Every line uncommented: each default is a valid value (the unset ones
    // are left out).
    let uncommented: String = example
        .lines()
        .filter_map(|l| l.strip_prefix("# "))
        .filter(|l| {
            l.split_once(" = ").is_some_and(|(key, value)| {
                key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                    && !value.contains("(unset by default)")
            })
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let config = write_config(dir.path(), &uncommented);
    let out = run(keyward(dir.path()).args(["--config", &config, "migrate"]));
    assert!(out.status.success(), "{}\n{uncommented}", stderr(&out));
}
