//! `keyward seed-key`, `keys …`, `replicas list` and `self-test`: the key
//! catalog as the runbook's §1.2, §1.3, §1.6 and §2.3 use it.

use std::{process::ExitCode, time::Duration};

use clap::{Args, Subcommand};

use super::{
    audit::{audited, operator_audit, operator_audit_if},
    open, ConfigError, GlobalArgs,
};
use crate::{
    keys::{Catalog, KeyRecord},
    service::admin::{CreateKey, Staging},
    store::replicas::ReplicaRecord,
};

#[derive(Debug, Args)]
pub(super) struct SeedArgs {
    /// key_id of the seeded key.
    #[arg(long, env = "DEFAULT_ENCRYPTION_KEY_ID", default_value = "primary")]
    key_id: String,
    /// Alias recorded with the key.
    #[arg(long, env = "DEFAULT_ENCRYPTION_KEY_ALIAS")]
    alias: Option<String>,
    /// KMS key; default `local:<key_id>` (the built-in local KMS).
    #[arg(long, env = "DEFAULT_ENCRYPTION_KMS_KEY_ARN")]
    kms_key_arn: Option<String>,
}

#[derive(Debug, Subcommand)]
pub(super) enum KeysCommand {
    /// List every key record.
    List,
    /// Register a key record (pending unless --activate).
    Create {
        #[arg(long)]
        key_id: String,
        /// KMS key ARN / id / alias, or local:NAME; default local:<key_id>.
        #[arg(long, default_value = "")]
        kms_key_arn: String,
        #[arg(long)]
        alias: Option<String>,
        /// local, aws-kms or pkcs11; default inferred from --kms-key-arn.
        #[arg(long, default_value = "")]
        provider: String,
        /// Activate at once (the previous active key becomes rotating).
        #[arg(long)]
        activate: bool,
        /// A pkcs11 key (--kms-key-arn pkcs11:token=T;object=LABEL): first
        /// generate its AES-256 key object in the token (sensitive, never
        /// extractable), or adopt an AES key object that has the label.
        #[arg(long)]
        generate: bool,
    },
    /// Make a key active; the previous active key becomes rotating.
    Activate {
        key_id: String,
        /// First wait until every live replica can decrypt under the key
        /// (keyward replicas list); a replica that cannot stops activation.
        #[arg(long)]
        staged: bool,
        /// How long --staged waits for the replicas.
        #[arg(long, default_value_t = 60)]
        staged_timeout_secs: u64,
    },
    /// Retire a rotating key; refuses while rows are on it, a rotation job
    /// is live or a replica still encrypts with it, unless --force.
    Retire {
        key_id: String,
        #[arg(long)]
        force: bool,
        /// Only report what blocks the retirement and what to run next.
        #[arg(long)]
        dry_run: bool,
    },
    /// Re-encryption debt: rows per key (legacy included) in each rotation
    /// target, and the age of the oldest.
    Usage,
}

/// `keys create --generate`: the key object in the HSM, before the record.
async fn generate_key_object(
    global: &GlobalArgs,
    provider: &str,
    kms_key_arn: &str,
) -> anyhow::Result<()> {
    use crate::crypto::kms::{provider_of_new_key, ProviderKind};
    let pkcs11 = match provider {
        "" => provider_of_new_key(kms_key_arn).ok() == Some(ProviderKind::Pkcs11),
        named => ProviderKind::parse(named) == Some(ProviderKind::Pkcs11),
    };
    if !pkcs11 {
        anyhow::bail!(ConfigError(
            "--generate makes key objects in an HSM: give --kms-key-arn pkcs11:token=TOKEN;object=LABEL \
             (aws-kms keys are created in AWS KMS, local keys need nothing)"
                .into()
        ));
    }
    #[cfg(feature = "pkcs11")]
    {
        use crate::crypto::kms::pkcs11::{KeyObject, Pkcs11Kms};
        let hsm = Pkcs11Kms::new(global.pkcs11_settings()?);
        match hsm.create_key_object(kms_key_arn).await? {
            KeyObject::Generated => {
                println!("generated an AES-256 key object in the token: {kms_key_arn}")
            }
            KeyObject::Adopted => println!(
                "the token already holds that AES key object; it is used as is: {kms_key_arn}"
            ),
        }
        Ok(())
    }
    #[cfg(not(feature = "pkcs11"))]
    {
        let _ = global;
        anyhow::bail!(ConfigError("this build has no pkcs11 provider".into()))
    }
}

#[derive(Debug, Subcommand)]
pub(super) enum ReplicasCommand {
    /// Every keyward process heartbeating into this database: catalog
    /// version, last heartbeat, active key and key readiness.
    List,
}

