//! Persistence: the only module that runs SQL.
//!
//! One [`Store`] over either SQLite (the embedded default) or PostgreSQL.
//! Queries are runtime-checked (`query_as` + `FromRow`), so the crate
//! compiles with no database at hand; both backends accept the same `$n`
//! placeholders, so a statement is written once and run on whichever pool
//! is configured (`on_pool!`). Where the dialects differ, the code matches
//! on the backend explicitly.

pub mod adopt;
mod connections;
pub use connections::{AgedToken, LegacyCheck};
mod jobs;
mod keys;
pub mod replicas;
pub mod rotation;
mod row;
pub mod signals;
pub mod targets;
pub mod tokens;
mod tx;

use std::{str::FromStr, time::Duration};

use sqlx::{
    migrate::Migrator,
    postgres::{PgConnectOptions, PgPoolOptions},
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions},
    PgPool, SqlitePool,
};

pub use jobs::{JobTuning, ThrottleReport};
pub use keys::{NewKey, RetireOutcome};

/// keyward's first migration, the one adoption stands in for.
fn first_migration(migrator: &Migrator) -> Result<&sqlx::migrate::Migration, StoreError> {
    migrator
        .iter()
        .next()
        .ok_or_else(|| StoreError::Corrupt("no migrations embedded".into()))
}

static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/postgres");

/// Which database a store talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Database failures, with the cause kept for the log.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// `DATABASE_URL` is not a URL keyward can use.
    #[error("invalid DATABASE_URL: {0}; use sqlite://PATH or postgres://USER@HOST/DB")]
    InvalidUrl(String),
    /// The database could not be reached (connect, pool timeout, I/O).
    #[error("the database is unavailable")]
    Unavailable(#[source] sqlx::Error),
    /// A statement failed.
    #[error("a database statement failed")]
    Query(#[source] sqlx::Error),
    /// A unique constraint refused the write.
    #[error("a row with that {0} already exists")]
    Conflict(&'static str),
    /// A row changed between the check and the write; the caller may retry.
    #[error("the row was changed concurrently; retry")]
    Concurrent,
    /// A row holds a value keyward does not understand.
    #[error("invalid value in the database: {0}")]
    Corrupt(String),
    /// Applying migrations failed.
    #[error("applying database migrations failed")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    /// A rotation target does not match the database's schema.
    #[error("{0}")]
    TargetSchema(String),
    /// An application's database could not be adopted (see [`adopt`]).
    #[error("adopting the application's database failed: {0}")]
    Adopt(#[source] adopt::AdoptError),
}

impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> Self {
        match &err {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_) => StoreError::Unavailable(err),
            sqlx::Error::Database(db) if is_sqlite_busy(db.as_ref()) => {
                StoreError::Unavailable(err)
            }
            sqlx::Error::Database(db) if db.is_unique_violation() => {
                StoreError::Conflict(unique_field(db.message()))
            }
            _ => StoreError::Query(err),
        }
    }
}

/// SQLite's `SQLITE_BUSY` (5) and `SQLITE_LOCKED` (6), with any extended
/// code: another connection held the lock past the busy timeout. The
/// caller may retry, as with any unavailable database.
fn is_sqlite_busy(err: &dyn sqlx::error::DatabaseError) -> bool {
    err.try_downcast_ref::<sqlx::sqlite::SqliteError>()
        .is_some()
        && err
            .code()
            .and_then(|c| c.parse::<i32>().ok())
            .is_some_and(|c| matches!(c & 0xff, 5 | 6))
}

/// Names the field a unique violation was about, for a helpful message.
fn unique_field(message: &str) -> &'static str {
    if message.contains("one_active") {
        "status 'active' (only one key may be active)"
    } else if message.contains("key_id") {
        "key_id"
    } else if message.contains("keyward_api_tokens") && message.contains("name") {
        "token name"
    } else {
        "identity"
    }
}

#[derive(Clone)]
enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Runs the same statement code against whichever pool is configured.
macro_rules! on_pool {
    ($store:expr, |$pool:ident| $body:expr) => {
        match &$store.pool {
            $crate::store::Pool::Sqlite($pool) => $body,
            $crate::store::Pool::Postgres($pool) => $body,
        }
    };
}
pub(crate) use on_pool;

/// Creates a missing SQLite database file readable by its owner only (it
/// holds wrapped keys, token hashes and, in `connections`, ciphertexts);
/// SQLite gives its WAL and shared-memory files the same mode. An existing
/// file is left as it is; an in-memory database has no file.
fn create_private(path: &std::path::Path) {
    use std::os::unix::fs::OpenOptionsExt as _;
    if path.as_os_str().is_empty() || path == std::path::Path::new(":memory:") {
        return;
    }
    // AlreadyExists is the common case; any other failure is SQLite's to
    // report when it opens the file.
    let _ = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path);
}

