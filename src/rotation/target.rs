//! Rotation targets: the tables of secrets a rotation walks, and the SQL
//! for each. The default target is the runbook's `connections` table, with
//! the context `{"connection_id": id}` and the legacy columns; deployments
//! add their own tables by configuration (`--rotation-targets FILE`).
//!
//! Table and column names come from configuration, so each is checked to be
//! a plain SQL identifier and always double-quoted: nothing a configuration
//! file says can change the shape of a statement.

use crate::crypto::context::{ContextError, EncryptionContext};

use super::CONNECTION_CONTEXT_KEY;

/// SQLite: the instant `expr` holds, as Unix seconds. Times may be text
/// (RFC 3339, keyward's; `2026-12-06 19:00:00`, `CURRENT_TIMESTAMP`'s) or,
/// in an application's own columns, numbers of Unix seconds (Drizzle's
/// `integer({ mode: 'timestamp' })`).
pub fn sqlite_unix_seconds(expr: &str) -> String {
    format!(
        "(CASE WHEN typeof({expr}) IN ('integer', 'real') THEN CAST({expr} AS REAL) \
         ELSE (julianday({expr}) - 2440587.5) * 86400.0 END)"
    )
}

/// A checked SQL identifier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ident(String);

impl Ident {
    /// Accepts `[A-Za-z_][A-Za-z0-9_]*`, at most 63 bytes (PostgreSQL's limit).
    pub fn parse(name: &str) -> Result<Self, TargetError> {
        let mut chars = name.chars();
        let ok = name.len() <= 63
            && chars
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
        if ok {
            Ok(Self(name.to_owned()))
        } else {
            Err(TargetError::BadIdentifier(name.to_owned()))
        }
    }

    fn q(&self) -> String {
        format!("\"{}\"", self.0)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// How a target stores its ciphertext columns (the envelope columns and
/// the legacy ones alike): as bytes (`bytea`, `BLOB`), or as text holding
/// them in base64 (standard alphabet, padded: Node's `toString('base64')`)
/// or hex. Rotation reads and writes each in that form.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Encoding {
    #[default]
    Bytes,
    Base64,
    Hex,
}

/// A value in a target's stored form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    Bytes(Vec<u8>),
    Text(String),
}

impl Stored {
    pub fn into_bytes(self) -> Vec<u8> {
        match self {
            Stored::Bytes(bytes) => bytes,
            Stored::Text(text) => text.into_bytes(),
        }
    }

    pub fn into_text(self) -> String {
        match self {
            Stored::Bytes(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Stored::Text(text) => text,
        }
    }
}

impl Encoding {
    pub fn parse(name: &str) -> Result<Self, TargetError> {
        match name {
            "bytes" => Ok(Encoding::Bytes),
            "base64" => Ok(Encoding::Base64),
            "hex" => Ok(Encoding::Hex),
            other => Err(TargetError::BadEncoding(other.to_owned())),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Bytes => "bytes",
            Encoding::Base64 => "base64",
            Encoding::Hex => "hex",
        }
    }

    /// Whether the columns hold text.
    pub fn is_text(self) -> bool {
        self != Encoding::Bytes
    }

    /// The bytes a stored value holds (`stored`: a column's raw value, the
    /// text's UTF-8 for a text encoding); why not, for a value that is not
    /// in the encoding.
    pub fn decode(self, stored: &[u8]) -> Result<Vec<u8>, String> {
        use base64::Engine as _;
        match self {
            Encoding::Bytes => Ok(stored.to_vec()),
            Encoding::Base64 => base64::engine::general_purpose::STANDARD
                .decode(stored.trim_ascii())
                .map_err(|err| format!("not base64: {err}")),
            Encoding::Hex => {
                hex::decode(stored.trim_ascii()).map_err(|err| format!("not hex: {err}"))
            }
        }
    }

