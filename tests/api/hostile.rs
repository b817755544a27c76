//! Hostile input, property-tested on the crypto service itself (no network,
//! so thousands of cases run quickly): any mutation of a blob or of any
//! envelope field fails to decrypt, with a code that is never INTERNAL.
//! `fuzz/` drives the same paths with cargo fuzz.

use std::sync::Arc;

use keyward::{
    api::status::code_of,
    crypto::{blob, context::EncryptionContext, envelope::Envelope, secret::MasterSecret},
    service::crypto::{Ciphertext, CryptoService},
};
use proptest::prelude::*;

use crate::helpers::MASTER;

fn service() -> CryptoService {
    CryptoService::standalone_local(MasterSecret::new(MASTER).unwrap(), "rec-primary", "primary")
}

struct Fixture {
    runtime: tokio::runtime::Runtime,
    service: CryptoService,
    context: EncryptionContext,
    envelope: Envelope,
    blob: Vec<u8>,
}

fn fixture() -> Fixture {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let service = service();
    let context = EncryptionContext::from_pairs([("connection_id", "42")]).unwrap();
    let sealed = runtime
        .block_on(service.encrypt(b"postgres://user:hunter2@db/app", &context))
        .unwrap();
    let blob = sealed.blob().unwrap();
    Fixture {
        runtime,
        service,
        context,
        envelope: sealed.envelope,
        blob,
    }
}

/// Decrypts and asserts the failure is a caller's error, never INTERNAL.
fn assert_refused(f: &Fixture, ciphertext: Ciphertext) -> Result<(), TestCaseError> {
    match f
        .runtime
        .block_on(f.service.decrypt(ciphertext, &f.context))
    {
        Ok(_) => Err(TestCaseError::fail("a mutated ciphertext decrypted")),
        Err(err) => {
            prop_assert_ne!(code_of(&err), tonic::Code::Internal, "{}", err);
            Ok(())
        }
    }
}

/// One way of changing a byte string.
#[derive(Debug, Clone)]
enum Mutation {
    FlipBit { at: usize, bit: u8 },
    Truncate { to: usize },
    Insert { at: usize, byte: u8 },
    Replace(Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::FlipBit { at, bit }),
        any::<usize>().prop_map(|to| Mutation::Truncate { to }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Insert { at, byte }),
        proptest::collection::vec(any::<u8>(), 0..300).prop_map(Mutation::Replace),
    ]
}

/// Applies `m`; `None` when it would leave the bytes unchanged.
fn apply(bytes: &[u8], m: &Mutation) -> Option<Vec<u8>> {
    let mut out = bytes.to_vec();
    match *m {
        Mutation::FlipBit { at, bit } => {
            if out.is_empty() {
                return None;
            }
            let at = at % out.len();
            out[at] ^= 1 << bit;
        }
        Mutation::Truncate { to } => {
            if out.is_empty() {
                return None;
            }
            out.truncate(to % out.len());
        }
        Mutation::Insert { at, byte } => out.insert(at % (out.len() + 1), byte),
        Mutation::Replace(ref with) => out.clone_from(with),
    }
    (out != bytes).then_some(out)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn any_blob_mutation_fails_cleanly(m in mutation()) {
        let f = FIXTURE.with(|f| f.clone());
        if let Some(mutated) = apply(&f.blob, &m) {
            assert_refused(&f, Ciphertext::Blob(mutated))?;
        }
    }

    #[test]
    fn any_envelope_field_mutation_fails_cleanly(field in 0usize..5, m in mutation()) {
        let f = FIXTURE.with(|f| f.clone());
        let mut envelope = f.envelope.clone();
        let target: &mut Vec<u8> = match field {
            0 => {
                let Some(id) = apply(envelope.encryption_key_id.as_bytes(), &m) else {
                    return Ok(());
                };
                // Ids are strings: a mutation that is not UTF-8 cannot be sent.
                let Ok(id) = String::from_utf8(id) else { return Ok(()) };
                envelope.encryption_key_id = id;
                return assert_refused(&f, Ciphertext::Envelope(envelope));
            }
            1 => &mut envelope.data_key_ciphertext,
            2 => &mut envelope.data_key_iv,
            3 => &mut envelope.payload_ciphertext,
            _ => &mut envelope.payload_iv,
        };
        let Some(mutated) = apply(target, &m) else { return Ok(()) };
        *target = mutated;
        assert_refused(&f, Ciphertext::Envelope(envelope))?;
    }
}

