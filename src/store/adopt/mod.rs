//! Adopting an application's existing database (PostgreSQL; SQLite's
//! differences are in `sqlite.rs`).
//!
//! keyward's first migration (`0001_schema.sql`) was written for a database
//! keyward creates: it gives `connections` a `TEXT` id and creates the
//! runbook's tables outright. An application's database already has
//! `connections` (Drizzle's `uuid` ids, NOT NULL columns of its own, rows
//! in use) and may have some of the runbook's tables, with its own types.
//! There `migrate` first *adopts* the database instead of running 0001:
//!
//! 1. [`inspect`] reads what exists ([`Found`]);
//! 2. [`plan`], a pure function, says what to add ([`Step`]s) and what it
//!    refuses ([`Refusal`]s: a column keyward needs that exists with a type
//!    it cannot use). With any refusal nothing is changed;
//! 3. [`apply`] (`apply.rs`, with [`inspect`]: the SQL) runs the steps on the live table without long locks: each
//!    statement under a short `lock_timeout`, retried; the index built
//!    `CONCURRENTLY`; the foreign key added `NOT VALID`, then validated; the
//!    payload mirror backfilled in batches. Then 0001 is recorded as applied
//!    (its checksum, as sqlx would), and the later migrations run as usual.
//!
//! Every step is idempotent and the plan is recomputed from the database
//! each time, so a run stopped halfway is finished by the next one. keyward
//! adds only what is missing: it never drops, renames or retypes the
//! application's columns, and a foreign key to an application column takes
//! that column's type.

mod apply;
mod sqlite;
mod statuses;

use std::{collections::BTreeMap, fmt, time::Duration};

pub use statuses::{StatusCheck, StatusColumn};

pub use apply::{column_type, inspect, is_lock_timeout, set_lock_timeout};
pub use sqlite::inspect as inspect_sqlite;

/// Runs `plan` on the database of `pool` (refusing it whole, changing
/// nothing, if it has refusals, or changes to the application's schema
/// that `allow_app_changes` does not allow), then records keyward's first
/// migration, `first`, as applied.
pub(super) async fn adopt(
    pool: &super::Pool,
    plan: &AdoptPlan,
    first: &sqlx::migrate::Migration,
    allow_app_changes: bool,
) -> Result<(), AdoptError> {
    apply::refuse_if_needed(plan, allow_app_changes)?;
    match pool {
        super::Pool::Postgres(pool) => apply::apply(pool, plan, first).await,
        super::Pool::Sqlite(pool) => sqlite::apply(pool, plan, first).await,
    }
}

/// The longest any adoption statement waits for a lock before it gives up
/// and retries: what a writer queued behind it can stall.
pub const LOCK_TIMEOUT: Duration = Duration::from_millis(500);
/// Attempts of one statement that keeps timing out on its lock.
pub(super) const LOCK_ATTEMPTS: u32 = 120;
/// Rows per batch of the payload-mirror backfill.
pub(super) const BACKFILL_BATCH: i64 = 1000;

/// A column as the database declares it (`format_type`'s spelling).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub sql_type: String,
}

/// The database an adoption is planned for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Dialect {
    #[default]
    Postgres,
    /// SQLite: declared types have affinities, not types (`sqlite.rs`);
    /// `ALTER TABLE` adds one column at a time and no constraint but a
    /// column's own; the whole schema change runs in one transaction.
    Sqlite,
}

impl Dialect {
    /// How keyward reads a column declared `sql_type`.
    fn family(self, sql_type: &str) -> Family {
        match self {
            Dialect::Postgres => Family::of(sql_type),
            Dialect::Sqlite => sqlite::family(sql_type),
        }
    }

    /// How a missing column is declared when added; `None`: it cannot be
    /// added to an existing table.
    fn declaration(self, want: &Wanted) -> Option<String> {
        match (self, want.declaration) {
            (_, "") => None,
            (Dialect::Postgres, declaration) => Some(declaration.to_owned()),
            (Dialect::Sqlite, declaration) => sqlite::declaration(declaration),
        }
    }

