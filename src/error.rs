//! The domain error: everything an operation of keyward can fail with.
//!
//! Each variant is a distinct situation a caller can act on; `api::status`
//! maps them to gRPC codes in one exhaustive match. Messages are lowercase,
//! say what to do, and never contain key material or plaintext.

use crate::{
    crypto::{
        blob::BlobError,
        context::ContextError,
        kms::{KmsError, ProviderKind},
    },
    keys::KeyStatus,
    store::StoreError,
};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Encrypt was given no bytes.
    #[error("plaintext is empty: encrypt at least one byte")]
    EmptyPlaintext,
    /// Encrypt was given more than the configured limit.
    #[error("plaintext is {len} bytes, over the limit of {max}: store large data elsewhere and encrypt its key")]
    PlaintextTooLarge { len: usize, max: usize },
    /// A batch had more items than the configured limit.
    #[error("batch has {len} items, over the limit of {max}: split it into smaller batches")]
    BatchTooLarge { len: usize, max: usize },
    /// The encryption context was refused.
    #[error("invalid encryption context: {0}")]
    InvalidContext(#[from] ContextError),
    /// Decrypt was given neither an envelope nor a blob.
    #[error("no ciphertext: set either `envelope` or `blob`")]
    MissingCiphertext,
    /// The blob could not be parsed.
    #[error("invalid blob: {0}")]
    MalformedBlob(#[from] BlobError),
    /// A structured envelope is missing or has a malformed field.
    #[error("invalid envelope: {0}")]
    MalformedEnvelope(&'static str),
    /// Authentication failed: modified ciphertext or a different context.
    #[error("decryption failed: the ciphertext was modified, or the encryption context differs from the one used to encrypt")]
    DecryptionFailed,
    /// A legacy ciphertext arrived but no master secret is configured.
    #[error("legacy ciphertexts need the master secret: set ENCRYPTION_MASTER_KEY")]
    LegacyUnavailable,
    /// An envelope names a key record the catalog does not have.
    #[error("encryption key {0} is not in the key catalog: if its encryption_keys row was deleted, restore it and call RefreshKeyMetadata")]
    UnknownKey(String),
    /// An admin request names a key that does not exist.
    #[error("no key with key_id or id {0:?}: list keys with ListKeys")]
    KeyNotFound(String),
    /// A rotation job id that does not exist.
    #[error("no rotation job with id {0:?}: list jobs with ListRotationJobs")]
    JobNotFound(String),
    /// The operation is not allowed from the job's current status.
    #[error("rotation job {job_id} is {status}: {hint}")]
    JobStatusConflict {
        job_id: String,
        status: crate::rotation::JobStatus,
        hint: &'static str,
    },
    /// There is no active key to encrypt with.
    #[error("no active key: create and activate one (keyward seed-key, or Admin/CreateKey with activate)")]
    NoActiveKey,
    /// A key record with this key_id already exists.
    #[error("a key with key_id {0:?} already exists")]
    KeyExists(String),
    /// The operation is not allowed from the key's current status.
    #[error("key {key_id} is {status}: {hint}")]
    KeyStatusConflict {
        key_id: String,
        status: KeyStatus,
        hint: &'static str,
    },
    /// Rows still reference the key that was to be retired.
    #[error("key {key_id} is still referenced by {rows} connections rows: run a rotation first, or retire with force")]
    KeyInUse { key_id: String, rows: i64 },
    /// Something still depends on the key that was to be retired.
    #[error("key {key_id} cannot be retired yet: {}. Next: {}; or retire with force (audited)", blockers.join("; "), next_steps.join("; "))]
    RetireBlocked {
        key_id: String,
        blockers: Vec<String>,
        next_steps: Vec<String>,
    },
    /// A replica cannot use the key a staged activation is about to make
    /// active (or did not confirm in time).
    #[error("staged activation of key {key_id} stopped: replica {replica} cannot use it: {reason}; the key was not activated. Fix that replica (see keyward replicas list) and activate again")]
    ReplicaNotReady {
        replica: String,
        key_id: String,
        reason: String,
    },
    /// An admin request field is invalid.
    #[error("invalid {field}: {reason}")]
    InvalidField { field: &'static str, reason: String },
    /// The key's provider is not configured in this process.
    #[error("kms provider {0} is not configured on this server")]
    ProviderUnavailable(ProviderKind),
    /// The key's KMS failed a round trip (self-test before activation).
    #[error("key {key_id} failed its kms round trip: {source}")]
    KeyUnusable {
        key_id: String,
        #[source]
        source: Box<Error>,
    },
    /// This process cannot open what was written under a key: its master
    /// secret (or KMS key) is not the one that wrote it.
    #[error("{0}")]
    ForeignKey(String),
    /// This server will not write: its configuration cannot open the keys'
    /// data (another master secret wrote it), so nothing it encrypted could
    /// be read by the other replicas.
    #[error("this server does not encrypt: {0}; send the call to another replica")]
    NotServing(String),
    /// A ciphertext names a key record this process has not loaded, and
    /// the catalog cannot be read now to find it: retry, do not restore.
    #[error("encryption key {key} is not loaded here and the key catalog cannot be read now ({reason}): retry shortly")]
    CatalogUnavailable { key: String, reason: String },
    /// A key's probe could not be checked (the KMS failed, …).
    #[error("the key could not be checked: {0}")]
    KeyUnchecked(String),
    /// A `--rotation-targets` file disagrees with the list in the database.
    #[error("the rotation targets of --rotation-targets differ from the database's: {0}. Change the list with keyward targets add|remove, or the file to match (keyward targets list)")]
    TargetsDiffer(String),
    /// The legacy format this process was given is not the one recorded.
    #[error("this process's legacy format {given} differs from the one the database records, {recorded}: pass the same --legacy-* flags (or none, to follow the record), or change the record with keyward legacy format --set")]
    LegacyFormatDiffers { recorded: String, given: String },
    /// A rotation target names what its table does not have.
    #[error("rotation target refused: {0}")]
    TargetNotInSchema(String),
    /// The table is a rotation target already.
    #[error("{0} is a rotation target already: remove it first to change its definition")]
    TargetListed(String),
    /// The table is not a rotation target.
    #[error("{0} is not a rotation target (keyward targets list)")]
    TargetNotListed(String),
    /// The list cannot change under a job that walks it.
    #[error("rotation targets cannot change while rotation job {0} is pending or running: wait for it to finish or cancel it (keyward rotate cancel)")]
    TargetsBusy(String),
    /// Removing the target would hide rows that still hold envelopes.
    #[error("{table} still holds {rows} rows under keyward keys: without it keyward would not count them before retiring a key; remove with force to do it anyway (audited)")]
    TargetInUse { table: String, rows: i64 },
    /// The caller is not authenticated, not allowed, or over its rate limit.
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthError),
    /// The audit event of the request could not be written (fail-closed).
    #[error(transparent)]
    Audit(#[from] crate::auth::audit::AuditError),
    /// The KMS provider failed.
    #[error(transparent)]
    Kms(#[from] KmsError),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error and its causes as one line (`report::chain`), here as well for
/// the callers that handle the domain error.
pub use crate::report::chain;
