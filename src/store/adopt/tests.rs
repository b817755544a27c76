//! The adoption plan's unit tests: what it adds, keeps and refuses on
//! databases described as [`Found`] (no database needed).

use super::*;

const SCHEMA: &str = include_str!("../../../migrations/postgres/0001_schema.sql");

fn table(columns: &[(&str, &str)]) -> Vec<Column> {
    columns
        .iter()
        .map(|(name, sql_type)| Column {
            name: (*name).to_owned(),
            sql_type: (*sql_type).to_owned(),
        })
        .collect()
}

/// The runbook's platform before keyward: connections only.
fn application() -> Found {
    let mut found = Found::default();
    found.tables.insert(
        "connections".into(),
        table(&[
            ("id", "uuid"),
            ("workspace_id", "uuid"),
            ("name", "character varying(255)"),
            ("encrypted_credentials", "bytea"),
            ("credentials_iv", "bytea"),
            ("updated_at", "timestamp without time zone"),
        ]),
    );
    found
}

fn sql(plan: &AdoptPlan) -> Vec<String> {
    plan.steps.iter().map(ToString::to_string).collect()
}

#[test]
fn nothing_to_adopt_on_a_new_or_keyward_database() {
    assert_eq!(plan(&Found::default(), SCHEMA), None);
    let mut ours = application();
    ours.keyward_schema = true;
    assert_eq!(plan(&ours, SCHEMA), None);
}

#[test]
fn an_application_database_gets_what_is_missing_in_its_own_types() {
    let plan = plan(&application(), SCHEMA).unwrap();
    assert!(plan.refusals.is_empty(), "{:?}", plan.refusals);
    let steps = sql(&plan).join("\n");
    assert!(steps.contains("CREATE TABLE encryption_keys ("), "{steps}");
    assert!(
        steps.contains("CREATE UNIQUE INDEX encryption_keys_one_active"),
        "{steps}"
    );
    assert!(
        steps.contains("CREATE TABLE encryption_rotation_jobs ("),
        "{steps}"
    );
    assert!(
        steps.contains("connection_id uuid NOT NULL REFERENCES connections (id)"),
        "{steps}"
    );
    assert!(
        steps.contains("ADD COLUMN IF NOT EXISTS encryption_key_id text"),
        "{steps}"
    );
    assert!(
        steps.contains("ADD COLUMN IF NOT EXISTS payload_ciphertext BYTEA"),
        "{steps}"
    );
    // The application's own columns are neither added nor touched.
    assert!(!steps.contains("EXISTS encrypted_credentials"), "{steps}");
    assert!(!steps.contains("EXISTS updated_at"), "{steps}");
    assert!(
        !steps.contains("CREATE TABLE IF NOT EXISTS connections"),
        "{steps}"
    );
    assert!(steps.contains("NOT VALID"), "{steps}");
    assert!(steps.contains("CREATE INDEX CONCURRENTLY"), "{steps}");
    assert!(matches!(plan.steps.last(), Some(Step::Sql { .. })));
    assert!(plan
        .steps
        .iter()
        .any(|s| matches!(s, Step::BackfillMirror { id_type } if id_type == "uuid")));
}

#[test]
fn what_a_finished_adoption_left_is_not_done_again() {
    let mut found = application();
    found.key_foreign_key = Some(("connections_encryption_key_id_fkey".into(), true));
    found.key_index_valid = Some(true);
    let plan = plan(&found, SCHEMA).unwrap();
    assert!(!plan
        .steps
        .iter()
        .any(|s| matches!(s, Step::ForeignKey { .. } | Step::Index { .. })));
    // An index a failed concurrent build left invalid is built again;
    // a foreign key added NOT VALID by a run that stopped is validated.
    found.key_index_valid = Some(false);
    found.key_foreign_key = Some(("app_fk".into(), false));
    let plan = super::plan(&found, SCHEMA).unwrap();
    assert!(plan.steps.iter().any(|s| matches!(s, Step::Index { .. })));
    assert!(plan.steps.contains(&Step::ForeignKey {
        why: "the foreign key from connections to the key catalog".into(),
        table: "connections".into(),
        name: "app_fk".into(),
        definition: None,
    }));
}