pub(super) async fn keys(global: &GlobalArgs, cmd: KeysCommand) -> anyhow::Result<ExitCode> {
    let changes = matches!(
        cmd,
        KeysCommand::Create { .. }
            | KeysCommand::Activate { .. }
            | KeysCommand::Retire { dry_run: false, .. }
    );
    let audit = operator_audit_if(global, changes)?;
    let services = open(global).await?;
    let admin = &services.admin;
    match cmd {
        KeysCommand::List => print_keys(&admin.list_keys().await?),
        KeysCommand::Create {
            key_id,
            kms_key_arn,
            alias,
            provider,
            activate,
            generate,
        } => {
            if generate {
                generate_key_object(global, &provider, &kms_key_arn).await?;
            }
            let detail = format!("kms_key_arn={kms_key_arn} activate={activate}");
            let create = admin.create_key(CreateKey {
                key_id: key_id.clone(),
                kms_key_arn,
                alias,
                provider,
                activate,
            });
            let key = audited(&audit, "cli/keys create", Some(&key_id), detail, create).await?;
            print_keys(&[key]);
        }
        KeysCommand::Activate {
            key_id,
            staged,
            staged_timeout_secs,
        } => {
            let staging = if staged {
                Staging::Staged {
                    timeout: Duration::from_secs(staged_timeout_secs),
                }
            } else {
                Staging::Immediate
            };
            let activate = admin.activate_key(&key_id, staging);
            let detail = format!("staged={staged}");
            let activation =
                audited(&audit, "cli/keys activate", Some(&key_id), detail, activate).await?;
            for replica in &activation.confirmed {
                println!(
                    "confirmed by {}",
                    crate::service::replica::describe(replica)
                );
            }
            print_keys(&[activation.activated]);
            if let Some(previous) = activation.previous {
                println!("previous active key {} is now rotating", previous.key_id);
            }
            println!("running servers load it within a second (catalog version), or at once on PostgreSQL");
        }
        KeysCommand::Retire {
            key_id,
            force: _,
            dry_run: true,
        } => {
            let plan = admin.retire_plan(&key_id).await?;
            if plan.blockers.is_empty() {
                println!("key {} can be retired", plan.key.key_id);
            } else {
                println!("key {} cannot be retired yet:", plan.key.key_id);
                for blocker in &plan.blockers {
                    println!("  - {blocker}");
                }
            }
            println!("next:");
            for step in &plan.next_steps {
                println!("  - {step}");
            }
            return Ok(if plan.blockers.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        KeysCommand::Retire {
            key_id,
            force,
            dry_run: false,
        } => {
            let retire = admin.retire_key(&key_id, force);
            let detail = format!("force={force}");
            let retirement =
                audited(&audit, "cli/keys retire", Some(&key_id), detail, retire).await?;
            if let Some(audit) = &audit {
                audit.record_forced_retirement(&retirement);
            }
            print_keys(&[retirement.key]);
            for overridden in &retirement.overridden {
                tracing::warn!(key_id = %key_id, %overridden, "forced retirement overrode a blocker");
                println!("warning: retired with --force although {overridden}");
            }
        }
        KeysCommand::Usage => {
            let now = chrono::Utc::now();
            println!(
                "{:<20}  {:<8}  {:<16}  {:>10}  {:>13}  {:>9}  OLDEST",
                "KEY_ID", "STATUS", "TARGET", "ROWS", "LEGACY_COPIES", "CONFLICTS"
            );
            for report in admin.key_usage().await? {
                let (name, status) = match (&report.key, &report.key_record_id) {
                    (Some(key), _) => (key.key_id.clone(), key.status.to_string()),
                    (None, None) => ("(legacy)".to_owned(), "-".to_owned()),
                    (None, Some(id)) => (id.clone(), "unknown".to_owned()),
                };
                for usage in &report.targets {
                    let oldest = usage.oldest_written_at.map_or("-".to_owned(), |t| {
                        format!("{} ({}s ago)", t.to_rfc3339(), (now - t).num_seconds())
                    });
                    println!(
                        "{name:<20}  {status:<8}  {:<16}  {:>10}  {:>13}  {:>9}  {oldest}",
                        usage.target, usage.rows, usage.legacy_copies, usage.legacy_conflicts
                    );
                }
            }
            // Conflicts are found by decrypting both copies: say when.
            for check in admin.legacy_checks().await? {
                println!(
                    "legacy copies of {} last checked {}: {} in conflict with their envelope",
                    check.target,
                    check.checked_at.to_rfc3339(),
                    check.conflicts
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) fn print_replicas(replicas: &[ReplicaRecord], catalog: &Catalog, version: i64) {
    let now = chrono::Utc::now();
    let name = |id: &str| catalog.get(id).map_or(id.to_owned(), |k| k.key_id.clone());
    println!("catalog version {version}");
    println!(
        "{:<20}  {:<6}  {:<5}  {:<24}  {:>7}  {:>9}  {:<20}  {:<33}  KEYS",
        "ID",
        "KIND",
        "LIVE",
        "HOST / LISTEN",
        "CATALOG",
        "HEARTBEAT",
        "ACTIVE KEY",
        "MASTER SECRETS (CURRENT,PREVIOUS)"
    );
    for r in replicas {
        let keys: Vec<String> = r
            .key_readiness
            .iter()
            .map(|(id, err)| match err {
                None => format!("{} ok", name(id)),
                Some(reason) => format!("{} NOT READY ({reason})", name(id)),
            })
            .collect();
        let master = match &r.master_fingerprints {
            None => "unknown".to_owned(),
            Some(list) if list.is_empty() => "none".to_owned(),
            Some(list) => list
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
        };
        println!(
            "{:<20}  {:<6}  {:<5}  {:<24}  {:>7}  {:>8}s  {:<20}  {master:<33}  {}",
            r.id,
            r.kind.as_str(),
            if r.is_live(now) { "yes" } else { "no" },
            match &r.listen {
                Some(listen) => format!("{}/{listen}", r.host),
                None => r.host.clone(),
            },
            r.catalog_version,
            (now - r.heartbeat_at).num_seconds(),
            r.active_key_id.as_deref().map(name).unwrap_or_default(),
            keys.join(", ")
        );
    }
}

pub(super) fn print_keys(keys: &[KeyRecord]) {
    println!(
        "{:<36}  {:<20}  {:<8}  {:<8}  {:<40}  ALIAS",
        "ID", "KEY_ID", "STATUS", "PROVIDER", "KMS_KEY_ARN"
    );
    for k in keys {
        println!(
            "{:<36}  {:<20}  {:<8}  {:<8}  {:<40}  {}",
            k.id,
            k.key_id,
            k.status,
            k.provider,
            k.kms_key_arn,
            k.alias.as_deref().unwrap_or("")
        );
    }
    note_local_by_guess(keys.iter());
}

/// A note under each key whose name was taken as a local key's.
fn note_local_by_guess<'a>(keys: impl Iterator<Item = &'a KeyRecord>) {
    for k in keys.filter(|k| k.local_by_guess()) {
        println!(
            "note: key {} has kms_key_arn {:?}, taken as a local key name; new records must say \
             local:NAME (or name an AWS KMS key)",
            k.key_id, k.kms_key_arn
        );
    }
}

pub(super) async fn seed_key(global: &GlobalArgs, args: SeedArgs) -> anyhow::Result<ExitCode> {
    let audit = operator_audit(global)?;
    let services = open(global).await?;
    let detail = format!(
        "kms_key_arn={}",
        args.kms_key_arn.as_deref().unwrap_or("local:<key_id>")
    );
    let key_id = args.key_id.clone();
    let seed = services.admin.seed_key(CreateKey {
        key_id: args.key_id,
        kms_key_arn: args.kms_key_arn.unwrap_or_default(),
        alias: args.alias,
        ..CreateKey::default()
    });
    let key = audit
        .audited("cli/seed-key", Some(&key_id), Some(detail), seed)
        .await?;
    tracing::info!(id = %key.id, key_id = %key.key_id, "active key seeded");
    println!("{}", key.id);
    Ok(ExitCode::SUCCESS)
}

/// `replicas list`.
pub(super) async fn replicas(
    global: &GlobalArgs,
    cmd: ReplicasCommand,
) -> anyhow::Result<ExitCode> {
    let ReplicasCommand::List = cmd;
    let services = open(global).await?;
    let (replicas, version) = services.admin.list_replicas().await?;
    print_replicas(&replicas, &services.admin.catalog_snapshot(), version);
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn self_test(global: &GlobalArgs) -> anyhow::Result<ExitCode> {
    let services = open(global).await?;
    let report = services.admin.self_test().await?;
    for check in &report.keys {
        match &check.problems() {
            None => println!(
                "ok    {} ({}, {})",
                check.key.key_id, check.key.provider, check.key.status
            ),
            Some(err) => println!(
                "FAIL  {} ({}, {}): {err}",
                check.key.key_id, check.key.provider, check.key.status
            ),
        }
    }
    note_local_by_guess(report.keys.iter().map(|c| c.key.as_ref()));
    if report.passed() {
        println!("Encryption self-test: ✅ passed");
        Ok(ExitCode::SUCCESS)
    } else {
        if !report
            .keys
            .iter()
            .any(|c| c.key.status == crate::keys::KeyStatus::Active)
        {
            println!("no active key");
        }
        println!("Encryption self-test: ❌ failed");
        Ok(ExitCode::FAILURE)
    }
}
