//! The `keyward` binary: start-up refusal, `serve --dev`, graceful SIGTERM,
//! and the operator commands of the runbook, run as real processes.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Output, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use keyward::api::proto::{decrypt_request::Ciphertext, DecryptRequest, EncryptRequest};
use tonic::transport::Channel;
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

use crate::helpers::{bind_envelope, ctx, json_lines};

const BIN: &str = env!("CARGO_BIN_EXE_keyward");
const SECRET: &str = "cli-test-master-secret-0123456789";

/// A `keyward` command with a clean environment and its own database.
pub(crate) fn keyward(dir: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env(
            "DATABASE_URL",
            format!("sqlite://{}", dir.join("keyward.db").display()),
        )
        .stdin(Stdio::null());
    cmd
}

/// [`keyward`] with the master secret set.
fn with_secret(dir: &Path) -> Command {
    let mut cmd = keyward(dir);
    cmd.env("ENCRYPTION_MASTER_KEY", SECRET);
    cmd
}

/// A pool on the `keyward.db` a test's commands use in `dir`.
async fn sqlite_db(dir: &Path) -> sqlx::SqlitePool {
    sqlx::SqlitePool::connect(&format!("sqlite://{}", dir.join("keyward.db").display()))
        .await
        .unwrap()
}

pub(crate) fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap()
}

pub(crate) fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub(crate) fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running `keyward serve` whose stderr is collected as it arrives.
pub(crate) struct Server {
    pub(crate) child: Child,
    log: Arc<Mutex<String>>,
    pub(crate) addr: String,
}

impl Server {
    pub(crate) fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn start(cmd: Command) -> Server {
        Self::start_with(cmd, &[])
    }

    fn start_with(mut cmd: Command, serve_args: &[&str]) -> Server {
        let addr = format!("127.0.0.1:{}", free_port());
        cmd.args(["serve", "--listen", &addr]).args(serve_args);
        Self::spawn(cmd, addr)
    }

    /// Spawns `cmd` (a complete `serve` command line) that is to listen on
    /// `addr`.
    pub(crate) fn spawn(mut cmd: Command, addr: String) -> Server {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        Server { child, log, addr }
    }

    pub(crate) fn wait_for_log(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.log.lock().unwrap().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in log:\n{}",
                self.log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    pub(crate) fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub(crate) fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "server did not exit in time");
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    pub(crate) async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn serve_refuses_to_start_without_a_master_secret() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(keyward(dir.path()).args(["serve", "--listen", "127.0.0.1:0"]));
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("ENCRYPTION_MASTER_KEY"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("--dev"));
    let weak = run(keyward(dir.path())
        .env("ENCRYPTION_MASTER_KEY", "short")
        .args(["serve"]));
    assert_eq!(weak.status.code(), Some(64), "{}", stderr(&weak));
    assert!(
        !stderr(&weak).contains("short"),
        "the secret must not be echoed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_dev_serves_and_drains_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = keyward(dir.path());
    cmd.arg("--log-format")
        .arg("json")
        .env("KEYWARD_DEV", "true");
    let mut server = Server::start(cmd);
    server.wait_for_log("Encryption service initialized successfully");
    let log = server.log.lock().unwrap().clone();
    assert!(log.contains("NO MASTER SECRET WAS CONFIGURED"), "{log}");

    let key_file = dir.path().join("keyward.master.key");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&key_file).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let secret = std::fs::read_to_string(&key_file).unwrap();
    assert!(
        !log.contains(secret.trim()),
        "the master secret must never be logged"
    );