    /// Whether a column of family `found` serves where `wanted` is needed.
    fn fits(self, found: Family, wanted: Family) -> bool {
        match self {
            Dialect::Postgres => found.fits(wanted),
            Dialect::Sqlite => sqlite::fits(found, wanted),
        }
    }

    fn add_column(self, name: &str, declaration: &str) -> String {
        match self {
            Dialect::Postgres => format!("ADD COLUMN IF NOT EXISTS {name} {declaration}"),
            Dialect::Sqlite => format!("ADD COLUMN {name} {declaration}"),
        }
    }

    /// The type of an `encryption_keys.id` keyward creates.
    fn key_id_type(self) -> &'static str {
        match self {
            Dialect::Postgres => "text",
            Dialect::Sqlite => "TEXT",
        }
    }

    /// Whether an id column of `sql_type` can page a rotation.
    fn is_id(self, sql_type: &str) -> bool {
        matches!(
            self.family(sql_type),
            Family::Text | Family::Uuid | Family::Integer
        )
    }
}

/// What the database holds of the tables keyward's first migration makes
/// or adopts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Found {
    pub dialect: Dialect,
    /// Table name → its columns, for the tables in [`ADOPTED_TABLES`].
    pub tables: BTreeMap<String, Vec<Column>>,
    /// keyward's migrations have run here (0001 is recorded).
    pub keyward_schema: bool,
    /// The index on `connections.encryption_key_id` exists and is valid;
    /// `Some(false)`: a build that failed left it invalid.
    pub key_index_valid: Option<bool>,
    /// A foreign key from `connections` to `encryption_keys` (keyward's or
    /// the application's own): its name and whether it is validated.
    pub key_foreign_key: Option<(String, bool)>,
    /// How the application declares the `status` column of its
    /// `encryption_keys` and `encryption_rotation_jobs`, by table.
    pub statuses: BTreeMap<String, StatusColumn>,
}

impl Found {
    fn column(&self, table: &str, column: &str) -> Option<&Column> {
        self.tables.get(table)?.iter().find(|c| c.name == column)
    }
}

/// The tables adoption looks at.
pub const ADOPTED_TABLES: [&str; 4] = [
    "connections",
    "encryption_keys",
    "encryption_rotation_jobs",
    "connection_scoped_tokens",
];

/// How keyward reads a column's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Text,
    Bytes,
    Uuid,
    Integer,
    /// Either kind of timestamp (the application's own `updated_at`).
    Timestamp,
    /// `timestamp with time zone`: the runbook tables' times, which keyward
    /// reads as instants.
    TimestampTz,
    Boolean,
    Other,
}

impl Family {
    /// Whether a column of this family serves where `wanted` is needed.
    fn fits(self, wanted: Family) -> bool {
        self == wanted
            || (wanted == Family::Timestamp && self == Family::TimestampTz)
            // Ciphertext stored as text: in the target's declared encoding.
            || (wanted == Family::Bytes && self == Family::Text)
    }

    fn of(sql_type: &str) -> Self {
        match sql_type {
            "text" | "character varying" => Family::Text,
            t if t.starts_with("character varying(") => Family::Text,
            "bytea" => Family::Bytes,
            "uuid" => Family::Uuid,
            "bigint" | "integer" | "smallint" => Family::Integer,
            "boolean" => Family::Boolean,
            t if t.starts_with("timestamp") && t.ends_with("with time zone") => Family::TimestampTz,
            t if t.starts_with("timestamp") => Family::Timestamp,
            _ => Family::Other,
        }
    }
}

/// A column keyward needs, as 0001 declares it.
#[derive(Clone, Copy)]
struct Wanted {
    name: &'static str,
    family: Family,
    /// The declaration `ADD COLUMN` uses when the column is missing.
    declaration: &'static str,
}

const fn wanted(name: &'static str, family: Family, declaration: &'static str) -> Wanted {
    Wanted {
        name,
        family,
        declaration,
    }
}