/// Opens a transaction that is going to write.
///
/// On SQLite a plain `BEGIN` takes the write lock only at the first write.
/// If the transaction read before that and another connection committed in
/// between, the upgrade fails at once with `SQLITE_BUSY`: the busy timeout
/// does not apply, since waiting cannot make a stale snapshot current.
/// `BEGIN IMMEDIATE` takes the write lock up front, where the busy timeout
/// does wait, so a read-then-write transaction (count, then retire) cannot
/// fail because a heartbeat landed between its statements. PostgreSQL has no
/// such upgrade: a plain `BEGIN`, then bounds for this transaction only
/// ([`TX_IDLE_TIMEOUT`], [`TX_LOCK_TIMEOUT`]; `SET LOCAL`, never a setting
/// of a role the application may share).
pub(crate) trait BeginWrite {
    type Database: sqlx::Database;

    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, Self::Database>, sqlx::Error>;
}

impl BeginWrite for SqlitePool {
    type Database = sqlx::Sqlite;

    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, sqlx::Error> {
        self.begin_with("BEGIN IMMEDIATE").await
    }
}

impl BeginWrite for PgPool {
    type Database = sqlx::Postgres;

    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "SELECT set_config('idle_in_transaction_session_timeout', $1, true), \
                    set_config('lock_timeout', $2, true)",
        )
        .bind(TX_IDLE_TIMEOUT.as_millis().to_string())
        .bind(TX_LOCK_TIMEOUT.as_millis().to_string())
        .execute(&mut *tx)
        .await?;
        Ok(tx)
    }
}

/// PostgreSQL ends the session of a keyward write transaction that sits
/// idle this long (a worker paused by SIGSTOP, a VM pause, a half-open
/// network), releasing the job row and the rows it locked, so the other
/// workers and `rotate cancel` go on. keyward's own transactions never
/// wait on their client between statements.
pub const TX_IDLE_TIMEOUT: Duration = Duration::from_secs(2);

/// The longest a keyward write transaction waits for a lock before it
/// fails (and its work is retried): longer than [`TX_IDLE_TIMEOUT`], so a
/// lock a paused keyward process held is always outlived.
pub const TX_LOCK_TIMEOUT: Duration = Duration::from_secs(5);

/// A handle on the database. Cheap to clone (a pool inside).
#[derive(Clone)]
pub struct Store {
    pool: Pool,
}

