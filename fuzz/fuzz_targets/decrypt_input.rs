//! Decrypt's whole input path on arbitrary bytes: the bytes are decoded as
//! a `keyward.v1.DecryptRequest` protobuf and handed to the gRPC handler
//! (context validation, envelope or blob parsing, key lookup, unwrap,
//! payload authentication) of a service with one local key. It must never
//! panic and never answer INTERNAL. The seed corpus holds valid requests
//! (tests/api/hostile.rs keeps it valid).
#![no_main]

use std::sync::{Arc, OnceLock};

use keyward::{
    api::{auth::Caller, proto::crypto_server::Crypto, proto::DecryptRequest, CryptoApi},
    auth::{audit::AuditLog, Principal},
    crypto::secret::MasterSecret,
    service::crypto::CryptoService,
};
use libfuzzer_sys::fuzz_target;
use prost::Message;

/// Must match tests/api/hostile.rs, which writes and checks the seeds.
const MASTER: &str = "test-master-secret-0123456789abcdef";

struct Target {
    runtime: tokio::runtime::Runtime,
    api: CryptoApi,
}

fn target() -> &'static Target {
    static TARGET: OnceLock<Target> = OnceLock::new();
    TARGET.get_or_init(|| {
        let master = MasterSecret::new(MASTER).expect("master secret");
        let service = CryptoService::standalone_local(master, "rec-primary", "primary");
        Target {
            runtime: tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("runtime"),
            api: CryptoApi::new(Arc::new(service), Arc::new(AuditLog::off())),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(message) = DecryptRequest::decode(data) else {
        return;
    };
    let t = target();
    let mut request = tonic::Request::new(message);
    request.extensions_mut().insert(Caller {
        principal: Principal::anonymous(),
        peer: None,
    });
    if let Err(status) = t.runtime.block_on(t.api.decrypt(request)) {
        assert_ne!(status.code(), tonic::Code::Internal, "{status:?}");
    }
});
