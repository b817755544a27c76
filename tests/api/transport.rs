//! The server's connections (`keyward::transport`): many large calls at
//! once on one connection, more than a connection's write queue holds, come
//! back whole and in their own streams; clients that connect with the same
//! coalescing transport interoperate; a client that vanishes mid-request
//! leaves the server serving.

use keyward::{
    api::proto::{
        batch_decrypt_result, batch_encrypt_result, crypto_client::CryptoClient,
        decrypt_request::Ciphertext, BatchDecryptRequest, BatchEncryptRequest, DecryptRequest,
        EncryptRequest, EnvelopeForm,
    },
    transport::{connect_channel, QUEUE_LIMIT},
};
use tokio::io::AsyncWriteExt;
use tonic::transport::{Channel, Endpoint};

use crate::helpers::{ctx, spawn, Backend};

/// Distinct plaintext per (call, item), so a byte from another stream or a
/// reordered frame cannot go unnoticed.
fn plaintext(call: usize, item: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (call * 131 + item * 17 + i) as u8)
        .collect()
}

/// One BatchEncrypt of `items` × `len` bytes and the BatchDecrypt of what
/// it returned, compared item by item.
async fn round_trip_batch(
    mut client: CryptoClient<Channel>,
    call: usize,
    items: usize,
    len: usize,
) {
    let id = format!("c-{call}");
    let context = [("connection_id", id.as_str())];
    let requests = (0..items)
        .map(|item| EncryptRequest {
            plaintext: plaintext(call, item, len).into(),
            context: ctx(&context),
            form: EnvelopeForm::Both as i32,
        })
        .collect();
    let results = client
        .batch_encrypt(BatchEncryptRequest { items: requests })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results.len(), items);
    let blobs = results.into_iter().map(|r| match r.result.unwrap() {
        batch_encrypt_result::Result::Ok(ok) => ok.blob,
        batch_encrypt_result::Result::Error(e) => panic!("call {call}: {e:?}"),
    });
    let decrypts = blobs
        .map(|blob| DecryptRequest {
            context: ctx(&context),
            ciphertext: Some(Ciphertext::Blob(blob)),
        })
        .collect();
    let opened = client
        .batch_decrypt(BatchDecryptRequest { items: decrypts })
        .await
        .unwrap()
        .into_inner()
        .results;
    for (item, result) in opened.into_iter().enumerate() {
        match result.result.unwrap() {
            batch_decrypt_result::Result::Ok(ok) => assert!(
                ok.plaintext[..] == plaintext(call, item, len)[..],
                "call {call} item {item} came back changed"
            ),
            batch_decrypt_result::Result::Error(e) => panic!("call {call} item {item}: {e:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_large_calls_on_one_connection_come_back_whole() {
    let Some(app) = spawn(Backend::Sqlite).await else {
        return;
    };
    // 16 calls × 48 items × 8 KiB: each response carries ~800 KB (both
    // forms), the whole ~13 MB in flight at once on one HTTP/2 connection,
    // far past what one connection's write queue holds.
    let (calls, items, len) = (16, 48, 8 * 1024);
    assert!(items * len * 2 > QUEUE_LIMIT);
    let tasks: Vec<_> = (0..calls)
        .map(|call| tokio::spawn(round_trip_batch(app.crypto.clone(), call, items, len)))
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coalescing_client_interoperates_with_the_server() {
    let Some(app) = spawn(Backend::Sqlite).await else {
        return;
    };
    let endpoint = Endpoint::from_shared(format!("http://{}", app.addr)).unwrap();
    let channel = connect_channel(endpoint).await.unwrap();
    // Unary calls of every size from 1 byte to 64 KiB, 32 at a time.
    let tasks: Vec<_> = (0..32)
        .map(|call| {
            let mut client = CryptoClient::new(channel.clone());
            tokio::spawn(async move {
                for round in 0..8 {
                    let len = 1 + (call * 2_039 + round * 8_191) % (64 * 1024);
                    let expected = plaintext(call, round, len);
                    let sealed = client
                        .encrypt(EncryptRequest {
                            plaintext: expected.clone().into(),
                            context: ctx(&[("connection_id", "unary")]),
                            form: EnvelopeForm::Blob as i32,
                        })
                        .await
                        .unwrap()
                        .into_inner();
                    let opened = client
                        .decrypt(DecryptRequest {
                            context: ctx(&[("connection_id", "unary")]),
                            ciphertext: Some(Ciphertext::Blob(sealed.blob)),
                        })
                        .await
                        .unwrap()
                        .into_inner();
                    assert!(
                        opened.plaintext[..] == expected[..],
                        "call {call} round {round}"
                    );
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    round_trip_batch(CryptoClient::new(channel), 99, 48, 8 * 1024).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_vanishes_mid_request_leaves_the_server_serving() {
    let Some(app) = spawn(Backend::Sqlite).await else {
        return;
    };
    for _ in 0..20 {
        let mut raw = tokio::net::TcpStream::connect(app.addr).await.unwrap();
        // The HTTP/2 preface, then the start of a frame that never ends.
        raw.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04\x00")
            .await
            .unwrap();
        drop(raw);
    }
    round_trip_batch(app.crypto.clone(), 1, 8, 1024).await;
    assert_eq!(app.health_status().await, 1, "SERVING");
}