    /// `bytes` in the stored form.
    pub fn encode(self, bytes: &[u8]) -> Stored {
        use base64::Engine as _;
        match self {
            Encoding::Bytes => Stored::Bytes(bytes.to_vec()),
            Encoding::Base64 => {
                Stored::Text(base64::engine::general_purpose::STANDARD.encode(bytes))
            }
            Encoding::Hex => Stored::Text(hex::encode(bytes)),
        }
    }

    /// A raw stored value (as [`Self::decode`] takes it) as it is bound
    /// back in a compare-and-swap.
    pub fn restore(self, raw: &[u8]) -> Stored {
        match self {
            Encoding::Bytes => Stored::Bytes(raw.to_vec()),
            _ => Stored::Text(String::from_utf8_lossy(raw).into_owned()),
        }
    }

    /// How the stored form of a value begins, as far as its first bytes
    /// `prefix` decide it: all of it for bytes and hex (lowercase), the
    /// first 4⌊n/3⌋ characters for base64 (a wrap tag of 10 bytes is
    /// compared on its first 9).
    pub fn stored_prefix(self, prefix: &[u8]) -> Stored {
        match self {
            Encoding::Base64 => self.encode(&prefix[..prefix.len() / 3 * 3]),
            _ => self.encode(prefix),
        }
    }

    /// Stored units (bytes or characters) that hold the first `n` bytes of
    /// a value whole.
    pub fn stored_len(self, n: usize) -> usize {
        match self {
            Encoding::Bytes => n,
            Encoding::Hex => 2 * n,
            Encoding::Base64 => n.div_ceil(3) * 4,
        }
    }

    /// PostgreSQL's array type of the stored form.
    pub fn pg_array(self) -> &'static str {
        match self {
            Encoding::Bytes => "bytea[]",
            _ => "text[]",
        }
    }
}

/// A rotation target configuration that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TargetError {
    #[error(
        "{0:?} is not a plain SQL identifier (letters, digits and _, not starting with a digit)"
    )]
    BadIdentifier(String),
    #[error(
        "rotation target {0} has no context columns; name at least one so rows cannot be swapped"
    )]
    NoContext(String),
    #[error("rotation target {0} is configured twice")]
    Duplicate(String),
    #[error("{0:?} is not a ciphertext encoding; use bytes, base64 or hex")]
    BadEncoding(String),
    #[error("the connections target is the runbook's: an entry for it may give only its encoding")]
    ConnectionsFixed,
}

/// The envelope columns of a target (defaults: the `connections` names).
#[derive(Debug, Clone)]
pub struct EnvelopeColumns {
    pub encryption_key_id: Ident,
    pub data_key_ciphertext: Ident,
    pub data_key_iv: Ident,
    pub payload_ciphertext: Ident,
    pub payload_iv: Ident,
    pub last_error: Ident,
    pub last_error_job_id: Ident,
}

impl EnvelopeColumns {
    fn defaults() -> Self {
        let id = |s: &str| Ident(s.to_owned());
        Self {
            encryption_key_id: id("encryption_key_id"),
            data_key_ciphertext: id("data_key_ciphertext"),
            data_key_iv: id("data_key_iv"),
            payload_ciphertext: id("payload_ciphertext"),
            payload_iv: id("payload_iv"),
            last_error: id("last_error"),
            last_error_job_id: id("last_error_job_id"),
        }
    }
}

/// One table of secrets.
#[derive(Debug, Clone)]
pub struct RotationTarget {
    pub table: Ident,
    pub id: Ident,
    pub columns: EnvelopeColumns,
    /// Legacy (ciphertext, iv) columns, read when the payload mirror is empty.
    pub legacy: Option<(Ident, Ident)>,
    /// Context key → the column whose value (as text) it takes.
    pub context: Vec<(String, Ident)>,
    /// A timestamp column the application sets on each write (for the age
    /// of the oldest row on a key); `updated_at` for `connections`.
    pub updated_at: Option<Ident>,
    /// The id column's own type on PostgreSQL (`uuid`, `bigint`, `text`…),
    /// read from the database at startup: rows are paged and matched by the
    /// id in that type, so the primary key's index serves both. `None`
    /// (SQLite): ids are compared as text.
    pub id_type: Option<SqlType>,
    /// How its ciphertext columns (envelope and legacy) are stored.
    pub encoding: Encoding,
}