impl Store {
    /// Connects to `sqlite://…` (the file is created if missing) or
    /// `postgres://…`.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let pool = if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(url)
                .map_err(|e| StoreError::InvalidUrl(e.to_string()))?;
            if !url.contains("mode=memory") {
                create_private(options.get_filename());
            }
            let options = options
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .busy_timeout(Duration::from_secs(10))
                .foreign_keys(true);
            Pool::Sqlite(
                SqlitePoolOptions::new()
                    .max_connections(8)
                    .acquire_timeout(Duration::from_secs(10))
                    .connect_with(options)
                    .await?,
            )
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            let options = PgConnectOptions::from_str(url)
                .map_err(|e| StoreError::InvalidUrl(e.to_string()))?;
            Pool::Postgres(
                PgPoolOptions::new()
                    .max_connections(16)
                    .acquire_timeout(Duration::from_secs(10))
                    .connect_with(options)
                    .await?,
            )
        } else {
            return Err(StoreError::InvalidUrl("unknown scheme".into()));
        };
        Ok(Self { pool })
    }

    pub fn backend(&self) -> Backend {
        match self.pool {
            Pool::Sqlite(_) => Backend::Sqlite,
            Pool::Postgres(_) => Backend::Postgres,
        }
    }

    /// Applies the migrations of this backend that have not run yet; on
    /// an application's PostgreSQL database, adopts it first (see
    /// [`adopt`]). Statements on PostgreSQL wait at most
    /// [`adopt::LOCK_TIMEOUT`] for a lock (the tables may be live), and a
    /// migration that timed out is rolled back and tried again. Changes to
    /// the application's own schema are refused ([`Self::migrate_with`]).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        self.migrate_with(false).await
    }

    /// [`Self::migrate`], making the changes to the application's own
    /// types and constraints that adoption needs when
    /// `allow_app_schema_changes` (`migrate --allow-app-schema-changes`).
    pub async fn migrate_with(&self, allow_app_schema_changes: bool) -> Result<(), StoreError> {
        match &self.pool {
            Pool::Sqlite(pool) => {
                self.adopt_if_needed(&SQLITE_MIGRATIONS, allow_app_schema_changes)
                    .await?;
                // On a connection of its own, closed when done: a migration
                // that edits the schema in place (0014) leaves the
                // connection that ran it with the old schema in memory.
                let mut conn = pool.acquire().await?.detach();
                let migrated = SQLITE_MIGRATIONS
                    .run(&mut conn)
                    .await
                    .map_err(StoreError::Migrate);
                let _ = sqlx::Connection::close(conn).await;
                migrated
            }
            Pool::Postgres(pool) => {
                self.adopt_if_needed(&POSTGRES_MIGRATIONS, allow_app_schema_changes)
                    .await?;
                let mut attempts = 0;
                loop {
                    // A connection of its own, closed when done: the pool's
                    // must not keep the short lock timeout for later work.
                    let mut conn = pool.acquire().await?.detach();
                    adopt::set_lock_timeout(&mut conn).await?;
                    match POSTGRES_MIGRATIONS.run(&mut conn).await {
                        Err(sqlx::migrate::MigrateError::Execute(err))
                            if adopt::is_lock_timeout(&err) && attempts < 60 =>
                        {
                            attempts += 1;
                            tokio::time::sleep(adopt::LOCK_TIMEOUT).await;
                        }
                        other => break other.map_err(StoreError::Migrate),
                    }
                }
            }
        }
    }

    /// Adopts an application's database (see [`adopt`]) if this is one.
    async fn adopt_if_needed(
        &self,
        migrations: &Migrator,
        allow_app_schema_changes: bool,
    ) -> Result<(), StoreError> {
        if let Some(plan) = self.adoption_plan().await? {
            let first = first_migration(migrations)?;
            adopt::adopt(&self.pool, &plan, first, allow_app_schema_changes)
                .await
                .map_err(StoreError::Adopt)?;
        }
        Ok(())
    }

    /// What adopting this database would take; `None` where there is
    /// nothing to adopt (a new database, keyward's own).
    pub async fn adoption_plan(&self) -> Result<Option<adopt::AdoptPlan>, StoreError> {
        let (found, first) = match &self.pool {
            Pool::Postgres(pool) => (
                adopt::inspect(pool).await?,
                first_migration(&POSTGRES_MIGRATIONS)?,
            ),
            Pool::Sqlite(pool) => (
                adopt::inspect_sqlite(pool).await?,
                first_migration(&SQLITE_MIGRATIONS)?,
            ),
        };
        Ok(adopt::plan(&found, &first.sql))
    }

    /// Runs one statement in a write transaction of its own; the number of
    /// rows it changed.
    pub(crate) async fn execute(&self, sql: &str, args: &[tx::Arg<'_>]) -> Result<u64, StoreError> {
        let mut tx = tx::WriteTx::begin(&self.pool).await?;
        let changed = tx.execute(sql, args).await?;
        tx.commit().await?;
        Ok(changed)
    }

    /// Checks that the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        on_pool!(self, |pool| sqlx::query("SELECT 1")
            .execute(pool)
            .await
            .map(|_| ()))?;
        Ok(())
    }

    /// Closes every connection (used on shutdown).
    pub async fn close(&self) {
        on_pool!(self, |pool| pool.close().await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn sqlite_pool(dir: &tempfile::TempDir) -> SqlitePool {
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let Pool::Sqlite(pool) = Store::connect(&url).await.unwrap().pool else {
            unreachable!("a sqlite:// URL opens SQLite");
        };
        sqlx::query("CREATE TABLE t (x INTEGER)")
            .execute(&pool)
            .await
            .unwrap();
        pool
    }

    /// The failure `begin_write` exists for: a plain transaction that read
    /// cannot write after another connection committed.
    #[tokio::test]
    async fn a_plain_transaction_that_read_cannot_write_after_a_concurrent_commit() {
        let dir = tempfile::tempdir().unwrap();
        let pool = sqlite_pool(&dir).await;
        let mut tx = pool.begin().await.unwrap();
        sqlx::query("SELECT count(*) FROM t")
            .execute(&mut *tx)
            .await
            .unwrap();
        sqlx::query("INSERT INTO t VALUES (1)")
            .execute(&pool)
            .await
            .unwrap();
        let err = sqlx::query("INSERT INTO t VALUES (2)")
            .execute(&mut *tx)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("locked"), "{err}");
        // Should it happen anyway, callers see a retryable failure.
        assert!(matches!(StoreError::from(err), StoreError::Unavailable(_)));
    }

    #[tokio::test]
    async fn begin_write_makes_a_concurrent_writer_wait_instead() {
        let dir = tempfile::tempdir().unwrap();
        let pool = sqlite_pool(&dir).await;
        let mut tx = pool.begin_write().await.unwrap();
        let before: i64 = sqlx::query_scalar("SELECT count(*) FROM t")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        let other = tokio::spawn({
            let pool = pool.clone();
            async move { sqlx::query("INSERT INTO t VALUES (1)").execute(&pool).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!other.is_finished(), "the other writer waits for the lock");
        sqlx::query("INSERT INTO t VALUES (2)")
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        other.await.unwrap().unwrap();
        let after: i64 = sqlx::query_scalar("SELECT count(*) FROM t")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!((before, after), (0, 2));
    }
}
