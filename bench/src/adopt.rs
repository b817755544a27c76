//! `keyward-bench adopt`: what adopting an application's live `connections`
//! table costs the application.
//!
//! In a schema of its own on the PostgreSQL database given by
//! `--database-url` it:
//! 1. creates the application's tables as Drizzle would (`uuid` ids, NOT
//!    NULL columns of the application's own) and `--rows` rows with legacy
//!    ciphertext columns (bytes of the legacy size; adoption only copies
//!    them, it never decrypts);
//! 2. runs `--writers` writers updating random rows, one statement at a
//!    time, and measures their latency for `--idle-seconds` (the baseline);
//! 3. runs keyward's `migrate` (the adoption) while they keep writing;
//! 4. reports the migrate wall time and the writers' longest stall and p99
//!    during it against the baseline, then drops its schema.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{bail, Context as _};
use clap::Args;
use hdrhistogram::Histogram;
use keyward::store::Store;
use sqlx::{postgres::PgPoolOptions, PgPool};
use tokio::time::Instant;

use crate::DatabaseArgs;

#[derive(Debug, Clone, Args)]
pub struct AdoptArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Rows of the application's `connections` table.
    #[arg(long, default_value_t = 1_000_000)]
    pub rows: u64,
    /// Concurrent writers updating random rows.
    #[arg(long, default_value_t = 4)]
    pub writers: usize,
    /// Seconds of writes measured before the adoption.
    #[arg(long, default_value_t = 5.0)]
    pub idle_seconds: f64,
}

/// The application's schema (its Drizzle migrations' output), shared with
/// keyward's adoption tests.
const APP_SCHEMA: &str = include_str!("../../tests/fixtures/application_schema.sql");

pub async fn run(args: AdoptArgs) -> anyhow::Result<()> {
    let url = args.database.database_url.as_str();
    if !url.starts_with("postgres") {
        bail!("adoption is PostgreSQL's: pass --database-url postgres://…");
    }
    let schema = format!(
        "keyward_bench_adopt_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let admin = PgPool::connect(url).await?;
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&admin)
        .await?;
    let outcome = measure(url, &schema, &args).await;
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&admin)
        .await?;
    outcome
}

/// The URL with `schema` first on the search path.
fn in_schema(url: &str, schema: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}options=-c%20search_path%3D{schema}")
}

async fn measure(url: &str, schema: &str, args: &AdoptArgs) -> anyhow::Result<()> {
    let url = in_schema(url, schema);
    let pool = PgPoolOptions::new()
        .max_connections(u32::try_from(args.writers + 2).unwrap_or(u32::MAX))
        .connect(&url)
        .await?;
    sqlx::raw_sql(&APP_SCHEMA.replace("{ID}", "uuid DEFAULT gen_random_uuid()"))
        .execute(&pool)
        .await?;
    let started = Instant::now();
    sqlx::query(
        "WITH w AS (INSERT INTO workspaces (name) VALUES ('bench') RETURNING id) \
         INSERT INTO connections (workspace_id, name, type, encrypted_credentials, credentials_iv) \
         SELECT w.id, 'db-' || i, 'postgres', decode(repeat(md5(i::text), 20), 'hex'), \
                decode(substr(md5(i::text || 'iv'), 1, 24), 'hex') \
         FROM w, generate_series(1, $1) AS i",
    )
    .bind(i64::try_from(args.rows)?)
    .execute(&pool)
    .await?;
    sqlx::query("VACUUM ANALYZE connections")
        .execute(&pool)
        .await?;
    println!(
        "keyward-bench adopt: {} application rows written in {:.1} s; {} writers",
        args.rows,
        started.elapsed().as_secs_f64(),
        args.writers
    );
    let ids: Vec<String> = sqlx::query_scalar(
        "SELECT CAST(id AS TEXT) FROM connections TABLESAMPLE SYSTEM (1) LIMIT 10000",
    )
    .fetch_all(&pool)
    .await?;
    let ids = Arc::new(if ids.is_empty() {
        sqlx::query_scalar("SELECT CAST(id AS TEXT) FROM connections LIMIT 1000")
            .fetch_all(&pool)
            .await?
    } else {
        ids
    });

    let idle = writes(&pool, &ids, args.writers, async {
        tokio::time::sleep(Duration::from_secs_f64(args.idle_seconds)).await;
        anyhow::Ok(())
    })
    .await?;
    let mut migrate_secs = 0.0;
    let during = writes(&pool, &ids, args.writers, async {
        let store = Store::connect(&url).await?;
        let started = Instant::now();
        store.migrate().await.context("keyward migrate")?;
        migrate_secs = started.elapsed().as_secs_f64();
        store.close().await;
        anyhow::Ok(())
    })
    .await?;
    let adopted: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM _sqlx_migrations WHERE version = 1) \
         AND NOT EXISTS (SELECT 1 FROM connections \
                         WHERE payload_ciphertext IS NULL AND encrypted_credentials IS NOT NULL)",
    )
    .fetch_one(&pool)
    .await?;
    if !adopted {
        bail!("migrate returned but the table is not adopted");
    }
    pool.close().await;

    let ms = |us: u64| us as f64 / 1000.0;
    println!("\n{:<52} {:>12}", "measure", "value");
    println!(
        "{:<52} {:>12.1}",
        "migrate (adoption) wall time, s", migrate_secs
    );
    println!(
        "{:<52} {:>12.1}",
        "writer longest stall during migrate, ms",
        ms(during.max())
    );
    println!(
        "{:<52} {:>12.1}",
        "writer longest stall before migrate, ms",
        ms(idle.max())
    );
    println!(
        "{:<52} {:>12.2}",
        "writer p99 during / before migrate",
        during.value_at_quantile(0.99) as f64 / idle.value_at_quantile(0.99).max(1) as f64
    );
    println!("{:<52} {:>12}", "writes during migrate", during.len());
    Ok(())
}

/// Runs `writers` closed-loop writers updating random rows of `ids` until
/// `while_running` ends; their latencies, in microseconds.
async fn writes(
    pool: &PgPool,
    ids: &Arc<Vec<String>>,
    writers: usize,
    while_running: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<Histogram<u64>> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for writer in 0..writers.max(1) {
        let (pool, ids, stop) = (pool.clone(), Arc::clone(ids), Arc::clone(&stop));
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
            let mut n = writer;
            while !stop.load(Ordering::Relaxed) {
                n = n.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                let id = &ids[n % ids.len()];
                let t = Instant::now();
                sqlx::query(
                    "UPDATE connections SET name = name, updated_at = now() WHERE id = CAST($1 AS uuid)",
                )
                .bind(id)
                .execute(&pool)
                .await?;
                hist.saturating_record(u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX));
            }
            anyhow::Ok(hist)
        }));
    }
    let outcome = while_running.await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    for task in tasks {
        all.add(task.await??)?;
    }
    outcome?;
    Ok(all)
}
