//! A rotation target as it is written down: an entry of a
//! `--rotation-targets` file, a row of `keyward_rotation_targets`, the
//! argument of `keyward targets add` and `Admin/AddRotationTarget` (JSON).
//!
//! ```json
//! {"table": "api_tokens", "id_column": "id",
//!  "context": {"token_id": "id", "tenant": "tenant"},
//!  "columns": {"payload_ciphertext": "secret_ciphertext"},
//!  "encoding": "hex"}
//! ```
//! Unnamed envelope columns take the `connections` names
//! (`encryption_key_id`, `data_key_ciphertext`, `data_key_iv`,
//! `payload_ciphertext`, `payload_iv`, `last_error`, `last_error_job_id`).
//! `encoding` (`bytes`, the default, `base64` or `hex`) says how the
//! ciphertext columns are stored. An entry for `connections` itself may
//! give only its encoding: `{"table": "connections", "encoding": "base64"}`.
//!
//! [`TargetDefinition::of`] writes a [`RotationTarget`] back in one
//! canonical form (defaults left out), so two definitions of the same
//! target compare equal however they were spelled.

use std::collections::BTreeMap;

use super::target::{Encoding, RotationTarget, TargetError};

/// One table of secrets, as written down.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TargetDefinition {
    pub table: String,
    #[serde(default = "default_id_column")]
    pub id_column: String,
    /// Context key → column.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub context: BTreeMap<String, String>,
    /// Envelope column → the table's name for it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub columns: BTreeMap<String, String>,
    /// Legacy `{"ciphertext": column, "iv": column}`, if the table has them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub legacy: Option<LegacyColumns>,
    /// A timestamp column set on every write (for the age of the oldest
    /// row on a key in `keys usage`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at_column: Option<String>,
    /// How the ciphertext columns are stored: bytes, base64 or hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct LegacyColumns {
    pub ciphertext: String,
    pub iv: String,
}

fn default_id_column() -> String {
    "id".into()
}

impl TargetDefinition {
    /// The target this defines, checked (identifiers, a context, an
    /// encoding; `connections` only with its encoding).
    pub fn to_target(&self) -> Result<RotationTarget, TargetError> {
        let encoding = self
            .encoding
            .as_deref()
            .map_or(Ok(Encoding::Bytes), Encoding::parse)?;
        if self.table == "connections" {
            let only_encoding = self.context.is_empty()
                && self.columns.is_empty()
                && self.legacy.is_none()
                && self.updated_at_column.is_none()
                && self.id_column == "id";
            return if only_encoding {
                Ok(RotationTarget::connections().with_encoding(encoding))
            } else {
                Err(TargetError::ConnectionsFixed)
            };
        }
        let context: Vec<(String, String)> = self.context.clone().into_iter().collect();
        let columns: Vec<(&str, &str)> = self
            .columns
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        RotationTarget::new(
            &self.table,
            &self.id_column,
            &context,
            &columns,
            self.legacy
                .as_ref()
                .map(|l| (l.ciphertext.as_str(), l.iv.as_str())),
            self.updated_at_column.as_deref(),
        )
        .map(|target| target.with_encoding(encoding))
    }

    /// The canonical definition of `target`: what differs from the
    /// defaults, nothing else.
    pub fn of(target: &RotationTarget) -> Self {
        let encoding =
            (target.encoding != Encoding::Bytes).then(|| target.encoding.as_str().to_owned());
        if target.table.as_str() == "connections" {
            return Self {
                encoding,
                ..Self::named("connections")
            };
        }
        let defaults = RotationTarget::connections().columns;
        let pairs = |c: &super::target::EnvelopeColumns| {
            [
                ("encryption_key_id", c.encryption_key_id.as_str().to_owned()),
                (
                    "data_key_ciphertext",
                    c.data_key_ciphertext.as_str().to_owned(),
                ),
                ("data_key_iv", c.data_key_iv.as_str().to_owned()),
                (
                    "payload_ciphertext",
                    c.payload_ciphertext.as_str().to_owned(),
                ),
                ("payload_iv", c.payload_iv.as_str().to_owned()),
                ("last_error", c.last_error.as_str().to_owned()),
                ("last_error_job_id", c.last_error_job_id.as_str().to_owned()),
            ]
        };
        let columns = pairs(&target.columns)
            .into_iter()
            .zip(pairs(&defaults))
            .filter(|((_, name), (_, default))| name != default)
            .map(|((field, name), _)| (field.to_owned(), name))
            .collect();
        Self {
            table: target.table.as_str().to_owned(),
            id_column: target.id.as_str().to_owned(),
            context: target
                .context
                .iter()
                .map(|(key, column)| (key.clone(), column.as_str().to_owned()))
                .collect(),
            columns,
            legacy: target.legacy.as_ref().map(|(ct, iv)| LegacyColumns {
                ciphertext: ct.as_str().to_owned(),
                iv: iv.as_str().to_owned(),
            }),
            updated_at_column: target.updated_at.as_ref().map(|c| c.as_str().to_owned()),
            encoding,
        }
    }

