//! The crate's one error type, and its one mapping to gRPC status codes.

use crate::types::{JobId, ModelId, WorkerId};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input from a client or a worker; names the field.
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    #[error("unknown model {0}")]
    UnknownModel(ModelId),
    #[error("unknown job {0}")]
    UnknownJob(JobId),
    #[error("unknown worker {0}")]
    UnknownWorker(WorkerId),
    /// Something with this name exists already (a second live stream for
    /// one worker id).
    #[error("{0}")]
    AlreadyExists(String),
    /// The request is well formed but cannot be served in the current state.
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// A fault that may go away on retry (network, peer gone, disk busy).
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A downloaded file did not match its manifest.
    #[error("checksum mismatch for {path}: expected {expected}, got {actual}")]
    Checksum {
        path: String,
        expected: String,
        actual: String,
    },
    #[error("i/o error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("config: {0}")]
    Config(String),
    #[error("pipeline: {0}")]
    Pipeline(String),
    /// A call to a Corral server failed (client side).
    #[error("{code:?}: {message}")]
    Remote { code: tonic::Code, message: String },
    /// A bug: an invariant did not hold.
    #[error("internal: {0}")]
    Internal(String),
}

impl Error {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }

    pub fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }

    /// An equal copy, for errors shared between several waiters (`Error`
    /// holds an `io::Error`, which is not `Clone`).
    pub fn duplicate(&self) -> Error {
        match self {
            Error::InvalidArgument { field, reason } => Error::InvalidArgument {
                field,
                reason: reason.clone(),
            },
            Error::UnknownModel(m) => Error::UnknownModel(m.clone()),
            Error::UnknownJob(j) => Error::UnknownJob(j.clone()),
            Error::UnknownWorker(w) => Error::UnknownWorker(w.clone()),
            Error::AlreadyExists(s) => Error::AlreadyExists(s.clone()),
            Error::FailedPrecondition(s) => Error::FailedPrecondition(s.clone()),
            Error::ResourceExhausted(s) => Error::ResourceExhausted(s.clone()),
            Error::Unauthenticated(s) => Error::Unauthenticated(s.clone()),
            Error::PermissionDenied(s) => Error::PermissionDenied(s.clone()),
            Error::Unavailable(s) => Error::Unavailable(s.clone()),
            Error::Remote { code, message } => Error::Remote {
                code: *code,
                message: message.clone(),
            },
            Error::Checksum {
                path,
                expected,
                actual,
            } => Error::Checksum {
                path: path.clone(),
                expected: expected.clone(),
                actual: actual.clone(),
            },
            Error::Io { path, source } => Error::Io {
                path: path.clone(),
                source: std::io::Error::new(source.kind(), source.to_string()),
            },
            Error::Config(s) => Error::Config(s.clone()),
            Error::Pipeline(s) => Error::Pipeline(s.clone()),
            Error::Internal(s) => Error::Internal(s.clone()),
        }
    }

    /// Whether doing the same thing again (maybe elsewhere) may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Unavailable(_) | Self::Io { .. } | Self::ResourceExhausted(_)
        )
    }
}

impl From<tonic::Status> for Error {
    fn from(s: tonic::Status) -> Self {
        Self::Remote {
            code: s.code(),
            message: s.message().to_owned(),
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        use tonic::Code;
        let code = match &e {
            Error::InvalidArgument { .. } | Error::Config(_) => Code::InvalidArgument,
            Error::UnknownModel(_) | Error::UnknownJob(_) | Error::UnknownWorker(_) => {
                Code::NotFound
            }
            Error::FailedPrecondition(_) | Error::Checksum { .. } => Code::FailedPrecondition,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::Unavailable(_) | Error::Io { .. } => Code::Unavailable,
            Error::Pipeline(_) | Error::Internal(_) => Code::Internal,
            Error::Remote { code, .. } => *code,
        };
        tonic::Status::new(code, e.to_string())
    }
}
