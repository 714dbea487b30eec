//! Why an SDK call failed, and the stable code of each failure.

use cubby_core::DocId;
use cubby_store::StoreError;

/// Why an SDK call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The builder is missing something or was given something invalid.
    #[error("invalid client configuration: {0}")]
    Config(String),
    /// The local store failed.
    #[error("local store: {0}")]
    Store(#[from] StoreError),
    /// No such document on this device.
    #[error("unknown document {0}")]
    UnknownDocument(DocId),
    /// The document was deleted (on another device, or through the account or admin API): it
    /// takes no more changes.
    #[error("document {0} was deleted")]
    Deleted(DocId),
    /// The local store holds data that does not load.
    #[error("local document {0} is damaged")]
    Damaged(DocId),
    /// An Automerge operation failed (for example a bad object id in a transaction).
    #[error("document change failed: {0}")]
    Change(#[from] automerge::AutomergeError),
    /// The client was shut down.
    #[error("the client is shut down")]
    Closed,
    /// The document does not have the shape of the type it was read as or written from
    /// ([`crate::DocHandle::hydrate`], [`crate::DocHandle::reconcile`]).
    #[error("the document does not have the shape of the type: {0}")]
    Shape(String),
    /// The token speaks for another account than the one whose data this device holds: this
    /// client shows and syncs nothing (use another data directory for that account).
    #[error(
        "this device's data belongs to another account than the token's; use another data \
         directory for this account"
    )]
    WrongAccount,
    /// The server refused a call, could not be reached, or answered what the client cannot
    /// read; `code` says which ([`ErrorCode::Offline`] when unreachable).
    #[error("server: {message}")]
    Server {
        /// What kind of failure.
        code: ErrorCode,
        /// What happened, for people.
        message: String,
    },
    /// The server told this device to wipe its local copy (revoked, or the account erased),
    /// and it did: nothing is left to read and nothing more is synced. Building a client on
    /// the same directory starts a new device.
    #[error("this device was wiped ({0:?}): its local data is gone")]
    Wiped(crate::WipeReason),
    /// Writing an export failed.
    #[error("cannot write: {0}")]
    Io(#[source] std::io::Error),
}

impl From<autosurgeon::HydrateError> for ClientError {
    fn from(err: autosurgeon::HydrateError) -> Self {
        Self::Shape(err.to_string())
    }
}

impl From<autosurgeon::ReconcileError> for ClientError {
    fn from(err: autosurgeon::ReconcileError) -> Self {
        match err {
            autosurgeon::ReconcileError::Automerge(err) => Self::Change(err),
            other => Self::Shape(other.to_string()),
        }
    }
}

impl ClientError {
    /// A failure the server reported or caused.
    pub(crate) fn server(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::Server { code, message: message.into() }
    }

    /// The server's refusal of a call (its message names the gRPC code, as `NotFound: ...`),
    /// or the transport's failure to reach it ([`ErrorCode::Offline`]).
    pub(crate) fn refused(status: &tonic::Status) -> Self {
        let message = format!("{:?}: {}", status.code(), status.message());
        let unreachable = status.code() == tonic::Code::Unavailable
            && (status.message().contains("transport") || status.message().contains("connect"));
        let code = if unreachable { ErrorCode::Offline } else { ErrorCode::from(status.code()) };
        Self::server(code, message)
    }

    /// The stable code of this failure, for programs (and bindings) to act on.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Config(_) => ErrorCode::Config,
            Self::Store(StoreError::InUse) => ErrorCode::StoreInUse,
            Self::Store(StoreError::Erased) | Self::Wiped(_) => ErrorCode::Wiped,
            Self::Store(_) => ErrorCode::LocalStore,
            Self::UnknownDocument(_) => ErrorCode::UnknownDocument,
            Self::Deleted(_) => ErrorCode::Deleted,
            Self::Damaged(_) => ErrorCode::Damaged,
            Self::Change(_) => ErrorCode::InvalidChange,
            Self::Closed => ErrorCode::Closed,
            Self::Shape(_) => ErrorCode::Shape,
            Self::WrongAccount => ErrorCode::WrongAccount,
            Self::Server { code, .. } => *code,
            Self::Io(_) => ErrorCode::Io,
        }
    }
}

