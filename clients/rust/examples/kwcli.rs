//! A tiny command-line front to the client, used by the cross-client test
//! (every client decrypts what every other one encrypted):
//!
//! ```sh
//! echo -n hunter2 | kwcli encrypt 127.0.0.1:50051 connection_id=42   # prints the blob, base64
//! echo "$BLOB"    | kwcli decrypt 127.0.0.1:50051 connection_id=42   # prints the plaintext
//! ```
//! `KEYWARD_TOKEN` is sent as the bearer token when set.

use std::io::{Read, Write};

use base64::Engine as _;
use keyward_client::{Client, Context};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [op, target, pairs @ ..] = args.as_slice() else {
        return Err("usage: kwcli encrypt|decrypt HOST:PORT [KEY=VALUE ...]".into());
    };
    let context: Context = pairs
        .iter()
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| format!("{p:?} is not KEY=VALUE"))
        })
        .collect::<Result<_, _>>()?;
    let mut builder = Client::builder(format!("http://{target}"));
    if let Ok(token) = std::env::var("KEYWARD_TOKEN") {
        builder = builder.token(token);
    }
    let client = builder.connect().await?;
    let mut input = Vec::new();
    std::io::stdin().read_to_end(&mut input)?;
    let b64 = base64::engine::general_purpose::STANDARD;
    match op.as_str() {
        "encrypt" => {
            let sealed = client.encrypt(input, &context).await?;
            println!("{}", b64.encode(&sealed.blob));
        }
        "decrypt" => {
            let blob = b64.decode(String::from_utf8(input)?.trim())?;
            let opened = client.decrypt(blob, &context).await?;
            std::io::stdout().write_all(&opened.plaintext)?;
        }
        other => return Err(format!("unknown operation {other:?}").into()),
    }
    Ok(())
}
