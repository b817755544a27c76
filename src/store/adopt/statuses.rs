//! The statuses keyward writes, against the application's own declaration
//! of `encryption_keys.status` and `encryption_rotation_jobs.status`: a
//! Drizzle `pgEnum`, or a CHECK constraint, may lack one (often `pending`).
//! Changing either changes the application's schema, so [`changes`] lists
//! the statements as the plan's `app_changes`, which `migrate` runs only
//! with `--allow-app-schema-changes` (and `--dry-run` prints).

use super::{AdoptPlan, Found, Step};
use crate::{keys::KeyStatus, rotation::JobStatus};

/// How an application's table declares its `status` column.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatusColumn {
    /// The enum type it has, and that type's labels.
    pub enum_type: Option<(String, Vec<String>)>,
    /// CHECK constraints on the column alone.
    pub checks: Vec<StatusCheck>,
}

/// A CHECK constraint on a `status` column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusCheck {
    pub name: String,
    /// Its expression (`pg_get_expr`).
    pub expression: String,
    /// The statuses keyward writes that it rejects.
    pub rejects: Vec<String>,
}

/// The statuses keyward writes into `table`'s `status` column.
pub fn needed(table: &str) -> Vec<&'static str> {
    match table {
        "encryption_keys" => KeyStatus::ALL.iter().map(|s| s.as_str()).collect(),
        "encryption_rotation_jobs" => JobStatus::ALL.iter().map(|s| s.as_str()).collect(),
        _ => Vec::new(),
    }
}

/// The application-schema changes `table`'s status column needs: enum
/// labels added, CHECK constraints widened to keyward's statuses (the
/// application's own expression kept, `OR`ed with them).
pub fn changes(found: &Found, table: &str, plan: &mut AdoptPlan) {
    let Some(column) = found.statuses.get(table) else {
        return;
    };
    let needed = needed(table);
    if let Some((type_name, labels)) = &column.enum_type {
        for status in needed.iter().filter(|s| !labels.iter().any(|l| l == *s)) {
            plan.app_changes.push(Step::Sql {
                why: format!(
                    "{table}.status has the application's enum type {type_name}, which lacks '{status}'"
                ),
                sql: format!("ALTER TYPE {type_name} ADD VALUE IF NOT EXISTS '{status}'"),
            });
        }
    }
    for check in column.checks.iter().filter(|c| !c.rejects.is_empty()) {
        let name = format!("\"{}\"", check.name.replace('"', "\"\""));
        let listed = needed
            .iter()
            .map(|s| format!("'{s}'"))
            .collect::<Vec<_>>()
            .join(", ");
        plan.app_changes.push(Step::Sql {
            why: format!(
                "{table}.status: the application's CHECK constraint {} rejects {}, which keyward writes",
                check.name,
                check
                    .rejects
                    .iter()
                    .map(|s| format!("'{s}'"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            sql: format!(
                "ALTER TABLE {table} DROP CONSTRAINT {name}, ADD CONSTRAINT {name} \
                 CHECK (({}) OR status IN ({listed})) NOT VALID",
                check.expression
            ),
        });
        plan.app_changes.push(Step::Sql {
            why: format!("{table}.status: the widened constraint, validated"),
            sql: format!("ALTER TABLE {table} VALIDATE CONSTRAINT {name}"),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The application-schema changes `table`'s status `column` needs.
    fn app_changes(table: &str, column: StatusColumn) -> Vec<String> {
        let mut found = Found::default();
        found.statuses.insert(table.into(), column);
        let mut plan = AdoptPlan::default();
        changes(&found, table, &mut plan);
        plan.app_changes.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn an_enum_lacking_a_status_gets_it_added() {
        let labels = ["active", "rotating", "retired"].map(String::from).to_vec();
        let sql = app_changes(
            "encryption_keys",
            StatusColumn {
                enum_type: Some(("encryption_key_status".into(), labels)),
                checks: Vec::new(),
            },
        );
        assert_eq!(sql.len(), 1, "{sql:?}");
        assert!(sql[0].contains("lacks 'pending'"), "{sql:?}");
        assert!(
            sql[0].ends_with("ALTER TYPE encryption_key_status ADD VALUE IF NOT EXISTS 'pending'"),
            "{sql:?}"
        );
    }

    #[test]
    fn a_check_that_rejects_a_status_is_widened_keeping_its_own_expression() {
        let check = |rejects: &[&str]| StatusCheck {
            name: "jobs_status_check".into(),
            expression: "(status)::text = ANY (ARRAY['queued'::text, 'running'::text])".into(),
            rejects: rejects.iter().map(|s| (*s).to_owned()).collect(),
        };
        let sql = app_changes(
            "encryption_rotation_jobs",
            StatusColumn {
                enum_type: None,
                checks: vec![check(&["pending", "completed"]), check(&[])],
            },
        );
        assert_eq!(sql.len(), 2, "{sql:?}");
        assert!(sql[0].contains("rejects 'pending', 'completed'"), "{sql:?}");
        assert!(
            sql[0].contains(
                "ADD CONSTRAINT \"jobs_status_check\" CHECK (((status)::text = ANY (ARRAY['queued'::text, \
                 'running'::text])) OR status IN ('pending', 'running', 'completed', \
                 'completed_with_errors', 'failed', 'cancelled')) NOT VALID"
            ),
            "{sql:?}"
        );
        assert!(sql[1].ends_with("VALIDATE CONSTRAINT \"jobs_status_check\""));
    }

    #[test]
    fn a_status_column_that_takes_every_status_needs_nothing() {
        for table in ["encryption_keys", "encryption_rotation_jobs"] {
            assert!(app_changes(table, StatusColumn::default()).is_empty());
        }
    }
}