/// The columns keyward adds to the application's `connections` (besides
/// `encryption_key_id`, whose type follows `encryption_keys.id`).
const CONNECTION_COLUMNS: [Wanted; 9] = [
    wanted("data_key_ciphertext", Family::Bytes, "BYTEA"),
    wanted("data_key_iv", Family::Bytes, "BYTEA"),
    wanted("payload_ciphertext", Family::Bytes, "BYTEA"),
    wanted("payload_iv", Family::Bytes, "BYTEA"),
    wanted("last_error", Family::Text, "TEXT"),
    wanted("last_error_job_id", Family::Text, "TEXT"),
    wanted("encrypted_credentials", Family::Bytes, "BYTEA"),
    wanted("credentials_iv", Family::Bytes, "BYTEA"),
    wanted("updated_at", Family::Timestamp, "TIMESTAMPTZ DEFAULT now()"),
];

/// The columns of the runbook's own tables, when the application created
/// them: each must be there with a type keyward reads, or be addable.
const KEY_COLUMNS: [Wanted; 10] = [
    wanted("id", Family::Text, ""),
    wanted("key_id", Family::Text, ""),
    wanted("kms_key_arn", Family::Text, ""),
    wanted("alias", Family::Text, "TEXT"),
    wanted(
        "provider",
        Family::Text,
        "TEXT CHECK (provider IS NULL OR provider IN ('local', 'aws-kms', 'pkcs11'))",
    ),
    wanted("status", Family::Text, ""),
    wanted("derived_key", Family::Text, "TEXT"),
    wanted(
        "created_at",
        Family::TimestampTz,
        "TIMESTAMPTZ NOT NULL DEFAULT now()",
    ),
    wanted(
        "updated_at",
        Family::TimestampTz,
        "TIMESTAMPTZ NOT NULL DEFAULT now()",
    ),
    wanted("rotated_at", Family::TimestampTz, "TIMESTAMPTZ"),
];

const JOB_COLUMNS: [Wanted; 22] = [
    wanted("id", Family::Text, ""),
    wanted("status", Family::Text, ""),
    wanted("target_key_id", Family::Text, ""),
    wanted("mode", Family::Text, "TEXT NOT NULL DEFAULT 'reencrypt'"),
    wanted("dry_run", Family::Boolean, "BOOLEAN NOT NULL DEFAULT FALSE"),
    wanted("batch_size", Family::Integer, "BIGINT NOT NULL DEFAULT 500"),
    wanted("max_rows_per_second", Family::Integer, "BIGINT"),
    wanted("total_rows", Family::Integer, "BIGINT NOT NULL DEFAULT 0"),
    wanted(
        "processed_rows",
        Family::Integer,
        "BIGINT NOT NULL DEFAULT 0",
    ),
    wanted(
        "succeeded_rows",
        Family::Integer,
        "BIGINT NOT NULL DEFAULT 0",
    ),
    wanted("failed_rows", Family::Integer, "BIGINT NOT NULL DEFAULT 0"),
    wanted("skipped_rows", Family::Integer, "BIGINT NOT NULL DEFAULT 0"),
    wanted("last_error", Family::Text, "TEXT"),
    wanted("cursor", Family::Text, "TEXT"),
    wanted("pass", Family::Integer, "BIGINT NOT NULL DEFAULT 0"),
    wanted(
        "cancel_requested",
        Family::Boolean,
        "BOOLEAN NOT NULL DEFAULT FALSE",
    ),
    wanted("lease_owner", Family::Text, "TEXT"),
    wanted("lease_expires_at", Family::TimestampTz, "TIMESTAMPTZ"),
    wanted(
        "created_at",
        Family::TimestampTz,
        "TIMESTAMPTZ NOT NULL DEFAULT now()",
    ),
    wanted(
        "updated_at",
        Family::TimestampTz,
        "TIMESTAMPTZ NOT NULL DEFAULT now()",
    ),
    wanted("started_at", Family::TimestampTz, "TIMESTAMPTZ"),
    wanted("completed_at", Family::TimestampTz, "TIMESTAMPTZ"),
];

const SCOPED_TOKEN_COLUMNS: [Wanted; 6] = [
    wanted("id", Family::Text, ""),
    wanted("token_hash", Family::Text, ""),
    wanted("scope", Family::Text, "TEXT"),
    wanted("expires_at", Family::Timestamp, ""),
    wanted("used_at", Family::Timestamp, "TIMESTAMPTZ"),
    // Not read by keyward: nullable, so SQLite can add it too.
    wanted("created_at", Family::Timestamp, "TIMESTAMPTZ DEFAULT now()"),
];

