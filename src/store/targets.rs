//! What every process must share, kept in the database:
//! `keyward_rotation_targets`, the definitions of the rotation targets
//! beyond `connections` (and `connections`' encoding), in the order
//! rotation walks them (a change moves the catalog version, migration
//! 0009, so every process reloads the list with the catalog); and
//! `keyward_settings`, settings recorded once (the legacy format).
//!
//! A change is refused while a rotation job is pending or running: a job
//! walks the targets by their position in the list it started with.

use super::{tx::WriteTx, StoreError};
use crate::rotation::target::RotationTarget;

/// Why a change to the list was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetChange {
    Done,
    /// The table is listed already (add) or not listed (remove).
    Unchanged,
    /// Rotation job `0` is pending or running.
    JobInFlight(String),
}

/// A change to one table's entry.
#[derive(Debug, Clone, Copy)]
pub enum TargetEdit<'a> {
    /// Appends `json`; or, when the table is listed and `replace` (how
    /// `connections` gets an encoding), replaces its definition.
    Add {
        json: &'a str,
        replace: bool,
    },
    Remove,
}

#[derive(sqlx::FromRow)]
struct JobId {
    id: String,
}

/// A job still walking the list, if any, read inside the change's
/// transaction.
async fn job_in_flight(tx: &mut WriteTx) -> Result<Option<TargetChange>, sqlx::Error> {
    let jobs: Vec<JobId> = tx
        .fetch_all(
            "SELECT id FROM encryption_rotation_jobs \
             WHERE status IN ('pending', 'running') ORDER BY created_at LIMIT 1",
            &[],
        )
        .await?;
    Ok(jobs
        .into_iter()
        .next()
        .map(|job| TargetChange::JobInFlight(job.id)))
}

impl super::Store {
    /// The columns `target` names that its table does not have (all of
    /// them when the table does not exist), as `table.column`.
    pub async fn missing_columns(
        &self,
        target: &RotationTarget,
    ) -> Result<Vec<String>, StoreError> {
        let c = &target.columns;
        let mut named = vec![
            &target.id,
            &c.encryption_key_id,
            &c.data_key_ciphertext,
            &c.data_key_iv,
            &c.payload_ciphertext,
            &c.payload_iv,
            &c.last_error,
            &c.last_error_job_id,
        ];
        named.extend(target.context.iter().map(|(_, column)| column));
        named.extend(target.legacy.iter().flat_map(|(ct, iv)| [ct, iv]));
        named.extend(target.updated_at.iter());
        let table = target.table.as_str();
        let mut missing = Vec::new();
        for column in named {
            let name = format!("{table}.{}", column.as_str());
            if !missing.contains(&name)
                && self.declared_type(table, column.as_str()).await?.is_none()
            {
                missing.push(name);
            }
        }
        Ok(missing)
    }

    /// Every stored definition (JSON), in order.
    pub async fn list_target_definitions(&self) -> Result<Vec<String>, StoreError> {
        Ok(super::on_pool!(self, |pool| sqlx::query_scalar(
            "SELECT definition FROM keyward_rotation_targets ORDER BY position"
        )
        .fetch_all(pool)
        .await)?)
    }

    /// Stores `definitions` (`(table, json)`, in order) if the list is
    /// empty, all or nothing; `false` when it was not empty.
    pub async fn seed_target_definitions(
        &self,
        definitions: &[(String, String)],
    ) -> Result<bool, StoreError> {
        let mut tx = WriteTx::begin(&self.pool).await?;
        let existing = tx
            .fetch_i64("SELECT COUNT(*) FROM keyward_rotation_targets", &[])
            .await?;
        if existing > 0 {
            return Ok(false);
        }
        for (position, (table, json)) in (1..).zip(definitions) {
            tx.execute(
                "INSERT INTO keyward_rotation_targets (table_name, position, definition) \
                 VALUES ($1, $2, $3)",
                &[table.into(), (position as i64).into(), json.into()],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// Changes one table's entry (see [`TargetEdit`]), unless a job is
    /// pending or running.
    pub async fn edit_target_definition(
        &self,
        table: &str,
        edit: TargetEdit<'_>,
    ) -> Result<TargetChange, StoreError> {
        let mut tx = WriteTx::begin(&self.pool).await?;
        if let Some(job) = job_in_flight(&mut tx).await? {
            return Ok(job);
        }
        let listed = tx
            .fetch_i64(
                "SELECT COUNT(*) FROM keyward_rotation_targets WHERE table_name = $1",
                &[table.into()],
            )
            .await?
            > 0;
        let (sql, args) = match (edit, listed) {
            (TargetEdit::Add { replace: false, .. }, true) | (TargetEdit::Remove, false) => {
                return Ok(TargetChange::Unchanged)
            }
            (TargetEdit::Add { json, .. }, true) => (
                "UPDATE keyward_rotation_targets SET definition = $2 WHERE table_name = $1",
                vec![table.into(), json.into()],
            ),
            (TargetEdit::Add { json, .. }, false) => (
                "INSERT INTO keyward_rotation_targets (table_name, position, definition) \
                 SELECT $1, COALESCE(MAX(position), 0) + 1, $2 FROM keyward_rotation_targets",
                vec![table.into(), json.into()],
            ),
            (TargetEdit::Remove, true) => (
                "DELETE FROM keyward_rotation_targets WHERE table_name = $1",
                vec![table.into()],
            ),
        };
        tx.execute(sql, &args).await?;
        tx.commit().await?;
        Ok(TargetChange::Done)
    }
}

impl super::Store {
    /// A shared setting's recorded value (`keyward_settings`).
    pub async fn setting(&self, name: &str) -> Result<Option<String>, StoreError> {
        Ok(super::on_pool!(self, |pool| sqlx::query_scalar(
            "SELECT value FROM keyward_settings WHERE name = $1"
        )
        .bind(name)
        .fetch_optional(pool)
        .await)?)
    }

    /// Records a shared setting: only if none is recorded, unless
    /// `replace`. Whether it was written.
    pub async fn record_setting(
        &self,
        name: &str,
        value: &str,
        replace: bool,
    ) -> Result<bool, StoreError> {
        let sql = if replace {
            "INSERT INTO keyward_settings (name, value) VALUES ($1, $2) \
             ON CONFLICT (name) DO UPDATE SET value = excluded.value, updated_at = CURRENT_TIMESTAMP"
        } else {
            "INSERT INTO keyward_settings (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING"
        };
        let written = super::on_pool!(self, |pool| sqlx::query(sql)
            .bind(name)
            .bind(value)
            .execute(pool)
            .await
            .map(|r| r.rows_affected()))?;
        Ok(written > 0)
    }
}