thread_local! {
    static FIXTURE: Arc<Fixture> = Arc::new(fixture());
}

#[test]
fn the_fixture_decrypts_and_round_trips_through_the_blob() {
    let f = fixture();
    let opened = f
        .runtime
        .block_on(
            f.service
                .decrypt(Ciphertext::Blob(f.blob.clone()), &f.context),
        )
        .unwrap();
    assert_eq!(
        opened.plaintext.as_bytes(),
        b"postgres://user:hunter2@db/app"
    );
    assert_eq!(blob::parse(&f.blob).unwrap(), f.envelope);
}

/// The fuzz targets' seed corpus (`fuzz/corpus/`) holds valid inputs for the
/// same deterministic service; this keeps it valid as formats evolve.
/// `KEYWARD_WRITE_FUZZ_SEEDS=1 cargo test hostile` rewrites it.
#[test]
fn committed_fuzz_seeds_are_valid_requests() {
    use keyward::{
        api::{
            auth::Caller,
            proto::{self, crypto_server::Crypto},
            CryptoApi,
        },
        auth::{audit::AuditLog, Principal},
        crypto::legacy::encrypt_legacy,
    };
    use prost::Message;

    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let f = fixture();
    if std::env::var_os("KEYWARD_WRITE_FUZZ_SEEDS").is_some() {
        let (iv, ct) = encrypt_legacy(&MasterSecret::new(MASTER).unwrap(), b"legacy secret");
        let context: std::collections::HashMap<String, String> =
            [("connection_id".to_owned(), "42".to_owned())].into();
        let e = &f.envelope;
        let requests = [
            (
                "blob",
                proto::decrypt_request::Ciphertext::Blob(f.blob.clone().into()),
            ),
            (
                "envelope",
                proto::decrypt_request::Ciphertext::Envelope(proto::Envelope {
                    encryption_key_id: e.encryption_key_id.clone(),
                    data_key_ciphertext: e.data_key_ciphertext.clone().into(),
                    data_key_iv: e.data_key_iv.clone().into(),
                    payload_ciphertext: e.payload_ciphertext.clone().into(),
                    payload_iv: e.payload_iv.clone().into(),
                }),
            ),
            (
                "legacy",
                proto::decrypt_request::Ciphertext::Envelope(proto::Envelope {
                    payload_ciphertext: ct.into(),
                    payload_iv: iv.to_vec().into(),
                    ..Default::default()
                }),
            ),
        ];
        std::fs::create_dir_all(root.join("decrypt_input")).unwrap();
        std::fs::create_dir_all(root.join("blob_parse")).unwrap();
        for (name, ciphertext) in requests {
            let request = proto::DecryptRequest {
                context: context.clone(),
                ciphertext: Some(ciphertext),
            };
            std::fs::write(
                root.join("decrypt_input").join(format!("valid-{name}")),
                request.encode_to_vec(),
            )
            .unwrap();
        }
        std::fs::write(root.join("blob_parse/valid-blob"), &f.blob).unwrap();
    }

    let api = CryptoApi::new(Arc::new(service()), Arc::new(AuditLog::off()));
    let mut checked = 0;
    for entry in std::fs::read_dir(root.join("decrypt_input")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.starts_with("valid-") {
            continue; // inputs a local fuzzing run added
        }
        let bytes = std::fs::read(&path).unwrap();
        let mut request = tonic::Request::new(proto::DecryptRequest::decode(&bytes[..]).unwrap());
        request.extensions_mut().insert(Caller {
            principal: Principal::anonymous(),
            peer: None,
        });
        let reply = f
            .runtime
            .block_on(api.decrypt(request))
            .unwrap()
            .into_inner();
        assert!(!reply.plaintext.is_empty());
        checked += 1;
    }
    assert_eq!(checked, 3);
    let blob = std::fs::read(root.join("blob_parse/valid-blob")).unwrap();
    blob::parse(&blob).unwrap();
}