/// One change adoption makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// One statement, under the lock timeout.
    Sql { why: String, sql: String },
    /// `CREATE INDEX CONCURRENTLY` (outside a transaction); an invalid
    /// index a failed build left is dropped first.
    Index {
        why: String,
        name: String,
        sql: String,
    },
    /// A foreign key added `NOT VALID`, then validated (which takes no lock
    /// that blocks writes).
    ForeignKey {
        why: String,
        table: String,
        name: String,
        /// `None`: the constraint exists `NOT VALID` (a run stopped after
        /// adding it); it is only validated.
        definition: Option<String>,
    },
    /// Legacy rows' payload mirror, in batches by `connections.id`.
    BackfillMirror { id_type: String },
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Sql { why, sql } => write!(f, "{why}:\n    {sql}"),
            Step::Index { why, sql, .. } => write!(f, "{why}:\n    {sql}"),
            Step::ForeignKey {
                why,
                table,
                name,
                definition,
            } => {
                write!(f, "{why}:")?;
                if let Some(definition) = definition {
                    write!(
                        f,
                        "\n    ALTER TABLE {table} ADD CONSTRAINT {name} {definition} NOT VALID"
                    )?;
                }
                write!(f, "\n    ALTER TABLE {table} VALIDATE CONSTRAINT {name}")
            }
            Step::BackfillMirror { .. } => write!(
                f,
                "copy legacy rows' ciphertext into the payload mirror, {BACKFILL_BATCH} rows at a time:\n    \
                 UPDATE connections SET payload_ciphertext = encrypted_credentials, payload_iv = credentials_iv \
                 WHERE payload_ciphertext IS NULL AND encrypted_credentials IS NOT NULL"
            ),
        }
    }
}

/// A column keyward needs that exists with a type it cannot use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub table: String,
    pub column: String,
    pub found: String,
    pub expected: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{} is {}; keyward needs {}",
            self.table, self.column, self.found, self.expected
        )
    }
}

/// What adopting this database takes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdoptPlan {
    pub steps: Vec<Step>,
    pub refusals: Vec<Refusal>,
    /// Changes to the application's own types and constraints (a status
    /// its enum or CHECK lacks): made, first, only when the operator
    /// allows them (`migrate --allow-app-schema-changes`).
    pub app_changes: Vec<Step>,
}

/// Why adoption did not finish.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdoptError {
    /// Columns keyward cannot use; nothing was changed.
    #[error("this database cannot be adopted as it is; nothing was changed:\n  {}", list(.0))]
    Incompatible(Vec<Refusal>),
    /// The application's schema must change first, and the operator did
    /// not allow keyward to change it; nothing was changed.
    #[error(
        "the application's schema must change before keyward can use it; nothing was changed. \
         Run keyward migrate --allow-app-schema-changes to make these changes, or make them in \
         the application's migrations:\n  {}",
        .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n  ")
    )]
    AppSchemaChanges(Vec<Step>),
    /// A statement kept timing out on its lock (the table is busy).
    #[error("could not take a lock for {LOCK_ATTEMPTS} attempts of {} ms: {sql}", LOCK_TIMEOUT.as_millis())]
    Busy { sql: String },
    #[error("an adoption statement failed")]
    Database(#[from] sqlx::Error),
    #[error("recording the first migration failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

fn list(refusals: &[Refusal]) -> String {
    refusals
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n  ")
}

fn expected(dialect: Dialect, family: Family) -> &'static str {
    match (family, dialect) {
        (Family::Bytes, Dialect::Sqlite) => "BLOB, or TEXT holding base64 or hex",
        (Family::Timestamp | Family::TimestampTz, Dialect::Sqlite) => {
            "TEXT (keyward writes times as RFC 3339 text)"
        }
        (family, _) => expected_pg(family),
    }
}