    let channel = server.channel().await;
    let health = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.status, 1);
    let mut crypto = keyward::api::proto::crypto_client::CryptoClient::new(channel);
    let sealed = crypto
        .encrypt(EncryptRequest {
            plaintext: b"dev secret".to_vec().into(),
            context: ctx(&[("connection_id", "1")]),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sealed.key_id, keyward::app::DEV_KEY_ID);

    server.signal("-TERM");
    let status = server.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "exit status {status:?}");
    server.wait_for_log("draining");

    // A restart reuses the same development secret: old data still decrypts.
    let server = Server::start_with(keyward(dir.path()), &["--dev"]);
    server.wait_for_log("Encryption service initialized successfully");
    let mut crypto = keyward::api::proto::crypto_client::CryptoClient::new(server.channel().await);
    let opened = crypto
        .decrypt(DecryptRequest {
            context: ctx(&[("connection_id", "1")]),
            ciphertext: Some(Ciphertext::Blob(sealed.blob)),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(&opened.plaintext[..], b"dev secret");
}

#[test]
fn operator_commands_follow_the_runbook() {
    let dir = tempfile::tempdir().unwrap();
    let with_secret = |args: &[&str]| {
        let mut cmd = keyward(dir.path());
        cmd.env("ENCRYPTION_MASTER_KEY", SECRET).args(args);
        run(&mut cmd)
    };

    let out = with_secret(&["migrate"]);
    assert!(out.status.success(), "{}", stderr(&out));

    // Baseline §2: seed-key honours the DEFAULT_ENCRYPTION_* variables and
    // prints the record id.
    let mut cmd = keyward(dir.path());
    cmd.env("ENCRYPTION_MASTER_KEY", SECRET)
        .env("DEFAULT_ENCRYPTION_KEY_ID", "2024-12-local")
        .env("DEFAULT_ENCRYPTION_KEY_ALIAS", "dev/app")
        .arg("seed-key");
    let out = run(&mut cmd);
    assert!(out.status.success(), "{}", stderr(&out));
    let id = stdout(&out).trim().to_owned();
    assert_eq!(id.len(), 36, "record id printed: {id}");
    // Re-running re-asserts the same key.
    let mut cmd = keyward(dir.path());
    cmd.env("LOCAL_KMS_SECRET", SECRET)
        .env("DEFAULT_ENCRYPTION_KEY_ID", "2024-12-local")
        .arg("seed-key");
    let again = run(&mut cmd);
    assert_eq!(stdout(&again).trim(), id, "{}", stderr(&again));

    let out = with_secret(&[
        "keys",
        "create",
        "--key-id",
        "2025-03",
        "--alias",
        "prod/app/2025-03",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = with_secret(&["keys", "activate", "2025-03"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("2024-12-local is now rotating"),
        "{}",
        stdout(&out)
    );

    let list = stdout(&with_secret(&["keys", "list"]));
    let line = |key: &str| {
        list.lines()
            .find(|l| l.contains(key))
            .unwrap_or_default()
            .to_owned()
    };
    assert!(line("2025-03 ").contains("active"), "{list}");
    assert!(line("2024-12-local").contains("rotating"), "{list}");

    let out = with_secret(&["self-test"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("✅ passed"));

    let out = with_secret(&["keys", "retire", "2024-12-local"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = with_secret(&["keys", "retire", "no-such-key"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no key with key_id"),
        "{}",
        stderr(&out)
    );

    // A key whose provider is not configured fails the self-test.
    let out = with_secret(&[
        "keys",
        "create",
        "--key-id",
        "aws-next",
        "--kms-key-arn",
        "alias/app/next",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = with_secret(&["self-test"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains("FAIL  aws-next"), "{}", stdout(&out));
    assert!(stdout(&out).contains("❌ failed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_fixture_rows_decrypt_through_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = keyward(dir.path());
    cmd.env("ENCRYPTION_MASTER_KEY", SECRET)
        .args([
            "legacy-encrypt",
            "--connection-id",
            "conn-7",
            "--name",
            "warehouse",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), b"legacy-password").unwrap();
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));

    let pool = sqlite_db(dir.path()).await;
    let (key, ct, iv, mirror): (Option<String>, Vec<u8>, Vec<u8>, Vec<u8>) = sqlx::query_as(
        "SELECT encryption_key_id, encrypted_credentials, credentials_iv, payload_ciphertext FROM connections WHERE id = 'conn-7'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(key.is_none());
    assert_eq!(ct, mirror);

    let mut cmd = keyward(dir.path());
    cmd.env("ENCRYPTION_MASTER_KEY", SECRET)
        .env("KEYWARD_DEV", "1");
    let server = Server::start(cmd);
    server.wait_for_log("initialized successfully");
    let mut crypto = keyward::api::proto::crypto_client::CryptoClient::new(server.channel().await);
    let opened = crypto
        .decrypt(DecryptRequest {
            context: ctx(&[("connection_id", "conn-7")]),
            ciphertext: Some(Ciphertext::Envelope(keyward::api::proto::Envelope {
                payload_ciphertext: ct.into(),
                payload_iv: iv.into(),
                ..Default::default()
            })),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(&opened.plaintext[..], b"legacy-password");
    assert!(opened.legacy);
}

#[test]
fn dev_without_authentication_is_loopback_only() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(keyward(dir.path()).args(["serve", "--dev", "--listen", "0.0.0.0:0"]));
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(stderr(&out).contains("loopback"), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("--insecure-no-auth"),
        "{}",
        stderr(&out)
    );
    assert!(
        !dir.path().join("keyward.master.key").exists(),
        "refused before creating anything"
    );
}

#[test]
fn plaintext_beyond_loopback_needs_insecure_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["serve", "--listen", "0.0.0.0:0"][..],
        &["serve", "--metrics-listen", "0.0.0.0:0"],
    ] {
        let out = run(with_secret(dir.path()).args(args));
        assert_eq!(out.status.code(), Some(64), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("--insecure-plaintext"),
            "{}",
            stderr(&out)
        );
    }
    // With the flag (here from the environment) it starts, warning loudly.
    let port = free_port();
    let mut cmd = with_secret(dir.path());
    cmd.env("KEYWARD_INSECURE_PLAINTEXT", "true");
    let server = Server::spawn(
        {
            cmd.args(["serve", "--listen", &format!("0.0.0.0:{port}")]);
            cmd
        },
        format!("127.0.0.1:{port}"),
    );
    server.wait_for_log("keyward listening");
    assert!(
        server.log().contains("INSECURE: gRPC on 0.0.0.0"),
        "{}",
        server.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_from_the_cli_authenticate_and_revoke() {
    let dir = tempfile::tempdir().unwrap();
    let with_secret = || with_secret(dir.path());
    assert!(run(with_secret().arg("seed-key")).status.success());
    let created = run(with_secret().args([
        "token", "create", "--name", "billing", "--role", "encrypt", "--role", "decrypt",
    ]));
    assert!(created.status.success(), "{}", stderr(&created));
    let token = stdout(&created).trim().to_owned();
    assert!(token.starts_with("kw_"), "{token}");
    assert!(stderr(&created).contains("shown once"));
    let listed = stdout(&run(with_secret().args(["token", "list"])));
    assert!(
        listed.contains("billing") && listed.contains("encrypt,decrypt"),
        "{listed}"
    );
    assert!(!listed.contains(&token), "list never shows a token");
    let bad_role = run(with_secret().args(["token", "create", "--name", "x", "--role", "root"]));
    assert_eq!(bad_role.status.code(), Some(64), "{}", stderr(&bad_role));

    // A server without --dev requires the token. The full catalog reload
    // is left at its 30 s default: revocation must not wait for it.
    let server = Server::start_with(with_secret(), &["--audit-log", "off"]);
    server.wait_for_log("Encryption service initialized successfully");
    let mut client = keyward::api::proto::crypto_client::CryptoClient::new(server.channel().await);
    let request = |token: Option<&str>| {
        let mut req = tonic::Request::new(EncryptRequest {
            plaintext: b"card".to_vec().into(),
            context: ctx(&[("connection_id", "1")]),
            ..Default::default()
        });
        if let Some(token) = token {
            req.metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        req
    };
    let status = client.encrypt(request(None)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    client.encrypt(request(Some(&token))).await.unwrap();

    let revoked = run(with_secret().args(["token", "revoke", "billing"]));
    assert!(revoked.status.success(), "{}", stderr(&revoked));
    let revoked_at = Instant::now();
    // One catalog poll (1 s by default) and the reload: well within 5 s.
    let deadline = revoked_at + Duration::from_secs(5);
    loop {
        match client.encrypt(request(Some(&token))).await {
            Err(status) if status.code() == tonic::Code::Unauthenticated => break,
            _ => {
                assert!(Instant::now() < deadline, "the revoked token kept working");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    println!(
        "revocation delay (SQLite, --catalog-poll-ms 1000): {} ms after `keyward token revoke` exited",
        revoked_at.elapsed().as_millis()
    );
    let log = server.log.lock().unwrap().clone();
    assert!(!log.contains(&token), "a token reached the server log");
    drop(server);

    // `serve --dev` on a database that holds live tokens keeps
    // authentication on, although it is on loopback.
    let created =
        run(with_secret().args(["token", "create", "--name", "ops", "--role", "encrypt"]));
    assert!(created.status.success(), "{}", stderr(&created));
    let server = Server::start_with(with_secret(), &["--dev", "--audit-log", "off"]);
    server.wait_for_log("authentication stays on");
    server.wait_for_log("Encryption service initialized successfully");
    let mut client = keyward::api::proto::crypto_client::CryptoClient::new(server.channel().await);
    let status = client.encrypt(request(None)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    let ops = stdout(&created).trim().to_owned();
    client.encrypt(request(Some(&ops))).await.unwrap();
}

/// A full session against a real server logging at TRACE: encrypt, decrypt,
/// failures (wrong context, tampered ciphertext, bad token), key
/// activation and a rotation with a corrupt row. No plaintext, data key,
/// master secret or token may appear in the log, the audit log, any error
/// message, `last_error` column or job error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_secret_reaches_logs_audit_or_errors() {
    use base64::Engine as _;
    use keyward::{
        api::proto::{
            admin_client::AdminClient, crypto_client::CryptoClient, BatchDecryptRequest,
            CreateKeyRequest, GetRotationJobRequest, ListKeysRequest, RotationStatus,
            StartRotationRequest,
        },
        crypto::{
            context::EncryptionContext,
            kms::{local::LocalKms, KekRef, KmsProvider},
            secret::MasterSecret,
        },
    };

    let dir = tempfile::tempdir().unwrap();
    let audit_path = dir.path().join("audit.log");
    let with_secret = || with_secret(dir.path());
    assert!(run(with_secret().arg("seed-key")).status.success());
    let created = run(with_secret().args([
        "token",
        "create",
        "--name",
        "leak-test",
        "--role",
        "admin",
        "--role",
        "encrypt",
        "--role",
        "decrypt",
    ]));
    let token = stdout(&created).trim().to_owned();
    let mut cmd = with_secret();
    cmd.env("RUST_LOG", "trace");
    let audit_arg = audit_path.display().to_string();
    let server = Server::start_with(
        cmd,
        &["--audit-log", &audit_arg, "--catalog-refresh-secs", "1"],
    );
    server.wait_for_log("Encryption service initialized successfully");
    let channel = server.channel().await;
    let auth = {
        let value: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
        move |mut req: tonic::Request<()>| {
            req.metadata_mut().insert("authorization", value.clone());
            Ok(req)
        }
    };
    let mut crypto = CryptoClient::with_interceptor(channel.clone(), auth.clone());
    let mut admin = AdminClient::with_interceptor(channel, auth);

    let plaintexts = [
        "PLAINTEXT-alpha-93af1",
        "PLAINTEXT-beta-5c2d7",
        "PLAINTEXT-gamma-e81b0",
    ];
    let mut errors = Vec::new();
    let mut envelopes = Vec::new();
    let pool = sqlite_db(dir.path()).await;
    for (i, plaintext) in plaintexts.iter().enumerate() {
        let id = format!("row-{i}");
        let env = crypto
            .encrypt(EncryptRequest {
                plaintext: plaintext.as_bytes().to_vec().into(),
                context: ctx(&[("connection_id", &id)]),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .envelope
            .unwrap();
        let insert = sqlx::query(
            "INSERT INTO connections (id, name, encryption_key_id, data_key_ciphertext, data_key_iv, \
             payload_ciphertext, payload_iv) VALUES ($1, $1, $2, $3, $4, $5, $6)",
        );
        bind_envelope!(insert, &id, env)
            .execute(&pool)
            .await
            .unwrap();
        envelopes.push((id, env));
    }
    let decrypt = |env: &keyward::api::proto::Envelope, id: &str| DecryptRequest {
        context: ctx(&[("connection_id", id)]),
        ciphertext: Some(Ciphertext::Envelope(env.clone())),
    };
    let (id0, env0) = &envelopes[0];
    crypto.decrypt(decrypt(env0, id0)).await.unwrap();
    errors.push(crypto.decrypt(decrypt(env0, "row-9")).await.unwrap_err());
    let mut tampered = env0.clone();
    let mut ct = tampered.payload_ciphertext.to_vec();
    ct[0] ^= 0x40;
    tampered.payload_ciphertext = ct.into();
    errors.push(crypto.decrypt(decrypt(&tampered, id0)).await.unwrap_err());
    crypto
        .batch_decrypt(BatchDecryptRequest {
            items: vec![decrypt(env0, id0), decrypt(&tampered, id0)],
        })
        .await
        .unwrap();
    let mut stranger = CryptoClient::new(server.channel().await);
    errors.push(stranger.decrypt(decrypt(env0, id0)).await.unwrap_err());

    // Corrupt row 2, then rotate everything to a new key.
    sqlx::query("UPDATE connections SET payload_ciphertext = X'00112233445566778899AABBCCDDEEFF0011' WHERE id = 'row-2'")
        .execute(&pool)
        .await
        .unwrap();
    admin
        .create_key(CreateKeyRequest {
            key_id: "next".into(),
            activate: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let job = admin
        .start_rotation(StartRotationRequest::default())
        .await
        .unwrap()
        .into_inner()
        .id;
    let deadline = Instant::now() + Duration::from_secs(30);
    let job = loop {
        let current = admin
            .get_rotation_job(GetRotationJobRequest {
                job_id: job.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        if current.status() == RotationStatus::CompletedWithErrors {
            break current;
        }
        assert!(
            Instant::now() < deadline,
            "rotation did not finish: {current:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let last_errors: Vec<(Option<String>,)> = sqlx::query_as("SELECT last_error FROM connections")
        .fetch_all(&pool)
        .await
        .unwrap();

    // The data keys of the original envelopes, unwrapped the way keyward does.
    let keys = admin
        .list_keys(ListKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .keys;
    let primary = keys.iter().find(|k| k.key_id == "primary").unwrap();
    let kms = LocalKms::new(MasterSecret::new(SECRET).unwrap(), vec![]);
    let mut forbidden: Vec<String> = plaintexts.iter().map(|p| p.to_string()).collect();
    forbidden.push(SECRET.into());
    forbidden.push(token.clone());
    for (id, env) in &envelopes {
        let context = EncryptionContext::from_pairs([("connection_id", id.as_str())]).unwrap();
        let kek = KekRef {
            record_id: &primary.id,
            kms_key_arn: &primary.kms_key_arn,
        };
        let data_key = kms
            .decrypt_data_key(kek, &env.data_key_ciphertext, &env.data_key_iv, &context)
            .await
            .unwrap();
        let bytes = data_key.dangerous_bytes();
        forbidden.push(hex::encode(bytes));
        forbidden.push(hex::encode_upper(bytes));
        forbidden.push(base64::engine::general_purpose::STANDARD.encode(bytes));
        forbidden.push(format!("{:?}", &bytes[..]).replace(' ', ""));
        forbidden.push(format!("{:?}", &bytes[..]));
    }

    let server_log = server.log.lock().unwrap().clone();
    drop(server);
    assert!(server_log.contains("TRACE"), "the server logged at TRACE");
    let mut haystacks = vec![
        ("server log", server_log),
        ("audit log", std::fs::read_to_string(&audit_path).unwrap()),
        ("job error", job.last_error.clone()),
    ];
    for status in &errors {
        haystacks.push(("error message", status.message().to_owned()));
    }
    for (last_error,) in last_errors {
        haystacks.push(("last_error", last_error.unwrap_or_default()));
    }
    assert!(
        haystacks.iter().any(|(_, h)| h.contains("row-")),
        "the audit log has the session"
    );
    for (what, haystack) in &haystacks {
        for secret in &forbidden {
            assert!(
                !haystack.contains(secret.as_str()),
                "{what} contains a secret: {secret}"
            );
        }
    }
}

/// The scale-out commands against a running server: a staged activation
/// the server confirms, `replicas list`, `keys usage`, and the retirement
/// plan before and after the rotation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_usage_and_retirement_commands() {
    let dir = tempfile::tempdir().unwrap();
    let with_secret = || with_secret(dir.path());
    assert!(run(with_secret().arg("seed-key")).status.success());
    let server = Server::start_with(
        with_secret(),
        &["--dev", "--heartbeat-secs", "1", "--catalog-poll-ms", "100"],
    );
    server.wait_for_log("Encryption service initialized successfully");

    // One application row under the seeded key.
    let sealed = keyward::api::proto::crypto_client::CryptoClient::new(server.channel().await)
        .encrypt(EncryptRequest {
            plaintext: b"pw".to_vec().into(),
            context: ctx(&[("connection_id", "c-1")]),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let envelope = sealed.envelope.unwrap();
    let db = sqlite_db(dir.path()).await;
    sqlx::query(
        "INSERT INTO connections (id, encryption_key_id, data_key_ciphertext, data_key_iv, \
         payload_ciphertext, payload_iv) VALUES ('c-1', $1, $2, $3, $4, $5)",
    )
    .bind(&envelope.encryption_key_id)
    .bind(envelope.data_key_ciphertext.to_vec())
    .bind(envelope.data_key_iv.to_vec())
    .bind(envelope.payload_ciphertext.to_vec())
    .bind(envelope.payload_iv.to_vec())
    .execute(&db)
    .await
    .unwrap();
    db.close().await;

    assert!(
        run(with_secret().args(["keys", "create", "--key-id", "next"]))
            .status
            .success()
    );
    let staged = run(with_secret().args([
        "keys",
        "activate",
        "next",
        "--staged",
        "--staged-timeout-secs",
        "20",
    ]));
    assert!(staged.status.success(), "{}", stderr(&staged));
    assert!(
        stdout(&staged).contains("confirmed by serve-"),
        "{}",
        stdout(&staged)
    );
    assert!(
        stdout(&staged).contains(&server.addr),
        "{}",
        stdout(&staged)
    );
    assert!(stdout(&staged).contains("previous active key primary is now rotating"));

    let replicas = stdout(&run(with_secret().args(["replicas", "list"])));
    assert!(replicas.contains("catalog version"), "{replicas}");
    assert!(replicas.contains(&server.addr), "{replicas}");
    assert!(replicas.contains("next ok"), "{replicas}");

    let usage = stdout(&run(with_secret().args(["keys", "usage"])));
    let line = |key: &str| {
        usage
            .lines()
            .find(|l| l.starts_with(key))
            .unwrap_or_else(|| panic!("no {key} in {usage}"))
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    assert_eq!(
        line("primary")[..4],
        ["primary", "rotating", "connections", "1"]
    );
    assert_eq!(line("next")[..4], ["next", "active", "connections", "0"]);
    assert_eq!(line("(legacy)")[..4], ["(legacy)", "-", "connections", "0"]);

    let plan = run(with_secret().args(["keys", "retire", "primary", "--dry-run"]));
    assert_eq!(plan.status.code(), Some(1), "{}", stdout(&plan));
    assert!(
        stdout(&plan).contains("1 rows are still on it"),
        "{}",
        stdout(&plan)
    );
    assert!(
        stdout(&plan).contains("keyward rotate start --target next"),
        "{}",
        stdout(&plan)
    );
    let refused = run(with_secret().args(["keys", "retire", "primary"]));
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("cannot be retired yet"),
        "{}",
        stderr(&refused)
    );

    let rotated = run(with_secret().args(["rotate", "start", "--watch"]));
    assert!(rotated.status.success(), "{}", stderr(&rotated));
    let plan = run(with_secret().args(["keys", "retire", "primary", "--dry-run"]));
    assert!(plan.status.success(), "{}", stdout(&plan));
    assert!(
        stdout(&plan).contains("key primary can be retired"),
        "{}",
        stdout(&plan)
    );
    let retired = run(with_secret().args(["keys", "retire", "primary"]));
    assert!(retired.status.success(), "{}", stderr(&retired));
    assert!(stdout(&retired).contains("retired"));
}

/// `.env` in the working directory is read, as the runbook's services read
/// it; the real environment wins over it; a line that cannot be parsed is
/// reported without its text (it may hold a secret).
#[test]
fn dot_env_in_the_working_directory_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let dot_env = dir.path().join(".env");
    std::fs::write(
        &dot_env,
        format!("ENCRYPTION_MASTER_KEY={SECRET}\nDEFAULT_ENCRYPTION_KEY_ID=from-dotenv\n"),
    )
    .unwrap();
    let out = run(keyward(dir.path()).arg("seed-key"));
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run(keyward(dir.path())
        .env("DEFAULT_ENCRYPTION_KEY_ID", "from-env")
        .arg("seed-key"));
    assert!(out.status.success(), "{}", stderr(&out));
    let keys = stdout(&run(keyward(dir.path()).args(["keys", "list"])));
    assert!(
        keys.contains("from-dotenv") && keys.contains("from-env"),
        "{keys}"
    );

    std::fs::write(
        &dot_env,
        format!("ENCRYPTION_MASTER_KEY={SECRET}\nnot a setting 'secret-tail\n"),
    )
    .unwrap();
    let out = run(keyward(dir.path()).args(["keys", "list"]));
    assert!(out.status.success(), "{}", stderr(&out));
    let warned = stderr(&out);
    assert!(
        warned.contains("a line of .env cannot be parsed"),
        "{warned}"
    );
    assert!(
        !warned.contains("secret-tail") && !warned.contains(SECRET),
        "{warned}"
    );
}

/// A key record whose bare name was taken as a local key (made before
/// such names were refused, or by the runbook's SQL) keeps working, and
/// `keys list` and `self-test` point it out.
#[tokio::test]
async fn a_key_named_without_local_prefix_is_pointed_out() {
    let dir = tempfile::tempdir().unwrap();
    assert!(run(with_secret(dir.path()).arg("migrate")).status.success());
    let db = sqlite_db(dir.path()).await;
    sqlx::query(
        "INSERT INTO encryption_keys (key_id, kms_key_arn, status) VALUES ('old-app', 'my-key', 'active')",
    )
    .execute(&db)
    .await
    .unwrap();
    db.close().await;
    let note = "note: key old-app has kms_key_arn \"my-key\", taken as a local key name";
    let listed = run(with_secret(dir.path()).args(["keys", "list"]));
    assert!(stdout(&listed).contains(note), "{}", stdout(&listed));
    let tested = run(with_secret(dir.path()).arg("self-test"));
    assert!(
        tested.status.success(),
        "{}{}",
        stdout(&tested),
        stderr(&tested)
    );
    assert!(stdout(&tested).contains(note), "{}", stdout(&tested));
}

/// With no audit log configured, an operator command prints only what was
/// asked for: its events go to the operator's state directory, which one
/// warning names, never into stdout and never nowhere.
#[test]
fn unconfigured_operator_audit_goes_to_the_state_directory() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let out = run(with_secret(dir.path())
        .env("HOME", &home)
        .env("USER", "bob")
        .args(["keys", "create", "--key-id", "next"]));
    assert!(out.status.success(), "{}", stderr(&out));
    let file = home.join(".local/state/keyward/audit.log");
    assert!(!stdout(&out).contains("\"principal\""), "{}", stdout(&out));
    let warned = stderr(&out);
    assert_eq!(warned.lines().count(), 1, "{warned}");
    assert!(warned.contains(&file.display().to_string()), "{warned}");
    let events = json_lines(&std::fs::read_to_string(&file).unwrap());
    let results: Vec<_> = events.iter().map(|e| e["result"].clone()).collect();
    assert_eq!(results, ["requested", "ok"], "{events:?}");
    assert!(events.iter().all(|e| e["principal"] == "cli:bob"));
    // Without $USER or $LOGNAME (cron, a container): the account of the
    // process's user id.
    let out = run(with_secret(dir.path())
        .env("HOME", &home)
        .args(["keys", "create", "--key-id", "later"]));
    assert!(out.status.success(), "{}", stderr(&out));
    let whoami = Command::new("id").arg("-un").output().unwrap();
    let account = String::from_utf8_lossy(&whoami.stdout).trim().to_owned();
    let events = json_lines(&std::fs::read_to_string(&file).unwrap());
    assert_eq!(
        events.last().unwrap()["principal"],
        format!("cli:{account}")
    );
    use std::os::unix::fs::PermissionsExt as _;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&file), 0o600);
    assert_eq!(mode(file.parent().unwrap()), 0o700);
}

/// Key, rotation and token changes made from the command line go to the
/// audit log as the API's do: `requested`, then the outcome, with `cli:`
/// and the user as the principal; a forced retirement says what it
/// overrode; a log that cannot be written refuses the change.
#[test]
fn operator_changes_are_audited() {
    let dir = tempfile::tempdir().unwrap();
    let audit_log = dir.path().join("audit.log");
    let cli = |args: &[&str]| {
        let mut cmd = with_secret(dir.path());
        cmd.env("KEYWARD_AUDIT_LOG", &audit_log)
            .env("USER", "alice")
            .args(args);
        run(&mut cmd)
    };
    let events = || json_lines(&std::fs::read_to_string(&audit_log).unwrap_or_default());
    let ok = |out: Output| {
        assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
        out
    };

    ok(cli(&["seed-key"]));
    ok(cli(&["keys", "list"]));
    assert_eq!(
        events().len(),
        2,
        "only the change is audited: {:?}",
        events()
    );
    ok(cli(&["keys", "create", "--key-id", "next"]));
    ok(cli(&["keys", "activate", "next"]));
    let started = ok(cli(&["rotate", "start"]));
    let job_id = stdout(&started)
        .lines()
        .find_map(|l| l.strip_prefix("Rotation job started: "))
        .unwrap()
        .trim()
        .to_owned();
    // The pending job blocks the retirement; --force overrides it.
    assert!(!cli(&["keys", "retire", "primary"]).status.success());
    ok(cli(&["keys", "retire", "primary", "--force"]));
    ok(cli(&["rotate", "cancel", &job_id]));
    let token = stdout(&ok(cli(&[
        "token", "create", "--name", "app", "--role", "encrypt",
    ])))
    .trim()
    .to_owned();
    ok(cli(&["token", "revoke", "app"]));

    let events = events();
    let summary: Vec<(String, String)> = events
        .iter()
        .map(|e| {
            (
                e["rpc"].as_str().unwrap().to_owned(),
                e["result"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expected: Vec<(String, String)> = [
        ("cli/seed-key", "requested"),
        ("cli/seed-key", "ok"),
        ("cli/keys create", "requested"),
        ("cli/keys create", "ok"),
        ("cli/keys activate", "requested"),
        ("cli/keys activate", "ok"),
        ("cli/rotate start", "requested"),
        ("cli/rotate start", "ok"),
        ("cli/keys retire", "requested"),
        ("cli/keys retire", "error"),
        ("cli/keys retire", "requested"),
        ("cli/keys retire", "ok"),
        ("cli/keys retire", "forced"),
        ("cli/rotate cancel", "requested"),
        ("cli/rotate cancel", "ok"),
        ("cli/token create", "requested"),
        ("cli/token create", "ok"),
        ("cli/token revoke", "requested"),
        ("cli/token revoke", "ok"),
    ]
    .iter()
    .map(|(rpc, result)| (rpc.to_string(), result.to_string()))
    .collect();
    assert_eq!(summary, expected);
    assert!(events.iter().all(|e| e["principal"] == "cli:alice"));
    let forced = &events[12];
    assert_eq!(forced["key_id"], "primary");
    assert!(
        forced["detail"]
            .as_str()
            .unwrap()
            .contains(&format!("overridden: rotation job {job_id} is pending")),
        "{forced}"
    );
    assert_eq!(events[13]["detail"], format!("job_id={job_id}"));
    assert_eq!(events[16]["detail"], "name=app roles=encrypt");
    let text = std::fs::read_to_string(&audit_log).unwrap();
    assert!(
        !text.contains(&token),
        "the token never reaches the audit log"
    );

    // A log that cannot be written refuses the change (fail-closed), and
    // commands that change nothing still run.
    let mut cmd = with_secret(dir.path());
    cmd.env("KEYWARD_AUDIT_LOG", dir.path())
        .args(["keys", "create", "--key-id", "unaudited"]);
    let refused = run(&mut cmd);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("audit log"),
        "{}",
        stderr(&refused)
    );
    let mut cmd = with_secret(dir.path());
    cmd.env("KEYWARD_AUDIT_LOG", dir.path())
        .args(["keys", "list"]);
    let list = ok(run(&mut cmd));
    assert!(!stdout(&list).contains("unaudited"), "{}", stdout(&list));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_password_is_never_printed() {
    const PASSWORD: &str = "hunter2-db-password";
    let dir = tempfile::tempdir().unwrap();
    let Some(url) = crate::helpers::fresh_database(crate::helpers::Backend::Postgres, &dir).await
    else {
        return;
    };
    // The throwaway cluster trusts local connections: any password works.
    let url = url.replacen(
        "postgres://postgres@",
        &format!("postgres://postgres:{PASSWORD}@"),
        1,
    );
    let url = format!("{url}?password={PASSWORD}");
    for args in [&["--help"][..], &["serve", "--help"]] {
        let out = run(with_secret(dir.path()).env("DATABASE_URL", &url).args(args));
        assert!(out.status.success());
        assert!(!stdout(&out).contains(PASSWORD), "{}", stdout(&out));
    }
    let mut cmd = with_secret(dir.path());
    cmd.env("DATABASE_URL", &url).args(["--log-format", "json"]);
    let server = Server::start(cmd);
    server.wait_for_log("keyward listening");
    let log = server.log();
    assert!(log.contains("postgres:***@"), "{log}");
    assert!(!log.contains(PASSWORD), "{log}");
    // Nor in the error of a server that cannot reach its database.
    let unreachable = format!(
        "postgres://postgres:{PASSWORD}@127.0.0.1:{}/db",
        free_port()
    );
    let out = run(with_secret(dir.path())
        .env("DATABASE_URL", &unreachable)
        .args(["serve", "--listen", "127.0.0.1:0"]));
    assert!(!out.status.success());
    assert!(!stderr(&out).contains(PASSWORD), "{}", stderr(&out));
}

#[test]
fn files_holding_secrets_are_private_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let mode = |name: &str| {
        std::fs::metadata(dir.path().join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    // A world-readable master key file and .env are accepted, with a warning.
    std::fs::write(dir.path().join("master.key"), SECRET).unwrap();
    std::fs::set_permissions(
        dir.path().join("master.key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    std::fs::write(
        dir.path().join(".env"),
        format!("ENCRYPTION_MASTER_KEY={SECRET}\n"),
    )
    .unwrap();
    std::fs::set_permissions(
        dir.path().join(".env"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let port = free_port();
    let mut cmd = Command::new("sh");
    cmd.current_dir(dir.path())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env(
            "DATABASE_URL",
            format!("sqlite://{}", dir.path().join("keyward.db").display()),
        )
        .args([
            "-c",
            &format!(
                "umask 000; exec {BIN} serve --listen 127.0.0.1:{port} --master-key-file master.key \
                 --audit-log audit.log"
            ),
        ])
        .stdin(Stdio::null());
    let mut server = Server::spawn(cmd, format!("127.0.0.1:{port}"));
    server.wait_for_log("keyward listening");
    assert_eq!(mode("keyward.db"), 0o600);
    assert_eq!(mode("audit.log"), 0o600);
    let log = server.log();
    assert!(
        log.contains("master key file can be read by other users"),
        "{log}"
    );
    assert!(log.contains(".env file"), "{log}");
    assert!(!log.contains(SECRET), "{log}");
    server.signal("-TERM");
    server.wait_exit(Duration::from_secs(15));

    // A group of operators may be let in on the audit log.
    std::fs::remove_file(dir.path().join("audit.log")).unwrap();
    let out = run(with_secret(dir.path()).args([
        "token",
        "create",
        "--name",
        "reader",
        "--role",
        "decrypt",
        "--audit-log",
        "audit.log",
        "--audit-file-mode",
        "640",
    ]));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(mode("audit.log"), 0o640);
    let bad = run(with_secret(dir.path()).args(["token", "list", "--audit-file-mode", "077"]));
    assert_eq!(bad.status.code(), Some(64), "{}", stderr(&bad));
}

/// SIGHUP does not stop `serve` (its default would): the audit file
/// logrotate renamed is reopened at its path and the server goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reopens_the_audit_file_and_the_server_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let mut server =
        Server::start_with(keyward(dir.path()), &["--dev", "--audit-log", "audit.log"]);
    server.wait_for_log("keyward listening");
    let audit = dir.path().join("audit.log");
    std::fs::rename(&audit, dir.path().join("audit.log.1")).unwrap();
    server.signal("-HUP");
    server.wait_for_log("reloaded");
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "SIGHUP ended the server"
    );
    let health = HealthClient::new(server.channel().await)
        .check(HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.status, 1);
    let reopened = std::fs::read_to_string(&audit).unwrap();
    assert!(reopened.contains("\"reopened\""), "{reopened}");
    let log = server.log();
    assert!(log.contains("SIGHUP received"), "{log}");
    server.signal("-TERM");
    assert!(server.wait_exit(Duration::from_secs(15)).success());
}

/// Limits beyond what keyward can honour are refused, naming the maximum,
/// not lowered in silence (flag or environment alike).
#[test]
fn limits_beyond_the_built_in_maximum_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for (flag, env, value, max) in [
        (
            "--max-context-entries",
            "KEYWARD_MAX_CONTEXT_ENTRIES",
            "65",
            "1..=64",
        ),
        (
            "--max-context-bytes",
            "KEYWARD_MAX_CONTEXT_BYTES",
            "9000",
            "1..=8192",
        ),
    ] {
        let by_flag = run(keyward(dir.path()).args(["serve", "--dev", flag, value]));
        let by_env = run(keyward(dir.path()).env(env, value).args(["serve", "--dev"]));
        for out in [by_flag, by_env] {
            assert_eq!(out.status.code(), Some(64), "{flag}: {}", stderr(&out));
            assert!(stderr(&out).contains(max), "{flag}: {}", stderr(&out));
        }
    }
    assert!(
        !dir.path().join("keyward.db").exists(),
        "nothing was started"
    );
}
