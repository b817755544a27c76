//! `keyward legacy-encrypt`: a connections row written the way the
//! pre-keyward application did (the legacy-format fixture generator).

use std::{io::Read, process::ExitCode};

use anyhow::bail;
use clap::Args;

use super::{secrets::master_secrets, ConfigError, GlobalArgs};
use crate::crypto::legacy::encrypt_legacy;

#[derive(Debug, Args)]
pub(super) struct LegacyArgs {
    /// connections.id of the row to write (created or overwritten).
    #[arg(long)]
    connection_id: String,
    /// connections.name of the row.
    #[arg(long)]
    name: Option<String>,
}

pub(super) async fn legacy_encrypt(
    global: &GlobalArgs,
    args: LegacyArgs,
) -> anyhow::Result<ExitCode> {
    let Some(master) = master_secrets(global)? else {
        bail!(ConfigError(
            "legacy-encrypt needs the master secret: set ENCRYPTION_MASTER_KEY".into()
        ));
    };
    let mut plaintext = zeroize::Zeroizing::new(Vec::new());
    std::io::stdin().read_to_end(&mut plaintext)?;
    if plaintext.is_empty() {
        bail!("no plaintext on standard input");
    }
    let (iv, ciphertext) = encrypt_legacy(&master.current, &plaintext);
    let store = crate::store::Store::connect(&global.database_url).await?;
    store.migrate().await?;
    store
        .write_legacy_connection(&args.connection_id, args.name.as_deref(), &ciphertext, &iv)
        .await?;
    println!("{}", args.connection_id);
    Ok(ExitCode::SUCCESS)
}