fn expected_pg(family: Family) -> &'static str {
    match family {
        Family::Text => "text or varchar",
        Family::Bytes => "bytea, or text holding base64 or hex",
        Family::Uuid => "uuid",
        Family::Integer => "an integer type",
        Family::Timestamp => "a timestamp",
        Family::TimestampTz => "timestamp with time zone (keyward reads these times as instants)",
        Family::Boolean => "boolean",
        Family::Other => "a known type",
    }
}

/// Checks `columns` of an existing `table`: a present column of another
/// family is refused, a missing one is added when it has a declaration.
fn check_columns(
    found: &Found,
    table: &str,
    columns: &[Wanted],
    plan: &mut AdoptPlan,
    add: &mut Vec<String>,
) {
    let dialect = found.dialect;
    let status_enum = found
        .statuses
        .get(table)
        .is_some_and(|s| s.enum_type.is_some());
    for want in columns {
        let refuse = |found: String, expected: String| Refusal {
            table: table.to_owned(),
            column: want.name.to_owned(),
            found,
            expected,
        };
        if dialect == Dialect::Sqlite && sqlite::added_later(table, want.name) {
            // A later migration adds it, and SQLite cannot add it twice.
            if let Some(col) = found.column(table, want.name) {
                plan.refusals.push(refuse(
                    col.sql_type.clone(),
                    "no such column: keyward's own migration adds it".to_owned(),
                ));
            }
            continue;
        }
        match found.column(table, want.name) {
            Some(col) if dialect.fits(dialect.family(&col.sql_type), want.family) => {}
            // Read as text, written as literals (`store::keys`, `store::jobs`).
            Some(_) if want.name == "status" && status_enum => {}
            Some(col) => plan.refusals.push(refuse(
                col.sql_type.clone(),
                expected(dialect, want.family).to_owned(),
            )),
            None => match dialect.declaration(want) {
                Some(declaration) => add.push(dialect.add_column(want.name, &declaration)),
                None => plan.refusals.push(refuse(
                    "missing".to_owned(),
                    format!(
                        "{} (keyward cannot add it to a table with rows{})",
                        expected(dialect, want.family),
                        match dialect {
                            Dialect::Sqlite => {
                                "; SQLite adds no column with a default that is not a constant"
                            }
                            Dialect::Postgres => "",
                        }
                    ),
                )),
            },
        }
    }
}

