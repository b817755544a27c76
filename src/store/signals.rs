//! What rotation workers throttle on, as the database holds it: each serve
//! replica's foreground latency (`keyward_replicas.foreground_*`, written
//! every second while a job has a latency budget) and, on PostgreSQL, the
//! streaming standbys' replay positions (`pg_stat_replication`).

use chrono::{DateTime, Utc};

use super::{on_pool, Pool, Store, StoreError};
pub use crate::rotation::throttle::{Replication, Standby};

/// One serve replica's foreground p99 over its last one-second window.
#[derive(Debug, Clone, PartialEq)]
pub struct ForegroundReading {
    /// `keyward_replicas.id`.
    pub replica: String,
    /// Where it listens (or its host), to name it to operators.
    pub name: String,
    /// `None`: no Encrypt or Decrypt in the window.
    pub p99_ms: Option<f64>,
    pub calls: i64,
    /// When its last window ended; `None`: it has published none.
    pub at: Option<DateTime<Utc>>,
}

#[derive(sqlx::FromRow)]
struct ForegroundRow {
    id: String,
    host: String,
    listen: Option<String>,
    foreground_p99_ms: Option<f64>,
    foreground_calls: Option<i64>,
    foreground_at: Option<DateTime<Utc>>,
}

#[derive(sqlx::FromRow)]
struct StandbyRow {
    name: Option<String>,
    state: Option<String>,
    replay_lsn: Option<i64>,
    replay_lag_ms: Option<f64>,
}

impl Store {
    /// Whether a running job has a latency budget (serve replicas publish
    /// their latency only then).
    pub async fn budgeted_job_running(&self) -> Result<bool, StoreError> {
        let found: Option<i64> = on_pool!(self, |pool| sqlx::query_scalar(
            "SELECT CAST(1 AS BIGINT) FROM encryption_rotation_jobs WHERE status = 'running' \
             AND max_foreground_p99_ms IS NOT NULL LIMIT 1"
        )
        .fetch_optional(pool)
        .await)?;
        Ok(found.is_some())
    }

    /// Publishes replica `id`'s foreground p99 of the window that ended at
    /// `at` (`None`: no calls in it).
    pub async fn publish_foreground(
        &self,
        id: &str,
        p99_ms: Option<f64>,
        calls: i64,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        on_pool!(self, |pool| sqlx::query(
            "UPDATE keyward_replicas SET foreground_p99_ms = $2, foreground_calls = $3, \
             foreground_at = $4 WHERE id = $1"
        )
        .bind(id)
        .bind(p99_ms)
        .bind(calls)
        .bind(at)
        .execute(pool)
        .await
        .map(drop))?;
        Ok(())
    }

    /// The last published foreground latency of every live serve replica.
    pub async fn foreground_readings(&self) -> Result<Vec<ForegroundReading>, StoreError> {
        let rows: Vec<ForegroundRow> = on_pool!(self, |pool| sqlx::query_as(
            "SELECT id, host, listen, foreground_p99_ms, foreground_calls, foreground_at \
             FROM keyward_replicas WHERE kind = 'serve' AND expires_at > $1"
        )
        .bind(Utc::now())
        .fetch_all(pool)
        .await)?;
        Ok(rows
            .into_iter()
            .map(|row| ForegroundReading {
                name: row.listen.unwrap_or(row.host),
                replica: row.id,
                p99_ms: row.foreground_p99_ms,
                calls: row.foreground_calls.unwrap_or(0),
                at: row.foreground_at,
            })
            .collect())
    }

    /// The primary's WAL position and its streaming standbys; `None` on
    /// SQLite, which has no replication.
    pub async fn replication(&self) -> Result<Option<Replication>, StoreError> {
        let Pool::Postgres(pool) = &self.pool else {
            return Ok(None);
        };
        let current_lsn: i64 =
            sqlx::query_scalar("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::BIGINT")
                .fetch_one(pool)
                .await?;
        let rows: Vec<StandbyRow> = sqlx::query_as(
            "SELECT application_name AS name, state, \
             (replay_lsn - '0/0'::pg_lsn)::BIGINT AS replay_lsn, \
             (EXTRACT(EPOCH FROM replay_lag) * 1000)::DOUBLE PRECISION AS replay_lag_ms \
             FROM pg_stat_replication",
        )
        .fetch_all(pool)
        .await?;
        let standbys = rows
            .into_iter()
            .map(|row| Standby {
                name: row.name.unwrap_or_else(|| "(hidden)".into()),
                // Without pg_read_all_stats every column but the pid is
                // NULL, the state included (never NULL otherwise).
                readable: row.state.is_some(),
                replay_lsn: row.replay_lsn,
                replay_lag_ms: row.replay_lag_ms,
            })
            .collect();
        Ok(Some(Replication {
            current_lsn,
            standbys,
        }))
    }
}
