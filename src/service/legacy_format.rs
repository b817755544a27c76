//! The application's legacy format (how its pre-keyward key derived from
//! the master secret, where its IVs sit), one for every process: recorded
//! in the database (`keyward_settings`) by the first process given
//! `--legacy-*` flags. A process given none follows the record (or
//! keyward's default when there is none); one given another refuses to
//! start, naming both, rather than misread every legacy row.
//! `keyward legacy format --set` changes the record.

use crate::{
    crypto::legacy::LegacyFormat,
    error::{Error, Result},
    store::{Store, StoreError},
};

const SETTING: &str = "legacy_format";

/// The format this process uses, given its flags' (`None`: none given).
pub async fn resolve(store: &Store, given: Option<&LegacyFormat>) -> Result<LegacyFormat> {
    let recorded = match store.setting(SETTING).await? {
        None => None,
        Some(json) => Some(LegacyFormat::from_json(&json).ok_or_else(|| {
            StoreError::Corrupt(format!("keyward_settings.{SETTING} holds {json}"))
        })?),
    };
    match (given, recorded) {
        (None, recorded) => Ok(recorded.unwrap_or_default()),
        (Some(given), None) => {
            store
                .record_setting(SETTING, &given.to_json(), false)
                .await?;
            // Another process may have recorded one first: that one holds.
            Box::pin(resolve(store, Some(given))).await
        }
        (Some(given), Some(recorded)) if *given == recorded => Ok(recorded),
        (Some(given), Some(recorded)) => Err(Error::LegacyFormatDiffers {
            recorded: recorded.to_json(),
            given: given.to_json(),
        }),
    }
}

/// The recorded format (`None`: none recorded, keyward's default applies).
pub async fn recorded(store: &Store) -> Result<Option<String>> {
    Ok(store.setting(SETTING).await?)
}

/// Replaces the record (`keyward legacy format --set`).
pub async fn record(store: &Store, format: &LegacyFormat) -> Result<()> {
    store
        .record_setting(SETTING, &format.to_json(), true)
        .await?;
    Ok(())
}
