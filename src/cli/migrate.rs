//! `keyward migrate [--dry-run]`: keyward's schema, on a database of its
//! own or adopted into an application's (see `store::adopt`).

use std::process::ExitCode;

use clap::Args;

use super::{redact_url, GlobalArgs};
use crate::store::{
    adopt::{AdoptError, AdoptPlan},
    Store, StoreError,
};

/// Exit status when the database holds a column keyward cannot use
/// (sysexits' EX_DATAERR); nothing was changed.
pub const EXIT_INCOMPATIBLE: u8 = 65;

#[derive(Debug, Args)]
pub(super) struct MigrateArgs {
    /// Print what adopting this database would add and what it refuses,
    /// and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Also make the changes adoption needs in the application's own types
    /// and constraints (a status its enum or CHECK constraint lacks);
    /// without it, migrate lists them and changes nothing.
    #[arg(long)]
    allow_app_schema_changes: bool,
}

pub(super) async fn migrate(global: &GlobalArgs, args: MigrateArgs) -> anyhow::Result<ExitCode> {
    let store = Store::connect(&global.database_url).await?;
    let url = redact_url(&global.database_url);
    if args.dry_run {
        match store.adoption_plan().await? {
            None => println!(
                "{url}: no application database to adopt; migrate applies keyward's migrations as they are"
            ),
            Some(plan) => print!("{}", describe(&url, &plan)),
        }
        return Ok(ExitCode::SUCCESS);
    }
    match store.migrate_with(args.allow_app_schema_changes).await {
        Ok(()) => {
            println!("migrations applied to {url}");
            Ok(ExitCode::SUCCESS)
        }
        Err(StoreError::Adopt(
            refused @ (AdoptError::Incompatible(_) | AdoptError::AppSchemaChanges(_)),
        )) => {
            eprintln!("keyward: {refused}");
            Ok(ExitCode::from(EXIT_INCOMPATIBLE))
        }
        Err(err) => Err(err.into()),
    }
}

/// The dry run's report.
fn describe(url: &str, plan: &AdoptPlan) -> String {
    let mut out = format!(
        "{url} is an application's database; migrate would adopt it ({} steps):\n",
        plan.steps.len()
    );
    for (i, step) in plan.steps.iter().enumerate() {
        out.push_str(&format!("{:>3}. {step}\n", i + 1));
    }
    if !plan.app_changes.is_empty() {
        out.push_str(
            "and first changes the application's own schema, only with \
             --allow-app-schema-changes (without it, migrate exits 65 and changes nothing):\n",
        );
        for step in &plan.app_changes {
            out.push_str(&format!("  - {step}\n"));
        }
    }
    if plan.refusals.is_empty() {
        out.push_str("nothing is refused; then keyward's later migrations run as usual\n");
    } else {
        out.push_str(&format!(
            "and refuses it (exit status {EXIT_INCOMPATIBLE}, nothing changed), because:\n"
        ));
        for refusal in &plan.refusals {
            out.push_str(&format!("  - {refusal}\n"));
        }
    }
    out
}
