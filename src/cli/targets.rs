//! `keyward targets list|add|remove`: the rotation targets every server,
//! worker and operator command follows, kept in the database
//! (`service::targets`).

use std::process::ExitCode;

use clap::Subcommand;

use super::{
    audit::{audited, operator_audit_if},
    rotation_targets, ConfigError, GlobalArgs,
};
use crate::{
    rotation::definition::TargetDefinition,
    service::targets::{self, TargetList},
};

#[derive(Debug, Subcommand)]
pub(super) enum TargetsCommand {
    /// List the rotation targets in the order rotation walks them:
    /// connections, then the listed tables (table, encoding, definition).
    List,
    /// List a table: DEFINITION is a --rotation-targets entry, e.g.
    /// '{"table": "api_tokens", "context": {"token_id": "id"}}'. Checked
    /// against the table's columns; `{"table": "connections", "encoding":
    /// "base64"}` sets the connections encoding. Refused while a rotation
    /// job is pending or running.
    Add { definition: String },
    /// Stop listing a table. Refused while it holds envelopes (keyward
    /// would no longer count them before retiring a key), unless --force.
    Remove {
        table: String,
        #[arg(long)]
        force: bool,
    },
}

pub(super) async fn targets(global: &GlobalArgs, cmd: TargetsCommand) -> anyhow::Result<ExitCode> {
    let changes = !matches!(cmd, TargetsCommand::List);
    let audit = operator_audit_if(global, changes)?;
    let store = crate::store::Store::connect(&global.database_url).await?;
    store.migrate().await?;
    let file = rotation_targets(global)?;
    let list = TargetList::open(store.clone(), (!file.is_empty()).then_some(&file[..])).await?;
    match cmd {
        TargetsCommand::List => {}
        TargetsCommand::Add { definition } => {
            let target = targets::parse(&definition).map_err(|err| ConfigError(err.to_string()))?;
            let detail = TargetDefinition::of(&target).to_json();
            audited(&audit, "cli/targets add", None, detail, list.add(target)).await?;
        }
        TargetsCommand::Remove { table, force } => {
            let detail = format!("table={table} force={force}");
            let remove = list.remove(&table, force);
            audited(&audit, "cli/targets remove", None, detail, remove).await?;
        }
    }
    for target in list.current().iter() {
        println!(
            "{:<24} {:<7} {}",
            target.table.as_str(),
            target.encoding.as_str(),
            TargetDefinition::of(target).to_json()
        );
    }
    store.close().await;
    Ok(ExitCode::SUCCESS)
}
