//! The one error type every call throws, and the one a token provider throws.

use cubby_client::{ClientError, ErrorCode};

/// Why a call failed. The variant is the stable code (the same names as the SDK's
/// `ErrorCode`, which programs act on) and the message is for people. Flat: in Python each
/// variant is a subclass of `CubbyError` (`except CubbyError.Offline`), in Kotlin of
/// `CubbyException`, in Swift a case of `CubbyError`.
#[derive(Debug, thiserror::Error, uniffi::Error)]
#[uniffi(flat_error)]
pub enum CubbyError {
    // The client's own.
    /// The configuration is missing something or is invalid (a key of the wrong length, a
    /// certificate that does not verify, `http://` for a TLS server): fix it, do not retry.
    #[error("{0}")]
    Config(String),
    /// The local store failed.
    #[error("{0}")]
    LocalStore(String),
    /// Another client has the local store open (one client per data directory).
    #[error("{0}")]
    StoreInUse(String),
    /// No such document on this device.
    #[error("{0}")]
    UnknownDocument(String),
    /// The document was deleted; it takes no more changes.
    #[error("{0}")]
    Deleted(String),
    /// The local store holds data that does not load.
    #[error("{0}")]
    Damaged(String),
    /// The change is not valid for the document (splicing text at a key that holds no text,
    /// JSON that does not parse).
    #[error("{0}")]
    InvalidChange(String),
    /// The client was shut down.
    #[error("{0}")]
    Closed(String),
    /// The document does not have the shape asked for.
    #[error("{0}")]
    Shape(String),
    /// The token is another account's than the one whose data this device holds.
    #[error("{0}")]
    WrongAccount(String),
    /// Reading or writing a file failed.
    #[error("{0}")]
    Io(String),
    /// The server could not be reached: try again when the device is online.
    #[error("{0}")]
    Offline(String),
    /// This device was wiped (revoked, or the account erased): nothing more can be done with
    /// this client.
    #[error("{0}")]
    Wiped(String),
    /// Sync is paused by the app.
    #[error("{0}")]
    Paused(String),
    // The server's, as gRPC names them.
    /// `INVALID_ARGUMENT`.
    #[error("{0}")]
    InvalidArgument(String),
    /// `UNAUTHENTICATED`: no token, or one the server does not accept.
    #[error("{0}")]
    Unauthenticated(String),
    /// `PERMISSION_DENIED`: a revoked device, a private document.
    #[error("{0}")]
    PermissionDenied(String),
    /// `NOT_FOUND`: no such document, device or account (an erased account among them).
    #[error("{0}")]
    NotFound(String),
    /// `ALREADY_EXISTS`.
    #[error("{0}")]
    AlreadyExists(String),
    /// `RESOURCE_EXHAUSTED`: a limit of the customer's or the server's.
    #[error("{0}")]
    ResourceExhausted(String),
    /// `FAILED_PRECONDITION`.
    #[error("{0}")]
    FailedPrecondition(String),
    /// `UNAVAILABLE`: try again later.
    #[error("{0}")]
    Unavailable(String),
    /// `DEADLINE_EXCEEDED`.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// `DATA_LOSS`: stored data failed its check.
    #[error("{0}")]
    DataLoss(String),
    /// `INTERNAL`, answers the client cannot read, and failures inside Cubby.
    #[error("{0}")]
    Internal(String),
    /// Any other gRPC code.
    #[error("{0}")]
    Other(String),
}

impl From<ClientError> for CubbyError {
    fn from(err: ClientError) -> Self {
        let message = err.to_string();
        match err.code() {
            ErrorCode::Config => Self::Config(message),
            ErrorCode::LocalStore => Self::LocalStore(message),
            ErrorCode::StoreInUse => Self::StoreInUse(message),
            ErrorCode::UnknownDocument => Self::UnknownDocument(message),
            ErrorCode::Deleted => Self::Deleted(message),
            ErrorCode::Damaged => Self::Damaged(message),
            ErrorCode::InvalidChange => Self::InvalidChange(message),
            ErrorCode::Closed => Self::Closed(message),
            ErrorCode::Shape => Self::Shape(message),
            ErrorCode::WrongAccount => Self::WrongAccount(message),
            ErrorCode::Io => Self::Io(message),
            ErrorCode::Offline => Self::Offline(message),
            ErrorCode::Wiped => Self::Wiped(message),
            ErrorCode::InvalidArgument => Self::InvalidArgument(message),
            ErrorCode::Unauthenticated => Self::Unauthenticated(message),
            ErrorCode::PermissionDenied => Self::PermissionDenied(message),
            ErrorCode::NotFound => Self::NotFound(message),
            ErrorCode::AlreadyExists => Self::AlreadyExists(message),
            ErrorCode::ResourceExhausted => Self::ResourceExhausted(message),
            ErrorCode::FailedPrecondition => Self::FailedPrecondition(message),
            ErrorCode::Unavailable => Self::Unavailable(message),
            ErrorCode::DeadlineExceeded => Self::DeadlineExceeded(message),
            ErrorCode::DataLoss => Self::DataLoss(message),
            ErrorCode::Internal => Self::Internal(message),
            _ => Self::Other(message),
        }
    }
}

impl From<cubby_client::SyncFailure> for CubbyError {
    fn from(failure: cubby_client::SyncFailure) -> Self {
        use cubby_client::SyncFailure as F;
        let message = failure.to_string();
        match failure {
            F::Unreachable(_) => Self::Offline(message),
            F::Misconfigured(_) => Self::Config(message),
            F::Unauthenticated(_) => Self::Unauthenticated(message),
            F::PermissionDenied(_) => Self::PermissionDenied(message),
            F::Wipe(_) => Self::Wiped(message),
            F::WrongAccount => Self::WrongAccount(message),
            F::Paused => Self::Paused(message),
            _ => Self::Other(message),
        }
    }
}

/// What a [`crate::TokenProvider`] throws when it cannot supply a token (the user signed out,
/// the identity provider is unreachable). Sync reports it and tries again later.
#[derive(Debug, thiserror::Error, uniffi::Error)]
pub enum TokenError {
    /// No token could be had.
    #[error("{reason}")]
    Failed {
        /// Why, for the logs and the status.
        reason: String,
    },
}

impl From<uniffi::UnexpectedUniFFICallbackError> for TokenError {
    fn from(err: uniffi::UnexpectedUniFFICallbackError) -> Self {
        Self::Failed { reason: format!("the token provider failed: {}", err.reason) }
    }
}
