//! Authentication, authorization, audit and limits end to end: the
//! authorization matrix over every RPC the server's descriptors declare
//! (so a new RPC cannot slip past it), scoped tokens in and out of scope,
//! mutual TLS principals, the fail-closed audit log and the rate limit.

use std::{path::PathBuf, str::FromStr};

use keyward::{
    api::proto::{
        crypto_client::CryptoClient, decrypt_request::Ciphertext, BatchDecryptRequest,
        DecryptRequest, EncryptRequest, Envelope,
    },
    auth::{
        audit::{AuditSettings, AuditSink},
        token, AuthSettings, CertPrincipal, Role, Scope,
    },
    config::TlsSettings,
    service::admin::CreateKey,
};
use prost::Message;
use tonic::{
    codegen::http::uri::PathAndQuery,
    metadata::MetadataValue,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
    Code, Request,
};

use crate::helpers::{assert_code, ctx, json_lines, spawn_with, Backend, Options, TestApp};

/// A throwaway PKI: a CA, a server certificate for `localhost`, client
/// certificates, and one client certificate from a CA the server does not
/// trust.
pub(crate) struct Pki {
    dir: tempfile::TempDir,
    pub(crate) ca_pem: String,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "keyward test CA");
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
        let ca_pem = ca.pem();
        std::fs::write(dir.path().join("ca.pem"), &ca_pem).unwrap();
        let pki = Pki { dir, ca_pem };
        let (cert, key) = Self::leaf(&ca, "localhost", vec!["localhost".into()]);
        std::fs::write(pki.path("server.pem"), cert).unwrap();
        std::fs::write(pki.path("server.key"), key).unwrap();
        for cn in ["ops-admin", "stranger"] {
            let (cert, key) = Self::leaf(&ca, cn, vec![]);
            std::fs::write(pki.path(&format!("{cn}.pem")), cert).unwrap();
            std::fs::write(pki.path(&format!("{cn}.key")), key).unwrap();
        }
        // Two common names, the mapped one second (`CN=nobody, CN=ops-admin`).
        let (cert, key) = Self::leaf_with(&ca, &["nobody", "ops-admin"]);
        std::fs::write(pki.path("two-names.pem"), cert).unwrap();
        std::fs::write(pki.path("two-names.key"), key).unwrap();
        // The same common name, from a CA the server does not trust.
        let rogue_key = rcgen::KeyPair::generate().unwrap();
        let mut rogue_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        rogue_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let rogue = rcgen::CertifiedIssuer::self_signed(rogue_params, rogue_key).unwrap();
        let (cert, key) = Self::leaf(&rogue, "ops-admin", vec![]);
        std::fs::write(pki.path("rogue.pem"), cert).unwrap();
        std::fs::write(pki.path("rogue.key"), key).unwrap();
        pki
    }

    fn leaf(
        issuer: &rcgen::CertifiedIssuer<'_, rcgen::KeyPair>,
        cn: &str,
        names: Vec<String>,
    ) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let cert = params.signed_by(&key, issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// A client certificate whose subject holds every name in `cns` as a
    /// common name, in order (rcgen keeps one value per attribute type, so
    /// the later ones go in under the CN's OID as a custom type).
    fn leaf_with(
        issuer: &rcgen::CertifiedIssuer<'_, rcgen::KeyPair>,
        cns: &[&str],
    ) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cns[0]);
        for cn in &cns[1..] {
            params
                .distinguished_name
                .push(rcgen::DnType::CustomDnType(vec![2, 5, 4, 3]), *cn);
        }
        let cert = params.signed_by(&key, issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn server(&self) -> TlsSettings {
        TlsSettings {
            cert: self.path("server.pem"),
            key: self.path("server.key"),
            client_ca: Some(self.path("ca.pem")),
        }
    }

    /// A TLS channel to `app`, presenting client certificate `identity`
    /// (`ops-admin`, `stranger`, `rogue`) if given.
    async fn channel(&self, app: &TestApp, identity: Option<&str>) -> Channel {
        self.try_channel(app, identity).await.unwrap()
    }

    /// Like [`Self::channel`], keeping a connection failure for the caller.
    async fn try_channel(
        &self,
        app: &TestApp,
        identity: Option<&str>,
    ) -> Result<Channel, tonic::transport::Error> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .domain_name("localhost");
        if let Some(name) = identity {
            tls = tls.identity(Identity::from_pem(
                std::fs::read(self.path(&format!("{name}.pem"))).unwrap(),
                std::fs::read(self.path(&format!("{name}.key"))).unwrap(),
            ));
        }
        Endpoint::from_shared(format!("https://127.0.0.1:{}", app.addr.port()))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
    }
}