#[test]
fn incompatible_columns_are_refused_by_name_and_type() {
    let mut found = application();
    if let Some(columns) = found.tables.get_mut("connections") {
        columns.extend(table(&[("payload_ciphertext", "integer")]));
    }
    found.tables.insert(
        "encryption_keys".into(),
        table(&[("id", "uuid"), ("key_id", "text")]),
    );
    let refusals = plan(&found, SCHEMA).unwrap().refusals;
    let text: Vec<String> = refusals.iter().map(ToString::to_string).collect();
    assert!(
        text.contains(&"connections.payload_ciphertext is integer; keyward needs bytea, or text holding base64 or hex".to_owned()),
        "{text:?}"
    );
    assert!(
        text.contains(&"encryption_keys.id is uuid; keyward needs text or varchar".to_owned()),
        "{text:?}"
    );
    assert!(text
        .iter()
        .any(|t| t.starts_with("encryption_keys.kms_key_arn is missing")));
}

#[test]
fn a_sqlite_application_gets_one_column_per_statement_and_no_separate_constraint() {
    const SQLITE_SCHEMA: &str = include_str!("../../../migrations/sqlite/0001_schema.sql");
    let mut found = Found {
        dialect: Dialect::Sqlite,
        ..Found::default()
    };
    found.tables.insert(
        "connections".into(),
        table(&[
            ("id", "text"),
            ("name", "text"),
            ("encrypted_credentials", "blob"),
            ("credentials_iv", "blob"),
            ("updated_at", "integer"),
        ]),
    );
    let plan = plan(&found, SQLITE_SCHEMA).unwrap();
    assert!(plan.refusals.is_empty(), "{:?}", plan.refusals);
    let steps = sql(&plan).join("\n");
    assert!(
        steps.contains(
            "ALTER TABLE connections ADD COLUMN encryption_key_id TEXT REFERENCES encryption_keys (id)"
        ),
        "{steps}"
    );
    assert!(
        steps.contains("ALTER TABLE connections ADD COLUMN payload_iv BLOB\n"),
        "{steps}"
    );
    // Migration 0002 adds it, and SQLite cannot add a column twice.
    assert!(!steps.contains("last_error_job_id"), "{steps}");
    assert!(!plan
        .steps
        .iter()
        .any(|s| matches!(s, Step::ForeignKey { .. } | Step::Index { .. })));

    // A column the application already has under keyward's later name,
    // and a key catalog without the times keyward cannot add here.
    if let Some(columns) = found.tables.get_mut("connections") {
        columns.extend(table(&[("last_error_job_id", "text")]));
    }
    found.tables.insert(
        "encryption_keys".into(),
        table(&[
            ("id", "text"),
            ("key_id", "text"),
            ("kms_key_arn", "text"),
            ("status", "text"),
        ]),
    );
    let refused: Vec<String> = super::plan(&found, SQLITE_SCHEMA)
        .unwrap()
        .refusals
        .iter()
        .map(ToString::to_string)
        .collect();
    assert!(
        refused.contains(
            &"connections.last_error_job_id is text; keyward needs no such column: keyward's own \
              migration adds it"
                .to_owned()
        ),
        "{refused:?}"
    );
    assert!(
        refused
            .iter()
            .any(|r| r.starts_with("encryption_keys.created_at is missing")
                && r.ends_with("SQLite adds no column with a default that is not a constant)")),
        "{refused:?}"
    );
}

#[test]
fn the_applications_own_runbook_tables_are_adopted_when_their_types_fit() {
    let mut found = application();
    found.tables.insert(
        "encryption_keys".into(),
        table(&[
            ("id", "character varying(36)"),
            ("key_id", "text"),
            ("kms_key_arn", "text"),
            ("status", "character varying(16)"),
            ("created_at", "timestamp with time zone"),
            ("updated_at", "timestamp without time zone"),
        ]),
    );
    let refused = super::plan(&found, SCHEMA).unwrap().refusals;
    assert_eq!(
        refused.iter().map(ToString::to_string).collect::<Vec<_>>(),
        [
            "encryption_keys.updated_at is timestamp without time zone; keyward needs timestamp \
          with time zone (keyward reads these times as instants)"
        ]
    );
    if let Some(keys) = found.tables.get_mut("encryption_keys") {
        keys.pop();
        keys.extend(table(&[("updated_at", "timestamp with time zone")]));
    }
    let plan = plan(&found, SCHEMA).unwrap();
    assert!(plan.refusals.is_empty(), "{:?}", plan.refusals);
    let steps = sql(&plan).join("\n");
    assert!(!steps.contains("CREATE TABLE encryption_keys"), "{steps}");
    assert!(
        steps.contains("CREATE UNIQUE INDEX IF NOT EXISTS encryption_keys_one_active"),
        "{steps}"
    );
    assert!(
        steps.contains("ALTER TABLE encryption_keys ADD COLUMN IF NOT EXISTS alias TEXT"),
        "{steps}"
    );
    assert!(
        steps.contains("ADD COLUMN IF NOT EXISTS encryption_key_id character varying(36)"),
        "{steps}"
    );
}