/// The adoption of an application's database, or `None` where there is
/// nothing to adopt: keyward's migrations already ran, or there is no
/// `connections` table (a new database, which 0001 creates). `schema` is
/// 0001's text: its statements for keyward's own tables are used as they
/// are.
pub fn plan(found: &Found, schema: &str) -> Option<AdoptPlan> {
    if found.keyward_schema {
        return None;
    }
    let connections = found.tables.get("connections")?;
    let dialect = found.dialect;
    let family = |sql_type: &str| dialect.family(sql_type);
    let mut plan = AdoptPlan::default();
    let id_type = match connections.iter().find(|c| c.name == "id") {
        Some(id) if dialect.is_id(&id.sql_type) => id.sql_type.clone(),
        other => {
            plan.refusals.push(Refusal {
                table: "connections".to_owned(),
                column: "id".to_owned(),
                found: other.map_or("missing".to_owned(), |c| c.sql_type.clone()),
                expected: "uuid, text, varchar or an integer type".to_owned(),
            });
            return Some(plan);
        }
    };
    let statements = statements(schema);

    // encryption_keys: keyward's, or the application's if it has one.
    let key_id_type = match found.column("encryption_keys", "id") {
        None => {
            plan.steps
                .extend(created(&statements, "encryption_keys", "the key catalog"));
            dialect.key_id_type().to_owned()
        }
        Some(id) => {
            let mut add = Vec::new();
            check_columns(found, "encryption_keys", &KEY_COLUMNS, &mut plan, &mut add);
            statuses::changes(found, "encryption_keys", &mut plan);
            push_alter(&mut plan, dialect, "encryption_keys", add);
            plan.steps.extend(indexes(&statements, "encryption_keys"));
            id.sql_type.clone()
        }
    };

    // The envelope columns of connections.
    let mut add = Vec::new();
    match found.column("connections", "encryption_key_id") {
        None => add.push(match dialect {
            Dialect::Postgres => {
                format!("ADD COLUMN IF NOT EXISTS encryption_key_id {key_id_type}")
            }
            // SQLite adds a foreign key only with its column.
            Dialect::Sqlite => format!(
                "ADD COLUMN encryption_key_id {key_id_type} REFERENCES encryption_keys (id)"
            ),
        }),
        Some(col) if family(&col.sql_type) == family(&key_id_type) => {}
        Some(col) => plan.refusals.push(Refusal {
            table: "connections".to_owned(),
            column: "encryption_key_id".to_owned(),
            found: col.sql_type.clone(),
            expected: format!("{key_id_type}, the type of encryption_keys.id"),
        }),
    }
    // Ciphertext the application stores as text (base64 or hex): the
    // columns keyward adds beside it hold text too, in the encoding the
    // operator declares for the target.
    let text_ciphertext = found
        .column("connections", "encrypted_credentials")
        .is_some_and(|c| family(&c.sql_type) == Family::Text);
    let connection_columns: Vec<Wanted> = CONNECTION_COLUMNS
        .iter()
        .map(|&want| match want.family {
            Family::Bytes if text_ciphertext => Wanted {
                declaration: "TEXT",
                ..want
            },
            _ => want,
        })
        .collect();
    check_columns(
        found,
        "connections",
        &connection_columns,
        &mut plan,
        &mut add,
    );
    push_alter(&mut plan, dialect, "connections", add);
    let why = "the foreign key from connections to the key catalog".to_owned();
    match &found.key_foreign_key {
        // SQLite's came with the column, or cannot be added to one the
        // application made.
        _ if dialect == Dialect::Sqlite => {}
        None => plan.steps.push(Step::ForeignKey {
            why,
            table: "connections".to_owned(),
            name: "connections_encryption_key_id_fkey".to_owned(),
            definition: Some(
                "FOREIGN KEY (encryption_key_id) REFERENCES encryption_keys (id)".to_owned(),
            ),
        }),
        Some((name, false)) => plan.steps.push(Step::ForeignKey {
            why,
            table: "connections".to_owned(),
            name: name.clone(),
            definition: None,
        }),
        Some((_, true)) => {}
    }
    if dialect == Dialect::Sqlite {
        plan.steps.push(Step::Sql {
            why: "the index rotation and usage read rows by key through".to_owned(),
            sql: "CREATE INDEX IF NOT EXISTS connections_encryption_key_id_idx \
                  ON connections (encryption_key_id)"
                .to_owned(),
        });
    } else if found.key_index_valid != Some(true) {
        plan.steps.push(Step::Index {
            why: "the index rotation and usage read rows by key through".to_owned(),
            name: "connections_encryption_key_id_idx".to_owned(),
            sql: "CREATE INDEX CONCURRENTLY IF NOT EXISTS connections_encryption_key_id_idx \
                  ON connections (encryption_key_id)"
                .to_owned(),
        });
    }
    plan.steps.push(Step::BackfillMirror {
        id_type: id_type.clone(),
    });

    // The rotation queue.
    if found.tables.contains_key("encryption_rotation_jobs") {
        let mut add = Vec::new();
        check_columns(
            found,
            "encryption_rotation_jobs",
            &JOB_COLUMNS,
            &mut plan,
            &mut add,
        );
        statuses::changes(found, "encryption_rotation_jobs", &mut plan);
        push_alter(&mut plan, dialect, "encryption_rotation_jobs", add);
        plan.steps
            .extend(indexes(&statements, "encryption_rotation_jobs"));
    } else {
        plan.steps.extend(created(
            &statements,
            "encryption_rotation_jobs",
            "the rotation queue",
        ));
    }

    // Scoped tokens, whose connection_id takes the type of connections.id.
    if found.tables.contains_key("connection_scoped_tokens") {
        let mut add = Vec::new();
        match found.column("connection_scoped_tokens", "connection_id") {
            Some(col) if family(&col.sql_type) == family(&id_type) => {}
            other => plan.refusals.push(Refusal {
                table: "connection_scoped_tokens".to_owned(),
                column: "connection_id".to_owned(),
                found: other.map_or("missing".to_owned(), |c| c.sql_type.clone()),
                expected: format!("{id_type}, the type of connections.id"),
            }),
        }
        check_columns(
            found,
            "connection_scoped_tokens",
            &SCOPED_TOKEN_COLUMNS,
            &mut plan,
            &mut add,
        );
        push_alter(&mut plan, dialect, "connection_scoped_tokens", add);
        plan.steps
            .extend(indexes(&statements, "connection_scoped_tokens"));
    } else {
        plan.steps.extend(
            created(&statements, "connection_scoped_tokens", "scoped tokens").map(
                |step| match step {
                    Step::Sql { why, sql } => Step::Sql {
                        why,
                        sql: sql.replace(
                            "connection_id TEXT NOT NULL",
                            &format!("connection_id {id_type} NOT NULL"),
                        ),
                    },
                    other => other,
                },
            ),
        );
    }
    Some(plan)
}

