//! The rotation targets every process follows: `connections`, then the
//! tables listed in the database (`keyward_rotation_targets`), resolved
//! against the live schema. One list for every server, worker and
//! operator command: `keyward targets add|list|remove` and the Admin API
//! change it; a `--rotation-targets` file seeds an empty list or must
//! agree with it (a process whose file disagrees refuses to start, naming
//! the difference).
//!
//! The list is reloaded with the key catalog (a change moves the catalog
//! version), so a change reaches every process as a key change does.
//! Changes are refused while a rotation job is pending or running.

use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::Mutex;

use crate::{
    error::{Error, Result},
    rotation::{
        definition::{self, TargetDefinition},
        target::RotationTarget,
    },
    store::{
        targets::{TargetChange, TargetEdit},
        Store, StoreError,
    },
};

/// Where a process's list came from, for messages.
const FILE: &str = "--rotation-targets";
const DATABASE: &str = "the database (keyward targets list)";

pub struct TargetList {
    store: Store,
    current: ArcSwap<Vec<RotationTarget>>,
    /// The stored definitions `current` was built from.
    loaded: ArcSwap<Vec<String>>,
    reload_lock: Mutex<()>,
}

impl TargetList {
    /// Loads the list. With `file` (the targets of a `--rotation-targets`
    /// file, `connections` first): seeds an empty list from it, or refuses
    /// when the two differ.
    pub async fn open(store: Store, file: Option<&[RotationTarget]>) -> Result<Self> {
        if let Some(file) = file {
            let rows: Vec<(String, String)> = file
                .iter()
                .map(TargetDefinition::of)
                .filter(|d| *d != TargetDefinition::of(&RotationTarget::connections()))
                .map(|d| (d.table.clone(), d.to_json()))
                .collect();
            if !rows.is_empty() && store.seed_target_definitions(&rows).await? {
                tracing::info!(
                    targets = rows.len(),
                    "rotation targets seeded from --rotation-targets"
                );
            }
        }
        let list = Self {
            store,
            current: ArcSwap::default(),
            loaded: ArcSwap::default(),
            reload_lock: Mutex::new(()),
        };
        list.reload().await?;
        if let Some(file) = file {
            let differences = definition::differences(FILE, file, DATABASE, &list.current());
            if !differences.is_empty() {
                return Err(Error::TargetsDiffer(differences.join("; ")));
            }
        }
        Ok(list)
    }

    /// The targets, `connections` first, in the order rotation walks them.
    pub fn current(&self) -> Arc<Vec<RotationTarget>> {
        self.current.load_full()
    }

    /// Reads the stored list again; resolves it against the schema when it
    /// changed.
    pub async fn reload(&self) -> Result<()> {
        let _one_at_a_time = self.reload_lock.lock().await;
        let stored = self.store.list_target_definitions().await?;
        if !self.current.load().is_empty() && **self.loaded.load() == stored {
            return Ok(());
        }
        let mut connections = RotationTarget::connections();
        let mut extra = Vec::with_capacity(stored.len());
        for json in &stored {
            let target = definition::parse_one(json).map_err(|err| {
                StoreError::Corrupt(format!("keyward_rotation_targets holds {json}: {err}"))
            })?;
            if target.table.as_str() == "connections" {
                connections = target;
            } else {
                extra.push(target);
            }
        }
        let resolved = self
            .store
            .resolve_targets(std::iter::once(connections).chain(extra).collect())
            .await?;
        self.current.store(Arc::new(resolved));
        self.loaded.store(Arc::new(stored));
        Ok(())
    }

    /// Lists a table (or gives `connections` its encoding), after checking
    /// that the table has every column the definition names.
    pub async fn add(&self, target: RotationTarget) -> Result<()> {
        let missing = self.store.missing_columns(&target).await?;
        if !missing.is_empty() {
            return Err(Error::TargetNotInSchema(format!(
                "the database has no {}",
                missing.join(", ")
            )));
        }
        let table = target.table.as_str().to_owned();
        // The encodings of existing columns, as at startup.
        self.store.resolve_targets(vec![target.clone()]).await?;
        let json = TargetDefinition::of(&target).to_json();
        let replace = table == "connections";
        let edit = TargetEdit::Add {
            json: &json,
            replace,
        };
        match self.store.edit_target_definition(&table, edit).await? {
            TargetChange::Done => {}
            TargetChange::Unchanged => return Err(Error::TargetListed(table)),
            TargetChange::JobInFlight(job) => return Err(Error::TargetsBusy(job)),
        }
        self.reload().await
    }

    /// Stops listing a table (`connections` returns to its defaults).
    /// Refused while the table holds envelopes, unless `force`: keyward
    /// would stop counting them before retiring a key.
    pub async fn remove(&self, table: &str, force: bool) -> Result<()> {
        let listed = self.current();
        let target = listed.iter().find(|t| t.table.as_str() == table);
        if let (Some(target), false) = (target, force || table == "connections") {
            let rows: i64 = self
                .store
                .key_usage(std::slice::from_ref(target))
                .await?
                .iter()
                .filter(|u| u.key_record_id.is_some())
                .map(|u| u.rows)
                .sum();
            if rows > 0 {
                return Err(Error::TargetInUse {
                    table: table.to_owned(),
                    rows,
                });
            }
        }
        match self
            .store
            .edit_target_definition(table, TargetEdit::Remove)
            .await?
        {
            TargetChange::Done => self.reload().await,
            TargetChange::Unchanged => Err(Error::TargetNotListed(table.to_owned())),
            TargetChange::JobInFlight(job) => Err(Error::TargetsBusy(job)),
        }
    }
}

/// A definition from the Admin API or the CLI, checked.
pub fn parse(json: &str) -> Result<RotationTarget> {
    definition::parse_one(json).map_err(|err| Error::InvalidField {
        field: "definition",
        reason: err.to_string(),
    })
}
