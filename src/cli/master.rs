//! `keyward master-secret status`: where a master-secret rollover stands
//! (runbook §2.1) and whether `ENCRYPTION_MASTER_KEY_PREVIOUS` may go.

use std::process::ExitCode;

use anyhow::bail;
use clap::Subcommand;

use super::{migrate::EXIT_INCOMPATIBLE, open, secrets::master_secrets, ConfigError, GlobalArgs};
use crate::{
    crypto::{kms::local::Wrapping, secret::Fingerprint},
    service::rollout::{report, RolloverReport},
};

#[derive(Debug, Subcommand)]
pub(super) enum MasterSecretCommand {
    /// Show the master secrets this process and every live replica hold,
    /// the rows each secret wrapped, and what still needs the previous
    /// one. Exits 0 when nothing does (it may be removed), 65 otherwise.
    Status,
}

pub(super) async fn master_secret(
    global: &GlobalArgs,
    cmd: MasterSecretCommand,
) -> anyhow::Result<ExitCode> {
    let MasterSecretCommand::Status = cmd;
    if master_secrets(global)?.is_none() {
        bail!(ConfigError(
            "master-secret status compares against this process's secrets: set \
             ENCRYPTION_MASTER_KEY (the new one) and ENCRYPTION_MASTER_KEY_PREVIOUS"
                .into()
        ));
    }
    let services = open(global).await?;
    let status = report(
        &services.store,
        &services.crypto,
        &services.admin.catalog_snapshot(),
        &services.targets.current(),
    )
    .await?;
    print!("{}", render(&status));
    Ok(match status.blockers().is_empty() {
        true => ExitCode::SUCCESS,
        false => ExitCode::from(EXIT_INCOMPATIBLE),
    })
}

/// The report as the operator reads it.
fn render(status: &RolloverReport) -> String {
    let mut out = String::from("master secrets of this process:\n");
    for (n, fp) in status.secrets.iter().enumerate() {
        let role = if n == 0 { "current" } else { "previous" };
        let wraps = match status.wrapping {
            Wrapping::Tagged(i) if i == n => ", wraps new data keys",
            Wrapping::Untagged if n == 0 => {
                ", wraps new data keys (in the format before fingerprints)"
            }
            _ => "",
        };
        out += &format!("  {fp}  {role}{wraps}\n");
    }
    let replicas = status.replicas.iter().map(|(replica, secrets)| {
        let list = match secrets {
            None => "does not report its master secrets".to_owned(),
            Some(list) if list.is_empty() => "no master secret".to_owned(),
            Some(list) => list
                .iter()
                .map(Fingerprint::to_string)
                .collect::<Vec<_>>()
                .join(", "),
        };
        format!("{replica}: {list}")
    });
    section(&mut out, "live replicas", replicas);
    let rows = status.rows.iter().map(|(fp, rows)| {
        let name = match fp {
            Some(fp) if Some(*fp) == status.current() => format!("{fp} (current)"),
            Some(fp) => fp.to_string(),
            None => "unnamed (wrapped before data keys named their secret)".to_owned(),
        };
        format!("{name}: {rows}")
    });
    section(
        &mut out,
        "rows on local keys, by the master secret that wrapped their data key",
        rows,
    );
    out += &format!("legacy copies: {}\n", status.legacy_copies);
    out += &format!(
        "rows still needing the previous master secret: {}\n",
        status.rows_needing_previous()
    );
    let blockers = status.blockers();
    if blockers.is_empty() && status.secrets.len() < 2 {
        out += "no previous master secret is configured: nothing to remove\n";
    } else if blockers.is_empty() {
        out += "the previous master secret may be removed: unset ENCRYPTION_MASTER_KEY_PREVIOUS \
                and restart each replica\n";
    } else {
        out += "keep ENCRYPTION_MASTER_KEY_PREVIOUS until:\n";
        for blocker in blockers {
            out += &format!("  - {blocker}\n");
        }
    }
    out
}

/// A titled list, `(none)` when empty.
fn section(out: &mut String, title: &str, lines: impl Iterator<Item = String>) {
    *out += &format!("{title}:\n");
    let mut empty = true;
    for line in lines {
        *out += &format!("  {line}\n");
        empty = false;
    }
    if empty {
        *out += "  (none)\n";
    }
}
