//! `keyward legacy cutover`: clears the legacy copies once no old pod reads
//! them (runbook §1.6.2); `keyward legacy-encrypt`: a connections row
//! written the way the pre-keyward application did (the legacy-format
//! fixture generator).

use std::{io::Read, path::PathBuf, process::ExitCode};

use anyhow::bail;
use clap::{Args, Subcommand};

use super::{
    audit::{audited, operator_audit_if},
    migrate::EXIT_INCOMPATIBLE,
    open,
    secrets::master_secrets,
    ConfigError, GlobalArgs,
};
use crate::service::cutover::{cutover, CutoverReport, LISTED};

#[derive(Debug, Subcommand)]
pub(super) enum LegacyCommand {
    /// Clear the legacy copies (encrypted_credentials, credentials_iv) that
    /// rotation leaves for the application's old pods, where both copies of
    /// a row decrypt to the same plaintext; list conflicts, clear nothing
    /// else. Exits 0 when no legacy copy is left, 65 when some remain.
    Cutover(CutoverArgs),
    /// Show the legacy format every process uses, as the database records
    /// it; with --set, record the one the --legacy-* flags give (audited).
    Format {
        #[arg(long)]
        set: bool,
    },
}

#[derive(Debug, Args)]
pub(super) struct CutoverArgs {
    /// Examine every row and report what would be cleared; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Append each legacy copy (still encrypted, one JSON line per row) to
    /// FILE, created readable by its owner only, before clearing it.
    #[arg(long, value_name = "FILE")]
    archive_to: Option<PathBuf>,
    /// Confirms that no pod of the application's previous version runs:
    /// those read the legacy columns, and keyward cannot see them.
    /// Required unless --dry-run.
    #[arg(long)]
    old_pods_stopped: bool,
}

pub(super) async fn legacy(global: &GlobalArgs, cmd: LegacyCommand) -> anyhow::Result<ExitCode> {
    let args = match cmd {
        LegacyCommand::Cutover(args) => args,
        LegacyCommand::Format { set } => return format(global, set).await,
    };
    if !args.dry_run && !args.old_pods_stopped {
        bail!(ConfigError(
            "legacy cutover clears what the application's old pods read: run it with --dry-run \
             first, and with --old-pods-stopped once no pod of the old version runs"
                .into()
        ));
    }
    if master_secrets(global)?.is_none() {
        bail!(ConfigError(
            "legacy cutover needs the master secret that wrote the legacy copies: set \
             ENCRYPTION_MASTER_KEY"
                .into()
        ));
    }
    // A dry run writes nothing, the archive included.
    let mut archive = match &args.archive_to {
        Some(path) if !args.dry_run => Some(open_archive(path)?),
        _ => None,
    };
    let audit = operator_audit_if(global, !args.dry_run)?;
    let services = open(global).await?;
    let targets = services.targets.current();
    let run = cutover(
        &services.store,
        &services.crypto,
        &targets,
        args.dry_run,
        archive.as_mut(),
    );
    let detail = match &args.archive_to {
        Some(path) => format!("archive_to={}", path.display()),
        None => "no archive".to_owned(),
    };
    let report = audited(&audit, "cli/legacy cutover", None, detail, run).await?;
    print_report(&report);
    if let Some(why) = &report.stopped {
        bail!("legacy cutover stopped: {why}");
    }
    Ok(if report.finished() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_INCOMPATIBLE)
    })
}

/// The archive file, appended to (a second run adds to the first's).
fn open_archive(path: &std::path::Path) -> anyhow::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| anyhow::anyhow!("cannot open the archive {}: {e}", path.display()))
}

fn print_report(report: &CutoverReport) {
    for (table, column) in &report.not_null {
        println!(
            "refused     {table}.{column} is NOT NULL in the application's schema, and the cutover \
             clears it; keyward does not change the application's constraints"
        );
    }
    let changes = report.schema_changes_needed();
    if !changes.is_empty() {
        println!("the application's migrations must first run:");
        for statement in &changes {
            println!("  {statement}");
        }
        if !report.dry_run {
            println!("nothing was cleared");
            return;
        }
    }
    for row in &report.conflict_rows {
        println!(
            "conflict    {} {}: the legacy copy decrypts to another plaintext than the envelope \
             (written by an old pod after the rotation?); left as it is",
            row.target, row.id
        );
    }
    for (row, why) in &report.unreadable_rows {
        println!(
            "unreadable  {} {}: {why}; left as it is",
            row.target, row.id
        );
    }
    let listed = report.conflict_rows.len() + report.unreadable_rows.len();
    if (report.conflicts + report.unreadable) as usize > listed {
        println!("(only the first {LISTED} of each kind are listed)");
    }
    let verb = if report.dry_run {
        "would clear"
    } else {
        "cleared"
    };
    println!("{verb} {} legacy copies", report.cleared);
    println!("conflicts: {}", report.conflicts);
    println!("unreadable: {}", report.unreadable);
    if report.changed > 0 {
        println!("changed while examined (run again): {}", report.changed);
    }
    if report.not_rotated > 0 {
        println!(
            "legacy rows with no envelope yet: {} (rotate them first: keyward rotate start)",
            report.not_rotated
        );
    }
    if report.finished() && !report.dry_run {
        println!(
            "no legacy copy is left: the legacy key material is no longer needed (runbook §1.6.2)"
        );
    }
}

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
    let store = crate::store::Store::connect(&global.database_url).await?;
    store.migrate().await?;
    let format = crate::service::legacy_format::resolve(&store, master.legacy.as_ref()).await?;
    let (iv, ciphertext) = format
        .encrypt(&master.current, &plaintext)
        .map_err(|e| ConfigError(e.to_string()))?;
    let iv = (!iv.is_empty()).then_some(iv.as_slice());
    store
        .write_legacy_connection(&args.connection_id, args.name.as_deref(), &ciphertext, iv)
        .await?;
    println!("{}", args.connection_id);
    Ok(ExitCode::SUCCESS)
}

/// `keyward legacy format [--set]`.
async fn format(global: &GlobalArgs, set: bool) -> anyhow::Result<ExitCode> {
    use crate::service::legacy_format;
    let store = crate::store::Store::connect(&global.database_url).await?;
    store.migrate().await?;
    if set {
        let Some(format) = global.legacy.format() else {
            bail!(ConfigError(
                "legacy format --set records the format the --legacy-* flags give: pass them"
                    .into()
            ));
        };
        let audit = super::audit::operator_audit_if(global, true)?;
        let change = legacy_format::record(&store, &format);
        super::audit::audited(&audit, "cli/legacy format", None, format.to_json(), change).await?;
    }
    match legacy_format::recorded(&store).await? {
        Some(json) => println!("{json}"),
        None => println!(
            "none recorded: keyward's default, {}",
            crate::crypto::legacy::LegacyFormat::default().to_json()
        ),
    }
    store.close().await;
    Ok(ExitCode::SUCCESS)
}
