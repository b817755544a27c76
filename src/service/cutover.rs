//! `keyward legacy cutover` (runbook §1.6.2, "remove or archive the legacy
//! key material"): clears the legacy copies that rotation leaves in place
//! for the application's old pods, once the operator confirms none runs.
//!
//! A row's legacy copy is cleared only when the row is on a key and both
//! copies decrypt to the same plaintext ([`verdict`]), with a
//! compare-and-swap on what was read, after the copy went to the archive
//! (if one is given) and the archive reached the disk. A copy that decrypts
//! to another plaintext is a *conflict* (an old pod wrote the row after it
//! was rotated): it is listed and left for a person to resolve, never
//! settled by keyward. Each complete scan of a target is recorded
//! (`Store::record_legacy_check`), a dry run's too, so key usage, the
//! retirement plan and the metrics report the conflicts it found.

use std::io::Write as _;

use base64::{engine::general_purpose::STANDARD, Engine as _};

use crate::{
    crypto::secret::Plaintext,
    error::Error,
    rotation::target::RotationTarget,
    store::{rotation::RotationRow, Store},
};

use super::crypto::CryptoService;

/// Rows read per page.
pub const PAGE: i64 = 500;

/// Rows a report lists one by one, per kind; the rest are only counted.
pub const LISTED: usize = 1000;

/// What to do with one row's legacy copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Both copies hold the same plaintext: the legacy copy may go.
    Clear,
    /// They differ: someone must decide which is right.
    Conflict,
    /// One of them does not decrypt here; why.
    Unreadable(String),
}

/// Decides from the two decryptions of a row.
pub fn verdict(
    envelope: Result<&Plaintext, &Error>,
    legacy: Result<&Plaintext, &Error>,
) -> Verdict {
    match (envelope, legacy) {
        (Err(err), _) => Verdict::Unreadable(format!("the envelope does not decrypt: {err}")),
        (_, Err(err)) => Verdict::Unreadable(format!(
            "the legacy copy does not decrypt with the master secrets given: {err}"
        )),
        (Ok(a), Ok(b)) if a.as_bytes() == b.as_bytes() => Verdict::Clear,
        (Ok(_), Ok(_)) => Verdict::Conflict,
    }
}

/// A row, by table and id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowRef {
    pub target: String,
    pub id: String,
}

/// What a cutover found and did.
#[derive(Debug, Clone, Default)]
pub struct CutoverReport {
    pub dry_run: bool,
    /// Copies cleared (a dry run: that would be).
    pub cleared: u64,
    /// Copies that matched but whose row changed between read and clear;
    /// the next run takes them.
    pub changed: u64,
    pub conflicts: u64,
    /// The first [`LISTED`] conflicts.
    pub conflict_rows: Vec<RowRef>,
    pub unreadable: u64,
    /// The first [`LISTED`] unreadable rows, with the reason.
    pub unreadable_rows: Vec<(RowRef, String)>,
    /// Legacy rows with no envelope yet: a rotation moves them first.
    pub not_rotated: i64,
    /// Why the cutover stopped before the end (the archive could not be
    /// written: nothing after it was cleared).
    pub stopped: Option<String>,
    /// Legacy columns the application's schema declares NOT NULL, as
    /// `(table, column)`: clearing them would fail, so nothing is cleared
    /// (keyward does not change the application's constraints).
    pub not_null: Vec<(String, String)>,
}

impl CutoverReport {
    /// Nothing is left for a cutover to do, and nothing was refused.
    pub fn finished(&self) -> bool {
        self.changed == 0
            && self.conflicts == 0
            && self.unreadable == 0
            && self.not_rotated == 0
            && self.stopped.is_none()
            && self.not_null.is_empty()
    }

    /// The statements that would let the legacy columns be cleared, for
    /// the application's owners to run (or declare in their migrations).
    pub fn schema_changes_needed(&self) -> Vec<String> {
        self.not_null
            .iter()
            .map(|(table, column)| {
                format!("ALTER TABLE {table} ALTER COLUMN {column} DROP NOT NULL;")
            })
            .collect()
    }
}