/// The stable code of a [`ClientError`]: the gRPC status code the server answered with, or one
/// of the client's own. Its [`ErrorCode::as_str`] names never change meaning.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    // The client's own.
    /// The builder is missing something or was given something invalid.
    Config,
    /// The local store failed.
    LocalStore,
    /// Another client has the local store open.
    StoreInUse,
    /// No such document on this device.
    UnknownDocument,
    /// The document was deleted; it takes no more changes.
    Deleted,
    /// The local store holds data that does not load.
    Damaged,
    /// An Automerge operation in a change failed.
    InvalidChange,
    /// The client was shut down.
    Closed,
    /// The document does not have the shape of the type asked for.
    Shape,
    /// The token is another account's than the one whose data this device holds.
    WrongAccount,
    /// Writing a file failed.
    Io,
    /// The server could not be reached.
    Offline,
    /// This device was wiped (revoked, or the account erased): its local store holds nothing
    /// and this client can do nothing more.
    Wiped,
    // The server's, as gRPC names them.
    /// `INVALID_ARGUMENT`: the request was malformed or refused as invalid.
    InvalidArgument,
    /// `UNAUTHENTICATED`: no token, or one the server does not accept.
    Unauthenticated,
    /// `PERMISSION_DENIED`: the token may not do this (a revoked device, a private document).
    PermissionDenied,
    /// `NOT_FOUND`: no such document, device or account (an erased account among them).
    NotFound,
    /// `ALREADY_EXISTS`.
    AlreadyExists,
    /// `RESOURCE_EXHAUSTED`: a limit of the customer's or the server's.
    ResourceExhausted,
    /// `FAILED_PRECONDITION`.
    FailedPrecondition,
    /// `UNAVAILABLE`: try again later.
    Unavailable,
    /// `DEADLINE_EXCEEDED`.
    DeadlineExceeded,
    /// `DATA_LOSS`: stored data failed its check.
    DataLoss,
    /// `INTERNAL`, and answers the client cannot read.
    Internal,
    /// Any other gRPC code.
    Other,
}

impl ErrorCode {
    /// The code's stable name, in `snake_case` (`"unknown_document"`, `"resource_exhausted"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Config => "config",
            Self::LocalStore => "local_store",
            Self::StoreInUse => "store_in_use",
            Self::UnknownDocument => "unknown_document",
            Self::Deleted => "deleted",
            Self::Damaged => "damaged",
            Self::InvalidChange => "invalid_change",
            Self::Closed => "closed",
            Self::Shape => "shape",
            Self::WrongAccount => "wrong_account",
            Self::Io => "io",
            Self::Offline => "offline",
            Self::Wiped => "wiped",
            Self::InvalidArgument => "invalid_argument",
            Self::Unauthenticated => "unauthenticated",
            Self::PermissionDenied => "permission_denied",
            Self::NotFound => "not_found",
            Self::AlreadyExists => "already_exists",
            Self::ResourceExhausted => "resource_exhausted",
            Self::FailedPrecondition => "failed_precondition",
            Self::Unavailable => "unavailable",
            Self::DeadlineExceeded => "deadline_exceeded",
            Self::DataLoss => "data_loss",
            Self::Internal => "internal",
            Self::Other => "other",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<tonic::Code> for ErrorCode {
    fn from(code: tonic::Code) -> Self {
        use tonic::Code as C;
        match code {
            C::InvalidArgument | C::OutOfRange => Self::InvalidArgument,
            C::Unauthenticated => Self::Unauthenticated,
            C::PermissionDenied => Self::PermissionDenied,
            C::NotFound => Self::NotFound,
            C::AlreadyExists => Self::AlreadyExists,
            C::ResourceExhausted => Self::ResourceExhausted,
            C::FailedPrecondition | C::Aborted => Self::FailedPrecondition,
            C::Unavailable => Self::Unavailable,
            C::DeadlineExceeded => Self::DeadlineExceeded,
            C::DataLoss => Self::DataLoss,
            C::Internal => Self::Internal,
            C::Ok | C::Cancelled | C::Unknown | C::Unimplemented => Self::Other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_server_refusal_keeps_its_grpc_code_and_message() {
        let status = tonic::Status::resource_exhausted("the account is full");
        let err = ClientError::refused(&status);
        assert_eq!(err.code(), ErrorCode::ResourceExhausted);
        assert_eq!(err.code().as_str(), "resource_exhausted");
        assert_eq!(err.to_string(), "server: ResourceExhausted: the account is full");
    }

    #[test]
    fn local_failures_have_codes_of_their_own() {
        let id = DocId::from_bytes([3; 16]);
        assert_eq!(ClientError::UnknownDocument(id).code(), ErrorCode::UnknownDocument);
        assert_eq!(ClientError::Deleted(id).code(), ErrorCode::Deleted);
        assert_eq!(ClientError::Store(StoreError::InUse).code(), ErrorCode::StoreInUse);
        assert_eq!(ClientError::server(ErrorCode::Offline, "x").code().to_string(), "offline");
    }
}
