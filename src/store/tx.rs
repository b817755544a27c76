//! One write transaction on either backend, for store code that runs the
//! same statements on SQLite and PostgreSQL: [`WriteTx`] holds the
//! transaction, [`Arg`] the values a statement binds. Each method chooses
//! the backend once, for one statement, so the code that decides what to
//! write (a rotation claim, a finished batch) is a plain async function.

use chrono::{DateTime, Utc};
use sqlx::{postgres::PgRow, sqlite::SqliteRow, FromRow, Postgres, Sqlite, Transaction};

use super::{BeginWrite, Pool};
use crate::rotation::target::{Encoding, Stored};

/// A value a statement binds.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Arg<'a> {
    Text(Option<&'a str>),
    Int(i64),
    Time(Option<DateTime<Utc>>),
    Bytes(Option<&'a [u8]>),
}

impl<'a> From<Option<&'a [u8]>> for Arg<'a> {
    fn from(value: Option<&'a [u8]>) -> Self {
        Arg::Bytes(value)
    }
}

impl<'a> Arg<'a> {
    /// A value in a target's stored form; NULL typed as that form's.
    pub(crate) fn stored(encoding: Encoding, value: Option<&'a Stored>) -> Self {
        match (value, encoding.is_text()) {
            (Some(Stored::Bytes(bytes)), _) => Arg::Bytes(Some(bytes)),
            (Some(Stored::Text(text)), _) => Arg::Text(Some(text)),
            (None, false) => Arg::Bytes(None),
            (None, true) => Arg::Text(None),
        }
    }
}

impl<'a> From<&'a str> for Arg<'a> {
    fn from(value: &'a str) -> Self {
        Arg::Text(Some(value))
    }
}

impl<'a> From<&'a String> for Arg<'a> {
    fn from(value: &'a String) -> Self {
        Arg::Text(Some(value))
    }
}

impl<'a> From<Option<&'a str>> for Arg<'a> {
    fn from(value: Option<&'a str>) -> Self {
        Arg::Text(value)
    }
}

impl From<i64> for Arg<'_> {
    fn from(value: i64) -> Self {
        Arg::Int(value)
    }
}

impl From<DateTime<Utc>> for Arg<'_> {
    fn from(value: DateTime<Utc>) -> Self {
        Arg::Time(Some(value))
    }
}

impl From<Option<DateTime<Utc>>> for Arg<'_> {
    fn from(value: Option<DateTime<Utc>>) -> Self {
        Arg::Time(value)
    }
}

/// A transaction opened with [`BeginWrite::begin_write`].
pub(crate) enum WriteTx {
    Sqlite(Transaction<'static, Sqlite>),
    Postgres(Transaction<'static, Postgres>),
}

/// `sqlx::query($sql)` with `$args` bound, for the backend at hand.
macro_rules! bound {
    ($query:expr, $args:expr) => {{
        let mut query = $query;
        for arg in $args {
            query = match *arg {
                Arg::Text(value) => query.bind(value),
                Arg::Int(value) => query.bind(value),
                Arg::Time(value) => query.bind(value),
                Arg::Bytes(value) => query.bind(value),
            };
        }
        query
    }};
}

/// Runs `$body` with `$tx` bound to the backend's own transaction.
macro_rules! on_tx {
    ($self:expr, |$tx:ident| $body:expr) => {
        match $self {
            WriteTx::Sqlite($tx) => $body,
            WriteTx::Postgres($tx) => $body,
        }
    };
}

impl WriteTx {
    pub(crate) async fn begin(pool: &Pool) -> Result<Self, sqlx::Error> {
        Ok(match pool {
            Pool::Sqlite(pool) => WriteTx::Sqlite(pool.begin_write().await?),
            Pool::Postgres(pool) => WriteTx::Postgres(pool.begin_write().await?),
        })
    }

    /// `" FOR UPDATE"` on PostgreSQL, where a row read to be changed is
    /// locked for the rest of the transaction; nothing on SQLite, whose
    /// `BEGIN IMMEDIATE` already holds the database's write lock.
    pub(crate) fn lock_clause(&self) -> &'static str {
        match self {
            WriteTx::Sqlite(_) => "",
            WriteTx::Postgres(_) => " FOR UPDATE",
        }
    }

    /// Runs a statement; the number of rows it changed.
    pub(crate) async fn execute(
        &mut self,
        sql: &str,
        args: &[Arg<'_>],
    ) -> Result<u64, sqlx::Error> {
        on_tx!(self, |tx| Ok(bound!(sqlx::query(sql), args)
            .execute(&mut **tx)
            .await?
            .rows_affected()))
    }

    /// The single integer a query returns (a count).
    pub(crate) async fn fetch_i64(
        &mut self,
        sql: &str,
        args: &[Arg<'_>],
    ) -> Result<i64, sqlx::Error> {
        on_tx!(self, |tx| bound!(sqlx::query_scalar(sql), args)
            .fetch_one(&mut **tx)
            .await)
    }

    /// Every row a query returns.
    pub(crate) async fn fetch_all<T>(
        &mut self,
        sql: &str,
        args: &[Arg<'_>],
    ) -> Result<Vec<T>, sqlx::Error>
    where
        T: for<'r> FromRow<'r, SqliteRow> + for<'r> FromRow<'r, PgRow> + Send + Unpin,
    {
        on_tx!(self, |tx| bound!(sqlx::query_as(sql), args)
            .fetch_all(&mut **tx)
            .await)
    }

    pub(crate) async fn commit(self) -> Result<(), sqlx::Error> {
        on_tx!(self, |tx| tx.commit().await)
    }
}