/// A column type, as PostgreSQL spells it, that an id may have: only
/// letters, digits, spaces and parentheses (`character varying(36)`), so
/// it can stand in a `CAST` as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqlType(String);

impl SqlType {
    pub fn parse(name: &str) -> Option<Self> {
        let ok = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, ' ' | '(' | ')' | '_'));
        ok.then(|| Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl RotationTarget {
    /// The runbook's `connections` table.
    pub fn connections() -> Self {
        let id = |s: &str| Ident(s.to_owned());
        Self {
            table: id("connections"),
            id: id("id"),
            columns: EnvelopeColumns::defaults(),
            legacy: Some((id("encrypted_credentials"), id("credentials_iv"))),
            context: vec![(CONNECTION_CONTEXT_KEY.to_owned(), id("id"))],
            updated_at: Some(id("updated_at")),
            id_type: None,
            encoding: Encoding::Bytes,
        }
    }

    /// A configured table. Columns not named take the `connections` names.
    pub fn new(
        table: &str,
        id_column: &str,
        context: &[(String, String)],
        columns: &[(&str, &str)],
        legacy: Option<(&str, &str)>,
        updated_at: Option<&str>,
    ) -> Result<Self, TargetError> {
        if context.is_empty() {
            return Err(TargetError::NoContext(table.to_owned()));
        }
        let mut cols = EnvelopeColumns::defaults();
        for (field, name) in columns {
            let ident = Ident::parse(name)?;
            match *field {
                "encryption_key_id" => cols.encryption_key_id = ident,
                "data_key_ciphertext" => cols.data_key_ciphertext = ident,
                "data_key_iv" => cols.data_key_iv = ident,
                "payload_ciphertext" => cols.payload_ciphertext = ident,
                "payload_iv" => cols.payload_iv = ident,
                "last_error" => cols.last_error = ident,
                "last_error_job_id" => cols.last_error_job_id = ident,
                other => return Err(TargetError::BadIdentifier(other.to_owned())),
            }
        }
        Ok(Self {
            table: Ident::parse(table)?,
            id: Ident::parse(id_column)?,
            columns: cols,
            legacy: legacy
                .map(|(ct, iv)| Ok::<_, TargetError>((Ident::parse(ct)?, Ident::parse(iv)?)))
                .transpose()?,
            context: context
                .iter()
                .map(|(key, column)| Ok((key.clone(), Ident::parse(column)?)))
                .collect::<Result<_, TargetError>>()?,
            updated_at: updated_at.map(Ident::parse).transpose()?,
            id_type: None,
            encoding: Encoding::Bytes,
        })
    }

    /// The target with its ciphertext columns stored in `encoding`.
    pub fn with_encoding(mut self, encoding: Encoding) -> Self {
        self.encoding = encoding;
        self
    }

    /// `id = value`: in the id's own type where it is known (an index
    /// lookup), else as text.
    fn id_is(&self, id: &str, value: &str) -> String {
        match &self.id_type {
            Some(t) => format!("{id} = CAST({value} AS {})", t.as_str()),
            None => format!("CAST({id} AS TEXT) = {value}"),
        }
    }

    /// The encryption context of a row, from its context column values.
    pub fn context_of(&self, values: &[Option<String>]) -> Result<EncryptionContext, ContextError> {
        EncryptionContext::from_pairs(
            self.context
                .iter()
                .zip(values)
                .map(|((key, _), value)| (key.clone(), value.clone().unwrap_or_default())),
        )
    }

    /// Rows not on key `$1`, or on it with a data key that does not begin
    /// with the tag `tag` (a placeholder; NULL: any data key), and not
    /// already failed by job `$2`.
    /// The tag is bound in the target's stored form
    /// ([`Encoding::stored_prefix`]).
    fn off_target(&self, tag: &str) -> String {
        let c = &self.columns;
        let dk = c.data_key_ciphertext.q();
        let head = match self.encoding {
            // Hex may have been written in either case.
            Encoding::Hex => format!("lower(substr({dk}, 1, length({tag})))"),
            _ => format!("substr({dk}, 1, length({tag}))"),
        };
        format!(
            "({k} IS NULL OR {k} <> $1 OR ({tag} IS NOT NULL AND ({dk} IS NULL \
             OR {head} <> {tag}))) AND ({e} IS NULL OR {e} <> $2)",
            k = c.encryption_key_id.q(),
            e = c.last_error_job_id.q()
        )
    }

    /// Rows per key (`NULL`: legacy), the oldest write time as Unix
    /// seconds (`NULL` without an `updated_at` column), how many of them
    /// still hold a legacy ciphertext, and how many of those the last
    /// `legacy cutover` check found in conflict with the envelope.
    pub fn usage_sql(&self, postgres: bool) -> String {
        let t = self.table.q();
        let oldest = match (&self.updated_at, postgres) {
            (None, _) => "CAST(NULL AS DOUBLE PRECISION)".to_owned(),
            (Some(col), true) => format!(
                "CAST(EXTRACT(EPOCH FROM MIN({t}.{})) AS DOUBLE PRECISION)",
                col.q()
            ),
            (Some(col), false) => sqlite_unix_seconds(&format!("MIN({t}.{})", col.q())),
        };
        let (legacy, conflicts) = match &self.legacy {
            Some((ct, _)) => (
                format!("COUNT({t}.{})", ct.q()),
                format!(
                    "COUNT(CASE WHEN {t}.{} IS NOT NULL THEN c.row_id END)",
                    ct.q()
                ),
            ),
            None => ("0".to_owned(), "0".to_owned()),
        };
        // The table's name is a checked identifier: safe as a literal too.
        format!(
            "SELECT CAST({t}.{k} AS TEXT) AS key_record_id, COUNT(*) AS row_count, \
             {oldest} AS oldest_secs, CAST({legacy} AS BIGINT) AS legacy_copies, \
             CAST({conflicts} AS BIGINT) AS legacy_conflicts \
             FROM {t} LEFT JOIN keyward_legacy_conflicts c \
             ON c.target_table = '{name}' AND c.row_id = CAST({t}.{id} AS TEXT) GROUP BY {t}.{k}",
            k = self.columns.encryption_key_id.q(),
            id = self.id.q(),
            name = self.table.as_str(),
        )
    }

    /// Rows per key (not legacy rows) and the stored form of the first
    /// `tag_len` bytes of their wrapped data key
    /// ([`crate::crypto::kms::KmsProvider::wrap_tag`];
    /// [`Encoding::stored_len`] units of it).
    pub fn wrapping_sql(&self, tag_len: usize) -> String {
        format!(
            "SELECT CAST({k} AS TEXT), substr({dk}, 1, {len}), CAST(COUNT(*) AS BIGINT) \
             FROM {t} WHERE {k} IS NOT NULL GROUP BY 1, 2",
            len = self.encoding.stored_len(tag_len),
            k = self.columns.encryption_key_id.q(),
            dk = self.columns.data_key_ciphertext.q(),
            t = self.table.q(),
        )
    }

    /// Rows on key `$1`, one statement over every target.
    pub fn count_on_key_sql(targets: &[RotationTarget]) -> String {
        let counts: Vec<String> = targets
            .iter()
            .map(|t| {
                format!(
                    "(SELECT COUNT(*) FROM {} WHERE {} = $1)",
                    t.table.q(),
                    t.columns.encryption_key_id.q()
                )
            })
            .collect();
        if counts.is_empty() {
            "SELECT CAST(0 AS BIGINT)".to_owned()
        } else {
            format!("SELECT CAST({} AS BIGINT)", counts.join(" + "))
        }
    }

    /// Counts the rows still to rotate; binds $1 key, $2 job, $3 the
    /// job's wrap tag in the target's stored form.
    pub fn count_off_target_sql(&self) -> String {
        format!(
            "SELECT CAST(COUNT(*) AS BIGINT) FROM {} WHERE {}",
            self.table.q(),
            self.off_target("$3")
        )
    }

    /// The next batch after a cursor (`first`: the cursor is empty, the
    /// target's first batch); binds $1 key, $2 job, $3 cursor, $4 limit,
    /// $5 the job's wrap tag in the target's stored form.
    /// Columns come back under fixed aliases (`ctx_0`, `ctx_1`, … for the
    /// context).
    pub fn select_batch_sql(&self, first: bool) -> String {
        self.select_page_sql(&self.off_target("$5"), "$3", "$4", first)
    }

    /// The next page of rows on a key that still hold a legacy copy (what
    /// `legacy cutover` clears), under the aliases of
    /// [`Self::select_batch_sql`]; binds $1 cursor, $2 limit. Empty for a
    /// target without legacy columns.
    pub fn select_legacy_copies_sql(&self, first: bool) -> Option<String> {
        let (legacy_ct, _) = self.legacy.as_ref()?;
        let pred = format!(
            "{} IS NOT NULL AND {} IS NOT NULL",
            self.columns.encryption_key_id.q(),
            legacy_ct.q()
        );
        Some(self.select_page_sql(&pred, "$1", "$2", first))
    }

    /// Rows matching `pred` after the id `cursor` (a placeholder), at most
    /// `limit`, in id order. With the id's type known, rows are paged in
    /// that type, so the primary key's index serves the page.
    fn select_page_sql(&self, pred: &str, cursor: &str, limit: &str, first: bool) -> String {
        // Qualified: a bare `id` in ORDER BY would name the select list's
        // `CAST(id AS TEXT) AS id` and sort by text.
        let id = format!("{}.{}", self.table.q(), self.id.q());
        let after = match (&self.id_type, first) {
            (Some(_), true) => format!("{cursor} = '' ORDER BY {id}"),
            (Some(t), false) => format!("{id} > CAST({cursor} AS {}) ORDER BY {id}", t.as_str()),
            (None, _) => format!("CAST({id} AS TEXT) > {cursor} ORDER BY CAST({id} AS TEXT)"),
        };
        format!(
            "{} WHERE {pred} AND {after} LIMIT {limit}",
            self.select_rows()
        )
    }

    /// Up to $2 rows on key $1 (a sample, to prove a master secret can
    /// read what was written under the key), under the aliases of
    /// [`Self::select_batch_sql`].
    pub fn sample_on_key_sql(&self) -> String {
        format!(
            "{} WHERE {k} = $1 LIMIT $2",
            self.select_rows(),
            k = self.columns.encryption_key_id.q(),
        )
    }

    /// `SELECT <the columns a rotation reads> FROM <table>`.
    fn select_rows(&self) -> String {
        let c = &self.columns;
        let (legacy_ct, legacy_iv) = match &self.legacy {
            Some((ct, iv)) => (ct.q(), iv.q()),
            None => ("NULL".to_owned(), "NULL".to_owned()),
        };
        let context: String = self
            .context
            .iter()
            .enumerate()
            .map(|(i, (_, col))| format!(", CAST({} AS TEXT) AS ctx_{i}", col.q()))
            .collect();
        format!(
            "SELECT CAST({id} AS TEXT) AS id, {k} AS encryption_key_id, {dk} AS data_key_ciphertext, \
             {dkiv} AS data_key_iv, {ct} AS payload_ciphertext, {iv} AS payload_iv, \
             {legacy_ct} AS legacy_ciphertext, {legacy_iv} AS legacy_iv{context} FROM {table}",
            id = self.id.q(),
            k = c.encryption_key_id.q(),
            dk = c.data_key_ciphertext.q(),
            dkiv = c.data_key_iv.q(),
            ct = c.payload_ciphertext.q(),
            iv = c.payload_iv.q(),
            table = self.table.q(),
        )
    }

    fn legacy_cas(&self, old: &str) -> String {
        match &self.legacy {
            Some((ct, _)) => format!(
                " AND {}.{} IS NOT DISTINCT FROM {old}",
                self.table.q(),
                ct.q()
            ),
            None => String::new(),
        }
    }

    /// The SET list of a write-back: the envelope columns take the given
    /// values, the error columns are cleared. The legacy columns stay as
    /// they are: the application's old pods may still read them, until the
    /// operator runs `keyward legacy cutover`.
    fn set_envelope(&self, key: &str, dk: &str, dk_iv: &str, ct: &str, iv: &str) -> String {
        let c = &self.columns;
        format!(
            "{} = {key}, {} = {dk}, {} = {dk_iv}, {} = {ct}, {} = {iv}, {} = NULL, {} = NULL",
            c.encryption_key_id.q(),
            c.data_key_ciphertext.q(),
            c.data_key_iv.q(),
            c.payload_ciphertext.q(),
            c.payload_iv.q(),
            c.last_error.q(),
            c.last_error_job_id.q(),
        )
    }

    /// PostgreSQL: the whole batch in one statement.
    /// Binds $1 key, $2..$9 arrays (id, dk, dk_iv, ct, iv, old_key, old_ct, old_legacy).
    pub fn write_batch_sql_postgres(&self) -> String {
        let t = self.table.q();
        format!(
            "UPDATE {t} SET {set} \
             FROM UNNEST($2::text[], $3::{a}, $4::{a}, $5::{a}, $6::{a}, $7::text[], \
                         $8::{a}, $9::{a}) AS u(id, dk, dk_iv, ct, iv, old_key, old_ct, old_legacy) \
             WHERE {id_is} AND {t}.{k} IS NOT DISTINCT FROM u.old_key \
               AND {t}.{ct} IS NOT DISTINCT FROM u.old_ct{legacy}",
            set = self.set_envelope("$1", "u.dk", "u.dk_iv", "u.ct", "u.iv"),
            k = self.columns.encryption_key_id.q(),
            ct = self.columns.payload_ciphertext.q(),
            id_is = self.id_is(&format!("{t}.{}", self.id.q()), "u.id"),
            legacy = self.legacy_cas("u.old_legacy"),
            a = self.encoding.pg_array(),
        )
    }

    /// SQLite: one row. Binds $1 key, $2 dk, $3 dk_iv, $4 ct, $5 iv, $6 id,
    /// $7 old key, $8 old ct, $9 old legacy.
    pub fn write_row_sql_sqlite(&self) -> String {
        format!(
            "UPDATE {t} SET {set} WHERE {id_is} AND {k} IS $7 AND {ct} IS $8{legacy}",
            t = self.table.q(),
            set = self.set_envelope("$1", "$2", "$3", "$4", "$5"),
            k = self.columns.encryption_key_id.q(),
            ct = self.columns.payload_ciphertext.q(),
            id_is = self.id_is(&self.id.q(), "$6"),
            legacy = self.legacy_cas("$9"),
        )
    }

    /// Records a failed row. Binds $1 id, $2 message, $3 job.
    pub fn fail_row_sql(&self) -> String {
        format!(
            "UPDATE {} SET {} = $2, {} = $3 WHERE {}",
            self.table.q(),
            self.columns.last_error.q(),
            self.columns.last_error_job_id.q(),
            self.id_is(&self.id.q(), "$1")
        )
    }

    /// Clears a row's legacy copy if the row is still as it was read
    /// (compare-and-swap on key, payload and legacy ciphertext). Binds $1
    /// id, $2 key, $3 payload ciphertext, $4 legacy ciphertext. None for a
    /// target without legacy columns.
    pub fn clear_legacy_copy_sql(&self) -> Option<String> {
        let (ct, iv) = self.legacy.as_ref()?;
        Some(format!(
            "UPDATE {t} SET {ct} = NULL, {iv} = NULL WHERE {id_is} AND {k} IS NOT DISTINCT FROM $2 \
             AND {payload} IS NOT DISTINCT FROM $3{legacy}",
            t = self.table.q(),
            ct = ct.q(),
            iv = iv.q(),
            id_is = self.id_is(&self.id.q(), "$1"),
            k = self.columns.encryption_key_id.q(),
            payload = self.columns.payload_ciphertext.q(),
            legacy = self.legacy_cas("$4"),
        ))
    }

    /// Forgets a job's failures (requeue). Binds $1 job.
    pub fn clear_failures_sql(&self) -> String {
        let lej = self.columns.last_error_job_id.q();
        format!(
            "UPDATE {} SET {lej} = NULL WHERE {lej} = $1",
            self.table.q()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_checked() {
        for bad in ["", "1abc", "a-b", "a;drop table x", "a\"b", &"x".repeat(64)] {
            assert!(Ident::parse(bad).is_err(), "{bad:?}");
        }
        assert!(Ident::parse("api_tokens_2").is_ok());
    }

    #[test]
    fn configured_targets_need_a_context() {
        assert_eq!(
            RotationTarget::new("t", "id", &[], &[], None, None).unwrap_err(),
            TargetError::NoContext("t".into())
        );
        let t = RotationTarget::new(
            "api_tokens",
            "id",
            &[("token_id".into(), "id".into())],
            &[],
            None,
            None,
        )
        .unwrap();
        assert!(t.select_batch_sql(true).contains("FROM \"api_tokens\""));
        assert!(!t.write_row_sql_sqlite().contains("encrypted_credentials"));
    }

    #[test]
    fn encodings_round_trip_and_compare_wrap_tags_by_what_the_tag_decides() {
        let bytes = [0x4b, 0x01, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff, 0x00, 0x11];
        for encoding in [Encoding::Bytes, Encoding::Base64, Encoding::Hex] {
            let stored = encoding.encode(&bytes).into_bytes();
            assert_eq!(encoding.decode(&stored).unwrap(), bytes, "{encoding:?}");
            assert_eq!(Encoding::parse(encoding.as_str()), Ok(encoding));
            // The stored prefix of a tag is where the stored value begins.
            let prefix = encoding.stored_prefix(&bytes).into_bytes();
            assert!(stored.starts_with(&prefix), "{encoding:?}");
            // The units holding the tag whole decode back to it.
            let whole = &stored[..encoding.stored_len(bytes.len()).min(stored.len())];
            assert!(encoding.decode(whole).unwrap().starts_with(&bytes[..9]));
        }
        // Base64 compares the 9 bytes its first 12 characters decide.
        assert_eq!(Encoding::Base64.stored_prefix(&bytes).into_text().len(), 12);
        // Hex written in capitals reads; a value not in the encoding does not.
        assert_eq!(Encoding::Hex.decode(b"4B01").unwrap(), [0x4b, 0x01]);
        assert!(Encoding::Hex.decode(b"xyz").is_err());
        assert!(Encoding::Base64.decode(b"%%").is_err());
        assert_eq!(
            Encoding::parse("utf8"),
            Err(TargetError::BadEncoding("utf8".into()))
        );
    }

    #[test]
    fn connections_context_is_the_row_id() {
        let t = RotationTarget::connections();
        let ctx = t.context_of(&[Some("42".into())]).unwrap();
        assert_eq!(
            ctx,
            EncryptionContext::from_pairs([("connection_id", "42")]).unwrap()
        );
    }
}