/// Creates a token the way `keyward token create` does; returns it.
/// [`issue`] with no scope: every key and context.
pub(crate) async fn issue_unscoped(app: &TestApp, name: &str, roles: &[Role]) -> String {
    issue(app, name, roles, Scope::default()).await
}

pub(crate) async fn issue(app: &TestApp, name: &str, roles: &[Role], scope: Scope) -> String {
    let secret = token::generate();
    app.services
        .store
        .insert_token(name, &token::hash(&secret), roles, &scope)
        .await
        .unwrap();
    secret.to_string()
}

pub(crate) fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// Calls `path` with an empty request message (valid for every method) and
/// returns the status code of the reply or of the first streamed message.
pub(crate) async fn call(channel: &Channel, path: &str, authorization: Option<&str>) -> Code {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.unwrap();
    let mut request = Request::new(());
    if let Some(value) = authorization {
        request
            .metadata_mut()
            .insert("authorization", MetadataValue::from_str(value).unwrap());
    }
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    let path = PathAndQuery::from_str(path).unwrap();
    match grpc.server_streaming(request, path, codec).await {
        Err(status) => status.code(),
        Ok(response) => match response.into_inner().message().await {
            Ok(_) => Code::Ok,
            Err(status) => status.code(),
        },
    }
}

/// Every method of the keyward services, from the served descriptors.
fn keyward_methods() -> Vec<String> {
    let set =
        prost_types::FileDescriptorSet::decode(keyward::api::proto::FILE_DESCRIPTOR_SET).unwrap();
    let mut methods = Vec::new();
    for file in set.file {
        let package = file.package().to_owned();
        for service in file.service {
            for method in &service.method {
                methods.push(format!("/{package}.{}/{}", service.name(), method.name()));
            }
        }
    }
    methods.retain(|m| m.starts_with("/keyward.v1."));
    methods.sort();
    methods
}

fn secured(pki: &Pki, audit: AuditSink) -> Options {
    Options {
        auth: AuthSettings {
            required: true,
            cert_principals: vec![CertPrincipal {
                common_name: "ops-admin".into(),
                name: Some("ops-team".into()),
                roles: vec!["admin".into()],
                keys: vec![],
                context: Default::default(),
                legacy: false,
            }],
            rate_limit: None,
        },
        audit: AuditSettings {
            sink: audit,
            ..AuditSettings::default()
        },
        tls: Some(pki.server()),
        ..Options::default()
    }
}