    fn named(table: &str) -> Self {
        Self {
            table: table.to_owned(),
            id_column: default_id_column(),
            context: BTreeMap::new(),
            columns: BTreeMap::new(),
            legacy: None,
            updated_at_column: None,
            encoding: None,
        }
    }

    /// The definition as one line of JSON (how the database keeps it).
    pub fn to_json(&self) -> String {
        // A struct of strings and maps of strings always serializes.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Parses a JSON list of definitions and checks each, and that no table
/// is defined twice.
pub fn parse_list(json: &str) -> Result<Vec<RotationTarget>, ListError> {
    let definitions: Vec<TargetDefinition> = serde_json::from_str(json)?;
    let mut seen = std::collections::BTreeSet::new();
    definitions
        .iter()
        .map(|d| {
            if !seen.insert(d.table.as_str()) {
                return Err(TargetError::Duplicate(d.table.clone()).into());
            }
            Ok(d.to_target()?)
        })
        .collect()
}

/// Parses one definition (`keyward targets add`, the Admin API) and checks it.
pub fn parse_one(json: &str) -> Result<RotationTarget, ListError> {
    let definition: TargetDefinition = serde_json::from_str(json)?;
    Ok(definition.to_target()?)
}

/// Why written-down targets were refused.
#[derive(Debug, thiserror::Error)]
pub enum ListError {
    #[error("not a valid rotation target definition: {0}")]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Target(#[from] TargetError),
}

/// How two lists of targets differ, one line per table, in words:
/// `ours` is named `ours_name` and `theirs` `theirs_name`. Empty: equal.
pub fn differences(
    ours_name: &str,
    ours: &[RotationTarget],
    theirs_name: &str,
    theirs: &[RotationTarget],
) -> Vec<String> {
    let index = |list: &[RotationTarget]| -> BTreeMap<String, String> {
        list.iter()
            .map(|t| {
                (
                    t.table.as_str().to_owned(),
                    TargetDefinition::of(t).to_json(),
                )
            })
            .collect()
    };
    let (a, b) = (index(ours), index(theirs));
    let mut lines = Vec::new();
    for (table, definition) in &a {
        match b.get(table) {
            None => lines.push(format!("{table} is in {ours_name} only: {definition}")),
            Some(other) if other != definition => lines.push(format!(
                "{table} differs: {ours_name} {definition}, {theirs_name} {other}"
            )),
            Some(_) => {}
        }
    }
    for (table, definition) in &b {
        if !a.contains_key(table) {
            lines.push(format!("{table} is in {theirs_name} only: {definition}"));
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_definition_round_trips_in_its_canonical_form() {
        let spelled_out = r#"{"table": "api_tokens", "id_column": "id",
            "context": {"token_id": "id"},
            "columns": {"payload_ciphertext": "secret", "data_key_iv": "data_key_iv"},
            "encoding": "hex"}"#;
        let target = parse_one(spelled_out).unwrap();
        let canonical = TargetDefinition::of(&target).to_json();
        assert_eq!(
            canonical,
            r#"{"table":"api_tokens","id_column":"id","context":{"token_id":"id"},"columns":{"payload_ciphertext":"secret"},"encoding":"hex"}"#
        );
        let again = parse_one(&canonical).unwrap();
        assert_eq!(TargetDefinition::of(&again).to_json(), canonical);
        assert_eq!(
            TargetDefinition::of(&RotationTarget::connections()).to_json(),
            r#"{"table":"connections","id_column":"id"}"#
        );
    }

    #[test]
    fn lists_refuse_duplicates_and_say_how_they_differ() {
        let file = parse_list(
            r#"[{"table": "connections", "encoding": "base64"},
                {"table": "a", "context": {"k": "id"}},
                {"table": "b", "context": {"k": "id"}, "encoding": "hex"}]"#,
        )
        .unwrap();
        let db = parse_list(
            r#"[{"table": "a", "context": {"k": "id"}},
                {"table": "b", "context": {"k": "id"}},
                {"table": "c", "context": {"k": "id"}}]"#,
        )
        .unwrap();
        let lines = differences("the file", &file, "the database", &db);
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(lines[0].starts_with("b differs: the file"), "{lines:?}");
        assert!(
            lines[1].starts_with("connections is in the file only"),
            "{lines:?}"
        );
        assert!(
            lines[2].starts_with("c is in the database only"),
            "{lines:?}"
        );
        assert!(differences("x", &db, "y", &db).is_empty());
        assert!(matches!(
            parse_list(
                r#"[{"table": "a", "context": {"k": "id"}}, {"table": "a", "context": {"k": "id"}}]"#
            ),
            Err(ListError::Target(TargetError::Duplicate(_)))
        ));
        assert!(matches!(
            parse_one(r#"{"table": "a"}"#),
            Err(ListError::Target(TargetError::NoContext(_)))
        ));
        assert!(matches!(
            parse_one(r#"{"table": "a", "contxt": {}}"#),
            Err(ListError::Json(_))
        ));
    }
}
