use keyward::{
    app::Services,
    config::MasterSecrets,
    crypto::context::EncryptionContext,
    service::{admin::CreateKey, crypto::Limits},
};
use std::{sync::Arc, time::Instant};
#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let m = MasterSecrets::parse("0123456789abcdef0123456789", &[]).unwrap();
    let s = Services::open(
        &format!("sqlite://{}/x.db", dir.path().display()),
        Some(&m),
        Limits::default(),
    )
    .await
    .unwrap();
    s.admin
        .seed_key(CreateKey {
            key_id: "k".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let ctx = EncryptionContext::from_pairs([("connection_id", "bench")]).unwrap();
    for size in [16usize, 1024] {
        let pt = vec![0u8; size];
        let n = 200_000;
        let t = Instant::now();
        for _ in 0..n {
            std::hint::black_box(s.crypto.encrypt(&pt, &ctx).await.unwrap());
        }
        println!(
            "encrypt {size}: {:.2} us",
            t.elapsed().as_secs_f64() * 1e6 / n as f64
        );
        let sealed = s.crypto.encrypt(&pt, &ctx).await.unwrap();
        let t = Instant::now();
        for _ in 0..n {
            std::hint::black_box(
                s.crypto
                    .decrypt(
                        keyward::service::crypto::Ciphertext::Blob(sealed.blob.clone()),
                        &ctx,
                    )
                    .await
                    .unwrap(),
            );
        }
        println!(
            "decrypt {size}: {:.2} us",
            t.elapsed().as_secs_f64() * 1e6 / n as f64
        );
    }
    let _ = Arc::new(());
}