/// A TLS server requiring authentication, auditing to a file.
pub(crate) async fn secured_app() -> (Pki, TestApp, PathBuf) {
    let pki = Pki::new();
    let audit = pki.path("audit.log");
    let options = secured(&pki, AuditSink::File(audit.clone()));
    let app = spawn_with(Backend::Sqlite, options).await.unwrap();
    (pki, app, audit)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_matrix_covers_every_rpc() {
    let (pki, app, audit) = secured_app().await;
    let enc = issue(&app, "app-encrypt", &[Role::Encrypt], Scope::default()).await;
    let dec = issue(&app, "app-decrypt", &[Role::Decrypt], Scope::default()).await;
    let adm = issue(&app, "operator", &[Role::Admin], Scope::default()).await;
    let rew = issue(&app, "app-rewrap", &[Role::Rewrap], Scope::default()).await;
    let revoked = issue(&app, "revoked", Role::ALL.as_ref(), Scope::default()).await;
    assert!(app.services.store.revoke_token("revoked").await.unwrap());
    let unknown = token::generate().to_string();

    let plain = pki.channel(&app, None).await;
    let mtls_admin = pki.channel(&app, Some("ops-admin")).await;
    let unmapped = pki.channel(&app, Some("stranger")).await;
    let expect_role = |held: &'static [Role]| {
        move |needed: Role| {
            if held.contains(&needed) {
                None // admitted: any code but UNAUTHENTICATED / PERMISSION_DENIED
            } else {
                Some(Code::PermissionDenied)
            }
        }
    };
    type Expect = Box<dyn Fn(Role) -> Option<Code>>;
    let unauthenticated = || -> Expect { Box::new(|_| Some(Code::Unauthenticated)) };
    let callers: Vec<(&str, &Channel, Option<String>, Expect)> = vec![
        ("no credential", &plain, None, unauthenticated()),
        (
            "malformed token",
            &plain,
            Some("Bearer nope".into()),
            unauthenticated(),
        ),
        (
            "unknown token",
            &plain,
            Some(bearer(&unknown)),
            unauthenticated(),
        ),
        (
            "revoked token",
            &plain,
            Some(bearer(&revoked)),
            unauthenticated(),
        ),
        (
            "basic auth",
            &plain,
            Some("Basic dXNlcjpwYXNz".into()),
            unauthenticated(),
        ),
        (
            "encrypt token",
            &plain,
            Some(bearer(&enc)),
            Box::new(expect_role(&[Role::Encrypt])),
        ),
        (
            "decrypt token",
            &plain,
            Some(bearer(&dec)),
            Box::new(expect_role(&[Role::Decrypt])),
        ),
        (
            "admin token",
            &plain,
            Some(bearer(&adm)),
            Box::new(expect_role(&[Role::Admin])),
        ),
        (
            "rewrap token",
            &plain,
            Some(bearer(&rew)),
            Box::new(expect_role(&[Role::Rewrap])),
        ),
        (
            "mTLS ops-admin",
            &mtls_admin,
            None,
            Box::new(expect_role(&[Role::Admin])),
        ),
        ("mTLS unmapped CN", &unmapped, None, unauthenticated()),
    ];

    let methods = keyward_methods();
    assert_eq!(methods.len(), 27, "{methods:?}");
    let mut table = String::new();
    for method in &methods {
        let needed = Role::required_for(method).unwrap();
        for (caller, channel, auth, expect) in &callers {
            let code = call(channel, method, auth.as_deref()).await;
            match expect(needed) {
                Some(expected) => assert_eq!(code, expected, "{caller} → {method}"),
                None => assert!(
                    !matches!(code, Code::Unauthenticated | Code::PermissionDenied),
                    "{caller} → {method}: {code:?}"
                ),
            }
            table.push_str(&format!("{method} | {caller} | {code:?}\n"));
        }
    }
    // Health and reflection stay open.
    assert_eq!(
        call(&plain, "/grpc.health.v1.Health/Check", None).await,
        Code::Ok
    );
    // A certificate from an untrusted CA never gets a connection.
    let rogue_channel = pki.try_channel(&app, Some("rogue")).await;
    if let Ok(channel) = rogue_channel {
        let code = call(&channel, "/keyward.v1.Admin/ListKeys", None).await;
        // TLS 1.3 lets the client send before the server has checked its
        // certificate; the server's refusal then surfaces as one of these
        // transport errors, depending on when it lands.
        assert!(
            matches!(code, Code::Unavailable | Code::Unknown | Code::Cancelled),
            "an untrusted client certificate must be refused: {code:?}"
        );
    }

    // Every refusal is accounted for in the audit log: an event naming the
    // RPC, or the count of a summary of one sender's repeats (written when
    // its window closes); none holds a token.
    tokio::time::sleep(keyward::auth::audit::REFUSAL_WINDOW * 2).await;
    let log = std::fs::read_to_string(&audit).unwrap();
    let denied: u64 = json_lines(&log)
        .iter()
        .filter(|e| e["result"] == "UNAUTHENTICATED" || e["result"] == "PERMISSION_DENIED")
        .map(|e| e["count"].as_u64().unwrap_or(1))
        .sum();
    assert!(
        denied >= methods.len() as u64 * 6,
        "{denied} refusals audited"
    );
    for secret in [&enc, &dec, &adm, &revoked, &unknown] {
        assert!(
            !log.contains(secret.as_str()),
            "a token reached the audit log"
        );
    }
    eprintln!("{table}");
}

pub(crate) fn encrypt_request(plaintext: &[u8], pairs: &[(&str, &str)]) -> EncryptRequest {
    EncryptRequest {
        plaintext: plaintext.to_vec().into(),
        context: ctx(pairs),
        ..Default::default()
    }
}

pub(crate) fn decrypt_request(envelope: Envelope, pairs: &[(&str, &str)]) -> DecryptRequest {
    DecryptRequest {
        context: ctx(pairs),
        ciphertext: Some(Ciphertext::Envelope(envelope)),
    }
}

