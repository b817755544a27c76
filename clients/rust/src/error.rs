//! What a call failed with: one variant per gRPC code a caller acts on.

use tonic::{Code, Status};

use crate::proto;

/// What a call failed with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Bad input: a wrong context, a damaged or foreign ciphertext, limits.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// No such key record or rotation job.
    #[error("not found: {0}")]
    NotFound(String),
    /// The server cannot do it in its current state (no active key, a
    /// disabled KMS key, a job in the wrong state).
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// No valid token or client certificate.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// The caller's role or scope does not allow it.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// Rate limit, or a request larger than the server accepts.
    #[error("resource exhausted: {0}")]
    ResourceExhausted(String),
    /// The server or its KMS is unreachable for now: retry later.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// Any other gRPC code.
    #[error("{code:?}: {message}")]
    Other { code: Code, message: String },
    /// The connection could not be made.
    #[error("cannot connect: {0}")]
    Connect(#[from] tonic::transport::Error),
    /// The client was configured wrongly (e.g. a token that is not ASCII).
    #[error("invalid client configuration: {0}")]
    Config(String),
}

impl Error {
    fn from_code(code: Code, message: String) -> Self {
        match code {
            Code::InvalidArgument => Self::InvalidArgument(message),
            Code::NotFound => Self::NotFound(message),
            Code::FailedPrecondition => Self::FailedPrecondition(message),
            Code::Unauthenticated => Self::Unauthenticated(message),
            Code::PermissionDenied => Self::PermissionDenied(message),
            Code::ResourceExhausted => Self::ResourceExhausted(message),
            Code::Unavailable => Self::Unavailable(message),
            code => Self::Other { code, message },
        }
    }

    /// The gRPC code, for errors the server returned.
    pub fn code(&self) -> Option<Code> {
        Some(match self {
            Self::InvalidArgument(_) => Code::InvalidArgument,
            Self::NotFound(_) => Code::NotFound,
            Self::FailedPrecondition(_) => Code::FailedPrecondition,
            Self::Unauthenticated(_) => Code::Unauthenticated,
            Self::PermissionDenied(_) => Code::PermissionDenied,
            Self::ResourceExhausted(_) => Code::ResourceExhausted,
            Self::Unavailable(_) => Code::Unavailable,
            Self::Other { code, .. } => *code,
            Self::Connect(_) | Self::Config(_) => return None,
        })
    }
}

impl From<Status> for Error {
    fn from(status: Status) -> Self {
        Self::from_code(status.code(), status.message().to_owned())
    }
}

impl From<proto::ItemError> for Error {
    fn from(item: proto::ItemError) -> Self {
        Self::from_code(Code::from_i32(item.code), item.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_to_variants_and_back() {
        for code in [
            Code::InvalidArgument,
            Code::NotFound,
            Code::FailedPrecondition,
            Code::Unauthenticated,
            Code::PermissionDenied,
            Code::ResourceExhausted,
            Code::Unavailable,
            Code::Internal,
            Code::Aborted,
        ] {
            let error = Error::from(Status::new(code, "m"));
            assert_eq!(error.code(), Some(code));
        }
        assert!(matches!(
            Error::from(proto::ItemError {
                code: Code::InvalidArgument as i32,
                message: "bad".into()
            }),
            Error::InvalidArgument(m) if m == "bad"
        ));
    }
}
