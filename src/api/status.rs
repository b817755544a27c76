//! Domain errors to gRPC status codes: one exhaustive match.
//!
//! Client mistakes get the code that tells the caller what to change and
//! the domain error's message (which never carries key material). Server
//! faults get INTERNAL with a generic message; the whole cause chain goes
//! to the log instead.

use tonic::{Code, Status};

use crate::{
    auth::AuthError,
    crypto::kms::KmsError,
    error::{chain, Error},
    store::StoreError,
};

/// The gRPC code for a domain error.
pub fn code_of(err: &Error) -> Code {
    match err {
        Error::EmptyPlaintext
        | Error::PlaintextTooLarge { .. }
        | Error::BatchTooLarge { .. }
        | Error::InvalidContext(_)
        | Error::MissingCiphertext
        | Error::MalformedBlob(_)
        | Error::MalformedEnvelope(_)
        | Error::DecryptionFailed
        | Error::InvalidField { .. } => Code::InvalidArgument,
        Error::UnknownKey(_) | Error::KeyNotFound(_) | Error::JobNotFound(_) => Code::NotFound,
        Error::KeyExists(_) => Code::AlreadyExists,
        Error::LegacyUnavailable
        | Error::NoActiveKey
        | Error::KeyStatusConflict { .. }
        | Error::KeyInUse { .. }
        | Error::RetireBlocked { .. }
        | Error::ReplicaNotReady { .. }
        | Error::ForeignKey(_)
        | Error::JobStatusConflict { .. }
        | Error::ProviderUnavailable(_) => Code::FailedPrecondition,
        // A KMS that is down or refuses us says so; anything else about the
        // key is a precondition the operator must fix.
        Error::KeyUnusable { source, .. } => match code_of(source) {
            code @ (Code::Unavailable | Code::PermissionDenied) => code,
            _ => Code::FailedPrecondition,
        },
        Error::Auth(auth) => match auth {
            AuthError::Unauthenticated(_) | AuthError::UnmappedCertificate(_) => {
                Code::Unauthenticated
            }
            AuthError::Denied(_) => Code::PermissionDenied,
            AuthError::RateLimited { .. } => Code::ResourceExhausted,
        },
        Error::TargetsDiffer(_)
        | Error::LegacyFormatDiffers { .. }
        | Error::TargetNotInSchema(_)
        | Error::TargetsBusy(_)
        | Error::TargetInUse { .. } => Code::FailedPrecondition,
        Error::TargetListed(_) => Code::AlreadyExists,
        Error::TargetNotListed(_) => Code::NotFound,
        Error::Audit(_)
        | Error::KeyUnchecked(_)
        | Error::NotServing(_)
        | Error::CatalogUnavailable { .. } => Code::Unavailable,
        Error::Kms(kms) => match kms {
            KmsError::UnwrapFailed => Code::InvalidArgument,
            KmsError::KeyDisabled { .. }
            | KmsError::KeyNotFound { .. }
            | KmsError::NotConfigured { .. }
            | KmsError::InvalidKeyRef { .. } => Code::FailedPrecondition,
            KmsError::AccessDenied { .. } => Code::PermissionDenied,
            KmsError::Unavailable { .. } => Code::Unavailable,
        },
        Error::Store(store) => match store {
            StoreError::Unavailable(_) => Code::Unavailable,
            StoreError::Concurrent => Code::Aborted,
            StoreError::Conflict(_) => Code::AlreadyExists,
            StoreError::InvalidUrl(_)
            | StoreError::Query(_)
            | StoreError::Corrupt(_)
            | StoreError::Migrate(_)
            | StoreError::TargetSchema(_)
            | StoreError::Adopt(_) => Code::Internal,
        },
    }
}

/// The message of every INTERNAL keyward answers itself (the cause goes to
/// the log); any other INTERNAL came from decoding the request.
pub const INTERNAL_MESSAGE: &str = "internal error: the server log has the details";

/// Converts a domain error into the status a caller sees.
pub fn to_status(err: &Error) -> Status {
    match code_of(err) {
        Code::Internal => {
            tracing::error!(error = %chain(err), "internal error");
            Status::internal(INTERNAL_MESSAGE)
        }
        Code::Unavailable => {
            tracing::warn!(error = %chain(err), "dependency unavailable");
            Status::unavailable(err.to_string())
        }
        code => Status::new(code, err.to_string()),
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        to_status(&err)
    }
}

/// The canonical name of a gRPC code, as audit events record results.
pub fn code_name(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::Ok => "ok",
        tonic::Code::Cancelled => "CANCELLED",
        tonic::Code::Unknown => "UNKNOWN",
        tonic::Code::InvalidArgument => "INVALID_ARGUMENT",
        tonic::Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        tonic::Code::NotFound => "NOT_FOUND",
        tonic::Code::AlreadyExists => "ALREADY_EXISTS",
        tonic::Code::PermissionDenied => "PERMISSION_DENIED",
        tonic::Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        tonic::Code::FailedPrecondition => "FAILED_PRECONDITION",
        tonic::Code::Aborted => "ABORTED",
        tonic::Code::OutOfRange => "OUT_OF_RANGE",
        tonic::Code::Unimplemented => "UNIMPLEMENTED",
        tonic::Code::Internal => "INTERNAL",
        tonic::Code::Unavailable => "UNAVAILABLE",
        tonic::Code::DataLoss => "DATA_LOSS",
        tonic::Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The canonical name of a gRPC code as metrics and logs show it (`OK`,
/// `INVALID_ARGUMENT`, …).
pub fn code_label(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::Ok => "OK",
        other => code_name(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_errors_hide_their_cause() {
        let err = Error::Store(StoreError::Corrupt("secret detail".into()));
        let status = to_status(&err);
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("secret detail"));
    }

    #[test]
    fn client_errors_keep_their_message() {
        let status = to_status(&Error::DecryptionFailed);
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("encryption context"));
    }
}