/// Examines every row that is on a key and still holds a legacy copy, in
/// every target; clears the copies that match (none with `dry_run`),
/// writing each to `archive` first.
pub async fn cutover(
    store: &Store,
    crypto: &CryptoService,
    targets: &[RotationTarget],
    dry_run: bool,
    mut archive: Option<&mut std::fs::File>,
) -> Result<CutoverReport, Error> {
    let mut report = CutoverReport {
        dry_run,
        not_rotated: store
            .key_usage(targets)
            .await?
            .iter()
            .filter(|u| u.key_record_id.is_none())
            .map(|u| u.legacy_copies)
            .sum(),
        ..CutoverReport::default()
    };
    for target in targets {
        if let Some((ct, iv)) = &target.legacy {
            let table = target.table.as_str();
            for column in store
                .not_null_columns(table, &[ct.as_str(), iv.as_str()])
                .await?
            {
                report.not_null.push((table.to_owned(), column));
            }
        }
    }
    if !report.not_null.is_empty() && !dry_run {
        return Ok(report);
    }
    for target in targets {
        let mut cursor = String::new();
        // Every conflict of this target, recorded once its scan is complete.
        let mut conflicts = Vec::new();
        loop {
            let rows = store.legacy_copies_page(target, &cursor, PAGE).await?;
            let Some(last) = rows.last() else { break };
            cursor.clone_from(&last.id);
            let mut matching = Vec::new();
            for row in &rows {
                match examine(crypto, target, row).await {
                    Verdict::Clear => matching.push(row),
                    Verdict::Conflict => {
                        report.conflicts += 1;
                        if report.conflict_rows.len() < LISTED {
                            report.conflict_rows.push(row_ref(target, row));
                        }
                        conflicts.push(row.id.clone());
                    }
                    Verdict::Unreadable(why) => {
                        report.unreadable += 1;
                        if report.unreadable_rows.len() < LISTED {
                            report.unreadable_rows.push((row_ref(target, row), why));
                        }
                    }
                }
            }
            if dry_run {
                report.cleared += matching.len() as u64;
                continue;
            }
            if let Some(file) = archive.as_deref_mut() {
                if let Err(err) = archive_rows(file, target, &matching) {
                    report.stopped = Some(format!("cannot write the archive: {err}"));
                    return Ok(report);
                }
            }
            for row in matching {
                if store.clear_legacy_copy(target, row).await? {
                    report.cleared += 1;
                } else {
                    report.changed += 1;
                }
            }
        }
        if target.legacy.is_some() {
            store
                .record_legacy_check(target.table.as_str(), &conflicts)
                .await?;
        }
    }
    Ok(report)
}

/// Decrypts both copies of a row and judges them.
async fn examine(crypto: &CryptoService, target: &RotationTarget, row: &RotationRow) -> Verdict {
    if let Some(why) = &row.malformed {
        return Verdict::Unreadable(why.clone());
    }
    let Some(legacy) = row.legacy_copy() else {
        return Verdict::Unreadable("the legacy copy has no IV".to_owned());
    };
    let context = match target.context_of(&row.context) {
        Ok(context) => context,
        Err(err) => return Verdict::Unreadable(format!("the row's context is invalid: {err}")),
    };
    let envelope = crypto.open_stored(&row.envelope(), &context).await;
    let legacy = crypto.open_stored(&legacy, &context).await;
    verdict(
        envelope.as_ref().map(|o| &o.plaintext),
        legacy.as_ref().map(|o| &o.plaintext),
    )
}

fn row_ref(target: &RotationTarget, row: &RotationRow) -> RowRef {
    RowRef {
        target: target.table.as_str().to_owned(),
        id: row.id.clone(),
    }
}

/// Appends one JSON line per row (its legacy copy, still encrypted) and
/// waits until the lines are on disk.
fn archive_rows(
    file: &mut std::fs::File,
    target: &RotationTarget,
    rows: &[&RotationRow],
) -> std::io::Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut lines = Vec::new();
    for row in rows {
        let line = serde_json::json!({
            "target": target.table.as_str(),
            "id": row.id,
            "encryption_key_id": row.encryption_key_id,
            "legacy_ciphertext": row.legacy_ciphertext.as_deref().map(|b| STANDARD.encode(b)),
            "legacy_iv": row.legacy_iv.as_deref().map(|b| STANDARD.encode(b)),
        });
        serde_json::to_writer(&mut lines, &line)?;
        lines.push(b'\n');
    }
    file.write_all(&lines)?;
    file.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_equal_plaintexts_let_the_legacy_copy_go() {
        let a = Plaintext::new(b"pw-1".to_vec());
        let b = Plaintext::new(b"pw-2".to_vec());
        assert_eq!(verdict(Ok(&a), Ok(&a)), Verdict::Clear);
        assert_eq!(verdict(Ok(&a), Ok(&b)), Verdict::Conflict);
        let failed = Error::DecryptionFailed;
        assert!(matches!(
            verdict(Err(&failed), Ok(&a)),
            Verdict::Unreadable(why) if why.starts_with("the envelope does not decrypt")
        ));
        assert!(matches!(
            verdict(Ok(&a), Err(&failed)),
            Verdict::Unreadable(why) if why.starts_with("the legacy copy does not decrypt")
        ));
    }

    #[test]
    fn a_report_is_finished_only_with_nothing_left() {
        assert!(CutoverReport::default().finished());
        let left: [fn(&mut CutoverReport); 5] = [
            |r| r.conflicts = 1,
            |r| r.not_rotated = 3,
            |r| r.changed = 1,
            |r| r.unreadable = 1,
            |r| r.stopped = Some("disk full".into()),
        ];
        for set in left {
            let mut report = CutoverReport::default();
            set(&mut report);
            assert!(!report.finished(), "{report:?}");
        }
    }
}