pub(crate) fn with_token<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", bearer(token).parse().unwrap());
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scoped_tokens_stay_within_their_keys_and_contexts() {
    let (pki, app, audit) = secured_app().await;
    let acme_scope = Scope {
        keys: vec!["primary".into()],
        context: [("tenant".to_owned(), "acme".to_owned())].into(),
        legacy: false,
    };
    let acme = issue(
        &app,
        "acme-app",
        &[Role::Encrypt, Role::Decrypt],
        acme_scope,
    )
    .await;
    let any = issue_unscoped(&app, "platform", &[Role::Encrypt, Role::Decrypt]).await;
    let mut client = CryptoClient::new(pki.channel(&app, None).await);
    let tenant = [("tenant", "acme"), ("connection_id", "7")];

    let sealed = client
        .encrypt(with_token(encrypt_request(b"acme secret", &tenant), &acme))
        .await
        .unwrap()
        .into_inner();
    let envelope = sealed.envelope.unwrap();
    let opened = client
        .decrypt(with_token(
            decrypt_request(envelope.clone(), &tenant),
            &acme,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(&opened.plaintext[..], b"acme secret");

    // Out of the context scope: another tenant, or none.
    for pairs in [&[("tenant", "globex")][..], &[]] {
        let status = assert_code(
            client
                .encrypt(with_token(encrypt_request(b"x", pairs), &acme))
                .await,
            Code::PermissionDenied,
        );
        assert!(status.message().contains("tenant=acme"), "{status:?}");
    }

    // Out of the key scope: a ciphertext under another key, and one naming a
    // key that does not exist, are refused alike.
    let platform = client
        .encrypt(with_token(
            encrypt_request(b"platform secret", &tenant),
            &any,
        ))
        .await
        .unwrap();
    app.services
        .admin
        .create_key(CreateKey {
            key_id: "second".into(),
            activate: true,
            ..CreateKey::default()
        })
        .await
        .unwrap();
    let under_second = client
        .encrypt(with_token(encrypt_request(b"second", &tenant), &any))
        .await
        .unwrap()
        .into_inner()
        .envelope
        .unwrap();
    let mut made_up = under_second.clone();
    made_up.encryption_key_id = "00000000-0000-4000-8000-000000000000".into();
    let denied_second = assert_code(
        client
            .decrypt(with_token(decrypt_request(under_second, &tenant), &acme))
            .await,
        Code::PermissionDenied,
    );
    let denied_made_up = assert_code(
        client
            .decrypt(with_token(decrypt_request(made_up, &tenant), &acme))
            .await,
        Code::PermissionDenied,
    );
    assert!(!denied_second.message().contains("not found"));
    assert!(!denied_made_up.message().contains("not found"));
    // The active key is now out of the token's scope: no Encrypt either,
    // but what it wrote under `primary` still decrypts.
    assert_code(
        client
            .encrypt(with_token(encrypt_request(b"x", &tenant), &acme))
            .await,
        Code::PermissionDenied,
    );
    let old = platform.into_inner().envelope.unwrap();
    client
        .decrypt(with_token(decrypt_request(old.clone(), &tenant), &acme))
        .await
        .unwrap();

    // Batches judge each item.
    let results = client
        .batch_decrypt(with_token(
            BatchDecryptRequest {
                items: vec![
                    decrypt_request(old, &tenant),
                    decrypt_request(envelope, &[("tenant", "globex")]),
                ],
            },
            &acme,
        ))
        .await
        .unwrap()
        .into_inner()
        .results;
    use keyward::api::proto::batch_decrypt_result::Result as Item;
    assert!(matches!(results[0].result, Some(Item::Ok(_))));
    match &results[1].result {
        Some(Item::Error(e)) => assert_eq!(e.code, Code::PermissionDenied as i32),
        other => panic!("{other:?}"),
    }

    // The audit log has each Decrypt with principal, key and context, and
    // never a plaintext or a token.
    let log = std::fs::read_to_string(&audit).unwrap();
    let decrypts: Vec<serde_json::Value> = json_lines(&log)
        .into_iter()
        .filter(|e| e["rpc"].as_str().unwrap_or_default().ends_with("Decrypt"))
        .collect();
    assert_eq!(decrypts.len(), 6, "{decrypts:#?}");
    let first = &decrypts[0];
    assert_eq!(first["principal"], "acme-app");
    assert_eq!(first["key_id"], "primary");
    assert_eq!(first["context"]["tenant"], "acme");
    assert_eq!(first["result"], "ok");
    assert!(first["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(decrypts.iter().any(|e| e["result"] == "PERMISSION_DENIED"));
    for secret in [
        "acme secret",
        "platform secret",
        acme.as_str(),
        any.as_str(),
    ] {
        assert!(!log.contains(secret), "{secret:?} reached the audit log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_audit_log_refuses_decrypts_and_key_changes() {
    let pki = Pki::new();
    let app = spawn_with(
        Backend::Sqlite,
        secured(&pki, AuditSink::File("/dev/full".into())),
    )
    .await
    .unwrap();
    let all = issue(&app, "all", Role::ALL.as_ref(), Scope::default()).await;
    let channel = pki.channel(&app, None).await;
    let mut client = CryptoClient::new(channel.clone());
    let pairs = [("connection_id", "1")];
    // Encrypt is not audited, so it works...
    let envelope = client
        .encrypt(with_token(encrypt_request(b"secret", &pairs), &all))
        .await
        .unwrap()
        .into_inner()
        .envelope
        .unwrap();
    // ...but no plaintext leaves unaudited.
    let status = assert_code(
        client
            .decrypt(with_token(decrypt_request(envelope, &pairs), &all))
            .await,
        Code::Unavailable,
    );
    assert!(status.message().contains("audit"), "{status:?}");
    // A key change is refused before it happens.
    let mut admin = keyward::api::proto::admin_client::AdminClient::new(channel);
    assert_code(
        admin
            .create_key(with_token(
                keyward::api::proto::CreateKeyRequest {
                    key_id: "unaudited".into(),
                    activate: true,
                    ..Default::default()
                },
                &all,
            ))
            .await,
        Code::Unavailable,
    );
    let keys = app.services.store.list_keys().await.unwrap();
    assert!(keys.iter().all(|k| k.key_id != "unaudited"));

    // Fail-open lets the Decrypt through.
    let mut options = secured(&pki, AuditSink::File("/dev/full".into()));
    options.audit.fail_closed = false;
    let app = app.restart(options).await;
    let mut client = CryptoClient::new(pki.channel(&app, None).await);
    let envelope = client
        .encrypt(with_token(encrypt_request(b"secret", &pairs), &all))
        .await
        .unwrap()
        .into_inner()
        .envelope
        .unwrap();
    client
        .decrypt(with_token(decrypt_request(envelope, &pairs), &all))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_without_client_certificates_serves_token_callers() {
    let pki = Pki::new();
    let mut options = secured(&pki, AuditSink::Off);
    options.auth.cert_principals.clear();
    options.tls = Some(TlsSettings {
        client_ca: None,
        ..pki.server()
    });
    let app = spawn_with(Backend::Sqlite, options).await.unwrap();
    let token = issue(&app, "app", &[Role::Encrypt], Scope::default()).await;
    let channel = pki.channel(&app, None).await;
    let pairs = [("connection_id", "1")];
    CryptoClient::new(channel.clone())
        .encrypt(with_token(encrypt_request(b"x", &pairs), &token))
        .await
        .unwrap();
    assert_eq!(
        call(&channel, "/keyward.v1.Crypto/Encrypt", None).await,
        Code::Unauthenticated
    );
    // Plaintext gRPC to a TLS port gets nowhere.
    let plain = Endpoint::from_shared(format!("http://127.0.0.1:{}", app.addr.port()))
        .unwrap()
        .connect()
        .await;
    if let Ok(plain) = plain {
        assert_ne!(
            call(&plain, "/grpc.health.v1.Health/Check", None).await,
            Code::Ok
        );
    }
}

/// What SIGHUP reloads: a renewed server certificate serves new
/// connections (open ones keep theirs), the audit file renamed by
/// logrotate is followed by a new one at its path, and a token written
/// behind the server's back is loaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_renews_the_certificate_reopens_the_audit_file_and_loads_tokens() {
    let (pki, app, audit) = secured_app().await;
    let admin = issue(&app, "ops", &[Role::Admin], Scope::default()).await;
    let open = pki.channel(&app, None).await;
    let list = |channel: &Channel| {
        let mut client = keyward::api::proto::admin_client::AdminClient::new(channel.clone());
        let request = with_token(keyward::api::proto::ListKeysRequest::default(), &admin);
        async move { client.list_keys(request).await.map(|_| ()) }
    };
    list(&open).await.unwrap();

    // The certificate is renewed under another CA; logrotate renames the
    // audit file; a token is written by hand.
    let renewed = Pki::new();
    for file in ["server.pem", "server.key"] {
        std::fs::copy(renewed.path(file), pki.path(file)).unwrap();
    }
    let rotated = pki.path("audit.log.1");
    std::fs::rename(&audit, &rotated).unwrap();
    let by_hand = keyward::auth::token::generate();
    sqlx::query(
        "INSERT INTO keyward_api_tokens (id, name, token_hash, roles, key_scope, context_scope, created_at) \
         VALUES ('hand', 'by-hand', ?, 'admin', '', '', CURRENT_TIMESTAMP)",
    )
    .bind(keyward::auth::token::hash(&by_hand))
    .execute(&sqlx::SqlitePool::connect(&app.database_url).await.unwrap())
    .await
    .unwrap();

    let reloaded = app.reloader.reload().await;
    assert_eq!(reloaded.failed, vec![], "{reloaded:?}");
    for part in ["audit log", "tls", "key catalog", "api tokens"] {
        assert!(reloaded.done.contains(&part), "{reloaded:?}");
    }

    // New connections get the new certificate: trusted under the new CA
    // only. The open connection goes on.
    list(&renewed.channel(&app, None).await).await.unwrap();
    assert!(
        pki.try_channel(&app, None).await.is_err(),
        "a new connection was served the old certificate"
    );
    list(&open).await.unwrap();
    let mut client = keyward::api::proto::admin_client::AdminClient::new(open.clone());
    client
        .list_keys(with_token(
            keyward::api::proto::ListKeysRequest::default(),
            &by_hand,
        ))
        .await
        .unwrap();

    // Audited changes after the reload land in the new file.
    client
        .create_key(with_token(
            keyward::api::proto::CreateKeyRequest {
                key_id: "after-reload".into(),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap();
    let new = std::fs::read_to_string(&audit).unwrap();
    assert!(
        new.lines().next().unwrap().contains("\"reopened\""),
        "{new}"
    );
    assert!(new.contains("after-reload"), "{new}");
    assert!(!std::fs::read_to_string(&rotated)
        .unwrap()
        .contains("after-reload"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_principal_has_its_own_rate_limit() {
    let pki = Pki::new();
    let mut options = secured(&pki, AuditSink::Off);
    let five = std::num::NonZeroU32::new(5).unwrap();
    options.auth.rate_limit = Some((five, five));
    let app = spawn_with(Backend::Sqlite, options).await.unwrap();
    let first = issue(&app, "first", &[Role::Encrypt], Scope::default()).await;
    let second = issue(&app, "second", &[Role::Encrypt], Scope::default()).await;
    let mut client = CryptoClient::new(pki.channel(&app, None).await);
    let pairs = [("connection_id", "1")];
    for _ in 0..5 {
        client
            .encrypt(with_token(encrypt_request(b"x", &pairs), &first))
            .await
            .unwrap();
    }
    let status = assert_code(
        client
            .encrypt(with_token(encrypt_request(b"x", &pairs), &first))
            .await,
        Code::ResourceExhausted,
    );
    assert!(status.message().contains("first"), "{status:?}");
    // Another principal is not held back by the first one's burst.
    client
        .encrypt(with_token(encrypt_request(b"x", &pairs), &second))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_with_several_common_names_is_refused() {
    let (pki, app, audit) = secured_app().await;
    let channel = pki.channel(&app, Some("two-names")).await;
    assert_eq!(
        call(&channel, "/keyward.v1.Admin/ListKeys", None).await,
        Code::PermissionDenied
    );
    // The same CA's single-name certificate still maps.
    let admin = pki.channel(&app, Some("ops-admin")).await;
    assert_eq!(
        call(&admin, "/keyward.v1.Admin/ListKeys", None).await,
        Code::Ok
    );
    let events = json_lines(&std::fs::read_to_string(&audit).unwrap());
    assert!(
        events
            .iter()
            .any(|e| e["result"] == "PERMISSION_DENIED" && e["rpc"] == "keyward.v1.Admin/ListKeys"),
        "{events:#?}"
    );
    // A trusted certificate whose name no entry maps is told so, not
    // "no credentials".
    let stranger = pki.channel(&app, Some("stranger")).await;
    let refused = keyward::api::proto::admin_client::AdminClient::new(stranger)
        .list_keys(keyward::api::proto::ListKeysRequest {})
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert!(
        refused
            .message()
            .contains("common name \"stranger\" is not mapped to a principal"),
        "{refused:?}"
    );
}
