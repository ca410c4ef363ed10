//! The service-level error and its one mapping to gRPC status codes: validation →
//! `INVALID_ARGUMENT`, unknown ids → `NOT_FOUND`, overload → `RESOURCE_EXHAUSTED`,
//! broken model/store → `UNAVAILABLE` / `INTERNAL`.

use crate::embed::{EmbedError, SubmitError};
use crate::index::IndexError;
use crate::store::StoreError;

/// Errors the engine and the server return.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is missing or bad; the message names the field.
    #[error("{field}: {reason}")]
    Invalid {
        /// The offending field, as named in the API.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// An id that does not exist.
    #[error("{0}")]
    NotFound(String),
    /// Too much work queued; the caller should back off.
    #[error(transparent)]
    Overloaded(#[from] SubmitError),
    /// The embedding model failed.
    #[error(transparent)]
    Embed(#[from] EmbedError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The index failed.
    #[error(transparent)]
    Index(#[from] IndexError),
    /// The data directory holds another model's vectors (see `Engine::check_model`).
    #[error("{0}")]
    OtherModel(String),
    /// The engine refuses writes after a failed commit until it is restarted (and rebuilt from
    /// the store), so memory never holds prompts the store lost.
    #[error("engine unavailable: {0}")]
    Unavailable(String),
}

impl Error {
    /// A validation error for `field`.
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::Invalid {
            field,
            reason: reason.into(),
        }
    }

    /// What went wrong, without the `engine unavailable: ` that an `Unavailable` error's own
    /// text begins with: for wrapping it in another `Unavailable` without saying that twice.
    pub fn cause(&self) -> String {
        match self {
            Self::Unavailable(m) => m.clone(),
            e => e.to_string(),
        }
    }

    /// The gRPC status code for this error.
    pub fn code(&self) -> tonic::Code {
        match self {
            Self::Invalid { .. } => tonic::Code::InvalidArgument,
            Self::NotFound(_) => tonic::Code::NotFound,
            Self::Overloaded(SubmitError::Full(_)) => tonic::Code::ResourceExhausted,
            Self::Overloaded(SubmitError::Closed) | Self::Unavailable(_) => {
                tonic::Code::Unavailable
            }
            Self::OtherModel(_) => tonic::Code::FailedPrecondition,
            Self::Embed(_) | Self::Store(_) | Self::Index(_) => tonic::Code::Internal,
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        tonic::Status::new(e.code(), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes() {
        let s: tonic::Status = Error::invalid("prompt", "must not be empty").into();
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert_eq!(s.message(), "prompt: must not be empty");
        let s: tonic::Status = Error::Overloaded(SubmitError::Full(8)).into();
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
        assert_eq!(
            tonic::Status::from(Error::NotFound("x".into())).code(),
            tonic::Code::NotFound
        );
        assert_eq!(
            tonic::Status::from(Error::Unavailable("x".into())).code(),
            tonic::Code::Unavailable
        );
    }
}