/// The `ALTER TABLE`s adding `add` (`ADD COLUMN …` clauses): one
/// statement on PostgreSQL, one per column on SQLite.
fn push_alter(plan: &mut AdoptPlan, dialect: Dialect, table: &str, add: Vec<String>) {
    let why = format!("the columns keyward needs in {table}");
    let statements = match dialect {
        _ if add.is_empty() => Vec::new(),
        Dialect::Postgres => vec![add.join(", ")],
        Dialect::Sqlite => add,
    };
    for clauses in statements {
        plan.steps.push(Step::Sql {
            why: why.clone(),
            sql: format!("ALTER TABLE {table} {clauses}"),
        });
    }
}

/// 0001's statements, comments dropped.
fn statements(schema: &str) -> Vec<String> {
    let code: String = schema
        .lines()
        .filter(|line| !line.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n");
    code.split(';')
        .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|s| !s.is_empty())
        .collect()
}

/// 0001's statements that create `table` and its indexes.
fn created<'a>(
    statements: &'a [String],
    table: &'a str,
    what: &'a str,
) -> impl Iterator<Item = Step> + 'a {
    statements
        .iter()
        .filter(move |s| {
            s.starts_with(&format!("CREATE TABLE {table} "))
                || (s.starts_with("CREATE ") && s.contains(&format!(" ON {table} (")))
        })
        .map(move |sql| Step::Sql {
            why: format!("{what} ({table})"),
            sql: sql.clone(),
        })
}

/// 0001's indexes on `table`, for a table the application created: made
/// if missing (`IF NOT EXISTS`; the runbook's tables are small). Among
/// them the unique index that allows one active key at most.
fn indexes<'a>(statements: &'a [String], table: &'a str) -> impl Iterator<Item = Step> + 'a {
    created(statements, table, "keyward's index").filter_map(|step| match step {
        Step::Sql { why, sql }
            if sql.starts_with("CREATE UNIQUE INDEX ") || sql.starts_with("CREATE INDEX ") =>
        {
            Some(Step::Sql {
                why,
                sql: sql
                    .replacen(
                        "CREATE UNIQUE INDEX ",
                        "CREATE UNIQUE INDEX IF NOT EXISTS ",
                        1,
                    )
                    .replacen("CREATE INDEX ", "CREATE INDEX IF NOT EXISTS ", 1),
            })
        }
        _ => None,
    })
}

/// Whether a ciphertext column declared `sql_type` holds text
/// (`Some(true)`) or bytes (`Some(false)`); `None`: neither.
pub fn holds_text(backend: super::Backend, sql_type: &str) -> Option<bool> {
    let dialect = match backend {
        super::Backend::Postgres => Dialect::Postgres,
        super::Backend::Sqlite => Dialect::Sqlite,
    };
    match dialect.family(sql_type) {
        Family::Text => Some(true),
        Family::Bytes => Some(false),
        _ => None,
    }
}

/// Whether a PostgreSQL id column of `sql_type` is paged in its own type.
pub fn is_id_type(sql_type: &str) -> bool {
    Dialect::Postgres.is_id(sql_type)
}

#[cfg(test)]
mod tests;
